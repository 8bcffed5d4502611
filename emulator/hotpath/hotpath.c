/*
 * The vfio-user server's hot path: guest accesses to the shared-memory BAR and queue kicks.
 *
 * One struct hp_conn per server. hp_drain() owns the receive side of the client socket: it
 * reads with recvmsg(MSG_DONTWAIT) into its own buffer (attaching SCM_RIGHTS fds to messages
 * by the kernel's rule, as emulator/vfio_user/codec.py does), serves every complete message it
 * can, batches the replies, and stops at the first message it cannot serve: that one is handed
 * to Python unchanged (struct hp_cold) after the replies before it are sent, so the order of
 * replies is the order of requests. A message is served here only if Python would have served
 * it the same way without a word in its log; every refusal and every error reply is Python's.
 *
 * Shared memory needs no table here: the BAR is one address-space reservation, so BAR offset X
 * is host address base + X. Mapped pages hold the back-end's file, everything else is
 * PROT_NONE. Copies go through process_vm_readv/writev on our own pid, page by page after a
 * short count, exactly as emulator/shmem/vmcopy.py: a page that faults (unmapped, past the
 * file's end, read-only for a write) reads as zeros or drops the write, and nothing here ever
 * loads or stores a mapped page itself, so nothing can raise SIGBUS. Python changes mappings
 * only on this same thread, between two hp_drain() calls.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hotpath.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vfio-user is little-endian; this file copies wire structs as they are"
#endif

/* -- the wire formats (vfio-user spec; QEMU 11.1's names in comments) ------------------- */

enum vfio_user_command {
    VFIO_USER_REGION_READ = 9,
    VFIO_USER_REGION_WRITE = 10,
    VFIO_USER_REGION_WRITE_MULTI = 15,
};

enum {
    VFIO_USER_REQUEST = 0x0,
    VFIO_USER_REPLY = 0x1,
    VFIO_USER_NO_REPLY = 0x10,
};

struct vfio_user_header {
    uint16_t msg_id;
    uint16_t command;
    uint32_t msg_size;
    uint32_t flags;
    uint32_t error_no;
};

/* REGION_READ/WRITE payload head; the data follows. */
struct vfio_user_region_access {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
};

/* One write of REGION_WRITE_MULTI (VFIOUserWROne). */
#define VFIO_USER_MULTI_DATA 8
#define VFIO_USER_MULTI_MAX 200
struct vfio_user_wr_one {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
    uint8_t data[VFIO_USER_MULTI_DATA];
};

struct vfio_user_wr_multi {
    uint64_t wr_cnt;
};

#define HDR_SIZE sizeof(struct vfio_user_header)
#define ACCESS_SIZE (HDR_SIZE + sizeof(struct vfio_user_region_access))
#define MULTI_HEAD (HDR_SIZE + sizeof(struct vfio_user_wr_multi))

/* -- state ---------------------------------------------------------------------------------- */

#define PAGE_SIZE_4K 4096u
#define RECV_SLACK (64u << 10)   /* free space kept behind a partial message */
#define MAX_RECORDS 1024u
#define MAX_DROPS 512u
#define LOG_HEADROOM 256u        /* one message never logs more (a multi: 202 records) */

struct fd_entry {
    uint64_t last; /* stream offset of the last byte of the chunk it came with */
    int fd;
};

struct hp_conn {
    int sock;
    pid_t pid;
    int negotiated;
    int observed;
    uint32_t max_xfer;
    uint32_t max_msg;
    uint32_t max_fds;

    int has_shm;
    uint32_t shm_region;
    uintptr_t shm_base;
    uint64_t shm_size;
    uint64_t shm_max;

    int has_notify;
    uint32_t nt_region;
    uint64_t nt_offset;
    uint32_t nt_mult;
    uint32_t nt_queues;
    int *kick_fds; /* borrowed; -1: not armed */

    uint8_t *in;
    size_t in_cap, head, tail;
    uint64_t in_base; /* stream offset of in[0] */
    size_t cold_consume;

    struct fd_entry *fds;
    size_t nfds, fds_cap;

    uint8_t *out;
    size_t out_cap, out_len;

    struct hp_cold cold;
    int *cold_fds;
    size_t cold_fds_cap;

