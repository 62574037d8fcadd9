/* The CPU kernel of DynamicConv's inference forward.
 *
 * In eval mode `DynamicConv.mix` is one matrix product (the patches times every linear map of
 * the layer, see fast.py's `_fold_batchnorm`) followed by, per output channel o and patch j:
 *
 *     h1  = act1(lin1[o, :, j])                      HybridDense activation (BatchNorm folded)
 *     h2  = act2(w2[o] @ h1 + b2[o])                 second HybridDense
 *     out = (h2 . proj[o, :, j] + kb[o, j]) / P + similar[o, j]
 *
 * with act(v) = copysign(|scale| * (relu(v) + eps) ** power, v), NaN -> 0, inf -> max float.
 * PyTorch runs this as the product and then about twenty passes over (O, H, N) tensors; here
 * one task (an output channel and 64 patches) computes its rows of the product and everything
 * after them, with its values in the L1 cache. The power is 2 ** (power * log2(x) + log2 |scale|),
 * with an exponent/mantissa split and polynomial log2 and exp2: relative error about 1e-6
 * (float32 itself resolves 6e-8).
 *
 * Three variants of the same steps, one chosen per call (fast.py asks for the best that
 * `VARIANTS` lists, the CPU's features read once at import):
 *   avx512    x86-64 with AVX-512 F/BW/VL: getexp/getmant/scalef, 16 lanes, VNNI where present;
 *   avx2      x86-64 with AVX2 + FMA: the same arithmetic on 8 lanes, the exponent split and 2^n
 *             done on the float's bits, rounded once as scalef rounds: avx512's results exactly;
 *   portable  plain C the compiler vectorizes for its baseline (NEON on ARM64, SSE2 on x86-64),
 *             the same steps within float32's rounding (without FMA some round twice).
 * The encoder's integer product gives the same 32-bit sums in all three (they are exact).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64       /* patches per task: four AVX-512 vectors; n is a multiple (fast.BLOCK) */
#define MAX_HIDDEN 64  /* hidden features per output channel that the stack buffers hold */
#define TILE 6         /* weight rows per step of the integer product: 4 x 6 AVX-512 accumulators */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"))) /* every AVX-512 CPU but Xeon Phi */
#define AVX2 __attribute__((target("avx2,fma")))
#else
#define HAVE_X86 0
#endif
#define PORTABLE /* no target attribute: the compiler's baseline */

/* log2(1 + t) / t for t in [-0.25, 0.5] and 2 ** f for f in [-0.5, 0.5]: Chebyshev fits of
   degree 7 and 5, errors 1.5e-7 and 2.5e-7. */
#define L0 1.4426952600479126f
#define L1 -0.7213506698608398f
#define L2 0.4808475077152252f
#define L3 -0.3603352904319763f
#define L4 0.29007357358932495f
#define L5 -0.2506524324417114f
#define L6 0.20412781834602356f
#define L7 -0.09616420418024063f
/* Horner on each of `chains` vectors x[i], in one instruction set's fmadd and set1: q = c5 x^5 + ... + c0
   (HORNER6, six coefficients) or c7 x^7 + ... + c0 (HORNER8) */
#define HORNER_STEP(chains, fmadd, set1, x, c) \
    for (int i = 0; i < (chains); i++) q[i] = fmadd(q[i], x[i], set1(c))
#define HORNER6(chains, fmadd, set1, x, c5, c4, c3, c2, c1, c0)                  \
    do {                                                                          \
        for (int i = 0; i < (chains); i++) q[i] = fmadd(set1(c5), x[i], set1(c4)); \
        HORNER_STEP(chains, fmadd, set1, x, c3);                                  \
        HORNER_STEP(chains, fmadd, set1, x, c2);                                  \
        HORNER_STEP(chains, fmadd, set1, x, c1);                                  \
        HORNER_STEP(chains, fmadd, set1, x, c0);                                  \
    } while (0)
#define HORNER8(chains, fmadd, set1, x, c7, c6, c5, c4, c3, c2, c1, c0) \
    do {                                                                  \
        HORNER6(chains, fmadd, set1, x, c7, c6, c5, c4, c3, c2);          \
        HORNER_STEP(chains, fmadd, set1, x, c1);                          \
        HORNER_STEP(chains, fmadd, set1, x, c0);                          \
    } while (0)
#define X0 1.0000001192092896f
#define X1 0.6931471824645996f
#define X2 0.2402210682630539f
#define X3 0.05550327152013779f
#define X4 0.009676038287580013f
#define X5 0.0013400432653725147f
#define MAX_FLOAT 3.402823466e38f
/* 2^n without scalef: n clamped to [N_LOW, N_HIGH] (beyond, q * 2^n is 0 or infinite anyway) and
   applied as 2^n1 * 2^n2, n1 in [-124, 127] so that q * 2^n1 is exact: one rounding, as scalef. */
#define N_LOW -250.0f
#define N_HIGH 254.0f
#define MANTISSA_OFFSET 0x3f400000 /* the bits of 0.75f: a - this, shifted, is the exponent of a = 2^e m, m in [0.75, 1.5) */

typedef struct {
    float *out; /* O rows, out_stride apart */
    int64_t out_stride, channels, hidden;
    const float *power1, *log2_scale1, *w2, *b2, *power2, *log2_scale2; /* per (o, h); w2 is (O, H, H) */
    float eps1, eps2, inv_patch;
    int threads;
} Mix;

/* The encoder's whole forward from 8-bit pixels: `mix` with its matrix product done here too.
 *
 * In float32 the product of the patches with the layer's linear maps takes two thirds of an
 * encode. Here it runs on integer units instead: the pixels are exact 8-bit integers and the
 * weights are rounded to 16 bits per row (`fast.integer_weights`), so one instruction multiplies
 * and adds two pairs per 32-bit lane exactly (AVX-512 VNNI's `vpdpwssd`, or `vpmaddwd` plus
 * `vpaddd` on AVX-512 or AVX2 CPUs without VNNI, or plain C: the same sums), and the patches are
 * never copied out as floats. Only the weights' rounding differs from float32: relative 1e-5,
 * against the 8-bit latent's step of 4e-3.
 *
 * Per block of 64 patches: gather the pixels as 16-bit pairs, transposed (one row per pair
 * position, one lane per patch), multiply by TILE weight rows at a time into vector
 * accumulators, scale back to float into the block's rows, and run `mix_task` on them. */
typedef struct {
    const uint8_t *pixels; /* (B, H, W, C), contiguous */
    int64_t height, width, channels, k, out_h, out_w, n; /* n patches: B * out_h * out_w */
    const int32_t *weight; /* (tiles, pairs, TILE): 16-bit weight pairs, rows padded to whole tiles */
    const float *row_scale, *row_bias; /* per row: linear = acc * row_scale + row_bias */
    int64_t rows, pairs; /* rows of `linear` (2*O*H + 2*O); pairs = k * k * C / 2 */
    int vnni;            /* use vpdpwssd (the CPU has AVX-512 VNNI) */
    Mix mix;             /* linear and n unused: every block brings its own */
    int32_t *sums;       /* NULL, or (blocks, rows, BLOCK): the integer sums alone, for the tests */
} PixelMix;

