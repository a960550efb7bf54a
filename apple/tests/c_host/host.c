/* A C host for libsluice_apple: it does on Linux what the Swift Network Extension does on
 * Apple, through the same header, so the C ABI is tested as a host really calls it.
 *
 *   host selftest CONFIG POLICY CERT KEY CA
 *       Descriptor mode (SLUICE_PACKETS_UTUN) over a socketpair(AF_UNIX, SOCK_DGRAM), which
 *       keeps packet boundaries and EAGAIN as utun does: IPv4 and IPv6 packets go in with
 *       their AF headers and the replies' AF headers are checked; a packet whose header lies
 *       is dropped. The settings read before start (UTUN mode's order on Apple) are those of
 *       the first event. Also checks error codes, TOO_SMALL sizes and the quiet after stop.
 *
 *   host tun CONFIG POLICY CERT KEY CA [RESOLV_CONF]
 *       Host-driven mode (SLUICE_PACKETS_HOST, packetFlow's way) over a real TUN device
 *       (IFF_TUN|IFF_NO_PI) named sapple0: applies the settings event with `ip` (and writes
 *       the resolver to RESOLV_CONF, restored at exit), reads the TUN into inject_packets and
 *       writes what take_packet gives. Commands on stdin, one a line:
 *         path_changed [JSON] | sleep | jump SECONDS | wake | status | set_policy FILE | stop
 *       Each event is printed as "event JSON", a status as "status JSON", each command's
 *       result as "ok NAME" or "fail NAME CODE TEXT".
 *
 * Both end with stop: the callback counter must stay frozen for 500 ms, then free, exit 0.
 * Plain C99 + POSIX (plus Linux's TUN ioctl). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sluice.h"

#define TUN_NAME "sapple0"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t callback_count;
static int64_t clock_offset_ns;
static int work_pipe[2] = {-1, -1};

static void count_callback(void) {
  pthread_mutex_lock(&mu);
  callback_count++;
  pthread_mutex_unlock(&mu);
}

static uint64_t callbacks_so_far(void) {
  pthread_mutex_lock(&mu);
  uint64_t n = callback_count;
  pthread_mutex_unlock(&mu);
  return n;
}

static void on_log(void *ctx, int32_t level, const char *target, const char *message) {
  (void)ctx;
  count_callback();
  fprintf(stderr, "log %d %s: %s\n", level, target, message);
}

static void on_work(void *ctx) {
  (void)ctx;
  count_callback();
  /* Not from inside the callback: the main loop wakes and drains the queues. */
  ssize_t n = write(work_pipe[1], "w", 1);
  (void)n;
}

/* CLOCK_BOOTTIME (counts through suspend) plus the offset `jump` adds: a simulated sleep. */
static uint64_t on_clock(void *ctx) {
  (void)ctx;
  count_callback();
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  pthread_mutex_lock(&mu);
  int64_t off = clock_offset_ns;
  pthread_mutex_unlock(&mu);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (uint64_t)off;
}

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "host: FAIL: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  printf("FAIL\n");
  fflush(stdout);
  exit(1);
}

static void last_error(char *buf, size_t cap) {
  size_t len = 0;
  if (sluice_last_error(buf, cap, &len) != SLUICE_OK) snprintf(buf, cap, "(error text too long)");
}

static char *read_file(const char *path, size_t *len_out) {
  FILE *f = fopen(path, "rb");
  if (!f) die("cannot open %s: %s", path, strerror(errno));
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap);
  size_t n;
  while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
    len += n;
    if (cap - len < 2) {
      cap *= 2;
      buf = realloc(buf, cap);
    }
  }
  fclose(f);
  buf[len] = 0;
  if (len_out) *len_out = len;
  return buf;
}

/* ---- tiny JSON helpers: the values we read are IPs, CIDRs and names (no escapes) ---- */

