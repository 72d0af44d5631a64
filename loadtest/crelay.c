/* Baseline (c), the syscall floor: a small C relay, one epoll loop, one write per delivery.
 *
 * One WebSocket connection upstream to the simulator; each ticker frame is merged into the
 * ticker's flat state (Bybit ticker data is one object of scalars) and serialized once into a
 * complete downstream frame, which is then written to every subscriber with its own write():
 * no coalescing, no buffering (a write the socket cannot take whole is counted and the rest
 * dropped; the harness counts the gaps). Downstream speaks just enough WebSocket and client
 * protocol for the harness: the handshake, subscribe (ticker args only) and close.
 *
 * The harness builds it with `cc -O2` into a temporary directory (loadtest/fanout.py).
 *
 *   crelay --port 9300 --upstream-port 9001 --symbols BTCUSDT,ETHUSDT [--gap-ns N] [--touch-kib K]
 *
 * Two experiments on what the kernel's cost per write depends on (see the README, Performance):
 * --gap-ns N spins N ns between two writes (the writes come as far apart as an interpreter's
 * would, touching no memory); --touch-kib K reads and writes K KiB of memory between two
 * writes (as an interpreter's work between writes would, pushing the kernel's code and data out
 * of the CPU caches).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SYMBOLS 32
#define MAX_FIELDS 64
#define MAX_CLIENTS 65536
#define BUF 65536

/* -- SHA-1 and base64, for Sec-WebSocket-Accept ------------------------------------------- */

static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    uint8_t *msg = calloc(total, 1);
    memcpy(msg, data, len);
    msg[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) msg[total - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)msg[off + 4 * i] << 24 | (uint32_t)msg[off + 4 * i + 1] << 16 |
                   (uint32_t)msg[off + 4 * i + 2] << 8 | msg[off + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(msg);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++) out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void base64(const uint8_t *in, size_t len, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < len ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* -- tickers: flat JSON objects merged field by field ------------------------------------- */

typedef struct {
    char key[48];
    char value[96]; /* the raw JSON token: "..." or a number */
} Field;

typedef struct Client Client;

typedef struct {
    char symbol[24];
    Field fields[MAX_FIELDS];
    int nfields;
    long long seq, ts;
    Client **subs;
    int nsubs, capsubs;
} Ticker;

struct Client {
    int fd;
    int upgraded;
    char buf[4096];
    size_t len;
    uint32_t symbols; /* bit i: subscribed to tickers[i] */
    int index;
};

static Ticker tickers[MAX_SYMBOLS];
static int ntickers;
static Client *clients[MAX_CLIENTS];
static long gap_ns;
static long touch_kib;
static volatile uint8_t *touch_buf;
static long long short_writes;

static Ticker *ticker_of(const char *symbol, size_t len) {
    for (int i = 0; i < ntickers; i++)
        if (strlen(tickers[i].symbol) == len && memcmp(tickers[i].symbol, symbol, len) == 0)
            return &tickers[i];
    return NULL;
}

/* Merge `"k":v,...` from the object starting at *p (just after '{'); returns the end. */
static const char *merge_object(Ticker *t, const char *p, int replace) {
    if (replace) t->nfields = 0;
    while (*p && *p != '}') {
        if (*p != '"') { p++; continue; }
        const char *k = ++p;
        while (*p && *p != '"') p++;
        size_t klen = (size_t)(p - k);
        p++; /* closing quote */
        while (*p == ':' || *p == ' ') p++;
        const char *v = p;
        if (*p == '"') {
            p++;
            while (*p && *p != '"') p++;
            p++;
        } else {
            while (*p && *p != ',' && *p != '}') p++;
        }
        size_t vlen = (size_t)(p - v);
        if (klen < sizeof(t->fields[0].key) && vlen < sizeof(t->fields[0].value)) {
            int i;
            for (i = 0; i < t->nfields; i++)
                if (strlen(t->fields[i].key) == klen && memcmp(t->fields[i].key, k, klen) == 0)
                    break;
            if (i == t->nfields && t->nfields < MAX_FIELDS) t->nfields++;
            if (i < t->nfields) {
                memcpy(t->fields[i].key, k, klen), t->fields[i].key[klen] = 0;
                memcpy(t->fields[i].value, v, vlen), t->fields[i].value[vlen] = 0;
            }
        }
        if (*p == ',') p++;
    }
    return p;
}

/* The downstream frame: {"stream":...,"type":...,"data":{...},"timestamp":T,"source":"mudrex","seq":N} */
static size_t build_frame(Ticker *t, const char *type, long long ts, uint8_t *out) {
    char payload[BUF];
    size_t n = (size_t)snprintf(payload, sizeof payload,
                                "{\"stream\":\"mudrex.futures.ticker.%s\",\"type\":\"%s\",\"data\":{",
                                t->symbol, type);
    for (int i = 0; i < t->nfields; i++)
        n += (size_t)snprintf(payload + n, sizeof payload - n, "%s\"%s\":%s", i ? "," : "",
                              t->fields[i].key, t->fields[i].value);
    n += (size_t)snprintf(payload + n, sizeof payload - n,
                          "},\"timestamp\":%lld,\"source\":\"mudrex\",\"seq\":%lld}", ts, t->seq);
    size_t h;
    out[0] = 0x81;
    if (n < 126) out[1] = (uint8_t)n, h = 2;
    else out[1] = 126, out[2] = (uint8_t)(n >> 8), out[3] = (uint8_t)n, h = 4;
    memcpy(out + h, payload, n);
    return h + n;
}

static void spin(long ns) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do clock_gettime(CLOCK_MONOTONIC, &b);
    while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < ns);
}

