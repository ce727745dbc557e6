/* The byte-plane kernels of the ``planes`` codec (asyncckpt/codec/planes.py), called through ctypes.
 *
 * split: rotate every little-endian element of `size` bytes left by `rotate` bits, then write
 *        byte p of element k to planes[p * n + k];
 * join:  the inverse (planes back into elements, each rotated right by `rotate` bits);
 * compact and expand: the non-zero elements and a bit mask of where they were, and back (below);
 * pack_low7 and unpack_low7: a plane whose bottom bit is constant, stored in 7 bits a byte (below).
 *
 * Plain loops the compiler vectorizes: about 5x faster than the same work as numpy passes, which
 * matters because every float byte of a checkpoint goes through one of them. Elements are read
 * and written with memcpy, so neither buffer needs to be aligned. Little-endian hosts only (the
 * Python side does not call these elsewhere). It is also a (trivial) extension module, so that
 * setuptools builds it where a compiler is present; without it the codec uses numpy instead.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define ASYNCCKPT_EXPORT __declspec(dllexport)
#else
#define ASYNCCKPT_EXPORT __attribute__((visibility("default")))
#endif

/* One loop per element size, each plane a restrict pointer of its own, so the compiler
 * vectorizes the element loop (a loop over planes inside it would defeat that). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__) && defined(__GLIBC__)
/* An AVX2 build of each loop beside the baseline one, picked by the CPU at load time (glibc's
 * ifunc: elsewhere, the baseline loop alone). */
#define ASYNCCKPT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ASYNCCKPT_CLONES
#endif

static inline uint16_t rot16(uint16_t v, int l) { return (uint16_t)((uint16_t)(v << l) | (uint16_t)(v >> ((16 - l) & 15))); }
static inline uint32_t rot32(uint32_t v, int l) { return (v << l) | (v >> ((32 - l) & 31)); }
static inline uint64_t rot64(uint64_t v, int l) { return (v << l) | (v >> ((64 - l) & 63)); }

ASYNCCKPT_CLONES static void split_16(const uint8_t *raw, size_t n, int l, uint8_t *planes) {
    uint8_t *restrict p0 = planes, *restrict p1 = planes + n;
    for (size_t k = 0; k < n; k++) {
        uint16_t v;
        memcpy(&v, raw + 2 * k, 2);
        v = rot16(v, l);
        p0[k] = (uint8_t)v;
        p1[k] = (uint8_t)(v >> 8);
    }
}

ASYNCCKPT_CLONES static void join_16(const uint8_t *planes, size_t n, int r, uint8_t *out) {
    const uint8_t *restrict p0 = planes, *restrict p1 = planes + n;
    for (size_t k = 0; k < n; k++) {
        uint16_t v = rot16((uint16_t)(p0[k] | (p1[k] << 8)), (16 - r) & 15);
        memcpy(out + 2 * k, &v, 2);
    }
}

ASYNCCKPT_CLONES static void split_32(const uint8_t *raw, size_t n, int l, uint8_t *planes) {
    uint8_t *restrict p0 = planes, *restrict p1 = planes + n, *restrict p2 = planes + 2 * n, *restrict p3 = planes + 3 * n;
    for (size_t k = 0; k < n; k++) {
        uint32_t v;
        memcpy(&v, raw + 4 * k, 4);
        v = rot32(v, l);
        p0[k] = (uint8_t)v;
        p1[k] = (uint8_t)(v >> 8);
        p2[k] = (uint8_t)(v >> 16);
        p3[k] = (uint8_t)(v >> 24);
    }
}

ASYNCCKPT_CLONES static void join_32(const uint8_t *planes, size_t n, int r, uint8_t *out) {
    const uint8_t *restrict p0 = planes, *restrict p1 = planes + n, *restrict p2 = planes + 2 * n, *restrict p3 = planes + 3 * n;
    for (size_t k = 0; k < n; k++) {
        uint32_t v = (uint32_t)p0[k] | ((uint32_t)p1[k] << 8) | ((uint32_t)p2[k] << 16) | ((uint32_t)p3[k] << 24);
        v = rot32(v, (32 - r) & 31);
        memcpy(out + 4 * k, &v, 4);
    }
}

