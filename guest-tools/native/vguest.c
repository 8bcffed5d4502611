/*
 * libvguest: exact-width access to a mapped PCI BAR (or any mappable file).
 *
 * Built as a plain shared library and loaded with cffi's ABI mode, so it has no
 * coupling to any Python ABI: the host compiles it, the guest's Python loads it.
 *
 * Every access to the mapping goes through a volatile pointer of exactly the
 * requested width (1, 2, 4 or 8 bytes), never memcpy: on a trapped BAR the
 * hypervisor emulates each load and store, so the width the device sees is the
 * width asked for. Values are little-endian, as PCI is (ioread32 semantics).
 *
 * Pattern (identical to vguest/pattern.py): a stream of 64-bit little-endian
 * words w[0], w[1], ...; byte j of a range (relative to its start) is byte
 * j % 8 of w[j / 8].
 *   VG_CONSTANT (0): w[i] = seed
 *   VG_COUNTER  (1): w[i] = seed + i (mod 2^64)
 *   VG_XORSHIFT (2): s = seed ? seed : 0x9E3779B97F4A7C15; w[i] = s after i+1
 *                    xorshift64 steps (s ^= s << 13; s ^= s >> 7; s ^= s << 17)
 * The width only decides how the stream is stored, never what it is.
 *
 * Checksum: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value
 * and final xor 0xFFFFFFFF) over the bytes of the range in address order,
 * computed in software from width-exact reads. crc32c("123456789") = 0xE3069283.
 *
 * All functions return 0 on success or a negative errno; vg_verify returns 1
 * on a mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define VG_CONSTANT 0
#define VG_COUNTER 1
#define VG_XORSHIFT 2
#define VG_XORSHIFT_ZERO_SEED 0x9E3779B97F4A7C15ULL

struct vg_map {
	void *base;       /* page-aligned mmap result */
	uint64_t map_len; /* length passed to mmap */
	uint8_t *ptr;     /* first byte of the window (file offset `offset`) */
	uint64_t offset;  /* file offset of ptr */
	uint64_t len;     /* window length in bytes */
	int writable;
};

/* ---- pattern and CRC-32C (no device access) ---- */

static uint64_t xorshift64(uint64_t s)
{
	s ^= s << 13;
	s ^= s >> 7;
	s ^= s << 17;
	return s;
}

struct pattern {
	int kind;
	uint64_t seed;
	uint64_t state;
	uint64_t index; /* index of the word `word` */
	uint64_t word;
};

static int pattern_init(struct pattern *p, int kind, uint64_t seed)
{
	if (kind != VG_CONSTANT && kind != VG_COUNTER && kind != VG_XORSHIFT)
		return -EINVAL;
	p->kind = kind;
	p->seed = seed;
	p->state = seed ? seed : VG_XORSHIFT_ZERO_SEED;
	p->index = 0;
	switch (kind) {
	case VG_CONSTANT:
	case VG_COUNTER:
		p->word = seed;
		break;
	default:
		p->state = xorshift64(p->state);
		p->word = p->state;
	}
	return 0;
}

/* Advance to the next word; words are only ever consumed in order. */
static void pattern_next(struct pattern *p)
{
	p->index++;
	switch (p->kind) {
	case VG_CONSTANT:
		break;
	case VG_COUNTER:
		p->word = p->seed + p->index;
		break;
	default:
		p->state = xorshift64(p->state);
		p->word = p->state;
	}
}

/* Pattern bytes [pos, pos + n) in memory order; n divides 8, pos % n == 0. */
static void pattern_bytes(struct pattern *p, uint64_t pos, unsigned n, uint8_t *out)
{
	while (p->index < pos / 8)
		pattern_next(p);
	for (unsigned i = 0; i < n; i++)
		out[i] = (uint8_t)(p->word >> (8 * ((pos % 8) + i)));
}

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ 0x82F63B78U : c >> 1;
		crc_table[i] = c;
	}
	crc_ready = 1;
}

/* Raw register update: callers apply the initial value and final xor. */
static uint32_t crc_update(uint32_t crc, const uint8_t *buf, uint64_t len)
{
	if (!crc_ready)
		crc_init();
	for (uint64_t i = 0; i < len; i++)
		crc = crc_table[(crc ^ buf[i]) & 0xff] ^ (crc >> 8);
	return crc;
}