static void send_all(Client *c, const uint8_t *data, size_t len) {
    ssize_t w = write(c->fd, data, len);
    if (w != (ssize_t)len) short_writes++;
}

static void publish(Ticker *t, const char *frame_json) {
    /* frame_json: the upstream message; find type, data and ts */
    const char *type = strstr(frame_json, "\"type\":\"");
    const char *data = strstr(frame_json, "\"data\":{");
    const char *ts = strstr(frame_json, "\"ts\":");
    if (!type || !data || !ts) return;
    int snapshot = strncmp(type + 8, "snapshot", 8) == 0;
    merge_object(t, data + 8, snapshot);
    t->seq++;
    t->ts = atoll(ts + 5);
    static uint8_t frame[BUF];
    size_t len = build_frame(t, "update", t->ts, frame);
    for (int i = 0; i < t->nsubs; i++) {
        if (i && gap_ns) spin(gap_ns);
        if (i && touch_kib)
            for (long j = 0; j < touch_kib * 1024; j += 64) touch_buf[j]++;
        send_all(t->subs[i], frame, len);
    }
}

/* -- downstream ------------------------------------------------------------------------------ */

static void drop_client(int epfd, Client *c) {
    for (int i = 0; i < ntickers; i++) {
        if (!(c->symbols & (1u << i))) continue;
        Ticker *t = &tickers[i];
        for (int j = 0; j < t->nsubs; j++)
            if (t->subs[j] == c) { t->subs[j] = t->subs[--t->nsubs]; break; }
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    clients[c->fd] = NULL;
    free(c);
}

static void text_reply(Client *c, const char *json) {
    uint8_t frame[4096];
    size_t n = strlen(json), h;
    frame[0] = 0x81;
    if (n < 126) frame[1] = (uint8_t)n, h = 2;
    else frame[1] = 126, frame[2] = (uint8_t)(n >> 8), frame[3] = (uint8_t)n, h = 4;
    memcpy(frame + h, json, n);
    send_all(c, frame, h + n);
}

static void on_request(Client *c, char *payload) {
    if (!strstr(payload, "\"subscribe\"")) return;
    char *args = strstr(payload, "\"args\"");
    if (!args) return;
    char accepted[2048] = "", rejected[2048] = "";
    Ticker *fresh[MAX_SYMBOLS];
    int nfresh = 0;
    for (char *p = strchr(args, '['); p && *p && *p != ']'; p++) {
        if (*p != '"') continue;
        char *arg = ++p;
        while (*p && *p != '"') p++;
        size_t len = (size_t)(p - arg);
        Ticker *t = NULL;
        if (len > 7 && strncmp(arg, "ticker:", 7) == 0) t = ticker_of(arg + 7, len - 7);
        char *list = t ? accepted : rejected;
        size_t used = strlen(list);
        if (used + len + 4 < sizeof accepted)
            snprintf(list + used, sizeof accepted - used, "%s\"%.*s\"", used ? "," : "", (int)len, arg);
        if (!t) continue;
        int i = (int)(t - tickers);
        if (c->symbols & (1u << i)) continue;
        c->symbols |= 1u << i;
        if (t->nsubs == t->capsubs) {
            t->capsubs = t->capsubs ? 2 * t->capsubs : 64;
            t->subs = realloc(t->subs, sizeof(Client *) * (size_t)t->capsubs);
        }
        t->subs[t->nsubs++] = c;
        fresh[nfresh++] = t;
    }
    char ack[4600];
    snprintf(ack, sizeof ack,
             "{\"op\":\"subscribe\",\"success\":%s,\"args\":[%s],\"message\":\"Subscribed\","
             "\"rejected\":%s%s%s}",
             accepted[0] ? "true" : "false", accepted, rejected[0] ? "[" : "null", rejected,
             rejected[0] ? "]" : "");
    text_reply(c, ack);
    for (int i = 0; i < nfresh; i++) {
        Ticker *t = fresh[i];
        if (!t->seq) continue;
        static uint8_t frame[BUF];
        size_t len = build_frame(t, "snapshot", t->ts, frame);
        send_all(c, frame, len);
    }
}

/* Returns 0 when the client must be dropped. */
static int on_client_data(Client *c) {
    ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - c->len - 1);
    if (n <= 0) return n < 0 && errno == EAGAIN;
    c->len += (size_t)n;
    c->buf[c->len] = 0;
    if (!c->upgraded) {
        char *end = strstr(c->buf, "\r\n\r\n");
        if (!end) return c->len < sizeof c->buf - 1;
        char *key = strcasestr(c->buf, "Sec-WebSocket-Key:");
        if (!key) return 0;
        key += 18;
        while (*key == ' ') key++;
        char joined[128];
        size_t klen = strcspn(key, "\r\n");
        if (klen > 60) return 0;
        snprintf(joined, sizeof joined, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", (int)klen, key);
        uint8_t digest[20];
        sha1((const uint8_t *)joined, strlen(joined), digest);
        char accept[32], response[256];
        base64(digest, 20, accept);
        int m = snprintf(response, sizeof response,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
        send_all(c, (const uint8_t *)response, (size_t)m);
        c->upgraded = 1;
        size_t head = (size_t)(end + 4 - c->buf);
        memmove(c->buf, c->buf + head, c->len - head);
        c->len -= head;
    }
    for (;;) { /* client frames: masked */
        if (c->len < 2) break;
        uint8_t *b = (uint8_t *)c->buf;
        int opcode = b[0] & 0x0F;
        size_t len = b[1] & 0x7F, pos = 2;
        if (len == 126) {
            if (c->len < 4) break;
            len = (size_t)b[2] << 8 | b[3], pos = 4;
        } else if (len == 127) return 0;
        if (c->len < pos + 4 + len) break;
        uint8_t *mask = b + pos, *payload = b + pos + 4;
        for (size_t i = 0; i < len; i++) payload[i] ^= mask[i & 3];
        char text[4096];
        memcpy(text, payload, len);
        text[len] = 0;
        memmove(c->buf, c->buf + pos + 4 + len, c->len - pos - 4 - len);
        c->len -= pos + 4 + len;
        if (opcode == 0x8) return 0;
        if (opcode == 0x1) on_request(c, text);
    }
    return 1;
}

/* -- upstream -------------------------------------------------------------------------------- */

static uint8_t up_buf[1 << 20];
static size_t up_len;

static void up_send_text(int fd, const char *text) {
    uint8_t frame[4096];
    size_t n = strlen(text), h;
    frame[0] = 0x81;
    if (n < 126) frame[1] = 0x80 | (uint8_t)n, h = 2;
    else frame[1] = 0x80 | 126, frame[2] = (uint8_t)(n >> 8), frame[3] = (uint8_t)n, h = 4;
    memset(frame + h, 0, 4); /* a zero mask: legal, and the payload goes as it is */
    memcpy(frame + h + 4, text, n);
    if (write(fd, frame, h + 4 + n) < 0) perror("upstream write");
}

static int upstream_connect(int port, const char *symbols) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) return -1;
    char request[512];
    int m = snprintf(request, sizeof request,
                     "GET /v5/public/linear HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", port);
    if (write(fd, request, (size_t)m) != m) return -1;
    size_t got = 0;
    while (!strstr((char *)up_buf, "\r\n\r\n")) {
        ssize_t n = read(fd, up_buf + got, sizeof up_buf - got - 1);
        if (n <= 0) return -1;
        got += (size_t)n;
        up_buf[got] = 0;
    }
    char *end = strstr((char *)up_buf, "\r\n\r\n") + 4;
    up_len = got - (size_t)(end - (char *)up_buf);
    memmove(up_buf, end, up_len);
    char sub[2048] = "{\"op\":\"subscribe\",\"args\":[";
    char list[1024];
    snprintf(list, sizeof list, "%s", symbols);
    int first = 1;
    for (char *s = strtok(list, ","); s; s = strtok(NULL, ",")) {
        size_t used = strlen(sub);
        snprintf(sub + used, sizeof sub - used, "%s\"tickers.%s\"", first ? "" : ",", s);
        first = 0;
    }
    strcat(sub, "]}");
    up_send_text(fd, sub);
    return fd;
}