ASYNCCKPT_CLONES static void split_64(const uint8_t *raw, size_t n, int l, uint8_t *planes) {
    uint8_t *restrict p[8];
    for (int i = 0; i < 8; i++) p[i] = planes + (size_t)i * n;
    uint8_t *restrict p0 = p[0], *restrict p1 = p[1], *restrict p2 = p[2], *restrict p3 = p[3];
    uint8_t *restrict p4 = p[4], *restrict p5 = p[5], *restrict p6 = p[6], *restrict p7 = p[7];
    for (size_t k = 0; k < n; k++) {
        uint64_t v;
        memcpy(&v, raw + 8 * k, 8);
        v = rot64(v, l);
        uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
        p0[k] = (uint8_t)lo;
        p1[k] = (uint8_t)(lo >> 8);
        p2[k] = (uint8_t)(lo >> 16);
        p3[k] = (uint8_t)(lo >> 24);
        p4[k] = (uint8_t)hi;
        p5[k] = (uint8_t)(hi >> 8);
        p6[k] = (uint8_t)(hi >> 16);
        p7[k] = (uint8_t)(hi >> 24);
    }
}

ASYNCCKPT_CLONES static void join_64(const uint8_t *planes, size_t n, int r, uint8_t *out) {
    const uint8_t *restrict p0 = planes, *restrict p1 = planes + n, *restrict p2 = planes + 2 * n, *restrict p3 = planes + 3 * n;
    const uint8_t *restrict p4 = planes + 4 * n, *restrict p5 = planes + 5 * n, *restrict p6 = planes + 6 * n, *restrict p7 = planes + 7 * n;
    for (size_t k = 0; k < n; k++) {
        uint32_t lo = (uint32_t)p0[k] | ((uint32_t)p1[k] << 8) | ((uint32_t)p2[k] << 16) | ((uint32_t)p3[k] << 24);
        uint32_t hi = (uint32_t)p4[k] | ((uint32_t)p5[k] << 8) | ((uint32_t)p6[k] << 16) | ((uint32_t)p7[k] << 24);
        uint64_t v = rot64(((uint64_t)hi << 32) | lo, (64 - r) & 63);
        memcpy(out + 8 * k, &v, 8);
    }
}

/* Returns 0, or -1 for a size other than 2, 4, 8 or a rotation outside [0, 8 * size). */
ASYNCCKPT_EXPORT int asyncckpt_split_planes(const uint8_t *raw, size_t n, int size, int rotate, uint8_t *planes) {
    if (rotate < 0 || rotate >= 8 * size) return -1;
    switch (size) {
    case 2: split_16(raw, n, rotate, planes); return 0;
    case 4: split_32(raw, n, rotate, planes); return 0;
    case 8: split_64(raw, n, rotate, planes); return 0;
    default: return -1;
    }
}

ASYNCCKPT_EXPORT int asyncckpt_join_planes(const uint8_t *planes, size_t n, int size, int rotate, uint8_t *out) {
    if (rotate < 0 || rotate >= 8 * size) return -1;
    switch (size) {
    case 2: join_16(planes, n, rotate, out); return 0;
    case 4: join_32(planes, n, rotate, out); return 0;
    case 8: join_64(planes, n, rotate, out); return 0;
    default: return -1;
    }
}

/* compact: the elements of `size` bytes that are not all zero bits, in order, into `out` (room for
 *          all n elements: each element is written, then kept or overwritten); bit k of `mask`
 *          (least significant first, ceil(n / 8) bytes) set where element k is kept. Returns how
 *          many were kept.
 * expand:  the inverse: element k of `out` is the next of the m kept elements where its mask bit
 *          is set, else zero. Returns -1 when the mask sets other than m bits, else 0.
 * compact_from and expand_from go on from element `base` or `k` (a multiple of 8) with m kept or j
 * taken so far: the whole chunk where no vector version runs, the tail after one. */
