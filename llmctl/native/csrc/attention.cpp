// Causal self-attention, forward and backward, fp32 on CPU: the training path's attention (llmctl/attention.py).
//
// Built with decode.cpp into one library by llmctl/native/ (g++ -O3 -march=native -fopenmp). For the small head
// sizes of CPU-sized models (32-128) PyTorch's CPU flash attention spends most of its time outside its matmuls;
// here each (batch, head) is one task of an OpenMP loop, and within it every row tile of RT query rows computes its
// scores against the keys it may see (a causal mask is just where a tile stops), the softmax in 16-lane vectors,
// and the outputs, all in registers-sized tiles that stay in L1/L2:
//   forward:  S = q k^T (keys transposed once a head), P = softmax(scale S) (log-sum-exp kept), o = P v
//   backward: for row blocks of BR queries: P again from the log-sum-exp, dP = do v^T, dS = P (dP - rowsum(do o)),
//             dq = scale dS k; then dv += P^T do and dk += scale dS^T q for the keys those rows saw,
//             accumulated across a grouped-query group's heads, written once.
// Tensors are [B, T, heads, hd] rows addressed by element strides (batch, time, head; the last stride is 1), so the
// projections' views are read in place. hd must be a multiple of 16 (the Python side sends other sizes to SDPA).
// Tests hold both passes to torch's scaled_dot_product_attention (fp32, 1e-5).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
inline vf ld(const float* p) { return *(const vfu*)p; }
inline void st(float* p, vf v) { *(vfu*)p = v; }
inline vf bc(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // (not vf{} + x: an add)
const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
inline vf below(int64_t j, int64_t n, vf x) { return (iota + (int32_t)j) < (int32_t)n ? x : vf{}; }  // lanes j+l < n

inline vf vexp(vf x) {  // exp for x <= 0 (the softmax's): Cody-Waite reduction, degree-6 polynomial, rel. err < 2e-7
  const vf lo = bc(-87.0f), xc = x < lo ? lo : x;
  const vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = bc(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f, p = p * r + 8.3334519073e-3f, p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f, p = p * r + 5.0000001201e-1f, p = p * r * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
  return x < lo ? vf{} : p * (vf)e;
}
inline float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float s = v[0];
  for (int i = 1; i < 16; i++) s = v[i] > s ? v[i] : s;
  return s;
}

constexpr int64_t RT = 8;   // query rows a tile (registers: RT x 2 accumulators of 16 lanes)
constexpr int64_t BR = 64;  // query rows a backward block (its P and dS stay in L2)

// C[r, j] = sum_d A[r, d] Bt[d, j] for r < R, j < n (n a multiple of 32; Bt [hd, ldb] zero-padded past T).
template <int R>
void qk(const float* __restrict A, int64_t lda, const float* __restrict Bt, int64_t ldb, float* __restrict C,
        int64_t ldc, int64_t n, int64_t hd) {
  for (int64_t j = 0; j < n; j += 32) {
    vf a[R][2] = {};
    for (int64_t d = 0; d < hd; d++) {
      const vf b0 = ld(Bt + d * ldb + j), b1 = ld(Bt + d * ldb + j + 16);
      for (int r = 0; r < R; r++) {
        const vf x = bc(A[r * lda + d]);
        a[r][0] += x * b0, a[r][1] += x * b1;
      }
    }
    for (int r = 0; r < R; r++) st(C + r * ldc + j, a[r][0]), st(C + r * ldc + j + 16, a[r][1]);
  }
}

// O[r, c] (+)= alpha[r] sum_{k < nk} P[r rs + k ks] X[k, c] for r < R, c < hd (hd a multiple of 16).
template <int R>
void pv(const float* __restrict P, int64_t rs, int64_t ks, int64_t nk, const float* __restrict X, int64_t ldx,
        float* __restrict O, int64_t ldo, int64_t hd, const float* alpha, bool add) {
  int64_t c = 0;
  for (; c + 32 <= hd; c += 32) {
    vf a[R][2] = {};
    for (int64_t k = 0; k < nk; k++) {
      const vf x0 = ld(X + k * ldx + c), x1 = ld(X + k * ldx + c + 16);
      for (int r = 0; r < R; r++) {
        const vf p = bc(P[r * rs + k * ks]);
        a[r][0] += p * x0, a[r][1] += p * x1;
      }
    }
    for (int r = 0; r < R; r++) {
      float* o = O + r * ldo + c;
      const vf y0 = alpha[r] * a[r][0], y1 = alpha[r] * a[r][1];
      if (add) st(o, ld(o) + y0), st(o + 16, ld(o + 16) + y1);
      else st(o, y0), st(o + 16, y1);
    }
  }
  if (c < hd) {
    vf a[R] = {};
    for (int64_t k = 0; k < nk; k++) {
      const vf x0 = ld(X + k * ldx + c);
      for (int r = 0; r < R; r++) a[r] += bc(P[r * rs + k * ks]) * x0;
    }
    for (int r = 0; r < R; r++) {
      float* o = O + r * ldo + c;
      st(o, add ? ld(o) + alpha[r] * a[r] : alpha[r] * a[r]);
    }
  }
}

typedef void (*qk_t)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);
typedef void (*pv_t)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                     const float*, bool);
const qk_t QK[RT + 1] = {nullptr, qk<1>, qk<2>, qk<3>, qk<4>, qk<5>, qk<6>, qk<7>, qk<8>};  // by tile rows
const pv_t PV[RT + 1] = {nullptr, pv<1>, pv<2>, pv<3>, pv<4>, pv<5>, pv<6>, pv<7>, pv<8>};