/* The whole forward from float patches: the matrix product done per task too, into the L1 cache.
 *
 * A task is one output channel o and one block of patches. Its rows of the product (lin1, proj,
 * kb and similar: 2H + 2 of them) are computed from the block's patches and o's weights into a
 * buffer of the task, and `mix_task` runs on them at once: no (2*O*H + 2*O, n) matrix is ever
 * written to memory and read back, and every variant sums each row in the same order (one fused
 * multiply-add per patch value, first to last), so avx2 gives avx512's results exactly. Tasks go
 * by groups of GROUP blocks, o after o within one: the group's patches stay in the L2 cache and
 * o's weights in the L1. */
#define GROUP 8
typedef struct PatchMix {
    const float *patches; /* (n / BLOCK, k, BLOCK): each block's patches transposed, the constant 1 last */
    int64_t k, n;         /* k = P + 1; n a multiple of BLOCK */
    const float *weight;  /* (O, tiles, k, TILE): o's rows lin1, proj, kb, similar, padded to whole tiles */
    int64_t tiles;
    Mix mix;
} PatchMix;

/* One variant's steps; the loops over tasks and blocks (`patch_mix`, `pixel_mix`) call them. */
typedef struct {
    const char *name;
    void (*activation)(const float *x, float *y, float power, float log2_scale, float eps);
    void (*mix_task)(const Mix *m, const float *lin1, const float *proj, const float *kb, const float *similar,
                     int64_t stride, int64_t o, int64_t j);
    void (*product)(const struct PatchMix *e, const float *weight, int64_t j, float *rows);
    void (*gather_pairs)(const PixelMix *e, int64_t j0, int32_t *pairs);
    void (*multiply)(const PixelMix *e, const int32_t *pairs, float *linear);
    void (*multiply_vnni)(const PixelMix *e, const int32_t *pairs, float *linear); /* NULL: none */
} Variant;

/* lin2[0] = b0 + w0 . h1 and lin2[1] = b1 + w1 . h1 for one block: plain loops the compiler
   vectorizes (AVX-512 keeps the 2 x 4 accumulators in registers). */
#define DENSE2_C(lin2, h1, w0, w1, b0, b1, hidden)                                                                    \
    {                                                                                                                \
        for (int i = 0; i < BLOCK; i++) {                                                                            \
            lin2[0][i] = b0;                                                                                         \
            lin2[1][i] = b1;                                                                                         \
        }                                                                                                            \
        for (int64_t k = 0; k < hidden; k++) {                                                                       \
            const float *hk = h1 + k * BLOCK;                                                                        \
            for (int i = 0; i < BLOCK; i++) {                                                                        \
                lin2[0][i] += w0[k] * hk[i];                                                                         \
                lin2[1][i] += w1[k] * hk[i];                                                                         \
            }                                                                                                        \
        }                                                                                                            \
    }

/* Output channel o for patches j .. j + BLOCK, from its matrix-product rows: H rows lin1, H rows
   proj, and the rows kb and similar, each `stride` values apart. The second dense layer runs two
   rows at a time: eight independent accumulator chains, and each hidden value loaded once for
   both. The same C for every variant, compiled for its instruction set (the loops over a block
   vectorize) around its activation. */
#define MIX_TASK(name, TARGET, activation, DENSE2)                                                                    \
    TARGET static void name(const Mix *m, const float *lin1, const float *proj, const float *kb,                     \
                            const float *similar, int64_t stride, int64_t o, int64_t j) {                            \
        const int64_t hidden = m->hidden;                                                                            \
        float h1[MAX_HIDDEN * BLOCK], lin2[2][BLOCK], h2[BLOCK], acc[BLOCK];                                         \
        for (int64_t k = 0; k < hidden; k++) {                                                                       \
            const int64_t r = o * hidden + k;                                                                        \
            activation(lin1 + k * stride, h1 + k * BLOCK, m->power1[r], m->log2_scale1[r], m->eps1);                 \
        }                                                                                                            \
        for (int i = 0; i < BLOCK; i++) acc[i] = 0.0f;                                                               \
        for (int64_t h = 0; h < hidden; h += 2) {                                                                    \
            const int64_t r0 = o * hidden + h, r1 = h + 1 < hidden ? r0 + 1 : r0; /* an odd last row pairs with itself */ \
            const float *w0 = m->w2 + r0 * hidden, *w1 = m->w2 + r1 * hidden;                                        \
            DENSE2(lin2, h1, w0, w1, m->b2[r0], m->b2[r1], hidden);                                                  \
            for (int64_t r = r0; r <= r1; r++) {                                                                     \
                activation(lin2[r - r0], h2, m->power2[r], m->log2_scale2[r], m->eps2);                              \
                const float *p = proj + (r - o * hidden) * stride;                                                   \
                for (int i = 0; i < BLOCK; i++) acc[i] += h2[i] * p[i];                                              \
            }                                                                                                        \
        }                                                                                                            \
        float *dst = m->out + o * m->out_stride + j;                                                                 \
        for (int i = 0; i < BLOCK; i++) dst[i] = (acc[i] + kb[i]) * m->inv_patch + similar[i];                       \
    }

/* Where each of the block's patches starts its window in the pixels; patches past the end repeat the last. */
static void window_offsets(const PixelMix *e, int64_t j0, int32_t *offset) {
    int64_t b = j0 / (e->out_h * e->out_w), oy = j0 / e->out_w % e->out_h, ox = j0 % e->out_w;
    for (int64_t i = 0, j = j0; i < BLOCK; i++) {
        offset[i] = (int32_t)(((b * e->height + oy * e->k) * e->width + ox * e->k) * e->channels);
        if (++j < e->n && ++ox == e->out_w) {
            ox = 0;
            if (++oy == e->out_h) oy = 0, b++;
        }
    }
}

#if HAVE_X86
/* ------------------------------------------------------------------ AVX-512 */

/* y = act(x) for one block: 4 vectors of 16 lanes. getexp/getmant split x into exponent and
   mantissa; scalef applies 2^n and handles overflow and infinity itself. Each step runs over the
   4 vectors before the next: 4 independent chains the CPU overlaps (the polynomials alone are 12
   dependent multiply-adds), 15-25% faster than one vector after the other. */
