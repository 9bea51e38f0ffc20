/*
 * The session relay's byte mover: one thread that copies bytes between paired sockets.
 *
 * Once a session is authenticated and its backend open, the proxy has nothing left to decide
 * about its bytes: they go from the client to the compute and back until one side leaves. In
 * Python every chunk costs an interpreter callback on the event loop (measured: more CPU per
 * transaction than PgBouncer, C, spends on the same work). Here a chunk costs one epoll wakeup,
 * one read and one write, and never holds the GIL: this file uses no Python API at all, and is
 * loaded with ctypes by proxy/relay.py, which owns every policy (which sessions come here, what
 * an end means, warm backends). The proxy lends the two sockets (its transports paused, so
 * nothing else reads or writes them) and gets them back, still open, when the session ends:
 * this thread never closes a socket, so the proxy's own transports (and the kernel's byte
 * counters) outlive the relay, and a descriptor is never closed under the other's feet.
 *
 * Per session and direction the rule is PgBouncer's: read a chunk into a scratch buffer shared
 * by the thread, write it to the other end at once, and only if the other end cannot take it
 * all keep the rest (malloc'd) and stop reading this end until it drains. An idle session holds
 * no buffer, only its struct. A slow reader therefore slows its writer down: nothing grows.
 *
 * Client to compute, the thread follows message headers (type byte, length) when asked to, so a
 * Terminate can be answered as Postgres answers it — by ending the session — without reaching a
 * backend the proxy may keep warm. Compute to client is never parsed.
 *
 * A session ends when:
 *   - one end reaches EOF or an error (what that end said before leaving is delivered first);
 *   - a write to one end fails (that end is gone: nothing more can be delivered to it);
 *   - the client sends Terminate (tracked sessions: bytes before it are delivered first);
 *   - the proxy asks (lr_stop: shutdown of the proxy or of the session).
 * Ended sessions are reported through an eventfd the proxy's event loop watches; the proxy
 * collects them with lr_done, which also frees them (a session is only freed there, so a
 * handle the proxy holds stays valid until the proxy has heard that it ended).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define SCRATCH (256 * 1024)
#define MAX_EVENTS 256

/* Why a session ended: which end left first. */
enum { END_CLIENT = 0, END_SERVER = 1, END_STOPPED = 2, END_TERMINATE = 3 };

struct session;

struct end {
    struct session *s;
    int fd;
    int which;        /* 0 = client, 1 = server */
    uint32_t armed;   /* the events epoll watches for this end now */
    int in_epoll;
};

/* Bytes read from end i, waiting for end 1-i to take them. */
struct pending {
    char *buf;
    size_t len, off;
};

struct session {
    struct end ends[2];
    struct pending pend[2];
    int closing[2];        /* end i has said its last word (EOF, error or Terminate) */
    int terminated;        /* the client's last word was a Terminate */
    int track;             /* follow client message headers for Terminate */
    uint32_t skip;         /* bytes of the current client message still to come */
    unsigned char hdr[5];  /* a client message header split across reads */
    int hlen;
    int done;              /* the thread has ended it (reason set); touched by the thread only */
    int reason;
    int stop_requested;    /* under relay.lock */
    int reported;          /* under relay.lock: on the done list */
    struct session *next_done;  /* the done list, under relay.lock */
    struct session *next_stop;  /* the stop list, under relay.lock */
    struct session *next_add;   /* the add list, under relay.lock */
    struct session *next_finished; /* thread only: ended in the current batch */
};

struct relay {
    int epfd;
    int wakefd;            /* the proxy → thread: stop requests, quit */
    int donefd;            /* thread → the proxy: sessions ended */
    pthread_t thread;
    pthread_mutex_t lock;
    struct session *done_head, *done_tail;
    struct session *stops;
    struct session *adds;  /* handed over, not yet watched: only the thread touches epoll */
    int quit;
    long live;             /* sessions added and not yet collected, under lock */
    long buffered;         /* bytes kept for slow readers, all sessions (atomic) */
    char *scratch;
};

/* Make an eventfd readable (wake whoever watches it). */
static void poke(int fd) {
    uint64_t one = 1;
    ssize_t w = write(fd, &one, sizeof one);
    (void)w;
}

static void arm(struct relay *r, struct end *e) {
    struct session *s = e->s;
    int i = e->which;
    uint32_t want = 0;
    if (!s->closing[i] && s->pend[i].len == 0)
        want |= EPOLLIN | EPOLLRDHUP;
    if (s->pend[1 - i].len)
        want |= EPOLLOUT;
    if (!e->in_epoll || want == e->armed)
        return;
    struct epoll_event ev = {.events = want, .data.ptr = e};
    epoll_ctl(r->epfd, EPOLL_CTL_MOD, e->fd, &ev);
    e->armed = want;
}

