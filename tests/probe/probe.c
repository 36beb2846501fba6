/* In-container probe for the end-to-end tests (static, no libc surprises).
 *
 *   probe syscall NR            call syscall NR with zero args; print "ret errno"
 *   probe mknod PATH c|b|p MAJ MIN   print "ok" or the errno name
 *   probe open PATH             open O_RDWR; print "ok" or the errno name
 *   probe caps                  print CapEff/CapBnd from /proc/self/status
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static const char *ename(int e) {
    switch (e) {
    case 0: return "ok";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOSYS: return "ENOSYS";
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case ENXIO: return "ENXIO";
    case EROFS: return "EROFS";
    case EFAULT: return "EFAULT";
    case EBADF: return "EBADF";
    default: return "E?";
    }
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "syscall")) {
        long nr = strtol(argv[2], NULL, 0);
        errno = 0;
        long r = syscall(nr, 0, 0, 0, 0, 0, 0);
        printf("%ld %s\n", r, r < 0 ? ename(errno) : "ok");
        return 0;
    }
    if (argc >= 6 && !strcmp(argv[1], "mknod")) {
        mode_t type = argv[3][0] == 'c' ? S_IFCHR : argv[3][0] == 'b' ? S_IFBLK : S_IFIFO;
        int r = mknod(argv[2], type | 0600, makedev(atoi(argv[4]), atoi(argv[5])));
        printf("%s\n", r < 0 ? ename(errno) : "ok");
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "open")) {
        int fd = open(argv[2], O_RDWR | O_NOCTTY);
        printf("%s\n", fd < 0 ? ename(errno) : "ok");
        return 0;
    }
    fprintf(stderr, "usage: probe syscall NR | mknod PATH c|b|p MAJ MIN | open PATH\n");
    return 2;
}