#define LANES 4 /* BLOCK / 16 */
AVX512 static inline void activation_avx512(const float *x, float *y, float power, float log2_scale, float eps) {
    const __m512 p = _mm512_set1_ps(power), s = _mm512_set1_ps(log2_scale);
    __m512 v[LANES], m[LANES], e[LANES], t[LANES], q[LANES], frac[LANES], n[LANES], f[LANES];
    for (int i = 0; i < LANES; i++) {
        v[i] = _mm512_loadu_ps(x + 16 * i);
        __m512 a = _mm512_add_ps(_mm512_max_ps(v[i], _mm512_setzero_ps()), _mm512_set1_ps(eps));
        m[i] = _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero); /* a = 2^e m */
        e[i] = _mm512_sub_ps(_mm512_getexp_ps(a), _mm512_getexp_ps(m[i]));
        t[i] = _mm512_sub_ps(m[i], _mm512_set1_ps(1.0f));
    }
    HORNER8(LANES, _mm512_fmadd_ps, _mm512_set1_ps, t, L7, L6, L5, L4, L3, L2, L1, L0);
    for (int i = 0; i < LANES; i++) { /* power * log2(a) + log2 |scale| = n + f, f in [-0.5, 0.5] */
        frac[i] = _mm512_fmadd_ps(p, _mm512_mul_ps(q[i], t[i]), s);
        n[i] = _mm512_roundscale_ps(_mm512_fmadd_ps(p, e[i], frac[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        f[i] = _mm512_add_ps(_mm512_fmsub_ps(p, e[i], n[i]), frac[i]); /* power * e - n, rounded once */
    }
    HORNER6(LANES, _mm512_fmadd_ps, _mm512_set1_ps, f, X5, X4, X3, X2, X1, X0);
    for (int i = 0; i < LANES; i++) {
        /* min: inf -> max float, and the NaN that x = inf makes (inf - inf) -> max float too */
        __m512 r = _mm512_min_ps(_mm512_scalef_ps(q[i], n[i]), _mm512_set1_ps(MAX_FLOAT));
        __mmask16 number = _mm512_cmp_ps_mask(v[i], v[i], _CMP_ORD_Q);
        /* bit select: magnitude of r, sign of x; NaN x -> 0 */
        __m512i bits = _mm512_maskz_ternarylogic_epi32(number, _mm512_set1_epi32(0x7fffffff), _mm512_castps_si512(r),
                                                       _mm512_castps_si512(v[i]), 0xca);
        _mm512_storeu_ps(y + 16 * i, _mm512_castsi512_ps(bits));
    }
}

MIX_TASK(mix_task_avx512, AVX512, activation_avx512, DENSE2_C)

/* The block's pixels as `pairs` (pairs, BLOCK) of 32-bit lanes, each two 16-bit pixel values. */
AVX512 static void gather_pairs_avx512(const PixelMix *e, int64_t j0, int32_t *pairs) {
    const int64_t row_bytes = e->k * e->channels, row_stride = e->width * e->channels;
    int32_t offset[BLOCK];
    window_offsets(e, j0, offset);
    /* 4 bytes (b0, b1, b2, b3) of one window row -> pairs (b0, b2) and (b1, b3), 16 bits each: the
       weights are packed in the same order (`fast.integer_weights`) */
    const __m512i even = _mm512_set1_epi32(0x00ff00ff);
    for (int64_t ky = 0; ky < e->k; ky++) {
        for (int64_t d = 0; d < row_bytes / 4; d++) {
            const int64_t pair = (ky * row_bytes + 4 * d) / 2;
            const __m512i shift = _mm512_set1_epi32((int32_t)(ky * row_stride + 4 * d));
            for (int v = 0; v < BLOCK / 16; v++) {
                const __m512i where = _mm512_add_epi32(_mm512_loadu_si512(offset + 16 * v), shift);
                const __m512i bytes = _mm512_i32gather_epi32(where, e->pixels, 1);
                _mm512_storeu_si512(pairs + pair * BLOCK + 16 * v, _mm512_and_si512(bytes, even));
                _mm512_storeu_si512(pairs + (pair + 1) * BLOCK + 16 * v, _mm512_and_si512(_mm512_srli_epi32(bytes, 8), even));
            }
        }
    }
}

/* acc + the products of a's and b's 16-bit pairs. Inline assembly: GCC 12 moves the accumulator of
   `_mm512_dpwssd_epi32` through a scratch register and the stack at every step, which halves the
   speed. Only ever run where the CPU has VNNI. */
AVX512 static inline __m512i dot_pairs_vnni(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

AVX512 static inline __m512i dot_pairs_avx512(__m512i acc, __m512i a, __m512i b) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); /* no overflow: one factor is a pixel, 0..255 */
}

/* linear (rows, BLOCK) = weight . pairs, scaled back to float, with `DOT` as the multiply-add.
   24 named accumulators: compilers spill an array of them to the stack. */
#define MULTIPLY(name, DOT)                                                                                           \
    AVX512 __attribute__((noinline)) static void name(const PixelMix *e, const int32_t *pairs, float *linear) {       \
        for (int64_t t = 0; t * TILE < e->rows; t++) {                                                               \
            DECLARE(0) DECLARE(1) DECLARE(2) DECLARE(3) DECLARE(4) DECLARE(5)                                         \
            const int32_t *w = e->weight + t * e->pairs * TILE;                                                       \
            for (int64_t p = 0; p < e->pairs; p++, w += TILE) {                                                       \
                const int32_t *x = pairs + p * BLOCK;                                                                 \
                const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 16),                            \
                              x2 = _mm512_loadu_si512(x + 32), x3 = _mm512_loadu_si512(x + 48);                       \
                STEP(DOT, 0) STEP(DOT, 1) STEP(DOT, 2) STEP(DOT, 3) STEP(DOT, 4) STEP(DOT, 5)                         \
            }                                                                                                         \
            STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)                                                     \
        }                                                                                                             \
    }
#define DECLARE(c) __m512i a0##c = _mm512_setzero_si512(), a1##c = a0##c, a2##c = a0##c, a3##c = a0##c;
#define STEP(DOT, c)                                                                                                  \
    {                                                                                                                 \
        const __m512i wc = _mm512_set1_epi32(w[c]);                                                                   \
        a0##c = DOT(a0##c, x0, wc), a1##c = DOT(a1##c, x1, wc), a2##c = DOT(a2##c, x2, wc), a3##c = DOT(a3##c, x3, wc); \
    }
