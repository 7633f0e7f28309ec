// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * memtouch: the guest workload of the VM tests.
 *
 *   memtouch run MIB SEED    fill MIB of anonymous memory, verify it twice, exit 0 if intact
 *   memtouch hold MIB SEED   fill, create /tmp/hold.SEED, wait for SIGUSR1, verify, exit
 *   memtouch rounds MIB SEED N
 *                            fill, then N rounds that check each page and rewrite it with the
 *                            next round's content (a swapped-out page comes back, changes and
 *                            goes out again, to a new slot), then verify the last round
 *   memtouch churn MIB SEED  fill, then until SIGUSR1: push every page out (MADV_PAGEOUT),
 *                            check each and rewrite it with the next round's content; create
 *                            /tmp/churn.SEED after the first round; verify the last round
 *
 * With MEMTOUCH_THP set, anonymous memory is advised huge (transparent huge pages). With
 * MEMTOUCH_PAGEOUT set, run and hold push their pages out to swap (MADV_PAGEOUT) once filled:
 * only this process's pages, with no memory pressure on the rest of the guest.
 *   memtouch write FILE MIB SEED    write MIB of file pages in place (no truncation), fsync
 *   memtouch dwrite FILE MIB SEED   the same with O_DIRECT, bypassing the page cache
 *   memtouch verify FILE MIB SEED [VALID_MIB]
 *                            read FILE (MIB long) through the page cache and check every page;
 *                            pages from VALID_MIB on must be zero (a truncated and extended file)
 *
 * Every page's content is a function of (seed, page number), so it can be regenerated to
 * verify. Pages are of varied kinds, like real memory: zero (10 %), same-filled (10 %),
 * text (30 %), binary-like low-entropy records (30 %) and random (20 %). File pages have no
 * random kind (binary instead): clean page-cache pages that do not compress are refused by the
 * host, and the page-cache tests want pages that it keeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static volatile sig_atomic_t released;
static int file_pages;

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static const char *const words[] = {
	"the", "swap", "page", "memory", "host", "guest", "virtio", "queue",
	"kernel", "compress", "tmem", "pool", "object", "index", "flush", "put",
	"get", "of", "and", "a", "to", "in", "is", "that", "for", "with",
};

enum kind { ZERO, SAME, TEXT, BINARY, RANDOM, KINDS };

static enum kind kind_of(uint64_t h)
{
	unsigned int k = h % 10;

	if (k == 0)
		return ZERO;
	if (k == 1)
		return SAME;
	if (k < 5)
		return TEXT;
	if (k < 8)
		return BINARY;
	return RANDOM;
}

static enum kind fill(unsigned char *p, uint64_t seed, uint64_t n)
{
	uint64_t h = mix(seed * 0x9e3779b97f4a7c15ULL + n), x = h | 1;
	enum kind kind = kind_of(h);
	size_t i, len, at = 0;

	if (file_pages && kind == RANDOM)
		kind = BINARY;
	uint64_t *w = (uint64_t *)p;

	switch (kind) {
	case ZERO:
		memset(p, 0, PAGE);
		break;
	case SAME:
		for (i = 0; i < PAGE / 8; i++)
			w[i] = h;
		break;
	case TEXT:
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
		break;
	case BINARY:
		/* 16-byte records: a counter, a small flag word, a pointer-like value. */
		for (i = 0; i < PAGE / 16; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			w[2 * i] = (n << 8) + i;
			w[2 * i + 1] = 0x00007f0000000000ULL + ((x & 0xfff) << 4);
		}
		break;
	case RANDOM:
		for (i = 0; i < PAGE / 8; i++) {
			x ^= x << 13, x ^= x >> 7, x ^= x << 17;
			w[i] = x;
		}
		break;
	default:
		break;
	}
	return kind;
}

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

/*
 * Reclaims PAGES pages at MEM now (anonymous pages go to swap) and says how many are still
 * resident (mincore: in RAM or in the swap cache). Returns -1 if the kernel refused.
 */
static int page_out(unsigned char *mem, uint64_t pages, int quiet)
{
	static unsigned char *vec;
	static uint64_t vec_pages;
	uint64_t i, resident = 0;

	if (madvise(mem, pages * PAGE, MADV_PAGEOUT)) {
		perror("memtouch: madvise(MADV_PAGEOUT)");
		return -1;
	}
	if (quiet)
		return 0;
	if (vec_pages < pages) {
		free(vec);
		vec = malloc(pages);
		vec_pages = vec ? pages : 0;
	}
	if (!vec || mincore(mem, pages * PAGE, vec)) {
		perror("memtouch: mincore");
		return -1;
	}
	for (i = 0; i < pages; i++)
		resident += vec[i] & 1;
	printf("memtouch: paged out %llu of %llu pages\n", (unsigned long long)(pages - resident),
	       (unsigned long long)pages);
	fflush(stdout);
	return 0;
}

static void on_usr1(int sig)
{
	(void)sig;
	released = 1;
}

