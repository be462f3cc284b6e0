/* The CPU kernels of a graft round, built on first use by graftopt/kernels/cpu.py. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* dtype codes: 0 float32, 1 bfloat16, 2 float64 */

#define BLOCK 1024
#define MAXBINS 256

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Hot loops get AVX-512 and AVX2 clones picked at load time; the default build stays portable. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* A float32 view of n elements of p (any dtype), through buf when a conversion is needed. */
static inline const float *load_block(const void *p, int dt, int64_t start, int64_t n, float *buf) {
    if (dt == 0) return (const float *)p + start;
    if (dt == 1) {
        const uint16_t *q = (const uint16_t *)p + start;
        for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(q[j]);
    } else {
        const double *q = (const double *)p + start;
        for (int64_t j = 0; j < n; j++) buf[j] = (float)q[j];
    }
    return buf;
}

/* min, max and a NaN/Inf probe (x * 0 is NaN exactly when x is not finite). */
CLONES static void range_of(const void *p, int dt, int64_t start, int64_t n, float *lo, float *hi,
                            float *probe) {
    float buf[BLOCK];
    float l = INFINITY, h = -INFINITY, z = 0.0f;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        const float *x = load_block(p, dt, start + i, m, buf);
#pragma omp simd reduction(min : l) reduction(max : h) reduction(+ : z)
        for (int64_t j = 0; j < m; j++) {
            l = x[j] < l ? x[j] : l;
            h = x[j] > h ? x[j] : h;
            z += x[j] * 0.0f;
        }
    }
    *lo = l;
    *hi = h;
    *probe = z;
}

/* torch.histc's bin of x: (int)((x - lo) * bins / (hi - lo)), the maximum in the last bin. */
static inline int bin_of(float x, float lo, float fb, float width, int bins) {
    int k = (int)((x - lo) * fb / width);
    return k < bins - 1 ? k : bins - 1;
}

/* nextafterf(t, up ? INFINITY : -INFINITY) for finite t, on the bits. */
static inline float step_float(float t, int up) {
    uint32_t u;
    memcpy(&u, &t, 4);
    if ((u & 0x7fffffffu) == 0)
        u = up ? 1u : 0x80000001u;
    else
        u = ((u >> 31) != 0) == (up != 0) ? u - 1 : u + 1;
    memcpy(&t, &u, 4);
    return t;
}

/* bin_of as a function of d = x - lo (bin_of(x) == bin_d(x - lo)). */
static inline int bin_d(float d, float fb, float width, int bins) {
    int k = (int)(d * fb / width);
    return k < bins - 1 ? k : bins - 1;
}

/* A start for the walk to threshold(k): the smallest float d with bin_d(d) >= k is a few ulps
   from width * k / bins (ulps of d scale with d); x - lo rounds to >= d from about
   lo + (d + below(d)) / 2, computed in double (exactly when lo and d are of like magnitude,
   where the ulps of x near lo + d ~ 0 are far finer than those of d). 0 when not found. */
static inline float threshold_guess(int k, float lo, float fb, float width, int bins, float *out) {
    float d = width * ((float)k / fb);
    for (int step = 0; step < 16; step++) {
        if (!(d > 0.0f) || !isfinite(d)) return 0;
        if (bin_d(d, fb, width, bins) >= k) {
            float below = step_float(d, 0);
            if (bin_d(below, fb, width, bins) < k) {
                *out = (float)((double)lo + 0.5 * ((double)d + (double)below));
                return 1;
            }
            d = below;
        } else {
            d = step_float(d, 1);
        }
    }
    return 0;
}

/* The smallest float t in [lo, hi] with bin_of(t) >= k. bin_of is non-decreasing in x (every
   float operation in it is monotone), so counting x >= t for each k gives exact bin counts
   without a division per element. */
static float threshold(int k, float lo, float hi, float fb, float width, int bins) {
    float t;
    /* (x - lo) * bins may overflow to inf when width * bins does: bin_of is then not monotone,
       and the walk starts where it always did, for the same results. */
    if (!isfinite(width * fb) || !threshold_guess(k, lo, fb, width, bins, &t))
        t = lo + width * ((float)k / fb);
    t = t < lo ? lo : (t > hi ? hi : t);
    for (int step = 0; step < 64; step++) {
        if (bin_of(t, lo, fb, width, bins) >= k) {
            float below = step_float(t, 0);
            if (below < lo || bin_of(below, lo, fb, width, bins) < k) return t;
            t = below;
        } else {
            t = step_float(t, 1);
        }
    }
    /* Far from the guess (only for extreme ranges): bisect on the ordered float bits. */
    float a = lo, b = hi;
    while (step_float(a, 1) < b) {
        float mid = a + (b - a) * 0.5f;
        if (mid <= a || mid >= b) mid = step_float(a, 1);
        if (bin_of(mid, lo, fb, width, bins) >= k) b = mid; else a = mid;
    }
    return bin_of(a, lo, fb, width, bins) >= k ? a : b;
}

CLONES static void count_ge(const void *p, int dt, int64_t start, int64_t n, const float *t, int nt,
                            int64_t *ge) {
    float buf[BLOCK];
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        const float *x = load_block(p, dt, start + i, m, buf);
        for (int k = 0; k < nt; k++) {
            float tk = t[k];
            int32_t c = 0;
#pragma omp simd reduction(+ : c)
            for (int64_t j = 0; j < m; j++) c += x[j] >= tk;
            ge[k] += c;
        }
    }
}

