// The x86 builds of the hot loop (qgemm_simd.inc): AVX2+FMA (8 lanes) and AVX-512 (16 lanes).
// Each is compiled under a target pragma, so the file builds with the baseline -march and the driver picks one at
// run time with __builtin_cpu_supports: a wheel built here also runs on CPUs without AVX-512.
// Only code defined between push and pop gets the instruction set; all headers are included before.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "qgemm_detail.h"

namespace minigptq::detail {

// ---------------------------------------------------------------------------------------------- AVX2 + FMA
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
struct V {
  using f = __m256;
  using i = __m256i;
  struct m {  // lane mask and the number of valid lanes (full vectors take the plain load)
    __m256i v;
    int n;
  };
  static constexpr int L = 8, TW = 2, MB = 2;  // 16 ymm registers: 4 accumulators + words + codes

  static inline m mask(int valid) {
    return {_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), valid};
  }
  static inline i load_w(const uint32_t* p, m k) {
    return k.n == L ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                    : _mm256_maskload_epi32(reinterpret_cast<const int*>(p), k.v);
  }
  static inline f load_f(const float* p, m k) { return k.n == L ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, k.v); }
  static inline void store_f(float* p, f v, m k) {
    if (k.n == L) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, k.v, v);
  }
  static inline f load_z(const int16_t* p, m k, int valid) {
    alignas(16) int16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int16_t* src = p;
    if (k.n != L) {
      std::memcpy(tmp, p, sizeof(int16_t) * valid);
      src = tmp;
    }
    const __m128i z16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(z16));
  }
  static inline f zero() { return _mm256_setzero_ps(); }
  static inline f set1(float a) { return _mm256_set1_ps(a); }
  static inline f fmadd(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
  static inline f fnmadd(f a, f b, f c) { return _mm256_fnmadd_ps(a, b, c); }
  static inline f mul(f a, f b) { return _mm256_mul_ps(a, b); }
  template <int S> static inline i srli(i v) { return _mm256_srli_epi32(v, S); }
  template <int S> static inline i slli(i v) { return _mm256_slli_epi32(v, S); }
  static inline i srl(i v, int s) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(s)); }
  static inline i sll(i v, int s) { return _mm256_sll_epi32(v, _mm_cvtsi32_si128(s)); }
  static inline i or_(i a, i b) { return _mm256_or_si256(a, b); }
  template <int BITS> static inline f codes(i v) {
    if constexpr (BITS <= 3) {  // vpermps reads the low 3 bits of each lane: a table lookup is mask + convert
      constexpr int M = (1 << BITS) - 1;
      return _mm256_permutevar8x32_ps(_mm256_setr_ps(0 & M, 1 & M, 2 & M, 3 & M, 4 & M, 5 & M, 6 & M, 7 & M), v);
    } else {
      return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32((1 << BITS) - 1)));
    }
  }
};
#include "qgemm_simd.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------------------- AVX-512 F/BW/VL
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#endif
namespace avx512 {
struct V {
  using f = __m512;
  using i = __m512i;
  using m = __mmask16;
  static constexpr int L = 16, TW = 4, MB = 4;  // 32 zmm registers: 16 accumulators + words + codes

