/* Stand-ins for the programs in critest's images (tests/cri/critest_images.py): what
 * the specs look at, nothing more. Built static with gcc; one binary, the mode is argv[1].
 *
 *   nginx PORT   writes /var/run/nginx.pid, re-executes itself (from argv[0], so its comm
 *                stays "nginx") with nginx's process title "nginx: master process ..."
 *                as argv[0], then serves HTTP 200 on 0.0.0.0:PORT
 *   httpd PORT   prints Apache's start line "... Command line: 'httpd -D FOREGROUND'",
 *                then serves HTTP 200 on 0.0.0.0:PORT
 *   nnp          prints "Effective uid: N" (installed setuid root, as the e2e
 *                nonewprivs image's binary)
 *   pause        the sandbox's pid 1, as Kubernetes' pause: waits for signals, reaps
 *                children, exits 0 on SIGINT or SIGTERM (its name matters: pods share
 *                its pid namespace, and a spec runs `pgrep sleep` there)
 */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char PAGE[] = "<html><body>critest stand-in</body></html>\n";

static int serve(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    char buf[4096], head[256];

    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 64) < 0) {
        fprintf(stderr, "listen on port %d: %s\n", port, strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            continue;
        if (read(c, buf, sizeof buf) > 0) {
            int n = snprintf(head, sizeof head,
                             "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n"
                             "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                             sizeof PAGE - 1);
            if (write(c, head, n) == n)
                (void)!write(c, PAGE, sizeof PAGE - 1);
        }
        close(c);
    }
}

static void quit(int sig)
{
    (void)sig;
    _exit(0);
}

static void reap(int sig)
{
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && strcmp(argv[1], "nginx") == 0) {
        FILE *f = fopen("/var/run/nginx.pid", "w");
        if (f == NULL || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
            perror("/var/run/nginx.pid");
            return 1;
        }
        execl(argv[0], "nginx: master process nginx -g daemon off;", "serve", argv[2],
              (char *)NULL);
        perror(argv[0]);
        return 1;
    }
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "httpd") == 0) {
        printf("[mpm_event:notice] [pid %d] AH00094: Command line: 'httpd -D FOREGROUND'\n",
               (int)getpid());
        return serve(atoi(argv[2]));
    }
    if (argc == 2 && strcmp(argv[1], "nnp") == 0) {
        printf("Effective uid: %d\n", (int)geteuid());
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "pause") == 0) {
        signal(SIGINT, quit);
        signal(SIGTERM, quit);
        signal(SIGCHLD, reap);
        for (;;)
            pause();
    }
    fprintf(stderr, "usage: %s nginx|httpd PORT | nnp | pause\n", argv[0]);
    return 2;
}