    int err;
    int dirty;
    uint64_t counts[HP_NCOUNTS];
    struct hp_record records[MAX_RECORDS];
    uint32_t nrecords;
    struct hp_drop drops[MAX_DROPS];
    uint32_t ndrops;
};

/* -- set-up, all from Python's thread ------------------------------------------------------- */

struct hp_conn *hp_new(uint32_t max_msg_size, uint32_t max_fds)
{
    struct hp_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->sock = -1;
    c->max_msg = max_msg_size;
    c->max_fds = max_fds;
    c->in_cap = (size_t)max_msg_size + RECV_SLACK;
    c->out_cap = (size_t)max_msg_size + RECV_SLACK;
    c->in = malloc(c->in_cap);
    c->out = malloc(c->out_cap);
    if (!c->in || !c->out) {
        hp_free(c);
        return NULL;
    }
    return c;
}

static void close_buffered_fds(struct hp_conn *c)
{
    for (size_t i = 0; i < c->nfds; i++)
        close(c->fds[i].fd);
    c->nfds = 0;
}

void hp_free(struct hp_conn *c)
{
    if (!c)
        return;
    close_buffered_fds(c);
    free(c->in);
    free(c->out);
    free(c->fds);
    free(c->cold_fds);
    free(c->kick_fds);
    free(c);
}

void hp_attach(struct hp_conn *c, int sockfd)
{
    hp_detach(c);
    c->sock = sockfd;
    c->pid = getpid();
}

void hp_detach(struct hp_conn *c)
{
    close_buffered_fds(c);
    c->sock = -1;
    c->negotiated = 0;
    c->head = c->tail = 0;
    c->in_base = 0;
    c->cold_consume = 0;
    c->out_len = 0;
    c->cold.len = 0;
    c->cold.nfds = 0;
}

void hp_set_negotiated(struct hp_conn *c, int negotiated, uint32_t max_data_xfer)
{
    c->negotiated = negotiated;
    c->max_xfer = max_data_xfer;
}

void hp_set_observed(struct hp_conn *c, int observed)
{
    c->observed = observed;
}

void hp_set_shmem(struct hp_conn *c, uint32_t region, uintptr_t base, uint64_t size,
                  uint64_t max_access)
{
    c->has_shm = 1;
    c->shm_region = region;
    c->shm_base = base;
    c->shm_size = size;
    c->shm_max = max_access;
}

void hp_clear_shmem(struct hp_conn *c)
{
    c->has_shm = 0;
}

void hp_set_notify(struct hp_conn *c, uint32_t region, uint64_t offset, uint32_t multiplier,
                   uint32_t num_queues)
{
    c->has_notify = 0; /* until it is all set: meanwhile every kick stays Python's */
    if (!multiplier)
        return;
    int *fds = realloc(c->kick_fds, (num_queues ? num_queues : 1) * sizeof(int));
    if (!fds)
        return;
    c->kick_fds = fds;
    for (uint32_t q = 0; q < num_queues; q++)
        fds[q] = -1;
    c->has_notify = 1;
    c->nt_region = region;
    c->nt_offset = offset;
    c->nt_mult = multiplier;
    c->nt_queues = num_queues;
}

void hp_arm_kick(struct hp_conn *c, uint32_t queue, int eventfd)
{
    if (c->has_notify && queue < c->nt_queues)
        c->kick_fds[queue] = eventfd;
}

void hp_disarm_kicks(struct hp_conn *c)
{
    for (uint32_t q = 0; c->has_notify && q < c->nt_queues; q++)
        c->kick_fds[q] = -1;
}

int hp_errno(struct hp_conn *c) { return c->err; }
struct hp_cold *hp_cold_message(struct hp_conn *c) { return &c->cold; }
int hp_pending(struct hp_conn *c)
{
    return (c->dirty ? HP_PENDING_COUNTS : 0) | (c->nrecords ? HP_PENDING_RECORDS : 0) |
           (c->ndrops ? HP_PENDING_DROPS : 0);
}

void hp_take_counts(struct hp_conn *c, uint64_t *out)
{
    memcpy(out, c->counts, sizeof(c->counts));
    memset(c->counts, 0, sizeof(c->counts));
    c->dirty = 0;
}

struct hp_record *hp_records(struct hp_conn *c, uint32_t *n)
{
    *n = c->nrecords;
    return c->records;
}

