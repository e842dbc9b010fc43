/* A static uploader (built with `gcc -static` by the demo): no LD_PRELOAD reaches it, as none
 * reaches a Go program. `static_upload IP PORT SECONDS` sends for SECONDS, half-closes, and
 * waits for the receiver's count (a line with the bytes it read, then end of file); prints
 * `bytes N seconds S`: what the receiver got, from connect to its answer. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: static_upload IP PORT SECONDS\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    double began = now();
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("connect");
        return 1;
    }
    static char chunk[65536];
    double until = began + atof(argv[3]);
    while (now() < until) {
        if (write(fd, chunk, sizeof chunk) < 0) {
            perror("write");
            return 1;
        }
    }
    shutdown(fd, SHUT_WR);
    char answer[64] = {0};
    size_t got = 0;
    ssize_t n;
    while (got < sizeof answer - 1 && (n = read(fd, answer + got, sizeof answer - 1 - got)) > 0)
        got += n;
    printf("bytes %lld seconds %.3f\n", atoll(answer), now() - began);
    return 0;
}
