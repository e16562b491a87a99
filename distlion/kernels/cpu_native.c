/* DistLion's CPU kernels in C: one pass over memory per kernel.
 *
 * Built on first use by distlion/kernels/cpu_native.py (cc -O3 -march=native
 * -ffp-contract=off) and called through ctypes. The arithmetic is the contract of
 * distlion/kernels/contract.py, rounded exactly as the torch reference rounds it:
 * a product, then one fma (torch's add(alpha=) is an fma on AVX2 CPUs). With
 * -ffp-contract=off the compiler fuses nothing else, so the bits are the reference's.
 *
 * Layout: bit j of byte k is coordinate 8k + j, a set bit is +1. Packed rows are read
 * as 64-bit words (64 coordinates); every length is a multiple of 64.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DL_AVX2 1
#endif

/* float -> bfloat16, round to nearest even, as torch converts (NaN -> quiet NaN). */
static inline uint16_t to_bf16(float value) {
    uint32_t u;
    memcpy(&u, &value, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint8_t sign_byte(const float *g, const float *m, float beta1, float one_minus_beta1,
                                uint8_t zero_pattern, uint32_t *nonfinite) {
    uint8_t positive = 0, zero = 0;
    for (int j = 0; j < 8; j++) {
        float c = fmaf(g[j], one_minus_beta1, m[j] * beta1);
        uint32_t u;
        memcpy(&u, g + j, sizeof u);
        *nonfinite |= (u & 0x7f800000u) == 0x7f800000u;
        positive |= (uint8_t)((c > 0.0f) << j);
        zero |= (uint8_t)((c == 0.0f) << j);
    }
    return (uint8_t)(positive | (zero & zero_pattern));
}

/* out[k] <- signs of c = m*beta1 + g*(1-beta1); c == 0 votes + where (index + parity) is even.
 * With m_out (may be g itself), also m_out <- m*beta2 + g*(1-beta2) from the same reads.
 * Returns 1 if g holds an inf or a nan: the check rides on the same read of g. */
int dl_pack_signs(const float *g, const float *m, uint8_t *out, float *m_out, int64_t n, float beta1,
                  float one_minus_beta1, float beta2, float one_minus_beta2, int parity) {
    const uint8_t zero_pattern = parity % 2 ? 0xAA : 0x55;
    uint32_t nonfinite = 0;
    int64_t k = 0;
#ifdef DL_AVX2
    const __m256 b1 = _mm256_set1_ps(beta1), a1 = _mm256_set1_ps(one_minus_beta1);
    const __m256 b2 = _mm256_set1_ps(beta2), a2 = _mm256_set1_ps(one_minus_beta2);
    const __m256 zero = _mm256_setzero_ps();
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    __m256i any = _mm256_setzero_si256();
    for (; 8 * k + 32 <= n; k += 4) {
        uint32_t word = 0;
        for (int q = 0; q < 4; q++) {
            const int64_t i = 8 * (k + q);
            __m256 grad = _mm256_loadu_ps(g + i), mom = _mm256_loadu_ps(m + i);
            __m256 c = _mm256_fmadd_ps(grad, a1, _mm256_mul_ps(mom, b1));
            if (m_out != NULL) _mm256_storeu_ps(m_out + i, _mm256_fmadd_ps(grad, a2, _mm256_mul_ps(mom, b2)));
            uint32_t positive = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ));
            uint32_t is_zero = (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c, zero, _CMP_EQ_OQ));
            word |= (positive | (is_zero & zero_pattern)) << (8 * q);
            __m256i bits = _mm256_and_si256(_mm256_castps_si256(grad), exponent);
            any = _mm256_or_si256(any, _mm256_cmpeq_epi32(bits, exponent));
        }
        memcpy(out + k, &word, sizeof word);
    }
    nonfinite = !_mm256_testz_si256(any, any);
