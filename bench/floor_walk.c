/* The floor of a walk, for bench_scale.py: the system calls apppot-snap makes for each entry of an
 * unchanged tree, and nothing else.  Each directory is opened (openat, O_NOFOLLOW) and read
 * (getdents64); each entry is looked at by its name in it (fstatat, AT_SYMLINK_NOFOLLOW) and, from
 * inside the directory, its xattrs are listed (llistxattr); subdirectories on the same device are
 * walked.  No key is formatted, nothing is compared, sorted or written.
 *
 *   floor_walk [--no-xattrs] [--threads N] ROOT     prints the number of entries
 *
 * With N threads, directories are taken from one shared stack: the walk split over N CPUs as
 * evenly as it can be.  The working directory is per process, so with threads llistxattr is
 * given the path from ROOT instead (the kernel then resolves every component: a little more).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

static int with_xattrs = 1, threads = 1;
static dev_t root_dev;
static char **stack;
static size_t depth, room;
static int busy;
static long total;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t more = PTHREAD_COND_INITIALIZER;

static void push(char *path) {
    pthread_mutex_lock(&lock);
    if (depth == room) {
        room = room ? 2 * room : 1024;
        stack = realloc(stack, room * sizeof *stack);
        if (!stack) { perror("floor_walk"); exit(1); }
    }
    stack[depth++] = path;
    pthread_cond_signal(&more);
    pthread_mutex_unlock(&lock);
}

static char *pop(void) {
    pthread_mutex_lock(&lock);
    while (depth == 0 && busy > 0)
        pthread_cond_wait(&more, &lock);
    char *path = depth ? stack[--depth] : NULL;
    if (path)
        busy++;
    else
        pthread_cond_broadcast(&more);
    pthread_mutex_unlock(&lock);
    return path;
}

static void done(long entries) {
    pthread_mutex_lock(&lock);
    busy--;
    total += entries;
    pthread_cond_broadcast(&more);
    pthread_mutex_unlock(&lock);
}

static long list(const char *path) {
    long n = 0;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) { perror(path); exit(1); }
    if (threads == 1 && fchdir(fd) != 0) { perror(path); exit(1); }
    DIR *dir = fdopendir(fd);
    struct dirent *e;
    char names[4096], full[8192];
    while ((e = readdir(dir))) {
        if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2])))
            continue;
        struct stat st;
        if (fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        n++;
        snprintf(full, sizeof full, "%s/%s", path, e->d_name);
        if (with_xattrs)
            llistxattr(threads == 1 ? e->d_name : full, names, sizeof names);
        if (S_ISDIR(st.st_mode) && st.st_dev == root_dev)
            push(strdup(full));
    }
    closedir(dir);
    return n;
}

static void *worker(void *unused) {
    (void)unused;
    char *path;
    while ((path = pop())) {
        long n = list(path);
        free(path);
        done(n);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc - 1; i++) {
        if (!strcmp(argv[i], "--no-xattrs"))
            with_xattrs = 0;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc - 1)
            threads = atoi(argv[++i]);
        else
            break;
    }
    if (i != argc - 1 || threads < 1) {
        fprintf(stderr, "usage: floor_walk [--no-xattrs] [--threads N] ROOT\n");
        return 2;
    }
    struct stat st;
    if (lstat(argv[i], &st) != 0) { perror(argv[i]); return 1; }
    root_dev = st.st_dev;
    push(strdup(argv[i]));
    pthread_t tids[64];
    if (threads > 64) threads = 64;
    for (int t = 0; t < threads; t++)
        pthread_create(&tids[t], NULL, worker, NULL);
    for (int t = 0; t < threads; t++)
        pthread_join(tids[t], NULL);
    printf("%ld\n", total + 1);
    return 0;
}
