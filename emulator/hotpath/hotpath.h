/*
 * The native hot path of the vfio-user server: declarations shared by hotpath.c and the cffi
 * build (emulator/hotpath/build.py reads this file as its cdef, so it holds only what cffi's
 * parser takes: no includes, no macros with expressions, fixed-width integer types).
 *
 * The C side owns the receive side of one client socket. hp_drain() reads, serves every hot
 * message (REGION_READ/WRITE and REGION_WRITE_MULTI that hit the shared-memory BAR or an armed
 * queue notification), sends the replies in batches and stops at the first message it does not
 * serve, which Python takes from `cold` and handles on its own path. Python owns every
 * decision and all state; C only reads what Python configured.
 */

/* hp_drain() results. */
enum hp_status {
    HP_IDLE = 0,         /* socket empty, every complete message served: wait for readable */
    HP_COLD = 1,         /* `cold` holds the next message (bytes and fds) for Python */
    HP_EOF = 2,          /* the client closed the connection */
    HP_ERROR = 3,        /* recvmsg/sendmsg failed: `err` holds the errno */
    HP_TOO_MANY_FDS = 4, /* MSG_CTRUNC: the fds that did arrive are closed already */
    HP_YIELD = 5         /* stopped early so Python can empty the logs; call hp_drain() again */
};

/* What the hot path counts since Python last folded (then zeroed) them. */
enum hp_count {
    HP_IN_READ = 0,
    HP_IN_WRITE = 1,
    HP_IN_WRITE_MULTI = 2,
    HP_OUT_READ = 3,
    HP_OUT_WRITE = 4,
    HP_OUT_WRITE_MULTI = 5,
    HP_SHMEM_READS = 6,
    HP_SHMEM_READ_BYTES = 7,
    HP_SHMEM_WRITES = 8,
    HP_SHMEM_WRITE_BYTES = 9,
    HP_NOTIFY_WRITES = 10,
    HP_NOTIFY_WRITE_BYTES = 11,
    HP_KICKS = 12,
    HP_KICK_ERRORS = 13,
    HP_NCOUNTS = 14
};

/* An observed message, kept only while observation is on (tracer or DEBUG). */
enum hp_direction {
    HP_DIR_IN = 0,
    HP_DIR_OUT = 1,
    HP_DIR_ENTRY = 2 /* one write of the REGION_WRITE_MULTI recorded just before */
};

struct hp_record {
    uint8_t dir;
    uint8_t reserved;
    uint16_t command;
    uint16_t msg_id;
    uint16_t flags;
    uint32_t size;   /* bytes on the wire (a multi: its number of writes in `count`) */
    uint32_t region;
    uint32_t count;
    uint64_t offset;
};

/* A write whose bytes (some or all) were dropped because their pages fault: BAR offsets. */
struct hp_drop {
    uint64_t offset;
    uint64_t length;
};

/* The message handed to Python: valid until the next hp_drain(); its fds are Python's. */
struct hp_cold {
    const uint8_t *data;
    size_t len;
    int nfds;
    int *fds;
};

struct hp_conn;

struct hp_conn *hp_new(uint32_t max_msg_size, uint32_t max_fds);
void hp_free(struct hp_conn *c);

/* A new client: forget everything of the previous one (its buffered fds are closed). */
void hp_attach(struct hp_conn *c, int sockfd);
void hp_detach(struct hp_conn *c);
void hp_set_negotiated(struct hp_conn *c, int negotiated, uint32_t max_data_xfer);
void hp_set_observed(struct hp_conn *c, int observed);

/* The shared-memory BAR: guest offset X is host address base + X, always (one reservation). */
void hp_set_shmem(struct hp_conn *c, uint32_t region, uintptr_t base, uint64_t size,
                  uint64_t max_access);
/* The BAR stopped being plain memory (closed, or its reservation damaged): Python serves it. */
void hp_clear_shmem(struct hp_conn *c);
/* The notify area: queue q's slot at offset + q * multiplier in `region`. */
void hp_set_notify(struct hp_conn *c, uint32_t region, uint64_t offset, uint32_t multiplier,
                   uint32_t num_queues);
/* Kick eventfds are borrowed: Python disarms before their owner closes them. */
void hp_arm_kick(struct hp_conn *c, uint32_t queue, int eventfd);
void hp_disarm_kicks(struct hp_conn *c);

/* The hp_status in bits 0-7; bits 8-10 say which logs wait (HP_PENDING_*). */
int hp_drain(struct hp_conn *c);
int hp_errno(struct hp_conn *c);
struct hp_cold *hp_cold_message(struct hp_conn *c);

/* Logs Python empties after each hp_drain(): counts, records, drops. */
enum hp_pending {
    HP_PENDING_COUNTS = 1,
    HP_PENDING_RECORDS = 2,
    HP_PENDING_DROPS = 4
};
int hp_pending(struct hp_conn *c);
/* Copies the counts (HP_NCOUNTS of them) to `out` and zeroes them. */
void hp_take_counts(struct hp_conn *c, uint64_t *out);
struct hp_record *hp_records(struct hp_conn *c, uint32_t *n);
struct hp_drop *hp_drops(struct hp_conn *c, uint32_t *n);
void hp_clear_logs(struct hp_conn *c);
