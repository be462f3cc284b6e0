"""C source of the CPU kernels (built on first use by :mod:`graftopt.kernels.cpu`)."""

SOURCE = r"""
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

/* The smallest float t in [lo, hi] with bin_of(t) >= k. bin_of is non-decreasing in x (every
   float operation in it is monotone), so counting x >= t for each k gives exact bin counts
   without a division per element. */
static float threshold(int k, float lo, float hi, float fb, float width, int bins) {
    float t = lo + width * ((float)k / fb);
    t = t < lo ? lo : (t > hi ? hi : t);
    for (int step = 0; step < 64; step++) {
        if (bin_of(t, lo, fb, width, bins) >= k) {
            float below = nextafterf(t, -INFINITY);
            if (below < lo || bin_of(below, lo, fb, width, bins) < k) return t;
            t = below;
        } else {
            t = nextafterf(t, INFINITY);
        }
    }
    /* Far from the guess (only for extreme ranges): bisect on the ordered float bits. */
    float a = lo, b = hi;
    while (nextafterf(a, INFINITY) < b) {
        float mid = a + (b - a) * 0.5f;
        if (mid <= a || mid >= b) mid = nextafterf(a, INFINITY);
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
    if (!(width > 0.0f) || !isfinite(width)) { /* constant or non-finite: one bin */
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

/* Segments: source s splits into rows[s] equal rows of row_len[s] elements each.
   Outputs counts (S x bins, zeroed here) and finite (S). Work runs in chunks of at most CHUNK
   elements under dynamic scheduling, so a busy core delays the call by one chunk at most. */
#define CHUNK (1 << 16)
int graft_segment_hist(int64_t nsrc, const int64_t *ptrs, const int64_t *rows,
                       const int64_t *row_len,
                       const int32_t *dtypes, int32_t bins, int64_t *counts, uint8_t *finite,
                       int32_t nthreads) {
    if (bins < 1 || bins > MAXBINS) return 1;
    int64_t nseg = 0, nchunk = 0;
    for (int64_t s = 0; s < nsrc; s++) {
        nseg += rows[s];
        nchunk += rows[s] * (row_len[s] > CHUNK ? (row_len[s] + CHUNK - 1) / CHUNK : 1);
    }
    memset(counts, 0, (size_t)(nseg * bins) * sizeof(int64_t));
    /* per chunk: source, segment, start, length; per chunk min/max/probe for split segments */
    int64_t *cw = (int64_t *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * 4 * sizeof(int64_t));
    float *cr = (float *)malloc((size_t)(nchunk > 0 ? nchunk : 1) * 3 * sizeof(float));
    float *sr = (float *)malloc((size_t)(nseg > 0 ? nseg : 1) * 2 * sizeof(float));
    if (!cw || !cr || !sr) {
        free(cw); free(cr); free(sr);
        return 2;
    }
    int64_t c = 0, g = 0;
    for (int64_t s = 0; s < nsrc; s++)
        for (int64_t r = 0; r < rows[s]; r++, g++)
            for (int64_t a = 0; a < row_len[s] || (a == 0 && row_len[s] == 0); a += CHUNK, c++) {
                cw[4 * c] = s;
                cw[4 * c + 1] = g;
                cw[4 * c + 2] = r * row_len[s] + a;
                cw[4 * c + 3] = row_len[s] - a < CHUNK ? row_len[s] - a : CHUNK;
                if (row_len[s] == 0) break;
            }
#pragma omp parallel num_threads(nthreads)
    {
        /* pass 1: whole short segments, and min/max of each chunk of long ones */
#pragma omp for schedule(dynamic, 8)
        for (int64_t i = 0; i < nchunk; i++) {
            int64_t s = cw[4 * i], seg = cw[4 * i + 1], st = cw[4 * i + 2], n = cw[4 * i + 3];
            const void *p = (const void *)(intptr_t)ptrs[s];
            range_of(p, dtypes[s], st, n, &cr[3 * i], &cr[3 * i + 1], &cr[3 * i + 2]);
            if (row_len[s] <= CHUNK) {
                finite[seg] = cr[3 * i + 2] == 0.0f;
                int64_t *dst = counts + seg * bins;
                if (n > 0) hist_of(p, dtypes[s], st, n, cr[3 * i], cr[3 * i + 1], bins, dst);
            }
        }
#pragma omp single
        {
            for (int64_t i = 0; i < nchunk; i++) {
                int64_t s = cw[4 * i], seg = cw[4 * i + 1];
                if (row_len[s] <= CHUNK) continue;
                if (cw[4 * i + 2] % row_len[s] == 0) { /* first chunk of its segment */
                    sr[2 * seg] = cr[3 * i];
                    sr[2 * seg + 1] = cr[3 * i + 1];
                    finite[seg] = 1;
                } else {
                    sr[2 * seg] = cr[3 * i] < sr[2 * seg] ? cr[3 * i] : sr[2 * seg];
                    float h = cr[3 * i + 1];
                    sr[2 * seg + 1] = h > sr[2 * seg + 1] ? h : sr[2 * seg + 1];
                }
                if (cr[3 * i + 2] != 0.0f) finite[seg] = 0;
            }
        }
        /* pass 2: histograms of the chunks of long segments */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nchunk; i++) {
            int64_t s = cw[4 * i], seg = cw[4 * i + 1];
            if (row_len[s] <= CHUNK) continue;
            int64_t local[MAXBINS];
            memset(local, 0, sizeof(int64_t) * bins);
            hist_of((const void *)(intptr_t)ptrs[s], dtypes[s], cw[4 * i + 2], cw[4 * i + 3],
                    sr[2 * seg],
                    sr[2 * seg + 1], bins, local);
            for (int b = 0; b < bins; b++) {
#pragma omp atomic
                counts[seg * bins + b] += local[b];
            }
        }
    }
    free(cw);
    free(cr);
    free(sr);
    return 0;
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
        for (int64_t i = a; i < e;) {                                                              \
            int64_t r = i / rl, stop = (r + 1) * rl < e ? (r + 1) * rl : e;                        \
            for (int j = 0; j < m; j++) {                                                          \
                const T *q = (const T *)(intptr_t)peer_ptrs[(int64_t)j * pstride];                 \
                T w = (T)arow[j * astride + r], v = (T)1 - w;                                      \
                if (j == 0) {                                                                      \
                    _Pragma("omp simd reduction(+ : z)") for (int64_t x = i; x < stop; x++) {      \
                        T t1 = w * h[x], t2 = v * q[x];                                            \
                        o[x] = t1 + t2;                                                            \
                        z += h[x] * (T)0 + q[x] * (T)0;                                            \
                    }                                                                              \
                } else {                                                                           \
                    _Pragma("omp simd reduction(+ : z)") for (int64_t x = i; x < stop; x++) {      \
                        T t1 = w * h[x], t2 = v * q[x];                                            \
                        o[x] = o[x] + (t1 + t2);                                                   \
                        z += q[x] * (T)0;                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            if (m > 1) {                                                                           \
                T dm = (T)m;                                                                       \
                _Pragma("omp simd") for (int64_t x = i; x < stop; x++) o[x] = o[x] / dm;           \
            }                                                                                      \
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
        float lo, hi, z = 0.0f;
        if (numel[t] > 0)
            range_of((const void *)(intptr_t)ptrs[t], dtypes[t], 0, numel[t], &lo, &hi, &z);
        finite[t] = z == 0.0f;
    }
    return 0;
}
"""