/* The string value of "key" in `json` into out; 0 when absent. */
static int json_string(const char *json, const char *key, char *out, size_t cap) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":\"", key);
  const char *p = strstr(json, pat);
  if (!p) return 0;
  p += strlen(pat);
  const char *e = strchr(p, '"');
  if (!e || (size_t)(e - p) >= cap) return 0;
  memcpy(out, p, (size_t)(e - p));
  out[e - p] = 0;
  return 1;
}

/* The strings of array "key": calls f(item) for each; returns how many. */
static int json_array(const char *json, const char *key, void (*f)(const char *, void *), void *arg) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":[", key);
  const char *p = strstr(json, pat);
  if (!p) return 0;
  p += strlen(pat);
  int n = 0;
  while (*p && *p != ']') {
    if (*p == '"') {
      const char *e = strchr(p + 1, '"');
      if (!e) break;
      char item[256];
      size_t l = (size_t)(e - p - 1);
      if (l < sizeof item) {
        memcpy(item, p + 1, l);
        item[l] = 0;
        f(item, arg);
        n++;
      }
      p = e + 1;
    } else {
      p++;
    }
  }
  return n;
}

/* Only what an address or prefix can hold goes into a shell command. */
static int safe_token(const char *s) {
  if (!*s || strlen(s) > 64) return 0;
  for (; *s; s++)
    if (!strchr("0123456789abcdefABCDEF.:/", *s)) return 0;
  return 1;
}