static void finish(struct session *s, int reason, struct session **finished) {
    if (s->done)
        return;
    s->done = 1;
    s->reason = reason;
    s->next_finished = *finished;
    *finished = s;
}

static void count(struct relay *r, long delta) {
    __atomic_add_fetch(&r->buffered, delta, __ATOMIC_RELAXED);
}

/* Send as much of data as fd takes now: the bytes sent, or -1 when its peer is gone. */
static ssize_t send_some(int fd, const char *data, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        return -1;
    }
    return (ssize_t)off;
}

/* Write what end 1-i waits for from end i; returns -1 when end 1-i is gone. */
static int flush(struct relay *r, struct session *s, int i) {
    struct pending *p = &s->pend[i];
    ssize_t n = send_some(s->ends[1 - i].fd, p->buf + p->off, p->len - p->off);
    if (n < 0)
        return -1;
    p->off += (size_t)n;
    count(r, -n);
    if (p->off < p->len)
        return 0;
    free(p->buf);
    p->buf = NULL;
    p->len = p->off = 0;
    return 0;
}

/* Send data from end i to end 1-i, keeping what the other end cannot take now. */
static int forward(struct relay *r, struct session *s, int i, const char *data, size_t len) {
    ssize_t sent = send_some(s->ends[1 - i].fd, data, len);
    if (sent < 0)
        return -1;
    size_t off = (size_t)sent;
    if (off < len) {
        struct pending *p = &s->pend[i];
        p->buf = malloc(len - off);
        if (p->buf == NULL)
            return -1;
        memcpy(p->buf, data + off, len - off);
        p->len = len - off;
        p->off = 0;
        count(r, (long)(len - off));
    }
    return 0;
}

/*
 * Follow client message headers through data[0:len]. Returns the offset of a Terminate message
 * that starts at a message boundary, or -1. A length below 4 is not the protocol: the backend
 * will say so, and following stops.
 */
static long find_terminate(struct session *s, const unsigned char *data, size_t len) {
    size_t pos = 0;
    while (pos < len) {
        if (s->skip) {
            size_t take = len - pos < s->skip ? len - pos : s->skip;
            pos += take;
            s->skip -= (uint32_t)take;
            continue;
        }
        long start = (long)pos - s->hlen;  /* where this message began (may be in an earlier read) */
        while (s->hlen < 5 && pos < len)
            s->hdr[s->hlen++] = data[pos++];
        if (s->hlen < 5)
            return -1;
        uint32_t length = ((uint32_t)s->hdr[1] << 24) | ((uint32_t)s->hdr[2] << 16)
                        | ((uint32_t)s->hdr[3] << 8) | (uint32_t)s->hdr[4];
        s->hlen = 0;
        if (length < 4 || length > 0x7fffffff) {
            s->track = 0;
            return -1;
        }
        if (s->hdr[0] == 'X' && length == 4 && start >= 0)
            return start;
        s->skip = length - 4;
    }
    return -1;
}

/* End i is readable (or reports an error): move one read's worth to the other end. */
static void pump(struct relay *r, struct session *s, int i, struct session **finished) {
    int fd = s->ends[i].fd;
    ssize_t n;
    do {
        n = recv(fd, r->scratch, SCRATCH, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        finish(s, i == 0 ? END_CLIENT : END_SERVER, finished);
        return;
    }
    if (n == 0) {  /* its last word was delivered: this end is read only when nothing of it waits */
        finish(s, i == 0 ? END_CLIENT : END_SERVER, finished);
        return;
    }
    size_t len = (size_t)n;
    int terminate = 0;
    if (i == 0 && s->track) {
        long at = find_terminate(s, (const unsigned char *)r->scratch, len);
        if (at >= 0) {
            len = (size_t)at;
            terminate = 1;
        }
    }
    if (len && forward(r, s, i, r->scratch, len) < 0) {
        finish(s, i == 0 ? END_SERVER : END_CLIENT, finished);
        return;
    }
    if (terminate) {
        s->closing[0] = 1;
        s->terminated = 1;
        if (s->pend[0].len == 0)
            finish(s, END_TERMINATE, finished);
    }
}

/* End i hung up with bytes of its own still waiting: append what its socket still holds. */
static void salvage(struct relay *r, struct session *s, int i) {
    struct pending *p = &s->pend[i];
    for (;;) {
        ssize_t n = recv(s->ends[i].fd, r->scratch, SCRATCH, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        char *grown = realloc(p->buf, p->len + (size_t)n);
        if (grown == NULL)
            return;
        memcpy(grown + p->len, r->scratch, (size_t)n);
        p->buf = grown;
        p->len += (size_t)n;
        count(r, n);
    }
}

static void drop(struct relay *r, struct session *s) {
    for (int i = 0; i < 2; i++) {
        if (s->ends[i].in_epoll)
            epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->ends[i].fd, NULL);
        s->ends[i].in_epoll = 0;
        s->ends[i].fd = -1;  /* lent, not owned: the proxy closes it */
        count(r, -(long)(s->pend[i].len - s->pend[i].off));
        free(s->pend[i].buf);
        s->pend[i].buf = NULL;
        s->pend[i].len = s->pend[i].off = 0;
    }
}

/* Start watching a session's two ends: done here, on the thread, so that no event of one end can
 * be handled while the other is not watched yet. */
static void watch(struct relay *r, struct session *s, struct session **finished) {
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = &s->ends[i]};
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, s->ends[i].fd, &ev) < 0) {
            finish(s, END_STOPPED, finished);
            return;
        }
        s->ends[i].in_epoll = 1;
        s->ends[i].armed = ev.events;
    }
}