#endif
    for (; 8 * k < n; k++) {
        out[k] = sign_byte(g + 8 * k, m + 8 * k, beta1, one_minus_beta1, zero_pattern, &nonfinite);
        if (m_out != NULL)
            for (int64_t i = 8 * k; i < 8 * k + 8; i++) m_out[i] = fmaf(g[i], one_minus_beta2, m[i] * beta2);
    }
    return (int)nonfinite;
}

/* dl_pack_signs over coordinates [lo, hi) of a bucket whose gradient is scattered over
 * nseg segments (segment i covers [start[i], start[i] + len[i]), read from grads[i], or
 * zeros where grads[i] is NULL; coordinates no segment covers are zeros). Each tile of
 * coordinates is gathered into a buffer that stays in L1, so the gradients are read
 * from memory once and never copied into the bucket. lo is a multiple of 512. */
#define DL_TILE 2048
int dl_pack_segments(const float *const *grads, const int64_t *start, const int64_t *len, int nseg,
                     const float *m, uint8_t *out, float *m_out, int64_t lo, int64_t hi, float beta1,
                     float one_minus_beta1, float beta2, float one_minus_beta2, int parity) {
    float tile[DL_TILE];
    int found = 0, s = 0;
    for (int64_t t = lo; t < hi; t += DL_TILE) {
        const int64_t end = t + DL_TILE < hi ? t + DL_TILE : hi;
        int64_t pos = t;
        while (pos < end) {
            while (s < nseg && start[s] + len[s] <= pos) s++;
            if (s == nseg || start[s] >= end) {
                memset(tile + (pos - t), 0, (size_t)(end - pos) * sizeof(float));
                break;
            }
            if (start[s] > pos) {
                memset(tile + (pos - t), 0, (size_t)(start[s] - pos) * sizeof(float));
                pos = start[s];
            }
            const int64_t stop = start[s] + len[s] < end ? start[s] + len[s] : end;
            if (grads[s] != NULL)
                memcpy(tile + (pos - t), grads[s] + (pos - start[s]), (size_t)(stop - pos) * sizeof(float));
            else
                memset(tile + (pos - t), 0, (size_t)(stop - pos) * sizeof(float));
            pos = stop;
        }
        found |= dl_pack_signs(tile, m + t, out + t / 8, m_out + t, end - t, beta1, one_minus_beta1, beta2,
                               one_minus_beta2, parity);
    }
    return found;
}

/* m <- m*beta2 + g*(1-beta2) */
void dl_update_momentum(const float *g, float *m, int64_t n, float beta2, float one_minus_beta2) {
    int64_t i = 0;
#ifdef DL_AVX2
    const __m256 b2 = _mm256_set1_ps(beta2), a2 = _mm256_set1_ps(one_minus_beta2);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(m + i, _mm256_fmadd_ps(_mm256_loadu_ps(g + i), a2, _mm256_mul_ps(_mm256_loadu_ps(m + i), b2)));
#endif
    for (; i < n; i++) m[i] = fmaf(g[i], one_minus_beta2, m[i] * beta2);
}

/* 1 if any of the n floats is an inf or a nan (all exponent bits set). */
int dl_nonfinite(const float *g, int64_t n) {
    const uint32_t *u = (const uint32_t *)g;
    uint32_t found = 0;
    int64_t i = 0;
#ifdef DL_AVX2
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    __m256i any = _mm256_setzero_si256();
    for (; i + 8 <= n; i += 8) {
        __m256i bits = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(u + i)), exponent);
        any = _mm256_or_si256(any, _mm256_cmpeq_epi32(bits, exponent));
    }
    found = !_mm256_testz_si256(any, any);
#endif
    for (; i < n; i++) found |= (u[i] & 0x7f800000u) == 0x7f800000u;
    return (int)found;
}

/* Bit-sliced count of the set bits of `rows` packed rows at one 64-bit word. */
static inline int count_planes(const uint64_t *packed, int64_t row_words, int rows, int64_t w, uint64_t *planes) {
    int used = 0;
    for (int r = 0; r < rows; r++) {
        uint64_t carry = packed[r * row_words + w];
        for (int p = 0; p < used && carry; p++) {
            uint64_t next = planes[p] & carry;
            planes[p] ^= carry;
            carry = next;
        }
        if (carry) planes[used++] = carry;
    }
    return used;
}