/* Histogram with torch.histc's arithmetic over [lo, hi], added to counts. */
static void hist_of(const void *p, int dt, int64_t start, int64_t n, float lo, float hi, int bins,
                    int64_t *counts) {
    float width = hi - lo, fb = (float)bins, t[MAXBINS];
    int64_t ge[MAXBINS];
    if (bins == 1 || !(width > 0.0f) || !isfinite(width)) { /* constant or non-finite: one bin */
        counts[0] += n;
        return;
    }
    for (int k = 1; k < bins; k++) {
        t[k - 1] = threshold(k, lo, hi, fb, width, bins);
        ge[k - 1] = 0;
    }
    count_ge(p, dt, start, n, t, bins - 1, ge);
    int64_t prev = n;
    for (int k = 1; k < bins; k++) {
        counts[k - 1] += prev - ge[k - 1];
        prev = ge[k - 1];
    }
    counts[bins - 1] += prev;
}

/* ---- AVX-512 path (picked at run time) ------------------------------------------------------
   Per element: an approximate bin j0 = (int)((x - lo) * r) with r a few ulps below bins / width,
   so j0 is the exact bin or one less; one compare against the exact threshold table (vpermps)
   corrects it. Counts go into 3-bit fields of one int32 per lane (bin b at bit 3b, bins 0..9),
   added as a one-hot looked up with vpermd, flushed every 7 vectors into 9-bit fields. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GRAFT_PORTABLE_ONLY)
#define GRAFT_X86 1
#include <immintrin.h>
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AI __attribute__((always_inline))

static inline AI T512 __m512 ld16(const void *p, const int dt, int64_t i) {
    if (dt == 0) return _mm512_loadu_ps((const float *)p + i);
    if (dt == 1) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const double *q = (const double *)p + i;
    __m256 a = _mm512_cvtpd_ps(_mm512_loadu_pd(q)), b = _mm512_cvtpd_ps(_mm512_loadu_pd(q + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
}

static inline AI T512 __m512 ld16m(const void *p, const int dt, int64_t i, __mmask16 m) {
    if (dt == 0) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    if (dt == 1) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const double *q = (const double *)p + i;
    __m256 a = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd((__mmask8)m, q));
    __m256 b = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd((__mmask8)(m >> 8), q + 8));
    return _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1);
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

static inline AI T512 void range512_t(const void *p, const int dt, int64_t st, int64_t n,
                                      float *lo, float *hi, float *probe) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 l0 = _mm512_set1_ps(INFINITY), l1 = l0, l2 = l0, l3 = l0;
    __m512 h0 = _mm512_set1_ps(-INFINITY), h1 = h0, h2 = h0, h3 = h0;
    __m512 z0 = zero, z1 = zero;
    const int64_t e = st + n;
    int64_t i = st;
    const int es = dt == 0 ? 4 : dt == 1 ? 2 : 8; /* bytes per element */
    for (; i + 64 <= e; i += 64) {
        /* the hardware prefetcher alone leaves a single core short of L3/DRAM bandwidth */
        for (int q = 0; q < 64 * es; q += 64)
            _mm_prefetch((const char *)p + i * es + 4096 + q, _MM_HINT_T0);
        __m512 x0 = ld16(p, dt, i), x1 = ld16(p, dt, i + 16);
        __m512 x2 = ld16(p, dt, i + 32), x3 = ld16(p, dt, i + 48);
        l0 = _mm512_min_ps(x0, l0); /* x < l ? x : l, NaN leaves l */
        l1 = _mm512_min_ps(x1, l1);
        l2 = _mm512_min_ps(x2, l2);
        l3 = _mm512_min_ps(x3, l3);
        h0 = _mm512_max_ps(x0, h0);
        h1 = _mm512_max_ps(x1, h1);
        h2 = _mm512_max_ps(x2, h2);
        h3 = _mm512_max_ps(x3, h3);
        z0 = _mm512_add_ps(z0, _mm512_add_ps(_mm512_mul_ps(x0, zero), _mm512_mul_ps(x1, zero)));
        z1 = _mm512_add_ps(z1, _mm512_add_ps(_mm512_mul_ps(x2, zero), _mm512_mul_ps(x3, zero)));
    }
    for (; i < e; i += 16) {
        __mmask16 m = tail_mask(e - i);
        __m512 x = ld16m(p, dt, i, m);
        l0 = _mm512_mask_min_ps(l0, m, x, l0);
        h0 = _mm512_mask_max_ps(h0, m, x, h0);
        z0 = _mm512_add_ps(z0, _mm512_mul_ps(x, zero));
    }
    l0 = _mm512_min_ps(_mm512_min_ps(l0, l1), _mm512_min_ps(l2, l3));
    h0 = _mm512_max_ps(_mm512_max_ps(h0, h1), _mm512_max_ps(h2, h3));
    *lo = _mm512_reduce_min_ps(l0);
    *hi = _mm512_reduce_max_ps(h0);
    *probe = _mm512_reduce_add_ps(_mm512_add_ps(z0, z1));
}

T512 static void range512(const void *p, int dt, int64_t st, int64_t n, float *lo, float *hi,
                          float *probe) {
    if (dt == 0) range512_t(p, 0, st, n, lo, hi, probe);
    else if (dt == 1) range512_t(p, 1, st, n, lo, hi, probe);
    else range512_t(p, 2, st, n, lo, hi, probe);
}

/* bin_of on 16 lanes (the same float operations, so the same results). */
static inline AI T512 __m512i bin16(__m512 x, __m512 vlo, __m512 vfb, __m512 vw, __m512i vlast) {
    __m512i k = _mm512_cvttps_epi32(_mm512_div_ps(_mm512_mul_ps(_mm512_sub_ps(x, vlo), vfb), vw));
    return _mm512_min_epi32(k, vlast);
}

/* step_float on 16 lanes */
static inline AI T512 __m512 step16(__m512 t, int up) {
    __m512i u = _mm512_castps_si512(t);
    __m512i d = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(1)); /* -1 / +1 */
    __m512i r = up ? _mm512_add_epi32(u, d) : _mm512_sub_epi32(u, d);
    __mmask16 z = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7fffffff)) ^ (__mmask16)0xFFFF;
    r = _mm512_mask_mov_epi32(r, z, _mm512_set1_epi32(up ? 1 : (int)0x80000001u));
    return _mm512_castsi512_ps(r);
}

