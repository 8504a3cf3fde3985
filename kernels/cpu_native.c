/* Native pieces of rotquant's CPU kernel (kernels/cpu_kernel.py), compiled once per machine by
 * kernels/cpu_native.py with the system C compiler (the one Inductor uses) and loaded with ctypes.
 *
 * 1. rq_gemm: int8 activations x INT4 weights, exact int32 accumulation and the epilogue of
 *    kernels/reference.py, for the M (tokens) where a library GEMM's fixed cost dominates and for
 *    group-wise scales. Weights are stored once in the "nib64" layout (rq_pack_weights): per
 *    block of 64 output channels and chunk of 8 input columns k0..k0+7, 4 x 64 bytes, one per
 *    16 channels; byte 4*c + j of those (channel c, j = 0..3) = u[k0 + j] | u[k0 + 4 + j] << 4,
 *    u = w + 8 in [0, 15] (unsigned nibbles; padding channels and columns hold u = 8, w = 0).
 *    One 64-byte load gives two u8 tiles [16 channels x 4 columns] for `vpdpbusd` (u8 x s8 -> s32)
 *    against four activations broadcast to every lane; 4 x 4 (rows x 16 channels) independent
 *    sums hide its latency. Since sum u*q = sum w*q + 8 * sum q, the
 *    accumulator loses 8 x (the row's activation sum) afterwards: an exact integer correction,
 *    like the zero point's (za * weight sums) of asymmetric activations.
 *    Output float32: per channel float(acc), with G groups fl32(sum_g double(acc_g) * sw[n, g]),
 *    the reference's "exact value rounded once to float32" (its float64 sum runs in another
 *    order: see kernels/cpu_kernel.py for the bound); the caller's traced epilogue multiplies
 *    by the scales as the reference does (Inductor fuses it into the next op).
 * 2. rq_hadamard: block-diagonal normalized Hadamard H = kron(C, S) / sqrt(block) along rows
 *    (S Sylvester of order B, the fast Walsh-Hadamard butterflies; C a +-1 core of order A, dense),
 *    float32 out. Its float rounding differs from the reference's dense float32 matmul only in
 *    summation order (the CUDA kernel's contract too).
 *
 * Compile without -ffast-math and with -ffp-contract=off (no contracted products anywhere).
 * Threads: OpenMP, i.e. torch's own pool (libgomp is shared).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { RQ_F32 = 0, RQ_BF16 = 1, RQ_F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__F16C__)
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float f16_to_f32(uint16_t u) { _Float16 h; memcpy(&h, &u, 2); return (float)h; }
#endif

int rq_abi_version(void) { return 2; }

int rq_isa(void) {
    /* what this build was compiled for: 3 AVX512-VNNI, 2 AVX-VNNI, 1 AVX2, 0 portable C */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 3;
#elif defined(__AVXVNNI__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------ packing */
/* w: int8 [N, K] in [-8, 7] (row-major) -> nib64 layout: bytes [ceil(N/64)][ceil(K/8)][4][64],
 * block b, chunk c, sub-block s = the 64 bytes of channels 64b + 16s .. +15 (see the top). */
void rq_pack_weights(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const int64_t nb = (N + 63) / 64, kc = (K + 7) / 8;
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t c = 0; c < kc; ++c)
            for (int s = 0; s < 4; ++s) {
                uint8_t* dst = out + ((b * kc + c) * 4 + s) * 64;
                for (int ch = 0; ch < 16; ++ch) {
                    const int64_t n = b * 64 + s * 16 + ch;
                    for (int j = 0; j < 4; ++j) {
                        const int64_t k0 = c * 8 + j, k1 = c * 8 + 4 + j;
                        int u0 = 8, u1 = 8;
                        if (n < N && k0 < K) u0 = w[n * K + k0] + 8;
                        if (n < N && k1 < K) u1 = w[n * K + k1] + 8;
                        dst[ch * 4 + j] = (uint8_t)(u0 | (u1 << 4));
                    }
                }
            }
}

/* --------------------------------------------------------------------------------- the GEMM */
#define MR 4 /* activation rows per micro-kernel call; x 64 channels: 4 x 4 independent sums */

