// The small operations of a CPU decode step, each one call instead of a dozen torch operators: at batch 1 a token
// of a small model spends more time dispatching those operators than computing them. Plain C++ compiled for
// AVX-512 / AVX2 / baseline (target_clones picks at load time). Their torch references, and the fallback wherever
// these do not apply, are the modules in minigptq/transformer.py (RMSNorm, Attention).
#include "decode.h"

#include "qgemm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MINIGPTQ_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define MINIGPTQ_CLONES
#endif

namespace minigptq {

namespace {

// sum_d a[d] * b[d], in 16 independent partial sums so that the compiler vectorizes it (a float reduction in one
// accumulator may not be reordered, so it would stay scalar).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  float s = 0.f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

}  // namespace

MINIGPTQ_CLONES
void rms_norm(const float* x, const float* w, float eps, int64_t M, int64_t D, float* out) {
  if (M <= 0 || D <= 0) throw std::invalid_argument("rms_norm: M and D must be positive");
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    const float ss = dot(xr, xr, D);
    const float r = 1.f / std::sqrt(ss / float(D) + eps);
    float* o = out + m * D;
    for (int64_t d = 0; d < D; ++d) o[d] = w[d] * (xr[d] * r);
  }
}

namespace {

// q or k of one head, rotated in place: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
inline void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t d = 0; d < h; ++d) {
    const float a = x[d], b = x[d + h];
    x[d] = a * cos[d] - b * sin[d];
    x[d + h] = b * cos[d + h] + a * sin[d + h];
  }
}

}  // namespace

namespace {

// One query head (already rotated) over S cached keys and values: out[hd] = softmax(q k^T * scale + mask) v.
// scores: scratch [S]. The generic version; head_avx512 below is the same for hd a multiple of 16 (up to 256).
void head_generic(const float* q, const float* kc, const float* vc, const float* mask, int64_t S, int64_t hd,
                  float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = dot(q, kc + s * hd, hd) * scale + (mask ? mask[s] : 0.f);
    mx = std::max(mx, scores[s]);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
  std::fill(out, out + hd, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    const float w = scores[s] / sum;
    for (int64_t d = 0; d < hd; ++d) out[d] += w * vc[s * hd + d];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// q and the output accumulators stay in registers; one horizontal add per score.
__attribute__((target("avx512f"))) void head_avx512(const float* q, const float* kc, const float* vc,
                                                     const float* mask, int64_t S, int64_t hd, float scale,
                                                     float* scores, float* out) {
  const int nv = int(hd / 16);
  __m512 qv[16], acc[16];
  for (int i = 0; i < nv; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const float* k = kc + s * hd;
    __m512 t = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
    for (int i = 1; i < nv; ++i) t = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(k + 16 * i), t);
    scores[s] = _mm512_reduce_add_ps(t) * scale + (mask ? mask[s] : 0.f);
    mx = std::max(mx, scores[s]);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
  const float inv = 1.f / sum;
  for (int i = 0; i < nv; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    const __m512 w = _mm512_set1_ps(scores[s] * inv);
    const float* v = vc + s * hd;
    for (int i = 0; i < nv; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16 * i), acc[i]);
  }
  for (int i = 0; i < nv; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
#endif

}  // namespace

MINIGPTQ_CLONES
void attn_decode(const DecodeAttn& a, int threads) {
  if (a.B <= 0 || a.H <= 0 || a.KVH <= 0 || a.H % a.KVH || a.hd <= 0 || a.hd % 2 || a.slot < 0 ||
      a.slot >= a.Smax || (a.mask && a.mask_heads != 1 && a.mask_heads != a.H))
    throw std::invalid_argument("attn_decode: inconsistent sizes (B=" + std::to_string(a.B) + ", H=" +
                                std::to_string(a.H) + ", KVH=" + std::to_string(a.KVH) + ", hd=" +
                                std::to_string(a.hd) + ", slot=" + std::to_string(a.slot) + ", Smax=" +
                                std::to_string(a.Smax) + ")");
  const int64_t hd = a.hd, S = a.slot + 1, group = a.H / a.KVH;
  const float scale = 1.f / std::sqrt(float(hd));
  // The new keys (rotated) and values go into the cache first; then every (sequence, query head) attends.
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.KVH; ++g) {
      float* kc = a.k_cache + ((b * a.KVH + g) * a.Smax + a.slot) * hd;
      float* vc = a.v_cache + ((b * a.KVH + g) * a.Smax + a.slot) * hd;
      std::copy(a.k + b * a.kv_row + g * a.head_stride, a.k + b * a.kv_row + g * a.head_stride + hd, kc);
      std::copy(a.v + b * a.kv_row + g * a.head_stride, a.v + b * a.kv_row + g * a.head_stride + hd, vc);
      if (a.cos) rope(kc, a.cos + b * hd, a.sin + b * hd, hd);
    }
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const auto head = avx512 && hd % 16 == 0 && hd <= 256 ? head_avx512 : head_generic;
#else
  const auto head = head_generic;
#endif
  const int64_t work = a.B * a.H;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, S * a.H * hd >= (1 << 15) ? work : 1)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> q(hd), scores(S);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      const int64_t b = i / a.H, h = i % a.H;
      const float* qh = a.q + b * a.q_row + h * a.head_stride;
      std::copy(qh, qh + hd, q.data());
      if (a.cos) rope(q.data(), a.cos + b * hd, a.sin + b * hd, hd);
      const float* mask = a.mask ? a.mask + (b * a.mask_heads + (a.mask_heads == 1 ? 0 : h)) * a.mask_stride
                                 : nullptr;
      const int64_t kv = (b * a.KVH + h / group) * a.Smax * hd;
      head(q.data(), a.k_cache + kv, a.v_cache + kv, mask, S, hd, scale, scores.data(), a.out + b * a.H * hd + h * hd);
    }
  }
}