/* threshold(k) for k = 1 .. bins-1 (bins <= 16) in the lanes k-1: threshold_guess and the
   walk of threshold() on 16 lanes; lanes not settled after 8 steps of either walk finish with
   the scalar code. Lanes >= bins-1 get +inf. */
T512 static __m512 thresholds16(float lo, float hi, float fb, float width, int bins) {
    const __m512i kk = _mm512_set_epi32(16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), vfb = _mm512_set1_ps(fb);
    const __m512 vw = _mm512_set1_ps(width), zero = _mm512_setzero_ps();
    const __m512i vlast = _mm512_set1_epi32(bins - 1);
    const __mmask16 act = (__mmask16)((1u << (bins - 1)) - 1u);
    /* d-walk: the smallest d with bin_d(d) >= k */
    __m512 d = _mm512_mul_ps(vw, _mm512_div_ps(_mm512_cvtepi32_ps(kk), vfb)), db = d;
    __mmask16 pend = act & _mm512_cmp_ps_mask(d, zero, _CMP_GT_OQ) &
                     _mm512_cmp_ps_mask(d, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    __mmask16 bad = act & ~pend;
    for (int it = 0; it < 8 && pend; it++) {
        __mmask16 ge = _mm512_cmpge_epi32_mask(bin16(d, zero, vfb, vw, vlast), kk);
        db = step16(d, 0);
        __mmask16 stop = _mm512_cmplt_epi32_mask(bin16(db, zero, vfb, vw, vlast), kk);
        d = _mm512_mask_mov_ps(d, pend & ge & ~stop, db);
        d = _mm512_mask_mov_ps(d, pend & ~ge, step16(d, 1));
        pend &= ~(ge & stop);
    }
    bad |= pend;
    /* start of the x-walk: lo + (d + below(d)) / 2 in double */
    __m512d h = _mm512_set1_pd(0.5), dlo = _mm512_set1_pd((double)lo);
    __m512d m0 = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(d)),
                               _mm512_cvtps_pd(_mm512_castps512_ps256(db)));
    __m512d m1 = _mm512_add_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1)),
                               _mm512_cvtps_pd(_mm512_extractf32x8_ps(db, 1)));
    __m256 t0 = _mm512_cvtpd_ps(_mm512_add_pd(dlo, _mm512_mul_pd(h, m0)));
    __m256 t1 = _mm512_cvtpd_ps(_mm512_add_pd(dlo, _mm512_mul_pd(h, m1)));
    __m512 t = _mm512_insertf32x8(_mm512_castps256_ps512(t0), t1, 1);
    t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(t, vhi, _CMP_GT_OQ), vhi);
    t = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(t, vlo, _CMP_LT_OQ), vlo);
    pend = act & ~bad;
    /* x-walk: bin_of(x) >= k exactly when x - lo >= d (bin_d is non-decreasing) */
    for (int it = 0; it < 8 && pend; it++) {
        __mmask16 ge = _mm512_cmp_ps_mask(_mm512_sub_ps(t, vlo), d, _CMP_GE_OQ);
        __m512 below = step16(t, 0);
        __mmask16 stop = _mm512_cmp_ps_mask(below, vlo, _CMP_LT_OQ) |
                         _mm512_cmp_ps_mask(_mm512_sub_ps(below, vlo), d, _CMP_LT_OQ);
        t = _mm512_mask_mov_ps(t, pend & ge & ~stop, below);
        t = _mm512_mask_mov_ps(t, pend & ~ge, step16(t, 1));
        pend &= ~(ge & stop);
    }
    pend |= bad;
    if (pend) {
        float tt[16];
        _mm512_storeu_ps(tt, t);
        for (int i = 0; i < 16; i++)
            if (pend >> i & 1) tt[i] = threshold(i + 1, lo, hi, fb, width, bins);
        t = _mm512_loadu_ps(tt);
    }
    return _mm512_mask_mov_ps(_mm512_set1_ps(INFINITY), act, t);
}

#define G 7   /* vectors per group: 3-bit fields hold 7 */
#define GG 73 /* groups per flush of the 9-bit fields (511 / 7) */

/* Adds the 9-bit fields of L0..L2 (bin g + 3f in field f of Lg, f < 3) and the lanes of L9
   (bin 9) to cnt. Lane sums of a field stay below 16 * 511 < 2^13, so two fields 18 bits apart
   reduce in one int32 sum. */
static inline AI T512 void flush9(__m512i L0, __m512i L1, __m512i L2, __m512i L9, int nb,
                                  int64_t *cnt) {
    const __m512i me = _mm512_set1_epi32(511 | (511 << 18)), m9 = _mm512_set1_epi32(511);
    __m512i L[3] = {L0, L1, L2};
    for (int g = 0; g < 3; g++) {
        uint32_t e = (uint32_t)_mm512_reduce_add_epi32(_mm512_and_si512(L[g], me));
        cnt[g] += e & 0x3FFFF;
        cnt[g + 6] += e >> 18;
        cnt[g + 3] += (uint32_t)_mm512_reduce_add_epi32(
            _mm512_and_si512(_mm512_srli_epi32(L[g], 9), m9));
    }
    if (nb > 9) cnt[9] += (uint32_t)_mm512_reduce_add_epi32(L9);
}

#define STEP16(x, jv)                                                                              \
    do {                                                                                           \
        __m512i j_ = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sub_ps((x), vlo), vr));             \
        __mmask16 c_ = _mm512_cmp_ps_mask((x), _mm512_permutexvar_ps(j_, vT), _CMP_GE_OQ);       \
        (jv) = _mm512_mask_add_epi32(j_, c_, j_, one);                                            \
    } while (0)