static void report(struct relay *r, struct session *finished) {
    if (finished == NULL)
        return;
    pthread_mutex_lock(&r->lock);
    for (struct session *s = finished; s != NULL; s = s->next_finished) {
        s->reported = 1;
        s->next_done = NULL;
        if (r->done_tail)
            r->done_tail->next_done = s;
        else
            r->done_head = s;
        r->done_tail = s;
    }
    pthread_mutex_unlock(&r->lock);
    poke(r->donefd);
}

static void *run(void *arg) {
    struct relay *r = arg;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        struct session *finished = NULL;
        for (int k = 0; k < n; k++) {
            struct end *e = events[k].data.ptr;
            if (e == NULL) {  /* the proxy wants something */
                uint64_t v;
                ssize_t rd = read(r->wakefd, &v, sizeof v);
                (void)rd;
                pthread_mutex_lock(&r->lock);
                int quit = r->quit;
                struct session *adds = r->adds;
                r->adds = NULL;
                for (struct session *s = adds; s != NULL; s = s->next_add)
                    watch(r, s, &finished);
                struct session *stops = r->stops;
                r->stops = NULL;
                for (struct session *s = stops; s != NULL; s = s->next_stop) {
                    s->stop_requested = 0;
                    if (!s->reported)
                        finish(s, END_STOPPED, &finished);
                }
                pthread_mutex_unlock(&r->lock);
                if (quit) {
                    for (struct session *s = finished; s != NULL; s = s->next_finished)
                        drop(r, s);
                    report(r, finished);
                    return NULL;
                }
                continue;
            }
            struct session *s = e->s;
            if (s->done)
                continue;
            int i = e->which;
            uint32_t ev = events[k].events;
            /* The other end's bytes waiting for this end go first: they were said earlier. */
            if ((ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && s->pend[1 - i].len) {
                if (flush(r, s, 1 - i) < 0) {
                    finish(s, i == 0 ? END_CLIENT : END_SERVER, &finished);
                    continue;
                }
                if (s->pend[1 - i].len == 0 && s->closing[1 - i]) {
                    /* The other end's last word is delivered. */
                    finish(s, (1 - i) == 1 ? END_SERVER : s->terminated ? END_TERMINATE : END_CLIENT,
                           &finished);
                    continue;
                }
            }
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
                if (!s->closing[i] && s->pend[i].len == 0) {
                    pump(r, s, i, &finished);
                } else if (ev & (EPOLLERR | EPOLLHUP)) {
                    /* This end hung up while its bytes still wait for the other end (or after its
                     * Terminate). Epoll would report the hang-up forever: take what it said last,
                     * stop watching it, deliver, then end. */
                    if (!s->closing[i])
                        salvage(r, s, i);
                    s->closing[i] = 1;
                    if (s->ends[i].in_epoll) {
                        epoll_ctl(r->epfd, EPOLL_CTL_DEL, s->ends[i].fd, NULL);
                        s->ends[i].in_epoll = 0;
                    }
                    if (s->pend[1 - i].len || s->pend[i].len == 0) {
                        /* it is owed bytes it can no longer take, or has nothing left to say */
                        finish(s, i == 0 ? (s->terminated ? END_TERMINATE : END_CLIENT) : END_SERVER,
                               &finished);
                        continue;
                    }
                }
            }
            if (!s->done) {
                arm(r, &s->ends[0]);
                arm(r, &s->ends[1]);
            }
        }
        for (struct session *s = finished; s != NULL; s = s->next_finished)
            drop(r, s);
        report(r, finished);
    }
    return NULL;
}

