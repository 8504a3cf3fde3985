/* Native pieces of rotquant's CPU kernel (kernels/cpu_kernel.py), compiled once per machine by
 * kernels/cpu_native.py with the system C compiler (the one Inductor uses) and loaded with ctypes.
 *
 * All GEMMs: int8 activations q (INT4 or INT8 values) x INT4 weights, exact int32 accumulation,
 * then the epilogue of kernels/reference.py written into the output dtype:
 *     per channel: out = rnd(fl(fl(float(acc) * sa[m]) * sw[n]))
 *     with G groups: out = rnd(fl(fl32(sum_g double(acc_g) * double(sw[n, g])) * sa[m]))
 * (acc already less za[m] * sum_k w[n, k] for asymmetric activations: an exact int32 correction).
 * The grouped sum is the reference's "exact value rounded once to float32"; the reference sums
 * the same exact products in float64 in another order (see kernels/cpu_kernel.py for the bound).
 * rnd: round to nearest even into bfloat16 / float16 (torch's conversions), or float32 as is.
 *
 * 1. rq_gemm (any M, per channel or groups): AVX512-VNNI / AVX-VNNI / AVX2 / portable C, reading the
 *    INT4 weights in the "nib64" layout (rq_pack_weights): per block of 64 output channels and
 *    chunk of 8 input columns k0..k0+7, 4 x 64 bytes, one per 16 channels; byte 4*c + j of those
 *    (channel c, j = 0..3) = u[k0 + j] | u[k0 + 4 + j] << 4, u = w + 8 in [0, 15] (padding holds
 *    u = 8, w = 0). One 64-byte load gives two u8 tiles [16 channels x 4 columns] for `vpdpbusd`
 *    (u8 x s8 -> s32) against four activations broadcast to every lane; since sum u*q =
 *    sum w*q + 8 sum q, the accumulator loses 8 x (the row's activation sum), exactly.
 * 2. rq_gemm_amx (per channel, many tokens): Intel AMX `tdpbsud` (s8 activations x u8 weights)
 *    on the same nib64 weights: the low and high nibbles of one 64-byte vector are rows 2c and
 *    2c + 1 of an AMX B tile [16 rows = k/4] x [16 channels x 4 columns], so each thread unpacks a
 *    32-channel block's tiles once (into L1/L2) and reuses them for every 32 rows of activations;
 *    the u = w + 8 correction is the VNNI kernel's.
 * 3. rq_hadamard: block-diagonal normalized Hadamard H = kron(C, S) / sqrt(block) along rows
 *    (S Sylvester of order B: fast Walsh-Hadamard butterflies; C a +-1 core of order A, dense),
 *    float32 out. It differs from the reference's dense float32 matmul in summation order only
 *    (as the CUDA kernel does). rq_hadamard_quant adds the per-token quantization of each row, in
 *    exactly the reference's arithmetic (correctly rounded float32 divisions, round half to even).
 *
 * Compile without -ffast-math and with -ffp-contract=off (no contracted products anywhere).
 * Threads: OpenMP, i.e. torch's own pool (libgomp is shared); small work runs on one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && defined(__linux__)
#define RQ_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { RQ_F32 = 0, RQ_BF16 = 1, RQ_F16 = 2 };
/* A parallel region costs microseconds, and on a machine shared with other work far more (the
 * region waits for its slowest thread): small work runs on one thread, and the threads of a
 * region take tasks dynamically, so that one descheduled thread delays it by one task only. */
#define RQ_PAR_MIN_MACS (1 << 20)  /* GEMMs below ~10 us on one core */
#define RQ_PAR_MIN_ELEMS (1 << 16) /* Hadamards below ~30 us on one core */

int rq_abi_version(void) { return 5; }