static inline AI T512 void count16_t(const void *p, const int dt, int64_t st, int64_t n,
                                     __m512 vlo, __m512 vr, __m512 vT, const int kind,
                                     const char *pf, int64_t pfl, int64_t *cnt /* 24 */) {
    const __m512i one = _mm512_set1_epi32(1), M = _mm512_set1_epi32(0x001C0E07);
    const __m512i ohA = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 1 << 27, 1 << 24, 1 << 21, 1 << 18,
                                         1 << 15, 1 << 12, 1 << 9, 1 << 6, 1 << 3, 1);
    const __m512i ohB = _mm512_set_epi32(1 << 15, 1 << 12, 1 << 9, 1 << 6, 1 << 3, 1, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0);
    const int two = kind == 2, nb = kind ? 10 : 9;
    const int64_t e = st + n;
    int64_t i = st;
    int64_t pfo = 0;
    while (i < e) {
        __m512i A0 = _mm512_setzero_si512(), A1 = A0, A2 = A0, A9 = A0, B0 = A0, B1 = A0, B2 = A0;
        for (int g = 0; g < GG && i < e; g++) {
            __m512i a = _mm512_setzero_si512(), b = a;
            if (i + 16 * G <= e) {
#pragma GCC unroll 7
                for (int u = 0; u < G; u++) {
                    if (pfo < pfl) { /* data this thread reads next, while counting runs in cache */
                        _mm_prefetch(pf + pfo, _MM_HINT_T1);
                        pfo += 64;
                    }
                    __m512 x = ld16(p, dt, i + 16 * u);
                    __m512i j;
                    STEP16(x, j);
                    a = _mm512_add_epi32(a, _mm512_permutexvar_epi32(j, ohA));
                    if (two) b = _mm512_add_epi32(b, _mm512_permutexvar_epi32(j, ohB));
                }
                i += 16 * G;
            } else {
                for (; i < e; i += 16) {
                    __mmask16 m = tail_mask(e - i);
                    __m512 x = ld16m(p, dt, i, m);
                    __m512i j;
                    STEP16(x, j);
                    a = _mm512_add_epi32(a, _mm512_maskz_permutexvar_epi32(m, j, ohA));
                    if (two) b = _mm512_add_epi32(b, _mm512_maskz_permutexvar_epi32(m, j, ohB));
                }
            }
            A0 = _mm512_add_epi32(A0, _mm512_and_si512(a, M));
            A1 = _mm512_add_epi32(A1, _mm512_and_si512(_mm512_srli_epi32(a, 3), M));
            A2 = _mm512_add_epi32(A2, _mm512_and_si512(_mm512_srli_epi32(a, 6), M));
            if (nb > 9) A9 = _mm512_add_epi32(A9, _mm512_srli_epi32(a, 27));
            if (two) {
                B0 = _mm512_add_epi32(B0, _mm512_and_si512(b, M));
                B1 = _mm512_add_epi32(B1, _mm512_and_si512(_mm512_srli_epi32(b, 3), M));
                B2 = _mm512_add_epi32(B2, _mm512_and_si512(_mm512_srli_epi32(b, 6), M));
            }
        }
        flush9(A0, A1, A2, A9, nb, cnt);
        if (two) flush9(B0, B1, B2, A9, 0, cnt + 10);
    }
}

T512 static void count16(const void *p, int dt, int64_t st, int64_t n, __m512 vlo, __m512 vr,
                         __m512 vT, int bins, const char *pf, int64_t pfl, int64_t *cnt) {
#define C16(K)                                                                                     \
    do {                                                                                           \
        if (dt == 0) count16_t(p, 0, st, n, vlo, vr, vT, K, pf, pfl, cnt);                         \
        else if (dt == 1) count16_t(p, 1, st, n, vlo, vr, vT, K, pf, pfl, cnt);                    \
        else count16_t(p, 2, st, n, vlo, vr, vT, K, pf, pfl, cnt);                                 \
    } while (0)
    if (bins <= 9) C16(0);
    else if (bins == 10) C16(1);
    else C16(2);
#undef C16
}

/* hist_of, AVX-512: the same counts. Prefetches pfl bytes from pf (if any) on the way. */
T512 static void hist512(const void *p, int dt, int64_t start, int64_t n, float lo, float hi,
                         int bins, const char *pf, int64_t pfl, int64_t *counts) {
    float width = hi - lo, fb = (float)bins;
    if (bins == 1 || !(width > 0.0f) || !isfinite(width)) {
        counts[0] += n;
        return;
    }
    /* j0 is within one of the exact bin when (x - lo) * bins stays a normal float below FLT_MAX
       and bins / width is normal: width in [1e-30, 1e36]. Otherwise the threshold counting. */
    if (bins > 16 || width < 1e-30f || width > 1e36f) {
        hist_of(p, dt, start, n, lo, hi, bins, counts);
        return;
    }
    __m512 vT = thresholds16(lo, hi, fb, width, bins);
    float r = fb / width;
    uint32_t u;
    memcpy(&u, &r, 4);
    u -= 8; /* 8 ulps down: (x - lo) * r < torch's (x - lo) * bins / width, and within 1 of it */
    memcpy(&r, &u, 4);
    int64_t cnt[24] = {0};
    if (!pf) pfl = 0;
    count16(p, dt, start, n, _mm512_set1_ps(lo), _mm512_set1_ps(r), vT, bins, pf, pfl, cnt);
    for (int b = 0; b < bins; b++) counts[b] += cnt[b];
}

static int have512(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
    return v;
}
#endif

static inline void range_any(int fast, const void *p, int dt, int64_t st, int64_t n, float *lo,
                             float *hi, float *probe) {
#ifdef GRAFT_X86
    if (fast) {
        range512(p, dt, st, n, lo, hi, probe);
        return;
    }
#endif
    (void)fast;
    range_of(p, dt, st, n, lo, hi, probe);
}