#define STORE(c)                                                                                                      \
    if (t * TILE + c < e->rows) {                                                                                     \
        const int64_t r = t * TILE + c;                                                                               \
        float *dst = linear + r * BLOCK;                                                                              \
        if (e->sums == NULL) {                                                                                        \
            const __m512 scale = _mm512_set1_ps(e->row_scale[r]), bias = _mm512_set1_ps(e->row_bias[r]);              \
            _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0##c), scale, bias));                           \
            _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1##c), scale, bias));                      \
            _mm512_storeu_ps(dst + 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2##c), scale, bias));                      \
            _mm512_storeu_ps(dst + 48, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3##c), scale, bias));                      \
        } else { /* the integer sums as they are, for the tests */                                                    \
            _mm512_storeu_si512(dst, a0##c), _mm512_storeu_si512(dst + 16, a1##c);                                    \
            _mm512_storeu_si512(dst + 32, a2##c), _mm512_storeu_si512(dst + 48, a3##c);                               \
        }                                                                                                             \
    }
MULTIPLY(multiply_vnni, dot_pairs_vnni)
MULTIPLY(multiply_avx512, dot_pairs_avx512)
#undef MULTIPLY
#undef DECLARE
#undef STEP
#undef STORE

/* rows (tiles * TILE, BLOCK) = weight . the patches j .. j + BLOCK: per tile, 4 x TILE named
   accumulators, one fused multiply-add per patch value (see `PatchMix`). */
AVX512 __attribute__((noinline)) static void product_avx512(const PatchMix *e, const float *weight, int64_t j,
                                                            float *rows) {
    for (int64_t t = 0; t < e->tiles; t++) {
#define DECLARE(c) __m512 a0##c = _mm512_setzero_ps(), a1##c = a0##c, a2##c = a0##c, a3##c = a0##c;
        DECLARE(0) DECLARE(1) DECLARE(2) DECLARE(3) DECLARE(4) DECLARE(5)
#undef DECLARE
        const float *w = weight + t * e->k * TILE;
        for (int64_t p = 0; p < e->k; p++, w += TILE) {
            const float *x = e->patches + (j / BLOCK * e->k + p) * BLOCK;
            const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16), x2 = _mm512_loadu_ps(x + 32),
                         x3 = _mm512_loadu_ps(x + 48);
#define STEP(c)                                                                                                       \
    {                                                                                                                 \
        const __m512 wc = _mm512_set1_ps(w[c]);                                                                       \
        a0##c = _mm512_fmadd_ps(wc, x0, a0##c), a1##c = _mm512_fmadd_ps(wc, x1, a1##c);                               \
        a2##c = _mm512_fmadd_ps(wc, x2, a2##c), a3##c = _mm512_fmadd_ps(wc, x3, a3##c);                               \
    }
            STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
        }
#define STORE(c)                                                                                                      \
    {                                                                                                                 \
        float *dst = rows + (t * TILE + c) * BLOCK;                                                                   \
        _mm512_storeu_ps(dst, a0##c), _mm512_storeu_ps(dst + 16, a1##c);                                              \
        _mm512_storeu_ps(dst + 32, a2##c), _mm512_storeu_ps(dst + 48, a3##c);                                         \
    }
        STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
    }
}


/* ------------------------------------------------------------------ AVX2 + FMA */

/* act for one block, 8 vectors of 8 lanes, as `activation_avx512` step for step. Without
   getexp/getmant the exponent split is done on the float's bits (subnormal inputs scaled by 2^24
   first), and without scalef 2^n is built as two exact powers of two (see N_LOW): the same
   results. Eight independent chains, though 16 registers cannot hold them: the spills cost less
   than the waits of four. `subnormal` 0 leaves out the subnormal inputs' steps where eps >=
   FLT_MIN makes them impossible (relu(x) + eps >= eps): a sixth of the work, the same results. */
#define AVX2_CHAINS 8
AVX2 static inline __attribute__((always_inline)) void activation_avx2_part(const float *x, float *y, float power,
                                                                            float log2_scale, float epsilon,
                                                                            const int subnormal) {
    /* floats, not vectors, as arguments: GCC leaves out the vzeroupper on return from a function
       that takes 256-bit vectors, and the SSE code of a caller then runs it three times slower */
    const __m256 p = _mm256_set1_ps(power), s = _mm256_set1_ps(log2_scale), eps = _mm256_set1_ps(epsilon);
    __m256 v[AVX2_CHAINS], e[AVX2_CHAINS], t[AVX2_CHAINS], q[AVX2_CHAINS], n[AVX2_CHAINS], f[AVX2_CHAINS];
    for (int i = 0; i < AVX2_CHAINS; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        __m256 a = _mm256_add_ps(_mm256_max_ps(v[i], _mm256_setzero_ps()), eps); /* max: NaN -> 0, as AVX-512's */
        const __m256 tiny = subnormal ? _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ) : _mm256_setzero_ps();
        if (subnormal) a = _mm256_blendv_ps(a, _mm256_mul_ps(a, _mm256_set1_ps(16777216.0f)), tiny);
        const __m256i bits = _mm256_castps_si256(a);
        const __m256i exponent = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(MANTISSA_OFFSET)), 23);
        const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(exponent, 23))); /* a = 2^e m */
        e[i] = _mm256_cvtepi32_ps(exponent);
        if (subnormal) e[i] = _mm256_sub_ps(e[i], _mm256_and_ps(tiny, _mm256_set1_ps(24.0f)));
        /* a = inf: getexp says inf, and so does this, for the same NaN -> max float below */
        e[i] = _mm256_blendv_ps(e[i], a, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
        t[i] = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    }
    HORNER8(AVX2_CHAINS, _mm256_fmadd_ps, _mm256_set1_ps, t, L7, L6, L5, L4, L3, L2, L1, L0);
    for (int i = 0; i < AVX2_CHAINS; i++) {
        const __m256 frac = _mm256_fmadd_ps(p, _mm256_mul_ps(q[i], t[i]), s);
        n[i] = _mm256_round_ps(_mm256_fmadd_ps(p, e[i], frac), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        f[i] = _mm256_add_ps(_mm256_fmsub_ps(p, e[i], n[i]), frac);
    }
    HORNER6(AVX2_CHAINS, _mm256_fmadd_ps, _mm256_set1_ps, f, X5, X4, X3, X2, X1, X0);
    for (int i = 0; i < AVX2_CHAINS; i++) {
        const __m256i bias = _mm256_set1_epi32(127);
        __m256 r;
        const __m256 usual = _mm256_and_ps(_mm256_cmp_ps(n[i], _mm256_set1_ps(-124.0f), _CMP_GE_OQ),
                                           _mm256_cmp_ps(n[i], _mm256_set1_ps(126.0f), _CMP_LE_OQ));
        if (_mm256_movemask_ps(usual) == 0xff) { /* q * 2^n is a normal float: one exact power of two */
            r = _mm256_mul_ps(q[i], _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[i]), bias), 23)));
        } else {
            /* n = inf (a = inf) clamps to N_HIGH; q is NaN there, and min takes NaN to max float too */
            const __m256 clamped = _mm256_min_ps(_mm256_max_ps(n[i], _mm256_set1_ps(N_LOW)), _mm256_set1_ps(N_HIGH));
            const __m256 n1 = _mm256_min_ps(_mm256_max_ps(clamped, _mm256_set1_ps(-124.0f)), _mm256_set1_ps(127.0f));
            const __m256 pow1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n1), bias), 23));
            const __m256 pow2 = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(clamped, n1)), bias), 23));
            r = _mm256_min_ps(_mm256_mul_ps(_mm256_mul_ps(q[i], pow1), pow2), _mm256_set1_ps(MAX_FLOAT));
        }
        const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
        const __m256 signed_r = _mm256_or_ps(r, _mm256_and_ps(sign, v[i])); /* r >= 0: q and 2^n are positive */
        _mm256_storeu_ps(y + 8 * i, _mm256_and_ps(signed_r, _mm256_cmp_ps(v[i], v[i], _CMP_ORD_Q))); /* NaN x -> 0 */
    }
}

AVX2 static inline void activation_avx2(const float *x, float *y, float power, float log2_scale, float eps) {
    if (eps >= FLT_MIN)
        for (int i = 0; i < BLOCK; i += 8 * AVX2_CHAINS) activation_avx2_part(x + i, y + i, power, log2_scale, eps, 0);
    else
        for (int i = 0; i < BLOCK; i += 8 * AVX2_CHAINS) activation_avx2_part(x + i, y + i, power, log2_scale, eps, 1);
}

/* DENSE2_C by hand, half a block at a time: 2 x 4 accumulators stay in the 16 registers (the
   compiler's loop keeps all 2 x 8 in memory), the same fused multiply-adds in the same order. */
