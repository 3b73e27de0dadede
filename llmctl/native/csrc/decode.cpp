// The decode step of an llmctl Transformer (llama or gpt2 family) on CPU: FastDecode's, natively. Activations, norms,
// RoPE, attention, the KV cache and logits are fp32; the weight matrices (embedding, q|k|v, o, the MLP's, lm_head)
// are fp32, bf16 or fp16 (`wdtype`), each 16-bit weight widened to fp32 in registers as it is read (exact), so a
// 16-bit model reads half the bytes a token and computes as the fp32 one does.
//
// llmctl/native/ compiles this file on first use (g++ -O3 -march=native -fopenmp); FastDecode (llmctl/engine/step.py)
// calls it through ctypes and owns the weights: the same fused [in, out] matrices its PyTorch step uses, read in
// place. `llmctl_decode` runs one token of one row in one call and one OpenMP parallel region (the process's OpenMP
// runtime, the one PyTorch uses, with its thread count): at batch 1 a small model's PyTorch step is mostly op
// dispatch (~200 ops a token). `llmctl_step` runs M tokens of a batch's rows (decode steps, verify passes), its
// matmuls through PyTorch's own sgemm. Tests hold the logits to PyTorch's (fp32, 1e-4).
//
// The arguments are the structs below, mirrored field by field by ctypes Structures in llmctl/native/abi.py
// (`llmctl_struct_sizes` lets the loader check that both sides agree on their sizes).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

extern "C" {

struct LlmctlLayer {  // one block's weights (a null pointer: an absent bias) and its KV cache
  const float* ln1w;               // norms and biases: fp32; matrices (void): of the model's wdtype
  const float* ln1b;
  const void* wqkv;
  const float* bqkv;
  const void* wo;
  const float *bo, *ln2w, *ln2b;
  const void* w1;
  const float* b1;
  const void* w2;                  // w1: gate|up (llama) or fc (gpt2); w2: down or proj
  const float* b2;
  float *kc, *vc;                  // [B, nkv, max_len, hd] each, contiguous, fp32
};

struct LlmctlModel {
  int64_t gpt2;         // 0: llama, 1: gpt2
  int64_t n_layer, C, nh, nkv, hd, inter;  // inter: the MLP's width
  int64_t V, L, lm_rows;  // vocab; the cache's max_len; lm_head layout (0: [C, V]; 1: rows [V, C], a tied embedding)
  int64_t n_pos, B;       // positions the tables hold; cache rows
  int64_t wdtype;         // the matrices' (emb, lm_head, the layers' w*) element type: 0 fp32, 1 bf16, 2 fp16
  float eps, scale;       // the norms' epsilon, attention's scale
  const void* emb;        // [V, C]
  const float* pe;        // gpt2: wpe [n_pos, C]; llama: cos [n_pos, hd]
  const float* sin;       // llama: signed sin [n_pos, hd] (FastDecode's tables)
  const float *normw, *normb;  // the final norm (bias: gpt2)
  const void* lm_head;
  const LlmctlLayer* layers;             // [n_layer]
};

struct LlmctlTokens {  // llmctl_step's M tokens
  int64_t M;
  const int64_t *tok, *rows, *slots, *limit, *pos;  // [M] each
  const bool* mask;   // key mask, row r at mask + r * mstride (null: all keys)
  int64_t mstride;
  const int64_t* out;  // the tokens whose logits are wanted (null: all M, in order)
  int64_t n_out;
};

}  // extern "C"

namespace {

typedef LlmctlLayer Layer;

inline void span(int64_t n, int64_t align, int64_t* lo, int64_t* hi) {  // this thread's share of [0, n)
  const int nt = omp_get_num_threads(), t = omp_get_thread_num();
  int64_t chunk = ((n + nt - 1) / nt + align - 1) / align * align;
  *lo = t * chunk < n ? t * chunk : n;
  *hi = *lo + chunk < n ? *lo + chunk : n;
}

// The weights' element types: fp32, and two 16-bit ones, widened exactly to fp32 as they are read.
struct bf16 {
  uint16_t v;
};
struct fp16 {
  uint16_t v;
};
inline float wf(float w) { return w; }
inline float wf(bf16 w) { return __builtin_bit_cast(float, (uint32_t)w.v << 16); }
inline float wf(fp16 w) {
#if defined(__F16C__)
  return _cvtsh_ss(w.v);
#else  // exponent and mantissa shifted into place, rescaled by 2^112 (subnormals included); then inf / nan; sign
  const uint32_t em = w.v & 0x7fffu, sign = (uint32_t)(w.v & 0x8000u) << 16;
  float f = __builtin_bit_cast(float, em << 13) * 0x1p112f;
  if (em >= 0x7c00u) f = __builtin_bit_cast(float, (em << 13) | 0x7f800000u);
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, f) | sign);
#endif
}