  static inline m mask(int valid) { return valid >= L ? m(0xFFFF) : m((1u << valid) - 1); }
  static inline i load_w(const uint32_t* p, m k) { return _mm512_maskz_loadu_epi32(k, p); }
  static inline f load_f(const float* p, m k) { return _mm512_maskz_loadu_ps(k, p); }
  static inline void store_f(float* p, f v, m k) { _mm512_mask_storeu_ps(p, k, v); }
  static inline f load_z(const int16_t* p, m k, int) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, p)));
  }
  static inline f zero() { return _mm512_setzero_ps(); }
  static inline f set1(float a) { return _mm512_set1_ps(a); }
  static inline f fmadd(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
  static inline f fnmadd(f a, f b, f c) { return _mm512_fnmadd_ps(a, b, c); }
  static inline f mul(f a, f b) { return _mm512_mul_ps(a, b); }
  template <int S> static inline i srli(i v) { return _mm512_srli_epi32(v, S); }
  template <int S> static inline i slli(i v) { return _mm512_slli_epi32(v, S); }
  static inline i srl(i v, int s) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(s)); }
  static inline i sll(i v, int s) { return _mm512_sll_epi32(v, _mm_cvtsi32_si128(s)); }
  static inline i or_(i a, i b) { return _mm512_or_si512(a, b); }
  template <int BITS> static inline f codes(i v) {
    if constexpr (BITS <= 4) {  // vpermps reads the low 4 bits of each lane: one table lookup replaces and+cvt
      constexpr int M = (1 << BITS) - 1;
      const f lut = _mm512_setr_ps(0 & M, 1 & M, 2 & M, 3 & M, 4 & M, 5 & M, 6 & M, 7 & M, 8 & M, 9 & M, 10 & M,
                                   11 & M, 12 & M, 13 & M, 14 & M, 15 & M);
      return _mm512_permutexvar_ps(v, lut);
    } else {
      return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(255)));
    }
  }
};
#include "qgemm_simd.inc"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------- int8 staging (AVX2: every int8 kernel's CPU)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avxvnni {
// detail::StageI8Fn. The scalar staging in qgemm.cpp (and minigptq/kernels/reference.py:int8_reference) is the
// definition; this is the same arithmetic on 8 lanes: max|x| as the integer maximum of the sign-cleared bit patterns
// (exact for finite values, and >= 0x7F800000 exactly when a lane is Inf or NaN: left to the scalar code),
// x * (127 / max|x|) rounded to nearest even.
bool stage32(const float* x, const uint8_t* shuf, int8_t* dst, float* sx, int32_t* sum) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256 v[4];
  __m256i mx = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    mx = _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(v[i]), abs_mask));
  }
  __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4E));
  m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xB1));
  const int32_t bits = _mm_cvtsi128_si32(m4);
  if (bits >= 0x7F800000) return false;
  float amax;
  std::memcpy(&amax, &bits, 4);
  const __m256 inv = _mm256_set1_ps(amax >= kTinyI8 ? 127.f / amax : 0.f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i q[4], s = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 t = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[i] = _mm256_min_epi32(hi, _mm256_max_epi32(lo, _mm256_cvttps_epi32(t)));
    s = _mm256_add_epi32(s, q[i]);
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  // The packs work per 128-bit lane: bytes come out as dwords [0 2 4 6 1 3 5 7] of the row order; put them back.
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i rows = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i out = _mm256_shuffle_epi8(rows, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(shuf)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), out);
  *sx = amax / 127.f;
  *sum = _mm_cvtsi128_si32(s4);
  return true;
}
}  // namespace avxvnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------- AVX-512 VNNI (int8 activations)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")
#endif
namespace avx512vnni {
struct VI {
  using i = __m512i;
  using f = __m512;
  using m = __mmask16;
  static constexpr int L = 16, ACC = 20;  // of 32 zmm registers: 20 for accumulators, the rest for masks, quads
  static constexpr int BM = 8, BN = 2;     // batched micro-kernel (qgemm_i8b.inc): 16 accumulators
  static constexpr bool kPairs16 = false;  // vpdpbusd sums 4 products into int32: no int16 limit

  static inline m mask(int valid) { return valid >= L ? m(0xFFFF) : m((1u << valid) - 1); }
  static inline i load_w(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static inline i set1(int32_t a) { return _mm512_set1_epi32(a); }
  static inline i zero() { return _mm512_setzero_si512(); }
  static inline i and_(i a, i b) { return _mm512_and_si512(a, b); }
  template <int S> static inline i srli(i v) { return _mm512_srli_epi32(v, S); }
  template <int S> static inline i srai(i v) { return _mm512_srai_epi32(v, S); }
  static inline i dp(i acc, i u8, i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
  static inline i dot(i acc, i u8, i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
  static inline i widen(i acc) { return acc; }
  static inline i or_(i a, i b) { return _mm512_or_si512(a, b); }
  template <int S> static inline i slli(i v) { return _mm512_slli_epi32(v, S); }
  static inline void store_w(uint32_t* p, i v) { _mm512_storeu_si512(p, v); }
  static inline i add(i a, i b) { return _mm512_add_epi32(a, b); }
  static inline i load_z(const int16_t* p, m k) { return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, p)); }
  static inline f cvt(i v) { return _mm512_cvtepi32_ps(v); }
  static inline f load_f(const float* p, m k) { return _mm512_maskz_loadu_ps(k, p); }
  static inline void store_f(float* p, f v, m k) { _mm512_mask_storeu_ps(p, k, v); }
  static inline f set1f(float a) { return _mm512_set1_ps(a); }
  static inline f zerof() { return _mm512_setzero_ps(); }
  static inline f mul(f a, f b) { return _mm512_mul_ps(a, b); }
  static inline f add(f a, f b) { return _mm512_add_ps(a, b); }
  static inline f sub(f a, f b) { return _mm512_sub_ps(a, b); }
};
#include "qgemm_i8.inc"
}  // namespace avx512vnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ----------------------------------------- 256-bit int8 vector helpers (the AVX-VNNI and AVX2 int8 kernels' VI)
// Everything but the integer dot products, which is where the two instruction sets differ (dp, dot, widen, kPairs16
// in each VI below). Compiled for AVX2 (a subset of both callers' targets, so it inlines into either).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
struct VI256 {
  using i = __m256i;
  using f = __m256;
  struct m {  // lane mask and the number of valid lanes (full vectors take the plain load)
    __m256i v;
    int n;
  };
  static constexpr int L = 8, ACC = 12;  // of 16 ymm registers: 12 for accumulators
  static constexpr int BM = 6, BN = 2;    // batched micro-kernel (qgemm_i8b.inc): 12 accumulators

