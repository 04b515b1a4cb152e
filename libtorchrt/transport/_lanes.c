/* The front's native fast lane (Linux): requests to CPU workers that need no Python in
 * any thread but the caller's.
 *
 * A *lane* is one worker's second SOCK_SEQPACKET socket pair (beside its channel and its
 * ZeroMQ socket). A caller thread makes a ticket for a request datagram of a model; its
 * wait() lets go of the GIL and, under the hub's mutex, sends it to the model's lane with
 * the fewest requests in flight (below the lane's limit) or queues it in the model's FIFO
 * (submit() does that at once, keeping the GIL). The hub's own thread (a pthread that
 * never takes the GIL) waits on every lane with epoll, matches each reply to its ticket by
 * the request id, stores the reply's bytes in it, wakes its caller (a futex) or lists it
 * in its mailbox (an eventfd an asyncio loop watches), and sends the lane the next queued
 * request. The caller decodes the reply itself.
 *
 * Response-arena slots the caller frees are queued on their lane (release()) and sent as
 * one Release message ahead of the lane's next request (or at once, 64 of them, while the
 * lane is idle).
 *
 * The caller threads a batch's replies wake come out a few at a time, through the wake-up
 * gate (see below): woken together they would all queue for the GIL.
 *
 * A model added with max_rows batches dynamically: its requests always wait in its queue,
 * and leave as one wire Batch message (the request datagrams joined, unread) by the rules
 * of the router's Batcher (front/batcher.py; see dispatch()), at once or when the timerfd
 * says the oldest has waited the delay. The worker answers with a wire Replies message
 * holding each request's own reply. A lane's limit counts sends (a batch is one).
 *
 * A lane that reaches end-of-file (its worker died) fails the oldest send it holds
 * (the request or batch that may have been running) with LOST and the others with RETRY; a model left
 * without a lane to send to fails what it queues with RETRY (the caller then goes by the
 * router, which knows why); close() fails everything with CLOSED.
 *
 * Python API: see lanes.py, the only module that imports this one.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_DATAGRAM (48 * 1024)
#define MAX_LANES 1024
#define MAX_LIMIT 64
#define RELEASE_KIND 6
#define BATCH_KIND 8
#define REPLIES_KIND 9
/* the most requests in one batch (wire.Request's bound on a batch) */
#define MAX_BATCH 4096
/* what a Batch datagram adds to its requests: its head, and each request's bin header */
#define BATCH_HEAD 5
#define BIN_HEAD 5
/* the largest request a lane takes (it fits a Batch message alone) */
#define MAX_REQUEST (MAX_DATAGRAM - BATCH_HEAD - BIN_HEAD)
/* epoll data of the wake-up eventfd and of the batch timer */
#define EV_WAKE MAX_LANES
#define EV_TIMER (MAX_LANES + 1)
/* epoll data of the wake-up gate's timer */
#define EV_GATE (MAX_LANES + 2)
/* the most callers the gate lets be awake at once */
#define MAX_AWAKE 16
/* the gate judges its grants over windows this long, and when most of a window's (at
 * least GATE_MIN_GRANTS) lapsed, stays off this long before it holds wakes again */
#define GATE_WINDOW_NS 20000000LL
#define GATE_OFF_NS 500000000LL
#define GATE_MIN_GRANTS 8
/* the longest busy poll (Hub(spin_us=)): 1 s */
#define MAX_SPIN_US 1000000LL
/* a pause between two looks at a polled ticket */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif
/* releases sent ahead of one request at most (more wait for the next) */
#define MAX_RELEASES 1024

/* T_HELD: finished with its reply, its caller's wake held by the gate (T_DONE once woken) */
enum { T_QUEUED = 1, T_SENT = 2, T_DONE = 3, T_LOST = 4, T_RETRY = 5, T_CLOSED = 6, T_HELD = 7 };
/* whether a finished ticket's caller holds a grant: none, woken with one, read by its caller */
enum { G_NONE = 0, G_WOKEN = 1, G_TAKEN = 2 };

typedef struct Ticket {
    int refs;        /* atomic: the Python object's, and the hub's while it holds it */
    uint32_t state;  /* futex word */
    int abandoned;   /* its caller stopped waiting (an exception): the reply is an orphan */
    int unread;      /* atomic: finished, and its caller not told yet (counted in Hub.unread) */
    int mid;
    int box;         /* the mailbox told when it finishes (-1: none; its caller waits) */
    int picked;      /* (chosen for the batch being formed) */
    uint32_t rows;   /* its rows (a batching model's requests) */
    uint64_t bkey;   /* requests of equal keys may share a batch */
    int64_t enq_ns;  /* when it was queued (a batching model's) */
    uint64_t key;    /* the key of the lane that answered or lost it (0: none) */
    uint64_t id;
    int gate;        /* atomic: G_NONE, G_WOKEN (its caller woken with a grant) or G_TAKEN */
    uint64_t grant;  /* its grant's number (G_WOKEN) */
    struct Ticket *gnext; /* (the gate's list of held wakes) */
    char *data;      /* the request datagram while queued; then the reply's bytes */
    size_t len;
    struct Ticket *next;
} Ticket;

typedef struct {
    uint64_t key; /* the caller's name for it (lane slots are reused; keys are not) */
    int fd;
    int mid;
    int used;
    int alive;   /* its worker may still answer */
    int enabled; /* new requests may go to it */
    int limit;   /* sends in flight at most (a batch is one send) */
    int nsent;   /* sends in flight */
    int count;   /* requests in flight; ids[], tickets[] and sends[] in the order they were sent */
    int cap;
    uint64_t *ids;
    Ticket **tickets;
    uint64_t *sends; /* the send each request went by (a batch's requests share one) */
    uint64_t *releases;
    size_t nrel, caprel;
    uint64_t served;
} Lane;

typedef struct {
    int used;
    int rr;
    Ticket *head, *tail;
    Py_ssize_t queued;
    /* dynamic batching (max_rows > 0): requests wait here, and leave in batches */
    int max_rows;
    int64_t delay_ns;
    int npref;
    int pref[16];    /* preferred batch sizes, largest first */
    Ticket **picked; /* (max_rows of them: the batch being formed) */
} Model;

/* Where finished tickets of one asyncio event loop are listed, and its eventfd. */
typedef struct {
    int used;
    int fd;
    uint64_t *ids;
    size_t n, cap;
} Mailbox;

typedef struct Orphan {
    uint64_t key;
    char *data;
    size_t len;
    struct Orphan *next;
} Orphan;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    int ep;
    int wake;
    int timer;        /* a timerfd: the earliest batch delay to run out */
    int64_t timer_ns; /* when it is set to fire (0: not set) */
    uint64_t sends;   /* sends made (a lane's requests are grouped by send) */
    pthread_t thread;
    uint32_t tid; /* its thread's id (futex word: 0 until the thread has said it) */
    int started;
    int closing;
    Lane lanes[MAX_LANES];
    int nlanes;
    Model *models;
    int nmodels;
    Orphan *orphans;
    Py_ssize_t norphans;
    Mailbox *boxes;
    int nboxes;
    Py_ssize_t inflight;
    Py_ssize_t queued;
    Py_ssize_t unread; /* atomic: tickets finished whose callers have not read them yet */
    /* the wake-up gate (see gate_finish): at most awake_max callers woken and not back */
    int awake_max;        /* 0: no gate */
    int64_t grace_ns;     /* a grant not given back in this long lapses */
    int gate_timer;       /* a timerfd: the oldest grant lapses */
    int64_t gate_ns;      /* when it is set to fire (0: not set) */
    int nawake;
    uint64_t awake_grant[MAX_AWAKE]; /* the grants out, oldest first */
    int64_t awake_ns[MAX_AWAKE];
    Ticket *held_head, *held_tail;   /* finished tickets whose wake waits (T_HELD), oldest first */
    int gate_on;          /* 0: off for a while, callers slower than the grace */
    int64_t gate_until;   /* the end of the window being judged, or of the time off */
    long win_granted, win_lapsed;    /* grants of the window, and those that lapsed */
    long granted, given_back, lapsed, offs; /* totals (the gate property) */
    /* busy polling (see poll_ticket): how long a caller polls, and whether one does now */
    int64_t spin_ns;
    int polling; /* atomic */
} Hub;

/* grant numbers, unique across hubs (a thread's grant names its hub's) */
static uint64_t gate_grants;
/* the grant the calling thread holds, and its hub (0: none) */
static __thread uint64_t held_grant;
static __thread Hub *held_hub;

typedef struct {
    PyObject_HEAD
    Ticket *t;
    PyObject *hub; /* (its mutex guards the ticket's place in a queue) */
} TicketObject;

static PyTypeObject TicketType;

/* ── tickets ─────────────────────────────────────────────────────────────────── */

static void ticket_unref(Ticket *t) {
    if (__atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        free(t->data);
        free(t);
    }
}

