/* The CPU kernel of DynamicConv's inference forward: everything after its one big matrix product.
 *
 * In eval mode `DynamicConv.mix` is one matrix product (the patches times every linear map of
 * the layer, see `fused_weights`) followed by, per output channel o and patch j:
 *
 *     h1  = act1(lin1[o, :, j])                      HybridDense activation (BatchNorm folded)
 *     h2  = act2(w2[o] @ h1 + b2[o])                 second HybridDense
 *     out = (h2 . proj[o, :, j] + kb[o, j]) / P + similar[o, j]
 *
 * with act(v) = copysign(|scale| * (relu(v) + eps) ** power, v), NaN -> 0, inf -> max float.
 * PyTorch runs this as about twenty passes over (O, H, N) tensors; here it is one pass, 64
 * patches at a time, with the hidden values in the L1 cache. The power is
 * 2 ** (power * log2(x) + log2 |scale|), with AVX-512's exponent/mantissa split and polynomial
 * log2 and exp2: relative error about 1e-6 (float32 itself resolves 6e-8).
 *
 * AVX-512 only: on CPUs without it (and for anything but float32 CPU inference) the PyTorch path
 * runs. A plain-C version vectorized for AVX2 measured no faster than PyTorch, so there is none.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64       /* patches per task: four AVX-512 vectors; n is a multiple (fast.BLOCK) */
#define MAX_HIDDEN 64  /* hidden features per output channel that the stack buffers hold */
#define TILE 6         /* weight rows per step of `pixel_mix`: 4 x 6 accumulators, written out by hand */

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_AVX512 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"))) /* every AVX-512 CPU but Xeon Phi */
#else
#define HAVE_AVX512 0
#endif

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
#define X0 1.0000001192092896f
#define X1 0.6931471824645996f
#define X2 0.2402210682630539f
#define X3 0.05550327152013779f
#define X4 0.009676038287580013f
#define X5 0.0013400432653725147f
#define MAX_FLOAT 3.402823466e38f

#if HAVE_AVX512
/* y = act(x) for one block: 4 vectors of 16 lanes. getexp/getmant split x into exponent and
   mantissa; scalef applies 2^n and handles overflow and infinity itself. Each step runs over the
   4 vectors before the next: 4 independent chains the CPU overlaps (the polynomials alone are 12
   dependent multiply-adds), 15-25% faster than one vector after the other. */
#define LANES 4 /* BLOCK / 16 */
AVX512 static inline void activation(const float *x, float *y, float power, float log2_scale, float eps) {
    const __m512 p = _mm512_set1_ps(power), s = _mm512_set1_ps(log2_scale);
    __m512 v[LANES], m[LANES], e[LANES], t[LANES], q[LANES], frac[LANES], n[LANES], f[LANES];
    for (int i = 0; i < LANES; i++) {
        v[i] = _mm512_loadu_ps(x + 16 * i);
        __m512 a = _mm512_add_ps(_mm512_max_ps(v[i], _mm512_setzero_ps()), _mm512_set1_ps(eps));
        m[i] = _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero); /* a = 2^e m */
        e[i] = _mm512_sub_ps(_mm512_getexp_ps(a), _mm512_getexp_ps(m[i]));
        t[i] = _mm512_sub_ps(m[i], _mm512_set1_ps(1.0f));
    }
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(_mm512_set1_ps(L7), t[i], _mm512_set1_ps(L6));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L5));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L4));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L3));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L2));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L1));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], t[i], _mm512_set1_ps(L0));
    for (int i = 0; i < LANES; i++) { /* power * log2(a) + log2 |scale| = n + f, f in [-0.5, 0.5] */
        frac[i] = _mm512_fmadd_ps(p, _mm512_mul_ps(q[i], t[i]), s);
        n[i] = _mm512_roundscale_ps(_mm512_fmadd_ps(p, e[i], frac[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        f[i] = _mm512_add_ps(_mm512_fmsub_ps(p, e[i], n[i]), frac[i]); /* power * e - n, rounded once */
    }
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(_mm512_set1_ps(X5), f[i], _mm512_set1_ps(X4));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], f[i], _mm512_set1_ps(X3));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], f[i], _mm512_set1_ps(X2));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], f[i], _mm512_set1_ps(X1));
    for (int i = 0; i < LANES; i++) q[i] = _mm512_fmadd_ps(q[i], f[i], _mm512_set1_ps(X0));
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

