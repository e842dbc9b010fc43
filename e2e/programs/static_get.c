/* A static HTTP/1.0 client (built with `gcc -static` by the test): no LD_PRELOAD reaches it, as
 * none reaches a Go program. `static_get IP PORT PATH [PAUSE]` downloads PATH at about 1 MB/s
 * (so `ss` can sample the connection) and prints `bytes N`: everything received, headers
 * included; with PAUSE, waits that many seconds and downloads it again on a new connection. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int download(char **argv);

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: static_get IP PORT PATH [PAUSE]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (download(argv) != 0)
        return 1;
    if (argc == 5) {
        sleep(atoi(argv[4]));
        return download(argv);
    }
    return 0;
}

static int download(char **argv) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("connect");
        return 1;
    }
    char request[512];
    int len = snprintf(request, sizeof request, "GET %s HTTP/1.0\r\n\r\n", argv[3]);
    if (write(fd, request, len) != len) {
        perror("write");
        return 1;
    }
    static char buffer[16384];
    long total = 0;
    struct timespec pause = {0, 16 * 1000 * 1000};
    for (;;) {
        ssize_t n = read(fd, buffer, sizeof buffer);
        if (n < 0) {
            perror("read");
            return 1;
        }
        if (n == 0)
            break;
        total += n;
        nanosleep(&pause, NULL);
    }
    printf("bytes %ld\n", total);
    return 0;
}