/* acc[r][0..63] = sum over chunks [c0, c1) of u[64 ch x 8 cols] . q[r][8 cols], rows r < MRC */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DOT_KERNEL(MRC)                                                                           \
    static void dot_chunks_##MRC(const uint8_t* wb, const int8_t* const* qrow, int64_t c0,      \
                                 int64_t c1, int32_t acc[MR][64]) {                              \
        const __m512i low = _mm512_set1_epi8(0x0f);                                             \
        __m512i a[MRC][4];                                                                       \
        for (int r = 0; r < MRC; ++r)                                                            \
            for (int s = 0; s < 4; ++s) a[r][s] = _mm512_setzero_si512();                        \
        for (int64_t c = c0; c < c1; ++c) {                                                      \
            const uint8_t* p = wb + c * 256;                                                     \
            __m512i lo[4], hi[4];                                                                \
            for (int s = 0; s < 4; ++s) {                                                        \
                const __m512i v = _mm512_loadu_si512(p + s * 64);                                \
                lo[s] = _mm512_and_si512(v, low);                                                \
                hi[s] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);                          \
            }                                                                                    \
            for (int r = 0; r < MRC; ++r) {                                                      \
                int32_t x0, x1;                                                                  \
                memcpy(&x0, qrow[r] + c * 8, 4);                                                 \
                memcpy(&x1, qrow[r] + c * 8 + 4, 4);                                             \
                const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);            \
                for (int s = 0; s < 4; ++s)                                                      \
                    a[r][s] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[r][s], lo[s], b0), hi[s], b1); \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < MRC; ++r)                                                            \
            for (int s = 0; s < 4; ++s) _mm512_storeu_si512(acc[r] + 16 * s, a[r][s]);           \
    }
#elif defined(__AVX2__)
/* 8-channel halves of each 16-channel sub-block; u8 x s8 pairs -> s16 (no saturation:
 * 2 * 15 * 128 < 2^15) -> s32, or AVX-VNNI's vpdpbusd */
#if defined(__AVXVNNI__)
#define DP256(acc, u, b, ones) _mm256_dpbusd_avx_epi32(acc, u, b)
#else
#define DP256(acc, u, b, ones) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, b), ones))
#endif
#define DOT_KERNEL(MRC)                                                                           \
    static void dot_chunks_##MRC(const uint8_t* wb, const int8_t* const* qrow, int64_t c0,      \
                                 int64_t c1, int32_t acc[MR][64]) {                              \
        const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);                \
        (void)ones;                                                                              \
        for (int half = 0; half < 2; ++half) { /* channels 32*half .. +31: 4 vectors of 8 */     \
            __m256i a[MRC][4];                                                                   \
            for (int r = 0; r < MRC; ++r)                                                        \
                for (int s = 0; s < 4; ++s) a[r][s] = _mm256_setzero_si256();                    \
            for (int64_t c = c0; c < c1; ++c) {                                                  \
                const uint8_t* p = wb + c * 256 + half * 128;                                    \
                __m256i lo[4], hi[4];                                                            \
                for (int s = 0; s < 4; ++s) {                                                    \
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(p + s * 32));          \
                    lo[s] = _mm256_and_si256(v, low);                                            \
                    hi[s] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                      \
                }                                                                                \
                for (int r = 0; r < MRC; ++r) {                                                  \
                    int32_t x0, x1;                                                              \
                    memcpy(&x0, qrow[r] + c * 8, 4);                                             \
                    memcpy(&x1, qrow[r] + c * 8 + 4, 4);                                         \
                    const __m256i b0 = _mm256_set1_epi32(x0), b1 = _mm256_set1_epi32(x1);        \
                    for (int s = 0; s < 4; ++s)                                                  \
                        a[r][s] = DP256(DP256(a[r][s], lo[s], b0, ones), hi[s], b1, ones);       \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < MRC; ++r)                                                        \
                for (int s = 0; s < 4; ++s)                                                      \
                    _mm256_storeu_si256((__m256i*)(acc[r] + 32 * half + 8 * s), a[r][s]);        \
        }                                                                                        \
    }
#else
#define DOT_KERNEL(MRC)                                                                           \
    static void dot_chunks_##MRC(const uint8_t* wb, const int8_t* const* qrow, int64_t c0,      \
                                 int64_t c1, int32_t acc[MR][64]) {                              \
        for (int r = 0; r < MRC; ++r)                                                            \
            for (int ch = 0; ch < 64; ++ch) acc[r][ch] = 0;                                      \
        for (int64_t c = c0; c < c1; ++c)                                                        \
            for (int r = 0; r < MRC; ++r) {                                                      \
                const int8_t* q = qrow[r] + c * 8;                                               \
                for (int ch = 0; ch < 64; ++ch) {                                                \
                    const uint8_t* v = wb + c * 256 + ch * 4; /* sub-block ch/16, lane ch%16 */  \
                    int32_t s = 0;                                                               \
                    for (int j = 0; j < 4; ++j) s += (v[j] & 15) * q[j] + (v[j] >> 4) * q[4 + j]; \
                    acc[r][ch] += s;                                                             \
                }                                                                                \
            }                                                                                    \
    }