static void on_upstream_frame(int fd, int opcode, char *payload) {
    if (opcode == 0x9) { /* ping: pong with the same payload */
        uint8_t pong[6] = {0x8A, 0x80, 0, 0, 0, 0};
        if (write(fd, pong, 6) < 0) perror("pong");
        return;
    }
    if (opcode == 0x8) exit(0); /* the upstream closed: so does the relay */
    if (opcode != 0x1) return;
    const char *topic = strstr(payload, "\"topic\":\"tickers.");
    if (!topic) return;
    topic += 17;
    Ticker *t = ticker_of(topic, strcspn(topic, "\""));
    if (t) publish(t, payload);
}

/* Returns 0 when the upstream is gone. */
static int on_upstream_data(int fd) {
    ssize_t n = read(fd, up_buf + up_len, sizeof up_buf - up_len - 1);
    if (n == 0 || (n < 0 && errno != EAGAIN)) return 0;
    if (n > 0) up_len += (size_t)n;
    for (;;) {
        if (up_len < 2) break;
        int opcode = up_buf[0] & 0x0F;
        size_t len = up_buf[1] & 0x7F, pos = 2;
        if (len == 126) {
            if (up_len < 4) break;
            len = (size_t)up_buf[2] << 8 | up_buf[3], pos = 4;
        } else if (len == 127) {
            if (up_len < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | up_buf[2 + i];
            pos = 10;
        }
        if (up_len < pos + len) break;
        char saved = (char)up_buf[pos + len];
        up_buf[pos + len] = 0;
        on_upstream_frame(fd, opcode, (char *)up_buf + pos);
        up_buf[pos + len] = (uint8_t)saved;
        memmove(up_buf, up_buf + pos + len, up_len - pos - len);
        up_len -= pos + len;
    }
    return 1;
}

static volatile sig_atomic_t stopping;
static void on_signal(int sig) { (void)sig, stopping = 1; }

int main(int argc, char **argv) {
    int port = 0, upstream_port = 0;
    const char *symbols = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--upstream-port")) upstream_port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--symbols")) symbols = argv[i + 1];
        else if (!strcmp(argv[i], "--gap-ns")) gap_ns = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--touch-kib")) touch_kib = atol(argv[i + 1]);
    }
    if (!port || !upstream_port || !symbols) {
        fprintf(stderr, "usage: crelay --port P --upstream-port U --symbols A,B [--gap-ns N]\n");
        return 2;
    }
    if (touch_kib) touch_buf = calloc((size_t)touch_kib, 1024);
    char list[1024];
    snprintf(list, sizeof list, "%s", symbols);
    for (char *s = strtok(list, ","); s && ntickers < MAX_SYMBOLS; s = strtok(NULL, ","))
        snprintf(tickers[ntickers++].symbol, sizeof tickers[0].symbol, "%s", s);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 4096) < 0) {
        perror("listen");
        return 1;
    }
    int up = upstream_connect(upstream_port, symbols);
    if (up < 0) {
        perror("upstream");
        return 1;
    }
    int epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);
    ev.data.fd = up;
    epoll_ctl(epfd, EPOLL_CTL_ADD, up, &ev);
    if (up_len) on_upstream_data(up); /* frames that came with the handshake */
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(epfd, events, 256, 500);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int cfd;
                while ((cfd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (cfd >= MAX_CLIENTS) { close(cfd); continue; }
                    /* as asyncio and uvloop do for every TCP transport */
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    Client *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    clients[cfd] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev);
                }
            } else if (fd == up) {
                if (!on_upstream_data(up)) stopping = 1;
            } else if (clients[fd] && !on_client_data(clients[fd])) {
                drop_client(epfd, clients[fd]);
            }
        }
    }
    fprintf(stderr, "crelay: %lld short writes\n", short_writes);
    return 0;
}