int vg_pattern_generate(int kind, uint64_t seed, uint8_t *buf, uint64_t len)
{
	struct pattern p;
	int rc = pattern_init(&p, kind, seed);

	if (rc)
		return rc;
	for (uint64_t pos = 0; pos < len; pos++)
		pattern_bytes(&p, pos, 1, buf + pos);
	return 0;
}

/* Continue a CRC-32C: pass 0 to start; the result is final (post-xor). */
uint32_t vg_crc32c_buf(uint32_t crc, const uint8_t *buf, uint64_t len)
{
	return crc_update(crc ^ 0xFFFFFFFFU, buf, len) ^ 0xFFFFFFFFU;
}

/* ---- mapping ---- */

int vg_map_fd(int fd, uint64_t offset, uint64_t len, int writable, struct vg_map *m)
{
	struct stat st;
	long page = sysconf(_SC_PAGESIZE);
	uint64_t delta, map_len;
	void *base;

	memset(m, 0, sizeof(*m));
	if (len == 0 || page <= 0)
		return -EINVAL;
	if (offset + len < offset)
		return -ERANGE;
	if (fstat(fd, &st) < 0)
		return -errno;
	/* Regular files (and sysfs resource files) know their size: touching a
	 * page past the end would raise SIGBUS, so refuse instead. */
	if (S_ISREG(st.st_mode) && (st.st_size < 0 || offset + len > (uint64_t)st.st_size))
		return -ERANGE;
	delta = offset % (uint64_t)page;
	map_len = delta + len;
	base = mmap(NULL, map_len, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd,
		    (off_t)(offset - delta));
	if (base == MAP_FAILED)
		return -errno;
	m->base = base;
	m->map_len = map_len;
	m->ptr = (uint8_t *)base + delta;
	m->offset = offset;
	m->len = len;
	m->writable = writable;
	return 0;
}

int vg_map_path(const char *path, uint64_t offset, uint64_t len, int writable, struct vg_map *m)
{
	int fd, rc;

	memset(m, 0, sizeof(*m));
	fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_SYNC);
	if (fd < 0)
		return -errno;
	rc = vg_map_fd(fd, offset, len, writable, m);
	close(fd); /* the mapping keeps its own reference */
	return rc;
}

int vg_unmap(struct vg_map *m)
{
	int rc = 0;

	if (m->base && munmap(m->base, m->map_len) < 0)
		rc = -errno;
	memset(m, 0, sizeof(*m));
	return rc;
}

/* Range [off, off + len) inside the window, naturally aligned for width. */
static int check_range(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width)
{
	if (!m->ptr)
		return -EBADF;
	if (width != 1 && width != 2 && width != 4 && width != 8)
		return -EINVAL;
	if ((m->offset + off) % width || len % width)
		return -EINVAL;
	if (off > m->len || len > m->len - off)
		return -ERANGE;
	return 0;
}

/* ---- width-exact accesses; values in memory byte order inside `bytes` ---- */

static void load(const uint8_t *p, unsigned width, uint8_t *bytes)
{
	switch (width) {
	case 1: {
		uint8_t v = *(const volatile uint8_t *)p;
		memcpy(bytes, &v, 1);
		break;
	}
	case 2: {
		uint16_t v = *(const volatile uint16_t *)(const void *)p;
		memcpy(bytes, &v, 2);
		break;
	}
	case 4: {
		uint32_t v = *(const volatile uint32_t *)(const void *)p;
		memcpy(bytes, &v, 4);
		break;
	}
	default: {
		uint64_t v = *(const volatile uint64_t *)(const void *)p;
		memcpy(bytes, &v, 8);
	}
	}
}

static void store(uint8_t *p, unsigned width, const uint8_t *bytes)
{
	switch (width) {
	case 1: {
		uint8_t v;
		memcpy(&v, bytes, 1);
		*(volatile uint8_t *)p = v;
		break;
	}
	case 2: {
		uint16_t v;
		memcpy(&v, bytes, 2);
		*(volatile uint16_t *)(void *)p = v;
		break;
	}
	case 4: {
		uint32_t v;
		memcpy(&v, bytes, 4);
		*(volatile uint32_t *)(void *)p = v;
		break;
	}
	default: {
		uint64_t v;
		memcpy(&v, bytes, 8);
		*(volatile uint64_t *)(void *)p = v;
	}
	}
}