/* Verifies every page in the given direction; returns the number of bad pages. */
static uint64_t verify(unsigned char *mem, uint64_t pages, uint64_t seed, int backwards)
{
	unsigned char expect[PAGE];
	uint64_t i, n, bad = 0;

	for (i = 0; i < pages; i++) {
		n = backwards ? pages - 1 - i : i;
		fill(expect, seed, n);
		if (memcmp(expect, mem + n * PAGE, PAGE)) {
			if (bad < 5)
				fprintf(stderr, "memtouch: page %llu differs\n", (unsigned long long)n);
			bad++;
		}
	}
	return bad;
}

/*
 * Round r of check-and-rewrite: expects seed + r - 1 and writes seed + r, so every byte is
 * checked once per round and every swapped-out page is brought back and changed. Adds the
 * pages that differed to *bad (the first five are named).
 */
static void check_rewrite(unsigned char *mem, uint64_t pages, uint64_t seed, uint64_t r,
			  uint64_t *bad)
{
	unsigned char expect[PAGE];
	uint64_t i;

	for (i = 0; i < pages; i++) {
		fill(expect, seed + r - 1, i);
		if (memcmp(expect, mem + i * PAGE, PAGE)) {
			if (*bad < 5)
				fprintf(stderr, "memtouch: round %llu: page %llu differs\n",
					(unsigned long long)r, (unsigned long long)i);
			(*bad)++;
		}
		fill(mem + i * PAGE, seed + r, i);
	}
}

static uint64_t rewrite_rounds(unsigned char *mem, uint64_t pages, uint64_t seed, uint64_t rounds)
{
	uint64_t r, bad = 0;

	for (r = 1; r <= rounds; r++) {
		check_rewrite(mem, pages, seed, r, &bad);
		printf("memtouch: round %llu of %llu done\n", (unsigned long long)r,
		       (unsigned long long)rounds);
		fflush(stdout);
	}
	return bad + verify(mem, pages, seed + rounds, 1);
}

/*
 * Pages out and rewrites round after round until SIGUSR1, so that swap-outs and swap-ins are
 * under way whenever the signal's sender acts (device-loss kills the daemon meanwhile).
 */
static uint64_t churn(unsigned char *mem, uint64_t pages, uint64_t seed)
{
	uint64_t r, bad = 0;
	char ready[64];
	FILE *f;

	signal(SIGUSR1, on_usr1);
	for (r = 1; !released; r++) {
		if (page_out(mem, pages, r > 1))
			return pages;
		check_rewrite(mem, pages, seed, r, &bad);
		if (r == 1) {
			snprintf(ready, sizeof(ready), "/tmp/churn.%llu", (unsigned long long)seed);
			f = fopen(ready, "w");
			if (!f) {
				perror("memtouch: ready file");
				return pages;
			}
			fclose(f);
		}
	}
	printf("memtouch: churned %llu rounds\n", (unsigned long long)(r - 1));
	return bad + verify(mem, pages, seed + r - 1, 0);
}

static int file_write(const char *path, uint64_t pages, uint64_t seed, int direct)
{
	unsigned char *buf;
	uint64_t n;
	int fd;

	if (posix_memalign((void **)&buf, PAGE, PAGE))
		return 2;
	fd = open(path, O_WRONLY | O_CREAT | (direct ? O_DIRECT : 0), 0644);
	if (fd < 0) {
		fprintf(stderr, "memtouch: open %s: %s\n", path, strerror(errno));
		return 2;
	}
	for (n = 0; n < pages; n++) {
		fill(buf, seed, n);
		if (pwrite(fd, buf, PAGE, n * PAGE) != PAGE) {
			fprintf(stderr, "memtouch: write %s page %llu: %s\n", path,
				(unsigned long long)n, strerror(errno));
			return 2;
		}
	}
	if (fsync(fd) || close(fd)) {
		fprintf(stderr, "memtouch: fsync %s: %s\n", path, strerror(errno));
		return 2;
	}
	printf("memtouch: wrote %llu pages of seed %llu to %s%s\n", (unsigned long long)pages,
	       (unsigned long long)seed, path, direct ? " (O_DIRECT)" : "");
	return 0;
}

static int file_verify(const char *path, uint64_t pages, uint64_t seed, uint64_t valid)
{
	static unsigned char buf[16 * PAGE];
	unsigned char expect[PAGE];
	uint64_t n = 0, bad = 0, i, got;
	ssize_t r;
	int fd;

	fd = open(path, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "memtouch: open %s: %s\n", path, strerror(errno));
		return 2;
	}
	for (;;) {
		r = read(fd, buf, sizeof(buf));
		if (r < 0) {
			fprintf(stderr, "memtouch: read %s: %s\n", path, strerror(errno));
			return 2;
		}
		if (r == 0)
			break;
		if (r % PAGE) {
			fprintf(stderr, "memtouch: %s: short read of %zd bytes\n", path, r);
			return 2;
		}
		got = r / PAGE;
		for (i = 0; i < got; i++, n++) {
			if (n < valid)
				fill(expect, seed, n);
			else
				memset(expect, 0, PAGE);
			if (n >= pages || memcmp(expect, buf + i * PAGE, PAGE)) {
				if (bad < 5)
					fprintf(stderr, "memtouch: %s page %llu differs\n", path,
						(unsigned long long)n);
				bad++;
			}
		}
	}
	close(fd);
	if (n != pages) {
		fprintf(stderr, "memtouch: %s has %llu pages, expected %llu\n", path,
			(unsigned long long)n, (unsigned long long)pages);
		return 1;
	}
	if (bad) {
		printf("memtouch: %s: %llu bad pages\n", path, (unsigned long long)bad);
		return 1;
	}
	printf("memtouch: %s: %llu pages verified\n", path, (unsigned long long)pages);
	return 0;
}

