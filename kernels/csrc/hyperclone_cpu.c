/* The noisy HyperClone on the CPU in one pass: draws, noise, add, round, store.
 *
 * Bit-identical to growkit.kernels.hyperclone.naive_hyperclone (the torch reference) and so
 * to the Triton kernel: the draws are the integer hash of noise.py, the noise is one int ->
 * float32 conversion and one IEEE division (correctly rounded, scalar or SIMD), the add is
 * one float32 add (no multiply, so no FMA can fuse; built with -ffp-contract=off anyway),
 * and the rounding to bfloat16 / float16 follows c10's (nearest-even; NaN -> 0x7FC0 /
 * 0x7E00). Never build this with -ffast-math: kernels/cpu_ext.py checks the library's bits
 * against the reference when it loads it, and refuses a library that differs.
 *
 * Layout: rows of the output, out[a, r, b, i] for a < out_repeat (the rows of blocks, block_stride
 * elements apart), r < rows, b < s (the input repeat), i < I, contiguous within a row of blocks;
 * the element's global output index is start + a * block_stride + r * (s * I) + b * I + i. The
 * source row r, of the output's dtype, is read once and divided by the input repeat here (in
 * float32, as torch divides it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MODE_PAIR 0        /* zero_sum, s == 2: block 1 gets minus block 0's draw */
#define MODE_INDEPENDENT 1 /* a draw per element */
#define MODE_ZERO_SUM 2    /* zero_sum, s > 2: s * c_b - sum_k c_k */

#define OUT_F32 0
#define OUT_BF16 1
#define OUT_F16 2

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* u[j] (0..255) of the elements d0 + j, j < n; h is a workspace of n / 4 + 2 words. */
static void draw_bytes(uint64_t d0, int64_t n, uint32_t k0, uint32_t k1, uint32_t *h, uint8_t *u) {
    uint64_t q0 = d0 >> 2;
    int64_t nq = (int64_t)(((d0 + (uint64_t)n - 1) >> 2) - q0 + 1);
    int64_t i = 0;
    while (i < nq) { /* runs of one high word: the key changes every 2**32 hashes */
        uint64_t q = q0 + (uint64_t)i, hi = q >> 32;
        int64_t end = (int64_t)(((hi + 1) << 32) - q0);
        if (end > nq) end = nq;
        uint32_t key = mix32((uint32_t)hi ^ k1) ^ k0, lo = (uint32_t)q;
        for (int64_t j = i; j < end; j++) h[j] = mix32((lo + (uint32_t)(j - i)) * 0x9E3779B9u + key);
        i = end;
    }
    int64_t skip = (int64_t)(d0 & 3); /* byte k of hash q belongs to element 4q + k */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(u, (const uint8_t *)h + skip, (size_t)n); /* byte k of a word is bits 8k..8k+7 */
    return;
#endif
    for (int64_t j = 0; j < n; j++) {
        int64_t b = j + skip;
        u[j] = (uint8_t)(h[b >> 2] >> (8 * (b & 3)));
    }
}

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((bits + (((bits >> 16) & 1) + 0x7FFFu)) >> 16);
}

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
static inline uint16_t to_f16(float f) {
    if (f != f) return 0x7E00;
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}
#else
#define HAVE_F16 0
#endif

static void store(const float *y, int64_t n, void *dst, int out_kind) {
    if (out_kind == OUT_F32) {
        memcpy(dst, y, (size_t)n * 4);
    } else if (out_kind == OUT_BF16) {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) o[i] = to_bf16(y[i]);
    }
#if HAVE_F16
    else {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) o[i] = to_f16(y[i]);
    }
#endif
}

int growkit_supports_f16(void) { return HAVE_F16; }

/* Source row i of kind `kind` (the OUT_* codes) as float32, divided by `divisor` unless it is
 * 1: (float)x / divisor, one IEEE division, as torch divides the float32 copy of a row. */