static inline void hist_any(int fast, const void *p, int dt, int64_t st, int64_t n, float lo,
                            float hi, int bins, const char *pf, int64_t pfl, int64_t *counts) {
#ifdef GRAFT_X86
    if (fast) {
        hist512(p, dt, st, n, lo, hi, bins, pf, pfl, counts);
        return;
    }
#endif
    (void)fast;
    (void)pf;
    (void)pfl;
    hist_of(p, dt, st, n, lo, hi, bins, counts);
}

static inline int fast_path(void) {
#ifdef GRAFT_X86
    return have512();
#else
    return 0;
#endif
}

/* Segments: source s splits into rows[s] equal rows of row_len[s] elements each.
   Outputs counts (S x bins, zeroed here) and finite (S).
   Rows of at most CHUNK elements are done whole (range, then counts while the row is in
   cache), a few rows per task. Longer rows run in chunks of CHUNK elements: threads claim the
   range pass chunks of one row after the other; the thread that finishes a row's last range
   chunk merges its range and starts its counting pass, from the last chunk back (the chunks
   it read last are still in its L2), while the other threads go on to the next rows. No
   thread waits for another except at the very end, for a range chunk still in progress. */
#ifndef CHUNK
#define CHUNK (1 << 16)
#endif

typedef struct {
    int64_t src, seg, start, nc, c0; /* elements start.. of source src; chunks c0 .. c0+nc-1 */
    int p1next, p1done, ready;       /* atomics: next range chunk, range chunks done, merged */
    float lo, hi;
} big_row;

static inline int elem_size(int dt) { return dt == 0 ? 4 : dt == 1 ? 2 : 8; }

static inline void spin_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void count_chunk(int fast, const big_row *B, int64_t c, const int64_t *ptrs,
                        const int64_t *row_len, const int32_t *dtypes, int bins,
                        int64_t *counts) {
    int64_t a = c * CHUNK, len = row_len[B->src] - a < CHUNK ? row_len[B->src] - a : CHUNK;
    int64_t local[MAXBINS];
    memset(local, 0, sizeof(int64_t) * bins);
    /* prefetch chunk c - 1, likely this thread's next one (and out of its L2 by now) */
    const char *p = (const char *)(intptr_t)ptrs[B->src];
    int es = elem_size(dtypes[B->src]);
    hist_any(fast, p, dtypes[B->src], B->start + a, len, B->lo, B->hi, bins,
             c > 0 ? p + (B->start + a - CHUNK) * es : 0, (int64_t)CHUNK * es, local);
    for (int b = 0; b < bins; b++)
        if (local[b]) __atomic_fetch_add(&counts[B->seg * bins + b], local[b], __ATOMIC_RELAXED);
}

/* The counting pass of row B: this thread's own range chunks from the last back, then any left. */
static void count_row(int fast, const big_row *B, int tid, const int *owner, int *claim,
                      const int64_t *ptrs, const int64_t *row_len, const int32_t *dtypes,
                      int bins, int64_t *counts) {
    for (int pass = 0; pass < 2; pass++)
        for (int64_t c = B->nc - 1; c >= 0; c--) {
            if (pass == 0 && owner[B->c0 + c] != tid) continue;
            if (__atomic_load_n(&claim[B->c0 + c], __ATOMIC_RELAXED) ||
                __atomic_exchange_n(&claim[B->c0 + c], 1, __ATOMIC_RELAXED))
                continue;
            count_chunk(fast, B, c, ptrs, row_len, dtypes, bins, counts);
        }
}