/*
 * Anonymous memory for PAGES pages. With MEMTOUCH_THP set it is 2 MiB aligned and advised
 * huge (a kernel without madvise relies on THP "always"), so that the kernel backs it with
 * transparent huge pages.
 */
static unsigned char *map_anon(uint64_t pages)
{
	const uint64_t huge = 2 << 20;
	int thp = getenv("MEMTOUCH_THP") != NULL;
	uint64_t len = pages * PAGE + (thp ? huge : 0);
	unsigned char *mem;

	mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("memtouch: mmap");
		return NULL;
	}
	if (thp) {
		mem = (unsigned char *)(((uintptr_t)mem + huge - 1) & ~(uintptr_t)(huge - 1));
		if (madvise(mem, pages * PAGE, MADV_HUGEPAGE) && errno != ENOSYS) {
			perror("memtouch: madvise(MADV_HUGEPAGE)");
			return NULL;
		}
	}
	return mem;
}

int main(int argc, char **argv)
{
	uint64_t counts[KINDS] = { 0 }, pages, seed, i, bad, rounds = 0;
	unsigned char *mem;
	char ready[64];
	int hold;

	if ((argc == 5 || argc == 6) && !strcmp(argv[1], "verify")) {
		file_pages = 1;
		pages = strtoull(argv[3], NULL, 10) * (1024 * 1024 / PAGE);
		return file_verify(argv[2], pages, strtoull(argv[4], NULL, 10),
				   argc == 6 ? strtoull(argv[5], NULL, 10) * (1024 * 1024 / PAGE) : pages);
	}
	if (argc == 5 && (!strcmp(argv[1], "write") || !strcmp(argv[1], "dwrite"))) {
		file_pages = 1;
		pages = strtoull(argv[3], NULL, 10) * (1024 * 1024 / PAGE);
		return file_write(argv[2], pages, strtoull(argv[4], NULL, 10), argv[1][0] == 'd');
	}
	if (argc == 5 && !strcmp(argv[1], "rounds"))
		rounds = strtoull(argv[4], NULL, 10);
	else if (argc != 4 ||
		 (strcmp(argv[1], "run") && strcmp(argv[1], "hold") && strcmp(argv[1], "churn"))) {
		fprintf(stderr, "usage: memtouch run|hold|churn MIB SEED | rounds MIB SEED N |\n"
				"       write|dwrite FILE MIB SEED | verify FILE MIB SEED [VALID_MIB]\n");
		return 2;
	}
	hold = !strcmp(argv[1], "hold");
	pages = strtoull(argv[2], NULL, 10) * (1024 * 1024 / PAGE);
	seed = strtoull(argv[3], NULL, 10);
	mem = map_anon(pages);
	if (!mem)
		return 2;
	for (i = 0; i < pages; i++)
		counts[fill(mem + i * PAGE, seed, i)]++;
	printf("memtouch: filled %llu pages (zero %llu, same %llu, text %llu, binary %llu, random %llu)\n",
	       (unsigned long long)pages, (unsigned long long)counts[ZERO],
	       (unsigned long long)counts[SAME], (unsigned long long)counts[TEXT],
	       (unsigned long long)counts[BINARY], (unsigned long long)counts[RANDOM]);
	fflush(stdout);
	if (getenv("MEMTOUCH_PAGEOUT") && page_out(mem, pages, 0))
		return 2;

	if (!strcmp(argv[1], "churn")) {
		bad = churn(mem, pages, seed);
	} else if (hold) {
		signal(SIGUSR1, on_usr1);
		snprintf(ready, sizeof(ready), "/tmp/hold.%llu", (unsigned long long)seed);
		FILE *f = fopen(ready, "w");

		if (!f) {
			perror("memtouch: ready file");
			return 2;
		}
		fclose(f);
		/* sleep(), not pause(): a signal that lands before the call is not missed. */
		while (!released)
			sleep(1);
		bad = verify(mem, pages, seed, 0);
	} else if (rounds) {
		bad = rewrite_rounds(mem, pages, seed, rounds);
	} else {
		bad = verify(mem, pages, seed, 0);
		bad += verify(mem, pages, seed, 1);
	}
	if (bad) {
		printf("memtouch: %llu bad pages\n", (unsigned long long)bad);
		return 1;
	}
	printf("memtouch: %llu pages verified\n", (unsigned long long)pages);
	return 0;
}
