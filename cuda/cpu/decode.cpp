// The small operations of a CPU decode step, each one call instead of a dozen torch operators: at batch 1 a token
// of a small model spends more time dispatching those operators than computing them. Plain C++ compiled for
// AVX-512 / AVX2 / baseline (target_clones picks at load time). Their torch references, and the fallback wherever
// these do not apply, are the modules in minigptq/transformer.py (RMSNorm, Attention).
// A half-precision KV cache (fp16 / bf16) is read by AVX2 + F16C code where the CPU has both (checked at run time),
// else by a scalar fallback that converts one cached row at a time to fp32.
#include "decode.h"

#include "qgemm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
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

// One head's attention in plain C++ over any cache: key(s) -> the fp32 key row s, val(s, d) -> value d of row s.
template <class Key, class Val>
void head_scalar(const float* q, const float* mask, int64_t S, int64_t hd, float scale, float* scores, float* out,
                 Key key, Val val) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = dot(q, key(s), hd) * scale + (mask ? mask[s] : 0.f);
    mx = std::max(mx, scores[s]);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
  std::fill(out, out + hd, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    const float w = scores[s] / sum;
    for (int64_t d = 0; d < hd; ++d) out[d] += w * val(s, d);
  }
}

// One query head (already rotated) over S cached keys and values: out[hd] = softmax(q k^T * scale + mask) v.
// scores: scratch [S]. The generic version; head_avx512 below is the same for hd a multiple of 16 (up to 256).
void head_generic(const float* q, const float* kc, const float* vc, const float* mask, int64_t S, int64_t hd,
                  float scale, float* scores, float* out) {
  head_scalar(q, mask, S, hd, scale, scores, out, [&](int64_t s) { return kc + s * hd; },
              [&](int64_t s, int64_t d) { return vc[s * hd + d]; });
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


// -- the half-precision cache: fp32 <-> fp16 / bf16, rounded to the nearest even as torch rounds -------------------
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t to_bf16(float f) {  // c10::BFloat16's round_to_nearest_even (NaN -> 0x7FC0)
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t h) { return float_of(uint32_t(h) << 16); }
// IEEE fp16 by integer arithmetic (the FP16 library's fp16_ieee_from_fp32_value / to_fp32_value, which c10::Half
// uses), for CPUs without F16C. volatile keeps the compiler from fusing the scaling into a multiply-add.
inline uint16_t to_f16(float f) {
  volatile float scaled = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f), shl1 = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1 & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t b = bits_of(float_of((bias >> 1) + 0x07800000u) + scaled);
  const uint32_t nonsign = ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
  return uint16_t((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign));
}
inline float from_f16(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = float_of((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  const float denormal = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of(sign | (two_w < (1u << 27) ? bits_of(denormal) : bits_of(normal)));
}
inline float from_half(uint16_t h, bool bf16) { return bf16 ? from_bf16(h) : from_f16(h); }

#if defined(__x86_64__) && defined(__GNUC__)
// 8 cached halves -> 8 floats: F16C's conversion for fp16; bf16 is the upper half of an fp32, so a shift.
template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else
    return _mm256_cvtph_ps(h);
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// head_generic over a half-precision cache, for hd a multiple of 8: the keys and values converted 8 at a time in
// registers, the scores and the output accumulated in fp32 (64 output values per pass over the values).
template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) void head_half_avx2(const float* q, const uint16_t* kc, const uint16_t* vc,
                                                            const float* mask, int64_t S, int64_t hd, float scale,
                                                            float* scores, float* out) {
  const int64_t nv = hd / 8;
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* k = kc + s * hd;
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nv; i += 2) {
      t0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), load8<BF16>(k + 8 * i), t0);
      t1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i + 8), load8<BF16>(k + 8 * i + 8), t1);
    }
    if (i < nv) t0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), load8<BF16>(k + 8 * i), t0);
    scores[s] = hsum(_mm256_add_ps(t0, t1)) * scale + (mask ? mask[s] : 0.f);
    mx = std::max(mx, scores[s]);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
  const float inv = 1.f / sum;
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    const int n = int(std::min<int64_t>(8, (hd - d0) / 8));
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const __m256 w = _mm256_set1_ps(scores[s] * inv);
      const uint16_t* v = vc + s * hd + d0;
      for (int i = 0; i < n; ++i) acc[i] = _mm256_fmadd_ps(w, load8<BF16>(v + 8 * i), acc[i]);
    }
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
  }
}

__attribute__((target("avx2,fma,f16c"))) void store_f16_f16c(const float* x, uint16_t* out, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; d < n; ++d) out[d] = to_f16(x[d]);
}
#endif