#define ASYNCCKPT_COMPACT(T, W)                                                                    \
    ASYNCCKPT_CLONES static size_t compact_from_##W(const uint8_t *raw, size_t n, size_t base,     \
                                                    size_t m, uint8_t *out, uint8_t *mask) {       \
        for (; base < n; base += 8) {                                                              \
            size_t end = n - base < 8 ? n - base : 8;                                              \
            unsigned bits = 0;                                                                     \
            for (size_t j = 0; j < end; j++) {                                                     \
                T v;                                                                               \
                memcpy(&v, raw + (base + j) * sizeof(T), sizeof(T));                               \
                memcpy(out + m * sizeof(T), &v, sizeof(T));                                        \
                unsigned keep = v != 0;                                                            \
                bits |= keep << j;                                                                 \
                m += keep;                                                                         \
            }                                                                                      \
            mask[base >> 3] = (uint8_t)bits;                                                       \
        }                                                                                          \
        return m;                                                                                  \
    }                                                                                              \
    /* branchless: a random mask would mispredict every other element (measured 1.5x slower); the \
     * index is clamped so that a mask with too many bits reads in bounds, and fails at the end */ \
    ASYNCCKPT_CLONES static int expand_from_##W(const uint8_t *mask, const uint8_t *kept, size_t m, \
                                                size_t n, size_t k, size_t j, uint8_t *out) {      \
        if (m == 0) return -1;                                                                     \
        for (; k < n; k++) {                                                                       \
            T keep = (T)((mask[k >> 3] >> (k & 7)) & 1);                                           \
            size_t at = j < m ? j : m - 1;                                                         \
            T v;                                                                                   \
            memcpy(&v, kept + at * sizeof(T), sizeof(T));                                          \
            v &= (T)((T)0 - keep);                                                                 \
            memcpy(out + k * sizeof(T), &v, sizeof(T));                                            \
            j += (size_t)keep;                                                                     \
        }                                                                                          \
        return j == m ? 0 : -1;                                                                    \
    }

ASYNCCKPT_COMPACT(uint16_t, 16)
ASYNCCKPT_COMPACT(uint32_t, 32)
ASYNCCKPT_COMPACT(uint64_t, 64)

#if defined(__GNUC__) && defined(__x86_64__)
/* Compaction 8 elements at a time: compare with zero, and move the kept ones to the front of a
 * register with a shuffle looked up by the 8 mask bits (the plain loop above moves one element per
 * step and cost more than the split that follows it). The store writes a whole register at the
 * kept count, never past the elements read so far, so it stays inside `out`. */
#include <immintrin.h>
#define ASYNCCKPT_LEFT_PACK 1

static uint32_t pack_lanes32[256][8];   /* for mask bits b: the lanes of its set bits, in order */
static uint8_t pack_bytes16[256][16];   /* the same as byte indices of 16-bit lanes; 0x80 zeroes */
static uint32_t spread_lanes32[256][8]; /* the inverse: lane i takes kept element popcount(b below i) */
static uint8_t spread_bytes16[256][16]; /* the same as byte indices; 0x80 (a zero) for unset lanes */

__attribute__((constructor)) static void build_pack_tables(void) {
    for (unsigned b = 0; b < 256; b++) {
        unsigned at = 0;
        memset(pack_bytes16[b], 0x80, 16);
        memset(spread_bytes16[b], 0x80, 16);
        for (unsigned lane = 0; lane < 8; lane++) {
            spread_lanes32[b][lane] = at;
            if (b >> lane & 1) {
                pack_lanes32[b][at] = lane;
                pack_bytes16[b][2 * at] = (uint8_t)(2 * lane);
                pack_bytes16[b][2 * at + 1] = (uint8_t)(2 * lane + 1);
                spread_bytes16[b][2 * lane] = (uint8_t)(2 * at);
                spread_bytes16[b][2 * lane + 1] = (uint8_t)(2 * at + 1);
                at++;
            }
        }
    }
}

__attribute__((target("avx2,popcnt"))) static size_t compact_32_avx2(const uint8_t *raw, size_t n, uint8_t *out,
                                                                      uint8_t *mask) {
    const __m256i zero = _mm256_setzero_si256();
    size_t m = 0, base = 0;
    for (; base + 8 <= n; base += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(raw + base * 4));
        unsigned zeros = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(v, zero)));
        unsigned bits = ~zeros & 0xFFu;
        __m256i lanes = _mm256_loadu_si256((const __m256i *)pack_lanes32[bits]);
        _mm256_storeu_si256((__m256i *)(out + m * 4), _mm256_permutevar8x32_epi32(v, lanes));
        m += (size_t)__builtin_popcount(bits);
        mask[base >> 3] = (uint8_t)bits;
    }
    return compact_from_32(raw, n, base, m, out, mask);
}