// Xt[d, j] = X[j, d] (rows ldx apart), zero for T <= j < Tp.
void transpose(const float* X, int64_t ldx, int64_t T, int64_t hd, float* Xt, int64_t Tp) {
  for (int64_t j0 = 0; j0 < Tp; j0 += 16) {
    const int64_t n = T - j0 < 16 ? (T - j0 > 0 ? T - j0 : 0) : 16;
    for (int64_t d = 0; d < hd; d++) {
      float* o = Xt + d * Tp + j0;
#pragma omp simd
      for (int64_t jj = 0; jj < 16; jj++) o[jj] = jj < n ? X[(j0 + jj) * ldx + d] : 0.0f;
    }
  }
}

struct Dims {  // d: B, T, H, Hk, hd, then strides (batch, time, head) of q, k, v, o (forward) and dk/dv (backward)
  int64_t B, T, H, Hk, hd, qb, qt, qh, kb, kt, kh, vb, vt, vh, ob, ot, oh, gb, gt, gh;
};

}  // namespace

extern "C" {

// o [B, T, H, hd] (strides ob, ot, oh) = causal attention; lse [B, H, T] contiguous: each row's log-sum-exp of the
// scaled scores.
int llmctl_attn_fwd(const int64_t* dims, const float* q, const float* k, const float* v, float* o, float* lse,
                    float scale) {
  Dims d;
  std::memcpy(&d, dims, 17 * sizeof(int64_t));
  if (d.hd % 16 || d.Hk <= 0 || d.H % d.Hk) return 1;
  const int64_t T = d.T, hd = d.hd, grp = d.H / d.Hk, Tp = (T + 31) / 32 * 32;
#pragma omp parallel
  {
    std::vector<float> Kt(hd * Tp), S(RT * Tp);
    float inv[RT];
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < d.B * d.H; bh++) {
      const int64_t b = bh / d.H, h = bh % d.H, g = h / grp;
      const float* Q = q + b * d.qb + h * d.qh;
      const float* V = v + b * d.vb + g * d.vh;
      float* O = o + b * d.ob + h * d.oh;
      float* L = lse + bh * T;
      transpose(k + b * d.kb + g * d.kh, d.kt, T, hd, Kt.data(), Tp);
      for (int64_t i0 = 0; i0 < T; i0 += RT) {
        const int64_t R = T - i0 < RT ? T - i0 : RT, nS = (i0 + R + 31) / 32 * 32;  // keys this tile sees: < i0+R
        QK[R](Q + i0 * d.qt, d.qt, Kt.data(), Tp, S.data(), Tp, nS, hd);
        for (int64_t r = 0; r < R; r++) {
          float* s = S.data() + r * Tp;
          const int64_t n = i0 + r + 1;
          const int64_t nf = n & ~int64_t(15), nv = (n + 15) & ~int64_t(15);  // full vectors; all with keys
          vf m = bc(-INFINITY);
          for (int64_t j = 0; j < nf; j += 16) {
            const vf x = ld(s + j);
            m = x > m ? x : m;
          }
          if (nf < n) {
            const vf x = ld(s + nf);
            m = (iota + (int32_t)nf) < (int32_t)n && x > m ? x : m;
          }
          const float mx = hmax(m) * scale;
          vf sum = {};
          for (int64_t j = 0; j < nf; j += 16) {
            const vf e = vexp(ld(s + j) * scale - mx);
            st(s + j, e), sum += e;
          }
          if (nf < n) {
            const vf e = below(nf, n, vexp(ld(s + nf) * scale - mx));
            st(s + nf, e), sum += e;
          }
          for (int64_t j = nv; j < nS; j += 16) st(s + j, vf{});
          const float total = hsum(sum);
          inv[r] = 1.0f / total;
          L[i0 + r] = mx + std::log(total);
        }
        PV[R](S.data(), Tp, 1, i0 + R, V, d.vt, O + i0 * d.ot, d.ot, hd, inv, false);
      }
    }
  }
  return 0;
}