typedef struct {
    const float *linear; /* (2*O*H + 2*O, n): rows lin1, proj, kb, similar (see the top comment) */
    float *out;          /* O rows of n, out_stride apart */
    int64_t out_stride, channels, hidden, n;
    const float *power1, *log2_scale1, *w2, *b2, *power2, *log2_scale2; /* per (o, h); w2 is (O, H, H) */
    float eps1, eps2, inv_patch;
    int threads;
} Mix;

/* Output channel o for patches j .. j + BLOCK, whose matrix-product rows start at `linear`, `n`
   values apart. The second dense layer runs two rows at a time: eight independent accumulator
   chains, and each hidden value loaded once for both. */
AVX512 static void mix_task(const Mix *m, const float *linear, int64_t n, int64_t o, int64_t j) {
    const int64_t hidden = m->hidden, rows = m->channels * hidden;
    float h1[MAX_HIDDEN * BLOCK], lin2[2][BLOCK], h2[BLOCK], acc[BLOCK];
    for (int64_t k = 0; k < hidden; k++) {
        const int64_t r = o * hidden + k;
        activation(linear + r * n, h1 + k * BLOCK, m->power1[r], m->log2_scale1[r], m->eps1);
    }
    for (int i = 0; i < BLOCK; i++) acc[i] = 0.0f;
    for (int64_t h = 0; h < hidden; h += 2) {
        const int64_t r0 = o * hidden + h, r1 = h + 1 < hidden ? r0 + 1 : r0; /* an odd last row pairs with itself */
        const float *w0 = m->w2 + r0 * hidden, *w1 = m->w2 + r1 * hidden;
        for (int i = 0; i < BLOCK; i++) {
            lin2[0][i] = m->b2[r0];
            lin2[1][i] = m->b2[r1];
        }
        for (int64_t k = 0; k < hidden; k++) {
            const float *hk = h1 + k * BLOCK;
            for (int i = 0; i < BLOCK; i++) {
                lin2[0][i] += w0[k] * hk[i];
                lin2[1][i] += w1[k] * hk[i];
            }
        }
        for (int64_t r = r0; r <= r1; r++) {
            activation(lin2[r - r0], h2, m->power2[r], m->log2_scale2[r], m->eps2);
            const float *proj = linear + (rows + r) * n;
            for (int i = 0; i < BLOCK; i++) acc[i] += h2[i] * proj[i];
        }
    }
    const float *kb = linear + (2 * rows + o) * n, *similar = kb + m->channels * n;
    float *dst = m->out + o * m->out_stride + j;
    for (int i = 0; i < BLOCK; i++) dst[i] = (acc[i] + kb[i]) * m->inv_patch + similar[i];
}

AVX512 static void mix(const Mix *m) {
    const int64_t blocks = m->n / BLOCK;
#pragma omp parallel for schedule(static) num_threads(m->threads)
    for (int64_t task = 0; task < m->channels * blocks; task++) {
        const int64_t o = task / blocks, j = (task % blocks) * BLOCK;
        mix_task(m, m->linear + j, m->n, o, j);
    }
}

/* The encoder's whole forward from 8-bit pixels: `mix` with its matrix product done here too.
 *
 * In float32 the product of the patches with the layer's linear maps takes two thirds of an
 * encode. Here it runs on integer units instead: the pixels are exact 8-bit integers and the
 * weights are rounded to 16 bits per row (`fast.integer_weights`), so one instruction multiplies
 * and adds two pairs per 32-bit lane exactly (AVX-512 VNNI's `vpdpwssd`, or `vpmaddwd` plus
 * `vpaddd` on AVX-512 CPUs without VNNI: the same sums), and the patches are never copied out as
 * floats. Only the weights' rounding differs from float32: relative 1e-5, against the 8-bit
 * latent's step of 4e-3.
 *
 * Per block of 64 patches: gather the pixels as 16-bit pairs, transposed (one row per pair
 * position, one lane per patch), multiply by TILE weight rows at a time into 4 x TILE vector
 * accumulators, scale back to float into the block's rows, and run `mix_task` on them. */
