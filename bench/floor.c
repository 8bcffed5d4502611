/*
 * The floor for fig3: the least a vfio-user server can do per REGION_READ, bench-only.
 *
 *   floor SOCKET REGION_SIZE MAPPED_SIZE   serve one client on a UNIX stream socket
 *   floor --copy-cost N MAPPED_SIZE        time N 8-byte copies each way, print JSON, exit
 *
 * One thread, blocking recvmsg, a switch on the command, one send per reply: what a plain C
 * server does. BAR 4 (REGION_SIZE bytes) is backed, from offset 0, by a MAP_SHARED mapping of
 * a memfd of MAPPED_SIZE bytes (the kind of mapping the emulator serves); the rest of the BAR
 * reads as zeros and drops writes. Reads copy with memcpy. The emulator copies through
 * process_vm_readv instead, so that a page past the end of a back-end's file reads as zeros
 * rather than raising SIGBUS (emulator/shmem/vmcopy.py); --copy-cost prices that system call
 * against memcpy so the report can show how much of the gap it is.
 *
 * Everything QEMU 11.1's start-up sends (emulator/vfio_user/client.py: VERSION, DMA_MAP, the
 * device, region and IRQ info, config space reads and writes) gets a minimal, well-formed answer:
 * config space is 256 read-only zero bytes, no IRQ has vectors, DMA fds are closed unmapped.
 * Anything else is answered with ENOSYS.
 *
 * CPU time: SIGUSR1 makes the server write its thread CPU clock (CLOCK_THREAD_CPUTIME_ID, in
 * nanoseconds, one decimal line) to stdout, from the handler (clock_gettime and write are
 * async-signal-safe), so the benchmark reads it before and after each batch of requests, the
 * way it reads the emulator thread's clock. "ready" on stdout means the socket listens.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum command {
    VERSION = 1,
    DMA_MAP = 2,
    DMA_UNMAP = 3,
    DEVICE_GET_INFO = 4,
    DEVICE_GET_REGION_INFO = 5,
    DEVICE_GET_IRQ_INFO = 7,
    DEVICE_SET_IRQS = 8,
    REGION_READ = 9,
    REGION_WRITE = 10,
    DEVICE_RESET = 13,
};

enum { TYPE_REPLY = 0x1, NO_REPLY = 0x10, ERROR = 0x20 };
enum { REGION_BAR4 = 4, REGION_CONFIG = 7, NUM_REGIONS = 9, NUM_IRQS = 5 };
enum { REGION_READABLE = 1, REGION_WRITABLE = 2 };
enum { DEVICE_RESET_FLAG = 1, DEVICE_PCI = 2, IRQ_EVENTFD = 1 };

#define MAX_XFER (1u << 20)
#define MAX_FDS 16
#define CONFIG_SIZE 256

struct header {
    uint16_t msg_id;
    uint16_t command;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
};

struct access {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
};

struct region_info {
    uint32_t argsz, flags, index, cap_offset;
    uint64_t size, offset;
};

struct four_u32 {
    uint32_t argsz, flags, index, count;
};

static const char CAPS[] =
    "{\"capabilities\": {\"max_msg_fds\": 16, \"max_data_xfer_size\": 1048576, "
    "\"pgsizes\": 4096, \"max_dma_maps\": 65535, \"write_multiple\": true}}";

static unsigned char *bar;
static uint64_t bar_size, mapped_size;
static unsigned char config[CONFIG_SIZE];
/* A request of max_data_xfer_size and its header: the largest message a client may send. */
static unsigned char in_buf[2 * MAX_XFER];
static unsigned char out_buf[sizeof(struct header) + sizeof(struct access) + MAX_XFER];

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void on_sigusr1(int sig)
{
    struct timespec now;
    char text[32];
    int at = sizeof(text);
    int saved = errno;
    (void)sig;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    uint64_t ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    text[--at] = '\n';
    do {
        text[--at] = (char)('0' + ns % 10);
        ns /= 10;
    } while (ns);
    if (write(STDOUT_FILENO, text + at, sizeof(text) - at) < 0) {
        /* The benchmark is gone; it will not wait for this line. */
    }
    errno = saved;
}

static void send_all(int fd, const void *data, size_t size)
{
    const unsigned char *at = data;
    while (size) {
        ssize_t done = send(fd, at, size, MSG_NOSIGNAL);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            die("send");
        }
        at += done;
        size -= (size_t)done;
    }
}