// y[j] += a0 r0[j] + a1 r1[j] + a2 r2[j] + a3 r3[j] (j < n); s[k] = sum_i rk[i] x[i] (k < 4): the kernels' inner loops.
// The compiler vectorises them for fp32 and bf16, not the fp16 conversion: that one is spelled out (F16C).
template <class W>
inline void axpy4(float* __restrict y, const W* __restrict r0, const W* __restrict r1, const W* __restrict r2,
                  const W* __restrict r3, float a0, float a1, float a2, float a3, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) y[j] += a0 * wf(r0[j]) + a1 * wf(r1[j]) + a2 * wf(r2[j]) + a3 * wf(r3[j]);
}

template <class W>
inline void axpy(float* __restrict y, const W* __restrict r, float a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; j++) y[j] += a * wf(r[j]);
}

template <class W>
inline void dot4(const W* __restrict r0, const W* __restrict r1, const W* __restrict r2, const W* __restrict r3,
                 const float* __restrict x, int64_t n, float* s) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; i++) {
    s0 += wf(r0[i]) * x[i];
    s1 += wf(r1[i]) * x[i];
    s2 += wf(r2[i]) * x[i];
    s3 += wf(r3[i]) * x[i];
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

template <class W>
inline float dot(const W* __restrict r, const float* __restrict x, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += wf(r[i]) * x[i];
  return s;
}

#if defined(__F16C__) && defined(__FMA__)
inline __m256 ld8(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

template <>
inline void axpy4(float* __restrict y, const fp16* __restrict r0, const fp16* __restrict r1,
                  const fp16* __restrict r2, const fp16* __restrict r3, float a0, float a1, float a2, float a3,
                  int64_t n) {
  const __m256 b0 = _mm256_set1_ps(a0), b1 = _mm256_set1_ps(a1), b2 = _mm256_set1_ps(a2), b3 = _mm256_set1_ps(a3);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    acc = _mm256_fmadd_ps(b0, ld8(r0 + j), acc);
    acc = _mm256_fmadd_ps(b1, ld8(r1 + j), acc);
    acc = _mm256_fmadd_ps(b2, ld8(r2 + j), acc);
    acc = _mm256_fmadd_ps(b3, ld8(r3 + j), acc);
    _mm256_storeu_ps(y + j, acc);
  }
  for (; j < n; j++) y[j] += a0 * wf(r0[j]) + a1 * wf(r1[j]) + a2 * wf(r2[j]) + a3 * wf(r3[j]);
}

template <>
inline void axpy(float* __restrict y, const fp16* __restrict r, float a, int64_t n) {
  const __m256 b = _mm256_set1_ps(a);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(b, ld8(r + j), _mm256_loadu_ps(y + j)));
  for (; j < n; j++) y[j] += a * wf(r[j]);
}

template <>
inline void dot4(const fp16* __restrict r0, const fp16* __restrict r1, const fp16* __restrict r2,
                 const fp16* __restrict r3, const float* __restrict x, int64_t n, float* s) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    c0 = _mm256_fmadd_ps(ld8(r0 + i), xv, c0);
    c1 = _mm256_fmadd_ps(ld8(r1 + i), xv, c1);
    c2 = _mm256_fmadd_ps(ld8(r2 + i), xv, c2);
    c3 = _mm256_fmadd_ps(ld8(r3 + i), xv, c3);
  }
  s[0] = hsum(c0), s[1] = hsum(c1), s[2] = hsum(c2), s[3] = hsum(c3);
  for (; i < n; i++) s[0] += wf(r0[i]) * x[i], s[1] += wf(r1[i]) * x[i], s[2] += wf(r2[i]) * x[i], s[3] += wf(r3[i]) * x[i];
}

