/* uspawn-monitor: a detached machine's steady state, in about 1 MB instead of
 * two Python processes (docs/ARCHITECTURE.md, "Host cost per machine").
 *
 * The Python supervisor (machine/boot.py) sets the machine up with the engine
 * and, once its init runs, execs this program in the same process: the pid,
 * the init (our child; we are its subreaper, which execve keeps), the flocks
 * on name, UID range and network leases (fds without O_CLOEXEC) all stay.
 * This program then does what the supervisor's loop did:
 *
 *   - copies the console pty into NAME.console.log, capped, with one rotated
 *     file (.1), dropped bytes counted (as boot.ConsoleLog);
 *   - reads the machine's sd_notify socket (READY=1, STATUS=, STOPPING=1),
 *     rewrites state.json (the record Python gave us + those three fields),
 *     tells `uspawn boot --detach` "ready NAME" and our own service manager;
 *   - forwards SIGTERM/SIGINT/... to the init through the signal map
 *     (TERM, INT -> SIGRTMIN+3: a clean poweroff);
 *   - when the init exits, execs Python again (machine/resume.py),
 *     which tears the boot down and boots it again after a reboot request.
 *
 * A guard child (forked first, a few hundred KB) replaces the Python guardian:
 * it holds no lease, only a pipe from us and a pidfd of the init. EOF on the
 * pipe without "done" means we died (kill -9): the init dies with us
 * (PR_SET_PDEATHSIG), and the guard execs Python's cleanup (machine/resume.py).
 *
 * Everything here comes from uspawn itself (argv); nothing from the machine
 * but console bytes and notify datagrams, which are bounded and escaped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41) /* Linux 4.13 */
#endif

#define STATUS_LIMIT 256 /* textsafe.STATUS_LIMIT */
#define MAX_MAP 16
#define MAX_RECORD 65536

static const char *opt_root, *opt_name, *opt_log, *opt_state_dir, *opt_record;
static const char *opt_python, *opt_handover, *opt_tell_line = "";
static const char *opt_say_ready; /* `boot -v`: this line on stderr at READY=1 */
static int opt_log_fd = -1; /* foreground: the console goes to this fd as it is */
static int opt_init = -1, opt_master = -1, opt_notify = -1, opt_tell = -1, opt_guardian = -1;
static long long opt_log_cap = 8 << 20;
static int map_from[MAX_MAP], map_to[MAX_MAP], n_map;
static int ready, stopping;
static char status_text[STATUS_LIMIT * 4 + 4]; /* escaped, capped: UTF-8 */

/* --- the console log (boot.ConsoleLog) ------------------------------------ */

static int log_fd = -1;
static long long log_size, log_dropped;

static int log_open(void)
{
    int fd = open(opt_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd < 0)
        return -1;
    /* uspawn's own lines (and Python's, after the exec back) reach the file too. */
    dup2(fd, 1);
    dup2(fd, 2);
    return fd;
}

static void log_rotate(void)
{
    char old[4096];
    int fd;
    if (snprintf(old, sizeof old, "%s.1", opt_log) >= (int)sizeof old ||
        rename(opt_log, old) < 0 || (fd = log_open()) < 0) {
        /* Cannot rotate: start the file over rather than pass the cap. */
        if (ftruncate(log_fd, 0) == 0)
            log_size = 0;
        return;
    }
    close(log_fd);
    log_fd = fd;
    log_size = 0;
}