static void run(const char *fmt, ...) {
  char cmd[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(cmd, sizeof cmd, fmt, ap);
  va_end(ap);
  int rc = system(cmd);
  if (rc != 0) fprintf(stderr, "host: `%s` exited %d\n", cmd, rc);
}

/* ---- the engine ---- */

struct files {
  char *config, *policy, *cert, *key, *ca;
  size_t cert_len, key_len, ca_len;
};

static SluiceEngine *new_engine(char **argv, struct files *f) {
  f->config = read_file(argv[2], NULL);
  f->policy = read_file(argv[3], NULL);
  f->cert = read_file(argv[4], &f->cert_len);
  f->key = read_file(argv[5], &f->key_len);
  f->ca = read_file(argv[6], &f->ca_len);
  SluiceCallbacks cb = {NULL, on_log, on_work, on_clock};
  SluiceEngine *e = NULL;
  int32_t rc = sluice_engine_new(f->config, f->policy, (const uint8_t *)f->cert, f->cert_len,
                                 (const uint8_t *)f->key, f->key_len, (const uint8_t *)f->ca,
                                 f->ca_len, cb, &e);
  if (rc != SLUICE_OK) {
    char err[1024];
    last_error(err, sizeof err);
    die("sluice_engine_new: %d %s", rc, err);
  }
  return e;
}

static void free_files(struct files *f) {
  free(f->config);
  free(f->policy);
  free(f->cert);
  free(f->key);
  free(f->ca);
}

/* Stops, checks that no callback runs afterwards, frees. */
static void stop_and_free(SluiceEngine *e) {
  int32_t rc = sluice_engine_stop(e, 2000);
  if (rc != SLUICE_OK) die("stop: %d", rc);
  uint64_t at_stop = callbacks_so_far();
  usleep(500 * 1000);
  uint64_t later = callbacks_so_far();
  if (later != at_stop) die("%llu callbacks after stop returned", (unsigned long long)(later - at_stop));
  if (sluice_engine_stop(e, 10) != SLUICE_OK) die("a second stop is not idempotent");
  size_t len = 0;
  char buf[64];
  if (sluice_engine_status(e, buf, sizeof buf, &len) != SLUICE_ERR_STATE) die("status after stop is not ERR_STATE");
  sluice_engine_free(e);
  sluice_engine_free(NULL);
  printf("stopped: callbacks frozen at %llu for 500 ms\n", (unsigned long long)at_stop);
  fflush(stdout);
}

/* The next event (waits up to ms for one); returns a malloc'ed JSON string or NULL. The
 * first call is made with a small buffer so that TOO_SMALL and its size are exercised. */
static char *next_event(SluiceEngine *e, int ms) {
  for (int waited = 0;; waited += 10) {
    char small[8];
    size_t len = 0;
    int32_t rc = sluice_engine_next_event(e, small, sizeof small, &len);
    if (rc == SLUICE_TOO_SMALL) {
      char *buf = malloc(len);
      size_t got = 0;
      rc = sluice_engine_next_event(e, buf, len, &got);
      if (rc != SLUICE_OK || got + 1 != len || strlen(buf) != got) die("next_event after TOO_SMALL: rc %d len %zu got %zu", rc, len, got);
      return buf;
    }
    if (rc == SLUICE_OK) return strdup(small);
    if (rc != SLUICE_EMPTY) die("next_event: %d", rc);
    if (waited >= ms) return NULL;
    usleep(10 * 1000);
  }
}

/* ---- packets ---- */

static uint16_t csum_fold(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return (uint16_t)~s;
}

static uint32_t csum_add(uint32_t s, const uint8_t *p, size_t n) {
  for (size_t i = 0; i + 1 < n; i += 2) s += (uint32_t)(p[i] << 8 | p[i + 1]);
  if (n & 1) s += (uint32_t)(p[n - 1] << 8);
  return s;
}

static size_t dns_query(uint8_t *q, uint16_t id, const char *name, uint16_t qtype) {
  memset(q, 0, 12);
  q[0] = id >> 8, q[1] = id & 0xff, q[2] = 0x01, q[5] = 1;
  size_t n = 12;
  const char *p = name;
  while (*p) {
    const char *dot = strchr(p, '.');
    size_t l = dot ? (size_t)(dot - p) : strlen(p);
    q[n++] = (uint8_t)l;
    memcpy(q + n, p, l);
    n += l;
    p += l;
    if (*p == '.') p++;
  }
  q[n++] = 0;
  q[n++] = qtype >> 8, q[n++] = qtype & 0xff, q[n++] = 0, q[n++] = 1;
  return n;
}

/* IPv4 + UDP around payload; returns the packet's length. */
static size_t udp4(uint8_t *pkt, const char *src, uint16_t sport, const char *dst, uint16_t dport,
                   const uint8_t *payload, size_t plen) {
  size_t n = 28 + plen;
  memset(pkt, 0, 28);
  pkt[0] = 0x45, pkt[2] = n >> 8, pkt[3] = n & 0xff, pkt[8] = 64, pkt[9] = 17;
  inet_pton(AF_INET, src, pkt + 12);
  inet_pton(AF_INET, dst, pkt + 16);
  uint16_t c = csum_fold(csum_add(0, pkt, 20));
  pkt[10] = c >> 8, pkt[11] = c & 0xff;
  uint8_t *u = pkt + 20;
  u[0] = sport >> 8, u[1] = sport & 0xff, u[2] = dport >> 8, u[3] = dport & 0xff;
  u[4] = (8 + plen) >> 8, u[5] = (8 + plen) & 0xff; /* checksum 0: none, fine for IPv4 */
  memcpy(u + 8, payload, plen);
  return n;
}

/* IPv6 + a TCP SYN; returns the packet's length. */
static size_t syn6(uint8_t *pkt, const char *src, uint16_t sport, const char *dst, uint16_t dport) {
  memset(pkt, 0, 60);
  pkt[0] = 0x60, pkt[5] = 20, pkt[6] = 6, pkt[7] = 64;
  inet_pton(AF_INET6, src, pkt + 8);
  inet_pton(AF_INET6, dst, pkt + 24);
  uint8_t *t = pkt + 40;
  t[0] = sport >> 8, t[1] = sport & 0xff, t[2] = dport >> 8, t[3] = dport & 0xff;
  t[7] = 1;                       /* seq 1 */
  t[12] = 5 << 4, t[13] = 0x02;   /* data offset 5, SYN */
  t[14] = 0xff, t[15] = 0xff;     /* window */
  uint32_t s = csum_add(0, pkt + 8, 32); /* pseudo header: addresses, length, next header */
  s += 20 + 6;
  s = csum_add(s, t, 20);
  uint16_t c = csum_fold(s);
  t[16] = c >> 8, t[17] = c & 0xff;
  return 60;
}

/* Sends a packet with a 4-byte big-endian AF header in front, as utun wants. */
static void send_framed(int fd, uint32_t af, const uint8_t *pkt, size_t n) {
  uint32_t head = htonl(af);
  struct iovec iov[2] = {{&head, 4}, {(void *)pkt, n}};
  if (writev(fd, iov, 2) != (ssize_t)(n + 4)) die("writev: %s", strerror(errno));
}

/* The next framed packet within ms; returns its length (header included) or 0. */
static size_t recv_framed(int fd, uint8_t *buf, size_t cap, int ms) {
  struct pollfd p = {fd, POLLIN, 0};
  if (poll(&p, 1, ms) <= 0) return 0;
  ssize_t n = read(fd, buf, cap);
  return n > 0 ? (size_t)n : 0;
}

static uint32_t af_of(const uint8_t *framed) {
  uint32_t a;
  memcpy(&a, framed, 4);
  return ntohl(a);
}

/* ---- selftest: descriptor mode over a socketpair ---- */

static int selftest(char **argv) {
  struct files f;
  SluiceEngine *e = new_engine(argv, &f);
  char err[1024];
  int32_t rc;

  /* Before start: the state and argument errors, with their text. */
  if ((rc = sluice_engine_sleep(e)) != SLUICE_ERR_STATE) die("sleep before start: %d", rc);
  last_error(err, sizeof err);
  if (!*err) die("no last_error text after ERR_STATE");
  size_t need = 0;
  if (sluice_last_error(NULL, 0, &need) != SLUICE_TOO_SMALL || need != strlen(err) + 1) die("last_error size: %zu", need);
  if ((rc = sluice_engine_start(e, 7, -1)) != SLUICE_ERR_ARGUMENT) die("unknown mode: %d", rc);
  if ((rc = sluice_engine_set_policy(e, "version: 1\nrules: [")) != SLUICE_ERR_POLICY) die("bad policy: %d", rc);
  last_error(err, sizeof err);
  printf("bad policy refused: %s\n", err);
  if ((rc = sluice_engine_start(e, SLUICE_PACKETS_UTUN, -1)) != SLUICE_ERR_IO) die("utun without fd: %d", rc);
  SluiceEngine *none = NULL;
  SluiceCallbacks nocb = {0};
  if ((rc = sluice_engine_new("relay: nope\n", f.policy, NULL, 0, NULL, 0, NULL, 0, nocb, &none)) != SLUICE_ERR_CONFIG) die("bad config: %d", rc);
  if ((rc = sluice_engine_new("relay: 192.0.2.1:4433\n", f.policy, (const uint8_t *)"x", 1, NULL, 0, NULL, 0, nocb, &none)) != SLUICE_ERR_CREDENTIALS) die("bad credentials: %d", rc);
  last_error(err, sizeof err);
  printf("bad credentials refused: %s\n", err);

  /* UTUN mode's order on Apple: the starting settings are read (and applied) before start,
   * since the utun descriptor exists only then; the first event after start is the same. */
  char tiny_settings[4];
  size_t initial_len = 0;
  if ((rc = sluice_engine_initial_settings(e, tiny_settings, sizeof tiny_settings, &initial_len)) != SLUICE_TOO_SMALL) die("initial settings small: %d", rc);
  char *initial = malloc(initial_len);
  if (!initial) die("out of memory");
  if ((rc = sluice_engine_initial_settings(e, initial, initial_len, &initial_len)) != SLUICE_OK) die("initial settings: %d", rc);
  if (!strstr(initial, "\"type\":\"settings\"") || !strstr(initial, "\"generation\":1")) die("initial settings: %s", initial);
  printf("initial settings %s\n", initial);

  int sv[2];
  if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) != 0) die("socketpair: %s", strerror(errno));
  if ((rc = sluice_engine_start(e, SLUICE_PACKETS_UTUN, sv[1])) != SLUICE_OK) {
    last_error(err, sizeof err);
    die("start: %d %s", rc, err);
  }
  close(sv[1]); /* the library has its own dup */
  if ((rc = sluice_engine_start(e, SLUICE_PACKETS_UTUN, sv[1])) != SLUICE_ERR_STATE) die("second start: %d", rc);
  if ((rc = sluice_engine_path_changed(e, "{not json")) != SLUICE_ERR_ARGUMENT) die("bad json: %d", rc);

  char *ev = next_event(e, 5000);
  if (!ev || !strstr(ev, "\"type\":\"settings\"")) die("the first event is not settings: %s", ev ? ev : "(none)");
  printf("event %s\n", ev);
  if (strcmp(ev, initial) != 0) die("the first settings event is not the initial settings:\n%s\n%s", ev, initial);
  free(initial);
  char dns[64] = "", ipv4[64] = "", ipv6[64] = "";
  json_string(ev, "ipv4", ipv4, sizeof ipv4);
  json_string(ev, "ipv6", ipv6, sizeof ipv6);
  const char *d = strstr(ev, "\"dns_servers\":[\"");
  if (d) sscanf(d + strlen("\"dns_servers\":[\""), "%63[^\"]", dns);
  free(ev);
  char *slash = strchr(ipv4, '/');
  if (slash) *slash = 0;
  slash = strchr(ipv6, '/');
  if (slash) *slash = 0;
  if (!*dns || !*ipv4 || !*ipv6) die("settings without dns/ipv4/ipv6");

  uint8_t q[512], pkt[2048], reply[4096];
  /* 1. A DNS query whose AF header lies (AF_INET6 on an IPv4 packet): dropped. Then the same
   *    query framed right: answered from the DNS address, with AF_INET in front. */
  size_t ql = dns_query(q, 0x1111, "wiki.corp.internal", 1);
  size_t n = udp4(pkt, ipv4, 40000, dns, 53, q, ql);
  send_framed(sv[0], AF_INET6, pkt, n);
  ql = dns_query(q, 0x2222, "wiki.corp.internal", 1);
  n = udp4(pkt, ipv4, 40000, dns, 53, q, ql);
  send_framed(sv[0], AF_INET, pkt, n);
  size_t r;
  for (;;) {
    r = recv_framed(sv[0], reply, sizeof reply, 3000);
    if (!r) die("no DNS answer");
    if (af_of(reply) == AF_INET && (reply[4] >> 4) == 4 && reply[4 + 9] == 17) break;
    /* Anything else in between would be unexpected: show it. */
    die("unexpected packet: AF %u, version %u", af_of(reply), reply[4] >> 4);
  }
  const uint8_t *ip = reply + 4;
  char src[64];
  inet_ntop(AF_INET, ip + 12, src, sizeof src);
  const uint8_t *udp = ip + (ip[0] & 0xf) * 4;
  const uint8_t *m = udp + 8;
  uint16_t id = (uint16_t)(m[0] << 8 | m[1]);
  uint16_t ancount = (uint16_t)(m[6] << 8 | m[7]);
  if (strcmp(src, dns) != 0 || (udp[0] << 8 | udp[1]) != 53) die("answer from %s", src);
  if (id != 0x2222) die("answer id %04x: the mis-framed query was not dropped", id);
  size_t mlen = r - 4 - (size_t)(m - ip);
  const uint8_t *a = m + mlen - 4; /* the last A record's address */
  if (ancount < 1 || a[-2] != 0 || a[-1] != 4 || a[0] != 198 || (a[1] & 0xfe) != 18) die("not a synthetic answer (ancount %u)", ancount);
  printf("utun v4: DNS answer with AF_INET header from %s: wiki.corp.internal -> %u.%u.%u.%u\n", src, a[0], a[1], a[2], a[3]);

  /* 2. An IPv6 TCP SYN to an address no resource covers: refused at once with a RST,
   *    AF_INET6 (the platform's value) in front. */
  n = syn6(pkt, ipv6, 40001, "2001:db8::1", 80);
  send_framed(sv[0], AF_INET6, pkt, n);
  r = recv_framed(sv[0], reply, sizeof reply, 3000);
  if (!r) die("no answer to the IPv6 SYN");
  if (af_of(reply) != AF_INET6 || (reply[4] >> 4) != 6) die("IPv6 reply framed with AF %u", af_of(reply));
  if (reply[4 + 6] != 6 || !(reply[4 + 40 + 13] & 0x04)) die("IPv6 reply is not a TCP RST (next header %u)", reply[4 + 6]);
  printf("utun v6: TCP RST with AF_INET6 (%d) header for a denied flow\n", AF_INET6);

  /* 3. Nothing else came (the dropped query stays dropped). */
  r = recv_framed(sv[0], reply, sizeof reply, 300);
  if (r) die("an unexpected packet: AF %u", af_of(reply));

  /* Events: an audit line for the denied flow. */
  int audit = 0;
  while ((ev = next_event(e, 200))) {
    printf("event %s\n", ev);
    if (strstr(ev, "\"type\":\"audit\"") && strstr(ev, "deny")) audit = 1;
    free(ev);
  }
  if (!audit) die("no audit event for the denied flow");

  /* Status: TOO_SMALL says the size, a buffer that size (and some: it is live) takes it. */
  size_t len = 0;
  char tiny[4];
  if ((rc = sluice_engine_status(e, tiny, sizeof tiny, &len)) != SLUICE_TOO_SMALL) die("status small: %d", rc);
  char *st = malloc(len + 256);
  if ((rc = sluice_engine_status(e, st, len + 256, &len)) != SLUICE_OK) die("status: %d", rc);
  if (!strstr(st, "\"relay\"") || !strstr(st, "\"host\"")) die("status: %s", st);
  printf("status %s\n", st);
  free(st);
  if ((rc = sluice_engine_path_changed(e, NULL)) != SLUICE_OK) die("path_changed: %d", rc);
  if ((rc = sluice_engine_sleep(e)) != SLUICE_OK) die("sleep: %d", rc);
  pthread_mutex_lock(&mu);
  clock_offset_ns += 60ll * 1000000000ll;
  pthread_mutex_unlock(&mu);
  if ((rc = sluice_engine_wake(e)) != SLUICE_OK) die("wake: %d", rc);
  if ((rc = sluice_engine_set_policy(e, f.policy)) != SLUICE_OK) die("set_policy: %d", rc);
  uint8_t *one[1] = {pkt};
  size_t lens[1] = {n};
  if ((rc = sluice_engine_inject_packets(e, (const uint8_t *const *)one, lens, 1)) != SLUICE_ERR_STATE) die("inject in UTUN mode: %d", rc);

  stop_and_free(e);
  close(sv[0]);
  free_files(&f);
  printf("selftest ok\n");
  return 0;
}