template <>
inline float dot(const fp16* __restrict r, const float* __restrict x, int64_t n) {
  __m256 c = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) c = _mm256_fmadd_ps(ld8(r + i), _mm256_loadu_ps(x + i), c);
  float s = hsum(c);
  for (; i < n; i++) s += wf(r[i]) * x[i];
  return s;
}
#endif

// y[j] = (acc ? y[j] : 0) + b[j] + sum_i x[i] W[i, j] for this thread's columns (W [in, out] row-major).
template <class W>
void gemv_io(const float* __restrict x, const W* __restrict Wt, const float* __restrict b, float* __restrict y,
             int64_t in, int64_t out, bool acc) {
  int64_t j0, j1;
  span(out, 16, &j0, &j1);
  const int64_t n = j1 - j0;
  if (n <= 0) return;
  float* __restrict yy = y + j0;
  if (!acc) std::memset(yy, 0, n * sizeof(float));
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    const W* r0 = Wt + i * out + j0;
    axpy4(yy, r0, r0 + out, r0 + 2 * out, r0 + 3 * out, x[i], x[i + 1], x[i + 2], x[i + 3], n);
  }
  for (; i < in; i++) axpy(yy, Wt + i * out + j0, x[i], n);
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) yy[j] += b[j0 + j];
  }
}

// y[o] = sum_i W[o, i] x[i] for this thread's rows (W [out, in] row-major: a tied embedding as lm_head).
template <class W>
void gemv_oi(const float* __restrict x, const W* __restrict Wt, float* __restrict y, int64_t in, int64_t out) {
  int64_t o0, o1;
  span(out, 16, &o0, &o1);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const W* r0 = Wt + o * in;
    dot4(r0, r0 + in, r0 + 2 * in, r0 + 3 * in, x, in, y + o);
  }
  for (; o < o1; o++) y[o] = dot(Wt + o * in, x, in);
}

// gemv_io for M rows of x (ldx floats apart) and y (out apart), this thread's columns in tiles that stay in cache
// while every row passes over them: the weights are read from memory once for the M rows.
template <class W>
void gemv_io_rows(int64_t M, const float* x, int64_t ldx, const W* Wt, const float* b, float* y, int64_t in,
                  int64_t out, bool acc) {
  int64_t j0, j1;
  span(out, 16, &j0, &j1);
  for (int64_t t0 = j0; t0 < j1; t0 += 128) {
    const int64_t n = j1 - t0 < 128 ? j1 - t0 : 128;
    for (int64_t m = 0; m < M; m++) {
      const float* xm = x + m * ldx;
      float* yy = y + m * out + t0;
      if (!acc) std::memset(yy, 0, n * sizeof(float));
      int64_t i = 0;
      for (; i + 4 <= in; i += 4) {
        const W* r0 = Wt + i * out + t0;
        axpy4(yy, r0, r0 + out, r0 + 2 * out, r0 + 3 * out, xm[i], xm[i + 1], xm[i + 2], xm[i + 3], n);
      }
      for (; i < in; i++) axpy(yy, Wt + i * out + t0, xm[i], n);
      if (b) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) yy[j] += b[t0 + j];
      }
    }
  }
}

// gemv_oi for M rows of x (in apart) and y (out apart): each 4 rows of W, read once, meet every row of x.
template <class W>
void gemv_oi_rows(int64_t M, const float* x, const W* Wt, float* y, int64_t in, int64_t out) {
  int64_t o0, o1;
  span(out, 16, &o0, &o1);
  for (int64_t o = o0; o < o1; o += 4) {
    const W* r0 = Wt + o * in;
    for (int64_t m = 0; m < M; m++) {
      if (o + 4 <= o1) {
        dot4(r0, r0 + in, r0 + 2 * in, r0 + 3 * in, x + m * in, in, y + m * out + o);
      } else {
        for (int64_t r = o; r < o1; r++) y[m * out + r] = dot(Wt + r * in, x + m * in, in);
      }
    }
  }
}

// out = norm(x) * w (+ b): RMSNorm (llama) or LayerNorm (gpt2), statistics in double.
void norm(const float* __restrict x, const float* w, const float* b, float* __restrict out, int64_t C, bool layer,
          float eps) {
  double mean = 0, sq = 0;
  if (layer) {
    for (int64_t i = 0; i < C; i++) mean += x[i];
    mean /= C;
  }
  for (int64_t i = 0; i < C; i++) {
    const double d = x[i] - mean;
    sq += d * d;
  }
  const float r = (float)(1.0 / std::sqrt(sq / C + eps)), m = (float)mean;
  for (int64_t i = 0; i < C; i++) out[i] = (x[i] - m) * r * w[i] + (b ? b[i] : 0.0f);
}

