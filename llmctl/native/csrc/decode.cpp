// The decode step of an llmctl Transformer (llama or gpt2 family), fp32 on CPU: FastDecode's, natively.
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

extern "C" {

struct LlmctlLayer {  // one block's weights (a null pointer: an absent bias) and its KV cache
  const float *ln1w, *ln1b, *wqkv, *bqkv, *wo, *bo, *ln2w, *ln2b;
  const float *w1, *b1, *w2, *b2;  // w1: gate|up (llama) or fc (gpt2); w2: down or proj
  float *kc, *vc;                  // [B, nkv, max_len, hd] each, contiguous
};

struct LlmctlModel {
  int64_t gpt2;         // 0: llama, 1: gpt2
  int64_t n_layer, C, nh, nkv, hd, inter;  // inter: the MLP's width
  int64_t V, L, lm_rows;  // vocab; the cache's max_len; lm_head layout (0: [C, V]; 1: rows [V, C], a tied embedding)
  int64_t n_pos, B;       // positions the tables hold; cache rows
  float eps, scale;       // the norms' epsilon, attention's scale
  const float* emb;       // [V, C]
  const float* pe;        // gpt2: wpe [n_pos, C]; llama: cos [n_pos, hd]
  const float* sin;       // llama: signed sin [n_pos, hd] (FastDecode's tables)
  const float *normw, *normb, *lm_head;  // the final norm (bias: gpt2), lm_head
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

// y[j] = (acc ? y[j] : 0) + b[j] + sum_i x[i] W[i, j] for this thread's columns (W [in, out] row-major).
void gemv_io(const float* __restrict x, const float* __restrict W, const float* __restrict b, float* __restrict y,
             int64_t in, int64_t out, bool acc) {
  int64_t j0, j1;
  span(out, 16, &j0, &j1);
  const int64_t n = j1 - j0;
  if (n <= 0) return;
  float* __restrict yy = y + j0;
  if (!acc) std::memset(yy, 0, n * sizeof(float));
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    const float a0 = x[i], a1 = x[i + 1], a2 = x[i + 2], a3 = x[i + 3];
    const float* __restrict r0 = W + i * out + j0;
    const float* __restrict r1 = r0 + out;
    const float* __restrict r2 = r1 + out;
    const float* __restrict r3 = r2 + out;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) yy[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
  }
  for (; i < in; i++) {
    const float a = x[i];
    const float* __restrict r = W + i * out + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) yy[j] += a * r[j];
  }
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) yy[j] += b[j0 + j];
  }
}

// y[o] = sum_i W[o, i] x[i] for this thread's rows (W [out, in] row-major: a tied embedding as lm_head).
void gemv_oi(const float* __restrict x, const float* __restrict W, float* __restrict y, int64_t in, int64_t out) {
  int64_t o0, o1;
  span(out, 16, &o0, &o1);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const float* __restrict r0 = W + o * in;
    const float* __restrict r1 = r0 + in;
    const float* __restrict r2 = r1 + in;
    const float* __restrict r3 = r2 + in;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < in; i++) {
      s0 += r0[i] * x[i];
      s1 += r1[i] * x[i];
      s2 += r2[i] * x[i];
      s3 += r3[i] * x[i];
    }
    y[o] = s0, y[o + 1] = s1, y[o + 2] = s2, y[o + 3] = s3;
  }
  for (; o < o1; o++) {
    const float* __restrict r = W + o * in;
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; i++) s += r[i] * x[i];
    y[o] = s;
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