static uint64_t le_value(const uint8_t *bytes, unsigned width)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < width; i++)
		v |= (uint64_t)bytes[i] << (8 * i);
	return v;
}

int vg_read(const struct vg_map *m, uint64_t off, unsigned width, uint64_t *value)
{
	uint8_t b[8];
	int rc = check_range(m, off, width, width);

	if (rc)
		return rc;
	load(m->ptr + off, width, b);
	*value = le_value(b, width);
	return 0;
}

int vg_write(const struct vg_map *m, uint64_t off, unsigned width, uint64_t value)
{
	uint8_t b[8];
	int rc = check_range(m, off, width, width);

	if (rc)
		return rc;
	if (!m->writable)
		return -EACCES;
	for (unsigned i = 0; i < width; i++)
		b[i] = (uint8_t)(value >> (8 * i));
	store(m->ptr + off, width, b);
	return 0;
}

int vg_read_buf(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, uint8_t *dst)
{
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	for (uint64_t pos = 0; pos < len; pos += width)
		load(m->ptr + off + pos, width, dst + pos);
	return 0;
}

int vg_write_buf(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
		 const uint8_t *src)
{
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	if (!m->writable)
		return -EACCES;
	for (uint64_t pos = 0; pos < len; pos += width)
		store(m->ptr + off + pos, width, src + pos);
	return 0;
}

int vg_fill(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, int kind,
	    uint64_t seed)
{
	struct pattern p;
	uint8_t b[8];
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	if (!m->writable)
		return -EACCES;
	rc = pattern_init(&p, kind, seed);
	if (rc)
		return rc;
	for (uint64_t pos = 0; pos < len; pos += width) {
		pattern_bytes(&p, pos, width, b);
		store(m->ptr + off + pos, width, b);
	}
	return 0;
}

/* Returns 1 on mismatch: *where is the first differing byte (relative to
 * off), *expected and *actual the little-endian values of that access. */
int vg_verify(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, int kind,
	      uint64_t seed, uint64_t *where, uint64_t *expected, uint64_t *actual)
{
	struct pattern p;
	uint8_t want[8], got[8];
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	rc = pattern_init(&p, kind, seed);
	if (rc)
		return rc;
	for (uint64_t pos = 0; pos < len; pos += width) {
		pattern_bytes(&p, pos, width, want);
		load(m->ptr + off + pos, width, got);
		if (memcmp(want, got, width) != 0) {
			unsigned i = 0;

			while (want[i] == got[i])
				i++;
			*where = pos + i;
			*expected = le_value(want, width);
			*actual = le_value(got, width);
			return 1;
		}
	}
	return 0;
}

int vg_crc32c(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, uint32_t *crc)
{
	uint8_t b[8];
	uint32_t c = 0xFFFFFFFFU;
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	for (uint64_t pos = 0; pos < len; pos += width) {
		load(m->ptr + off + pos, width, b);
		c = crc_update(c, b, width);
	}
	*crc = c ^ 0xFFFFFFFFU;
	return 0;
}

/* ---- timed loops: `count` accesses cycling over [off, off + len) ---- */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int vg_bench_read(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
		  uint64_t count, uint64_t *elapsed_ns)
{
	uint8_t b[8];
	uint64_t pos = 0, start;
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	if (len == 0)
		return -EINVAL;
	start = now_ns();
	for (uint64_t i = 0; i < count; i++) {
		load(m->ptr + off + pos, width, b);
		pos += width;
		if (pos == len)
			pos = 0;
	}
	*elapsed_ns = now_ns() - start;
	return 0;
}

int vg_bench_write(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
		   uint64_t count, uint64_t value, uint64_t *elapsed_ns)
{
	uint8_t b[8];
	uint64_t pos = 0, start;
	int rc = check_range(m, off, len, width);

	if (rc)
		return rc;
	if (len == 0)
		return -EINVAL;
	if (!m->writable)
		return -EACCES;
	for (unsigned i = 0; i < width; i++)
		b[i] = (uint8_t)(value >> (8 * i));
	start = now_ns();
	for (uint64_t i = 0; i < count; i++) {
		store(m->ptr + off + pos, width, b);
		pos += width;
		if (pos == len)
			pos = 0;
	}
	*elapsed_ns = now_ns() - start;
	return 0;
}