/* ── the wake-up gate ────────────────────────────────────────────────────────────
 *
 * Caller threads share one GIL. When a batch's replies wake all its callers at once,
 * they all wait for the GIL, and every torch call of theirs that lets go of it hands it to
 * another: the process spends its time switching threads (a convoy that persists while
 * callers queue for the GIL). So the hub wakes at most ``awake_max`` callers of batch
 * replies at a time (a *grant* each) and holds the other wakes, oldest first. A caller
 * gives its grant back when it comes back with its next request (the next held wake goes
 * then), and a grant not given back within ``grace_ns`` lapses (the gate's timerfd), its
 * place going to the next.
 *
 * Lapses mean callers do something else between requests (a server thread writes its
 * answer and waits for its next client): holding their wakes would serve one per grace.
 * So the gate judges each window of GATE_WINDOW_NS: when most of its grants lapsed, it
 * wakes everyone it holds and stays off for GATE_OFF_NS, then tries again.
 *
 * A caller that finds its reply finished before it sleeps takes it at once, grant or not,
 * and so does one whose wait's timeout runs out.
 * Replies to mailboxes (asyncio), single requests, failures and a closing hub are never
 * held. */

static int64_t mono_ns(void);

static void gate_arm(Hub *h) {
    if (h->gate_ns || !h->held_head || !h->nawake) return;
    int64_t at = h->awake_ns[0] + h->grace_ns;
    h->gate_ns = at;
    struct itimerspec its = {{0, 0}, {(time_t)(at / 1000000000), (long)(at % 1000000000)}};
    timerfd_settime(h->gate_timer, TFD_TIMER_ABSTIME, &its, NULL);
}

/* Count grant g, given at ``now``, as out. (mutex held) */
static void gate_out(Hub *h, uint64_t grant, int64_t now) {
    h->awake_grant[h->nawake] = grant;
    h->awake_ns[h->nawake] = now;
    h->nawake++;
    h->granted++;
    h->win_granted++;
}

/* Forget grant g (given back, or lapsed); whether it was out. (mutex held) */
static int gate_forget(Hub *h, uint64_t grant) {
    for (int i = 0; i < h->nawake; i++)
        if (h->awake_grant[i] == grant) {
            h->nawake--;
            memmove(h->awake_grant + i, h->awake_grant + i + 1, (size_t)(h->nawake - i) * sizeof h->awake_grant[0]);
            memmove(h->awake_ns + i, h->awake_ns + i + 1, (size_t)(h->nawake - i) * sizeof h->awake_ns[0]);
            return 1;
        }
    return 0;
}