int rq_isa(void) {
    /* the GEMM this build was compiled for: 3 AVX512-VNNI, 2 AVX-VNNI, 1 AVX2, 0 portable C */
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

/* ------------------------------------------------------------------------ dtype conversions */
static inline uint16_t f32_to_bf16(float f) {
    /* torch's c10::BFloat16: round to nearest even, NaN -> 0x7fc0 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7fc0;
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__F16C__)
static inline uint16_t f32_to_f16(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline uint16_t f32_to_f16(float f) { _Float16 h = (_Float16)f; uint16_t u; memcpy(&u, &h, 2); return u; }
static inline float f16_to_f32(uint16_t u) { _Float16 h; memcpy(&h, &u, 2); return (float)h; }
#endif

/* out[0..n) (n <= 16) = v in the output dtype */
static inline void store_f32s(void* out, int dtype, int64_t idx, const float* v, int n) {
    if (dtype == RQ_BF16) {
        uint16_t* o = (uint16_t*)out + idx;
        for (int i = 0; i < n; ++i) o[i] = f32_to_bf16(v[i]);
    } else if (dtype == RQ_F16) {
        uint16_t* o = (uint16_t*)out + idx;
        for (int i = 0; i < n; ++i) o[i] = f32_to_f16(v[i]);
    } else {
        memcpy((float*)out + idx, v, sizeof(float) * (size_t)n);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 16 floats -> the output dtype at out + idx, lanes in `mask` */
static inline void store_vec(void* out, int dtype, int64_t idx, __m512 v, __mmask16 mask) {
    if (dtype == RQ_BF16) {
        const __m512i u = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                                         _mm512_set1_epi32(0x7fff)));
        r = _mm512_srli_epi32(r, 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
        _mm256_mask_storeu_epi16((uint16_t*)out + idx, mask, _mm512_cvtepi32_epi16(r));
    } else if (dtype == RQ_F16) {
        _mm256_mask_storeu_epi16((uint16_t*)out + idx, mask,
                                 _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm512_mask_storeu_ps((float*)out + idx, mask, v);
    }
}

/* per-channel epilogue of 16 channels n0.. of row m: acc (int32, correction applied) -> out */
static inline void epilogue16(__m512i acc, float sa, const float* sw, void* out, int dtype, int64_t idx, int n) {
    const __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sa)); /* rounded on its own */
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, sw));
    store_vec(out, dtype, idx, v, mask);
}
#endif

/* ------------------------------------------------------------------------------------ packing */
/* chunks of 8 columns per 64-channel block: K padded to a multiple of 64 (whole AMX tiles) */
static inline int64_t nib_chunks(int64_t K) { return (K + 63) / 64 * 8; }

/* w: int8 [N, K] in [-8, 7] (row-major) -> nib64 layout: bytes [ceil(N/64)][nib_chunks(K)][4][64]. */
void rq_pack_weights(const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const int64_t nb = (N + 63) / 64, kc = nib_chunks(K);
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

/* -------------------------------------------------------------------------- the VNNI GEMM */
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
 * wrapper pads), wp: nib64 weights of [N, K], sa: float32 [M], za: int32 [M] or NULL,
 * sw: float32 [N, G], wsum: int32 [N, G] or NULL (with za) -> out [M, N] (row stride ldo). */
void rq_gemm(const int8_t* q, int64_t ldq, int64_t M, int64_t K, const uint8_t* wp, int64_t N, const float* sa,
             const int32_t* za, const float* sw, int64_t G, const int32_t* wsum, void* out, int64_t ldo,
             int out_dtype, int threads) {
    const int64_t nb = (N + 63) / 64, kc = (K + 7) / 8, kcp = nib_chunks(K);
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
    /* a parallel region costs microseconds (and far more on a busy machine): only for real work */
    const int par = threads > 1 && tasks > 1 && M * N * K >= RQ_PAR_MIN_MACS;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (par)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t % nb, rb = t / nb;
        const int64_t m0 = rb * MR;
        const int mr = (int)(M - m0 < MR ? M - m0 : MR);
        const int8_t* qrow[MR];
        for (int r = 0; r < MR; ++r) qrow[r] = q + (m0 + (r < mr ? r : 0)) * ldq;
        const uint8_t* wb = wp + b * kcp * 256;
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
                    int32_t a = acc[r][ch] - rs;
                    if (za) a -= z * wsum[(b * 64 + ch) * G + g];
                    acc[r][ch] = a;
                    if (G > 1) dsum[r][ch] += (double)a * (double)sw[(b * 64 + ch) * G + g];
                }
            }
        }
        for (int r = 0; r < mr; ++r) {
            const int64_t row = (m0 + r) * ldo + b * 64;
            const float s = sa[m0 + r];
            for (int64_t c = 0; c < nmax; c += 16) {
                const int n = (int)(nmax - c < 16 ? nmax - c : 16);
                if (G == 1) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
                    epilogue16(_mm512_loadu_si512(acc[r] + c), s, sw + b * 64 + c, out, out_dtype, row + c, n);
#else
                    float v[16];
                    for (int i = 0; i < n; ++i) {
                        const float p = (float)acc[r][c + i] * s; /* rounded on its own (no FMA) */
                        v[i] = p * sw[b * 64 + c + i];
                    }
                    store_f32s(out, out_dtype, row + c, v, n);
#endif
                } else {
                    float v[16];
                    for (int i = 0; i < n; ++i) v[i] = (float)dsum[r][c + i] * s;
                    store_f32s(out, out_dtype, row + c, v, n);
                }
            }
        }
    }
    free(rowsum);
}