AVX2 static inline void dense2_avx2(float lin2[2][BLOCK], const float *h1, const float *w0, const float *w1, float b0,
                                    float b1, int64_t hidden) {
    for (int half = 0; half < BLOCK; half += 32) {
        __m256 a0[4], a1[4];
        for (int q = 0; q < 4; q++) a0[q] = _mm256_set1_ps(b0), a1[q] = _mm256_set1_ps(b1);
        for (int64_t k = 0; k < hidden; k++) {
            const __m256 w0k = _mm256_set1_ps(w0[k]), w1k = _mm256_set1_ps(w1[k]);
            for (int q = 0; q < 4; q++) {
                const __m256 hk = _mm256_loadu_ps(h1 + k * BLOCK + half + 8 * q);
                a0[q] = _mm256_fmadd_ps(w0k, hk, a0[q]);
                a1[q] = _mm256_fmadd_ps(w1k, hk, a1[q]);
            }
        }
        for (int q = 0; q < 4; q++) {
            _mm256_storeu_ps(lin2[0] + half + 8 * q, a0[q]);
            _mm256_storeu_ps(lin2[1] + half + 8 * q, a1[q]);
        }
    }
}
#define DENSE2_AVX2(lin2, h1, w0, w1, b0, b1, hidden) dense2_avx2(lin2, h1, w0, w1, b0, b1, hidden);

MIX_TASK(mix_task_avx2, AVX2, activation_avx2, DENSE2_AVX2)

AVX2 static void gather_pairs_avx2(const PixelMix *e, int64_t j0, int32_t *pairs) {
    const int64_t row_bytes = e->k * e->channels, row_stride = e->width * e->channels;
    int32_t offset[BLOCK];
    window_offsets(e, j0, offset);
    const __m256i even = _mm256_set1_epi32(0x00ff00ff); /* the same pairs as `gather_pairs_avx512` */
    for (int64_t ky = 0; ky < e->k; ky++) {
        for (int64_t d = 0; d < row_bytes / 4; d++) {
            const int64_t pair = (ky * row_bytes + 4 * d) / 2;
            const __m256i shift = _mm256_set1_epi32((int32_t)(ky * row_stride + 4 * d));
            for (int v = 0; v < BLOCK / 8; v++) {
                const __m256i where = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(offset + 8 * v)), shift);
                const __m256i bytes = _mm256_i32gather_epi32((const int *)e->pixels, where, 1);
                _mm256_storeu_si256((__m256i *)(pairs + pair * BLOCK + 8 * v), _mm256_and_si256(bytes, even));
                _mm256_storeu_si256((__m256i *)(pairs + (pair + 1) * BLOCK + 8 * v),
                                    _mm256_and_si256(_mm256_srli_epi32(bytes, 8), even));
            }
        }
    }
}

/* As `multiply_avx512`, 16 patches at a time: 2 vectors x TILE rows = 12 accumulators, the pair
   and the broadcast weight in the 16 registers. */
AVX2 __attribute__((noinline)) static void multiply_avx2(const PixelMix *e, const int32_t *pairs, float *linear) {
    for (int64_t t = 0; t * TILE < e->rows; t++) {
        for (int s = 0; s < BLOCK; s += 16) {
            __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a04 = a00, a05 = a00;
            __m256i a10 = a00, a11 = a00, a12 = a00, a13 = a00, a14 = a00, a15 = a00;
            const int32_t *w = e->weight + t * e->pairs * TILE;
            for (int64_t p = 0; p < e->pairs; p++, w += TILE) {
                const int32_t *x = pairs + p * BLOCK + s;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 8));
#define STEP(c)                                                                                                       \
    {                                                                                                                 \
        const __m256i wc = _mm256_set1_epi32(w[c]);                                                                   \
        a0##c = _mm256_add_epi32(a0##c, _mm256_madd_epi16(x0, wc));                                                   \
        a1##c = _mm256_add_epi32(a1##c, _mm256_madd_epi16(x1, wc));                                                   \
    }
                STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
            }
#define STORE(c)                                                                                                      \
    if (t * TILE + c < e->rows) {                                                                                     \
        const int64_t r = t * TILE + c;                                                                               \
        float *dst = linear + r * BLOCK + s;                                                                          \
        if (e->sums == NULL) {                                                                                        \
            const __m256 scale = _mm256_set1_ps(e->row_scale[r]), bias = _mm256_set1_ps(e->row_bias[r]);              \
            _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0##c), scale, bias));                           \
            _mm256_storeu_ps(dst + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1##c), scale, bias));                       \
        } else {                                                                                                      \
            _mm256_storeu_si256((__m256i *)dst, a0##c);                                                               \
            _mm256_storeu_si256((__m256i *)(dst + 8), a1##c);                                                         \
        }                                                                                                             \
    }
            STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
        }
    }
}

/* As `product_avx512`, 16 patches at a time: 2 vectors x TILE rows = 12 accumulators. */
AVX2 __attribute__((noinline)) static void product_avx2(const PatchMix *e, const float *weight, int64_t j,
                                                        float *rows) {
    for (int64_t t = 0; t < e->tiles; t++) {
        for (int s = 0; s < BLOCK; s += 16) {
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a04 = a00, a05 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a14 = a00, a15 = a00;
            const float *w = weight + t * e->k * TILE;
            for (int64_t p = 0; p < e->k; p++, w += TILE) {
                const float *x = e->patches + (j / BLOCK * e->k + p) * BLOCK + s;
                const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
#define STEP(c)                                                                                                       \
    {                                                                                                                 \
        const __m256 wc = _mm256_set1_ps(w[c]);                                                                       \
        a0##c = _mm256_fmadd_ps(wc, x0, a0##c), a1##c = _mm256_fmadd_ps(wc, x1, a1##c);                               \
    }
                STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5)
#undef STEP
            }
#define STORE(c) _mm256_storeu_ps(rows + (t * TILE + c) * BLOCK + s, a0##c), _mm256_storeu_ps(rows + (t * TILE + c) * BLOCK + s + 8, a1##c);
            STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
        }
    }
}
#endif /* HAVE_X86 */

/* ------------------------------------------------------------------ portable C */

static inline float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* x rounded to the nearest integer, ties to even, for |x| < 2^22 (or infinite): adding and
   subtracting 1.5 * 2^23 vectorizes everywhere, where rintf is a library call on plain x86-64.
   Only with float arithmetic in float (FLT_EVAL_METHOD 0: every 64-bit target). */
#if FLT_EVAL_METHOD == 0
#define ROUND_FLOAT(x) (((x) + 12582912.0f) - 12582912.0f)
#define ROUND_DOUBLE(x) (((x) + 6755399441055744.0) - 6755399441055744.0)
#else
#include <math.h>
#define ROUND_FLOAT(x) rintf(x)
#define ROUND_DOUBLE(x) rint(x)
#endif

/* act for one block in plain C, as `activation_avx2` element by element; the compiler
   vectorizes the loop. Where the target has no fused multiply-add (plain x86-64), power * e,
   which the others take exactly from an FMA, is computed in double instead (exact there too). */
