/* Socket scenarios run under the shim by tests/shim.rs. Each mode prints one line per
 * connection, "cc=NAME" being the congestion control the kernel reports for the socket, then
 * (where the test inspects the socket from outside) waits for stdin to close. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *host;
static int port;

static socklen_t address(struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        return sizeof *v4;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        return sizeof *v6;
    }
    fprintf(stderr, "bad host %s\n", host);
    exit(2);
}

static const char *cc(int fd) {
    static __thread char name[32];
    socklen_t len = sizeof name;
    memset(name, 0, sizeof name);
    if (getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, &len) != 0) return "none";
    return name;
}

/* The shim's own pinned state (-1: none), or -2 when the shim is not loaded. */
static int pinned(int fd) {
    int (*f)(int) = (int (*)(int))dlsym(RTLD_DEFAULT, "nsocket_pinned");
    return f ? f(fd) : -2;
}

static int tcp_socket(int flags) {
    struct sockaddr_storage ss;
    address(&ss);
    int fd = socket(ss.ss_family, SOCK_STREAM | flags, 0);
    if (fd < 0) { perror("socket"); exit(2); }
    return fd;
}

static int connect_tcp(void) {
    struct sockaddr_storage ss;
    socklen_t len = address(&ss);
    int fd = tcp_socket(0);
    if (connect(fd, (struct sockaddr *)&ss, len) != 0) {
        printf("connect errno=%d\n", errno);
        fflush(stdout);
        exit(3);
    }
    return fd;
}

static void wait_stdin(void) {
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {}
}

/* Non-blocking connect completed with epoll_create1, poll or select. */
static int connect_nonblocking(const char *how) {
    struct sockaddr_storage ss;
    socklen_t len = address(&ss);
    int fd = tcp_socket(SOCK_NONBLOCK);
    int rc = connect(fd, (struct sockaddr *)&ss, len);
    if (rc != 0 && errno != EINPROGRESS) { printf("connect errno=%d\n", errno); exit(3); }
    /* A second connect while in progress must not be decided again. */
    int again = connect(fd, (struct sockaddr *)&ss, len);
    int again_errno = errno;
    if (strcmp(how, "epoll") == 0) {
        int ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd}, out;
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        if (epoll_wait(ep, &out, 1, 5000) != 1) { printf("epoll timeout\n"); exit(3); }
        close(ep);
    } else if (strcmp(how, "poll") == 0) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 5000) != 1) { printf("poll timeout\n"); exit(3); }
    } else {
        fd_set w;
        FD_ZERO(&w);
        FD_SET(fd, &w);
        struct timeval tv = {5, 0};
        if (select(fd + 1, NULL, &w, NULL, &tv) != 1) { printf("select timeout\n"); exit(3); }
    }
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err != 0) { printf("so_error=%d\n", err); exit(3); }
    /* 0 once the handshake completed (Linux), else EALREADY/EINPROGRESS/EISCONN. */
    if (again != 0 && (again_errno != EALREADY && again_errno != EINPROGRESS && again_errno != EISCONN)) {
        printf("second connect rc=%d errno=%d\n", again, again_errno);
        exit(3);
    }
    return fd;
}

struct thread_result { int ok; char cc[32]; };

