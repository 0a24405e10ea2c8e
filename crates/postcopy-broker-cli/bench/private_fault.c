// private_fault: the floor of a private (Firecracker-style) fault served from a snapshot image,
// the reference of the broker's private fault path (`postcopy-broker bench --cases private`).
//
// A client process maps private anonymous memory (4 KiB pages, or hugetlb 2 MiB pages as
// Firecracker's hugepages option does), registers it with its own userfaultfd in MISSING mode
// with UFFD_FEATURE_EVENT_REMOVE (as Firecracker does), hands the uffd to the handler over a
// socketpair (SCM_RIGHTS) and reads one byte of each page in order, timing every access. The
// handler (this process) maps the image file read-only, shared, and serves each fault with one
// UFFDIO_COPY (which also wakes the client) straight from its mapping at the page's offset: the
// one copy that Firecracker's example handler makes too. mode=poll blocks in poll(); mode=spin
// busy-reads the non-blocking uffd. With `populate`, the handler first maps the page's source
// range with madvise(MADV_POPULATE_READ), as the broker does for 2 MiB pages (a copy from an
// unpopulated mapping faults its source in page by page inside the ioctl).
//
// Build: cc -O2 -o private_fault private_fault.c
// Run:   ./private_fault IMAGE PAGE_SIZE PAGES poll|spin [populate]
// Output: one line `private page_size=.. mode=.. pages=.. us_per_fault=.. p50=.. p99=.. max=..
//         checksum=..` (printed by the client, which does not know about `populate`) (microseconds; checksum: the sum of the first byte of every page read).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mman.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void send_fd(int sock, int fd, unsigned long word) {
    char ctl[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec io = {&word, sizeof word};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &m, 0) < 0) die("sendmsg");
}

static int recv_fd(int sock, unsigned long *word) {
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = {word, sizeof *word};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl};
    if (recvmsg(sock, &m, 0) <= 0) die("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c) die("no fd received");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

// The client: private memory, its own uffd, one timed read per page.
static int client(int sock, size_t ps, size_t pages, int spin) {
    size_t n = ps * pages;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (ps == 4096 ? 0 : MAP_HUGETLB | MAP_HUGE_2MB);
    volatile unsigned char *a = mmap(NULL, n, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (a == MAP_FAILED) die("mmap client memory (2 MiB pages need free huge pages)");
    int u = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (u < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    if (ioctl(u, UFFDIO_API, &api)) die("UFFDIO_API");
    struct uffdio_register r = {.range = {(unsigned long)a, n}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(u, UFFDIO_REGISTER, &r)) die("UFFDIO_REGISTER");
    send_fd(sock, u, (unsigned long)a);
    char go;
    if (read(sock, &go, 1) != 1) die("go");
    double *lat = malloc(pages * sizeof *lat);
    if (!lat) die("malloc");
    unsigned long sum = 0;
    double t0 = now();
    for (size_t i = 0; i < pages; i++) {
        double s = now();
        sum += a[i * ps];
        lat[i] = (now() - s) * 1e6;
    }
    double total = now() - t0;
    qsort(lat, pages, sizeof *lat, cmp_double);
    printf("private page_size=%zu mode=%s pages=%zu us_per_fault=%.2f p50=%.2f p99=%.2f max=%.2f checksum=%lu\n", ps,
           spin ? "spin" : "poll", pages, total / pages * 1e6, lat[pages / 2], lat[pages * 99 / 100],
           lat[pages - 1], sum);
    fflush(stdout);
    return 0;
}

// The handler: serve every fault with one UFFDIO_COPY from the image's mapping.
static void handle(int sock, const char *image, size_t ps, size_t pages, int spin, int populate) {
    size_t n = ps * pages;
    unsigned long base;
    int cu = recv_fd(sock, &base);
    int fd = open(image, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open image");
    const char *img = mmap(NULL, n, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (img == MAP_FAILED) die("mmap image");
    if (write(sock, "g", 1) != 1) die("go");
    size_t served = 0;
    struct pollfd p = {cu, POLLIN, 0};
    struct uffd_msg msgs[64];
    while (served < pages) {
        if (!spin && poll(&p, 1, 1000) < 0) die("poll");
        ssize_t r = read(cu, msgs, sizeof msgs);
        if (r < 0) {
            if (errno == EAGAIN) continue;
            die("read uffd");
        }
        for (size_t k = 0; k < (size_t)r / sizeof msgs[0]; k++) {
            if (msgs[k].event != UFFD_EVENT_PAGEFAULT) continue;
            unsigned long page = msgs[k].arg.pagefault.address & ~(ps - 1);
            const char *src = img + (page - base);
            if (populate && madvise((void *)src, ps, MADV_POPULATE_READ)) die("MADV_POPULATE_READ");
            struct uffdio_copy c = {.dst = page, .src = (unsigned long)src, .len = ps, .mode = 0};
            while (ioctl(cu, UFFDIO_COPY, &c)) {
                if (errno == EEXIST) break;
                if (errno != EAGAIN) die("UFFDIO_COPY");
                c.copy = 0;
            }
            served++;
        }
    }
    munmap((void *)img, n);
    close(fd);
    close(cu);
}

// This machine may be a VM whose host backs guest memory lazily: memory never touched before costs
// a host fault per page. Touch and free as much as the client will get (huge pages go back to
// the pool warm).
static void warm_memory(size_t ps, size_t n) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (ps == 4096 ? 0 : MAP_HUGETLB | MAP_HUGE_2MB);
    char *w = mmap(NULL, n, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (w == MAP_FAILED) die("mmap warm (2 MiB pages need free huge pages)");
    memset(w, 1, n);
    munmap(w, n);
}

int main(int argc, char **argv) {
    if (argc != 5 && !(argc == 6 && strcmp(argv[5], "populate") == 0)) {
        fprintf(stderr, "usage: %s IMAGE PAGE_SIZE PAGES poll|spin [populate]\n", argv[0]);
        return 2;
    }
    const char *image = argv[1];
    size_t ps = strtoul(argv[2], NULL, 10), pages = strtoul(argv[3], NULL, 10);
    int spin = strcmp(argv[4], "spin") == 0;
    if ((ps != 4096 && ps != 2 << 20) || pages == 0) {
        fprintf(stderr, "page size must be 4096 or 2097152, pages > 0\n");
        return 2;
    }
    struct stat st;
    if (stat(image, &st) || (size_t)st.st_size < ps * pages) die("the image must hold PAGE_SIZE * PAGES bytes");
    setvbuf(stdout, NULL, _IOLBF, 0);
    warm_memory(ps, ps * pages);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("socketpair");
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) _exit(client(sv[1], ps, pages, spin));
    handle(sv[0], image, ps, pages, spin, argc == 6);
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "client failed\n");
        return 1;
    }
    return 0;
}