// e^x, Cephes' single-precision polynomial (~1 ulp), written so that loops over it vectorise; 0 below -87.
inline float vexp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

// RoPE on one head, in place: x * cos + rotate_half(x) * sin, with sin already signed (FastDecode's tables).
inline void rope(float* __restrict x, const float* c, const float* s, int64_t hd) {
  float tmp[512];
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; d++) tmp[d] = x[d] * c[d] + x[(d + half) % hd] * s[d];
  std::memcpy(x, tmp, hd * sizeof(float));
}

// Head j of a token's q | k | v [(nh + 2 nkv) * hd]: RoPE on q and k heads (llama: c, s at its position), and
// k / v head j - nh into the cache row kc / vc [nkv, max_len, hd] at slot.
inline void rope_store(float* __restrict qkv, int64_t j, int64_t nh, int64_t nkv, int64_t hd, const float* c,
                       const float* s, float* kc, float* vc, int64_t L, int64_t slot) {
  float* x = qkv + j * hd;
  if (c) rope(x, c, s, hd);
  if (j >= nh) {
    const int64_t g = j - nh;
    std::memcpy(kc + (g * L + slot) * hd, x, hd * sizeof(float));
    std::memcpy(vc + (g * L + slot) * hd, qkv + (nh + nkv + g) * hd, hd * sizeof(float));
  }
}

// One query head over cache slots 0..S-1 (K, Vc [slots, hd]) where mask (null: all): y [hd]; sc: scratch [S].
inline void attend(const float* __restrict q, const float* __restrict K, const float* __restrict Vc, int64_t S,
                   const bool* mask, float scale, float* __restrict sc, float* __restrict y, int64_t hd) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < S; p++) {
    const float* k = K + p * hd;
    float d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t e = 0; e < hd; e++) d += q[e] * k[e];
    sc[p] = mask && !mask[p] ? -INFINITY : d * scale;
    mx = sc[p] > mx ? sc[p] : mx;
  }
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < S; p++) {
    sc[p] = vexp(sc[p] - mx);
    sum += sc[p];
  }
  const float inv = 1.0f / sum;
  std::memset(y, 0, hd * sizeof(float));
  for (int64_t p = 0; p < S; p++) {
    if (sc[p] == 0.0f) continue;  // masked out
    const float a = sc[p] * inv, *v = Vc + p * hd;
#pragma omp simd
    for (int64_t e = 0; e < hd; e++) y[e] += a * v[e];
  }
}

// The MLP's activation over columns [j0, j1): gelu (tanh) of mlp in place, or silu(gate) * up into mlp[:inter].
inline void activate(float* __restrict mlp, int64_t inter, int64_t j0, int64_t j1, bool gpt2) {
  if (gpt2) {
#pragma omp simd
    for (int64_t j = j0; j < j1; j++) {
      const float x = mlp[j], u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      mlp[j] = x - x / (1.0f + vexp(2.0f * u));  // 0.5 x (1 + tanh u)
    }
  } else {
#pragma omp simd
    for (int64_t j = j0; j < j1; j++) mlp[j] = mlp[j] / (1.0f + vexp(-mlp[j])) * mlp[inter + j];
  }
}

struct Model : LlmctlModel {
  explicit Model(const LlmctlModel* m) : LlmctlModel(*m) {}
  int64_t nq() const { return (nh + 2 * nkv) * hd; }
  int64_t m1() const { return gpt2 ? inter : 2 * inter; }  // width of the first MLP matmul
};

// Fortran BLAS sgemm (column-major), as PyTorch's own BLAS exports it; llmctl/native/ finds it.
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);