/* --------------------------------------------------------------------------- the AMX GEMM */
int rq_has_amx(void) {
#if defined(RQ_AMX)
    /* the kernel must grant this process the AMX tile state once (Linux 5.16+) */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

#if defined(RQ_AMX)
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} rq_tilecfg;

static void amx_configure(void) {
    rq_tilecfg cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; } /* 0-3 C, 4-5 A, 6-7 B */
    _tile_loadconfig(&cfg);
}
#endif

/* q: int8 [M, K] (row stride ldq; K a multiple of 64 and M a multiple of 32 in the rows read:
 * the Python wrapper pads), wp: nib64 weights of [N, K], per-channel sw: float32 [N]; else as
 * rq_gemm. */
void rq_gemm_amx(const int8_t* q, int64_t ldq, int64_t M, int64_t K, const uint8_t* wp, int64_t N, const float* sa,
                 const int32_t* za, const float* sw, const int32_t* wsum, void* out, int64_t ldo, int out_dtype,
                 int threads) {
#if defined(RQ_AMX)
    const int64_t nb = (N + 31) / 32, kc = K / 64, kcp = nib_chunks(K), mb = (M + 31) / 32;
    const int64_t tasks = nb * mb;
    const int par = threads > 1 && tasks > 1 && M * N * K >= RQ_PAR_MIN_MACS;
    int32_t* rowsum = (int32_t*)malloc(sizeof(int32_t) * (size_t)M); /* 8 x sum_k q: u = w + 8 */
    for (int64_t m = 0; m < M; ++m) {
        int32_t t = 0;
        for (int64_t k = 0; k < K; ++k) t += q[m * ldq + k];
        rowsum[m] = 8 * t;
    }
#pragma omp parallel num_threads(threads) if (par)
    {
        amx_configure();
        int32_t c[4][16][16] __attribute__((aligned(64)));
        uint8_t* tiles = (uint8_t*)aligned_alloc(64, (size_t)kc * 2048); /* this block's B tiles */
        int64_t have = -1;
        const __m512i low = _mm512_set1_epi8(0x0f);
#pragma omp for schedule(dynamic, mb) /* a whole 32-channel block at a time: its tiles are unpacked once */
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t b = t / mb, rb = t % mb; /* consecutive tasks share the weight block */
            if (b != have) { /* unpack channels 32b .. 32b+31: nib64 block b/2, sub-blocks 2(b%2), +1 */
                for (int64_t k = 0; k < kc; ++k)
                    for (int s = 0; s < 2; ++s) {
                        uint8_t* dst = tiles + k * 2048 + s * 1024;
                        const uint8_t* src = wp + (((b / 2) * kcp + k * 8) * 4 + (b % 2) * 2 + s) * 64;
                        for (int cc = 0; cc < 8; ++cc) {
                            const __m512i v = _mm512_loadu_si512(src + cc * 256);
                            _mm512_store_si512(dst + (2 * cc) * 64, _mm512_and_si512(v, low));
                            _mm512_store_si512(dst + (2 * cc + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
                        }
                    }
                have = b;
            }
            const int64_t m0 = rb * 32;
            const int8_t* a0 = q + m0 * ldq;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t k = 0; k < kc; ++k) {
                _tile_loadd(4, a0 + k * 64, ldq);
                _tile_loadd(5, a0 + 16 * ldq + k * 64, ldq);
                _tile_loadd(6, tiles + k * 2048, 64);
                _tile_loadd(7, tiles + k * 2048 + 1024, 64);
                _tile_dpbsud(0, 4, 6);
                _tile_dpbsud(1, 4, 7);
                _tile_dpbsud(2, 5, 6);
                _tile_dpbsud(3, 5, 7);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            for (int i = 0; i < 4; ++i) {
                const int64_t n0 = b * 32 + (i & 1) * 16;
                if (n0 >= N) continue;
                const int n = (int)(N - n0 < 16 ? N - n0 : 16);
                const __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
                const __m512i ws = za ? _mm512_maskz_loadu_epi32(mask, wsum + n0) : _mm512_setzero_si512();
                for (int r = 0; r < 16; ++r) {
                    const int64_t m = m0 + (i >> 1) * 16 + r;
                    if (m >= M) break;
                    __m512i acc = _mm512_sub_epi32(_mm512_load_si512(c[i][r]), _mm512_set1_epi32(rowsum[m]));
                    if (za) acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(za[m]), ws));
                    epilogue16(acc, sa[m], sw + n0, out, out_dtype, m * ldo + n0, n);
                }
            }
        }
        free(tiles);
        _tile_release();
    }
    free(rowsum);
