// The one-token, one-row decode step of an llmctl Transformer (llama or gpt2 family), fp32 on CPU, in one call.
//
// llmctl/native.py compiles this file on first use (g++ -O3 -march=native -fopenmp) and calls `llmctl_decode`
// through ctypes from FastDecode (llmctl/fastdecode.py), which owns the weights: the same fused [in, out]
// matrices its PyTorch step uses, read in place. At batch 1 a small model's step is mostly op dispatch in
// PyTorch (~200 ops a token); here it is one call, one OpenMP parallel region (the process's OpenMP runtime,
// the one PyTorch uses, with its thread count), and loops the compiler vectorises. The math is FastDecode's:
// tests hold the logits to PyTorch's (fp32, 1e-4).
//
// Arguments (all int64 so that one numpy array carries them):
//   cfg:  arch (0 llama, 1 gpt2), n_layer, C, n_head, n_kv_head, head_dim, inter (MLP width), vocab,
//         cache max_len, lm_layout (0: lm_head [C, V]; 1: rows [V, C], a tied embedding as it is),
//         token, slot (cache position written), position (RoPE / learned position index)
//   ptrs: embedding [V, C], wpe [n_pos, C] (gpt2) or cos [n_pos, hd] (llama), signed sin [n_pos, hd] (llama),
//         final norm weight, final norm bias (gpt2), lm_head, then per layer 14: ln1 w, ln1 b, wqkv, bqkv,
//         wo, bo, ln2 w, ln2 b, w1 (gate|up or fc), b1, w2 (down or proj), b2, k cache, v cache
//         ([nkv, max_len, hd] each, contiguous); a null pointer is an absent bias.
//   eps, scale: the norms' epsilon, attention's scale; logits: [V] out; work: scratch (llmctl_work_floats).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

struct Layer {
  const float *ln1w, *ln1b, *wqkv, *bqkv, *wo, *bo, *ln2w, *ln2b, *w1, *b1, *w2, *b2;
  float *kc, *vc;
};

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

}  // namespace

extern "C" {

int64_t llmctl_work_floats(const int64_t* cfg) {  // scratch the step needs, in floats
  const int64_t C = cfg[2], nh = cfg[3], nkv = cfg[4], hd = cfg[5], inter = cfg[6], L = cfg[8];
  return 2 * C + (nh + 2 * nkv) * hd + nh * hd + 2 * inter + nh * L + 64;
}

int llmctl_decode(const int64_t* cfg, const int64_t* ptrs, float eps, float scale, float* logits, float* work) {
  const bool gpt2 = cfg[0] == 1;
  const int64_t n_layer = cfg[1], C = cfg[2], nh = cfg[3], nkv = cfg[4], hd = cfg[5], inter = cfg[6], V = cfg[7],
                L = cfg[8], lm_rows = cfg[9], token = cfg[10], slot = cfg[11], pos = cfg[12];
  if (token < 0 || token >= V || slot < 0 || slot >= L) return 1;
  auto P = [&](int64_t i) { return reinterpret_cast<float*>(ptrs[i]); };
  const float *emb = P(0), *pe = P(1), *sin = P(2), *nw = P(3), *nb = P(4), *lm = P(5);
  const int64_t nq = (nh + 2 * nkv) * hd, group = nh / nkv, half = hd / 2, S = slot + 1;
  float *h = work, *xn = h + C, *qkv = xn + C, *att = qkv + nq, *mlp = att + nh * hd, *sc = mlp + 2 * inter;
  const int64_t m1 = gpt2 ? inter : 2 * inter;  // width of the first MLP matmul

  for (int64_t i = 0; i < C; i++) h[i] = emb[token * C + i] + (gpt2 ? pe[pos * C + i] : 0.0f);
#pragma omp parallel
  {
    for (int64_t l = 0; l < n_layer; l++) {
      auto W = [&](int64_t k) { return P(6 + 14 * l + k); };
      const Layer w{W(0), W(1), W(2), W(3), W(4), W(5), W(6), W(7), W(8), W(9), W(10), W(11), W(12), W(13)};
#pragma omp single
      norm(h, w.ln1w, w.ln1b, xn, C, gpt2, eps);
      gemv_io(xn, w.wqkv, w.bqkv, qkv, C, nq, false);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh + nkv; j++) {  // RoPE on q and k heads; k and v into the cache
        float* x = qkv + j * hd;
        if (!gpt2) {
          float tmp[512];
          const float *c = pe + pos * hd, *s = sin + pos * hd;
          for (int64_t d = 0; d < hd; d++) tmp[d] = x[d] * c[d] + x[(d + half) % hd] * s[d];
          std::memcpy(x, tmp, hd * sizeof(float));
        }
        if (j >= nh) {
          const int64_t g = j - nh;
          std::memcpy(w.kc + (g * L + slot) * hd, x, hd * sizeof(float));
          std::memcpy(w.vc + (g * L + slot) * hd, qkv + (nh + nkv + g) * hd, hd * sizeof(float));
        }
      }
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nh; j++) {  // attention of head j over slots 0..slot
        const float* q = qkv + j * hd;
        const float *K = w.kc + (j / group) * L * hd, *Vc = w.vc + (j / group) * L * hd;
        float* s = sc + j * L;
        float mx = -INFINITY;
        for (int64_t p = 0; p < S; p++) {
          const float* k = K + p * hd;
          float d = 0;
#pragma omp simd reduction(+ : d)
          for (int64_t e = 0; e < hd; e++) d += q[e] * k[e];
          s[p] = d * scale;
          mx = s[p] > mx ? s[p] : mx;
        }
        float sum = 0;
        for (int64_t p = 0; p < S; p++) sum += (s[p] = std::exp(s[p] - mx));
        float* y = att + j * hd;
        std::memset(y, 0, hd * sizeof(float));
        for (int64_t p = 0; p < S; p++) {
          const float a = s[p] / sum, *v = Vc + p * hd;
#pragma omp simd
          for (int64_t e = 0; e < hd; e++) y[e] += a * v[e];
        }
      }
      gemv_io(att, w.wo, w.bo, h, nh * hd, C, true);  // residual add fused
#pragma omp barrier
#pragma omp single
      norm(h, w.ln2w, w.ln2b, xn, C, gpt2, eps);
      gemv_io(xn, w.w1, w.b1, mlp, C, m1, false);
#pragma omp barrier
      {
        int64_t j0, j1;
        span(inter, 16, &j0, &j1);
        if (gpt2) {  // gelu, tanh approximation
          for (int64_t j = j0; j < j1; j++) {
            const float x = mlp[j];
            mlp[j] = 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
          }
        } else {  // silu(gate) * up
          for (int64_t j = j0; j < j1; j++) {
            const float g = mlp[j];
            mlp[j] = g / (1.0f + std::exp(-g)) * mlp[inter + j];
          }
        }
      }
#pragma omp barrier
      gemv_io(mlp, w.w2, w.b2, h, inter, C, true);
#pragma omp barrier
    }
#pragma omp single
    norm(h, nw, nb, xn, C, gpt2, eps);
    if (lm_rows)
      gemv_oi(xn, lm, logits, C, V);
    else
      gemv_io(xn, lm, nullptr, logits, C, V, false);
  }
  return 0;
}

}  // extern "C"