// y [M, out] (+)= x [M, in] @ W + b, W [in, out] row-major (rows: W [out, in], y = x @ W^T), through sgemm; x's
// rows ldx floats apart (0: in).
void mm(sgemm_t f, int64_t M, const float* x, const float* W, const float* b, float* y, int64_t in, int64_t out,
        bool acc, bool rows = false, int64_t ldx = 0) {
  if (b && !acc) {
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) std::memcpy(y + m * out, b, out * sizeof(float));
  }
  const int m_ = (int)out, n_ = (int)M, k_ = (int)in, lda = rows ? (int)in : (int)out, ldb = (int)(ldx ? ldx : in);
  const float one = 1.0f, beta = (acc || b) ? 1.0f : 0.0f;
  f(rows ? "T" : "N", "N", &m_, &n_, &k_, &one, W, &lda, x, &ldb, &beta, y, &m_);
  if (b && acc) {
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++)
      for (int64_t j = 0; j < out; j++) y[m * out + j] += b[j];
  }
}

constexpr int64_t kSmallM = 6;          // up to this many rows, 16-bit weights go through the gemv kernels
constexpr int64_t kPanelFloats = 1 << 17;  // else panels of this many weights, widened to fp32, go to sgemm

// mm with 16-bit weights: a few rows read W once through the gemv kernels; more rows take W a panel of columns
// (rows: of W's rows) at a time, widened into an fp32 buffer that stays in cache, through sgemm.
template <class W>
void mm(sgemm_t f, int64_t M, const float* x, const W* Wt, const float* b, float* y, int64_t in, int64_t out,
        bool acc, bool rows = false, int64_t ldx = 0) {
  ldx = ldx ? ldx : in;
  if (M <= kSmallM) {
#pragma omp parallel
    {
      if (rows)
        gemv_oi_rows(M, x, Wt, y, in, out);  // (no bias, no accumulation: lm_head)
      else
        gemv_io_rows(M, x, ldx, Wt, b, y, in, out, acc);
    }
    return;
  }
  if (b && !acc) {
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) std::memcpy(y + m * out, b, out * sizeof(float));
  }
  int64_t nb = kPanelFloats / in / 16 * 16;
  nb = nb < 16 ? 16 : (nb > out ? out : nb);
  std::vector<float> buf(nb * in);
  float* pb = buf.data();
  const int n_ = (int)M, k_ = (int)in, ldb = (int)ldx, ldc = (int)out;
  const float one = 1.0f, beta = (acc || b) ? 1.0f : 0.0f;
  for (int64_t p0 = 0; p0 < out; p0 += nb) {
    const int64_t n = out - p0 < nb ? out - p0 : nb;
    const int m_ = (int)n;
    if (rows) {  // W's rows p0 .. p0 + n: contiguous
      const W* src = Wt + p0 * in;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n * in; i++) pb[i] = wf(src[i]);
      const int lda = (int)in;
      f("T", "N", &m_, &n_, &k_, &one, pb, &lda, x, &ldb, &beta, y + p0, &ldc);
    } else {  // columns p0 .. p0 + n of every row
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < in; i++)
        for (int64_t j = 0; j < n; j++) pb[i * n + j] = wf(Wt[i * out + p0 + j]);
      f("N", "N", &m_, &n_, &k_, &one, pb, &m_, x, &ldb, &beta, y + p0, &ldc);
    }
  }
  if (b && acc) {
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++)
      for (int64_t j = 0; j < out; j++) y[m * out + j] += b[j];
  }
}

}  // namespace

extern "C" {

int64_t llmctl_struct_sizes(int64_t* out) {  // sizeof LlmctlModel, LlmctlLayer, LlmctlTokens: the loader's check
  out[0] = sizeof(LlmctlModel), out[1] = sizeof(LlmctlLayer), out[2] = sizeof(LlmctlTokens);
  return 3;
}

int64_t llmctl_work_floats(const LlmctlModel* m) {  // scratch llmctl_decode needs, in floats
  return 2 * m->C + (m->nh + 2 * m->nkv) * m->hd + m->nh * m->hd + 2 * m->inter + m->nh * m->L + 64;
}

int64_t llmctl_step_floats(const LlmctlModel* m, int64_t M) {  // scratch llmctl_step needs for M tokens, in floats
  return M * (2 * m->C + (m->nh + 2 * m->nkv) * m->hd + m->nh * m->hd + 2 * m->inter) + 64;
}

}  // extern "C"