struct hp_drop *hp_drops(struct hp_conn *c, uint32_t *n)
{
    *n = c->ndrops;
    return c->drops;
}

void hp_clear_logs(struct hp_conn *c)
{
    c->nrecords = 0;
    c->ndrops = 0;
}

/* -- copies that cannot fault --------------------------------------------------------------- */

static uintptr_t page_end(uintptr_t address)
{
    return (address | (PAGE_SIZE_4K - 1)) + 1;
}

/* One system call; bytes copied, 0 when the first page faulted. */
static size_t vm_copy(struct hp_conn *c, int write, void *local, uintptr_t remote, size_t len)
{
    struct iovec ours = {local, len};
    struct iovec mapped = {(void *)remote, len};
    ssize_t n = write ? process_vm_writev(c->pid, &ours, 1, &mapped, 1, 0)
                      : process_vm_readv(c->pid, &ours, 1, &mapped, 1, 0);
    return n < 0 ? 0 : (size_t)n;
}

static void shmem_read(struct hp_conn *c, uint8_t *dst, uint64_t bar_offset, size_t len)
{
    uintptr_t src = c->shm_base + bar_offset;
    size_t done = vm_copy(c, 0, dst, src, len);
    while (done < len) { /* zero the page that stopped the copy, go on after it */
        size_t hole_end = page_end(src + done) - src;
        if (hole_end > len)
            hole_end = len;
        memset(dst + done, 0, hole_end - done);
        done = hole_end;
        if (done < len)
            done += vm_copy(c, 0, dst + done, src + done, len - done);
    }
}

static void log_drop(struct hp_conn *c, uint64_t offset, uint64_t length)
{
    struct hp_drop *last = c->ndrops ? &c->drops[c->ndrops - 1] : NULL;
    if (last && last->offset + last->length == offset) {
        last->length += length;
        return;
    }
    if (c->ndrops < MAX_DROPS) /* always true: hp_drain yields before it fills */
        c->drops[c->ndrops++] = (struct hp_drop){offset, length};
}

/* Python warns once per mapping about dropped writes; it learns of them from the drop log. */
static void shmem_write(struct hp_conn *c, uint64_t bar_offset, const uint8_t *src, size_t len)
{
    uintptr_t dst = c->shm_base + bar_offset;
    size_t done = vm_copy(c, 1, (void *)src, dst, len);
    while (done < len) {
        size_t hole_end = page_end(dst + done) - dst;
        if (hole_end > len)
            hole_end = len;
        log_drop(c, bar_offset + done, hole_end - done);
        done = hole_end;
        if (done < len)
            done += vm_copy(c, 1, (void *)(src + done), dst + done, len - done);
    }
}

/* -- what is hot ------------------------------------------------------------------------------ */

/* The checks of VfioUserServer._check_access and SharedMemoryBar._check, all passing. */
static int shmem_hit(const struct hp_conn *c, uint32_t region, uint64_t offset, uint32_t count)
{
    return c->has_shm && region == c->shm_region && count > 0 && count <= c->max_xfer &&
           count <= c->shm_max && count <= c->shm_size && offset <= c->shm_size - count;
}

/* The armed kick eventfd a write hits, or -1: a 2/4-byte write at a queue's slot. */
static int notify_hit(const struct hp_conn *c, uint32_t region, uint64_t offset, uint32_t count)
{
    if (!c->has_notify || region != c->nt_region || (count != 2 && count != 4) ||
        count > c->max_xfer || offset < c->nt_offset)
        return -1;
    uint64_t rel = offset - c->nt_offset;
    if (rel % c->nt_mult || rel / c->nt_mult >= c->nt_queues)
        return -1;
    return c->kick_fds[rel / c->nt_mult];
}

static void count(struct hp_conn *c, enum hp_count which, uint64_t n)
{
    c->counts[which] += n;
    c->dirty = 1;
}

static void record(struct hp_conn *c, uint8_t dir, const struct vfio_user_header *h, uint32_t size,
                   uint32_t region, uint64_t offset, uint32_t count_)
{
    if (c->observed && c->nrecords < MAX_RECORDS)
        c->records[c->nrecords++] = (struct hp_record){
            .dir = dir,
            .command = h->command,
            .msg_id = h->msg_id,
            .flags = (uint16_t)h->flags,
            .size = size,
            .region = region,
            .count = count_,
            .offset = offset,
        };
}