// One token of one cache row: `token` goes to slot `slot` at position `pos` (RoPE / learned position index), in
// one parallel region. logits [V]; work: scratch (llmctl_work_floats). Nothing is written when an index is out of
// range (returns 1).
int llmctl_decode(const LlmctlModel* model, int64_t token, int64_t slot, int64_t pos, float* logits, float* work) {
  const Model md(model);
  const bool gpt2 = md.gpt2;
  const int64_t C = md.C, nh = md.nh, nkv = md.nkv, hd = md.hd, inter = md.inter, L = md.L, nq = md.nq();
  const int64_t S = slot + 1;
  const float eps = md.eps, scale = md.scale;
  if (token < 0 || token >= md.V || slot < 0 || slot >= L || pos < 0 || pos >= md.n_pos) return 1;
  const float *emb = md.emb, *pe = md.pe, *sin = md.sin;
  float *h = work, *xn = h + C, *qkv = xn + C, *att = qkv + nq, *mlp = att + nh * hd, *sc = mlp + 2 * inter;

  for (int64_t i = 0; i < C; i++) h[i] = emb[token * C + i] + (gpt2 ? pe[pos * C + i] : 0.0f);
#pragma omp parallel
  {
    for (int64_t l = 0; l < md.n_layer; l++) {
      const Layer w = md.layers[l];
#pragma omp single
      norm(h, w.ln1w, w.ln1b, xn, C, gpt2, eps);
      gemv_io(xn, w.wqkv, w.bqkv, qkv, C, nq, false);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh + nkv; j++)
        rope_store(qkv, j, nh, nkv, hd, gpt2 ? nullptr : pe + pos * hd, gpt2 ? nullptr : sin + pos * hd, w.kc, w.vc, L, slot);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh; j++) {
        const int64_t g = j / (nh / nkv);
        attend(qkv + j * hd, w.kc + g * L * hd, w.vc + g * L * hd, S, nullptr, scale, sc + j * L, att + j * hd, hd);
      }
      gemv_io(att, w.wo, w.bo, h, nh * hd, C, true);  // residual add fused
#pragma omp barrier
#pragma omp single
      norm(h, w.ln2w, w.ln2b, xn, C, gpt2, eps);
      gemv_io(xn, w.w1, w.b1, mlp, C, md.m1(), false);
#pragma omp barrier
      {
        int64_t j0, j1;
        span(inter, 16, &j0, &j1);
        activate(mlp, inter, j0, j1, gpt2);
      }
#pragma omp barrier
      gemv_io(mlp, w.w2, w.b2, h, inter, C, true);
#pragma omp barrier
    }
#pragma omp single
    norm(h, md.normw, md.normb, xn, C, gpt2, eps);
    if (md.lm_rows)
      gemv_oi(xn, md.lm_head, logits, C, md.V);
    else
      gemv_io(xn, md.lm_head, nullptr, logits, C, md.V, false);
  }
  return 0;
}

// M tokens at once: token m goes to slot slots[m] of cache row rows[m] at position pos[m] and attends to that
// row's slots s <= limit[m] where mask[rows[m] * mstride + s] (mask null: all). The matmuls go through sgemm, the
// rest through OpenMP loops. logits [n_out, V] of the tokens `out` (null: all M, in order); work: scratch
// (llmctl_step_floats). Nothing is written when an index is out of range (returns 1).
int llmctl_step(const LlmctlModel* model, const LlmctlTokens* t, float* logits, float* work, void* sgemm) {
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
  const float *emb = md.emb, *pe = md.pe, *sin = md.sin;

#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < C; i++) h[m * C + i] = emb[tok[m] * C + i] + (gpt2 ? pe[pos[m] * C + i] : 0.0f);
  for (int64_t l = 0; l < md.n_layer; l++) {
    const Layer w = md.layers[l];
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) norm(h + m * C, w.ln1w, w.ln1b, xn + m * C, C, gpt2, eps);
    mm(f, M, xn, w.wqkv, w.bqkv, qkv, C, nq, false);
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
    mm(f, M, att, w.wo, w.bo, h, nh * hd, C, true);  // residual add fused
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) norm(h + m * C, w.ln2w, w.ln2b, xn + m * C, C, gpt2, eps);
    mm(f, M, xn, w.w1, w.b1, mlp, C, m1, false);
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) activate(mlp + m * m1, inter, 0, inter, gpt2);
    mm(f, M, mlp, w.w2, w.b2, h, inter, C, true, false, m1);  // (llama: silu(gate) * up, each row's first half)
  }
  const int64_t n = out_idx ? n_out : M;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++)
    norm(h + (out_idx ? out_idx[i] : i) * C, md.normw, md.normb, xn + i * C, C, gpt2, eps);
  mm(f, n, xn, md.lm_head, nullptr, logits, C, md.V, false, md.lm_rows != 0);
  return 0;
}

}  // extern "C"
