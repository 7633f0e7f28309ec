// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * labload: the workloads and the 1 s sampler of the overcommit lab (vhost-tmem-lab).
 *
 *   labload run KEY=VALUE...     run a workload; samples go to the port once a second
 *   labload trace KEY=VALUE...   print the first `ops` page numbers the workload would touch
 *                                and a checksum of the whole sequence (no memory used)
 *
 * Keys (defaults in brackets): workload=anon|file|phase|mixed [anon], seed [1], index (this
 * guest's number) [0], guests [1], ws_mib (anonymous working set) [64], idle_mib (held while
 * another guest grows, phase) [16], file_mib (file set) [64], ops (accesses per working set)
 * [100000], zipf (exponent x 100) [90], write_pct [20], file (path) [/mnt/labfile],
 * port (samples and barriers) [/dev/ttyS1], drop_cache (after writing the file set: the
 * whole system's clean page cache; the lab's guests set it) [0].
 *
 * Everything is a function of the seed: which page each access touches (zipf over the pages,
 * hot ranks scattered by a fixed stride), whether it writes, and every page's content (a
 * function of seed, page number and the page's write count), so each read checks the page
 * against its regenerated content. Pages are of varied kinds, like real memory: zero,
 * same-filled, text, binary-like records and random (file pages: no random).
 *
 * The port carries lines to the host: `S k=v ...` (a sample), `B NAME` (this guest waits at
 * barrier NAME until the host writes `NAME` back, once every guest is there), `R k=v ...`
 * (the result). Exit status 0 if every page verified.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MIB_PAGES 256

struct params {
	char workload[16];
	uint64_t seed, index, guests, ws_mib, idle_mib, file_mib, ops, zipf, write_pct, drop_cache;
	char file[128], port[64];
};

/* Shared between the workload processes and the sampler. */
struct shared {
	uint64_t ops;
	uint64_t bad;
	uint32_t phase;
	uint32_t active;
};

static struct shared *sh;
static int port = -1;
static volatile sig_atomic_t stop_sampler;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* splitmix64: the workloads' random numbers. */
static uint64_t next(uint64_t *s)
{
	*s += 0x9e3779b97f4a7c15ULL;
	return mix(*s);
}

static const char *const words[] = {
	"the", "swap", "page", "memory", "host", "guest", "virtio", "queue",
	"kernel", "compress", "tmem", "pool", "object", "index", "flush", "put",
	"get", "of", "and", "a", "to", "in", "is", "that", "for", "with",
};

/* Page n of stream `seed` at write count `ver`. */
static void fill(unsigned char *p, uint64_t seed, uint64_t n, uint32_t ver, int file)
{
	uint64_t h = mix(mix(seed) ^ (n * 0x9e3779b97f4a7c15ULL) ^ ((uint64_t)ver << 40)), x = h | 1;
	unsigned int k = h % 10;
	uint64_t *w = (uint64_t *)p;
	size_t i, len, at = 0;

	if (k == 0) {
		memset(p, 0, PAGE);
	} else if (k == 1) {
		for (i = 0; i < PAGE / 8; i++)
			w[i] = h;
	} else if (k < 5) {
		while (at < PAGE) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			const char *word = words[x % (sizeof(words) / sizeof(words[0]))];

			len = strlen(word);
			if (at + len + 1 > PAGE)
				len = PAGE - at - 1;
			memcpy(p + at, word, len);
			at += len;
			p[at++] = (x >> 20) % 11 ? ' ' : '\n';
		}
	} else if (k < 8 || file) {
		for (i = 0; i < PAGE / 16; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			w[2 * i] = (n << 8) + i + ver;
			w[2 * i + 1] = 0x00007f0000000000ULL + ((x & 0xfff) << 4);
		}
	} else {
		for (i = 0; i < PAGE / 8; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			w[i] = x;
		}
	}
}

/* Zipf over n ranks with exponent s: a cumulative table, searched per draw. */
struct zipf {
	double *cdf;
	uint64_t n, stride;
};

static uint64_t gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

static int zipf_init(struct zipf *z, uint64_t n, double s)
{
	double sum = 0;
	uint64_t i;

	z->n = n;
	z->cdf = malloc(n * sizeof(double));
	if (!z->cdf)
		return -1;
	for (i = 0; i < n; i++) {
		sum += 1.0 / pow((double)(i + 1), s);
		z->cdf[i] = sum;
	}
	for (i = 0; i < n; i++)
		z->cdf[i] /= sum;
	/* Hot ranks spread over the whole set: rank r is page r * stride mod n. */
	z->stride = 2654435761ULL % n;
	while (z->stride == 0 || gcd(z->stride, n) != 1)
		z->stride++;
	return 0;
}