static int flush(struct hp_conn *c)
{
    size_t sent = 0;
    while (sent < c->out_len) {
        ssize_t n = send(c->sock, c->out + sent, c->out_len - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            c->err = errno;
            c->out_len = 0;
            return -1;
        }
        sent += (size_t)n;
    }
    c->out_len = 0;
    return 0;
}

/* Room for a reply of `len` bytes at the end of the out buffer (flushing first if needed). */
static uint8_t *reply_space(struct hp_conn *c, size_t len)
{
    if (c->out_len + len > c->out_cap && flush(c) < 0)
        return NULL;
    uint8_t *p = c->out + c->out_len;
    c->out_len += len;
    return p;
}

static void put_access_reply(uint8_t *p, const struct vfio_user_header *h, uint32_t size,
                             const struct vfio_user_region_access *a)
{
    struct vfio_user_header reply = {h->msg_id, h->command, size, VFIO_USER_REPLY, 0};
    memcpy(p, &reply, HDR_SIZE);
    memcpy(p + HDR_SIZE, a, sizeof(*a));
}

static void kick(struct hp_conn *c, int fd)
{
    uint64_t one = 1;
    count(c, HP_KICKS, 1);
    if (write(fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
        count(c, HP_KICK_ERRORS, 1);
}

/* 1: served; 0: cold (nothing done); -1: the reply could not be sent. */
static int serve_read(struct hp_conn *c, const struct vfio_user_header *h, const uint8_t *msg)
{
    struct vfio_user_region_access a;
    if (h->flags != VFIO_USER_REQUEST || h->msg_size != ACCESS_SIZE)
        return 0;
    memcpy(&a, msg + HDR_SIZE, sizeof(a));
    if (!shmem_hit(c, a.region, a.offset, a.count))
        return 0;
    uint32_t size = (uint32_t)ACCESS_SIZE + a.count;
    count(c, HP_IN_READ, 1);
    record(c, HP_DIR_IN, h, h->msg_size, a.region, a.offset, a.count);
    uint8_t *p = reply_space(c, size);
    if (!p)
        return -1;
    put_access_reply(p, h, size, &a);
    shmem_read(c, p + ACCESS_SIZE, a.offset, a.count);
    count(c, HP_SHMEM_READS, 1);
    count(c, HP_SHMEM_READ_BYTES, a.count);
    count(c, HP_OUT_READ, 1);
    record(c, HP_DIR_OUT, h, size, a.region, a.offset, a.count);
    return 1;
}

static int serve_write(struct hp_conn *c, const struct vfio_user_header *h, const uint8_t *msg)
{
    struct vfio_user_region_access a;
    if ((h->flags != VFIO_USER_REQUEST && h->flags != VFIO_USER_NO_REPLY) ||
        h->msg_size < ACCESS_SIZE)
        return 0;
    memcpy(&a, msg + HDR_SIZE, sizeof(a));
    if (h->msg_size - ACCESS_SIZE != a.count)
        return 0;
    int shm = shmem_hit(c, a.region, a.offset, a.count);
    int fd = shm ? -1 : notify_hit(c, a.region, a.offset, a.count);
    if (!shm && fd < 0)
        return 0;
    count(c, HP_IN_WRITE, 1);
    record(c, HP_DIR_IN, h, h->msg_size, a.region, a.offset, a.count);
    if (shm) {
        shmem_write(c, a.offset, msg + ACCESS_SIZE, a.count);
        count(c, HP_SHMEM_WRITES, 1);
        count(c, HP_SHMEM_WRITE_BYTES, a.count);
    } else {
        kick(c, fd);
        count(c, HP_NOTIFY_WRITES, 1);
        count(c, HP_NOTIFY_WRITE_BYTES, a.count);
    }
    if (h->flags & VFIO_USER_NO_REPLY)
        return 1;
    uint8_t *p = reply_space(c, ACCESS_SIZE);
    if (!p)
        return -1;
    put_access_reply(p, h, (uint32_t)ACCESS_SIZE, &a);
    count(c, HP_OUT_WRITE, 1);
    record(c, HP_DIR_OUT, h, (uint32_t)ACCESS_SIZE, a.region, a.offset, a.count);
    return 1;
}

/* Served only when every write is hot: Python checks all before it writes any. */
static int serve_write_multi(struct hp_conn *c, const struct vfio_user_header *h,
                             const uint8_t *msg)
{
    struct vfio_user_wr_multi m;
    struct vfio_user_wr_one w;
    if ((h->flags != VFIO_USER_REQUEST && h->flags != VFIO_USER_NO_REPLY) ||
        h->msg_size < MULTI_HEAD)
        return 0;
    memcpy(&m, msg + HDR_SIZE, sizeof(m));
    if (m.wr_cnt == 0 || m.wr_cnt > VFIO_USER_MULTI_MAX ||
        h->msg_size != MULTI_HEAD + m.wr_cnt * sizeof(w))
        return 0;
    const uint8_t *entries = msg + MULTI_HEAD;
    for (uint64_t i = 0; i < m.wr_cnt; i++) {
        memcpy(&w, entries + i * sizeof(w), sizeof(w));
        if (w.count > VFIO_USER_MULTI_DATA)
            return 0;
        if (!shmem_hit(c, w.region, w.offset, w.count) &&
            notify_hit(c, w.region, w.offset, w.count) < 0)
            return 0;
    }
    count(c, HP_IN_WRITE_MULTI, 1);
    record(c, HP_DIR_IN, h, h->msg_size, 0, 0, (uint32_t)m.wr_cnt);
    for (uint64_t i = 0; i < m.wr_cnt; i++) {
        memcpy(&w, entries + i * sizeof(w), sizeof(w));
        record(c, HP_DIR_ENTRY, h, 0, w.region, w.offset, w.count);
        if (shmem_hit(c, w.region, w.offset, w.count)) {
            const uint8_t *data = entries + i * sizeof(w) + offsetof(struct vfio_user_wr_one, data);
            shmem_write(c, w.offset, data, w.count);
            count(c, HP_SHMEM_WRITES, 1);
            count(c, HP_SHMEM_WRITE_BYTES, w.count);
        } else {
            kick(c, notify_hit(c, w.region, w.offset, w.count));
            count(c, HP_NOTIFY_WRITES, 1);
            count(c, HP_NOTIFY_WRITE_BYTES, w.count);
        }
    }
    if (h->flags & VFIO_USER_NO_REPLY)
        return 1;
    uint32_t size = (uint32_t)MULTI_HEAD;
    uint8_t *p = reply_space(c, size);
    if (!p)
        return -1;
    struct vfio_user_header reply = {h->msg_id, h->command, size, VFIO_USER_REPLY, 0};
    memcpy(p, &reply, HDR_SIZE);
    memcpy(p + HDR_SIZE, &m, sizeof(m));
    count(c, HP_OUT_WRITE_MULTI, 1);
    record(c, HP_DIR_OUT, h, size, 0, 0, (uint32_t)m.wr_cnt);
    return 1;
}

static int serve(struct hp_conn *c, const struct vfio_user_header *h, const uint8_t *msg)
{
    if (!c->negotiated)
        return 0;
    switch (h->command) {
    case VFIO_USER_REGION_READ:
        return serve_read(c, h, msg);
    case VFIO_USER_REGION_WRITE:
        return serve_write(c, h, msg);
    case VFIO_USER_REGION_WRITE_MULTI:
        return serve_write_multi(c, h, msg);
    default:
        return 0;
    }
}

/* -- receive -------------------------------------------------------------------------------- */

static int keep_fd(struct hp_conn *c, uint64_t last, int fd)
{
    if (c->nfds == c->fds_cap) {
        size_t cap = c->fds_cap ? 2 * c->fds_cap : 32;
        struct fd_entry *grown = realloc(c->fds, cap * sizeof(*grown));
        if (!grown)
            return -1;
        c->fds = grown;
        c->fds_cap = cap;
    }
    c->fds[c->nfds++] = (struct fd_entry){last, fd};
    return 0;
}

/* Hand Python the bytes [head, head+len) and the fds whose chunk ended before `end`. */
static int make_cold(struct hp_conn *c, size_t len, uint64_t end)
{
    size_t n = 0;
    while (n < c->nfds && c->fds[n].last < end)
        n++;
    if (n > c->cold_fds_cap) {
        int *grown = realloc(c->cold_fds, n * sizeof(int));
        if (!grown) {
            c->err = ENOMEM;
            return HP_ERROR;
        }
        c->cold_fds = grown;
        c->cold_fds_cap = n;
    }
    for (size_t i = 0; i < n; i++)
        c->cold_fds[i] = c->fds[i].fd;
    memmove(c->fds, c->fds + n, (c->nfds - n) * sizeof(*c->fds));
    c->nfds -= n;
    c->cold.data = c->in + c->head;
    c->cold.len = len;
    c->cold.fds = c->cold_fds;
    c->cold.nfds = (int)n;
    c->cold_consume = len;
    return HP_COLD;
}

#define RECEIVED (-1)

/* recvmsg once into the buffer: RECEIVED, or the hp_status hp_drain returns (HP_IDLE when
 * nothing was waiting). `emptied`: a short read without fds, so the socket is empty now. */
static int receive(struct hp_conn *c, int *emptied)
{
    if (c->head == c->tail) {
        c->in_base += c->tail;
        c->head = c->tail = 0;
    } else if (c->in_cap - c->tail < RECV_SLACK) {
        memmove(c->in, c->in + c->head, c->tail - c->head);
        c->in_base += c->head;
        c->tail -= c->head;
        c->head = 0;
    }
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(64 * sizeof(int))];
    } control;
    size_t control_len = CMSG_SPACE(c->max_fds * sizeof(int));
    if (control_len > sizeof(control.buf))
        control_len = sizeof(control.buf);
    struct iovec iov = {c->in + c->tail, c->in_cap - c->tail};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = control_len};
    ssize_t n;
    do
        n = recvmsg(c->sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return HP_IDLE;
        c->err = errno;
        return HP_ERROR;
    }
    int with_fds = 0, failed = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            /* The fds of a chunk belong to the message holding its last byte. */
            if (failed || (mh.msg_flags & MSG_CTRUNC) || n == 0 ||
                keep_fd(c, c->in_base + c->tail + (size_t)n - 1, fd) < 0) {
                close(fd);
                failed = 1;
            } else {
                with_fds = 1;
            }
        }
    }
    if (mh.msg_flags & MSG_CTRUNC)
        return HP_TOO_MANY_FDS;
    if (n == 0)
        return HP_EOF;
    if (failed) {
        c->err = ENOMEM;
        return HP_ERROR;
    }
    c->tail += (size_t)n;
    *emptied = (size_t)n < iov.iov_len && !with_fds;
    return RECEIVED;
}