#endif
DOT_KERNEL(1)
DOT_KERNEL(2)
DOT_KERNEL(3)
DOT_KERNEL(4)

static void dot_chunks(const uint8_t* wb, const int8_t* const* qrow, int mr, int64_t c0, int64_t c1,
                       int32_t acc[MR][64]) {
    switch (mr) {
        case 1: dot_chunks_1(wb, qrow, c0, c1, acc); break;
        case 2: dot_chunks_2(wb, qrow, c0, c1, acc); break;
        case 3: dot_chunks_3(wb, qrow, c0, c1, acc); break;
        default: dot_chunks_4(wb, qrow, c0, c1, acc); break;
    }
}

/* q: int8 [M, K] (row stride ldq; columns K .. ceil(K/8)*8 are read and must be 0: the Python
 * wrapper pads), wp: nib64 weights of [N, K], za: int32 [M] or NULL, sw: float32 [N, G] (read
 * for G > 1 only), wsum: int32 [N, G] or NULL (with za) -> out: float32 [M, N] (row stride ldo):
 * per channel the exact integer sums (as float32: exact below 2^24, else rounded once, as the
 * reference rounds them), with groups fl32(sum_g double(acc_g) * double(sw[n, g])). The
 * activation scale (and, per channel, the weight scale) are applied by the caller. */
void rq_gemm(const int8_t* q, int64_t ldq, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
             const int32_t* za, const float* sw, int64_t G, const int32_t* wsum, float* out, int64_t ldo,
             int threads) {
    const int64_t nb = (N + 63) / 64, kc = (K + 7) / 8;
    const int64_t chunks_per_group = kc / G; /* G > 1: the group size is a multiple of 8 */
    const int64_t mb = (M + MR - 1) / MR;
    /* 8 x (sum of each row's activations over each group): the u = w + 8 correction */
    int32_t* rowsum = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * G));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            int32_t s = 0;
            const int64_t k0 = g * chunks_per_group * 8;
            const int64_t k1 = G == 1 ? K : k0 + chunks_per_group * 8;
            for (int64_t k = k0; k < k1; ++k) s += q[m * ldq + k];
            rowsum[m * G + g] = 8 * s;
        }
    const int64_t tasks = nb * mb;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t % nb, rb = t / nb;
        const int64_t m0 = rb * MR;
        const int mr = (int)(M - m0 < MR ? M - m0 : MR);
        const int8_t* qrow[MR];
        for (int r = 0; r < MR; ++r) qrow[r] = q + (m0 + (r < mr ? r : 0)) * ldq;
        const uint8_t* wb = wp + b * kc * 256;
        int32_t acc[MR][64];
        double dsum[MR][64];
        if (G > 1) memset(dsum, 0, sizeof(dsum));
        const int64_t nmax = N - b * 64 < 64 ? N - b * 64 : 64;
        for (int64_t g = 0; g < G; ++g) {
            const int64_t c0 = G == 1 ? 0 : g * chunks_per_group;
            const int64_t c1 = G == 1 ? kc : c0 + chunks_per_group;
            dot_chunks(wb, qrow, mr, c0, c1, acc);
            for (int r = 0; r < mr; ++r) {
                const int32_t rs = rowsum[(m0 + r) * G + g];
                const int32_t z = za ? za[m0 + r] : 0;
                for (int64_t ch = 0; ch < nmax; ++ch) {
                    const int64_t n = b * 64 + ch;
                    int32_t a = acc[r][ch] - rs;
                    if (za) a -= z * wsum[n * G + g];
                    if (G == 1) {
                        out[(m0 + r) * ldo + n] = (float)a;
                    } else {
                        dsum[r][ch] += (double)a * (double)sw[n * G + g];
                    }
                }
            }
        }
        if (G > 1)
            for (int r = 0; r < mr; ++r)
                for (int64_t ch = 0; ch < nmax; ++ch)
                    out[(m0 + r) * ldo + b * 64 + ch] = (float)dsum[r][ch];
    }
    free(rowsum);
}

/* ------------------------------------------------------------------------------ the Hadamard */
/* In-place unnormalized Sylvester transform of r[0..B) (B a power of two): butterflies
 * (a, c) -> (a + c, a - c) at distances h = 1, 2, .., B/2. */