/* The page of the next access. */
static uint64_t zipf_page(struct zipf *z, uint64_t *rng)
{
	double u = (double)(next(rng) >> 11) / 9007199254740992.0;
	uint64_t lo = 0, hi = z->n - 1;

	while (lo < hi) {
		uint64_t mid = (lo + hi) / 2;

		if (z->cdf[mid] < u)
			lo = mid + 1;
		else
			hi = mid;
	}
	return (lo * z->stride) % z->n;
}

static void port_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void port_line(const char *fmt, ...)
{
	char buf[1536];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	/* One write per line: the tty keeps lines of two writers whole. */
	if (port >= 0 && write(port, buf, n) != n)
		perror("labload: port");
}

/* Waits at barrier NAME until the host writes NAME back. */
static int barrier(const char *name)
{
	char line[64];
	size_t at = 0;
	char c;

	port_line("B %s", name);
	for (;;) {
		ssize_t r = read(port, &c, 1);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr, "labload: barrier %s: port closed\n", name);
			return -1;
		}
		if (c == '\r')
			continue;
		if (c != '\n') {
			if (at < sizeof(line) - 1)
				line[at++] = c;
			continue;
		}
		line[at] = 0;
		if (!strcmp(line, name))
			return 0;
		fprintf(stderr, "labload: barrier %s: host said '%s'\n", name, line);
		return -1;
	}
}

/* --------------------------------------------------------------------------- sampler */

static uint64_t file_u64(const char *path)
{
	char buf[64];
	ssize_t r;
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		return 0;
	r = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (r <= 0)
		return 0;
	buf[r] = 0;
	return strtoull(buf, NULL, 10);
}

/* Fields of a whitespace-separated file (a block device's stat, zram's mm_stat). */
static void file_fields(const char *path, uint64_t *out, int n)
{
	char buf[512], *p = buf, *end;
	ssize_t r;
	int fd = open(path, O_RDONLY), i;

	memset(out, 0, n * sizeof(*out));
	if (fd < 0)
		return;
	r = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (r <= 0)
		return;
	buf[r] = 0;
	for (i = 0; i < n; i++) {
		out[i] = strtoull(p, &end, 10);
		if (end == p)
			return;
		p = end;
	}
}

/* Appends `key=value` for each wanted key of a `key value` file (/proc/vmstat, meminfo). */
static int keyed(char *out, size_t room, const char *path, const char *const *keys)
{
	static char buf[16384];
	char *line, *save;
	ssize_t r;
	size_t at = 0;
	int fd = open(path, O_RDONLY), i;

	if (fd < 0)
		return 0;
	r = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (r <= 0)
		return 0;
	buf[r] = 0;
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char name[64];
		unsigned long long v;

		if (sscanf(line, "%63[^: ]%*[: ]%llu", name, &v) != 2)
			continue;
		for (i = 0; keys[i]; i++)
			if (!strcmp(name, keys[i]) && at < room)
				at += snprintf(out + at, room - at, " %s=%llu", keys[i], v);
	}
	return at < room ? (int)at : (int)room;
}

static const char *const vmstat_keys[] = {
	"pswpin", "pswpout", "pgmajfault", "zswpin", "zswpout", "zswpwb", "pgpgin", NULL,
};
static const char *const meminfo_keys[] = {
	"MemFree", "Cached", "AnonPages", "SwapTotal", "SwapFree", NULL,
};
static const char *const tmem_keys[] = {
	"puts", "puts_refused", "gets", "hits", "cache_puts", "cache_gets", "cache_hits", "failures",
	NULL,
};