#else
    (void)q; (void)ldq; (void)M; (void)K; (void)wp; (void)N; (void)sa; (void)za; (void)sw; (void)wsum;
    (void)out; (void)ldo; (void)out_dtype; (void)threads;
    abort(); /* the Python side calls this only where rq_has_amx() said yes */
#endif
}

/* ------------------------------------------------------------------------------ the Hadamard */
/* In-place unnormalized Sylvester transform of r[0..B) (B a power of two): butterflies
 * (a, c) -> (a + c, a - c) at distances h = 1, 2, .., B/2. */
#if defined(__AVX512F__)
/* distances 1..8 inside a 16-float vector: lane i pairs with lane i ^ h; lanes with bit h clear
 * get v + partner, the others partner - v (= a - c of the scalar form) */
static inline __m512 sylvester16(__m512 v) {
    const __m512i perm1 = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
    const __m512i perm2 = _mm512_set_epi32(13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2);
    const __m512i perm4 = _mm512_set_epi32(11, 10, 9, 8, 15, 14, 13, 12, 3, 2, 1, 0, 7, 6, 5, 4);
    const __m512i perm8 = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
    __m512 p = _mm512_permutexvar_ps(perm1, v);
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xAAAA, p, v);
    p = _mm512_permutexvar_ps(perm2, v);
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xCCCC, p, v);
    p = _mm512_permutexvar_ps(perm4, v);
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xF0F0, p, v);
    p = _mm512_permutexvar_ps(perm8, v);
    return _mm512_mask_sub_ps(_mm512_add_ps(v, p), (__mmask16)0xFF00, p, v);
}

/* B = 16 * V, all of it in registers through every stage */
#define SYLVESTER_REG(V)                                                                          \
    static void sylvester_##V(float* r) {                                                        \
        __m512 v[V];                                                                             \
        for (int i = 0; i < V; ++i) v[i] = sylvester16(_mm512_loadu_ps(r + 16 * i));             \
        for (int h = 1; h < V; h *= 2)                                                           \
            for (int s0 = 0; s0 < V; s0 += 2 * h)                                                \
                for (int i = s0; i < s0 + h; ++i) {                                              \
                    const __m512 a = v[i], c = v[i + h];                                         \
                    v[i] = _mm512_add_ps(a, c);                                                  \
                    v[i + h] = _mm512_sub_ps(a, c);                                              \
                }                                                                                \
        for (int i = 0; i < V; ++i) _mm512_storeu_ps(r + 16 * i, v[i]);                          \
    }
SYLVESTER_REG(1)
SYLVESTER_REG(2)
SYLVESTER_REG(4)
SYLVESTER_REG(8)
SYLVESTER_REG(16)
#endif

