/* LD_PRELOAD shim for a before/after measurement (docs/benchmarks.md, "Connections"): the
 * server's accepted sockets silently keep Nagle's algorithm (setsockopt TCP_NODELAY on a
 * descriptor that came from accept/accept4 does nothing), as they did before
 * services/common/src/conn.rs set it. Client sockets of the same process are untouched.
 *
 *   cc -shared -fPIC -O2 -o target/accept_without_nodelay.so tools/bench/accept_without_nodelay.c -ldl
 *   LD_PRELOAD=target/accept_without_nodelay.so janus serve ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FD 65536
static volatile unsigned char accepted[MAX_FD];

static void mark(int fd, unsigned char v) {
  if (fd >= 0 && fd < MAX_FD) accepted[fd] = v;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = dlsym(RTLD_NEXT, "accept4");
  int c = real(fd, addr, len, flags);
  mark(c, 1);
  return c;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = dlsym(RTLD_NEXT, "accept");
  int c = real(fd, addr, len);
  mark(c, 1);
  return c;
}

int close(int fd) {
  static int (*real)(int);
  if (!real) real = dlsym(RTLD_NEXT, "close");
  mark(fd, 0);
  return real(fd);
}

int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
  static int (*real)(int, int, int, const void *, socklen_t);
  if (!real) real = dlsym(RTLD_NEXT, "setsockopt");
  if (level == IPPROTO_TCP && name == TCP_NODELAY && fd >= 0 && fd < MAX_FD && accepted[fd])
    return 0;
  return real(fd, level, name, val, len);
}
