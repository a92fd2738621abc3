#include <stdint.h>

/* y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]; x (M, K) float32 and q (N, K) int8, row-major.
   Tiles of 4 weight rows x 2 input rows: each int8 weight vector is widened in registers and used
   by both input rows, each input vector by all four weight rows; q is read once, and never
   converted into a float copy. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
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

void int8_gemv(const float *x, const int8_t *q, const float *scale, float *y,
               int64_t M, int64_t N, int64_t K) {
    for (int64_t n = 0; n < N; n += 4) {
        int nr = N - n < 4 ? (int)(N - n) : 4;
        for (int64_t m = 0; m < M; m += 2) tile(x, q, scale, y, m, M - m < 2 ? 1 : 2, n, nr, N, K);
    }
}