static void sylvester(float* r, int64_t B) {
    int64_t h = 1;
#if defined(__AVX512F__)
    switch (B) {
        case 16: sylvester_1(r); return;
        case 32: sylvester_2(r); return;
        case 64: sylvester_4(r); return;
        case 128: sylvester_8(r); return;
        case 256: sylvester_16(r); return;
        default: break;
    }
    if (B >= 16) {
        for (int64_t j = 0; j < B; j += 16) _mm512_storeu_ps(r + j, sylvester16(_mm512_loadu_ps(r + j)));
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

#if defined(__AVX512F__)
/* dst[i, :] = norm * sum_ip coef[ip, i] * z[ip, :] for a core of order A (a constant here, so that
 * the A sums stay in registers): one FMA by +-1 per term (the product is exact, so it rounds as a
 * plain add would) */
#define CORE_KERNEL(A)                                                                            \
    static void core_##A(const float* z, float* dst, int64_t B, const float* coef, float norm) { \
        const __m512 vnorm = _mm512_set1_ps(norm);                                               \
        for (int64_t j = 0; j < B; j += 16) {                                                    \
            __m512 acc[A];                                                                       \
            const __m512 x0 = _mm512_loadu_ps(z + j);                                            \
            for (int i = 0; i < A; ++i) acc[i] = _mm512_mul_ps(x0, _mm512_set1_ps(coef[i]));     \
            for (int ip = 1; ip < A; ++ip) {                                                     \
                const __m512 x = _mm512_loadu_ps(z + ip * B + j);                                \
                for (int i = 0; i < A; ++i) acc[i] = _mm512_fmadd_ps(x, _mm512_set1_ps(coef[ip * A + i]), acc[i]); \
            }                                                                                    \
            for (int i = 0; i < A; ++i) _mm512_storeu_ps(dst + i * B + j, _mm512_mul_ps(acc[i], vnorm)); \
        }                                                                                        \
    }
CORE_KERNEL(12)
CORE_KERNEL(20)
CORE_KERNEL(28)
#endif

/* x (n elements of x_dtype at offset off) -> z float32 */
static inline void load_f32(const void* x, int x_dtype, int64_t off, float* z, int64_t n) {
    int64_t i = 0;
    if (x_dtype == RQ_BF16) {
        const uint16_t* s = (const uint16_t*)x + off;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(z + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + i))), 16)));
#endif
        for (; i < n; ++i) z[i] = bf16_to_f32(s[i]);
    } else if (x_dtype == RQ_F16) {
        const uint16_t* s = (const uint16_t*)x + off;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(z + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
#endif
        for (; i < n; ++i) z[i] = f16_to_f32(s[i]);
    } else {
        memcpy(z, (const float*)x + off, sizeof(float) * (size_t)n);
    }
}

/* one block: x (block elements of x_dtype) -> dst float32, using z (block floats) as scratch;
 * coef: the core as float32 +-1, coef[ip * A + i] */
static void hadamard_block(const void* x, int x_dtype, int64_t off, float* dst, float* z, int64_t block, int64_t A,
                           const float* coef, float norm) {
    const int64_t B = block / A;
    load_f32(x, x_dtype, off, z, block);
    for (int64_t i = 0; i < A; ++i) sylvester(z + i * B, B);
    if (A == 1) {
        for (int64_t j = 0; j < B; ++j) dst[j] = z[j] * norm;
        return;
    }
    int64_t j0 = 0;
#if defined(__AVX512F__)
    if (B % 16 == 0) {
        switch (A) { /* the dense core, 16 columns at a time, the A sums in registers */
            case 12: core_12(z, dst, B, coef, norm); return;
            case 20: core_20(z, dst, B, coef, norm); return;
            case 28: core_28(z, dst, B, coef, norm); return;
            default: break;
        }
        if (A <= 64) {
            const __m512 vnorm = _mm512_set1_ps(norm);
            for (; j0 + 16 <= B; j0 += 16) {
                __m512 in[64];
                for (int64_t ip = 0; ip < A; ++ip) in[ip] = _mm512_loadu_ps(z + ip * B + j0);
                for (int64_t i = 0; i < A; ++i) {
                    __m512 acc = _mm512_mul_ps(in[0], _mm512_set1_ps(coef[i]));
                    for (int64_t ip = 1; ip < A; ++ip) acc = _mm512_fmadd_ps(in[ip], _mm512_set1_ps(coef[ip * A + i]), acc);
                    _mm512_storeu_ps(dst + i * B + j0, _mm512_mul_ps(acc, vnorm));
                }
            }
        }
    }
#endif
    for (int64_t i = 0; i < A; ++i) {
        float* o = dst + i * B;
        for (int64_t j = j0; j < B; ++j) o[j] = 0.0f;
        for (int64_t ip = 0; ip < A; ++ip) {
            const float* r = z + ip * B;
            if (coef[ip * A + i] > 0) for (int64_t j = j0; j < B; ++j) o[j] += r[j];
            else for (int64_t j = j0; j < B; ++j) o[j] -= r[j];
        }
        for (int64_t j = j0; j < B; ++j) o[j] *= norm;
    }
}