namespace {

void linear(const QWeight& w, const float* bias, const float* x, int64_t M, float* y, int int8, int threads) {
  if (int8)
    qgemm_i8(w, x, DType::F32, M, y, threads, Isa::Auto);
  else
    qgemm(w, x, DType::F32, M, y, threads, Isa::Auto);
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < w.N; ++n) y[m * w.N + n] += bias[n];
}

}  // namespace

void decode_block(const DecodeBlock& blk, float* x, const DecodeAttn& attn_in, int threads) {
  const int64_t B = attn_in.B, D = blk.D, F = blk.F, hd = blk.hd, H = blk.H, KVH = blk.KVH;
  const int64_t nqkv = (H + 2 * KVH) * hd;
  if (blk.qkv->N != nqkv || blk.qkv->K != D || blk.o->K != H * hd || blk.o->N != D || blk.gate_up->K != D ||
      blk.gate_up->N != 2 * F || blk.down->K != F || blk.down->N != D)
    throw std::invalid_argument("decode_block: the layers' shapes do not match D, H, KVH, hd, F");
  thread_local std::vector<float> h, qkv, att, gu, act;
  h.resize(B * D), qkv.resize(B * nqkv), att.resize(B * H * hd), gu.resize(B * 2 * F), act.resize(B * F);
  // attention: x += o(attn(qkv(norm(x))))
  rms_norm(x, blk.attn_norm, blk.eps, B, D, h.data());
  linear(*blk.qkv, blk.qkv_bias, h.data(), B, qkv.data(), blk.int8, threads);
  DecodeAttn a = attn_in;
  a.q = qkv.data(), a.k = qkv.data() + H * hd, a.v = qkv.data() + (H + KVH) * hd;
  a.q_row = a.kv_row = nqkv, a.head_stride = hd, a.out = att.data();
  attn_decode(a, threads);
  linear(*blk.o, blk.o_bias, att.data(), B, h.data(), blk.int8, threads);
  for (int64_t i = 0; i < B * D; ++i) x[i] += h[i];
  // MLP: x += down(silu(gate) * up)
  rms_norm(x, blk.mlp_norm, blk.eps, B, D, h.data());
  linear(*blk.gate_up, blk.gate_up_bias, h.data(), B, gu.data(), blk.int8, threads);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) {
      const float g = gu[b * 2 * F + f], u = gu[b * 2 * F + F + f];
      act[b * F + f] = g / (1.f + std::exp(-g)) * u;
    }
  linear(*blk.down, blk.down_bias, act.data(), B, h.data(), blk.int8, threads);
  for (int64_t i = 0; i < B * D; ++i) x[i] += h[i];
}

}  // namespace minigptq