/* out <- bits set where more than rows/2 rows are set; a tie (rows even) takes row casting_rank. */
void dl_majority_vote(const uint64_t *packed, int64_t row_words, int rows, uint64_t *out, int64_t words,
                      int casting_rank) {
    const uint64_t half = (uint64_t)rows / 2;
    for (int64_t w = 0; w < words; w++) {
        uint64_t planes[64];
        const int used = count_planes(packed, row_words, rows, w, planes);
        int top = used;
        while (top < 64 && (half >> top)) top++;
        uint64_t greater = 0, equal = ~(uint64_t)0;
        for (int p = top - 1; p >= 0; p--) {
            const uint64_t plane = p < used ? planes[p] : 0;
            if ((half >> p) & 1) {
                equal &= plane;
            } else {
                greater |= equal & plane;
                equal &= ~plane;
            }
        }
        if (rows % 2 == 0) greater |= equal & packed[casting_rank * row_words + w];
        out[w] = greater;
    }
}

/* out[i] (plane i, out_words apart) <- bit i of the per-coordinate count of set bits. */
void dl_vote_counts(const uint64_t *packed, int64_t row_words, int rows, uint64_t *out, int64_t out_words,
                    int out_planes, int64_t words) {
    for (int64_t w = 0; w < words; w++) {
        uint64_t planes[64];
        const int used = count_planes(packed, row_words, rows, w, planes);
        for (int p = 0; p < out_planes; p++) out[p * out_words + w] = p < used ? planes[p] : 0;
    }
}

#ifdef DL_AVX2
static const int32_t LANE_BITS[8] = {1, 2, 4, 8, 16, 32, 64, 128};

/* The 8 lanes of one vote byte as all-ones (bit set) or zero masks. */
static inline __m256i byte_lanes(uint8_t byte) {
    const __m256i lanes = _mm256_loadu_si256((const __m256i *)LANE_BITS);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(byte), lanes), lanes);
}

/* x*decay + step*neg_lr for 8 lanes, stored to x, and rounded to bf16 when asked. */
static inline void update8(float *x, uint16_t *bf16, __m256 s, __m256 decay, __m256 neg_lr) {
    __m256 v = _mm256_fmadd_ps(s, neg_lr, _mm256_mul_ps(_mm256_loadu_ps(x), decay));
    _mm256_storeu_ps(x, v);
    if (bf16 == NULL) return;
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128((__m128i *)bf16, packed);
}
#endif

/* x <- x*decay + (-lr)*s for a +-1 sign per set/clear bit of vote; bf16 (if not NULL) <- bf16(x). */
void dl_apply_majority(float *x, uint16_t *bf16, const uint8_t *vote, int64_t n, float decay, float neg_lr) {
    int64_t i = 0;
#ifdef DL_AVX2
    const __m256 d = _mm256_set1_ps(decay), step = _mm256_set1_ps(neg_lr);
    const __m256 plus = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 s = _mm256_blendv_ps(minus, plus, _mm256_castsi256_ps(byte_lanes(vote[i / 8])));
        update8(x + i, bf16 == NULL ? NULL : bf16 + i, s, d, step);
    }
#endif
    for (; i < n; i++) {
        const float s = (vote[i / 8] >> (i % 8)) & 1 ? 1.0f : -1.0f;
        x[i] = fmaf(s, neg_lr, x[i] * decay);
        if (bf16 != NULL) bf16[i] = to_bf16(x[i]);
    }
}

