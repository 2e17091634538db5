/* Fail writes under one folder with ENOSPC, at the level of the C library: every writer is
 * caught (Python's io, numpy, pyarrow's C++, faiss), in this process and in its children.
 *
 *   DEDUP_FAULT_ROOT=/abs/out       the folder (its files and everything below)
 *   DEDUP_FAULT_AT=k                the k-th write under it (1-based) and every later one fail:
 *                                   a disk stays full once it is
 *   DEDUP_FAULT_COUNTER=/abs/file   one byte appended per write under the root: the count,
 *                                   shared by the processes of one run (outside the root)
 *   DEDUP_FAULT_LOG=/abs/file       optional: the path of each write under the root, a line each
 *
 * Built by tests/test_disk_full.py with the system's C compiler; loaded with LD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);

static void init(void) {
    if (!real_write) {
        real_write = dlsym(RTLD_NEXT, "write");
        real_pwrite = dlsym(RTLD_NEXT, "pwrite");
        real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
        real_writev = dlsym(RTLD_NEXT, "writev");
        real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    }
}

/* 1: this write must fail */
static int fault(int fd) {
    const char *root = getenv("DEDUP_FAULT_ROOT");
    const char *at = getenv("DEDUP_FAULT_AT");
    const char *counter = getenv("DEDUP_FAULT_COUNTER");
    if (!root || !at || !counter) return 0;
    char link[64], target[PATH_MAX + 1];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, target, PATH_MAX);
    if (len <= 0) return 0;
    target[len] = 0;
    size_t rl = strlen(root);
    if (strncmp(target, root, rl) != 0 || (target[rl] != '/' && target[rl] != 0)) return 0;
    int cfd = open(counter, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (cfd < 0) return 0;
    real_write(cfd, "w", 1);
    struct stat st;
    int ok = fstat(cfd, &st) == 0;
    close(cfd);
    const char *log = getenv("DEDUP_FAULT_LOG");
    if (log) {
        int lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (lfd >= 0) {
            target[len] = '\n';
            real_write(lfd, target, len + 1);
            close(lfd);
        }
    }
    return ok && st.st_size >= atol(at);
}

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    if (n && fault(fd)) { errno = ENOSPC; return -1; }
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    init();
    if (n && fault(fd)) { errno = ENOSPC; return -1; }
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    init();
    if (n && fault(fd)) { errno = ENOSPC; return -1; }
    return real_pwrite64(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    init();
    if (cnt > 0 && fault(fd)) { errno = ENOSPC; return -1; }
    return real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    init();
    if (cnt > 0 && fault(fd)) { errno = ENOSPC; return -1; }
    return real_pwritev(fd, iov, cnt, off);
}