PORTABLE static void activation_portable(const float *x, float *y, float power, float log2_scale, float eps) {
    for (int i = 0; i < BLOCK; i++) {
        const float v = x[i];
        float a = (v > 0.0f ? v : 0.0f) + eps; /* NaN -> 0 */
        const int tiny = a < FLT_MIN;
        a = tiny ? a * 16777216.0f : a;
        const uint32_t bits = to_bits(a);
        const int32_t exponent = (int32_t)(bits - MANTISSA_OFFSET) >> 23;
        const float t = from_bits(bits - ((uint32_t)exponent << 23)) - 1.0f;
        const float e = a == INFINITY ? INFINITY : (float)exponent - (tiny ? 24.0f : 0.0f);
        float q = L7 * t + L6;
        q = q * t + L5;
        q = q * t + L4;
        q = q * t + L3;
        q = q * t + L2;
        q = q * t + L1;
        q = q * t + L0;
#ifdef __FP_FAST_FMAF
        const float frac = fmaf(power, q * t, log2_scale);
        const float n = ROUND_FLOAT(fmaf(power, e, frac));
        const float f = fmaf(power, e, -n) + frac;
#else
        const float frac = power * (q * t) + log2_scale;
        const double pe = (double)power * e, nd = ROUND_DOUBLE(pe + frac);
        const float n = (float)nd, f = (float)(pe - nd) + frac;
#endif
        q = X5 * f + X4;
        q = q * f + X3;
        q = q * f + X2;
        q = q * f + X1;
        q = q * f + X0;
        const float clamped = n < N_LOW ? N_LOW : n > N_HIGH ? N_HIGH : n;
        const float n1 = clamped < -124.0f ? -124.0f : clamped > 127.0f ? 127.0f : clamped;
        const float pow1 = from_bits((uint32_t)((int32_t)n1 + 127) << 23);
        const float pow2 = from_bits((uint32_t)((int32_t)(clamped - n1) + 127) << 23);
        const float product = q * pow1 * pow2;
        const float r = product < MAX_FLOAT ? product : MAX_FLOAT; /* inf and NaN -> max float */
        const uint32_t out = (to_bits(r) & 0x7fffffffu) | (to_bits(v) & 0x80000000u);
        y[i] = v == v ? from_bits(out) : 0.0f;
    }
}

MIX_TASK(mix_task_portable, PORTABLE, activation_portable, DENSE2_C)

PORTABLE static void gather_pairs_portable(const PixelMix *e, int64_t j0, int32_t *pairs) {
    const int64_t row_bytes = e->k * e->channels, row_stride = e->width * e->channels;
    int32_t offset[BLOCK];
    window_offsets(e, j0, offset);
    for (int64_t ky = 0; ky < e->k; ky++) {
        for (int64_t d = 0; d < row_bytes / 4; d++) {
            const int64_t pair = (ky * row_bytes + 4 * d) / 2, shift = ky * row_stride + 4 * d;
            for (int i = 0; i < BLOCK; i++) {
                const uint8_t *b = e->pixels + offset[i] + shift;
                pairs[pair * BLOCK + i] = b[0] | b[2] << 16;
                pairs[(pair + 1) * BLOCK + i] = b[1] | b[3] << 16;
            }
        }
    }
}

/* The weights' 16-bit pairs read as int16 in memory order (so on any byte order), the pixels'
   from the values `gather_pairs_portable` made: the sums of the vector variants. */
PORTABLE static void multiply_portable(const PixelMix *e, const int32_t *pairs, float *linear) {
    for (int64_t t = 0; t * TILE < e->rows; t++) {
        int32_t acc[TILE][BLOCK] = {{0}};
        const int16_t *w = (const int16_t *)(e->weight + t * e->pairs * TILE);
        for (int64_t p = 0; p < e->pairs; p++, w += 2 * TILE) {
            const int32_t *x = pairs + p * BLOCK;
            for (int c = 0; c < TILE; c++) {
                const int32_t w0 = w[2 * c], w1 = w[2 * c + 1];
                for (int i = 0; i < BLOCK; i++) acc[c][i] += w0 * (x[i] & 0xffff) + w1 * (x[i] >> 16);
            }
        }
        for (int c = 0; c < TILE && t * TILE + c < e->rows; c++) {
            const int64_t r = t * TILE + c;
            float *dst = linear + r * BLOCK;
            if (e->sums == NULL) {
                const float scale = e->row_scale[r], bias = e->row_bias[r];
                for (int i = 0; i < BLOCK; i++) dst[i] = (float)acc[c][i] * scale + bias;
            } else {
                memcpy(dst, acc[c], sizeof acc[c]);
            }
        }
    }
}

/* As `product_avx512` in plain C: the same sums, one multiply-add per patch value in the same
   order (fused where the target has FMA and the compiler contracts, else rounded twice). */
PORTABLE static void product_portable(const PatchMix *e, const float *weight, int64_t j, float *rows) {
    for (int64_t t = 0; t < e->tiles; t++) {
        float acc[TILE][BLOCK] = {{0}};
        const float *w = weight + t * e->k * TILE;
        for (int64_t p = 0; p < e->k; p++, w += TILE) {
            const float *x = e->patches + (j / BLOCK * e->k + p) * BLOCK;
            for (int c = 0; c < TILE; c++)
                for (int i = 0; i < BLOCK; i++) acc[c][i] += w[c] * x[i];
        }
        memcpy(rows + t * TILE * BLOCK, acc, sizeof acc);
    }
}

/* ------------------------------------------------------------------ dispatch and entry points */

static const Variant variants[] = { /* best first, as `VARIANTS` lists them */
#if HAVE_X86
    {"avx512", activation_avx512, mix_task_avx512, product_avx512, gather_pairs_avx512, multiply_avx512, multiply_vnni},
    {"avx2", activation_avx2, mix_task_avx2, product_avx2, gather_pairs_avx2, multiply_avx2, NULL},
#endif
    {"portable", activation_portable, mix_task_portable, product_portable, gather_pairs_portable, multiply_portable,
     NULL},
};
#define VARIANT_COUNT ((int)(sizeof variants / sizeof variants[0]))

static int runs[VARIANT_COUNT]; /* whether this CPU runs each variant, read once when the module loads */
static int vnni;                /* AVX-512 VNNI */

static void read_cpu_features(void) {
    for (int i = 0; i < VARIANT_COUNT; i++) runs[i] = 0;
#if HAVE_X86
    __builtin_cpu_init(); /* also checks that the OS saves the vector registers */
    runs[0] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl");
    runs[1] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    vnni = runs[0] && __builtin_cpu_supports("avx512vnni");
#endif
    runs[VARIANT_COUNT - 1] = 1;
}

/* The variant by name, or NULL with a RuntimeError set for the caller to return. */
static const Variant *variant_named(const char *name) {
    for (int i = 0; i < VARIANT_COUNT; i++)
        if (strcmp(variants[i].name, name) == 0) {
            if (runs[i]) return &variants[i];
            PyErr_Format(PyExc_RuntimeError, "this CPU cannot run the %s kernel", name);
            return NULL;
        }
    PyErr_Format(PyExc_RuntimeError, "no kernel variant named %s in this build", name);
    return NULL;
}