int graft_segment_hist(int64_t nsrc, const int64_t *ptrs, const int64_t *rows,
                       const int64_t *row_len, const int32_t *dtypes, int32_t bins,
                       int64_t *counts, uint8_t *finite, int32_t nthreads) {
    if (bins < 1 || bins > MAXBINS) return 1;
    const int fast = fast_path();
    int64_t nseg = 0, nbig = 0, nchunk = 0, ntask = 0;
    for (int64_t s = 0; s < nsrc; s++) {
        nseg += rows[s];
        if (row_len[s] > CHUNK) {
            nbig += rows[s];
            nchunk += rows[s] * ((row_len[s] + CHUNK - 1) / CHUNK);
        } else if (rows[s] > 0) {
            int64_t per = row_len[s] > 0 ? CHUNK / row_len[s] : rows[s];
            ntask += (rows[s] + per - 1) / per;
        }
    }
    memset(counts, 0, (size_t)(nseg * bins) * sizeof(int64_t));
    big_row *big = (big_row *)calloc((size_t)(nbig > 0 ? nbig : 1), sizeof(big_row));
    int64_t *task = (int64_t *)malloc((size_t)(ntask > 0 ? ntask : 1) * 4 * sizeof(int64_t));
    float *cr = (float *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * 3 * sizeof(float));
    int *owner = (int *)calloc((size_t)(nchunk > 0 ? nchunk : 1) * 2, sizeof(int));
    if (!big || !task || !cr || !owner) {
        free(big); free(task); free(cr); free(owner);
        return 2;
    }
    int *claim = owner + nchunk;
    int64_t g = 0, b = 0, t = 0, c = 0;
    for (int64_t s = 0; s < nsrc; s++) {
        if (row_len[s] > CHUNK) {
            for (int64_t r = 0; r < rows[s]; r++, b++, g++) {
                big[b].src = s;
                big[b].seg = g;
                big[b].start = r * row_len[s];
                big[b].nc = (row_len[s] + CHUNK - 1) / CHUNK;
                big[b].c0 = c;
                c += big[b].nc;
            }
        } else if (rows[s] > 0) {
            int64_t per = row_len[s] > 0 ? CHUNK / row_len[s] : rows[s];
            for (int64_t r = 0; r < rows[s]; r += per, t++) {
                task[4 * t] = s;
                task[4 * t + 1] = g + r;
                task[4 * t + 2] = r;
                task[4 * t + 3] = rows[s] - r < per ? rows[s] - r : per;
            }
            g += rows[s];
        }
    }
    int tids = 0;
    int64_t next_task = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = __atomic_fetch_add(&tids, 1, __ATOMIC_RELAXED);
        for (int64_t i = 0; i < nbig; i++) {
            big_row *B = &big[i];
            const void *p = (const void *)(intptr_t)ptrs[B->src];
            const int dt = dtypes[B->src];
            int64_t k;
            while ((k = __atomic_fetch_add(&B->p1next, 1, __ATOMIC_RELAXED)) < B->nc) {
                int64_t a = k * CHUNK, rl = row_len[B->src];
                range_any(fast, p, dt, B->start + a, rl - a < CHUNK ? rl - a : CHUNK,
                          &cr[3 * (B->c0 + k)], &cr[3 * (B->c0 + k) + 1], &cr[3 * (B->c0 + k) + 2]);
                owner[B->c0 + k] = tid;
                if (__atomic_add_fetch(&B->p1done, 1, __ATOMIC_ACQ_REL) == B->nc) {
                    /* the last range chunk: merge, then count */
                    const float *q = cr + 3 * B->c0;
                    float lo = q[0], hi = q[1];
                    int ok = q[2] == 0.0f;
                    for (int64_t j = 1; j < B->nc; j++) {
                        lo = q[3 * j] < lo ? q[3 * j] : lo;
                        hi = q[3 * j + 1] > hi ? q[3 * j + 1] : hi;
                        ok &= q[3 * j + 2] == 0.0f;
                    }
                    B->lo = lo;
                    B->hi = hi;
                    finite[B->seg] = (uint8_t)ok;
                    __atomic_store_n(&B->ready, 1, __ATOMIC_RELEASE);
                }
            }
            if (__atomic_load_n(&B->ready, __ATOMIC_ACQUIRE))
                count_row(fast, B, tid, owner, claim, ptrs, row_len, dtypes, bins, counts);
        }
        /* short rows, whole */
        int64_t j;
        while ((j = __atomic_fetch_add(&next_task, 1, __ATOMIC_RELAXED)) < ntask) {
            int64_t s = task[4 * j], seg = task[4 * j + 1], r0 = task[4 * j + 2];
            int64_t nr = task[4 * j + 3], n = row_len[s];
            const void *p = (const void *)(intptr_t)ptrs[s];
            for (int64_t r = 0; r < nr; r++, seg++) {
                float lo, hi, z;
                range_any(fast, p, dtypes[s], (r0 + r) * n, n, &lo, &hi, &z);
                finite[seg] = z == 0.0f;
                /* prefetch the next row while this one is counted in cache (the first row of
                   the next task after a task's last row) */
                int es = elem_size(dtypes[s]);
                const char *pf = r0 + r + 1 < rows[s] ? (const char *)p + (r0 + r + 1) * n * es : 0;
                int64_t pfl = n * es;
                if (!pf && j + 1 < ntask) {
                    int64_t s2 = task[4 * (j + 1)], n2 = row_len[s2];
                    int es2 = elem_size(dtypes[s2]);
                    pf = (const char *)(intptr_t)ptrs[s2] + task[4 * (j + 1) + 2] * n2 * es2;
                    pfl = n2 * es2;
                }
                if (n > 0)
                    hist_any(fast, p, dtypes[s], (r0 + r) * n, n, lo, hi, bins, pf, pfl,
                             counts + seg * bins);
            }
        }
        /* counting chunks left (rows whose last range chunk another thread was still on) */
        for (int64_t i = 0; i < nbig; i++) {
            big_row *B = &big[i];
            int left = 0;
            for (int64_t k = 0; k < B->nc && !left; k++)
                left = !__atomic_load_n(&claim[B->c0 + k], __ATOMIC_RELAXED);
            if (!left) continue;
            while (!__atomic_load_n(&B->ready, __ATOMIC_ACQUIRE)) spin_pause();
            count_row(fast, B, tid, owner, claim, ptrs, row_len, dtypes, bins, counts);
        }
    }
    free(big);
    free(task);
    free(cr);
    free(owner);
    return 0;
}

#define SHORT_ROW 64    /* rows shorter than this take the per-value alpha loop */
#define SHORT_BLOCK 1024

/* o[x] (+)= W * h[x] + V * q[x] over [i, stop) for peer j, W and V expressions of x; z collects
   the NaN/Inf probe of h (first peer) and q. */
#define MIX_TERMS(T, W, V)                                                                         \
    if (j == 0) {                                                                                  \
        _Pragma("omp simd reduction(+ : z)") for (int64_t x = i; x < stop; x++) {                  \
            T t1 = (W) * h[x], t2 = (V) * q[x];                                                    \
            o[x] = t1 + t2;                                                                        \
            z += h[x] * (T)0 + q[x] * (T)0;                                                        \
        }                                                                                          \
    } else {                                                                                       \
        _Pragma("omp simd reduction(+ : z)") for (int64_t x = i; x < stop; x++) {                  \
            T t1 = (W) * h[x], t2 = (V) * q[x];                                                    \
            o[x] = o[x] + (t1 + t2);                                                               \
            z += q[x] * (T)0;                                                                      \
        }                                                                                          \
    }
#define MIX_MEAN(T)                                                                                \
    if (m > 1) {                                                                                   \
        T dm = (T)m;                                                                               \
        _Pragma("omp simd") for (int64_t x = i; x < stop; x++) o[x] = o[x] / dm;                   \
    }

/* o[x - a] = (1/m) * sum_j (a_j * h[x] + (1 - a_j) * p_j[x]) for x in [a, e) of one tensor, in
   the order of operations of graftopt.functional.mix. Row r (of rl elements) against peer j uses
   arow[j * astride + r]; peer j is peer_ptrs[j * pstride]. Returns a NaN/Inf probe: non-zero when
   h or a peer holds a NaN or Inf. */