/* x: [M, K] (row stride ldx) in x_dtype -> y: [M, K] (contiguous) in out_dtype; K a multiple of
 * block; block = A * B, B a power of two (Sylvester, fast index), core: float32 [A, A] of +-1,
 * row-major (C[i', i] multiplies input block row i' into output block row i), norm = fl32(1/sqrt(block)).
 * A 16-bit out_dtype gets the float32 result rounded once (R3 on query and key). */
void rq_hadamard(const void* x, int x_dtype, int64_t ldx, void* y, int out_dtype, int64_t M, int64_t K, int64_t block,
                 int64_t A, const float* core, float norm, int threads) {
    const int64_t nblk = K / block, tasks = M * nblk;
    const int par = threads > 1 && tasks > 1 && M * K >= RQ_PAR_MIN_ELEMS;
#pragma omp parallel num_threads(threads) if (par)
    {
        float* z = (float*)malloc(sizeof(float) * (size_t)block * 2);
        float* f = z + block;
#pragma omp for schedule(dynamic, 16)
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t m = t / nblk, blk = t % nblk, off = m * K + blk * block;
            if (out_dtype == RQ_F32) {
                hadamard_block(x, x_dtype, m * ldx + blk * block, (float*)y + off, z, block, A, core, norm);
                continue;
            }
            hadamard_block(x, x_dtype, m * ldx + blk * block, f, z, block, A, core, norm);
            for (int64_t j = 0; j < block; j += 16) {
                const int n = (int)(block - j < 16 ? block - j : 16);
#if defined(__AVX512F__) && defined(__AVX512BW__)
                const __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
                store_vec(y, out_dtype, off + j, _mm512_maskz_loadu_ps(mask, f + j), mask);
#else
                store_f32s(y, out_dtype, off + j, f + j, n);
#endif
            }
        }
        free(z);
    }
}

/* rq_hadamard + per-token quantization of every row in the reference's arithmetic:
 * symmetric: scale = fl(fl(amax * clip) / qmax) (1 if not > 0), q = clamp(rne(y / scale), -qmax-1, qmax);
 * asymmetric (zero != NULL): hi = fl(max(max y, 0) * clip), lo = fl(min(min y, 0) * clip),
 * scale = fl(fl(hi - lo) / L) (1 if not > 0), u = clamp(rne(-lo / scale), 0, L),
 * q = clamp(rne(y / scale) + u, 0, L) - 2^(bits-1), zero = u - 2^(bits-1).
 * q: int8 [M, K], scale: float32 [M], zero: int32 [M] or NULL. */