/* ---- tun: host-driven mode over a real TUN device ---- */

static const char *resolv_path;
static char *resolv_original;

static void add_route(const char *r, void *arg) {
  (void)arg;
  if (!safe_token(r)) return;
  run("ip %s route replace %s dev " TUN_NAME, strchr(r, ':') ? "-6" : "-4", r);
}

static void add_nameserver(const char *a, void *arg) {
  if (safe_token(a)) fprintf((FILE *)arg, "nameserver %s\n", a);
}

static void apply_settings(const char *ev) {
  char v4[80] = "", v6[80] = "", mtu[16] = "1280";
  json_string(ev, "ipv4", v4, sizeof v4);
  json_string(ev, "ipv6", v6, sizeof v6);
  const char *m = strstr(ev, "\"mtu\":");
  if (m) snprintf(mtu, sizeof mtu, "%d", atoi(m + 6));
  if (safe_token(v4)) run("ip addr replace %s dev " TUN_NAME, v4);
  if (safe_token(v6)) run("ip -6 addr replace %s dev " TUN_NAME " nodad", v6);
  run("ip link set " TUN_NAME " mtu %s up", mtu);
  json_array(ev, "routes", add_route, NULL);
  if (resolv_path) {
    /* Written in place: `ip netns exec` bind-mounts this file over /etc/resolv.conf. */
    FILE *f = fopen(resolv_path, "w");
    if (f) {
      json_array(ev, "dns_servers", add_nameserver, f);
      fclose(f);
    }
  }
  printf("applied settings\n");
  fflush(stdout);
}