// dq [B, T, H, hd] (o's strides, which do shares), dk and dv [B, T, Hk, hd] (strides gb, gt, gh): written.
int llmctl_attn_bwd(const int64_t* dims, const float* q, const float* k, const float* v, const float* o,
                    const float* lse, const float* go, float* dq, float* dk, float* dv, float scale) {
  Dims d;
  std::memcpy(&d, dims, sizeof(Dims));
  if (d.hd % 16 || d.Hk <= 0 || d.H % d.Hk) return 1;
  const int64_t T = d.T, hd = d.hd, grp = d.H / d.Hk, Tp = (T + 31) / 32 * 32;
#pragma omp parallel
  {
    std::vector<float> Kt(hd * Tp), Vt(hd * Tp), P(BR * Tp), dS(BR * Tp), dKa(T * hd), dVa(T * hd), D(T);
    float one[RT], sc[RT];
    for (int r = 0; r < RT; r++) one[r] = 1.0f, sc[r] = scale;
#pragma omp for schedule(dynamic)
    for (int64_t bg = 0; bg < d.B * d.Hk; bg++) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      const float* K = k + b * d.kb + g * d.kh;
      transpose(K, d.kt, T, hd, Kt.data(), Tp);
      transpose(v + b * d.vb + g * d.vh, d.vt, T, hd, Vt.data(), Tp);
      std::memset(dKa.data(), 0, T * hd * sizeof(float));
      std::memset(dVa.data(), 0, T * hd * sizeof(float));
      for (int64_t h = g * grp; h < (g + 1) * grp; h++) {
        const float* Q = q + b * d.qb + h * d.qh;
        const float* O = o + b * d.ob + h * d.oh;
        const float* G = go + b * d.ob + h * d.oh;
        float* dQ = dq + b * d.ob + h * d.oh;
        const float* L = lse + (b * d.H + h) * T;
        for (int64_t i = 0; i < T; i++) {  // D = rowsum(do * o)
          const float *gi = G + i * d.ot, *oi = O + i * d.ot;
          vf acc = {};
          for (int64_t e = 0; e < hd; e += 16) acc += ld(gi + e) * ld(oi + e);
          D[i] = hsum(acc);
        }
        for (int64_t r0 = 0; r0 < T; r0 += BR) {
          const int64_t r1 = r0 + BR < T ? r0 + BR : T;
          for (int64_t i0 = r0; i0 < r1; i0 += RT) {
            const int64_t R = r1 - i0 < RT ? r1 - i0 : RT, nS = (i0 + R + 31) / 32 * 32;
            float* Pt = P.data() + (i0 - r0) * Tp;
            float* dSt = dS.data() + (i0 - r0) * Tp;
            QK[R](Q + i0 * d.qt, d.qt, Kt.data(), Tp, Pt, Tp, nS, hd);
            QK[R](G + i0 * d.ot, d.ot, Vt.data(), Tp, dSt, Tp, nS, hd);
            for (int64_t r = 0; r < R; r++) {
              const int64_t i = i0 + r;
              const float l = L[i], Di = D[i];
              float *p = Pt + r * Tp, *ds = dSt + r * Tp;
              const int64_t n = i + 1, nf = n & ~int64_t(15), nv = (n + 15) & ~int64_t(15);
              for (int64_t j = 0; j < nf; j += 16) {
                const vf e = vexp(ld(p + j) * scale - l);
                st(p + j, e), st(ds + j, e * (ld(ds + j) - Di));
              }
              if (nf < n) {
                const vf e = below(nf, n, vexp(ld(p + nf) * scale - l));
                st(p + nf, e), st(ds + nf, e * (ld(ds + nf) - Di));
              }
              for (int64_t j = nv; j < nS; j += 16) st(p + j, vf{}), st(ds + j, vf{});
            }
            PV[R](dSt, Tp, 1, i0 + R, K, d.kt, dQ + i0 * d.ot, d.ot, hd, sc, false);
          }
          // keys j < r1 against this block's rows i >= max(r0, j) (P and dS are zero above the diagonal)
          for (int64_t j0 = 0; j0 < r1; j0 += RT) {
            const int64_t R = r1 - j0 < RT ? r1 - j0 : RT, i0 = j0 > r0 ? j0 : r0, n = r1 - i0;
            PV[R](P.data() + (i0 - r0) * Tp + j0, 1, Tp, n, G + i0 * d.ot, d.ot, dVa.data() + j0 * hd, hd, hd, one,
                  true);
            PV[R](dS.data() + (i0 - r0) * Tp + j0, 1, Tp, n, Q + i0 * d.qt, d.qt, dKa.data() + j0 * hd, hd, hd, sc,
                  true);
          }
        }
      }
      float* dK = dk + b * d.gb + g * d.gh;
      float* dV = dv + b * d.gb + g * d.gh;
      for (int64_t j = 0; j < T; j++) {
        std::memcpy(dK + j * d.gt, dKa.data() + j * hd, hd * sizeof(float));
        std::memcpy(dV + j * d.gt, dVa.data() + j * hd, hd * sizeof(float));
      }
    }
  }
  return 0;
}

}  // extern "C"
