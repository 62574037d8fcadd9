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
#include <string.h>

#define BLOCK 64       /* patches per task: four AVX-512 vectors; n is a multiple (native.BLOCK) */
#define MAX_HIDDEN 64  /* hidden features per output channel that the stack buffers hold */

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

/* Output channel o for patches j .. j + BLOCK. The second dense layer runs two rows at a time:
   eight independent accumulator chains, and each hidden value loaded once for both. */
AVX512 static void mix_task(const Mix *m, int64_t o, int64_t j) {
    const int64_t n = m->n, hidden = m->hidden, rows = m->channels * hidden;
    float h1[MAX_HIDDEN * BLOCK], lin2[2][BLOCK], h2[BLOCK], acc[BLOCK];
    for (int64_t k = 0; k < hidden; k++) {
        const int64_t r = o * hidden + k;
        activation(m->linear + r * n + j, h1 + k * BLOCK, m->power1[r], m->log2_scale1[r], m->eps1);
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
            const float *proj = m->linear + (rows + r) * n + j;
            for (int i = 0; i < BLOCK; i++) acc[i] += h2[i] * proj[i];
        }
    }
    const float *kb = m->linear + (2 * rows + o) * n + j, *similar = kb + m->channels * n;
    float *dst = m->out + o * m->out_stride + j;
    for (int i = 0; i < BLOCK; i++) dst[i] = (acc[i] + kb[i]) * m->inv_patch + similar[i];
}

AVX512 static void mix(const Mix *m) {
    const int64_t blocks = m->n / BLOCK;
#pragma omp parallel for schedule(static) num_threads(m->threads)
    for (int64_t task = 0; task < m->channels * blocks; task++) mix_task(m, task / blocks, (task % blocks) * BLOCK);
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

static int avx512; /* has_avx512(), read once when the module loads */

/* 1 where the kernel can run; else 0 with a RuntimeError set for the caller to return. */
static int require_avx512(const char *what) {
    if (!avx512) PyErr_Format(PyExc_RuntimeError, "%s: this CPU (or this build) has no AVX-512", what);
    return avx512;
}

/* Python entry point. The caller (hybrid_codec/native.py) checks every tensor's dtype, shape,
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
        PyErr_SetString(PyExc_ValueError, "mix: sizes out of range");
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

/* Patches of non-overlapping k x k windows of 8-bit channels-last images (B, H, W, C) -> float
   rows (B * out_h * out_w, k * k * C + 1) flattened (ky, kx, c), each ending in a constant 1:
   what `DynamicConv.patches` makes for the encoder, without a float copy of the whole image. */
#if HAVE_AVX512
AVX512 static void patches_u8(const uint8_t *pixels, float *out, int64_t batch, int64_t height, int64_t width,
                              int64_t channels, int64_t k, int64_t out_h, int64_t out_w, int threads) {
    const int64_t row = k * channels, cols = k * row + 1, rows = batch * out_h * out_w;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < rows; n++) {
        const int64_t b = n / (out_h * out_w), oy = n / out_w % out_h, ox = n % out_w;
        const uint8_t *window = pixels + ((b * height + oy * k) * width + ox * k) * channels;
        float *patch = out + n * cols;
        for (int64_t ky = 0; ky < k; ky++) {
            const uint8_t *src = window + ky * width * channels;
            float *dst = patch + ky * row;
            for (int64_t i = 0; i < row; i += 16) { /* 16 pixels' bytes -> 16 floats, the tail masked */
                const __mmask16 lanes = row - i >= 16 ? 0xffff : (__mmask16)((1u << (row - i)) - 1);
                const __m128i bytes = _mm_maskz_loadu_epi8(lanes, src + i);
                _mm512_mask_storeu_ps(dst + i, lanes, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)));
            }
        }
        patch[cols - 1] = 1.0f;
    }
}
#endif

static PyObject *py_patches_u8(PyObject *self, PyObject *args) {
    Py_ssize_t src, dst;
    long long batch, height, width, channels, k, out_h, out_w;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnLLLLLLLi", &src, &dst, &batch, &height, &width, &channels, &k, &out_h, &out_w,
                          &threads))
        return NULL;
    if (batch < 0 || channels < 1 || k < 1 || out_h < 0 || out_w < 0 || out_h * k > height || out_w * k > width ||
        threads < 1) {
        PyErr_SetString(PyExc_ValueError, "patches_u8: sizes out of range");
        return NULL;
    }
    if (!require_avx512("patches_u8")) return NULL;
#if HAVE_AVX512
    Py_BEGIN_ALLOW_THREADS
    patches_u8((const uint8_t *)src, (float *)dst, batch, height, width, channels, k, out_h, out_w, threads);
    Py_END_ALLOW_THREADS
#endif
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
    {"mix", py_mix, METH_VARARGS, "DynamicConv's eval forward after its matrix product (see native.py)."},
    {"activation", py_activation, METH_VARARGS, "The HybridDense activation of n values (see native.py)."},
    {"patches_u8", py_patches_u8, METH_VARARGS, "Patches of 8-bit channels-last images (see native.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    avx512 = has_avx512();
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    if (PyModule_AddIntConstant(m, "MAX_HIDDEN", MAX_HIDDEN) ||
        PyModule_AddIntConstant(m, "OPENMP", openmp) || PyModule_AddIntConstant(m, "AVX512", avx512)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