static void sample(void)
{
	char line[1400], path[96];
	size_t at = 0;
	uint64_t f[11];
	struct timespec now;
	int i;

	clock_gettime(CLOCK_MONOTONIC, &now);
	at += snprintf(line + at, sizeof(line) - at, "S t_ms=%llu ops=%llu phase=%u active=%u bad=%llu",
		       (unsigned long long)now.tv_sec * 1000 + now.tv_nsec / 1000000,
		       (unsigned long long)__atomic_load_n(&sh->ops, __ATOMIC_RELAXED),
		       sh->phase, sh->active,
		       (unsigned long long)__atomic_load_n(&sh->bad, __ATOMIC_RELAXED));
	at += keyed(line + at, sizeof(line) - at, "/proc/vmstat", vmstat_keys);
	at += keyed(line + at, sizeof(line) - at, "/proc/meminfo", meminfo_keys);
	at += snprintf(line + at, sizeof(line) - at, " zswap_pool=%llu zswap_pages=%llu",
		       (unsigned long long)file_u64("/sys/kernel/debug/zswap/pool_total_size"),
		       (unsigned long long)file_u64("/sys/kernel/debug/zswap/stored_pages"));
	file_fields("/sys/block/zram0/mm_stat", f, 3);
	at += snprintf(line + at, sizeof(line) - at, " zram_orig=%llu zram_compr=%llu zram_mem=%llu",
		       (unsigned long long)f[0], (unsigned long long)f[1], (unsigned long long)f[2]);
	file_fields("/sys/block/zram0/stat", f, 3);
	at += snprintf(line + at, sizeof(line) - at, " zram_rd_sectors=%llu",
		       (unsigned long long)f[2]);
	file_fields("/sys/block/vda/stat", f, 3);
	at += snprintf(line + at, sizeof(line) - at, " vda_rd_ios=%llu vda_rd_sectors=%llu",
		       (unsigned long long)f[0], (unsigned long long)f[2]);
	file_fields("/sys/block/vdb/stat", f, 3);
	at += snprintf(line + at, sizeof(line) - at, " vdb_rd_ios=%llu vdb_rd_sectors=%llu",
		       (unsigned long long)f[0], (unsigned long long)f[2]);
	for (i = 0; tmem_keys[i] && at < sizeof(line); i++) {
		snprintf(path, sizeof(path), "/sys/kernel/debug/tmem/%s", tmem_keys[i]);
		at += snprintf(line + at, sizeof(line) - at, " tmem_%s=%llu", tmem_keys[i],
			       (unsigned long long)file_u64(path));
	}
	port_line("%s", line);
}

static void on_term(int sig)
{
	(void)sig;
	stop_sampler = 1;
}

/* The sampler process: a sample at every whole second from its start, one more at the end. */
static pid_t start_sampler(void)
{
	struct timespec at;
	pid_t pid = fork();

	if (pid)
		return pid;
	signal(SIGTERM, on_term);
	clock_gettime(CLOCK_MONOTONIC, &at);
	while (!stop_sampler) {
		sample();
		at.tv_sec++;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR &&
		       !stop_sampler)
			;
	}
	sample();
	_exit(0);
}

/* ------------------------------------------------------------------------- workloads */

static void count_ops(uint64_t n)
{
	__atomic_fetch_add(&sh->ops, n, __ATOMIC_RELAXED);
}

static void count_bad(const char *what, uint64_t page)
{
	if (__atomic_fetch_add(&sh->bad, 1, __ATOMIC_RELAXED) < 5)
		fprintf(stderr, "labload: %s page %llu differs\n", what, (unsigned long long)page);
}

/* Per-working-set stream: the same set gets the same accesses in every mode. */
static uint64_t stream(const struct params *p, uint64_t what)
{
	return mix(p->seed * 1000003 + p->index * 7919 + what);
}

/* Anonymous memory filled with stream `s`; versions all 0. */
static unsigned char *anon_fill(uint64_t pages, uint64_t s)
{
	unsigned char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t i;

	if (mem == MAP_FAILED) {
		perror("labload: mmap");
		return NULL;
	}
	for (i = 0; i < pages; i++)
		fill(mem + i * PAGE, s, i, 0, 0);
	return mem;
}

static void anon_verify(unsigned char *mem, uint64_t pages, uint64_t s, const uint32_t *ver)
{
	unsigned char expect[PAGE];
	uint64_t i;

	for (i = 0; i < pages; i++) {
		fill(expect, s, i, ver ? ver[i] : 0, 0);
		if (memcmp(expect, mem + i * PAGE, PAGE))
			count_bad("anonymous", i);
	}
}

/*
 * An anonymous working set of `mib` with zipf-distributed accesses: each reads and checks a
 * page, and write_pct of them then rewrite it with its next version. Ends with a check of
 * every page.
 */
static int anon_set(const struct params *p, uint64_t mib, uint64_t what)
{
	uint64_t pages = mib * MIB_PAGES, s = stream(p, what), rng = s ^ 0x5eed, i, n;
	unsigned char expect[PAGE], *mem;
	uint32_t *ver = calloc(pages, sizeof(*ver));
	struct zipf z;

	if (!ver || zipf_init(&z, pages, p->zipf / 100.0))
		return -1;
	mem = anon_fill(pages, s);
	if (!mem)
		return -1;
	for (i = 0; i < p->ops; i++) {
		n = zipf_page(&z, &rng);
		fill(expect, s, n, ver[n], 0);
		if (memcmp(expect, mem + n * PAGE, PAGE))
			count_bad("anonymous", n);
		if (next(&rng) % 100 < p->write_pct)
			fill(mem + n * PAGE, s, n, ++ver[n], 0);
		if ((i & 255) == 255)
			count_ops(256);
	}
	count_ops(p->ops & 255);
	anon_verify(mem, pages, s, ver);
	munmap(mem, pages * PAGE);
	free(ver);
	free(z.cdf);
	return 0;
}