namespace {

// One token of one cache row: `token` goes to slot `slot` at position `pos` (RoPE / learned position index), in
// one parallel region. logits [V]; work: scratch (llmctl_work_floats). Nothing is written when an index is out of
// range (returns 1).

template <class W>
int decode(const LlmctlModel* model, int64_t token, int64_t slot, int64_t pos, float* logits, float* work) {
  const Model md(model);
  const bool gpt2 = md.gpt2;
  const int64_t C = md.C, nh = md.nh, nkv = md.nkv, hd = md.hd, inter = md.inter, L = md.L, nq = md.nq();
  const int64_t S = slot + 1;
  const float eps = md.eps, scale = md.scale;
  if (token < 0 || token >= md.V || slot < 0 || slot >= L || pos < 0 || pos >= md.n_pos) return 1;
  const W* emb = static_cast<const W*>(md.emb);
  const float *pe = md.pe, *sin = md.sin;
  float *h = work, *xn = h + C, *qkv = xn + C, *att = qkv + nq, *mlp = att + nh * hd, *sc = mlp + 2 * inter;

  for (int64_t i = 0; i < C; i++) h[i] = wf(emb[token * C + i]) + (gpt2 ? pe[pos * C + i] : 0.0f);
#pragma omp parallel
  {
    for (int64_t l = 0; l < md.n_layer; l++) {
      const Layer w = md.layers[l];
#pragma omp single
      norm(h, w.ln1w, w.ln1b, xn, C, gpt2, eps);
      gemv_io(xn, static_cast<const W*>(w.wqkv), w.bqkv, qkv, C, nq, false);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh + nkv; j++)
        rope_store(qkv, j, nh, nkv, hd, gpt2 ? nullptr : pe + pos * hd, gpt2 ? nullptr : sin + pos * hd, w.kc, w.vc, L, slot);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh; j++) {
        const int64_t g = j / (nh / nkv);
        attend(qkv + j * hd, w.kc + g * L * hd, w.vc + g * L * hd, S, nullptr, scale, sc + j * L, att + j * hd, hd);
      }
      gemv_io(att, static_cast<const W*>(w.wo), w.bo, h, nh * hd, C, true);  // residual add fused
#pragma omp barrier
#pragma omp single
      norm(h, w.ln2w, w.ln2b, xn, C, gpt2, eps);
      gemv_io(xn, static_cast<const W*>(w.w1), w.b1, mlp, C, md.m1(), false);
#pragma omp barrier
      {
        int64_t j0, j1;
        span(inter, 16, &j0, &j1);
        activate(mlp, inter, j0, j1, gpt2);
      }
#pragma omp barrier
      gemv_io(mlp, static_cast<const W*>(w.w2), w.b2, h, inter, C, true);
#pragma omp barrier
    }
#pragma omp single
    norm(h, md.normw, md.normb, xn, C, gpt2, eps);
    if (md.lm_rows)
      gemv_oi(xn, static_cast<const W*>(md.lm_head), logits, C, md.V);
    else
      gemv_io(xn, static_cast<const W*>(md.lm_head), nullptr, logits, C, md.V, false);
  }
  return 0;
}

