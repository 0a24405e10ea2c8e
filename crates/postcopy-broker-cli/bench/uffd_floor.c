// uffd_floor.c: the project's own floor for `postcopy-broker bench` (the shortest paths the
// broker's hot paths compete with), so that the benchmark runs from a lone clone.
//
//   demand: a client process (a child: the bench moves children to the client's CPUs) faults on
//           a shared memfd page by page; this process reads each fault from the client's
//           userfaultfd, places the page through its own registered mapping (UFFDIO_COPY with
//           DONTWAKE) and wakes the client (UFFDIO_WAKE): the broker's path without anything
//           else. mode=poll blocks in poll(2), mode=spin busy-reads a non-blocking uffd.
//   place:  UFFDIO_COPY throughput at 4 KiB and 2 MiB per ioctl, UFFDIO_ZEROPAGE, and memcpy
//           into a fresh memfd.
//
// Usage: uffd_floor [pages] [mib]. Output: one `key=value` line per figure, the format of the
// shared reference uffd_limit.c (bench/reference.rs parses both).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define FILL 7 // every placed byte: the client's checksum is 7 per page

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

// Touch and free `bytes` of anonymous memory first: memory this VM never touched costs a host
// fault per page, which would be timed instead of the path.
static void warm(size_t bytes) {
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap warm");
    memset(p, 1, bytes);
    munmap(p, bytes);
}

static int new_uffd(int flags) {
    int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | flags);
    if (u < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(u, UFFDIO_API, &api))
        die("UFFDIO_API");
    return u;
}

static void register_missing(int u, void *addr, size_t len) {
    struct uffdio_register r = {.range = {(uintptr_t)addr, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(u, UFFDIO_REGISTER, &r))
        die("UFFDIO_REGISTER");
}

static void *map_shared(int fd, size_t len) {
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void send_fd(int sock, int fd) {
    char c = 0;
    struct iovec io = {&c, 1};
    char buf[CMSG_SPACE(sizeof(int))] = {0};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
    if (sendmsg(sock, &m, 0) != 1)
        die("sendmsg");
}

static int recv_fd(int sock) {
    char c;
    struct iovec io = {&c, 1};
    char buf[CMSG_SPACE(sizeof(int))];
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    if (recvmsg(sock, &m, 0) != 1)
        die("recvmsg");
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    if (!h || h->cmsg_type != SCM_RIGHTS)
        die("no fd received");
    int fd;
    memcpy(&fd, CMSG_DATA(h), sizeof fd);
    return fd;
}

// The client: map the memfd, hand over a uffd registered on it, touch every page once (timed).
static void client(int sock, int memfd, size_t pages, int spin, double *lat, uint64_t *sum) {
    char *ram = map_shared(memfd, pages * PAGE);
    int u = new_uffd(spin ? O_NONBLOCK : 0);
    register_missing(u, ram, pages * PAGE);
    send_fd(sock, u);
    uint64_t s = 0;
    for (size_t i = 0; i < pages; i++) {
        double t0 = now_us();
        s += (unsigned char)ram[i * PAGE];
        lat[i] = now_us() - t0;
    }
    *sum = s;
    _exit(0);
}

static void demand(size_t pages, int spin) {
    warm(2 * pages * PAGE);
    int memfd = memfd_create("uffd-floor-demand", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)(pages * PAGE)))
        die("memfd");
    double *lat = mmap(NULL, pages * sizeof(double) + PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (lat == MAP_FAILED)
        die("mmap results");
    uint64_t *sum = (uint64_t *)(lat + pages);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
        die("socketpair");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0)
        client(sv[1], memfd, pages, spin, lat, sum);

    // The handler: its own registered mapping of the same memfd to place through.
    char *own = map_shared(memfd, pages * PAGE);
    int own_uffd = new_uffd(0);
    register_missing(own_uffd, own, pages * PAGE);
    static char data[PAGE];
    memset(data, FILL, sizeof data);
    int cu = recv_fd(sv[0]);
    char *client_base = NULL;
    size_t served = 0;
    while (served < pages) {
        struct uffd_msg msg;
        if (!spin) {
            struct pollfd p = {cu, POLLIN, 0};
            if (poll(&p, 1, -1) < 0 && errno != EINTR)
                die("poll");
        }
        ssize_t n = read(cu, &msg, sizeof msg);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (n != sizeof msg)
            die("read uffd");
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t addr = msg.arg.pagefault.address & ~(PAGE - 1);
        if (!client_base) // the client touches page 0 first
            client_base = (char *)(uintptr_t)addr;
        uint64_t off = addr - (uintptr_t)client_base;
        struct uffdio_copy c = {.dst = (uintptr_t)own + off, .src = (uintptr_t)data, .len = PAGE,
                                .mode = UFFDIO_COPY_MODE_DONTWAKE};
        if (ioctl(own_uffd, UFFDIO_COPY, &c) && errno != EEXIST)
            die("UFFDIO_COPY");
        struct uffdio_range w = {addr, PAGE};
        if (ioctl(cu, UFFDIO_WAKE, &w))
            die("UFFDIO_WAKE");
        served++;
    }
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
        die("client");
    double total = 0, max = 0;
    for (size_t i = 0; i < pages; i++) {
        total += lat[i];
        max = lat[i] > max ? lat[i] : max;
    }
    qsort(lat, pages, sizeof(double), cmp_double);
    printf("demand mode=%s pages=%zu us_per_fault=%.2f p50=%.2f p99=%.2f max=%.2f checksum=%lu\n",
           spin ? "spin" : "poll", pages, total / pages, lat[pages / 2], lat[pages * 99 / 100], max,
           (unsigned long)*sum);
    munmap(own, pages * PAGE);
    munmap(lat, pages * sizeof(double) + PAGE);
    close(cu);
    close(own_uffd);
    close(memfd);
    close(sv[0]);
    close(sv[1]);
}