/* The file set: written once, then read with zipf-distributed single-page reads. */
static int file_set(const struct params *p)
{
	uint64_t pages = p->file_mib * MIB_PAGES, s = stream(p, 1000), rng = s ^ 0xf11e, i, n;
	unsigned char *buf, expect[PAGE];
	struct zipf z;
	int fd;

	if (posix_memalign((void **)&buf, PAGE, PAGE) || zipf_init(&z, pages, p->zipf / 100.0))
		return -1;
	fd = open(p->file, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		fprintf(stderr, "labload: open %s: %s\n", p->file, strerror(errno));
		return -1;
	}
	for (i = 0; i < pages; i++) {
		fill(buf, s, i, 0, 1);
		if (pwrite(fd, buf, PAGE, i * PAGE) != PAGE) {
			fprintf(stderr, "labload: write %s: %s\n", p->file, strerror(errno));
			return -1;
		}
	}
	if (fsync(fd))
		return -1;
	/* Reads start from the disk: the written pages leave the (whole) page cache. */
	int dc = p->drop_cache ? open("/proc/sys/vm/drop_caches", O_WRONLY) : -1;

	if (dc >= 0) {
		if (write(dc, "1", 1) != 1)
			perror("labload: drop_caches");
		close(dc);
	}
	for (i = 0; i < p->ops; i++) {
		n = zipf_page(&z, &rng);
		if (pread(fd, buf, PAGE, n * PAGE) != PAGE) {
			fprintf(stderr, "labload: read %s: %s\n", p->file, strerror(errno));
			return -1;
		}
		fill(expect, s, n, 0, 1);
		if (memcmp(expect, buf, PAGE))
			count_bad("file", n);
		if ((i & 255) == 255)
			count_ops(256);
	}
	count_ops(p->ops & 255);
	close(fd);
	free(buf);
	free(z.cdf);
	return 0;
}

/*
 * Phase change: one phase per guest; in phase i guest i grows (its working set of ws_mib)
 * while the others idle, holding idle_mib each. All meet at a barrier between phases.
 */
static int phases(const struct params *p)
{
	uint64_t idle = p->idle_mib * MIB_PAGES, s = stream(p, 2000), i;
	unsigned char *held = anon_fill(idle, s);
	char name[32];

	if (!held)
		return -1;
	for (i = 0; i < p->guests; i++) {
		snprintf(name, sizeof(name), "phase-%llu", (unsigned long long)i);
		if (barrier(name))
			return -1;
		sh->phase = i;
		if (i == p->index) {
			sh->active = 1;
			if (anon_set(p, p->ws_mib, 100 + i))
				return -1;
			sh->active = 0;
		}
	}
	if (barrier("end"))
		return -1;
	anon_verify(held, idle, s, NULL);
	return 0;
}

/* Mixed: the anonymous working set and the file set at once (two processes). */
static int mixed(const struct params *p)
{
	int status;
	pid_t pid = fork();

	if (pid < 0)
		return -1;
	if (pid == 0)
		_exit(file_set(p) ? 1 : 0);
	sh->active = 1;
	int r = anon_set(p, p->ws_mib, 100);

	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
		r = -1;
	sh->active = 0;
	return r;
}

/* ---------------------------------------------------------------------------- main */