static void patch_mix(const PatchMix *e, const Variant *v) {
    const int64_t blocks = e->n / BLOCK, groups = (blocks + GROUP - 1) / GROUP, channels = e->mix.channels;
    const int64_t hidden = e->mix.hidden, tile_values = e->k * TILE;
#pragma omp parallel for schedule(static) num_threads(e->mix.threads)
    for (int64_t task = 0; task < groups * channels; task++) {
        const int64_t group = task / channels, o = task % channels;
        float rows[(2 * MAX_HIDDEN + 2 + TILE) * BLOCK]; /* o's rows for one block */
        const float *weight = e->weight + o * e->tiles * tile_values;
        for (int64_t block = group * GROUP; block < blocks && block < (group + 1) * GROUP; block++) {
            v->product(e, weight, block * BLOCK, rows);
            const float *kb = rows + 2 * hidden * BLOCK;
            v->mix_task(&e->mix, rows, rows + hidden * BLOCK, kb, kb + BLOCK, BLOCK, o, block * BLOCK);
        }
    }
}

static int pixel_mix(const PixelMix *e, const Variant *v) {
    const int64_t blocks = (e->n + BLOCK - 1) / BLOCK, channels = e->mix.channels, hidden = e->mix.hidden;
    void (*multiply)(const PixelMix *, const int32_t *, float *) = e->vnni ? v->multiply_vnni : v->multiply;
    int failed = 0;
#pragma omp parallel num_threads(e->mix.threads)
    {
        int32_t *pairs = malloc(sizeof(int32_t) * e->pairs * BLOCK);
        float *linear = malloc(sizeof(float) * e->rows * BLOCK);
        if (pairs == NULL || linear == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; block++) {
            if (pairs == NULL || linear == NULL) continue;
            v->gather_pairs(e, block * BLOCK, pairs);
            multiply(e, pairs, linear);
            if (e->sums != NULL)
                memcpy(e->sums + block * e->rows * BLOCK, linear, sizeof(float) * e->rows * BLOCK);
            else
                for (int64_t o = 0; o < channels; o++) { /* rows lin1 and proj of every channel, then kb, similar */
                    const float *kb = linear + (2 * channels * hidden + o) * BLOCK;
                    v->mix_task(&e->mix, linear + o * hidden * BLOCK, linear + (channels + o) * hidden * BLOCK, kb,
                                kb + channels * BLOCK, BLOCK, o, block * BLOCK);
                }
        }
        free(pairs);
        free(linear);
    }
    return failed;
}

/* Python entry point for `patch_mix`. The caller (hybrid_codec/fast.py) checks every tensor's
   dtype, shape, contiguity and device and passes data pointers; this checks the sizes it relies on. */
static PyObject *py_patch_mix(PyObject *self, PyObject *args) {
    const char *name;
    Py_ssize_t patches, weight, out, power1, log2_scale1, w2, b2, power2, log2_scale2;
    long long k, n, tiles, out_stride, channels, hidden;
    float eps1, eps2, inv_patch;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "snLLnLnLLLnnfnnnnffi", &name, &patches, &k, &n, &weight, &tiles, &out, &out_stride,
                          &channels, &hidden, &power1, &log2_scale1, &eps1, &w2, &b2, &power2, &log2_scale2, &eps2,
                          &inv_patch, &threads))
        return NULL;
    if (channels < 1 || hidden < 1 || hidden > MAX_HIDDEN || k < 1 || n < 0 || n % BLOCK || out_stride < n ||
        tiles != (2 * hidden + 2 + TILE - 1) / TILE || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "dynamic_from_patches: sizes out of range");
        return NULL;
    }
    const Variant *v = variant_named(name);
    if (v == NULL) return NULL;
    const PatchMix e = {(const float *)patches, k, n, (const float *)weight, tiles,
                        {(float *)out, out_stride, channels, hidden, (const float *)power1, (const float *)log2_scale1,
                         (const float *)w2, (const float *)b2, (const float *)power2, (const float *)log2_scale2, eps1,
                         eps2, inv_patch, threads}};
    Py_BEGIN_ALLOW_THREADS
    patch_mix(&e, v);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The sizes `dynamic_from_pixels` and `pixel_sums` rely on; 0 with a ValueError set if one is out of range. */
static int pixel_sizes_fit(const char *what, long long batch, long long height, long long width, long long channels,
                           long long k, long long rows, long long out_stride, long long out_channels,
                           long long hidden, int threads) {
    const long long out_h = k > 0 ? height / k : 0, out_w = k > 0 ? width / k : 0, n = batch * out_h * out_w;
    if (batch < 1 || channels < 1 || k < 1 || (k * channels) % 4 || out_h < 1 || out_w < 1 ||
        batch * height * width * channels > INT32_MAX || out_channels < 1 || hidden < 1 || hidden > MAX_HIDDEN ||
        rows != 2 * out_channels * hidden + 2 * out_channels || out_stride < n + (BLOCK - n % BLOCK) % BLOCK ||
        threads < 1) {
        PyErr_Format(PyExc_ValueError, "%s: sizes out of range", what);
        return 0;
    }
    return 1;
}

/* `pixel_mix` without the GIL; a failed allocation is Python's MemoryError. */
static PyObject *run_pixel_mix(const PixelMix *e, const Variant *v) {
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = pixel_mix(e, v);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Python entry point for `pixel_mix`; checks the sizes it relies on, as `py_mix` does. `use_vnni`
   0 takes the plain AVX-512 multiply-add even on a VNNI CPU (the tests compare the two). */
static PyObject *py_pixel_mix(PyObject *self, PyObject *args) {
    const char *name;
    Py_ssize_t pixels, weight, row_scale, row_bias, out, power1, log2_scale1, w2, b2, power2, log2_scale2;
    long long batch, height, width, channels, k, rows, out_stride, out_channels, hidden;
    float eps1, eps2, inv_patch;
    int threads, use_vnni;
    (void)self;
    if (!PyArg_ParseTuple(args, "snLLLLLnnnLnLLLnnfnnnnffip", &name, &pixels, &batch, &height, &width, &channels, &k,
                          &weight, &row_scale, &row_bias, &rows, &out, &out_stride, &out_channels, &hidden, &power1,
                          &log2_scale1, &eps1, &w2, &b2, &power2, &log2_scale2, &eps2, &inv_patch, &threads,
                          &use_vnni))
        return NULL;
    if (!pixel_sizes_fit("dynamic_from_pixels", batch, height, width, channels, k, rows, out_stride, out_channels,
                         hidden, threads))
        return NULL;
    const Variant *v = variant_named(name);
    if (v == NULL) return NULL;
    const long long out_h = height / k, out_w = width / k;
    const PixelMix e = {(const uint8_t *)pixels, height, width, channels, k, out_h, out_w, batch * out_h * out_w,
                        (const int32_t *)weight, (const float *)row_scale, (const float *)row_bias, rows,
                        k * k * channels / 2, vnni && use_vnni && v->multiply_vnni != NULL,
                        {(float *)out, out_stride, out_channels, hidden, (const float *)power1,
                         (const float *)log2_scale1, (const float *)w2, (const float *)b2, (const float *)power2,
                         (const float *)log2_scale2, eps1, eps2, inv_patch, threads},
                        NULL};
    return run_pixel_mix(&e, v);
}

/* The integer product of `pixel_mix` alone: its 32-bit sums, (blocks, rows, BLOCK), for the
   tests that compare the variants bit for bit. */
static PyObject *py_pixel_sums(PyObject *self, PyObject *args) {
    const char *name;
    Py_ssize_t pixels, weight, out;
    long long batch, height, width, channels, k, rows, out_channels, hidden;
    int use_vnni;
    (void)self;
    if (!PyArg_ParseTuple(args, "snLLLLLnLLLnp", &name, &pixels, &batch, &height, &width, &channels, &k, &weight,
                          &rows, &out_channels, &hidden, &out, &use_vnni))
        return NULL;
    const long long out_h = k > 0 ? height / k : 0, out_w = k > 0 ? width / k : 0, n = batch * out_h * out_w;
    if (!pixel_sizes_fit("pixel_sums", batch, height, width, channels, k, rows, n + (BLOCK - n % BLOCK) % BLOCK,
                         out_channels, hidden, 1))
        return NULL;
    const Variant *v = variant_named(name);
    if (v == NULL) return NULL;
    const PixelMix e = {(const uint8_t *)pixels, height, width, channels, k, out_h, out_w, n, (const int32_t *)weight,
                        NULL, NULL, rows, k * k * channels / 2, vnni && use_vnni && v->multiply_vnni != NULL,
                        {NULL, 0, out_channels, hidden, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, 1},
                        (int32_t *)out};
    return run_pixel_mix(&e, v);
}

/* The activation alone, over n values (a multiple of BLOCK): what the tests check edge cases on. */
static PyObject *py_activation(PyObject *self, PyObject *args) {
    const char *name;
    Py_ssize_t x, y;
    long long n;
    float power, log2_scale, eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "snnLfff", &name, &x, &y, &n, &power, &log2_scale, &eps)) return NULL;
    if (n < 0 || n % BLOCK) {
        PyErr_SetString(PyExc_ValueError, "activation: n out of range");
        return NULL;
    }
    const Variant *v = variant_named(name);
    if (v == NULL) return NULL;
    for (long long j = 0; j < n; j += BLOCK) v->activation((const float *)x + j, (float *)y + j, power, log2_scale, eps);
    Py_RETURN_NONE;
}