__attribute__((target("ssse3,popcnt"))) static size_t compact_16_ssse3(const uint8_t *raw, size_t n, uint8_t *out,
                                                                        uint8_t *mask) {
    const __m128i zero = _mm_setzero_si128();
    size_t m = 0, base = 0;
    for (; base + 8 <= n; base += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(raw + base * 2));
        __m128i is_zero = _mm_cmpeq_epi16(v, zero);
        unsigned zeros = (unsigned)_mm_movemask_epi8(_mm_packs_epi16(is_zero, is_zero)) & 0xFFu;
        unsigned bits = ~zeros & 0xFFu;
        __m128i order = _mm_loadu_si128((const __m128i *)pack_bytes16[bits]);
        _mm_storeu_si128((__m128i *)(out + m * 2), _mm_shuffle_epi8(v, order));
        m += (size_t)__builtin_popcount(bits);
        mask[base >> 3] = (uint8_t)bits;
    }
    return compact_from_16(raw, n, base, m, out, mask);
}

/* Expansion 8 elements at a time, while 8 more kept elements are there to read (the loads never
 * pass the m kept elements, whatever the mask says); the plain loop does the rest and checks the
 * count. */
__attribute__((target("avx2,popcnt"))) static int expand_32_avx2(const uint8_t *mask, const uint8_t *kept, size_t m,
                                                                  size_t n, uint8_t *out) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    size_t k = 0, j = 0;
    for (; k + 8 <= n && j + 8 <= m; k += 8) {
        unsigned bits = mask[k >> 3];
        __m256i v = _mm256_loadu_si256((const __m256i *)(kept + j * 4));
        __m256i lanes = _mm256_loadu_si256((const __m256i *)spread_lanes32[bits]);
        __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), lane_bit), lane_bit);
        _mm256_storeu_si256((__m256i *)(out + k * 4), _mm256_and_si256(_mm256_permutevar8x32_epi32(v, lanes), keep));
        j += (size_t)__builtin_popcount(bits);
    }
    return expand_from_32(mask, kept, m, n, k, j, out);
}

__attribute__((target("ssse3,popcnt"))) static int expand_16_ssse3(const uint8_t *mask, const uint8_t *kept, size_t m,
                                                                    size_t n, uint8_t *out) {
    size_t k = 0, j = 0;
    for (; k + 8 <= n && j + 8 <= m; k += 8) {
        unsigned bits = mask[k >> 3];
        __m128i v = _mm_loadu_si128((const __m128i *)(kept + j * 2));
        __m128i order = _mm_loadu_si128((const __m128i *)spread_bytes16[bits]);
        _mm_storeu_si128((__m128i *)(out + k * 2), _mm_shuffle_epi8(v, order));
        j += (size_t)__builtin_popcount(bits);
    }
    return expand_from_16(mask, kept, m, n, k, j, out);
}
#endif