// The scalar fallback over a half-precision cache: head_scalar with each cached key row converted to fp32 into
// row[hd] and each value converted as it is read. scores: scratch [S].
void head_half_generic(const float* q, const uint16_t* kc, const uint16_t* vc, const float* mask, int64_t S,
                       int64_t hd, float scale, bool bf16, float* scores, float* row, float* out) {
  head_scalar(q, mask, S, hd, scale, scores, out,
              [&](int64_t s) {
                for (int64_t d = 0; d < hd; ++d) row[d] = from_half(kc[s * hd + d], bf16);
                return static_cast<const float*>(row);
              },
              [&](int64_t s, int64_t d) { return from_half(vc[s * hd + d], bf16); });
}

// x[n] (fp32) into a cache row of type t, rounded to the nearest even.
void store_row(const float* x, void* dst, KvType t, int64_t n, bool f16c) {
  if (t == KvType::F32) {
    std::copy(x, x + n, static_cast<float*>(dst));
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(dst);
  if (t == KvType::BF16) {
    for (int64_t d = 0; d < n; ++d) out[d] = to_bf16(x[d]);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (f16c) return store_f16_f16c(x, out, n);
#endif
  (void)f16c;
  for (int64_t d = 0; d < n; ++d) out[d] = to_f16(x[d]);
}

}  // namespace

MINIGPTQ_CLONES
void attn_decode(const DecodeAttn& a, int threads) {
  const int kt = int(a.kv_type);
  if (a.B <= 0 || a.H <= 0 || a.KVH <= 0 || a.H % a.KVH || a.hd <= 0 || a.hd % 2 || a.slot < 0 ||
      a.slot >= a.Smax || (a.mask && a.mask_heads != 1 && a.mask_heads != a.H) || kt < 0 || kt > 2)
    throw std::invalid_argument("attn_decode: inconsistent sizes (B=" + std::to_string(a.B) + ", H=" +
                                std::to_string(a.H) + ", KVH=" + std::to_string(a.KVH) + ", hd=" +
                                std::to_string(a.hd) + ", slot=" + std::to_string(a.slot) + ", Smax=" +
                                std::to_string(a.Smax) + ", kv_type=" + std::to_string(kt) + ")");
  const int64_t hd = a.hd, S = a.slot + 1, group = a.H / a.KVH;
  const float scale = 1.f / std::sqrt(float(hd));
  const bool half = a.kv_type != KvType::F32, bf16 = a.kv_type == KvType::BF16;
  const int64_t es = half ? 2 : 4;  // bytes per cached element
  char* const kbase = static_cast<char*>(a.k_cache);
  char* const vbase = static_cast<char*>(a.v_cache);
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  const auto head = avx512 && hd % 16 == 0 && hd <= 256 ? head_avx512 : head_generic;
  const auto head_half = !f16c || hd % 8 ? nullptr : bf16 ? head_half_avx2<true> : head_half_avx2<false>;
#else
  const bool f16c = false;
  const auto head = head_generic;
  void (*head_half)(const float*, const uint16_t*, const uint16_t*, const float*, int64_t, int64_t, float, float*,
                    float*) = nullptr;
#endif
  // The new keys (rotated) and values go into the cache first, rounded to its type; then every (sequence, query
  // head) attends.
  std::vector<float> kr(hd);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.KVH; ++g) {
      const int64_t at = ((b * a.KVH + g) * a.Smax + a.slot) * hd * es;  // byte offset of this slot's row
      const float* kn = a.k + b * a.kv_row + g * a.head_stride;
      std::copy(kn, kn + hd, kr.data());
      if (a.cos) rope(kr.data(), a.cos + b * hd, a.sin + b * hd, hd);
      store_row(kr.data(), kbase + at, a.kv_type, hd, f16c);
      store_row(a.v + b * a.kv_row + g * a.head_stride, vbase + at, a.kv_type, hd, f16c);
    }
  const int64_t work = a.B * a.H;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(threads, S * a.H * hd >= (1 << 15) ? work : 1)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> q(hd), scores(S), row(hd);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      const int64_t b = i / a.H, h = i % a.H;
      const float* qh = a.q + b * a.q_row + h * a.head_stride;
      std::copy(qh, qh + hd, q.data());
      if (a.cos) rope(q.data(), a.cos + b * hd, a.sin + b * hd, hd);
      const float* mask = a.mask ? a.mask + (b * a.mask_heads + (a.mask_heads == 1 ? 0 : h)) * a.mask_stride
                                 : nullptr;
      const int64_t kv = (b * a.KVH + h / group) * a.Smax * hd * es;  // byte offset of this kv head
      float* out = a.out + b * a.H * hd + h * hd;
      if (!half) {
        head(q.data(), reinterpret_cast<const float*>(kbase + kv), reinterpret_cast<const float*>(vbase + kv), mask,
             S, hd, scale, scores.data(), out);
      } else {
        const auto* kc = reinterpret_cast<const uint16_t*>(kbase + kv);
        const auto* vc = reinterpret_cast<const uint16_t*>(vbase + kv);
        if (head_half)
          head_half(q.data(), kc, vc, mask, S, hd, scale, scores.data(), out);
        else
          head_half_generic(q.data(), kc, vc, mask, S, hd, scale, bf16, scores.data(), row.data(), out);
      }
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