// GiB/s of filling a fresh memfd of `mib` MiB by `step`-byte UFFDIO_COPY (or ZEROPAGE, or memcpy).
static double place_rate(size_t mib, size_t step, int how) {
    size_t len = mib << 20;
    warm(2 * len);
    int memfd = memfd_create("uffd-floor-place", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)len))
        die("memfd");
    char *dst = map_shared(memfd, len);
    char *src = malloc(step);
    if (!src)
        die("malloc");
    memset(src, FILL, step);
    int u = -1;
    if (how != 2) {
        u = new_uffd(0);
        register_missing(u, dst, len);
    }
    double t0 = now_us();
    for (size_t off = 0; off < len; off += step) {
        if (how == 0) {
            struct uffdio_copy c = {.dst = (uintptr_t)dst + off, .src = (uintptr_t)src, .len = step};
            if (ioctl(u, UFFDIO_COPY, &c))
                die("UFFDIO_COPY");
        } else if (how == 1) {
            struct uffdio_zeropage z = {.range = {(uintptr_t)dst + off, step}};
            if (ioctl(u, UFFDIO_ZEROPAGE, &z))
                die("UFFDIO_ZEROPAGE");
        } else {
            memcpy(dst + off, src, step);
        }
    }
    double secs = (now_us() - t0) / 1e6;
    if (u >= 0)
        close(u);
    munmap(dst, len);
    close(memfd);
    free(src);
    return (double)len / (1UL << 30) / secs;
}

int main(int argc, char **argv) {
    size_t pages = argc > 1 ? strtoul(argv[1], NULL, 0) : 20000;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 0) : 512;
    if (pages < 1 || mib < 2) {
        fprintf(stderr, "usage: uffd_floor [pages >= 1] [mib >= 2]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    demand(pages, 0);
    demand(pages, 1);
    double c4 = place_rate(mib, PAGE, 0), c2 = place_rate(mib, HUGE, 0);
    double z2 = place_rate(mib, HUGE, 1), m = place_rate(mib, HUGE, 2);
    printf("place mib=%zu copy_4k_gibs=%.2f copy_2m_gibs=%.2f zeropage_2m_gibs=%.2f memcpy_fresh_gibs=%.2f\n", mib, c4,
           c2, z2, m);
    return 0;
}