/* Returns the count kept, or (size_t)-1 for a size other than 2, 4 or 8. */
ASYNCCKPT_EXPORT size_t asyncckpt_compact(const uint8_t *raw, size_t n, int size, uint8_t *out, uint8_t *mask) {
#ifdef ASYNCCKPT_LEFT_PACK
    if (size == 4 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return compact_32_avx2(raw, n, out, mask);
    if (size == 2 && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("popcnt")) return compact_16_ssse3(raw, n, out, mask);
#endif
    switch (size) {
    case 2: return compact_from_16(raw, n, 0, 0, out, mask);
    case 4: return compact_from_32(raw, n, 0, 0, out, mask);
    case 8: return compact_from_64(raw, n, 0, 0, out, mask);
    default: return (size_t)-1;
    }
}

ASYNCCKPT_EXPORT int asyncckpt_expand(const uint8_t *mask, const uint8_t *kept, size_t m, size_t n, int size, uint8_t *out) {
    if (m == 0) return -1;
#ifdef ASYNCCKPT_LEFT_PACK
    if (size == 4 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return expand_32_avx2(mask, kept, m, n, out);
    if (size == 2 && __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("popcnt")) return expand_16_ssse3(mask, kept, m, n, out);
#endif
    switch (size) {
    case 2: return expand_from_16(mask, kept, m, n, 0, 0, out);
    case 4: return expand_from_32(mask, kept, m, n, 0, 0, out);
    case 8: return expand_from_64(mask, kept, m, n, 0, 0, out);
    default: return -1;
    }
}

/* pack_low7: when bit 0 of every byte of `plane` (n bytes) is the same (a float's sign after the
 *            rotation, for a tensor of one sign: Adam's exp_avg_sq, variances), write the 7 other
 *            bits of each byte to `out` as one little-endian bit stream (value k in stream bits
 *            [7k, 7k + 7), stream bit j being bit j % 8 of byte j / 8; ceil(7n / 8) bytes, unused
 *            high bits of the last byte 0) and return that bit (0 or 1); else return -1 (`out`
 *            then holds no meaning). Checking stops at the end of the first block of 4 KiB
 *            (ASYNCCKPT_LOW7_BLOCK groups of 8 bytes) that holds both bits.
 * unpack_low7: the inverse, `bit` in bit 0 of every byte.
 * Eight values at a time: the 7-bit fields of a 64-bit word merged pairwise by shifts and masks. */
static inline uint64_t pack8(uint64_t x) {
    x = (x >> 1) & 0x7F7F7F7F7F7F7F7FULL;
    x = (x & 0x007F007F007F007FULL) | ((x & 0x7F007F007F007F00ULL) >> 1);
    x = (x & 0x00003FFF00003FFFULL) | ((x & 0x3FFF00003FFF0000ULL) >> 2);
    return (x & 0x000000000FFFFFFFULL) | ((x & 0x0FFFFFFF00000000ULL) >> 4);
}

static inline uint64_t unpack8(uint64_t x, uint64_t low) {
    x &= 0x00FFFFFFFFFFFFFFULL;
    x = (x & 0x000000000FFFFFFFULL) | ((x & 0x00FFFFFFF0000000ULL) << 4);
    x = (x & 0x00003FFF00003FFFULL) | ((x & 0x0FFFC0000FFFC000ULL) << 2);
    x = (x & 0x007F007F007F007FULL) | ((x & 0x3F803F803F803F80ULL) << 1);
    return (x << 1) | low;
}

#define ASYNCCKPT_LOW7_BLOCK 512 /* groups of 8 bytes between checks that bit 0 is still constant */

ASYNCCKPT_CLONES static int pack_low7(const uint8_t *plane, size_t n, uint8_t *out) {
    if (n == 0) return 0;
    const uint64_t want = (plane[0] & 1) ? 0x0101010101010101ULL : 0;
    size_t groups = n / 8, g = 0;
    while (g < groups) {
        size_t end = groups - g < ASYNCCKPT_LOW7_BLOCK ? groups : g + ASYNCCKPT_LOW7_BLOCK;
        uint64_t differ = 0;
        for (; g < end; g++) {
            uint64_t x;
            memcpy(&x, plane + 8 * g, 8);
            differ |= (x ^ want) & 0x0101010101010101ULL;
            x = pack8(x);
            if (g + 1 < groups)
                memcpy(out + 7 * g, &x, 8); /* its 8th byte is the next group's first, rewritten next */
            else
                memcpy(out + 7 * g, &x, 7);
        }
        if (differ) return -1;
    }
    size_t rest = n - 8 * groups;
    if (rest) {
        uint64_t x = 0, mask = 0;
        memcpy(&x, plane + 8 * groups, rest);
        memset(&mask, 1, rest);
        if ((x ^ want) & mask) return -1;
        x = pack8(x);
        memcpy(out + 7 * groups, &x, (7 * rest + 7) / 8);
    }
    return want ? 1 : 0;
}

ASYNCCKPT_CLONES static void unpack_low7(const uint8_t *packed, size_t n, int bit, uint8_t *plane) {
    const uint64_t low = bit ? 0x0101010101010101ULL : 0;
    size_t groups = n / 8;
    for (size_t g = 0; g + 1 < groups; g++) { /* an 8-byte read stays within the next group */
        uint64_t x;
        memcpy(&x, packed + 7 * g, 8);
        x = unpack8(x, low);
        memcpy(plane + 8 * g, &x, 8);
    }
    if (groups) {
        uint64_t x = 0;
        memcpy(&x, packed + 7 * (groups - 1), 7);
        x = unpack8(x, low);
        memcpy(plane + 8 * (groups - 1), &x, 8);
    }
    size_t rest = n - 8 * groups;
    if (rest) {
        uint64_t x = 0;
        memcpy(&x, packed + 7 * groups, (7 * rest + 7) / 8);
        x = unpack8(x, low);
        memcpy(plane + 8 * groups, &x, rest);
    }
}

ASYNCCKPT_EXPORT int asyncckpt_pack_low7(const uint8_t *plane, size_t n, uint8_t *out) { return pack_low7(plane, n, out); }

ASYNCCKPT_EXPORT void asyncckpt_unpack_low7(const uint8_t *packed, size_t n, int bit, uint8_t *plane) {
    unpack_low7(packed, n, bit, plane);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_planes", "Byte-plane kernels, called through ctypes.", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
