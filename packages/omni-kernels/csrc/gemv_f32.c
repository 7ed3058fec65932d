/* y = W @ x for one float32 row: the weight-streaming matrix-vector product of single-token decode.
 *
 * A plain shared library (no Python C-API), loaded with ctypes by omni_kernels.gemv. Built without
 * -march so it runs on any x86-64: the AVX-512 and AVX2+FMA kernels are compiled per function with
 * target attributes and picked at run time with __builtin_cpu_supports. Rows are split over OpenMP
 * threads in static blocks of R rows, and each thread streams its rows one after the other.
 */
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

/* Below this many weights a second thread costs more (wake-up, ~µs) than it saves. */
#define PARALLEL_MIN_WEIGHTS 32768

/* ---------------------------------------------------------------- portable */

static void rows_portable(const float *w, const float *x, float *y, int64_t n, int64_t nrows) {
    for (int64_t j = 0; j < nrows; j++) {
        const float *wj = w + j * n;
        float acc = 0.0f;
        /* omp simd reduction lets -O3 vectorize the sum without -ffast-math. */
        #pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += wj[i] * x[i];
        y[j] = acc;
    }
}

static void gemv_portable(const float *w, const float *x, float *y, int64_t m, int64_t n, int nthreads) {
    const int64_t R = 4;
    const int64_t nb = (m + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && m * n >= PARALLEL_MIN_WEIGHTS)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t r = b * R;
        const int64_t nr = m - r < R ? m - r : R;
        rows_portable(w + r * n, x, y + r, n, nr);
    }
}

#if defined(__x86_64__)
/* ------------------------------------------------------------------ AVX-512 */

__attribute__((target("avx512f"))) static inline void
rows_avx512(const float *w, const float *x, float *y, int64_t n, int64_t nr) {
    /* One row at a time with four accumulators: each thread reads its rows as one sequential
     * stream, which the hardware prefetcher follows best (8 interleaved rows measured ~30% slower). */
    for (int64_t j = 0; j < nr; j++, w += n) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= n; i += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
        }
        for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        if (i < n) { /* column tail: masked loads never touch memory past the row */
            const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a1);
        }
        y[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
}

__attribute__((target("avx512f"))) static void
gemv_avx512(const float *w, const float *x, float *y, int64_t m, int64_t n, int nthreads) {
    const int64_t R = 8;
    const int64_t nb = (m + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && m * n >= PARALLEL_MIN_WEIGHTS)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t r = b * R;
        rows_avx512(w + r * n, x, y + r, n, m - r < R ? m - r : R);
    }
}

/* --------------------------------------------------------------- AVX2 + FMA */

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static inline void
rows_avx2(const float *w, const float *x, float *y, int64_t n, int64_t nr) {
    /* As rows_avx512: one sequential stream per thread, four accumulators per row. */
    for (int64_t j = 0; j < nr; j++, w += n) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
        }
        for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        if (i < n) { /* column tail: lanes with a negative mask word load, the rest read as zero */
            const int rem = (int)(n - i);
            const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            a1 = _mm256_fmadd_ps(_mm256_maskload_ps(w + i, k), _mm256_maskload_ps(x + i, k), a1);
        }
        y[j] = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

__attribute__((target("avx2,fma"))) static void
gemv_avx2(const float *w, const float *x, float *y, int64_t m, int64_t n, int nthreads) {
    const int64_t R = 8;
    const int64_t nb = (m + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && m * n >= PARALLEL_MIN_WEIGHTS)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t r = b * R;
        rows_avx2(w + r * n, x, y + r, n, m - r < R ? m - r : R);
    }
}
#endif /* __x86_64__ */

/* ------------------------------------------------------------------ exports */

/* 1 when this CPU (and OS) can run the given ISA; ISA_AUTO is always supported. */
int omni_gemv_f32_supported(int isa) {
    switch (isa) {
    case ISA_AUTO:
    case ISA_PORTABLE:
        return 1;
#if defined(__x86_64__)
    case ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
#endif
    default:
        return 0;
    }
}

static int best_isa(void) {
    if (omni_gemv_f32_supported(ISA_AVX512)) return ISA_AVX512;
    if (omni_gemv_f32_supported(ISA_AVX2)) return ISA_AVX2;
    return ISA_PORTABLE;
}

/* y[m] = w[m, n] @ x[n], all contiguous float32. Returns the ISA used, or -1 if `isa` is unsupported. */
int omni_gemv_f32(const float *w, const float *x, float *y, int64_t m, int64_t n, int nthreads, int isa) {
    if (isa == ISA_AUTO) isa = best_isa();
    else if (!omni_gemv_f32_supported(isa)) return -1;
    if (nthreads < 1) nthreads = 1;
    if (m <= 0) return isa;
    switch (isa) {
#if defined(__x86_64__)
    case ISA_AVX512: gemv_avx512(w, x, y, m, n, nthreads); break;
    case ISA_AVX2: gemv_avx2(w, x, y, m, n, nthreads); break;
#endif
    default: gemv_portable(w, x, y, m, n, nthreads); break;
    }
    return isa;
}
