#include <stdint.h>

/* y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]; x (M, K) float32 and q (N, K) int8, row-major.
   Tiles of 4 weight rows x MR input rows (AVX-512: 4, AVX2: 2, plain C: 1): each int8 weight
   vector is widened in registers and used by every input row of the tile, each input vector by
   all four weight rows; q is read once per MR input rows, never converted into a float copy.
   Which path is built follows the compiler's target (-march=native). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MR 4
static inline __m512 widen16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* rows n..n+nr-1 (nr <= 4) of q against input rows m..m+mr-1 (mr <= 4): 16 accumulators */
static void tile(const float *x, const int8_t *q, const float *scale, float *y,
                 int64_t m, int mr, int64_t n, int nr, int64_t N, int64_t K) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    const int8_t *row[4];
    const float *xs[4];
    for (int j = 0; j < 4; ++j) row[j] = q + (n + (j < nr ? j : 0)) * K;
    for (int i = 0; i < 4; ++i) xs[i] = x + (m + (i < mr ? i : 0)) * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm512_loadu_ps(xs[i] + k);
        for (int j = 0; j < 4; ++j) {
            __m512 w = widen16(row[j] + k);
            for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], w, acc[i][j]);
        }
    }
    if (k < K) {  /* the last K % 16 columns, masked: zeros elsewhere */
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        __m512 a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm512_maskz_loadu_ps(mask, xs[i] + k);
        for (int j = 0; j < 4; ++j) {
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row[j] + k)));
            for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_fmadd_ps(a[i], w, acc[i][j]);
        }
    }
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) y[(m + i) * N + n + j] = _mm512_reduce_add_ps(acc[i][j]) * scale[n + j];
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MR 2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
/* rows n..n+nr-1 (nr <= 4) of q against input rows m..m+mr-1 (mr <= 2) */
static void tile(const float *x, const int8_t *q, const float *scale, float *y,
                 int64_t m, int mr, int64_t n, int nr, int64_t N, int64_t K) {
    __m256 acc[2][4];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
    const int8_t *row[4];
    for (int j = 0; j < 4; ++j) row[j] = q + (n + (j < nr ? j : 0)) * K;
    const float *x0 = x + m * K, *x1 = x + (m + (mr > 1 ? 1 : 0)) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_loadu_ps(x0 + k), b = _mm256_loadu_ps(x1 + k);
        for (int j = 0; j < 4; ++j) {
            __m256 w = widen8(row[j] + k);
            acc[0][j] = _mm256_fmadd_ps(a, w, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(b, w, acc[1][j]);
        }
    }
    for (int i = 0; i < mr; ++i) {
        const float *xi = i == 0 ? x0 : x1;
        for (int j = 0; j < nr; ++j) {
            float s = hsum(acc[i][j]);
            for (int64_t t = k; t < K; ++t) s += xi[t] * (float)row[j][t];
            y[(m + i) * N + n + j] = s * scale[n + j];
        }
    }
}
#else
#define MR 1
static void tile(const float *x, const int8_t *q, const float *scale, float *y,
                 int64_t m, int mr, int64_t n, int nr, int64_t N, int64_t K) {
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) {
            const float *xi = x + (m + i) * K;
            const int8_t *r = q + (n + j) * K;
            float s = 0.0f;
            for (int64_t t = 0; t < K; ++t) s += xi[t] * (float)r[t];
            y[(m + i) * N + n + j] = s * scale[n + j];
        }
}
#endif

/* threads > 1 (built with OpenMP): the tiles of 4 weight rows are shared among that many threads of
   the process's OpenMP pool (torch's own, when torch loaded libgomp first); each writes its own
   rows of y, so the result does not depend on the thread count. */
void int8_gemv(const float *x, const int8_t *q, const float *scale, float *y,
               int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t tiles = (N + 3) / 4;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n = 4 * t;
        int nr = N - n < 4 ? (int)(N - n) : 4;
        for (int64_t m = 0; m < M; m += MR) tile(x, q, scale, y, m, M - m < MR ? (int)(M - m) : MR, n, nr, N, K);
    }
    (void)threads;
}

/* Whether this build shares work among threads (1) or runs on the calling thread only (0). */
int int8_gemv_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* y[m, :] += bias for every row m; bias NULL: nothing */
static void add_bias(float *y, const float *bias, int64_t M, int64_t N) {
    if (!bias) return;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
}

/* Pivoted storage (modules.LowRankLinear, storage "pivoted") in one call:
   y = left · (x[:, perm[:R]] + coupling · x[:, perm[R:]]) + bias, with left (N, R) and coupling
   (R, K - R) int8 with per-row scales, perm a permutation of the K input columns and bias NULL or
   (N,). work holds M * K floats: the gathered other columns, then the mixed (M, R) vector.
   Returns 0, or 1 if perm holds an index outside [0, K) (nothing then is read out of bounds). */
int int8_pivoted_gemv(const float *x, const int64_t *perm, const int8_t *coupling_q,
                      const float *coupling_scale, const int8_t *left_q, const float *left_scale,
                      const float *bias, float *work, float *y, int64_t M, int64_t N, int64_t K,
                      int64_t R, int threads) {
    for (int64_t k = 0; k < K; ++k)
        if (perm[k] < 0 || perm[k] >= K) return 1;
    const int64_t rest_len = K - R;
    float *rest = work, *mixed = work + M * rest_len;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < rest_len; ++k) rest[m * rest_len + k] = x[m * K + perm[R + k]];
    int8_gemv(rest, coupling_q, coupling_scale, mixed, M, R, rest_len, threads);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < R; ++j) mixed[m * R + j] += x[m * K + perm[j]];
    int8_gemv(mixed, left_q, left_scale, y, M, N, R, threads);
    add_bias(y, bias, M, N);
    return 0;
}

/* Factored storage (modules.LowRankLinear, storage "factored") in one call:
   y = left · (right · x) + bias, with right (R, K) and left (N, R) int8 with per-row scales and
   bias NULL or (N,); work holds M * R floats (the rank-R vector). Each matrix is split among its
   own thread count, as two int8_gemv calls would (the same bits). */
void int8_factored_gemv(const float *x, const int8_t *right_q, const float *right_scale,
                        const int8_t *left_q, const float *left_scale, const float *bias, float *work,
                        float *y, int64_t M, int64_t N, int64_t K, int64_t R, int right_threads,
                        int left_threads) {
    int8_gemv(x, right_q, right_scale, work, M, R, K, right_threads);
    int8_gemv(work, left_q, left_scale, y, M, N, R, left_threads);
    add_bias(y, bias, M, N);
}