/* Write it all; return how many bytes were dropped (disk full, I/O error). */
static size_t log_write_raw(const char *data, size_t len)
{
    struct stat st;
    if (opt_log_fd < 0 && log_size + (long long)len > opt_log_cap && fstat(log_fd, &st) == 0)
        log_size = st.st_size; /* our own lines reach it through fds 1 and 2 */
    while (len) {
        if (log_size >= opt_log_cap)
            log_rotate();
        unsigned long long left = (unsigned long long)(opt_log_cap - log_size);
        size_t room = left < len ? (size_t)left : len;
        ssize_t n = write(log_fd, data, len < room ? len : room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return len; /* never block the console on the log */
        log_size += n;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void log_write(const char *data, size_t len)
{
    if (log_dropped) {
        char note[96];
        int n = snprintf(note, sizeof note,
                         "\n-- uspawn: %lld bytes of console output dropped\n", log_dropped);
        if (log_write_raw(note, (size_t)n)) {
            log_dropped += (long long)len;
            return;
        }
        log_dropped = 0;
    }
    log_dropped += (long long)log_write_raw(data, len);
}

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0)
        log_write(line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* --- sd_notify: the machine's socket in, our service manager's out ---------- */

/* One code point of value (UTF-8) at *i; an invalid byte is U+FFFD, as Python's
 * decode(errors="replace") reads it. */
static unsigned decode(const unsigned char *v, size_t len, size_t *i)
{
    unsigned c = v[*i], cp, n;
    if (c < 0x80) {
        (*i)++;
        return c;
    }
    if (c >= 0xc2 && c <= 0xdf) { cp = c & 0x1f; n = 1; }
    else if (c >= 0xe0 && c <= 0xef) { cp = c & 0x0f; n = 2; }
    else if (c >= 0xf0 && c <= 0xf4) { cp = c & 0x07; n = 3; }
    else { (*i)++; return 0xfffd; }
    if (*i + n >= len) { (*i)++; return 0xfffd; }
    for (unsigned k = 1; k <= n; k++) {
        if ((v[*i + k] & 0xc0) != 0x80) { (*i)++; return 0xfffd; }
        cp = cp << 6 | (v[*i + k] & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) { (*i)++; return 0xfffd; }
    *i += n + 1;
    return cp;
}

/* STATUS= as textsafe.printable(value, STATUS_LIMIT) shows it: printable ASCII and
 * printable Latin-1 stay, C0/DEL/C1/NBSP/soft hyphen become \xNN; every code point
 * from U+0100 on becomes \u{HEX} (textsafe keeps the printable ones: without a
 * Unicode database this is the safe side: no bidi control, line or paragraph
 * separator, zero-width or format character gets through). Over the limit (in
 * characters) the text ends in "..." without cutting an escape in half. */
static void set_status(const char *value, size_t len)
{
    static char piece[STATUS_LIMIT + 2][16];
    static unsigned char plen[STATUS_LIMIT + 2], pchars[STATUS_LIMIT + 2];
    const unsigned char *v = (const unsigned char *)value;
    size_t i = 0, np = 0, used = 0;
    while (i < len && used <= STATUS_LIMIT) {
        unsigned cp = decode(v, len, &i);
        char *p = piece[np];
        int n, chars;
        if (cp >= 0x20 && cp < 0x7f) {
            p[0] = (char)cp;
            n = chars = 1;
        } else if (cp >= 0xa1 && cp <= 0xff && cp != 0xad) {
            p[0] = (char)(0xc0 | cp >> 6);
            p[1] = (char)(0x80 | (cp & 0x3f));
            n = 2;
            chars = 1;
        } else if (cp < 0x100) {
            n = chars = sprintf(p, "\\x%02x", cp);
        } else {
            n = chars = sprintf(p, "\\u{%x}", cp);
        }
        plen[np] = (unsigned char)n;
        pchars[np++] = (unsigned char)chars;
        used += (size_t)chars;
    }
    size_t budget = used <= STATUS_LIMIT ? used : STATUS_LIMIT - 3, out = 0, kept = 0;
    for (size_t k = 0; k < np && kept + pchars[k] <= budget; k++) {
        memcpy(status_text + out, piece[k], plen[k]);
        out += plen[k];
        kept += pchars[k];
    }
    if (used > STATUS_LIMIT) {
        memcpy(status_text + out, "...", 3);
        out += 3;
    }
    status_text[out] = 0;
}

/* The STATUS= Python received before the hand-over, already shown-safe there
 * (textsafe.printable: printable characters, at most STATUS_LIMIT of them): kept
 * as it is, not escaped twice. Cut at a character boundary if it is ever longer. */
static void keep_status(const char *value)
{
    size_t n = strlen(value);
    if (n >= sizeof status_text) {
        n = sizeof status_text - 1;
        while (n > 0 && ((unsigned char)value[n] & 0xc0) == 0x80)
            n--;
    }
    memcpy(status_text, value, n);
    status_text[n] = 0;
}

static int state_dir_fd = -1;

/* state.json = the record Python wrote, plus ready/stopping/status_text. */
static void write_record(void)
{
    static char buf[MAX_RECORD + sizeof status_text * 2 + 128]; /* " and \\ doubled */
    size_t n = 0, plen = strlen(opt_record), i;
    if (plen > MAX_RECORD)
        return;
    memcpy(buf, opt_record, plen);
    n = plen;
    n += (size_t)sprintf(buf + n, ", \"ready\": %s, \"stopping\": %s, \"status_text\": \"",
                         ready ? "true" : "false", stopping ? "true" : "false");
    for (i = 0; status_text[i]; i++) { /* JSON: only " and \ need escaping here */
        if (status_text[i] == '"' || status_text[i] == '\\')
            buf[n++] = '\\';
        buf[n++] = status_text[i];
    }
    n += (size_t)sprintf(buf + n, "\"}");
    char tmp[64];
    snprintf(tmp, sizeof tmp, "state.json.tmp.%d", (int)getpid());
    int fd = openat(state_dir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                    0600);
    if (fd < 0)
        return;
    ssize_t w = write(fd, buf, n);
    close(fd);
    if (w == (ssize_t)n)
        renameat(state_dir_fd, tmp, state_dir_fd, "state.json");
    else
        unlinkat(state_dir_fd, tmp, 0);
}

static void notify_manager(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len;
    if (!path || !*path || (len = strlen(path)) >= sizeof sa.sun_path)
        return;
    memcpy(sa.sun_path, path, len);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = 0;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return;
    sendto(s, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa,
           (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    close(s);
}

static void tell(void)
{
    if (opt_tell < 0)
        return;
    size_t len = strlen(opt_tell_line);
    if (write(opt_tell, opt_tell_line, len) == (ssize_t)len)
        (void)!write(opt_tell, "\n", 1);
    close(opt_tell);
    opt_tell = -1;
}

static void on_notify(void)
{
    char data[4097];
    ssize_t n = recv(opt_notify, data, sizeof data - 1, MSG_DONTWAIT);
    if (n <= 0)
        return;
    data[n] = 0;
    int changed = 0, became_ready = 0, became_stopping = 0;
    /* sd_notify separates assignments by "\n" only. */
    for (char *line = data, *next; line && line < data + n; line = next) {
        char *nl = memchr(line, '\n', (size_t)(data + n - line));
        next = nl ? nl + 1 : NULL;
        size_t len = nl ? (size_t)(nl - line) : (size_t)(data + n - line);
        if (len == 7 && !memcmp(line, "READY=1", 7) && !ready) {
            ready = became_ready = changed = 1;
        } else if (len >= 7 && !memcmp(line, "STATUS=", 7)) {
            set_status(line + 7, len - 7);
            changed = 1;
        } else if (len == 10 && !memcmp(line, "STOPPING=1", 10)) {
            stopping = became_stopping = changed = 1;
        }
    }
    if (!changed)
        return;
    write_record();
    if (became_ready) {
        if (opt_say_ready) {
            size_t len = strlen(opt_say_ready);
            if (write(2, opt_say_ready, len) == (ssize_t)len)
                (void)!write(2, "\n", 1);
        }
        char msg[512];
        snprintf(msg, sizeof msg, "READY=1\nSTATUS=machine %s is ready", opt_name);
        notify_manager(msg);
        tell();
    }
    if (became_stopping)
        notify_manager("STOPPING=1");
}

/* --- the guard -------------------------------------------------------------- */

static int guard_w = -1;
static pid_t guard_pid = -1;

/* Keep fds 0-2, move fds[i] to 3 + i (-1 stays -1: that slot is closed), close
 * everything else. */
static void keep_only(int *fds, int n)
{
    int moved[8];
    for (int i = 0; i < n; i++)
        moved[i] = fds[i] >= 0 ? fcntl(fds[i], F_DUPFD_CLOEXEC, 10 + n) : -1;
    for (int i = 0; i < n; i++) {
        if (moved[i] >= 0) {
            dup3(moved[i], 3 + i, O_CLOEXEC);
            fds[i] = 3 + i;
        } else {
            close(3 + i); /* whatever it was (a lease?) must not stay with the guard */
        }
    }
    if (syscall(SYS_close_range, 3U + (unsigned)n, ~0U, 0U) < 0) {
        long max = sysconf(_SC_OPEN_MAX);
        for (int fd = 3 + n; fd < (max > 0 ? max : 65536); fd++)
            close(fd);
    }
}

static void spawn_guard(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return;
    /* Pinned now, while we (its reaper) live: the pid cannot be reused yet. And
     * ours: a pidfd polls readable once we are a zombie, after the kernel has
     * closed our files and so dropped our flocks (the cleanup needs them free). */
    int pidfd = (int)syscall(SYS_pidfd_open, opt_init, 0);
    int selffd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        if (pidfd >= 0)
            close(pidfd);
        if (selffd >= 0)
            close(selffd);
        return;
    }
    if (pid == 0) {
        int keep[3] = {p[0], pidfd, selffd};
        keep_only(keep, 3); /* no lease: our death must release them */
        int rfd = keep[0], monfd = keep[2];
        pidfd = keep[1];
        static const int quiet[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
                                    SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU};
        for (size_t i = 0; i < sizeof quiet / sizeof *quiet; i++)
            signal(quiet[i], SIG_IGN);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        char buf[64];
        size_t got = 0;
        for (;;) {
            ssize_t n = read(rfd, buf + got, sizeof buf - 1 - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
            buf[got] = 0;
            if (strstr(buf, "done\n"))
                _exit(0);
            if (got >= sizeof buf - 1)
                got = 0;
        }
        /* The monitor (or the Python it exec'd) died without saying done: the
         * init must go (PDEATHSIG already sent it SIGKILL), and the monitor's
         * flocks must be gone, then Python removes what is left. */
        if (monfd >= 0) {
            struct pollfd pm = {.fd = monfd, .events = POLLIN};
            poll(&pm, 1, 10000);
        }
        if (pidfd >= 0) {
            struct pollfd pf = {.fd = pidfd, .events = POLLIN};
            if (poll(&pf, 1, 0) == 0) {
                syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
                poll(&pf, 1, 10000);
            }
        }
        execl(opt_python, opt_python, "-I", "-c",
              "from uspawn.machine.resume import guard_main; guard_main()",
              "guard", "--root", opt_root, "--name", opt_name, "--handover", opt_handover,
              (char *)NULL);
        _exit(127);
    }
    close(p[0]);
    if (pidfd >= 0)
        close(pidfd);
    if (selffd >= 0)
        close(selffd);
    guard_w = p[1];
    guard_pid = pid;
    /* Kept across the exec back to Python, which says done after the teardown. */
    fcntl(guard_w, F_SETFD, 0);
}

/* --- main ---------------------------------------------------------------------- */

static int num(const char *s, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < -1 || v > 0x7fffffff) {
        fprintf(stderr, "uspawn-monitor: bad %s %s\n", what, s);
        exit(2);
    }
    return (int)v;
}

static void parse(int argc, char **argv)
{
    if (argc == 3 && (!strcmp(argv[1], "--escape-status") || !strcmp(argv[1], "--keep-status"))) {
        if (!strcmp(argv[1], "--keep-status")) /* tests/test_monitor.py */
            keep_status(argv[2]);
        else
            set_status(argv[2], strlen(argv[2]));
        puts(status_text);
        exit(0);
    }
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--root")) opt_root = v;
        else if (!strcmp(k, "--name")) opt_name = v;
        else if (!strcmp(k, "--init")) opt_init = num(v, "--init");
        else if (!strcmp(k, "--master")) opt_master = num(v, "--master");
        else if (!strcmp(k, "--notify")) opt_notify = num(v, "--notify");
        else if (!strcmp(k, "--tell")) opt_tell = num(v, "--tell");
        else if (!strcmp(k, "--tell-line")) opt_tell_line = v;
        else if (!strcmp(k, "--say-ready")) opt_say_ready = v;
        else if (!strcmp(k, "--guardian")) opt_guardian = num(v, "--guardian");
        else if (!strcmp(k, "--log")) opt_log = v;
        else if (!strcmp(k, "--log-fd")) opt_log_fd = num(v, "--log-fd");
        else if (!strcmp(k, "--log-cap")) opt_log_cap = num(v, "--log-cap");
        else if (!strcmp(k, "--state-dir")) opt_state_dir = v;
        else if (!strcmp(k, "--record")) opt_record = v;
        else if (!strcmp(k, "--ready")) ready = num(v, "--ready") == 1;
        else if (!strcmp(k, "--stopping")) stopping = num(v, "--stopping") == 1;
        else if (!strcmp(k, "--status")) keep_status(v);
        else if (!strcmp(k, "--python")) opt_python = v;
        else if (!strcmp(k, "--handover")) opt_handover = v;
        else if (!strcmp(k, "--map") && n_map < MAX_MAP) {
            char *colon = strchr(v, ':');
            if (!colon) {
                fprintf(stderr, "uspawn-monitor: bad --map %s\n", v);
                exit(2);
            }
            *colon = 0;
            map_from[n_map] = num(v, "--map");
            map_to[n_map++] = num(colon + 1, "--map");
        } else {
            fprintf(stderr, "uspawn-monitor: unknown option %s\n", k);
            exit(2);
        }
    }
    if (opt_log_fd >= 0)
        opt_log_cap = 0x7fffffffffffffffLL; /* a stream (the journal): never rotated */
    if (!opt_root || !opt_name || opt_init <= 0 || (!opt_log && opt_log_fd < 0) ||
        !opt_state_dir || !opt_record || !opt_python || !opt_handover || opt_log_cap < 4096) {
        fprintf(stderr, "uspawn-monitor: started without what uspawn passes (it is not "
                        "meant to be run by hand)\n");
        exit(2);
    }
}

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT};

int main(int argc, char **argv)
{
    parse(argc, argv);
    signal(SIGPIPE, SIG_IGN); /* a closed stdout or log is an error to count, not death */
    /* Python blocked these before the exec: nothing was lost in between. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGWINCH);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaddset(&mask, forwarded[i]);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        return 125;
    state_dir_fd = open(opt_state_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    log_fd = opt_log_fd >= 0 ? opt_log_fd : log_open();
    if (log_fd < 0 || state_dir_fd < 0)
        return 125;
    struct stat st;
    log_size = opt_log_fd < 0 && fstat(log_fd, &st) == 0 ? st.st_size : 0;
    if (opt_master >= 0) { /* neither is for the Python we exec later */
        fcntl(opt_master, F_SETFD, FD_CLOEXEC);
        /* Hold the console's other end ourselves: while no process of the machine
         * has it open (systemd closes its stdio at start and opens /dev/console
         * again later), the master would read EIO and poll HUP, and its output
         * after that would be lost. */
        ioctl(opt_master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    }
    if (opt_notify >= 0)
        fcntl(opt_notify, F_SETFD, FD_CLOEXEC);

    spawn_guard();
    if (opt_guardian >= 0) { /* the Python guardian's job is ours now */
        (void)!write(opt_guardian, "done\n", 5);
        close(opt_guardian);
    }

    int status = -1;
    /* The init may have exited before the exec, its SIGCHLD already consumed. */
    for (int ws; status < 0;) {
        pid_t pid = waitpid(-1, &ws, WNOHANG);
        if (pid <= 0)
            break;
        if (pid == opt_init)
            status = ws;
    }
    struct pollfd pf[3] = {{.fd = sfd, .events = POLLIN},
                           {.fd = opt_master, .events = POLLIN},
                           {.fd = opt_notify, .events = POLLIN}};
    char buf[65536];
    while (status < 0) {
        if (poll(pf, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pf[1].revents) {
            ssize_t n = read(opt_master, buf, sizeof buf);
            if (n > 0)
                log_write(buf, (size_t)n);
            else if (n == 0 || (errno != EAGAIN && errno != EINTR))
                pf[1].fd = -1; /* EIO: no one has the console open: as boot.pump */
        }
        if (pf[2].revents)
            on_notify();
        if (pf[0].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {
                int s = (int)si.ssi_signo;
                if (s == SIGCHLD || s == SIGWINCH)
                    continue;
                for (int i = 0; i < n_map; i++)
                    if (map_from[i] == s) {
                        s = map_to[i];
                        break;
                    }
                kill(opt_init, s); /* our unreaped child: the pid is still its */
            }
            for (;;) {
                int ws;
                pid_t pid = waitpid(-1, &ws, WNOHANG);
                if (pid <= 0)
                    break;
                if (pid == opt_init)
                    status = ws;
                else if (pid == guard_pid)
                    guard_pid = -1;
            }
        }
    }
    /* What the machine wrote before it went (bounded). */
    for (int i = 0; opt_master >= 0 && pf[1].fd >= 0 && i < 64; i++) {
        struct pollfd m = {.fd = opt_master, .events = POLLIN};
        if (poll(&m, 1, 50) <= 0)
            break;
        ssize_t n = read(opt_master, buf, sizeof buf);
        if (n <= 0)
            break;
        log_write(buf, (size_t)n);
    }
    if (status < 0)
        status = 0x7f00 | SIGKILL; /* poll failed: treat as killed, and clean up */
    if (opt_tell >= 0)
        fcntl(opt_tell, F_SETFD, 0);
    char st_arg[16], tell_arg[16], gpid[16], gfd[16];
    snprintf(st_arg, sizeof st_arg, "%d", status);
    snprintf(tell_arg, sizeof tell_arg, "%d", opt_tell);
    snprintf(gpid, sizeof gpid, "%d", (int)guard_pid);
    snprintf(gfd, sizeof gfd, "%d", guard_w);
    /* Signals stay blocked across the exec: resume_main ignores the stop signals
     * during the teardown (a stop then is moot), then unblocks them. */
    execl(opt_python, opt_python, "-I", "-c",
          "from uspawn.machine.resume import resume_main; resume_main()", "resume",
          "--root", opt_root, "--name", opt_name, "--handover", opt_handover, "--status", st_arg,
          "--tell", tell_arg, "--guard-pid", gpid, "--guard-fd", gfd, (char *)NULL);
    say("-- uspawn: cannot run %s to clean up: %s\n", opt_python, strerror(errno));
    return 125; /* the guard sees EOF and cleans up */
}