static int open_tun(void) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) die("open /dev/net/tun: %s", strerror(errno));
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  strncpy(ifr.ifr_name, TUN_NAME, IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &ifr) != 0) die("TUNSETIFF: %s", strerror(errno));
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

static void drain_events(SluiceEngine *e) {
  char *ev;
  while ((ev = next_event(e, 0))) {
    printf("event %s\n", ev);
    fflush(stdout);
    if (strstr(ev, "\"type\":\"settings\"")) apply_settings(ev);
    free(ev);
  }
}

static void drain_packets(SluiceEngine *e, int tun) {
  uint8_t buf[65536];
  for (;;) {
    size_t len = 0;
    int32_t ver = 0;
    int32_t rc = sluice_engine_take_packet(e, buf, sizeof buf, &len, &ver);
    if (rc == SLUICE_EMPTY) return;
    if (rc != SLUICE_OK) die("take_packet: %d", rc);
    if (ver != (buf[0] >> 4)) die("take_packet: ip_version %d for a v%d packet", ver, buf[0] >> 4);
    if (write(tun, buf, len) < 0 && errno != EAGAIN) fprintf(stderr, "host: TUN write: %s\n", strerror(errno));
  }
}

/* Reads the TUN into one inject_packets call per burst. */
static void read_tun(SluiceEngine *e, int tun) {
  enum { BURST = 32 };
  static uint8_t bufs[BURST][2048];
  const uint8_t *ptrs[BURST];
  size_t lens[BURST];
  size_t n = 0;
  while (n < BURST) {
    ssize_t r = read(tun, bufs[n], sizeof bufs[n]);
    if (r <= 0) break;
    ptrs[n] = bufs[n];
    lens[n] = (size_t)r;
    n++;
  }
  if (n) {
    int32_t rc = sluice_engine_inject_packets(e, ptrs, lens, n);
    if (rc != SLUICE_OK) die("inject_packets: %d", rc);
  }
}