#define MIX_FN(NAME, T)                                                                            \
    CLONES static T NAME(T *o, const T *h, const int64_t *peer_ptrs, int64_t pstride, int m,       \
                         const float *arow, int64_t astride, int64_t rl, int64_t a, int64_t e) {   \
        T z = 0;                                                                                   \
        o -= a;                                                                                    \
        if (rl < SHORT_ROW) { /* short rows: the alphas spelled out per value, then one loop */    \
            T wb[SHORT_BLOCK];                                                                     \
            for (int64_t i = a; i < e; i += SHORT_BLOCK) {                                         \
                int64_t stop = i + SHORT_BLOCK < e ? i + SHORT_BLOCK : e;                          \
                const T *wv = wb - i;                                                              \
                for (int j = 0; j < m; j++) {                                                      \
                    const T *q = (const T *)(intptr_t)peer_ptrs[(int64_t)j * pstride];             \
                    for (int64_t x = i; x < stop;) {                                               \
                        int64_t r = x / rl, end = (r + 1) * rl < stop ? (r + 1) * rl : stop;       \
                        T w = (T)arow[j * astride + r];                                            \
                        for (; x < end; x++) wb[x - i] = w;                                        \
                    }                                                                              \
                    MIX_TERMS(T, wv[x], ((T)1 - wv[x]))                                            \
                }                                                                                  \
                MIX_MEAN(T)                                                                        \
            }                                                                                      \
            return z;                                                                              \
        }                                                                                          \
        for (int64_t i = a; i < e;) {                                                              \
            int64_t r = i / rl, stop = (r + 1) * rl < e ? (r + 1) * rl : e;                        \
            for (int j = 0; j < m; j++) {                                                          \
                const T *q = (const T *)(intptr_t)peer_ptrs[(int64_t)j * pstride];                 \
                T w = (T)arow[j * astride + r], v = (T)1 - w;                                      \
                MIX_TERMS(T, w, v)                                                                 \
            }                                                                                      \
            MIX_MEAN(T)                                                                            \
            i = stop;                                                                              \
        }                                                                                          \
        return z;                                                                                  \
    }
MIX_FN(mix_f32, float)
MIX_FN(mix_f64, double)

/* Tensor t has numel[t] elements in rows of row_len[t] (0: one row) and its alphas start at column
   aoff[t]; peer pointers are peer-major (peer_ptrs[j * ntensor + t]). finite[t] becomes 0 when the
   host or a peer holds a NaN or Inf. dt: 0 float32, 2 float64. */
#define MIX_CHUNK (1 << 16)
int graft_mix(int64_t ntensor, const int64_t *out_ptrs, const int64_t *host_ptrs,
              const int64_t *peer_ptrs,
              const int64_t *numel, const int64_t *row_len, const int64_t *aoff, const float *alpha,
              int64_t astride, int32_t m, int32_t dt, uint8_t *finite, int32_t nthreads) {
    int64_t nchunk = 0;
    for (int64_t t = 0; t < ntensor; t++) {
        finite[t] = 1;
        nchunk += (numel[t] + MIX_CHUNK - 1) / MIX_CHUNK;
    }
    int64_t *ct = (int64_t *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * 2 * sizeof(int64_t));
    if (!ct) return 2;
    int64_t *cs = ct + nchunk, k = 0;
    for (int64_t t = 0; t < ntensor; t++)
        for (int64_t a = 0; a < numel[t]; a += MIX_CHUNK, k++) {
            ct[k] = t;
            cs[k] = a;
        }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t t = ct[c], a = cs[c];
        int64_t e = a + MIX_CHUNK < numel[t] ? a + MIX_CHUNK : numel[t];
        int64_t rl = row_len[t] > 0 ? row_len[t] : numel[t];
        int bad;
        if (dt == 2)
            bad = mix_f64((double *)(intptr_t)out_ptrs[t] + a,
                          (const double *)(intptr_t)host_ptrs[t], peer_ptrs + t, ntensor, m,
                          alpha + aoff[t], astride, rl, a, e) != 0;
        else
            bad = mix_f32((float *)(intptr_t)out_ptrs[t] + a,
                          (const float *)(intptr_t)host_ptrs[t], peer_ptrs + t, ntensor, m,
                          alpha + aoff[t], astride, rl, a, e) != 0;
        if (bad) {
#pragma omp atomic write
            finite[t] = 0;
        }
    }
    free(ct);
    return 0;
}
/* The blends of a round group written straight into the live tensors.

   Job i blends live[i] (numel[i] elements in rows of row_len[i], 0: one row) with its npeer[i]
   peers (peer_ptrs[i * maxm + j]) using the alphas of table table_of[i] (tables[k], a float32
   (m, astride[k]) matrix) from column col[i], and writes the result into live[i] unless skip[i].
   Jobs are sorted into sets (set s: jobs set_start[s] .. set_start[s + 1] - 1, of one numel): a
   job reads only its own set's live tensors or memory no job writes. Each chunk of a set is
   blended for every job of the set into per-thread scratch before any of it is written, so every
   blend reads pre-round values and no full-size buffer is needed. */
