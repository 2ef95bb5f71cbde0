/* Peer: a single-threaded C epoll echo server (level-triggered, non-blocking sockets).
 *
 * Build: gcc -O2 -o epoll_echo epoll_echo.c
 * Usage: epoll_echo --host 127.0.0.1 --port 0   (prints "LISTENING <port>", serves until
 * SIGTERM/SIGINT, exits 0).
 *
 * Each readable client gets one read of up to 64 KiB into a shared buffer, written straight
 * back. Whatever the socket does not take is copied to a per-client buffer and the client is
 * switched from EPOLLIN to EPOLLOUT until it is flushed, so a client that pipelines and reads
 * slowly is throttled instead of growing memory. SIGTERM/SIGINT are blocked except inside
 * epoll_pwait, so a stop signal is never missed. TCP_NODELAY is not set.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 256

struct conn {
    int fd;
    char *pending; /* unsent tail of the last read, or NULL */
    size_t len, off;
};

static volatile sig_atomic_t stopping;
static char buf[BUF_SIZE];

static void on_signal(int signum) { (void)signum; stopping = 1; }

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

static void set_interest(int ep, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write data[0..len); keep what the socket refused. Returns -1 if the client is gone. */
static int send_or_buffer(int ep, struct conn *c, const char *data, size_t len) {
    size_t sent = 0;
    while (sent < len) {
        ssize_t n = send(c->fd, data + sent, len - sent, MSG_NOSIGNAL);
        if (n > 0) { sent += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return -1;
    }
    if (sent == len) return 0;
    c->len = len - sent;
    c->off = 0;
    c->pending = malloc(c->len);
    if (!c->pending) return -1;
    memcpy(c->pending, data + sent, c->len);
    set_interest(ep, c, EPOLLOUT);
    return 0;
}

static int on_readable(int ep, struct conn *c) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n > 0) return send_or_buffer(ep, c, buf, (size_t)n);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    return -1; /* EOF or error */
}

static int on_writable(int ep, struct conn *c) {
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n > 0) { c->off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    free(c->pending);
    c->pending = NULL;
    set_interest(ep, c, EPOLLIN);
    return 0;
}

static void on_acceptable(int ep, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or EMFILE etc.: try again on the next event */
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { close(fd); free(c); }
    }
}

static int listen_on(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res, *ai;
    int err = getaddrinfo(host, port, &hints, &res);
    if (err) { fprintf(stderr, "Error: %s: %s\n", host, gai_strerror(err)); return -1; }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 1024) == 0) break;
        close(fd);
        fd = -1;
    }
    if (fd < 0) fprintf(stderr, "Error: cannot listen on %s:%s: %s\n", host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = "0";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) host = argv[++i];
        else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) port = argv[++i];
        else { fprintf(stderr, "usage: %s [--host HOST] [--port PORT]\n", argv[0]); return 2; }
    }

    sigset_t blocked, during_wait;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, &during_wait);
    sigdelset(&during_wait, SIGTERM);
    sigdelset(&during_wait, SIGINT);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int lfd = listen_on(host, port);
    if (lfd < 0) return 1;
    struct sockaddr_storage addr;
    socklen_t addrlen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &addrlen);
    char portstr[NI_MAXSERV];
    getnameinfo((struct sockaddr *)&addr, addrlen, NULL, 0, portstr, sizeof portstr,
                NI_NUMERICSERV);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("LISTENING %s\n", portstr);
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_pwait(ep, events, MAX_EVENTS, -1, &during_wait);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) { on_acceptable(ep, lfd); continue; }
            int rc = c->pending ? on_writable(ep, c) : on_readable(ep, c);
            if (rc < 0) close_conn(ep, c);
        }
    }
    return 0;
}