static void load_row(const void *src, int kind, int64_t n, float divisor, float *w) {
    if (kind == OUT_F32) {
        memcpy(w, src, (size_t)n * 4);
    } else if (kind == OUT_BF16) {
        const uint16_t *b = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)b[i] << 16;
            memcpy(&w[i], &bits, 4);
        }
    }
#if HAVE_F16
    else {
        const _Float16 *h = (const _Float16 *)src;
        for (int64_t i = 0; i < n; i++) w[i] = (float)h[i];
    }
#endif
    if (divisor != 1.0f)
        for (int64_t i = 0; i < n; i++) w[i] = w[i] / divisor;
}

/* Returns 0, or -1 for bad arguments / no memory (nothing written then).
 * src: the source rows, `src_row_stride` elements apart (each row contiguous), of the output's
 * kind; divisor: what a source row is divided by (1: not divided). Each source row is read
 * once for the `out_repeat` rows of blocks it feeds: block row a of output row r starts at
 * element r * s * I + a * block_stride of `out`, global output index start + the same. */
int growkit_hyperclone_noise_rows(const void *src, int64_t src_row_stride, float divisor, int64_t rows, int64_t I,
                                  int64_t s, int mode, int64_t start, int64_t out_repeat, int64_t block_stride,
                                  uint32_t k0, uint32_t k1, float noise_div, void *out, int out_kind) {
    if (rows < 0 || I < 1 || s < 1 || start < 0 || mode < 0 || mode > 2 || out_kind < 0 || out_kind > 2) return -1;
    if (out_kind == OUT_F16 && !HAVE_F16) return -1;
    if (mode == MODE_PAIR && s != 2) return -1;
    if (out_repeat < 1 || (out_repeat > 1 && block_stride < rows * s * I)) return -1;
    int64_t row_len = s * I;
    int64_t draws = mode == MODE_PAIR ? I : row_len; /* elements of a row with a draw of their own */
    size_t esize = out_kind == OUT_F32 ? 4 : 2;
    uint32_t *h = malloc((size_t)(draws / 4 + 2) * 4);
    uint8_t *u = malloc((size_t)draws);
    float *y = malloc((size_t)row_len * 4);
    float *wr = malloc((size_t)I * 4);
    int64_t *c = malloc((size_t)(mode == MODE_ZERO_SUM ? I : 1) * 8);
    if (!h || !u || !y || !c || !wr) {
        free(h); free(u); free(y); free(c); free(wr);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        load_row((const char *)src + (size_t)(r * src_row_stride) * esize, out_kind, I, divisor, wr);
        for (int64_t a = 0; a < out_repeat; a++) {
            int64_t offset = r * row_len + a * block_stride;
            draw_bytes((uint64_t)start + (uint64_t)offset, draws, k0, k1, h, u);
            if (mode == MODE_PAIR) {
                for (int64_t i = 0; i < I; i++) {
                    float n = (float)(2 * (int32_t)u[i] - 255) / noise_div;
                    y[i] = wr[i] + n;
                    y[I + i] = wr[i] - n; /* == wr + (-c) / noise_div, exactly */
                }
            } else if (mode == MODE_INDEPENDENT) {
                for (int64_t b = 0; b < s; b++)
                    for (int64_t i = 0; i < I; i++)
                        y[b * I + i] = wr[i] + (float)(2 * (int32_t)u[b * I + i] - 255) / noise_div;
            } else {
                for (int64_t i = 0; i < I; i++) c[i] = 0;
                for (int64_t b = 0; b < s; b++)
                    for (int64_t i = 0; i < I; i++) c[i] += 2 * (int64_t)u[b * I + i] - 255; /* the sum */
                for (int64_t b = 0; b < s; b++)
                    for (int64_t i = 0; i < I; i++) {
                        int64_t cb = s * (2 * (int64_t)u[b * I + i] - 255) - c[i];
                        y[b * I + i] = wr[i] + (float)cb / noise_div;
                    }
            }
            store(y, row_len, (char *)out + (size_t)offset * esize, out_kind);
        }
    }
    free(h); free(u); free(y); free(c); free(wr);
    return 0;
}