typedef struct {
    const uint8_t *pixels; /* (B, H, W, C), contiguous */
    int64_t height, width, channels, k, out_h, out_w, n; /* n patches: B * out_h * out_w */
    const int32_t *weight; /* (tiles, pairs, TILE): 16-bit weight pairs, rows padded to whole tiles */
    const float *row_scale, *row_bias; /* per row: linear = acc * row_scale + row_bias */
    int64_t rows, pairs; /* rows of `linear` (2*O*H + 2*O); pairs = k * k * C / 2 */
    int vnni;            /* use vpdpwssd (the CPU has AVX-512 VNNI) */
    Mix mix;             /* linear and n unused: every block brings its own */
} PixelMix;

/* The block's pixels as `pairs` (pairs, BLOCK) of 32-bit lanes, each two 16-bit pixel values. */
AVX512 static void gather_pairs(const PixelMix *e, int64_t j0, int32_t *pairs) {
    const int64_t row_bytes = e->k * e->channels, row_stride = e->width * e->channels;
    int32_t offset[BLOCK]; /* where each patch's window starts; patches past the end repeat the last */
    int64_t b = j0 / (e->out_h * e->out_w), oy = j0 / e->out_w % e->out_h, ox = j0 % e->out_w;
    for (int64_t i = 0, j = j0; i < BLOCK; i++) {
        offset[i] = (int32_t)(((b * e->height + oy * e->k) * e->width + ox * e->k) * e->channels);
        if (++j < e->n && ++ox == e->out_w) {
            ox = 0;
            if (++oy == e->out_h) oy = 0, b++;
        }
    }
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
        const __m512 scale = _mm512_set1_ps(e->row_scale[r]), bias = _mm512_set1_ps(e->row_bias[r]);                  \
        float *dst = linear + r * BLOCK;                                                                              \
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0##c), scale, bias));                               \
        _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1##c), scale, bias));                          \
        _mm512_storeu_ps(dst + 32, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2##c), scale, bias));                          \
        _mm512_storeu_ps(dst + 48, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3##c), scale, bias));                          \
    }
MULTIPLY(multiply_vnni, dot_pairs_vnni)
MULTIPLY(multiply_avx512, dot_pairs_avx512)
#undef MULTIPLY
#undef DECLARE
#undef STEP
#undef STORE

AVX512 static int pixel_mix(const PixelMix *e) {
    const int64_t blocks = (e->n + BLOCK - 1) / BLOCK;
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
            gather_pairs(e, block * BLOCK, pairs);
            if (e->vnni)
                multiply_vnni(e, pairs, linear);
            else
                multiply_avx512(e, pairs, linear);
            for (int64_t o = 0; o < e->mix.channels; o++) mix_task(&e->mix, linear, BLOCK, o, block * BLOCK);
        }
        free(pairs);
        free(linear);
    }
    return failed;
}
#endif

static int has_avx512(void) {
#if HAVE_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int has_vnni(void) {
#if HAVE_AVX512
    return has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static int avx512, vnni; /* has_avx512() and has_vnni(), read once when the module loads */

/* 1 where the kernel can run; else 0 with a RuntimeError set for the caller to return. */
static int require_avx512(const char *what) {
    if (!avx512) PyErr_Format(PyExc_RuntimeError, "%s: this CPU (or this build) has no AVX-512", what);
    return avx512;
}

/* Python entry point. The caller (hybrid_codec/fast.py) checks every tensor's dtype, shape,
   contiguity and device and passes data pointers; this checks the sizes it relies on. */
static PyObject *py_mix(PyObject *self, PyObject *args) {
    Py_ssize_t linear, out, power1, log2_scale1, w2, b2, power2, log2_scale2;
    long long out_stride, channels, hidden, n;
    float eps1, eps2, inv_patch;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnLLLLnnfnnnnffi", &linear, &out, &out_stride, &channels, &hidden, &n, &power1,
                          &log2_scale1, &eps1, &w2, &b2, &power2, &log2_scale2, &eps2, &inv_patch, &threads))
        return NULL;
    if (channels < 1 || hidden < 1 || hidden > MAX_HIDDEN || n < 0 || n % BLOCK || out_stride < n || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "dynamic_from_linear: sizes out of range");
        return NULL;
    }
    if (!require_avx512("mix")) return NULL;