/* Wake held callers while grants are free. (mutex held) */
static void gate_fill(Hub *h) {
    int64_t now = 0;
    while (h->held_head && h->nawake < h->awake_max) {
        Ticket *t = h->held_head;
        h->held_head = t->gnext;
        if (!h->held_head) h->held_tail = NULL;
        t->gnext = NULL;
        uint64_t grant = __atomic_add_fetch(&gate_grants, 1, __ATOMIC_RELAXED);
        t->grant = grant;
        __atomic_store_n(&t->gate, G_WOKEN, __ATOMIC_RELEASE);
        uint32_t held = T_HELD;
        /* (its caller may have taken it meanwhile, awake when it looked: then no grant) */
        if (__atomic_compare_exchange_n(&t->state, &held, T_DONE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            if (!now) now = mono_ns();
            gate_out(h, grant, now);
            syscall(SYS_futex, &t->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        }
        ticket_unref(t); /* the gate's */
    }
    gate_arm(h);
}

/* Wake every held caller, without grants, and forget the grants out (the gate turns
 * off, or the hub closes). (mutex held) */
static void gate_open(Hub *h) {
    while (h->held_head) {
        Ticket *t = h->held_head;
        h->held_head = t->gnext;
        t->gnext = NULL;
        uint32_t held = T_HELD;
        if (__atomic_compare_exchange_n(&t->state, &held, T_DONE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            syscall(SYS_futex, &t->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        ticket_unref(t);
    }
    h->held_tail = NULL;
    h->nawake = 0;
}

/* At the end of a window: off for a while if most of its grants lapsed; else on, and a
 * new window. (mutex held) */
static void gate_judge(Hub *h, int64_t now) {
    if (now < h->gate_until) return;
    if (h->gate_on && h->win_granted >= GATE_MIN_GRANTS && 2 * h->win_lapsed > h->win_granted) {
        h->gate_on = 0;
        h->gate_until = now + GATE_OFF_NS;
        h->offs++;
        gate_open(h);
    } else {
        h->gate_on = 1;
        h->gate_until = now + GATE_WINDOW_NS;
    }
    h->win_granted = h->win_lapsed = 0;
}

/* The calling thread is back with a request: it gives back the grant it holds. (mutex held) */
static void gate_back(Hub *h) {
    if (!held_grant) return;
    uint64_t grant = held_grant;
    Hub *of = held_hub;
    held_grant = 0;
    held_hub = NULL;
    if (of == h && gate_forget(h, grant)) {
        h->given_back++;
        gate_fill(h);
    }
}

/* The gate's timer: grants out longer than the grace lapse, and held wakes go. */
static void gate_lapse(Hub *h) {
    uint64_t v;
    if (read(h->gate_timer, &v, sizeof v) < 0) { /* (a stale wake-up) */ }
    h->gate_ns = 0;
    int64_t now = mono_ns();
    while (h->nawake && h->awake_ns[0] + h->grace_ns <= now) {
        gate_forget(h, h->awake_grant[0]);
        h->lapsed++;
        h->win_lapsed++;
    }
    gate_judge(h, now);
    gate_fill(h);
}

/* Wake t's caller (t finished with state T_DONE, its caller waits on the futex) through
 * the gate: with a grant (its gate is set before its state, so that a caller that sees it
 * finished knows it holds one), or later (T_HELD until then). Returns 0 if the gate does
 * not apply (wake it as usual). (mutex held) */
static int gate_finish(Hub *h, Ticket *t, uint32_t state) {
    if (!h->awake_max || state != T_DONE || h->closing || !h->models[t->mid].max_rows ||
        __atomic_load_n(&t->abandoned, __ATOMIC_ACQUIRE))
        return 0;
    int64_t now = mono_ns();
    gate_judge(h, now);
    if (!h->gate_on) return 0;
    if (h->nawake < h->awake_max) {
        uint64_t grant = __atomic_add_fetch(&gate_grants, 1, __ATOMIC_RELAXED);
        t->grant = grant;
        __atomic_store_n(&t->gate, G_WOKEN, __ATOMIC_RELEASE);
        gate_out(h, grant, now);
        __atomic_store_n(&t->state, state, __ATOMIC_RELEASE);
        syscall(SYS_futex, &t->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        return 1;
    }
    __atomic_add_fetch(&t->refs, 1, __ATOMIC_ACQ_REL); /* the gate's */
    if (h->held_tail) h->held_tail->gnext = t;
    else h->held_head = t;
    h->held_tail = t;
    __atomic_store_n(&t->state, T_HELD, __ATOMIC_RELEASE);
    gate_arm(h);
    return 1;
}

/* (hub mutex held) */
static void ticket_finish(Hub *h, Ticket *t, uint32_t state) {
    /* (pending until its caller reads it: a drain waits for that) */
    if (!__atomic_load_n(&t->abandoned, __ATOMIC_ACQUIRE) && !__atomic_exchange_n(&t->unread, 1, __ATOMIC_ACQ_REL))
        __atomic_add_fetch(&h->unread, 1, __ATOMIC_ACQ_REL);
    if (t->box < 0 && gate_finish(h, t, state)) return;
    __atomic_store_n(&t->state, state, __ATOMIC_RELEASE);
    if (t->box < 0) {
        syscall(SYS_futex, &t->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        return;
    }
    Mailbox *b = &h->boxes[t->box];
    if (!b->used) return;
    if (b->n == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 64;
        uint64_t *grown = realloc(b->ids, cap * sizeof(uint64_t));
        if (!grown) return; /* (its caller waits until its deadline, or the pool closes) */
        b->ids = grown;
        b->cap = cap;
    }
    b->ids[b->n++] = t->id;
    if (b->n == 1) {
        uint64_t one = 1;
        if (write(b->fd, &one, sizeof one) < 0) { /* (it is readable already) */ }
    }
}

/* ── lanes (hub mutex held) ──────────────────────────────────────────────────── */

static int put_uint(unsigned char *p, uint64_t v) {
    if (v < 128) { p[0] = (unsigned char)v; return 1; }
    if (v <= 0xffu) { p[0] = 0xcc; p[1] = (unsigned char)v; return 2; }
    if (v <= 0xffffu) { p[0] = 0xcd; p[1] = (unsigned char)(v >> 8); p[2] = (unsigned char)v; return 3; }
    if (v <= 0xffffffffu) {
        p[0] = 0xce;
        for (int i = 0; i < 4; i++) p[1 + i] = (unsigned char)(v >> (24 - 8 * i));
        return 5;
    }
    p[0] = 0xcf;
    for (int i = 0; i < 8; i++) p[1 + i] = (unsigned char)(v >> (56 - 8 * i));
    return 9;
}

static int send_all(int fd, const void *data, size_t len) {
    for (;;) {
        ssize_t n = send(fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n >= 0) return 0;
        if (errno == EINTR) continue;
        if (errno == EAGAIN) { /* its buffer is full (rare: a lane holds at most MAX_LIMIT) */
            struct pollfd p = {fd, POLLOUT, 0};
            if (poll(&p, 1, 1000) > 0) continue;
        }
        return -1; /* the worker is gone: end-of-file on the lane follows */
    }
}

/* Send the lane's pending releases as one wire Release message: [6, [offsets]]. */
static void flush_releases(Lane *l) {
    if (!l->nrel) return;
    size_t n = l->nrel < MAX_RELEASES ? l->nrel : MAX_RELEASES;
    unsigned char *buf = malloc(8 + 9 * n);
    if (!buf) return;
    size_t k = 0;
    buf[k++] = 0x92;
    buf[k++] = RELEASE_KIND;
    if (n < 16) buf[k++] = (unsigned char)(0x90 | n);
    else { buf[k++] = 0xdc; buf[k++] = (unsigned char)(n >> 8); buf[k++] = (unsigned char)n; }
    for (size_t i = 0; i < n; i++) k += put_uint(buf + k, l->releases[i]);
    send_all(l->fd, buf, k);
    free(buf);
    memmove(l->releases, l->releases + n, (l->nrel - n) * sizeof(uint64_t));
    l->nrel -= n;
}

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Record ticket t in flight on lane l as part of send ``send``. */
static void lane_hold(Hub *h, Lane *l, Ticket *t, uint64_t send) {
    l->ids[l->count] = t->id;
    l->tickets[l->count] = t;
    l->sends[l->count] = send;
    l->count++;
    h->inflight++;
    __atomic_store_n(&t->state, T_SENT, __ATOMIC_RELEASE);
}

static void drop_data(Ticket *t) {
    free(t->data);
    t->data = NULL;
    t->len = 0;
}

/* Send ticket t (its request datagram in t->data) on lane index li. */
static void lane_send(Hub *h, int li, Ticket *t) {
    Lane *l = &h->lanes[li];
    lane_hold(h, l, t, ++h->sends);
    l->nsent++;
    flush_releases(l);
    send_all(l->fd, t->data, t->len);
    drop_data(t);
}

static size_t put_bin_head(unsigned char *p, size_t len) {
    if (len <= 0xff) { p[0] = 0xc4; p[1] = (unsigned char)len; return 2; }
    if (len <= 0xffff) { p[0] = 0xc5; p[1] = (unsigned char)(len >> 8); p[2] = (unsigned char)len; return 3; }
    p[0] = 0xc6;
    for (int i = 0; i < 4; i++) p[1 + i] = (unsigned char)(len >> (24 - 8 * i));
    return 5;
}

/* Send tickets ts[0..n) on lane index li as one wire Batch message: [8, [request, ...]]
 * (each request datagram a bin), which the worker runs as one execution. */
static void lane_send_batch(Hub *h, int li, Ticket **ts, int n) {
    Lane *l = &h->lanes[li];
    size_t total = BATCH_HEAD;
    for (int i = 0; i < n; i++) total += BIN_HEAD + ts[i]->len;
    unsigned char *buf = malloc(total);
    uint64_t send = ++h->sends;
    for (int i = 0; i < n; i++) lane_hold(h, l, ts[i], send);
    l->nsent++;
    flush_releases(l);
    if (buf) {
        size_t k = 0;
        buf[k++] = 0x92;
        buf[k++] = BATCH_KIND;
        if (n < 16) buf[k++] = (unsigned char)(0x90 | n);
        else { buf[k++] = 0xdc; buf[k++] = (unsigned char)(n >> 8); buf[k++] = (unsigned char)n; }
        for (int i = 0; i < n; i++) {
            k += put_bin_head(buf + k, ts[i]->len);
            memcpy(buf + k, ts[i]->data, ts[i]->len);
            k += ts[i]->len;
        }
        send_all(l->fd, buf, k);
        free(buf);
    } /* (out of memory: never answered; its callers' deadlines or the worker's exit end them) */
    for (int i = 0; i < n; i++) drop_data(ts[i]);
}

/* Let the batch timer fire at ``at`` (ns, CLOCK_MONOTONIC) if it is not set earlier. */
static void arm(Hub *h, int64_t at) {
    if (h->timer_ns && h->timer_ns <= at) return;
    h->timer_ns = at;
    struct itimerspec its = {{0, 0}, {(time_t)(at / 1000000000), (long)(at % 1000000000)}};
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
    timerfd_settime(h->timer, TFD_TIMER_ABSTIME, &its, NULL);
}

/* The lane of model mid with the fewest sends in flight, below its limit and at most
 * ``busy`` (-1: none). */
static int free_lane(Hub *h, int mid, int busy) {
    Model *m = &h->models[mid];
    int best = -1, n = h->nlanes;
    for (int k = 0; k < n; k++) {
        int i = (m->rr + k) % n;
        Lane *l = &h->lanes[i];
        if (!l->used || l->mid != mid || !l->alive || !l->enabled || l->nsent >= l->limit || l->nsent > busy) continue;
        if (best < 0 || l->nsent < h->lanes[best].nsent) best = i;
    }
    if (best >= 0) m->rr = (best + 1) % n;
    return best;
}

/* How many of a batch's candidates ts[0..n) (``full``: waiting cannot grow it) leave
 * now, as Batcher.next_batch decides (front/batcher.py): all of them when it is full;
 * else the largest preferred size they make up exactly; else all of them once the
 * oldest has waited the delay; else 0 (they wait). */
static int batch_size(Model *m, Ticket **ts, int n, int full) {
    if (full) return n;
    for (int p = 0; p < m->npref; p++) {
        int rows = 0;
        for (int i = 0; i < n && rows < m->pref[p]; i++) {
            rows += (int)ts[i]->rows;
            if (rows == m->pref[p]) return i + 1;
        }
    }
    return mono_ns() >= ts[0]->enq_ns + m->delay_ns ? n : 0;
}

/* Send the batches a batching model's queue makes up, on its lanes with room; if its
 * head must wait longer, set the timer for it.
 *
 * A batch goes to an idle lane; only a full one also goes to a lane that still runs one
 * (it waits there, ready, as the router's batcher sends ahead): a worker that is busy
 * lets the queue grow into a larger batch rather than take a small one. */
static void dispatch(Hub *h, int mid) {
    Model *m = &h->models[mid];
    while (m->head) {
        if (free_lane(h, mid, MAX_LIMIT) < 0) return; /* (the next reply calls again) */
        Ticket *head = m->head, **ts = m->picked;
        int n = 0, rows = 0, full = 0;
        size_t bytes = BATCH_HEAD;
        for (Ticket *t = head; t; t = t->next) {
            if (t->bkey != head->bkey) continue; /* never merged: a batch of its own later */
            if (rows + (int)t->rows > m->max_rows || bytes + BIN_HEAD + t->len > MAX_DATAGRAM || n == MAX_BATCH) {
                full = 1;
                break;
            }
            ts[n++] = t;
            rows += (int)t->rows;
            bytes += BIN_HEAD + t->len;
            if (rows >= m->max_rows) { full = 1; break; }
        }
        if (n == 0) ts[n++] = head; /* (too big for any batch: alone, and the worker says so) */
        int take = batch_size(m, ts, n, full);
        if (!take) {
            arm(h, head->enq_ns + m->delay_ns);
            return;
        }
        int li = free_lane(h, mid, 0);
        if (li < 0 && full && take == n) li = free_lane(h, mid, MAX_LIMIT);
        if (li < 0) return; /* (every lane runs a batch: the next reply calls again, and the queue grows) */
        for (int i = 0; i < take; i++) ts[i]->picked = 1;
        Ticket **p = &m->head, *prev = NULL;
        for (int left = take; *p && left;) {
            Ticket *t = *p;
            if (t->picked) {
                *p = t->next;
                t->next = NULL;
                t->picked = 0;
                left--;
            } else {
                prev = t;
                p = &t->next;
            }
        }
        m->tail = prev;
        if (*p) { /* (the rest of the queue: find its tail) */
            Ticket *t = *p;
            while (t->next) t = t->next;
            m->tail = t;
        }
        if (!m->head) m->tail = NULL;
        m->queued -= take;
        h->queued -= take;
        lane_send_batch(h, li, ts, take);
    }
}

static void refill(Hub *h, int li) {
    Lane *l = &h->lanes[li];
    Model *m = &h->models[l->mid];
    if (m->max_rows) {
        if (l->alive && l->enabled) dispatch(h, l->mid);
        return;
    }
    while (l->alive && l->enabled && l->nsent < l->limit && m->head) {
        Ticket *t = m->head;
        m->head = t->next;
        if (!m->head) m->tail = NULL;
        t->next = NULL;
        m->queued--;
        h->queued--;
        lane_send(h, li, t);
    }
}

static int model_has_lane(Hub *h, int mid) {
    for (int i = 0; i < h->nlanes; i++) {
        Lane *l = &h->lanes[i];
        if (l->used && l->mid == mid && l->alive && l->enabled) return 1;
    }
    return 0;
}

static void fail_queue(Hub *h, Model *m, uint32_t state) {
    while (m->head) {
        Ticket *t = m->head;
        m->head = t->next;
        t->next = NULL;
        m->queued--;
        h->queued--;
        free(t->data);
        t->data = NULL;
        t->len = 0;
        ticket_finish(h, t, state);
        ticket_unref(t);
    }
    m->tail = NULL;
}

/* The lane will answer nothing more: fail what it holds; close it. */
static void lane_lost(Hub *h, int li) {
    Lane *l = &h->lanes[li];
    if (l->fd >= 0) {
        epoll_ctl(h->ep, EPOLL_CTL_DEL, l->fd, NULL);
        close(l->fd);
        l->fd = -1;
    }
    l->alive = 0;
    l->enabled = 0;
    for (int i = 0; i < l->count; i++) { /* only the oldest send (a request or a batch) can have been running */
        Ticket *t = l->tickets[i];
        t->key = l->key;
        ticket_finish(h, t, l->sends[i] == l->sends[0] ? T_LOST : T_RETRY);
        ticket_unref(t);
    }
    h->inflight -= l->count;
    l->count = 0;
    l->nsent = 0;
    l->nrel = 0;
    if (l->mid < h->nmodels && h->models[l->mid].used && !model_has_lane(h, l->mid))
        fail_queue(h, &h->models[l->mid], T_RETRY);
}

static int read_uint(const unsigned char *p, size_t len, size_t *pos, int64_t *out) {
    if (*pos >= len) return -1;
    unsigned char b = p[(*pos)++];
    int n;
    if (b < 0x80) { *out = b; return 0; }
    if (b >= 0xe0) { *out = (int8_t)b; return 0; }
    switch (b) {
        case 0xcc: n = 1; break;
        case 0xcd: n = 2; break;
        case 0xce: n = 4; break;
        case 0xcf: n = 8; break;
        case 0xd0: n = -1; break;
        case 0xd1: n = -2; break;
        case 0xd2: n = -4; break;
        case 0xd3: n = -8; break;
        default: return -1;
    }
    int signed_ = n < 0;
    if (signed_) n = -n;
    if (*pos + (size_t)n > len) return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[(*pos)++];
    if (signed_ && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~(uint64_t)0 << (8 * n);
    *out = (int64_t)v;
    return 0;
}

/* The request id of a reply: a msgpack array [kind, id, ...]; -1 if unreadable. */
static int64_t reply_id(const unsigned char *p, size_t len) {
    size_t pos = 0;
    if (len < 3) return -1;
    unsigned char b = p[pos++];
    if ((b & 0xf0) == 0x90) {
        if ((b & 0x0f) < 2) return -1;
    } else if (b == 0xdc) pos += 2;
    else if (b == 0xdd) pos += 4;
    else return -1;
    int64_t kind, id;
    if (read_uint(p, len, &pos, &kind) || read_uint(p, len, &pos, &id)) return -1;
    return id;
}

static void on_reply(Hub *h, int li, const unsigned char *buf, size_t n) {
    Lane *l = &h->lanes[li];
    int64_t id = reply_id(buf, n);
    int k = -1;
    for (int i = 0; i < l->count && id >= 0; i++)
        if (l->ids[i] == (uint64_t)id) { k = i; break; }
    if (k < 0) return; /* not ours (a hostile or confused peer): dropped */
    Ticket *t = l->tickets[k];
    uint64_t send = l->sends[k];
    l->count--;
    memmove(l->ids + k, l->ids + k + 1, (size_t)(l->count - k) * sizeof l->ids[0]);
    memmove(l->tickets + k, l->tickets + k + 1, (size_t)(l->count - k) * sizeof l->tickets[0]);
    memmove(l->sends + k, l->sends + k + 1, (size_t)(l->count - k) * sizeof l->sends[0]);
    int rest = 0; /* (the send's other requests are next to it) */
    if (k > 0 && l->sends[k - 1] == send) rest = 1;
    if (k < l->count && l->sends[k] == send) rest = 1;
    if (!rest) l->nsent--;
    h->inflight--;
    l->served++;
    char *copy = malloc(n ? n : 1);
    if (copy) memcpy(copy, buf, n);
    if (__atomic_load_n(&t->abandoned, __ATOMIC_ACQUIRE)) {
        Orphan *o = malloc(sizeof(Orphan));
        if (o && copy) {
            o->key = l->key; o->data = copy; o->len = n; o->next = h->orphans;
            h->orphans = o;
            h->norphans++;
        } else { free(o); free(copy); }
        ticket_finish(h, t, T_DONE);
    } else if (!copy) {
        t->key = l->key;
        ticket_finish(h, t, T_LOST);
    } else {
        t->data = copy;
        t->len = n;
        t->key = l->key;
        ticket_finish(h, t, T_DONE);
    }
    ticket_unref(t);
}

static int read_len(const unsigned char *p, size_t len, size_t *pos, int bytes, size_t *out) {
    if (*pos + (size_t)bytes > len) return -1;
    size_t v = 0;
    for (int i = 0; i < bytes; i++) v = (v << 8) | p[(*pos)++];
    *out = v;
    return 0;
}

/* One datagram from lane li: a reply, or a wire Replies message ([9, [reply, ...]], each
 * reply a bin: a batch's) whose replies are taken in turn. */
static void on_datagram(Hub *h, int li, const unsigned char *buf, size_t n) {
    if (n < 3 || buf[0] != 0x92 || buf[1] != REPLIES_KIND) {
        on_reply(h, li, buf, n);
        return;
    }
    size_t pos = 2, count;
    if ((buf[pos] & 0xf0) == 0x90) count = buf[pos++] & 0x0f;
    else if (buf[pos] == 0xdc) { pos++; if (read_len(buf, n, &pos, 2, &count)) return; }
    else return;
    for (size_t i = 0; i < count; i++) {
        if (pos >= n) return;
        unsigned char b = buf[pos++];
        size_t len;
        int bytes = b == 0xc4 ? 1 : b == 0xc5 ? 2 : b == 0xc6 ? 4 : 0;
        if (!bytes || read_len(buf, n, &pos, bytes, &len) || pos + len > n) return; /* (a confused peer) */
        on_reply(h, li, buf + pos, len);
        pos += len;
    }
}

/* The batch timer fired: each batching model's head whose delay ran out leaves. */
static void on_timer(Hub *h) {
    uint64_t v;
    if (read(h->timer, &v, sizeof v) < 0) { /* (a stale wake-up) */ }
    h->timer_ns = 0;
    for (int mid = 0; mid < h->nmodels; mid++) {
        Model *m = &h->models[mid];
        if (m->used && m->max_rows && m->head) dispatch(h, mid);
    }
}

static void *hub_thread(void *arg) {
    Hub *h = arg;
    pthread_setname_np(pthread_self(), "libtorchrt-hub");
    __atomic_store_n(&h->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    syscall(SYS_futex, &h->tid, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    struct epoll_event events[64];
    unsigned char *buf = malloc(MAX_DATAGRAM + 1);
    if (!buf) return NULL;
    for (;;) {
        int n = epoll_wait(h->ep, events, 64, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        int stop = 0;
        pthread_mutex_lock(&h->mu);
        for (int e = 0; e < n; e++) {
            int li = (int)events[e].data.u32;
            if (li == EV_TIMER) {
                on_timer(h);
                continue;
            }
            if (li == EV_GATE) {
                gate_lapse(h);
                continue;
            }
            if (li == EV_WAKE) {
                uint64_t v;
                if (read(h->wake, &v, sizeof v) < 0) { /* (nothing to do) */ }
                if (h->closing) stop = 1;
                continue;
            }
            Lane *l = &h->lanes[li];
            if (!l->used || l->fd < 0) continue;
            for (;;) {
                ssize_t got = recv(l->fd, buf, MAX_DATAGRAM + 1, MSG_DONTWAIT);
                if (got > 0) { on_datagram(h, li, buf, (size_t)got); continue; }
                if (got < 0 && errno == EINTR) continue;
                if (got < 0 && errno == EAGAIN) break;
                lane_lost(h, li); /* end-of-file or ECONNRESET: the worker is gone */
                break;
            }
            if (l->alive) refill(h, li);
        }
        pthread_mutex_unlock(&h->mu);
        if (stop) break;
    }
    free(buf);
    return NULL;
}

/* ── Hub (Python type) ───────────────────────────────────────────────────────── */

static int hub_init(Hub *h, PyObject *args, PyObject *kw) {
    static char *names[] = {"awake", "grace_us", "spin_us", NULL};
    int awake = 2;
    long long grace_us = 1000, spin_us = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iLL:Hub", names, &awake, &grace_us, &spin_us)) return -1;
    if (h->started) {
        PyErr_SetString(PyExc_RuntimeError, "Hub already started");
        return -1;
    }
    if (awake < 0 || awake > MAX_AWAKE || grace_us <= 0 || grace_us > 60000000) {
        PyErr_Format(PyExc_ValueError, "awake must be 0 (no gate) to %d and grace_us 1 to 60000000; got %d and %lld",
                     MAX_AWAKE, awake, grace_us);
        return -1;
    }
    if (spin_us < 0 || spin_us > MAX_SPIN_US) {
        PyErr_Format(PyExc_ValueError, "spin_us must be 0 (no busy polling) to %lld; got %lld", MAX_SPIN_US, spin_us);
        return -1;
    }
    h->awake_max = awake;
    h->grace_ns = grace_us * 1000;
    h->spin_ns = spin_us * 1000;
    h->gate_on = 1;
    pthread_mutex_init(&h->mu, NULL);
    h->ep = epoll_create1(EPOLL_CLOEXEC);
    h->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    h->timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    h->gate_timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    if (h->ep < 0 || h->wake < 0 || h->timer < 0 || h->gate_timer < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_WAKE};
    epoll_ctl(h->ep, EPOLL_CTL_ADD, h->wake, &ev);
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = EV_TIMER};
    epoll_ctl(h->ep, EPOLL_CTL_ADD, h->timer, &tev);
    struct epoll_event gev = {.events = EPOLLIN, .data.u32 = EV_GATE};
    epoll_ctl(h->ep, EPOLL_CTL_ADD, h->gate_timer, &gev);
    for (int i = 0; i < MAX_LANES; i++) h->lanes[i].fd = -1;
    /* The hub's thread blocks every signal (it starts with the mask it is created
     * with): the kernel then gives a signal sent to the process to a thread that runs
     * Python, whose handler runs at once in the main thread, rather than to this one,
     * which would leave a main thread waiting in a join unaware of it. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    int err = pthread_create(&h->thread, NULL, hub_thread, h);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    h->started = 1;
    while (!__atomic_load_n(&h->tid, __ATOMIC_ACQUIRE)) /* (thread_id is known from now on) */
        syscall(SYS_futex, &h->tid, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    return 0;
}

static void lane_free(Lane *l) {
    free(l->releases);
    free(l->ids);
    free(l->tickets);
    free(l->sends);
    l->releases = NULL;
    l->ids = NULL;
    l->tickets = NULL;
    l->sends = NULL;
    l->nrel = l->caprel = 0;
    l->cap = 0;
}

static void hub_stop(Hub *h) {
    if (!h->started) return;
    pthread_mutex_lock(&h->mu);
    h->closing = 1;
    for (int i = 0; i < h->nlanes; i++)
        if (h->lanes[i].used) {
            Lane *l = &h->lanes[i];
            for (int k = 0; k < l->count; k++) {
                l->tickets[k]->key = l->key;
                ticket_finish(h, l->tickets[k], T_CLOSED);
                ticket_unref(l->tickets[k]);
            }
            h->inflight -= l->count;
            l->count = 0;
            l->nsent = 0;
        }
    for (int m = 0; m < h->nmodels; m++) fail_queue(h, &h->models[m], T_CLOSED);
    gate_open(h);
    pthread_mutex_unlock(&h->mu);
    uint64_t one = 1;
    if (write(h->wake, &one, sizeof one) < 0) { /* (the thread still wakes on close below) */ }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(h->thread, NULL);
    Py_END_ALLOW_THREADS
    h->started = 0;
    for (int i = 0; i < h->nlanes; i++) {
        Lane *l = &h->lanes[i];
        if (l->fd >= 0) close(l->fd);
        l->fd = -1;
        lane_free(l);
        l->used = 0;
    }
    while (h->orphans) {
        Orphan *o = h->orphans;
        h->orphans = o->next;
        free(o->data);
        free(o);
    }
    h->norphans = 0;
    close(h->ep);
    close(h->wake);
    close(h->timer);
    close(h->gate_timer);
    h->ep = h->wake = h->timer = h->gate_timer = -1;
}

static void hub_dealloc(Hub *h) {
    hub_stop(h);
    for (int i = 0; i < h->nboxes; i++)
        if (h->boxes[i].used) {
            close(h->boxes[i].fd);
            free(h->boxes[i].ids);
        }
    free(h->boxes);
    for (int m = 0; m < h->nmodels; m++) free(h->models[m].picked);
    free(h->models);
    if (h->ep >= 0 || h->wake >= 0) { /* never started */ }
    Py_TYPE(h)->tp_free((PyObject *)h);
}

#define CHECK_OPEN(h)                                                         \
    if (!(h)->started || (h)->closing) {                                      \
        pthread_mutex_unlock(&(h)->mu);                                       \
        PyErr_SetString(PyExc_RuntimeError, "the hub is closed");            \
        return NULL;                                                          \
    }

/* A model's id is never reused: a caller that read a dropped model's id just before it
 * was dropped must find it dropped (RETRY), not another model's lanes. */
static PyObject *hub_add_model(Hub *h, PyObject *args, PyObject *kw) {
    static char *names[] = {"max_rows", "delay_us", "preferred", NULL};
    int max_rows = 0;
    long long delay_us = 0;
    PyObject *preferred = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|iLO:add_model", names, &max_rows, &delay_us, &preferred)) return NULL;
    int pref[16], npref = 0;
    if (preferred && preferred != Py_None) {
        PyObject *seq = PySequence_Fast(preferred, "preferred must be a sequence of sizes");
        if (!seq) return NULL;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && npref < 16; i++) {
            long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if (v == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
            if (v > 0 && v <= max_rows) pref[npref++] = (int)v;
        }
        Py_DECREF(seq);
    }
    for (int i = 1; i < npref; i++) /* (largest first) */
        for (int j = i; j > 0 && pref[j] > pref[j - 1]; j--) { int x = pref[j]; pref[j] = pref[j - 1]; pref[j - 1] = x; }
    if (max_rows < 0 || max_rows > MAX_BATCH || delay_us < 0) {
        PyErr_Format(PyExc_ValueError, "add_model: max_rows must be in [0, %d] and delay_us >= 0", MAX_BATCH);
        return NULL;
    }
    Ticket **picked = NULL;
    if (max_rows && !(picked = malloc(sizeof(Ticket *) * (size_t)max_rows))) return PyErr_NoMemory();
    pthread_mutex_lock(&h->mu);
    if (!h->started || h->closing) {
        pthread_mutex_unlock(&h->mu);
        free(picked);
        PyErr_SetString(PyExc_RuntimeError, "the hub is closed");
        return NULL;
    }
    Model *grown = realloc(h->models, sizeof(Model) * (size_t)(h->nmodels + 1));
    if (!grown) {
        pthread_mutex_unlock(&h->mu);
        free(picked);
        return PyErr_NoMemory();
    }
    h->models = grown;
    int mid = h->nmodels++;
    Model *m = &h->models[mid];
    memset(m, 0, sizeof(Model));
    m->used = 1;
    m->max_rows = max_rows;
    m->delay_ns = (int64_t)delay_us * 1000;
    m->npref = npref;
    memcpy(m->pref, pref, sizeof pref);
    m->picked = picked;
    pthread_mutex_unlock(&h->mu);
    return PyLong_FromLong(mid);
}

static int valid_model(Hub *h, int mid) {
    if (mid < 0 || mid >= h->nmodels || !h->models[mid].used) {
        PyErr_Format(PyExc_ValueError, "no model %d in this hub", mid);
        return 0;
    }
    return 1;
}

static int find_lane(Hub *h, uint64_t key) {
    for (int i = 0; i < h->nlanes; i++)
        if (h->lanes[i].used && h->lanes[i].key == key) return i;
    return -1;
}

/* The slot of lane ``key`` (mutex held), or -1 with ValueError set. */
static int lane_of(Hub *h, uint64_t key) {
    int li = find_lane(h, key);
    if (li < 0) PyErr_Format(PyExc_ValueError, "no lane %llu in this hub", (unsigned long long)key);
    return li;
}

static int key_arg(PyObject *arg, uint64_t *key) {
    *key = PyLong_AsUnsignedLongLong(arg);
    return !(*key == (uint64_t)-1 && PyErr_Occurred());
}

static PyObject *hub_drop_model(Hub *h, PyObject *arg) {
    int mid = (int)PyLong_AsLong(arg);
    if (mid == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&h->mu);
    CHECK_OPEN(h);
    if (!valid_model(h, mid)) { pthread_mutex_unlock(&h->mu); return NULL; }
    for (int i = 0; i < h->nlanes; i++)
        if (h->lanes[i].used && h->lanes[i].mid == mid) h->lanes[i].enabled = 0;
    fail_queue(h, &h->models[mid], T_RETRY);
    h->models[mid].used = 0;
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

/* add_lane(mid, fd, limit, key): the hub owns fd from now on (closed on any error too). */
static PyObject *hub_add_lane(Hub *h, PyObject *args) {
    int mid, fd, limit;
    unsigned long long key;
    if (!PyArg_ParseTuple(args, "iiiK:add_lane", &mid, &fd, &limit, &key)) return NULL;
    if (limit < 1 || limit > MAX_LIMIT) {
        close(fd);
        PyErr_Format(PyExc_ValueError, "a lane's limit must be in [1, %d], got %d", MAX_LIMIT, limit);
        return NULL;
    }
    pthread_mutex_lock(&h->mu);
    if (!h->started || h->closing || !valid_model(h, mid) || key == 0 || find_lane(h, key) >= 0) {
        pthread_mutex_unlock(&h->mu);
        close(fd);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "the hub is closed, or lane key %llu is 0 or taken", key);
        return NULL;
    }
    int li = -1;
    for (int i = 0; i < h->nlanes; i++)
        if (!h->lanes[i].used) { li = i; break; }
    if (li < 0) {
        if (h->nlanes == MAX_LANES) {
            pthread_mutex_unlock(&h->mu);
            close(fd);
            PyErr_SetString(PyExc_RuntimeError, "too many lanes");
            return NULL;
        }
        li = h->nlanes++;
    }
    Lane *l = &h->lanes[li];
    memset(l, 0, sizeof *l);
    int per_send = h->models[mid].max_rows ? h->models[mid].max_rows : 1; /* (a request has a row at least) */
    l->cap = limit * per_send;
    l->ids = malloc(sizeof(uint64_t) * (size_t)l->cap);
    l->tickets = malloc(sizeof(Ticket *) * (size_t)l->cap);
    l->sends = malloc(sizeof(uint64_t) * (size_t)l->cap);
    if (!l->ids || !l->tickets || !l->sends) {
        lane_free(l);
        if (li == h->nlanes - 1) h->nlanes--;
        pthread_mutex_unlock(&h->mu);
        close(fd);
        return PyErr_NoMemory();
    }
    l->fd = fd;
    l->key = key;
    l->mid = mid;
    l->limit = limit;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)li};
    if (epoll_ctl(h->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        int err = errno;
        close(fd); /* (it was handed over: nobody else closes it) */
        l->fd = -1;
        lane_free(l);
        if (li == h->nlanes - 1) h->nlanes--;
        pthread_mutex_unlock(&h->mu);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    l->used = l->alive = l->enabled = 1;
    refill(h, li);
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

/* Lock the hub and find the lane whose key is ``arg``; -1 (unlocked, with an exception
 * set) if it is closed or has no such lane. */
static int locked_lane(Hub *h, PyObject *arg) {
    uint64_t key;
    if (!key_arg(arg, &key)) return -1;
    pthread_mutex_lock(&h->mu);
    if (!h->started || h->closing) {
        pthread_mutex_unlock(&h->mu);
        PyErr_SetString(PyExc_RuntimeError, "the hub is closed");
        return -1;
    }
    int li = lane_of(h, key);
    if (li < 0) pthread_mutex_unlock(&h->mu);
    return li;
}

/* Stop sending new requests to the lane (those in flight still complete). */
static PyObject *hub_pause_lane(Hub *h, PyObject *arg) {
    int li = locked_lane(h, arg);
    if (li < 0) return NULL;
    Lane *l = &h->lanes[li];
    l->enabled = 0;
    if (h->models[l->mid].used && !model_has_lane(h, l->mid)) fail_queue(h, &h->models[l->mid], T_RETRY);
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

/* Forget the lane: close it; what it still holds fails with LOST. */
static PyObject *hub_remove_lane(Hub *h, PyObject *arg) {
    int li = locked_lane(h, arg);
    if (li < 0) return NULL;
    lane_lost(h, li);
    Lane *l = &h->lanes[li];
    lane_free(l);
    l->used = 0;
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

static PyObject *hub_release(Hub *h, PyObject *args) {
    unsigned long long key, offset;
    if (!PyArg_ParseTuple(args, "KK:release", &key, &offset)) return NULL;
    pthread_mutex_lock(&h->mu);
    int li = h->closing ? -1 : find_lane(h, key);
    if (li < 0 || !h->lanes[li].alive) {
        pthread_mutex_unlock(&h->mu); /* (its worker is gone: nothing to give back) */
        Py_RETURN_NONE;
    }
    Lane *l = &h->lanes[li];
    if (l->nrel == l->caprel) {
        size_t cap = l->caprel ? 2 * l->caprel : 64;
        uint64_t *grown = realloc(l->releases, cap * sizeof(uint64_t));
        if (!grown) {
            pthread_mutex_unlock(&h->mu);
            return PyErr_NoMemory();
        }
        l->releases = grown;
        l->caprel = cap;
    }
    l->releases[l->nrel++] = offset;
    /* an idle lane gets them now: no request may come to carry them */
    if (l->count == 0 && l->nrel >= 64) flush_releases(l);
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

/* Send ticket t to its model's least-busy lane, or queue it (a batching model's always
 * joins its queue) (mutex held). Returns 1, or 0 when the model has no lane to take it
 * (the router serves it: t is untouched). */
static int place(Hub *h, Ticket *t) {
    int mid = t->mid;
    if (h->closing || mid < 0 || mid >= h->nmodels || !h->models[mid].used || !model_has_lane(h, mid)) return 0;
    Model *m = &h->models[mid];
    __atomic_add_fetch(&t->refs, 1, __ATOMIC_ACQ_REL); /* the hub's */
    int li = m->max_rows ? -1 : free_lane(h, mid, MAX_LIMIT);
    if (li >= 0) {
        lane_send(h, li, t);
        return 1;
    }
    t->enq_ns = mono_ns();
    __atomic_store_n(&t->state, T_QUEUED, __ATOMIC_RELEASE);
    if (m->tail) m->tail->next = t;
    else m->head = t;
    m->tail = t;
    m->queued++;
    h->queued++;
    if (m->max_rows) dispatch(h, mid); /* (dynamic batching: every request joins the queue, which leaves in batches) */
    return 1;
}

/* A ticket for request ``id`` of model ``mid`` (its datagram copied), not placed yet. */
static TicketObject *new_ticket(Hub *h, PyObject *args, const char *format) {
    int mid, box = -1;
    unsigned int rows = 1;
    unsigned long long id, bkey = 0;
    Py_buffer header;
    if (!PyArg_ParseTuple(args, format, &mid, &id, &header, &box, &rows, &bkey)) return NULL;
    if (box >= 0 && (box >= h->nboxes || !h->boxes[box].used)) {
        PyBuffer_Release(&header);
        PyErr_Format(PyExc_ValueError, "no mailbox %d in this hub", box);
        return NULL;
    }
    if (header.len > MAX_REQUEST) {
        PyBuffer_Release(&header);
        PyErr_Format(PyExc_ValueError, "a request of %zd bytes does not fit a lane (at most %d)", header.len,
                     MAX_REQUEST);
        return NULL;
    }
    Ticket *t = calloc(1, sizeof(Ticket));
    TicketObject *obj = t ? PyObject_New(TicketObject, &TicketType) : NULL;
    char *data = obj ? malloc(header.len ? (size_t)header.len : 1) : NULL;
    if (!data) {
        PyBuffer_Release(&header);
        free(t);
        if (obj) {
            obj->t = NULL;
            obj->hub = NULL;
            Py_DECREF(obj);
        }
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(data, header.buf, (size_t)header.len);
    t->data = data;
    t->len = (size_t)header.len;
    PyBuffer_Release(&header);
    t->refs = 1;
    t->id = id;
    t->mid = mid;
    t->box = box;
    t->rows = rows ? rows : 1;
    t->bkey = bkey;
    obj->t = t;
    obj->hub = Py_NewRef((PyObject *)h);
    return obj;
}

/* request(mid, id, header) -> Ticket: placed by its first wait(), without the GIL. */
static PyObject *hub_request(Hub *h, PyObject *args) {
    return (PyObject *)new_ticket(h, args, "iKy*|iIK:request");
}

/* submit(mid, id, header) -> Ticket placed now, or None if the model has no lane. */
static PyObject *hub_submit(Hub *h, PyObject *args) {
    TicketObject *obj = new_ticket(h, args, "iKy*|iIK:submit");
    if (!obj) return NULL;
    pthread_mutex_lock(&h->mu);
    gate_back(h);
    int placed = place(h, obj->t);
    pthread_mutex_unlock(&h->mu);
    if (!placed) {
        Py_DECREF(obj);
        Py_RETURN_NONE;
    }
    return (PyObject *)obj;
}

static PyObject *hub_pending(Hub *h, PyObject *noargs) {
    pthread_mutex_lock(&h->mu);
    Py_ssize_t n = h->inflight + h->queued + __atomic_load_n(&h->unread, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&h->mu);
    return PyLong_FromSsize_t(n);
}

/* counts(key) -> (requests in flight on the lane, replies read from it); (0, 0): no lane. */
static PyObject *hub_counts(Hub *h, PyObject *arg) {
    uint64_t key;
    if (!key_arg(arg, &key)) return NULL;
    pthread_mutex_lock(&h->mu);
    int li = find_lane(h, key);
    long inflight = li >= 0 ? h->lanes[li].count : 0;
    unsigned long long served = li >= 0 ? h->lanes[li].served : 0;
    pthread_mutex_unlock(&h->mu);
    return Py_BuildValue("(lK)", inflight, served);
}

/* queued(mid) -> requests of model mid waiting in the hub, not sent yet (0: no such model). */
static PyObject *hub_queued(Hub *h, PyObject *arg) {
    long mid = PyLong_AsLong(arg);
    if (mid == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&h->mu);
    Py_ssize_t n = mid >= 0 && mid < h->nmodels && h->models[mid].used ? h->models[mid].queued : 0;
    pthread_mutex_unlock(&h->mu);
    return PyLong_FromSsize_t(n);
}

/* Complete a ticket with a reply that came another way (over ZeroMQ: an error, or
 * outputs with data frames); False if the lane holds no such request. */
static PyObject *hub_complete(Hub *h, PyObject *args) {
    unsigned long long key, id;
    Py_buffer reply;
    if (!PyArg_ParseTuple(args, "KKy*:complete", &key, &id, &reply)) return NULL;
    int found = 0;
    pthread_mutex_lock(&h->mu);
    int li = h->closing ? -1 : find_lane(h, key);
    if (li >= 0) {
        Lane *l = &h->lanes[li];
        for (int i = 0; i < l->count; i++)
            if (l->ids[i] == id) { found = 1; break; }
        if (found) {
            on_reply(h, li, reply.buf, (size_t)reply.len);
            refill(h, li);
        }
    }
    pthread_mutex_unlock(&h->mu);
    PyBuffer_Release(&reply);
    return PyBool_FromLong(found);
}

static PyObject *hub_orphans(Hub *h, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    pthread_mutex_lock(&h->mu);
    Orphan *o = h->orphans;
    h->orphans = NULL;
    h->norphans = 0;
    pthread_mutex_unlock(&h->mu);
    while (o) {
        Orphan *next = o->next;
        PyObject *item = Py_BuildValue("(Ky#)", (unsigned long long)o->key, o->data, (Py_ssize_t)o->len);
        if (item) {
            PyList_Append(out, item);
            Py_DECREF(item);
        }
        free(o->data);
        free(o);
        o = next;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *hub_add_mailbox(Hub *h, PyObject *noargs) {
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&h->mu);
    int b = -1;
    for (int i = 0; i < h->nboxes; i++)
        if (!h->boxes[i].used) { b = i; break; }
    if (b < 0) {
        Mailbox *grown = realloc(h->boxes, sizeof(Mailbox) * (size_t)(h->nboxes + 1));
        if (!grown) {
            pthread_mutex_unlock(&h->mu);
            close(fd);
            return PyErr_NoMemory();
        }
        h->boxes = grown;
        b = h->nboxes++;
    }
    memset(&h->boxes[b], 0, sizeof(Mailbox));
    h->boxes[b].used = 1;
    h->boxes[b].fd = fd;
    pthread_mutex_unlock(&h->mu);
    return Py_BuildValue("(ii)", b, fd);
}

/* Lock the hub and find mailbox ``arg``; NULL (unlocked, with an exception set) if none. */
static Mailbox *locked_box(Hub *h, PyObject *arg) {
    int b = (int)PyLong_AsLong(arg);
    if (b == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&h->mu);
    if (b < 0 || b >= h->nboxes || !h->boxes[b].used) {
        pthread_mutex_unlock(&h->mu);
        PyErr_Format(PyExc_ValueError, "no mailbox %d in this hub", b);
        return NULL;
    }
    return &h->boxes[b];
}

/* drain(box) -> the ids of its tickets finished since the last drain. */
static PyObject *hub_drain(Hub *h, PyObject *arg) {
    Mailbox *box = locked_box(h, arg);
    if (!box) return NULL;
    uint64_t v;
    if (read(box->fd, &v, sizeof v) < 0) { /* (not readable: nothing was posted) */ }
    size_t n = box->n;
    uint64_t *ids = box->ids;
    box->ids = NULL;
    box->n = box->cap = 0;
    pthread_mutex_unlock(&h->mu);
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out && i < n; i++) {
        PyObject *item = PyLong_FromUnsignedLongLong(ids[i]);
        if (!item) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    free(ids);
    return out;
}

/* remove_mailbox(box): close its eventfd (works after close() too). */
static PyObject *hub_remove_mailbox(Hub *h, PyObject *arg) {
    Mailbox *box = locked_box(h, arg);
    if (!box) return NULL;
    close(box->fd);
    free(box->ids);
    memset(box, 0, sizeof *box);
    pthread_mutex_unlock(&h->mu);
    Py_RETURN_NONE;
}

static PyObject *hub_close(Hub *h, PyObject *noargs) {
    hub_stop(h);
    Py_RETURN_NONE;
}

static PyObject *hub_get_orphaned(Hub *h, void *closure) { return PyLong_FromSsize_t(h->norphans); }

static PyObject *hub_get_gate(Hub *h, void *closure) {
    pthread_mutex_lock(&h->mu);
    Py_ssize_t held = 0; /* (callers that took their replies themselves stay listed until the gate comes to them) */
    for (Ticket *t = h->held_head; t; t = t->gnext) held += __atomic_load_n(&t->state, __ATOMIC_ACQUIRE) == T_HELD;
    PyObject *r = Py_BuildValue("{s:n,s:l,s:l,s:l,s:l,s:O}", "held", held, "granted", h->granted, "given_back",
                                h->given_back, "lapsed", h->lapsed, "offs", h->offs, "on",
                                h->awake_max && h->gate_on ? Py_True : Py_False);
    pthread_mutex_unlock(&h->mu);
    return r;
}

static PyMethodDef hub_methods[] = {
    {"add_model", (PyCFunction)(void (*)(void))hub_add_model, METH_VARARGS | METH_KEYWORDS,
     "add_model(max_rows=0, delay_us=0, preferred=()) -> model id; with max_rows, dynamic batching"},
    {"drop_model", (PyCFunction)hub_drop_model, METH_O, "drop_model(mid): its queued requests fail with RETRY"},
    {"add_lane", (PyCFunction)hub_add_lane, METH_VARARGS, "add_lane(mid, fd, limit, key): serve model mid on socket fd (the hub owns it)"},
    {"pause_lane", (PyCFunction)hub_pause_lane, METH_O, "pause_lane(lane): send it nothing new"},
    {"remove_lane", (PyCFunction)hub_remove_lane, METH_O, "remove_lane(lane): close it; what it holds is LOST"},
    {"release", (PyCFunction)hub_release, METH_VARARGS, "release(lane, offset): a response slot to give back"},
    {"submit", (PyCFunction)hub_submit, METH_VARARGS,
     "submit(mid, id, header, box=-1) -> Ticket, or None (no lane); with a mailbox, its id is listed there when "
     "it finishes (instead of waking a waiter)"},
    {"request", (PyCFunction)hub_request, METH_VARARGS,
     "request(mid, id, header) -> Ticket, placed by its first wait() (RETRY: no lane)"},
    {"complete", (PyCFunction)hub_complete, METH_VARARGS, "complete(lane, id, reply) -> whether it was held"},
    {"pending", (PyCFunction)hub_pending, METH_NOARGS, "requests queued, in flight, or finished and not read by their callers yet"},
    {"counts", (PyCFunction)hub_counts, METH_O, "counts(key) -> (requests in flight on the lane, replies read)"},
    {"queued", (PyCFunction)hub_queued, METH_O, "queued(mid) -> requests of the model waiting in the hub, not sent yet"},
    {"orphans", (PyCFunction)hub_orphans, METH_NOARGS, "replies nobody waited for: [(lane key, bytes)]"},
    {"close", (PyCFunction)hub_close, METH_NOARGS, "fail everything with CLOSED; stop the thread"},
    {"add_mailbox", (PyCFunction)hub_add_mailbox, METH_NOARGS,
     "add_mailbox() -> (box, eventfd): tickets submitted with it are listed there when they finish"},
    {"drain", (PyCFunction)hub_drain, METH_O, "drain(box) -> ids of its tickets finished since the last drain"},
    {"remove_mailbox", (PyCFunction)hub_remove_mailbox, METH_O, "remove_mailbox(box): close its eventfd"},
    {NULL},
};

static PyObject *hub_get_thread_id(Hub *h, void *closure) {
    return PyLong_FromUnsignedLong(__atomic_load_n(&h->tid, __ATOMIC_ACQUIRE));
}

static PyGetSetDef hub_getset[] = {
    {"orphaned", (getter)hub_get_orphaned, NULL, "replies waiting in orphans()", NULL},
    {"thread_id", (getter)hub_get_thread_id, NULL, "its thread's id (a native_id: os.sched_setaffinity takes it)", NULL},
    {"gate", (getter)hub_get_gate, NULL,
     "the wake-up gate: {held: wakes it holds, granted, given_back, lapsed, offs: times it turned off, on}", NULL},
    {NULL},
};

static PyTypeObject HubType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "libtorchrt.transport._lanes.Hub",
    .tp_basicsize = sizeof(Hub),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hub_init,
    .tp_dealloc = (destructor)hub_dealloc,
    .tp_methods = hub_methods,
    .tp_getset = hub_getset,
};

/* ── Ticket (Python type) ────────────────────────────────────────────────────── */

/* The caller stops waiting for ticket o (see ticketobj_abandon). */
static int ticket_abandon(TicketObject *o) {
    Ticket *t = o->t;
    Hub *h = (Hub *)o->hub;
    int how = 0;
    pthread_mutex_lock(&h->mu);
    uint32_t s = __atomic_load_n(&t->state, __ATOMIC_ACQUIRE);
    if (s == 0) { /* never placed */
        free(t->data);
        t->data = NULL;
        t->len = 0;
        __atomic_store_n(&t->state, T_RETRY, __ATOMIC_RELEASE);
        how = 1;
    } else if (s == T_QUEUED) {
        Model *m = &h->models[t->mid];
        Ticket **p = &m->head, *prev = NULL;
        while (*p && *p != t) { prev = *p; p = &(*p)->next; }
        if (*p) {
            *p = t->next;
            if (m->tail == t) m->tail = prev;
            t->next = NULL;
            m->queued--;
            h->queued--;
            free(t->data);
            t->data = NULL;
            t->len = 0;
            __atomic_store_n(&t->state, T_RETRY, __ATOMIC_RELEASE);
            ticket_unref(t); /* the queue's */
            how = 1;
        }
    } else if (s == T_SENT) {
        __atomic_store_n(&t->abandoned, 1, __ATOMIC_RELEASE);
        how = 2;
    }
    pthread_mutex_unlock(&h->mu);
    return how;
}

/* Ticket o's caller has read how it ended: it is no longer pending (no mutex: this is
 * every request's path, and the flag is set before the state its caller saw). */
static void ticket_read(TicketObject *o) {
    if (__atomic_exchange_n(&o->t->unread, 0, __ATOMIC_ACQ_REL))
        __atomic_sub_fetch(&((Hub *)o->hub)->unread, 1, __ATOMIC_ACQ_REL);
}

static void ticketobj_dealloc(TicketObject *o) {
    if (o->t) {
        uint32_t held = T_HELD; /* (nobody to wake: the gate skips it) */
        __atomic_compare_exchange_n(&o->t->state, &held, T_DONE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        if (o->hub && __atomic_load_n(&o->t->state, __ATOMIC_ACQUIRE) < T_DONE) ticket_abandon(o);
        else if (o->hub) ticket_read(o); /* (finished, never read: nobody will) */
        ticket_unref(o->t);
    }
    Py_XDECREF(o->hub);
    PyObject_Free(o);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Busy polling: a thread that sleeps on its ticket's futex wakes up slowly when the
 * hub's thread wakes it. With spin_us, a caller whose request is the only one in flight
 * (nothing queued either) looks at its ticket instead, up to spin_ns or ``until`` (now_s
 * time; -1: none), or until another request is sent, before it sleeps; the pool then runs
 * one request at a time, which leaves CPUs to spare. One caller polls at a time, so
 * callers never spin side by side.
 * Returns 1 if it polled (its state may have changed). (GIL let go) */
static int poll_ticket(Hub *h, Ticket *t, uint32_t s, double until) {
    if (h->spin_ns <= 0 || __atomic_load_n(&h->inflight, __ATOMIC_RELAXED) > 1 ||
        __atomic_load_n(&h->queued, __ATOMIC_RELAXED) > 0)
        return 0;
    int none = 0;
    if (!__atomic_compare_exchange_n(&h->polling, &none, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) return 0;
    int64_t stop = mono_ns() + h->spin_ns;
    if (until >= 0 && (int64_t)(until * 1e9) < stop) stop = (int64_t)(until * 1e9);
    while (__atomic_load_n(&t->state, __ATOMIC_ACQUIRE) == s && mono_ns() < stop &&
           __atomic_load_n(&h->inflight, __ATOMIC_RELAXED) <= 1)
        CPU_RELAX();
    __atomic_store_n(&h->polling, 0, __ATOMIC_RELEASE);
    return 1;
}

/* wait(timeout=None) -> (state, lane key, reply bytes or None); state 0: not finished
 * within ``timeout`` seconds (then abandon() it, or wait again). Releases the GIL while
 * it waits, and looks at signals every 100 ms (raising their exception: then abandon it). */
static PyObject *ticketobj_wait(TicketObject *o, PyObject *args) {
    Ticket *t = o->t;
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTuple(args, "|O:wait", &timeout)) return NULL;
    double until = -1;
    if (timeout != Py_None) {
        double seconds = PyFloat_AsDouble(timeout);
        if (seconds == -1 && PyErr_Occurred()) return NULL;
        until = now_s() + (seconds > 0 ? seconds : 0);
    }
    uint32_t s;
    int slept = 0, polled = 0, own = 0; /* (own: it took its reply from the gate, awake: no grant) */
    for (;;) {
        int expired = 0;
        Py_BEGIN_ALLOW_THREADS
        if (__atomic_load_n(&t->state, __ATOMIC_ACQUIRE) == 0) { /* (from request(): not placed yet) */
            Hub *h = (Hub *)o->hub;
            pthread_mutex_lock(&h->mu);
            gate_back(h);
            if (!place(h, t)) {
                free(t->data);
                t->data = NULL;
                t->len = 0;
                __atomic_store_n(&t->state, T_RETRY, __ATOMIC_RELEASE);
            }
            pthread_mutex_unlock(&h->mu);
        }
        for (;;) {
            s = __atomic_load_n(&t->state, __ATOMIC_ACQUIRE);
            if (s == T_HELD && !slept) { /* (awake already: waiting for a grant would not spare the GIL) */
                if (__atomic_compare_exchange_n(&t->state, &s, T_DONE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                    s = T_DONE;
                    own = 1;
                }
            }
            if (s >= T_DONE && s != T_HELD) break;
            double left = 0.1;
            if (until >= 0) {
                left = until - now_s();
                if (left <= 0) { expired = 1; break; }
                if (left > 0.1) left = 0.1;
            }
            if (!polled) {
                polled = 1;
                if (poll_ticket((Hub *)o->hub, t, s, until)) continue;
            }
            struct timespec tick = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
            long r = syscall(SYS_futex, &t->state, FUTEX_WAIT_PRIVATE, s, &tick, NULL, 0);
            slept = 1;
            if (r < 0 && (errno == ETIMEDOUT || errno == EINTR) && !(until >= 0 && left < 0.1)) break;
        }
        if (expired && s == T_HELD &&
            __atomic_compare_exchange_n(&t->state, &s, T_DONE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            s = T_DONE; /* (its timeout ran out while the gate held it: it takes its reply) */
            own = 1;
        }
        Py_END_ALLOW_THREADS
        if (s >= T_DONE && s != T_HELD) break;
        if (expired) return Py_BuildValue("(iKO)", 0, 0ULL, Py_None);
        if (PyErr_CheckSignals() < 0) return NULL; /* (KeyboardInterrupt: the caller abandons it) */
    }
    if (__atomic_exchange_n(&t->gate, G_TAKEN, __ATOMIC_ACQ_REL) == G_WOKEN && !own) {
        held_grant = t->grant; /* (given back with this thread's next request) */
        held_hub = (Hub *)o->hub;
    }
    ticket_read(o);
    PyObject *data;
    if (t->data) {
        data = PyBytes_FromStringAndSize(t->data, (Py_ssize_t)t->len);
        free(t->data);
        t->data = NULL;
        t->len = 0;
        if (!data) return NULL;
    } else {
        data = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(iKN)", (int)s, (unsigned long long)t->key, data);
}

static PyObject *ticketobj_abandon(TicketObject *o, PyObject *noargs) {
    return PyLong_FromLong(ticket_abandon(o));
}

static PyMethodDef ticket_methods[] = {
    {"wait", (PyCFunction)ticketobj_wait, METH_VARARGS, "wait(timeout=None) -> (state, lane key, reply or None)"},
    {"abandon", (PyCFunction)ticketobj_abandon, METH_NOARGS,
     "stop waiting: 1 if it was still queued (taken out: it never ran), 2 if it was sent (its reply will be an "
     "orphan), 0 if it has finished (wait() returns at once)"},
    {NULL},
};

static PyTypeObject TicketType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "libtorchrt.transport._lanes.Ticket",
    .tp_basicsize = sizeof(TicketObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)ticketobj_dealloc,
    .tp_methods = ticket_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "libtorchrt.transport._lanes", "The front's native fast lane (see lanes.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__lanes(void) {
    if (PyType_Ready(&HubType) < 0 || PyType_Ready(&TicketType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&HubType);
    PyModule_AddObject(m, "Hub", (PyObject *)&HubType);
    Py_INCREF(&TicketType);
    PyModule_AddObject(m, "Ticket", (PyObject *)&TicketType);
    PyModule_AddIntConstant(m, "DONE", T_DONE);
    PyModule_AddIntConstant(m, "LOST", T_LOST);
    PyModule_AddIntConstant(m, "RETRY", T_RETRY);
    PyModule_AddIntConstant(m, "CLOSED", T_CLOSED);
    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM);
    PyModule_AddIntConstant(m, "MAX_REQUEST", MAX_REQUEST);
    PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH);
    PyModule_AddIntConstant(m, "MAX_LIMIT", MAX_LIMIT);
    PyModule_AddIntConstant(m, "MAX_AWAKE", MAX_AWAKE);
    PyModule_AddIntConstant(m, "MAX_SPIN_US", (long)MAX_SPIN_US);
    return m;
}