/* Send the reply to ``req``: its header, then ``size`` payload bytes already in out_buf. */
static void reply(int fd, const struct header *req, size_t size, uint32_t error)
{
    struct header head = {
        .msg_id = req->msg_id,
        .command = req->command,
        .size = (uint32_t)(sizeof(head) + (error ? 0 : size)),
        .flags = TYPE_REPLY | (error ? ERROR : 0),
        .error = error,
    };
    memcpy(out_buf, &head, sizeof(head));
    send_all(fd, out_buf, head.size);
}

/* REGION_READ/REGION_WRITE: bounds-check, copy, and return the errno (0: done). */
static uint32_t region_access(const struct header *req, const unsigned char *body, size_t len,
                              size_t *reply_size)
{
    struct access acc;
    if (len < sizeof(acc))
        return EINVAL;
    memcpy(&acc, body, sizeof(acc));
    int is_write = req->command == REGION_WRITE;
    if (acc.count > MAX_XFER || len != sizeof(acc) + (is_write ? acc.count : 0))
        return EINVAL;
    uint64_t size = acc.region == REGION_BAR4 ? bar_size
                    : acc.region == REGION_CONFIG ? CONFIG_SIZE
                                                 : 0;
    if (acc.offset > size || acc.count > size - acc.offset)
        return EINVAL;
    unsigned char *data = out_buf + sizeof(struct header) + sizeof(acc);
    *reply_size = sizeof(acc) + (is_write ? 0 : acc.count);
    memcpy(out_buf + sizeof(struct header), &acc, sizeof(acc));
    uint64_t backed = 0;
    if (acc.region == REGION_BAR4 && acc.offset < mapped_size)
        backed = mapped_size - acc.offset < acc.count ? mapped_size - acc.offset : acc.count;
    if (is_write) {
        if (backed)
            memcpy(bar + acc.offset, body + sizeof(acc), backed);
        return 0;
    }
    if (acc.region == REGION_CONFIG) {
        memcpy(data, config + acc.offset, acc.count);
        return 0;
    }
    if (backed)
        memcpy(data, bar + acc.offset, backed);
    memset(data + backed, 0, acc.count - backed);
    return 0;
}

/* Answer one complete message; ``body`` is its payload of ``len`` bytes. */
static void handle(int fd, const struct header *req, const unsigned char *body, size_t len)
{
    unsigned char *payload = out_buf + sizeof(struct header);
    size_t size = 0;
    uint32_t error = 0;
    switch (req->command) {
    case REGION_READ:
    case REGION_WRITE:
        error = region_access(req, body, len, &size);
        break;
    case VERSION: {
        uint16_t version[2] = {0, 0};
        memcpy(payload, version, sizeof(version));
        memcpy(payload + sizeof(version), CAPS, sizeof(CAPS)); /* with its NUL */
        size = sizeof(version) + sizeof(CAPS);
        break;
    }
    case DMA_MAP:
    case DEVICE_SET_IRQS:
    case DEVICE_RESET:
        break;
    case DMA_UNMAP:
        size = len < 24 ? len : 24; /* the reply echoes the request */
        memcpy(payload, body, size);
        break;
    case DEVICE_GET_INFO: {
        struct four_u32 info = {16, DEVICE_RESET_FLAG | DEVICE_PCI, NUM_REGIONS, NUM_IRQS};
        memcpy(payload, &info, sizeof(info));
        size = sizeof(info);
        break;
    }
    case DEVICE_GET_REGION_INFO: {
        struct region_info info;
        if (len < sizeof(info)) {
            error = EINVAL;
            break;
        }
        memcpy(&info, body, sizeof(info));
        uint32_t index = info.index;
        memset(&info, 0, sizeof(info));
        info.argsz = sizeof(info);
        info.index = index;
        if (index == REGION_BAR4 || index == REGION_CONFIG) {
            info.flags = REGION_READABLE | REGION_WRITABLE;
            info.size = index == REGION_BAR4 ? bar_size : CONFIG_SIZE;
        }
        memcpy(payload, &info, sizeof(info));
        size = sizeof(info);
        break;
    }
    case DEVICE_GET_IRQ_INFO: {
        struct four_u32 info;
        if (len < sizeof(info)) {
            error = EINVAL;
            break;
        }
        memcpy(&info, body, sizeof(info));
        if (info.index >= NUM_IRQS) {
            error = EINVAL;
            break;
        }
        info = (struct four_u32){16, IRQ_EVENTFD, info.index, 0};
        memcpy(payload, &info, sizeof(info));
        size = sizeof(info);
        break;
    }
    default:
        error = ENOSYS;
    }
    if (!(req->flags & NO_REPLY))
        reply(fd, req, size, error);
}