#if HAVE_AVX512
    const Mix m = {(const float *)linear, (float *)out, out_stride, channels, hidden, n, (const float *)power1,
                   (const float *)log2_scale1, (const float *)w2, (const float *)b2, (const float *)power2,
                   (const float *)log2_scale2, eps1, eps2, inv_patch, threads};
    Py_BEGIN_ALLOW_THREADS
    mix(&m);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

/* Python entry point for `pixel_mix`; checks the sizes it relies on, as `py_mix` does. `use_vnni`
   0 takes the plain AVX-512 multiply-add even on a VNNI CPU (the tests compare the two). */
static PyObject *py_pixel_mix(PyObject *self, PyObject *args) {
    Py_ssize_t pixels, weight, row_scale, row_bias, out, power1, log2_scale1, w2, b2, power2, log2_scale2;
    long long batch, height, width, channels, k, rows, out_stride, out_channels, hidden;
    float eps1, eps2, inv_patch;
    int threads, use_vnni;
    (void)self;
    if (!PyArg_ParseTuple(args, "nLLLLLnnnLnLLLnnfnnnnffip", &pixels, &batch, &height, &width, &channels, &k, &weight,
                          &row_scale, &row_bias, &rows, &out, &out_stride, &out_channels, &hidden, &power1,
                          &log2_scale1, &eps1, &w2, &b2, &power2, &log2_scale2, &eps2, &inv_patch, &threads,
                          &use_vnni))
        return NULL;
    const long long out_h = k > 0 ? height / k : 0, out_w = k > 0 ? width / k : 0, n = batch * out_h * out_w;
    if (batch < 1 || channels < 1 || k < 1 || (k * channels) % 4 || out_h < 1 || out_w < 1 ||
        batch * height * width * channels > INT32_MAX || out_channels < 1 || hidden < 1 || hidden > MAX_HIDDEN ||
        rows != 2 * out_channels * hidden + 2 * out_channels || out_stride < n + (BLOCK - n % BLOCK) % BLOCK ||
        threads < 1) {
        PyErr_SetString(PyExc_ValueError, "dynamic_from_pixels: sizes out of range");
        return NULL;
    }
    if (!require_avx512("pixel_mix")) return NULL;
    int failed = 0;
#if HAVE_AVX512
    const PixelMix e = {(const uint8_t *)pixels, height, width, channels, k, out_h, out_w, n, (const int32_t *)weight,
                        (const float *)row_scale, (const float *)row_bias, rows, k * k * channels / 2,
                        vnni && use_vnni, {NULL, (float *)out, out_stride, out_channels, hidden, 0, (const float *)power1,
                         (const float *)log2_scale1, (const float *)w2, (const float *)b2, (const float *)power2,
                         (const float *)log2_scale2, eps1, eps2, inv_patch, threads}};
    Py_BEGIN_ALLOW_THREADS
    failed = pixel_mix(&e);
    Py_END_ALLOW_THREADS
#endif
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The activation alone, over n values (a multiple of BLOCK): what the tests check edge cases on. */
static PyObject *py_activation(PyObject *self, PyObject *args) {
    Py_ssize_t x, y;
    long long n;
    float power, log2_scale, eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnLfff", &x, &y, &n, &power, &log2_scale, &eps)) return NULL;
    if (n < 0 || n % BLOCK) {
        PyErr_SetString(PyExc_ValueError, "activation: n out of range");
        return NULL;
    }
    if (!require_avx512("activation")) return NULL;
#if HAVE_AVX512
    for (long long j = 0; j < n; j += BLOCK) activation((const float *)x + j, (float *)y + j, power, log2_scale, eps);
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"dynamic_from_linear", py_mix, METH_VARARGS, "DynamicConv's eval forward after its matrix product (see fast.py)."},
    {"activation", py_activation, METH_VARARGS, "The HybridDense activation of n values (see fast.py)."},
    {"dynamic_from_pixels", py_pixel_mix, METH_VARARGS, "The encoder's forward from 8-bit pixels (see fast.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fast", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fast(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    avx512 = has_avx512();
    vnni = has_vnni();
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    if (PyModule_AddIntConstant(m, "MAX_HIDDEN", MAX_HIDDEN) ||
        PyModule_AddIntConstant(m, "OPENMP", openmp) || PyModule_AddIntConstant(m, "AVX512", avx512) ||
        PyModule_AddIntConstant(m, "VNNI", vnni) || PyModule_AddIntConstant(m, "TILE", TILE)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