  static inline m mask(int valid) {
    return {_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), valid};
  }
  static inline i load_w(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline i set1(int32_t a) { return _mm256_set1_epi32(a); }
  static inline i zero() { return _mm256_setzero_si256(); }
  static inline i and_(i a, i b) { return _mm256_and_si256(a, b); }
  template <int S> static inline i srli(i v) { return _mm256_srli_epi32(v, S); }
  template <int S> static inline i srai(i v) { return _mm256_srai_epi32(v, S); }
  static inline i or_(i a, i b) { return _mm256_or_si256(a, b); }
  template <int S> static inline i slli(i v) { return _mm256_slli_epi32(v, S); }
  static inline void store_w(uint32_t* p, i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static inline i add(i a, i b) { return _mm256_add_epi32(a, b); }
  static inline i load_z(const int16_t* p, m k) {
    alignas(16) int16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, sizeof(int16_t) * (k.n < 0 ? 0 : k.n > L ? L : k.n));
    return _mm256_cvtepi16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  }
  static inline f cvt(i v) { return _mm256_cvtepi32_ps(v); }
  static inline f load_f(const float* p, m k) { return k.n == L ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, k.v); }
  static inline void store_f(float* p, f v, m k) {
    if (k.n == L) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, k.v, v);
  }
  static inline f set1f(float a) { return _mm256_set1_ps(a); }
  static inline f zerof() { return _mm256_setzero_ps(); }
  static inline f mul(f a, f b) { return _mm256_mul_ps(a, b); }
  static inline f add(f a, f b) { return _mm256_add_ps(a, b); }
  static inline f sub(f a, f b) { return _mm256_sub_ps(a, b); }
};
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------- AVX-VNNI on AVX2 (int8 activations)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#endif
namespace avxvnni {
struct VI : VI256 {
  static constexpr bool kPairs16 = false;
  static inline i dp(i acc, i u8, i s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
  static inline i dot(i acc, i u8, i s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
  static inline i widen(i acc) { return acc; }
};
#include "qgemm_i8.inc"
}  // namespace avxvnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------ AVX2 int8 (vpmaddubsw + vpmaddwd, any AVX2 CPU)
// The int8 scheme without VNNI: vpmaddubsw multiplies u8 codes by s8 activations and adds pairs into int16 lanes
// (saturating: codes are unpacked to their values, 8-bit ones split into nibbles, see qgemm_i8b.inc), vpmaddwd by
// ones then adds the pairs of int16 into int32. Same results as the VNNI kernels, bit for bit.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2i8 {
struct VI : VI256 {
  static constexpr bool kPairs16 = true;
  // decode (qgemm_i8.inc): one quad straight to int32
  static inline i dp(i acc, i u8, i s8) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)));
  }
  // batched (qgemm_i8b.inc): int16 pair sums over a chunk (<= 8 quads), widened to int32 once per chunk
  static inline i dot(i acc, i u8, i s8) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u8, s8)); }
  static inline i widen(i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
};
#include "qgemm_i8.inc"
}  // namespace avx2i8
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace minigptq::detail