static int parse(struct params *p, int argc, char **argv)
{
	struct {
		const char *key;
		uint64_t *num;
		char *str;
		size_t len;
	} keys[] = {
		{ "workload", NULL, p->workload, sizeof(p->workload) },
		{ "file", NULL, p->file, sizeof(p->file) },
		{ "port", NULL, p->port, sizeof(p->port) },
		{ "seed", &p->seed, NULL, 0 },
		{ "index", &p->index, NULL, 0 },
		{ "guests", &p->guests, NULL, 0 },
		{ "ws_mib", &p->ws_mib, NULL, 0 },
		{ "idle_mib", &p->idle_mib, NULL, 0 },
		{ "file_mib", &p->file_mib, NULL, 0 },
		{ "ops", &p->ops, NULL, 0 },
		{ "zipf", &p->zipf, NULL, 0 },
		{ "write_pct", &p->write_pct, NULL, 0 },
		{ "drop_cache", &p->drop_cache, NULL, 0 },
	};
	size_t k, nkeys = sizeof(keys) / sizeof(keys[0]);
	int i;

	*p = (struct params){ .seed = 1, .guests = 1, .ws_mib = 64, .idle_mib = 16, .file_mib = 64,
			      .ops = 100000, .zipf = 90, .write_pct = 20 };
	strcpy(p->workload, "anon");
	strcpy(p->file, "/mnt/labfile");
	strcpy(p->port, "/dev/ttyS1");
	for (i = 0; i < argc; i++) {
		char *v = strchr(argv[i], '='), *end;

		if (!v) {
			fprintf(stderr, "labload: '%s' is not KEY=VALUE\n", argv[i]);
			return -1;
		}
		*v++ = 0;
		for (k = 0; k < nkeys && strcmp(argv[i], keys[k].key); k++)
			;
		if (k == nkeys) {
			fprintf(stderr, "labload: unknown key '%s'\n", argv[i]);
			return -1;
		}
		if (keys[k].str) {
			snprintf(keys[k].str, keys[k].len, "%s", v);
			continue;
		}
		*keys[k].num = strtoull(v, &end, 10);
		if (*end || end == v) {
			fprintf(stderr, "labload: %s=%s is not a number\n", argv[i], v);
			return -1;
		}
	}
	if (!p->guests || p->index >= p->guests || !p->ws_mib || !p->file_mib || p->zipf > 500 ||
	    p->write_pct > 100) {
		fprintf(stderr, "labload: bad index, guests, sizes, zipf or write_pct\n");
		return -1;
	}
	return 0;
}

/* The page sequence a working set of the parameters' ws_mib gets, and its checksum. */
static int trace(const struct params *p)
{
	uint64_t pages = p->ws_mib * MIB_PAGES, rng = stream(p, 100) ^ 0x5eed, sum = 0, i, n;
	struct zipf z;

	if (zipf_init(&z, pages, p->zipf / 100.0))
		return 2;
	for (i = 0; i < p->ops; i++) {
		n = zipf_page(&z, &rng);
		int w = next(&rng) % 100 < p->write_pct;

		sum = mix(sum ^ (n << 1 | w));
		printf("%llu%s\n", (unsigned long long)n, w ? " w" : "");
	}
	printf("sum %016llx\n", (unsigned long long)sum);
	return 0;
}

int main(int argc, char **argv)
{
	struct params p;
	struct termios t;
	pid_t sampler;
	int r, status;

	if (argc < 2 || (strcmp(argv[1], "run") && strcmp(argv[1], "trace")) ||
	    parse(&p, argc - 2, argv + 2)) {
		fprintf(stderr, "usage: labload run|trace KEY=VALUE...\n");
		return 2;
	}
	if (!strcmp(argv[1], "trace"))
		return trace(&p);
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return 2;
	port = open(p.port, O_RDWR | O_NOCTTY | O_CREAT | O_APPEND, 0644);
	if (port < 0) {
		fprintf(stderr, "labload: open %s: %s\n", p.port, strerror(errno));
		return 2;
	}
	/* A serial port: raw, no echo (the host's barrier answers must not come back). */
	if (isatty(port) && !tcgetattr(port, &t)) {
		cfmakeraw(&t);
		tcsetattr(port, TCSANOW, &t);
	}
	sampler = start_sampler();
	if (sampler < 0)
		return 2;
	if (!strcmp(p.workload, "anon")) {
		sh->active = 1;
		r = anon_set(&p, p.ws_mib, 100);
	} else if (!strcmp(p.workload, "file")) {
		sh->active = 1;
		r = file_set(&p);
	} else if (!strcmp(p.workload, "phase")) {
		r = phases(&p);
	} else if (!strcmp(p.workload, "mixed")) {
		r = mixed(&p);
	} else {
		fprintf(stderr, "labload: unknown workload '%s'\n", p.workload);
		r = -1;
	}
	sh->active = 0;
	kill(sampler, SIGTERM);
	waitpid(sampler, &status, 0);
	port_line("R workload=%s ops=%llu bad=%llu ok=%d", p.workload,
		  (unsigned long long)sh->ops, (unsigned long long)sh->bad, r == 0 && !sh->bad);
	printf("labload: %s: %llu operations, %llu bad pages%s\n", p.workload,
	       (unsigned long long)sh->ops, (unsigned long long)sh->bad, r ? ", failed" : "");
	return r == 0 && !sh->bad ? 0 : 1;
}