static void report(const char *name, int32_t rc) {
  if (rc == SLUICE_OK) {
    printf("ok %s\n", name);
  } else {
    char err[1024];
    last_error(err, sizeof err);
    printf("fail %s %d %s\n", name, rc, err);
  }
  fflush(stdout);
}

/* One command line; returns 1 for stop. */
static int command(SluiceEngine *e, char *line) {
  line[strcspn(line, "\r\n")] = 0;
  char *arg = strchr(line, ' ');
  if (arg) *arg++ = 0;
  if (!strcmp(line, "path_changed")) {
    report(line, sluice_engine_path_changed(e, arg && *arg ? arg : NULL));
  } else if (!strcmp(line, "sleep")) {
    report(line, sluice_engine_sleep(e));
  } else if (!strcmp(line, "jump")) {
    pthread_mutex_lock(&mu);
    clock_offset_ns += (int64_t)atoi(arg ? arg : "0") * 1000000000ll;
    pthread_mutex_unlock(&mu);
    report(line, SLUICE_OK);
  } else if (!strcmp(line, "wake")) {
    report(line, sluice_engine_wake(e));
  } else if (!strcmp(line, "status")) {
    size_t len = 0;
    char *buf = NULL;
    int32_t rc = sluice_engine_status(e, NULL, 0, &len);
    if (rc == SLUICE_TOO_SMALL) {
      buf = malloc(len + 1024);
      rc = sluice_engine_status(e, buf, len + 1024, &len);
    }
    if (rc == SLUICE_OK) printf("status %s\n", buf);
    else report(line, rc);
    fflush(stdout);
    free(buf);
  } else if (!strcmp(line, "set_policy")) {
    char *p = read_file(arg ? arg : "/dev/null", NULL);
    report(line, sluice_engine_set_policy(e, p));
    free(p);
  } else if (!strcmp(line, "stop")) {
    return 1;
  } else if (*line) {
    printf("fail %s unknown command\n", line);
    fflush(stdout);
  }
  return 0;
}