/* The entropy coder's context model on the encoder's side (entropy.py's `sorted_symbols`): for each
   symbol of the joined coding plan, the prediction (the floor of its four neighbours' mean), the
   context (their max - min, at most contexts - 1), its key (the plan's table + context) and its
   symbol (the residual + radius, or the escape); then the symbols sorted by key, stably (a counting
   sort), the escaped codes in that order (+ code_limit), and how many symbols each key has. Integer
   arithmetic only, as numpy's: the decoder (numpy) must expect exactly these symbols. Returns the
   number of escapes. Not a coder: constriction codes what this returns. */
static PyObject *py_sorted_symbols(PyObject *self, PyObject *args) {
    Py_ssize_t codes_p, neighbours_p, targets_p, table_p, symbols_p, escapes_p, counts_p;
    long long n, keys;
    int contexts, radius, escape, code_limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnLLnnniiii", &codes_p, &neighbours_p, &targets_p, &table_p, &n, &keys, &symbols_p,
                          &escapes_p, &counts_p, &contexts, &radius, &escape, &code_limit))
        return NULL;
    if (n < 0 || keys < 1 || contexts < 1) {
        PyErr_SetString(PyExc_ValueError, "sorted_symbols: sizes out of range");
        return NULL;
    }
    const int16_t *codes = (const int16_t *)codes_p;
    const int64_t *nb = (const int64_t *)neighbours_p, *targets = (const int64_t *)targets_p;
    const uint16_t *table = (const uint16_t *)table_p;
    int32_t *symbols = (int32_t *)symbols_p, *escapes = (int32_t *)escapes_p;
    int64_t *counts = (int64_t *)counts_p;
    uint16_t *key = malloc((size_t)(n ? n : 1) * sizeof(uint16_t));
    int32_t *packed = malloc((size_t)(n ? n : 1) * sizeof(int32_t)); /* symbol, and the code above it */
    if (key == NULL || packed == NULL) {
        free(key);
        free(packed);
        return PyErr_NoMemory();
    }
    memset(counts, 0, (size_t)keys * sizeof(int64_t));
    for (long long i = 0; i < n; i++) {
        const int a = codes[nb[i]], b = codes[nb[n + i]], c = codes[nb[2 * n + i]], d = codes[nb[3 * n + i]];
        const int sum = a + b + c + d;
        const int prediction = sum >= 0 ? sum / 4 : -((-sum + 3) / 4); /* floor, as numpy's >> 2 */
        const int high = (a > b ? a : b) > (c > d ? c : d) ? (a > b ? a : b) : (c > d ? c : d);
        const int low = (a < b ? a : b) < (c < d ? c : d) ? (a < b ? a : b) : (c < d ? c : d);
        const int context = high - low < contexts - 1 ? high - low : contexts - 1;
        const int value = codes[targets[i]], residual = value - prediction;
        const int symbol = residual <= radius && residual >= -radius ? residual + radius : escape;
        key[i] = (uint16_t)(table[i] + context);
        packed[i] = symbol | (value + code_limit) << 8; /* symbols < 256, codes + limit < 2^23 */
        counts[key[i]]++;
    }
    int64_t *start = malloc((size_t)keys * sizeof(int64_t));
    if (start == NULL) {
        free(key);
        free(packed);
        return PyErr_NoMemory();
    }
    for (long long k = 0, at = 0; k < keys; k++) {
        start[k] = at;
        at += counts[k];
    }
    for (long long i = 0; i < n; i++) symbols[start[key[i]]++] = packed[i];
    long long escaped = 0;
    for (long long i = 0; i < n; i++) {
        const int32_t symbol = symbols[i] & 255;
        if (symbol == escape) escapes[escaped++] = symbols[i] >> 8;
        symbols[i] = symbol;
    }
    free(start);
    free(key);
    free(packed);
    return PyLong_FromLongLong(escaped);
}

static PyMethodDef methods[] = {
    {"dynamic_from_patches", py_patch_mix, METH_VARARGS, "DynamicConv's eval forward from float patches (see fast.py)."},
    {"activation", py_activation, METH_VARARGS, "The HybridDense activation of n values (see fast.py)."},
    {"dynamic_from_pixels", py_pixel_mix, METH_VARARGS, "The encoder's forward from 8-bit pixels (see fast.py)."},
    {"pixel_sums", py_pixel_sums, METH_VARARGS, "The integer sums of dynamic_from_pixels alone (for the tests)."},
    {"sorted_symbols", py_sorted_symbols, METH_VARARGS, "The entropy coder's symbols, sorted (see entropy.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fast", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fast(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    read_cpu_features();
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    int count = 0;
    for (int i = 0; i < VARIANT_COUNT; i++) count += runs[i];
    PyObject *names = PyTuple_New(count); /* the variants this CPU runs, best first */
    for (int i = 0, at = 0; names != NULL && i < VARIANT_COUNT; i++) {
        if (!runs[i]) continue;
        PyObject *name = PyUnicode_FromString(variants[i].name);
        if (name == NULL) Py_CLEAR(names);
        else PyTuple_SET_ITEM(names, at++, name);
    }
    if (names == NULL || PyModule_AddObject(m, "VARIANTS", names)) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_HIDDEN", MAX_HIDDEN) || PyModule_AddIntConstant(m, "OPENMP", openmp) ||
        PyModule_AddIntConstant(m, "VNNI", vnni) || PyModule_AddIntConstant(m, "TILE", TILE)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