/* recvmsg into in_buf after ``have`` bytes; fds that come along are closed (nothing keeps one). */
static size_t receive(int fd, size_t have)
{
    union {
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {in_buf + have, sizeof(in_buf) - have};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof(control.buf),
    };
    ssize_t got;
    do
        got = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        die("recvmsg");
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int received;
            memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            close(received);
        }
    }
    return (size_t)got;
}

static int serve(int conn)
{
    size_t have = 0;
    for (;;) {
        size_t got = receive(conn, have);
        if (!got)
            return have ? 1 : 0; /* end of stream; mid-message is an error */
        have += got;
        size_t at = 0;
        while (have - at >= sizeof(struct header)) {
            struct header head;
            memcpy(&head, in_buf + at, sizeof(head));
            if (head.size < sizeof(head) || head.size > sizeof(in_buf)) {
                fprintf(stderr, "floor: message size %u breaks framing\n", head.size);
                return 1;
            }
            if (have - at < head.size)
                break;
            handle(conn, &head, in_buf + at + sizeof(head), head.size - sizeof(head));
            at += head.size;
        }
        memmove(in_buf, in_buf + at, have - at);
        have -= at;
    }
}

static unsigned char *map_memfd(uint64_t size)
{
    int fd = memfd_create("floor-bar4", MFD_CLOEXEC);
    if (fd < 0)
        die("memfd_create");
    if (ftruncate(fd, (off_t)size) < 0)
        die("ftruncate");
    void *at = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (at == MAP_FAILED)
        die("mmap");
    close(fd); /* the mapping keeps the file */
    memset(at, 0xA5, size); /* every page present, as after a guest's first touch */
    return at;
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* Thread CPU per 8-byte copy out of the mapping: memcpy, then process_vm_readv on ourselves. */
static int copy_cost(long count, uint64_t size)
{
    unsigned char *mem = map_memfd(size);
    unsigned char sink[8];
    pid_t self = getpid();
    uint64_t start = thread_cpu_ns();
    for (long i = 0; i < count; i++) {
        memcpy(sink, mem + ((uint64_t)i * 8 & 0xFFF), 8);
        __asm__ volatile("" : : "r"(sink) : "memory"); /* keep every copy */
    }
    uint64_t copied = thread_cpu_ns();
    for (long i = 0; i < count; i++) {
        struct iovec local = {sink, 8};
        struct iovec remote = {mem + ((uint64_t)i * 8 & 0xFFF), 8};
        if (process_vm_readv(self, &local, 1, &remote, 1, 0) != 8)
            die("process_vm_readv");
    }
    uint64_t done = thread_cpu_ns();
    printf("{\"memcpy_ns\": %.1f, \"process_vm_readv_ns\": %.1f}\n",
           (double)(copied - start) / count, (double)(done - copied) / count);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "--copy-cost"))
        return copy_cost(atol(argv[2]), strtoull(argv[3], NULL, 0));
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET REGION_SIZE MAPPED_SIZE | --copy-cost N SIZE\n",
                argv[0]);
        return 2;
    }
    bar_size = strtoull(argv[2], NULL, 0);
    mapped_size = strtoull(argv[3], NULL, 0);
    if (!mapped_size || mapped_size > bar_size) {
        fprintf(stderr, "floor: need 0 < MAPPED_SIZE <= REGION_SIZE\n");
        return 2;
    }
    bar = map_memfd(mapped_size);

    struct sigaction action = {.sa_handler = on_sigusr1, .sa_flags = SA_RESTART};
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGUSR1, &action, NULL) < 0)
        die("sigaction");

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "floor: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[1]);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0)
        die("socket");
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(listener, 1) < 0)
        die("bind/listen");
    printf("ready\n");
    fflush(stdout);
    int conn;
    do
        conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    while (conn < 0 && errno == EINTR);
    if (conn < 0)
        die("accept");
    close(listener);
    int status = serve(conn);
    close(conn);
    unlink(argv[1]);
    return status;
}