static int tun_host(char **argv, int argc) {
  if (argc > 7) {
    resolv_path = argv[7];
    FILE *f = fopen(resolv_path, "r");
    if (f) {
      fclose(f);
      resolv_original = read_file(resolv_path, NULL);
    }
  }
  struct files f;
  SluiceEngine *e = new_engine(argv, &f);
  int tun = open_tun();
  int32_t rc = sluice_engine_start(e, SLUICE_PACKETS_HOST, -1);
  if (rc != SLUICE_OK) {
    char err[1024];
    last_error(err, sizeof err);
    die("start: %d %s", rc, err);
  }
  /* The settings first, applied before any packet moves. */
  char *ev = next_event(e, 5000);
  if (!ev || !strstr(ev, "\"type\":\"settings\"")) die("the first event is not settings");
  printf("event %s\n", ev);
  apply_settings(ev);
  free(ev);
  printf("ready\n");
  fflush(stdout);

  char line[4096];
  size_t line_len = 0;
  int done = 0;
  while (!done) {
    struct pollfd p[3] = {{tun, POLLIN, 0}, {work_pipe[0], POLLIN, 0}, {0, POLLIN, 0}};
    poll(p, 3, 100);
    if (p[1].revents & POLLIN) {
      char b[64];
      while (read(work_pipe[0], b, sizeof b) > 0) {
      }
    }
    if (p[0].revents & POLLIN) read_tun(e, tun);
    drain_events(e);
    drain_packets(e, tun);
    if (p[2].revents & (POLLIN | POLLHUP)) {
      ssize_t r = read(0, line + line_len, sizeof line - 1 - line_len);
      if (r <= 0) {
        done = 1; /* stdin closed: stop */
      } else {
        line_len += (size_t)r;
        line[line_len] = 0;
        char *nl;
        while (!done && (nl = strchr(line, '\n'))) {
          *nl = 0;
          done = command(e, line);
          size_t rest = line_len - (size_t)(nl + 1 - line);
          memmove(line, nl + 1, rest);
          line_len = rest;
          line[line_len] = 0;
        }
        if (line_len == sizeof line - 1) line_len = 0;
      }
    }
  }
  stop_and_free(e);
  /* Events and packets left behind after stop are still readable; none of it calls back. */
  close(tun);
  if (resolv_path && resolv_original) {
    FILE *rf = fopen(resolv_path, "w");
    if (rf) {
      fputs(resolv_original, rf);
      fclose(rf);
    }
  }
  free(resolv_original);
  free_files(&f);
  printf("tun host ok\n");
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 7) {
    fprintf(stderr, "usage: %s selftest|tun CONFIG POLICY CERT KEY CA [RESOLV_CONF]\n", argv[0]);
    return 2;
  }
  if (sluice_abi_version() != SLUICE_ABI_VERSION) die("ABI version %u", sluice_abi_version());
  if (pipe(work_pipe) != 0) die("pipe");
  fcntl(work_pipe[0], F_SETFL, O_NONBLOCK);
  fcntl(work_pipe[1], F_SETFL, O_NONBLOCK);
  int rc = !strcmp(argv[1], "selftest") ? selftest(argv) : !strcmp(argv[1], "tun") ? tun_host(argv, argc) : 2;
  close(work_pipe[0]);
  close(work_pipe[1]);
  return rc;
}