static int logs_full(const struct hp_conn *c)
{
    return c->ndrops > MAX_DROPS - LOG_HEADROOM ||
           (c->observed && c->nrecords > MAX_RECORDS - LOG_HEADROOM);
}

static int drain(struct hp_conn *c)
{
    c->head += c->cold_consume;
    c->cold_consume = 0;
    c->cold.len = 0;
    c->cold.nfds = 0;
    c->err = 0;
    if (c->sock < 0) {
        c->err = EBADF;
        return HP_ERROR;
    }
    int emptied = 0;
    for (;;) {
        while (c->tail - c->head >= HDR_SIZE) {
            struct vfio_user_header h;
            const uint8_t *msg = c->in + c->head;
            memcpy(&h, msg, HDR_SIZE);
            if (h.msg_size < HDR_SIZE || h.msg_size > c->max_msg) {
                /* Framing is lost: Python's decoder says why and drops the client. */
                if (flush(c) < 0)
                    return HP_ERROR;
                return make_cold(c, c->tail - c->head, UINT64_MAX);
            }
            if (c->tail - c->head < h.msg_size)
                break;
            if (logs_full(c))
                return flush(c) < 0 ? HP_ERROR : HP_YIELD;
            uint64_t end = c->in_base + c->head + h.msg_size;
            int served = 0;
            if (!(c->nfds && c->fds[0].last < end))
                served = serve(c, &h, msg);
            if (served < 0)
                return HP_ERROR;
            if (!served) {
                if (flush(c) < 0)
                    return HP_ERROR;
                return make_cold(c, h.msg_size, end);
            }
            c->head += h.msg_size;
        }
        if (flush(c) < 0)
            return HP_ERROR;
        if (emptied)
            return HP_IDLE;
        int got = receive(c, &emptied);
        if (got != RECEIVED)
            return got;
    }
}

int hp_drain(struct hp_conn *c)
{
    int status = drain(c);
    return status | hp_pending(c) << 8;
}