// M tokens at once: token m goes to slot slots[m] of cache row rows[m] at position pos[m] and attends to that
// row's slots s <= limit[m] where mask[rows[m] * mstride + s] (mask null: all). The matmuls go through sgemm, the
// rest through OpenMP loops. logits [n_out, V] of the tokens `out` (null: all M, in order); work: scratch
// (llmctl_step_floats). Nothing is written when an index is out of range (returns 1).
template <class W>
int step(const LlmctlModel* model, const LlmctlTokens* t, float* logits, float* work, void* sgemm) {
  const Model md(model);
  const bool gpt2 = md.gpt2;
  const int64_t M = t->M, B = md.B, C = md.C, nh = md.nh, nkv = md.nkv, hd = md.hd, inter = md.inter, L = md.L,
                nq = md.nq(), m1 = md.m1();
  const float eps = md.eps, scale = md.scale;
  const int64_t *tok = t->tok, *rows = t->rows, *slots = t->slots, *limit = t->limit, *pos = t->pos;
  const int64_t *out_idx = t->out, n_out = t->n_out, mstride = t->mstride;
  const bool* mask = t->mask;
  const sgemm_t f = reinterpret_cast<sgemm_t>(sgemm);
  for (int64_t m = 0; m < M; m++)
    if (tok[m] < 0 || tok[m] >= md.V || rows[m] < 0 || rows[m] >= B || slots[m] < 0 || slots[m] >= L ||
        limit[m] < 0 || limit[m] >= L || pos[m] < 0 || pos[m] >= md.n_pos)
      return 1;
  for (int64_t i = 0; out_idx && i < n_out; i++)
    if (out_idx[i] < 0 || out_idx[i] >= M) return 1;
  float *h = work, *xn = h + M * C, *qkv = xn + M * C, *att = qkv + M * nq, *mlp = att + M * nh * hd;
  std::vector<int64_t> run;  // starts of the runs of consecutive tokens with the same row, and M
  for (int64_t m = 0; m < M; m++)
    if (m == 0 || rows[m] != rows[m - 1]) run.push_back(m);
  const int64_t n_runs = (int64_t)run.size();
  run.push_back(M);
  const W* emb = static_cast<const W*>(md.emb);
  const float *pe = md.pe, *sin = md.sin;

#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < C; i++) h[m * C + i] = wf(emb[tok[m] * C + i]) + (gpt2 ? pe[pos[m] * C + i] : 0.0f);
  for (int64_t l = 0; l < md.n_layer; l++) {
    const Layer w = md.layers[l];
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) norm(h + m * C, w.ln1w, w.ln1b, xn + m * C, C, gpt2, eps);
    mm(f, M, xn, static_cast<const W*>(w.wqkv), w.bqkv, qkv, C, nq, false);
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < M * (nh + nkv); i++) {
        const int64_t m = i / (nh + nkv), r = rows[m] * nkv * L * hd;
        rope_store(qkv + m * nq, i % (nh + nkv), nh, nkv, hd, gpt2 ? nullptr : pe + pos[m] * hd,
                   gpt2 ? nullptr : sin + pos[m] * hd,
                   w.kc + r, w.vc + r, L, slots[m]);
      }
      float* sc = new float[L];
      // by (run of consecutive tokens of one row, head): a verify pass's tokens of a row read its keys / values
      // one after the other, from cache rather than memory
#pragma omp for schedule(dynamic, 4)
      for (int64_t i = 0; i < n_runs * nh; i++) {
        const int64_t j = i % nh, r = rows[run[i / nh]], g = j / (nh / nkv);
        for (int64_t m = run[i / nh]; m < run[i / nh + 1]; m++)
          attend(qkv + m * nq + j * hd, w.kc + (r * nkv + g) * L * hd, w.vc + (r * nkv + g) * L * hd, limit[m] + 1,
                 mask ? mask + r * mstride : nullptr, scale, sc, att + (m * nh + j) * hd, hd);
      }
      delete[] sc;
    }
    mm(f, M, att, static_cast<const W*>(w.wo), w.bo, h, nh * hd, C, true);  // residual add fused
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) norm(h + m * C, w.ln2w, w.ln2b, xn + m * C, C, gpt2, eps);
    mm(f, M, xn, static_cast<const W*>(w.w1), w.b1, mlp, C, m1, false);
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) activate(mlp + m * m1, inter, 0, inter, gpt2);
    mm(f, M, mlp, static_cast<const W*>(w.w2), w.b2, h, inter, C, true, false, m1);  // (llama: silu(gate) * up, each row's first half)
  }
  const int64_t n = out_idx ? n_out : M;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    norm(h + (out_idx ? out_idx[i] : i) * C, md.normw, md.normb, xn + i * C, C, gpt2, eps);
  mm(f, n, xn, static_cast<const W*>(md.lm_head), nullptr, logits, C, md.V, false, md.lm_rows != 0);
  return 0;
}

}  // namespace

extern "C" {

int llmctl_decode(const LlmctlModel* m, int64_t token, int64_t slot, int64_t pos, float* logits, float* work) {
  switch (m->wdtype) {
    case 0: return decode<float>(m, token, slot, pos, logits, work);
    case 1: return decode<bf16>(m, token, slot, pos, logits, work);
    case 2: return decode<fp16>(m, token, slot, pos, logits, work);
  }
  return 1;
}

int llmctl_step(const LlmctlModel* m, const LlmctlTokens* t, float* logits, float* work, void* sgemm) {
  switch (m->wdtype) {
    case 0: return step<float>(m, t, logits, work, sgemm);
    case 1: return step<bf16>(m, t, logits, work, sgemm);
    case 2: return step<fp16>(m, t, logits, work, sgemm);
  }
  return 1;
}

}  // extern "C"