void rq_hadamard_quant(const void* x, int x_dtype, int64_t ldx, int8_t* q, float* scale, int32_t* zero, int64_t M,
                       int64_t K, int64_t block, int64_t A, const float* core, float norm, float clip, int bits,
                       int threads) {
    const int64_t nblk = K / block;
    const int par = threads > 1 && M > 1 && M * K >= RQ_PAR_MIN_ELEMS;
    const float qmax = (float)((1 << (bits - 1)) - 1), levels = (float)((1 << bits) - 1), half = (float)(1 << (bits - 1));
#pragma omp parallel num_threads(threads) if (par)
    {
        float* z = (float*)malloc(sizeof(float) * (size_t)block);
        float* y = (float*)malloc(sizeof(float) * (size_t)K);
#pragma omp for schedule(dynamic, 4)
        for (int64_t m = 0; m < M; ++m) {
            for (int64_t blk = 0; blk < nblk; ++blk)
                hadamard_block(x, x_dtype, m * ldx + blk * block, y + blk * block, z, block, A, core, norm);
            float vmax = -INFINITY, vmin = INFINITY;
            int nan = 0;
            int64_t k0 = 0;
#if defined(__AVX512F__)
            __m512 vmx = _mm512_set1_ps(-INFINITY), vmn = _mm512_set1_ps(INFINITY);
            __mmask16 vnan = 0;
            for (; k0 + 16 <= K; k0 += 16) {
                const __m512 v = _mm512_loadu_ps(y + k0);
                vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                vmx = _mm512_max_ps(vmx, v);
                vmn = _mm512_min_ps(vmn, v);
            }
            vmax = _mm512_reduce_max_ps(vmx);
            vmin = _mm512_reduce_min_ps(vmn);
            nan = vnan != 0;
#endif
            for (int64_t k = k0; k < K; ++k) {
                const float v = y[k];
                if (v != v) nan = 1;
                vmax = v > vmax ? v : vmax;
                vmin = v < vmin ? v : vmin;
            }
            const float amax = fabsf(vmax) > fabsf(vmin) ? fabsf(vmax) : fabsf(vmin);
            float s, u = 0.0f, lo_q, hi_q;
            if (zero == NULL) {
                s = (amax * clip) / qmax;
                lo_q = -qmax - 1.0f;
                hi_q = qmax;
            } else {
                const float hi = (vmax > 0.0f ? vmax : 0.0f) * clip, lo = (vmin < 0.0f ? vmin : 0.0f) * clip;
                s = (hi - lo) / levels;
                lo_q = 0.0f;
                hi_q = levels;
            }
            if (nan || !(s > 0.0f)) s = 1.0f; /* the reference's where(scale > 0, scale, 1); NaN rows: 1 too */
            if (zero != NULL) {
                const float lo = (vmin < 0.0f ? vmin : 0.0f) * clip;
                u = nearbyintf(-lo / s);
                u = u < 0.0f ? 0.0f : (u > levels ? levels : u);
            }
            int8_t* qr = q + m * K;
            int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            const __m512 vs = _mm512_set1_ps(s), vu = _mm512_set1_ps(u), vlo = _mm512_set1_ps(lo_q),
                         vhi = _mm512_set1_ps(hi_q), vhalf = _mm512_set1_ps(zero ? half : 0.0f);
            /* y / s correctly rounded without a division per element (Markstein, as the CUDA
             * kernel's _div_rn_by): r = RN(1/s), q = RN(y r), then twice q <- RN(q + RN(y - s q) r);
             * valid while 1/s is a normal float, else the true division runs */
            const float rs = 1.0f / s;
            const int fast = isnormal(rs) && isnormal(s);
            const __m512 vr = _mm512_set1_ps(rs);
            for (; k + 16 <= K; k += 16) {
                const __m512 yv = _mm512_loadu_ps(y + k);
                __m512 d;
                if (fast) {
                    d = _mm512_mul_ps(yv, vr);
                    d = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, vs, yv), vr, d);
                    d = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, vs, yv), vr, d);
                } else {
                    d = _mm512_div_ps(yv, vs);
                }
                __m512 v = _mm512_roundscale_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm512_add_ps(v, vu);
                v = _mm512_min_ps(_mm512_max_ps(v, vlo), vhi);
                v = _mm512_sub_ps(v, vhalf);
                _mm_storeu_si128((__m128i*)(qr + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
            }
#endif
            for (; k < K; ++k) {
                float v = nearbyintf(y[k] / s) + u;
                v = v < lo_q ? lo_q : (v > hi_q ? hi_q : v);
                qr[k] = (int8_t)(zero ? v - half : v);
            }
            scale[m] = s;
            if (zero) zero[m] = (int32_t)(u - half);
        }
        free(y);
        free(z);
    }
}