#define GROUP_CHUNK 4096
#define GROUP_FN(NAME, MIX, T)                                                                     \
    static void NAME(const int64_t *live, const int64_t *peer_ptrs, int64_t maxm,                  \
                     const int32_t *npeer, const int64_t *numel, const int64_t *row_len,           \
                     const int64_t *tables, const int64_t *table_of, const int64_t *col,           \
                     const int64_t *astride, const uint8_t *skip, const int64_t *set_start,        \
                     const int64_t *ck_set, const int64_t *ck_start, int64_t nchunk,               \
                     int64_t maxset, int32_t nthreads, T *scratch_all) {                           \
        _Pragma("omp parallel num_threads(nthreads)") {                                            \
            T *scratch = scratch_all + (size_t)omp_get_thread_num() * maxset * GROUP_CHUNK;        \
            _Pragma("omp for schedule(dynamic, 4)") for (int64_t c = 0; c < nchunk; c++) {         \
                int64_t s = ck_set[c], a = ck_start[c], j0 = set_start[s], j1 = set_start[s + 1];  \
                int64_t e = a + GROUP_CHUNK < numel[j0] ? a + GROUP_CHUNK : numel[j0];             \
                /* The start of the next tensors (most likely this thread's next chunk): the   \
                   hardware prefetcher follows a tensor, not the jump to the next one. */        \
                if (c + 1 < nchunk && ck_start[c + 1] == 0) {                                      \
                    int64_t s2 = ck_set[c + 1], n2 = numel[set_start[s2]];                         \
                    int64_t len = (n2 < GROUP_CHUNK ? n2 : GROUP_CHUNK) * sizeof(T);               \
                    for (int64_t i = set_start[s2]; i < set_start[s2 + 1]; i++)                    \
                        for (int64_t b = 0; b < len; b += 64)                                      \
                            __builtin_prefetch((const char *)(intptr_t)live[i] + b);               \
                }                                                                                  \
                if (j1 - j0 == 1 && npeer[j0] == 1) {                                              \
                    /* one job on its own tensor and one peer: each value is read, then written   \
                       in the same step, so the blend goes straight into the tensor */             \
                    if (!skip[j0]) {                                                               \
                        int64_t k = table_of[j0], rl = row_len[j0] > 0 ? row_len[j0] : numel[j0];  \
                        const float *arow = (const float *)(intptr_t)tables[k] + col[j0];          \
                        MIX((T *)(intptr_t)live[j0] + a, (const T *)(intptr_t)live[j0],            \
                            peer_ptrs + j0 * maxm, 1, 1, arow, astride[k], rl, a, e);              \
                    }                                                                              \
                    continue;                                                                      \
                }                                                                                  \
                for (int64_t i = j0; i < j1; i++) {                                                \
                    if (skip[i]) continue;                                                         \
                    int64_t k = table_of[i], rl = row_len[i] > 0 ? row_len[i] : numel[i];          \
                    const float *arow = (const float *)(intptr_t)tables[k] + col[i];               \
                    MIX(scratch + (i - j0) * GROUP_CHUNK, (const T *)(intptr_t)live[i],            \
                        peer_ptrs + i * maxm, 1, npeer[i], arow, astride[k], rl, a, e);            \
                }                                                                                  \
                for (int64_t i = j0; i < j1; i++)                                                  \
                    if (!skip[i])                                                                  \
                        memcpy((T *)(intptr_t)live[i] + a, scratch + (i - j0) * GROUP_CHUNK,       \
                               (size_t)(e - a) * sizeof(T));                                       \
            }                                                                                      \
        }                                                                                          \
    }
GROUP_FN(group_f32, mix_f32, float)
GROUP_FN(group_f64, mix_f64, double)

int graft_group_mix(int64_t njob, const int64_t *live, const int64_t *peer_ptrs, int64_t maxm,
                    const int32_t *npeer, const int64_t *numel, const int64_t *row_len,
                    const int64_t *tables, const int64_t *table_of, const int64_t *col,
                    const int64_t *astride, const uint8_t *skip, int64_t nset,
                    const int64_t *set_start, int32_t dt, int32_t nthreads) {
    int64_t nchunk = 0, maxset = 1;
    for (int64_t s = 0; s < nset; s++) {
        int64_t n = numel[set_start[s]], size = set_start[s + 1] - set_start[s];
        nchunk += (n + GROUP_CHUNK - 1) / GROUP_CHUNK;
        maxset = size > maxset ? size : maxset;
    }
    (void)njob;
    if (nthreads < 1) nthreads = 1;
    /* Everything is allocated before the first write: a failure leaves every tensor as it was. */
    int64_t *ck = (int64_t *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * 2 * sizeof(int64_t));
    void *scratch = malloc((size_t)nthreads * maxset * GROUP_CHUNK * (dt == 2 ? 8 : 4));
    if (!ck || !scratch) {
        free(ck);
        free(scratch);
        return 2;
    }
    int64_t *ck_start = ck + nchunk, c = 0;
    for (int64_t s = 0; s < nset; s++)
        for (int64_t a = 0; a < numel[set_start[s]]; a += GROUP_CHUNK, c++) {
            ck[c] = s;
            ck_start[c] = a;
        }
    if (dt == 2)
        group_f64(live, peer_ptrs, maxm, npeer, numel, row_len, tables, table_of, col, astride,
                  skip, set_start, ck, ck_start, nchunk, maxset, nthreads, (double *)scratch);
    else
        group_f32(live, peer_ptrs, maxm, npeer, numel, row_len, tables, table_of, col, astride,
                  skip, set_start, ck, ck_start, nchunk, maxset, nthreads, (float *)scratch);
    free(ck);
    free(scratch);
    return 0;
}

/* finite[t] = 1 when none of the numel[t] elements of tensor t (dtype code dtypes[t]) is NaN or
   Inf. */
int graft_finite(int64_t n, const int64_t *ptrs, const int64_t *numel, const int32_t *dtypes,
                 uint8_t *finite, int32_t nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8)
    for (int64_t t = 0; t < n; t++) {
        if (dtypes[t] == 2) { /* in double: a finite float64 may overflow float32 */
            const double *x = (const double *)(intptr_t)ptrs[t];
            double z = 0.0;
#pragma omp simd reduction(+ : z)
            for (int64_t i = 0; i < numel[t]; i++) z += x[i] * 0.0;
            finite[t] = z == 0.0;
            continue;
        }
        float lo, hi, z = 0.0f;
        if (numel[t] > 0)
            range_of((const void *)(intptr_t)ptrs[t], dtypes[t], 0, numel[t], &lo, &hi, &z);
        finite[t] = z == 0.0f;
    }
    return 0;
}