/* -- the proxy's side (called from its event loop thread through ctypes) ------------------ */

void *lr_open(void) {
    struct relay *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->scratch = malloc(SCRATCH);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->donefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->scratch == NULL || r->epfd < 0 || r->wakefd < 0 || r->donefd < 0)
        goto fail;
    pthread_mutex_init(&r->lock, NULL);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wakefd, &ev) < 0)
        goto fail;
    if (pthread_create(&r->thread, NULL, run, r) != 0)
        goto fail;
    return r;
fail:
    if (r->epfd >= 0) close(r->epfd);
    if (r->wakefd >= 0) close(r->wakefd);
    if (r->donefd >= 0) close(r->donefd);
    free(r->scratch);
    free(r);
    return NULL;
}

/* The eventfd that becomes readable when sessions have ended (the proxy's loop watches it). */
int lr_donefd(void *h) {
    return ((struct relay *)h)->donefd;
}

/*
 * Relay between client_fd and server_fd, lent by the proxy until the session is reported ended
 * (the relay never closes them). Returns the session's handle, or NULL.
 */
void *lr_add(void *h, int client_fd, int server_fd, int track) {
    struct relay *r = h;
    struct session *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->track = track;
    s->ends[0] = (struct end){.s = s, .fd = client_fd, .which = 0};
    s->ends[1] = (struct end){.s = s, .fd = server_fd, .which = 1};
    pthread_mutex_lock(&r->lock);
    r->live++;
    s->next_add = r->adds;
    r->adds = s;
    pthread_mutex_unlock(&r->lock);
    poke(r->wakefd);
    return s;
}

/* Ask the thread to end a session it has not ended yet (it is reported as stopped). */
void lr_stop(void *h, void *session) {
    struct relay *r = h;
    struct session *s = session;
    pthread_mutex_lock(&r->lock);
    if (!s->reported && !s->stop_requested) {
        s->stop_requested = 1;
        s->next_stop = r->stops;
        r->stops = s;
    }
    pthread_mutex_unlock(&r->lock);
    poke(r->wakefd);
}

/*
 * Collect up to cap ended sessions: their handles and reasons. Each is freed here; the proxy
 * must not use a handle after it came back from this call.
 */
int lr_done(void *h, void **sessions, int *reasons, int cap) {
    struct relay *r = h;
    uint64_t v;
    ssize_t rd = read(r->donefd, &v, sizeof v);
    (void)rd;
    int n = 0;
    pthread_mutex_lock(&r->lock);
    while (n < cap && r->done_head != NULL) {
        struct session *s = r->done_head;
        r->done_head = s->next_done;
        if (r->done_head == NULL)
            r->done_tail = NULL;
        if (s->stop_requested) {  /* ended before its stop was seen: unlink it from the stops */
            for (struct session **at = &r->stops; *at != NULL; at = &(*at)->next_stop) {
                if (*at == s) {
                    *at = s->next_stop;
                    break;
                }
            }
        }
        sessions[n] = s;
        reasons[n] = s->reason;
        n++;
        r->live--;
        free(s);
    }
    int more = r->done_head != NULL;
    pthread_mutex_unlock(&r->lock);
    if (more) {  /* keep the eventfd readable for the rest */
        poke(r->donefd);
    }
    return n;
}

/* Bytes the relay keeps for readers slower than their writers, over all sessions. */
long lr_buffered(void *h) {
    return __atomic_load_n(&((struct relay *)h)->buffered, __ATOMIC_RELAXED);
}

/* Sessions added and not yet collected. */
long lr_live(void *h) {
    struct relay *r = h;
    pthread_mutex_lock(&r->lock);
    long live = r->live;
    pthread_mutex_unlock(&r->lock);
    return live;
}

/*
 * Stop the thread and free everything. The proxy stops and collects every session first; one it
 * did not is left as it is (its sockets are the proxy's).
 */
void lr_close(void *h) {
    struct relay *r = h;
    pthread_mutex_lock(&r->lock);
    r->quit = 1;
    pthread_mutex_unlock(&r->lock);
    poke(r->wakefd);
    pthread_join(r->thread, NULL);
    /* Sessions the thread never ended are found through epoll no more; the proxy stops every
     * session before closing, so none is expected here. */
    while (r->done_head != NULL) {
        struct session *s = r->done_head;
        r->done_head = s->next_done;
        free(s);
    }
    close(r->epfd);
    close(r->wakefd);
    close(r->donefd);
    pthread_mutex_destroy(&r->lock);
    free(r->scratch);
    free(r);
}