static void *thread_main(void *arg) {
    struct thread_result *r = arg;
    for (int i = 0; i < 20; i++) {
        int fd = connect_tcp();
        snprintf(r->cc, sizeof r->cc, "%s", cc(fd));
        close(fd);
        r->ok++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *mode = argv[1];
    if (argc >= 4) { host = argv[2]; port = atoi(argv[3]); }
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (strcmp(mode, "hold") == 0) {            /* connect, report, wait for stdin EOF */
        int fd = connect_tcp();
        printf("cc=%s pinned=%d\n", cc(fd), pinned(fd));
        wait_stdin();
        return 0;
    }
    if (strcmp(mode, "once") == 0) {            /* connect, report, exit */
        int fd = connect_tcp();
        printf("cc=%s pinned=%d\n", cc(fd), pinned(fd));
        return 0;
    }
    if (strcmp(mode, "twice") == 0) {           /* connect; wait for a line on stdin; again */
        int fd = connect_tcp();
        printf("cc=%s\n", cc(fd));
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 4;
        int fd2 = connect_tcp();
        printf("cc=%s\n", cc(fd2));
        return 0;
    }
    if (strcmp(mode, "until") == 0) {           /* reconnect until cc == argv[4] (10 s) */
        for (int i = 0; i < 400; i++) {
            int fd = connect_tcp();
            const char *got = cc(fd);
            close(fd);
            if (strcmp(got, argv[4]) == 0) { printf("cc=%s attempts=%d\n", got, i + 1); return 0; }
            usleep(25000);
        }
        printf("cc never became %s\n", argv[4]);
        return 5;
    }
    if (strcmp(mode, "epoll") == 0 || strcmp(mode, "poll") == 0 || strcmp(mode, "select") == 0) {
        int fd = connect_nonblocking(mode);
        printf("cc=%s pinned=%d\n", cc(fd), pinned(fd));
        wait_stdin();
        return 0;
    }
    if (strcmp(mode, "refused") == 0) {         /* a connect the policy forbids */
        struct sockaddr_storage ss;
        socklen_t len = address(&ss);
        int fd = tcp_socket(0);
        int rc = connect(fd, (struct sockaddr *)&ss, len);
        printf("rc=%d errno=%d\n", rc, rc == 0 ? 0 : errno);
        return 0;
    }
    if (strcmp(mode, "fork") == 0) {            /* parent and child each connect */
        int fd = connect_tcp();
        printf("parent cc=%s\n", cc(fd));
        pid_t child = fork();
        if (child == 0) {
            int inherited = pinned(fd);
            int fd2 = connect_tcp();
            printf("child cc=%s inherited_pinned=%d parent_pinned=%d\n", cc(fd2), inherited,
                   pinned(fd));
            close(fd);
            _exit(0);
        }
        int status;
        waitpid(child, &status, 0);
        int fd3 = connect_tcp();
        printf("parent-after cc=%s pinned=%d\n", cc(fd3), pinned(fd));
        return WIFEXITED(status) ? WEXITSTATUS(status) : 9;
    }
    if (strcmp(mode, "exec") == 0) {            /* exec ourselves: the shim is loaded again */
        if (argc >= 5) {
            int fd = connect_tcp();
            printf("exec'd cc=%s shim=%s\n", cc(fd), pinned(fd) == -2 ? "absent" : "loaded");
            return 0;
        }
        int fd = connect_tcp();
        printf("before-exec cc=%s\n", cc(fd));
        char portbuf[16];
        snprintf(portbuf, sizeof portbuf, "%d", port);
        execl("/proc/self/exe", argv[0], "exec", host, portbuf, "again", (char *)NULL);
        perror("execl");
        return 6;
    }
    if (strcmp(mode, "dup") == 0) {             /* dup2/dup3/F_DUPFD copy; close clears */
        int fd = connect_tcp();
        int p = pinned(fd);
        int a = dup2(fd, 200);
        int b = dup3(fd, 201, O_CLOEXEC);
        int c = fcntl(fd, F_DUPFD_CLOEXEC, 300);
        int d = dup(fd);
        printf("pinned=%d dup2=%d dup3=%d fdupfd=%d dup=%d\n", p, pinned(a), pinned(b),
               pinned(c), pinned(d));
        close(fd);
        printf("after-close original=%d copy=%d copy_cc=%s\n", pinned(fd), pinned(a), cc(a));
        /* dup2 onto a decided fd closes it: the target takes the source's (empty) state. */
        int plain = socket(AF_INET, SOCK_STREAM, 0);
        dup2(plain, 201);
        printf("dup2-over=%d\n", pinned(201));
        close(a); close(c); close(d); close(201); close(plain);
        printf("after-close-all=%d\n", pinned(a));
        return 0;
    }
    if (strcmp(mode, "close_range") == 0) {     /* close_range clears; a reused fd decides anew */
        int fds[4];
        for (int i = 0; i < 4; i++) fds[i] = connect_tcp();
        int first = fds[0];
        int decided = 0;
        for (int i = 0; i < 4; i++) decided += pinned(fds[i]) >= 0;
        if (close_range(first, ~0U, 0) != 0) { perror("close_range"); return 7; }
        int cleared = 0;
        for (int i = 0; i < 4; i++) cleared += pinned(fds[i]) == -1;
        int again = connect_tcp();
        printf("decided=%d cleared=%d reused=%d cc=%s pinned=%d\n", decided, cleared,
               again == first, cc(again), pinned(again));
        return 0;
    }
    if (strcmp(mode, "threads") == 0) {         /* 8 threads × 20 connects */
        pthread_t t[8];
        struct thread_result r[8];
        memset(r, 0, sizeof r);
        for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, thread_main, &r[i]);
        int ok = 0, same = 1;
        for (int i = 0; i < 8; i++) {
            pthread_join(t[i], NULL);
            ok += r[i].ok;
            same &= strcmp(r[i].cc, r[0].cc) == 0;
        }
        printf("connections=%d cc=%s same=%d\n", ok, r[0].cc, same);
        return 0;
    }
    if (strcmp(mode, "udp") == 0) {             /* first sendto decides; connected UDP too */
        struct sockaddr_storage ss;
        socklen_t len = address(&ss);
        int fd = socket(ss.ss_family, SOCK_DGRAM, 0);
        int before = pinned(fd);
        ssize_t n = sendto(fd, "ping", 4, 0, (struct sockaddr *)&ss, len);
        int after = pinned(fd);
        int c = socket(ss.ss_family, SOCK_DGRAM, 0);
        int crc = connect(c, (struct sockaddr *)&ss, len);
        ssize_t n2 = send(c, "pong", 4, 0);
        struct msghdr msg = {0};
        struct iovec iov = {.iov_base = "msg", .iov_len = 3};
        msg.msg_name = &ss;
        msg.msg_namelen = len;
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        int m = socket(ss.ss_family, SOCK_DGRAM, 0);
        ssize_t n3 = sendmsg(m, &msg, 0);
        printf("sent=%zd before=%d after=%d connected=%d/%zd pinned=%d sendmsg=%zd pinned=%d\n", n,
               before, after, crc, n2, pinned(c), n3, pinned(m));
        return 0;
    }
    if (strcmp(mode, "unix") == 0) {            /* AF_UNIX is left alone */
        int sv[2];
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        snprintf(un.sun_path, sizeof un.sun_path, "%s", argv[2]);
        int l = socket(AF_UNIX, SOCK_STREAM, 0);
        if (bind(l, (struct sockaddr *)&un, sizeof un) != 0 || listen(l, 4) != 0) return 8;
        int c = socket(AF_UNIX, SOCK_STREAM, 0);
        int rc = connect(c, (struct sockaddr *)&un, sizeof un);
        int a = accept(l, NULL, NULL);
        write(c, "hi", 2);
        char buf[2];
        ssize_t n = read(a, buf, 2);
        socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
        printf("connect=%d read=%zd pinned=%d listener=%d\n", rc, n, pinned(c), pinned(l));
        unlink(un.sun_path);
        return 0;
    }
    if (strcmp(mode, "listen") == 0) {          /* listen on 127.0.0.1:port until stdin closes */
        host = "127.0.0.1";
        port = atoi(argv[2]);
        struct sockaddr_storage ss;
        socklen_t len = address(&ss);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 8) != 0) { perror("listen"); return 8; }
        printf("listening\n");
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 4;
        close(fd);
        printf("closed\n");
        wait_stdin();
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