#ifdef DL_AVX2
/* steps[count] for the 8 coordinates of byte k, count read from `planes` bit-planes (plane_bytes apart). */
static inline __m256 step_lanes(const uint8_t *counts, int64_t plane_bytes, int planes, const float *steps,
                                int64_t k) {
    if (planes == 1)  /* a majority vote (or N = 1): a blend instead of a gather */
        return _mm256_blendv_ps(_mm256_set1_ps(steps[0]), _mm256_set1_ps(steps[1]),
                                _mm256_castsi256_ps(byte_lanes(counts[k])));
    __m256i count = _mm256_setzero_si256();
    for (int p = 0; p < planes; p++)
        count = _mm256_or_si256(count, _mm256_and_si256(byte_lanes(counts[p * plane_bytes + k]),
                                                        _mm256_set1_epi32(1 << p)));
    return _mm256_i32gather_ps(steps, count, 4);
}
#endif

/* steps[count] for coordinate j of byte k. */
static inline float step_of(const uint8_t *counts, int64_t plane_bytes, int planes, const float *steps, int64_t k,
                            int j) {
    int count = 0;
    for (int p = 0; p < planes; p++) count |= ((counts[p * plane_bytes + k] >> j) & 1) << p;
    return steps[count];
}

/* As dl_apply_majority with s = steps[count], count read from `planes` bit-planes (plane_bytes apart). */
void dl_apply_average(float *x, uint16_t *bf16, const uint8_t *counts, int64_t plane_bytes, int planes,
                      const float *steps, int64_t n, float decay, float neg_lr) {
    int64_t k = 0;
#ifdef DL_AVX2
    const __m256 d = _mm256_set1_ps(decay), step = _mm256_set1_ps(neg_lr);
    for (; 8 * k + 8 <= n; k++)
        update8(x + 8 * k, bf16 == NULL ? NULL : bf16 + 8 * k, step_lanes(counts, plane_bytes, planes, steps, k), d,
                step);
#endif
    for (; 8 * k < n; k++) {
        for (int j = 0; j < 8; j++) {
            const int64_t i = 8 * k + j;
            x[i] = fmaf(step_of(counts, plane_bytes, planes, steps, k, j), neg_lr, x[i] * decay);
            if (bf16 != NULL) bf16[i] = to_bf16(x[i]);
        }
    }
}

/* The scaled step: s = steps[count] as in dl_apply_average, then per coordinate
 * e = fma(s, one_minus_beta, e*beta), h = e*correction, x = fma((s*h)*h, neg_lr, x*decay). */
void dl_apply_scaled(float *x, uint16_t *bf16, float *ema, const uint8_t *counts, int64_t plane_bytes, int planes,
                     const float *steps, int64_t n, float beta, float one_minus_beta, float correction, float decay,
                     float neg_lr) {
    int64_t k = 0;
#ifdef DL_AVX2
    const __m256 d = _mm256_set1_ps(decay), step = _mm256_set1_ps(neg_lr);
    const __m256 b = _mm256_set1_ps(beta), omb = _mm256_set1_ps(one_minus_beta), c = _mm256_set1_ps(correction);
    for (; 8 * k + 8 <= n; k++) {
        __m256 s = step_lanes(counts, plane_bytes, planes, steps, k);
        __m256 e = _mm256_fmadd_ps(s, omb, _mm256_mul_ps(_mm256_loadu_ps(ema + 8 * k), b));
        _mm256_storeu_ps(ema + 8 * k, e);
        __m256 h = _mm256_mul_ps(e, c);
        update8(x + 8 * k, bf16 == NULL ? NULL : bf16 + 8 * k, _mm256_mul_ps(_mm256_mul_ps(s, h), h), d, step);
    }
#endif
    for (; 8 * k < n; k++) {
        for (int j = 0; j < 8; j++) {
            const int64_t i = 8 * k + j;
            const float s = step_of(counts, plane_bytes, planes, steps, k, j);
            ema[i] = fmaf(s, one_minus_beta, ema[i] * beta);
            const float h = ema[i] * correction;
            x[i] = fmaf((s * h) * h, neg_lr, x[i] * decay);
            if (bf16 != NULL) bf16[i] = to_bf16(x[i]);
        }
    }
}