static void sylvester(float* r, int64_t B) {
    int64_t h = 1;
#if defined(__AVX512F__)
    if (B >= 16) {
        /* distances 1..8 inside each 16-float vector: lane i pairs with lane i ^ h */
        const __m512i perm1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
        const __m512i perm2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
        const __m512i perm4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
        const __m512i perm8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
        for (int64_t j = 0; j < B; j += 16) {
            __m512 v = _mm512_loadu_ps(r + j), p;
            /* lanes with bit h clear: v + partner; set: partner - v (= a - c of the scalar form) */
            p = _mm512_permutexvar_ps(perm1, v);
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xAAAA, p, v);
            p = _mm512_permutexvar_ps(perm2, v);
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xCCCC, p, v);
            p = _mm512_permutexvar_ps(perm4, v);
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xF0F0, p, v);
            p = _mm512_permutexvar_ps(perm8, v);
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xFF00, p, v);
            _mm512_storeu_ps(r + j, v);
        }
        h = 16;
    }
#endif
    for (; h < B; h *= 2)
        for (int64_t s0 = 0; s0 < B; s0 += 2 * h)
            for (int64_t j = s0; j < s0 + h; ++j) {
                const float a = r[j], c = r[j + h];
                r[j] = a + c;
                r[j + h] = a - c;
            }
}

/* x: [M, K] (row stride ldx) in x_dtype -> y: float32 [M, K] (contiguous); K a multiple of block;
 * block = A * B, B a power of two (Sylvester, fast index), core: float32 [A, A] of +-1, row-major
 * (C[i', i] multiplies input block row i' into output block row i), norm = fl32(1/sqrt(block)). */
void rq_hadamard(const void* x, int x_dtype, int64_t ldx, float* y, int64_t M, int64_t K, int64_t block,
                 int64_t A, const float* core, float norm, int threads) {
    const int64_t B = block / A, nblk = K / block;
    const int64_t tasks = M * nblk;
    /* sign masks of the core: XOR with -0.0 negates exactly */
    uint32_t* sign = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(A * A));
    for (int64_t i = 0; i < A * A; ++i) sign[i] = core[i] > 0 ? 0u : 0x80000000u;
#pragma omp parallel num_threads(threads) if (threads > 1 && tasks > 1)
    {
        float* z = (float*)malloc(sizeof(float) * (size_t)block);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t m = t / nblk, blk = t % nblk;
            const int64_t off = m * ldx + blk * block;
            float* dst = y + m * K + blk * block;
            if (x_dtype == RQ_BF16) {
                const uint16_t* s = (const uint16_t*)x + off;
                for (int64_t i = 0; i < block; ++i) z[i] = bf16_to_f32(s[i]);
            } else if (x_dtype == RQ_F16) {
                const uint16_t* s = (const uint16_t*)x + off;
                for (int64_t i = 0; i < block; ++i) z[i] = f16_to_f32(s[i]);
            } else {
                memcpy(z, (const float*)x + off, sizeof(float) * (size_t)block);
            }
            for (int64_t i = 0; i < A; ++i) sylvester(z + i * B, B);
            if (A == 1) {
                for (int64_t j = 0; j < B; ++j) dst[j] = z[j] * norm;
                continue;
            }
            int64_t j0 = 0;
#if defined(__AVX512F__)
            /* the dense core on 16 columns at a time, its A inputs in registers */
            const __m512 vnorm = _mm512_set1_ps(norm);
            for (; j0 + 16 <= B; j0 += 16) {
                __m512 in[64];
                const int64_t a_reg = A < 64 ? A : 64;
                if (A <= 64) {
                    for (int64_t ip = 0; ip < a_reg; ++ip) in[ip] = _mm512_loadu_ps(z + ip * B + j0);
                    for (int64_t i = 0; i < A; ++i) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int64_t ip = 0; ip < A; ++ip)
                            acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_xor_si512(
                                _mm512_castps_si512(in[ip]), _mm512_set1_epi32((int)sign[ip * A + i]))));
                        _mm512_storeu_ps(dst + i * B + j0, _mm512_mul_ps(acc, vnorm));
                    }
                } else {
                    break;
                }
            }
#endif
            for (int64_t i = 0; i < A; ++i) {
                float* o = dst + i * B;
                for (int64_t j = j0; j < B; ++j) o[j] = 0.0f;
                for (int64_t ip = 0; ip < A; ++ip) {
                    const float* r = z + ip * B;
                    if (sign[ip * A + i] == 0) for (int64_t j = j0; j < B; ++j) o[j] += r[j];
                    else for (int64_t j = j0; j < B; ++j) o[j] -= r[j];
                }
                for (int64_t j = j0; j < B; ++j) o[j] *= norm;
            }
        }
        free(z);
    }
    free(sign);
}
