// CUDA kernels for GPTQ-packed linears: out[M, N] = x[M, K] @ W for small M (decoding), and W itself for large M
// (the caller then runs torch.matmul). Torch reference and test oracle: minigptq/pack.py:dequantize.
// Only the CUDA runtime is used (no torch); every launch goes to the caller's stream; a call is one launch, with
// no allocation, synchronisation or device query, so it can be captured in a CUDA graph.
//
// ---------------------------------------------------------------------------------------------- the layout
// Built once per layer by minigptq/kernels/cuda_layout.py:make_cuda_layout (the checkpoint is untouched):
// * Rows are sorted by group (act-order undone) and each group is padded with empty rows to `group_rows`
//   (32, 64 or a multiple of 128), K to a multiple of 128. perm[Kp] gives the checkpoint row of each padded row
//   (-1: padding, its x is 0). A 16-row tile therefore never straddles two groups.
// * Columns are cut in tiles of 16 (n-tile j), rows in k-blocks of 128 (b); chunk (j, b) is 32 lanes' words,
//   stored [j][b][c][lane][4 words] for each group of 4 words c (3-bit: 4 words, then [lane][2 words]), so a
//   warp's 128-bit load reads 512 contiguous bytes. A lane (g = lane / 4, t = lane % 4) holds, for each of the 8
//   k-tiles kt of 16 rows, the 8 codes of its mma.m16n8k16 A fragment (A = W^T tile: 16 columns x 16 rows):
//       register r = 0..3 of k-tile kt = "pair" p = 4 kt + r: column 16 j + g + 8 (r & 1),
//                                                      rows 128 b + 16 kt + 2 t + 8 (r >> 1) + {0, 1}
//   The two codes of a pair sit at bits [pos, pos + bits) (first row) and [16 + pos, ...) (second row) of one
//   word (slot(): word and pos of each pair):
//       4-bit: word p / 4, pos 4 (p % 4)            8 words per lane per k-block (32 rows x 2 columns... 64 codes)
//       2-bit: word p / 8, pos 2 (p % 8)            4 words
//       8-bit: word p / 2, pos 8 (p % 2)           16 words
//       3-bit: pairs 16 q + i of 4 k-tiles in words 3 q .. 3 q + 2: i = 0..14 in word 3 q + i / 5 at pos
//              0, 3, 6, 10, 13 (i % 5); pair 15 is spread over bit 9 (and 25) of the 3 words: code bit n in
//              word 3 q + n. 6 words per lane per k-block: exactly 3 bits per weight.
// * Dequantization, two weights per instruction: a 16-bit float with exponent 2^10 (fp16, 0x6400) or 2^7 (bf16,
//   0x4300) and a code c << e in its mantissa is 2^10 + c 2^e. So for a pair at pos (shifted right by s first
//   when pos - s + bits would not fit the mantissa: shift()),
//       v   = ((w >> s) & (mask << e, twice)) | (magic, twice)        one LOP3 (+ one SHF shared by several pairs)
//       q-z = v * 2^-e - (magic 2^-e + z)                             one HFMA2, exact (small integers)
//   The 3-bit spare pair takes 3 shifts and 3 LOP3. 8-bit codes do not fit bf16's 7-bit mantissa: those go
//   through fp32 (PRMT builds 2^23 + c, FADD, F2FP packs two), the "simple path".
// * Per group and tile: scales as 16-bit pairs (column g, column g + 8) [G][ntiles][8] (fp16, or bf16 when the
//   checkpoint's scales are bf16 values fp16 cannot hold), zero points packed: z_g | z_{g+8} << 4 in a byte
//   (8-bit: two bytes). 2.5 bytes per group and column: 0.0195 bytes per weight at group size 128.
//
// ---------------------------------------------------------------------------------------------- the kernel
// qgemm_mma: a block (4 warps) owns NT n-tiles (32 columns; 16 for 8-bit), up to 16 rows of x and a slice of at
// most 8 k-blocks. It first gathers its x slice (through perm, zero padded) into shared memory in mma B-fragment
// order. Each warp takes a contiguous quarter of the slice's k-blocks and streams them with one k-block of
// register prefetch (128-bit loads issued before the previous k-block's math). Per k-tile: dequantize 8 codes into
// 4 half2 registers, one mma per 8 rows of x, fp32 accumulation (C fragment = 16 columns x 8 rows of x). Scales
// are applied in fp32 once per group: acc += group_sum * scale. The 4 warps' partial sums are added in shared
// memory in a fixed order; with several K slices, each block writes its partial to the workspace and the last
// block to arrive at a column tile (a counter per tile, reset by that block) adds the slices in slice order:
// bitwise-identical results whatever the scheduling. qgemm_plain (fp32 x) decodes one code at a time with
// code_at(): small and slow; dequant_kernel (prefill) decodes a lane's chunk from registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "qgemm.h"

namespace minigptq::cuda {
namespace {

constexpr int kThreads = 128, kWarps = 4;  // threads per block
constexpr int kKB = 128;                   // rows of a k-block
constexpr int kMaxSliceKB = 8;             // k-blocks of one block's K slice at most (its x staging buffer)
constexpr int kPlainCols = 32;             // columns of a qgemm_plain block

template <int BITS>
struct Bits {
  static constexpr int words = BITS == 3 ? 6 : 2 * BITS;  // 32-bit words per lane per k-block (and n-tile)
  static constexpr int nt = BITS == 8 ? 1 : 2;            // n-tiles per block
  static constexpr uint32_t mask = (1u << BITS) - 1;
};

struct Slot {
  int word, pos;  // pos < 0: the 3-bit spare pair
};
__host__ __device__ constexpr Slot slot(int bits, int p) {
  if (bits == 3) {
    const int q = p >> 4, i = p & 15;
    return i == 15 ? Slot{3 * q, -1} : Slot{3 * q + i / 5, (i % 5) * 3 + (i % 5 >= 3 ? 1 : 0)};
  }
  const int per = 16 / bits;  // pairs per word
  return Slot{p / per, (p % per) * bits};
}

struct Args {
  const void* x;
  void* out;
  int M, K, N;                  // x [M, K], out [M, N]
  const uint32_t* qweight;      // [ntiles][kblocks][32 * words]
  const uint32_t* scales;       // [G][ntiles][8] 16-bit pairs
  const uint8_t* zeros;         // [G][ntiles][8][1 or 2]
  const int* perm;              // [kblocks * 128]
  int ntiles, kblocks, group_rows, kb_per_group, scale_bf16;
  int kb_per_slice, splits;     // K slices (gridDim.y == splits)
  float* ws;                    // [mblocks][splits][col blocks][block partial] when splits > 1
  int* counters;                // [mblocks][col blocks], zero between calls
};

// ------------------------------------------------------------------------------------------- number types
template <typename T>
struct Num;
template <>
struct Num<__half> {
  using T2 = __half2;
  static constexpr int mant = 10;
  static constexpr uint32_t magic = 0x6400;  // 1024
  static constexpr float magicf = 1024.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ T2 lo(T2 v) { return __low2half2(v); }
  static __device__ __forceinline__ T2 hi(T2 v) { return __high2half2(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr int mant = 7;
  static constexpr uint32_t magic = 0x4300;  // 128
  static constexpr float magicf = 128.f;
  static __device__ __forceinline__ T2 splat(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ T2 lo(T2 v) { return __low2bfloat162(v); }
  static __device__ __forceinline__ T2 hi(T2 v) { return __high2bfloat162(v); }
};

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  memcpy(&r, &v, sizeof(To));
  return r;
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// D += A B for one m16n8k16 tile (fp32 accumulators); a: 4 registers of T pairs, b: 2.
#ifndef MINIGPTQ_EMU
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#else
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma_m16n8k16<T>(d, a, b0, b1);
}
#endif

// (a & MASK) | c in one LOP3 (written as C, ptxas splits it into an AND and an OR with two immediates).
template <uint32_t MASK>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
#ifndef MINIGPTQ_EMU
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "n"(MASK), "r"(c));
  return r;
#else
  return (a & MASK) | c;
#endif
}

// Two scales (columns g, g + 8) of one 16-bit pair word, as fp32.
__device__ __forceinline__ void scales_f32(uint32_t w, int bf16, float (&s)[2]) {
  if (bf16) {
    s[0] = __uint_as_float(w << 16), s[1] = __uint_as_float(w & 0xFFFF0000u);
  } else {
    s[0] = __half2float(bit_cast<__half>(uint16_t(w))), s[1] = __half2float(bit_cast<__half>(uint16_t(w >> 16)));
  }
}

// ------------------------------------------------------------------------------------ fast dequantization
// Deq<T, BITS>: the zero point of the current group for one lane's two columns, and pair<P>(): the 2 values
// q - z of pair P of a k-block (T pair bit pattern, exact).
template <typename T, int BITS>
struct Deq {
  using N = Num<T>;
  using T2 = typename N::T2;
  static constexpr bool f32path = BITS > N::mant - 1;  // codes do not fit the mantissa: via fp32
  static constexpr uint32_t magic2 = N::magic * 0x10001u;  // (magic, magic)
  // Right shift applied before masking the pair at `pos`, shared by neighbouring pairs (fewer SHF).
  __host__ __device__ static constexpr int shift(int pos) {
    if (N::mant == 10) return BITS <= 3 ? (pos < 10 ? 0 : 10) : (pos < 8 ? 0 : 8);
    if (BITS == 2) return pos / 6 * 6;
    if (BITS == 3) return pos < 6 ? 0 : pos < 10 ? 6 : 10;
    return pos;  // 4-bit bf16
  }
  T2 bias[N::mant];  // [e]: -(magic 2^-e + z) for (column g, column g + 8)
  float zf[2];       // f32path: -(2^23 + z)

  __device__ __forceinline__ void setup(uint32_t zb) {
    if constexpr (f32path) {
      zf[0] = -(8388608.f + float(zb & 0xFFu)), zf[1] = -(8388608.f + float(zb >> 8));
    } else {
      const uint32_t zz = (BITS == 8 ? (zb & 0xFFu) | ((zb & 0xFF00u) << 8) : (zb & 0xFu) | ((zb & 0xF0u) << 12));
      const T2 mz = bit_cast<T2>(zz | magic2);  // (magic + z_g, magic + z_{g+8})
#pragma unroll
      for (int e = 0; e + BITS <= N::mant; ++e)
        bias[e] = __hfma2(mz, N::splat(-1.f), N::splat(N::magicf - N::magicf / float(1 << e)));
    }
  }

  template <int P>
  __device__ __forceinline__ uint32_t pair(const uint32_t* w) const {
    constexpr Slot s = slot(BITS, P);
    constexpr int par = P & 1;  // column g or g + 8
    if constexpr (f32path) {
      constexpr uint32_t sel = 0x7440u | (s.pos / 8);  // bytes: code, 0, 0, 0x4B -> 2^23 + code
      const float lo = __uint_as_float(__byte_perm(w[s.word], 0x4B000000u, sel)) + zf[par];
      const float hi = __uint_as_float(__byte_perm(w[s.word], 0x4B000000u, sel + 2)) + zf[par];
      return bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi));
    } else if constexpr (s.pos < 0) {  // 3-bit spare pair: code bit n at bit 9 / 25 of word s.word + n
      const uint32_t v = and_or<0x40004u>(w[s.word + 2] >> 7,
                                          and_or<0x20002u>(w[s.word + 1] >> 8, and_or<0x10001u>(w[s.word] >> 9, magic2)));
      return bit_cast<uint32_t>(__hfma2(bit_cast<T2>(v), N::splat(1.f), par ? N::hi(bias[0]) : N::lo(bias[0])));
    } else {
      constexpr int sh = shift(s.pos), e = s.pos - sh;
      const uint32_t v = and_or<(Bits<BITS>::mask << e) * 0x10001u>(w[s.word] >> sh, magic2);
      return bit_cast<uint32_t>(
          __hfma2(bit_cast<T2>(v), N::splat(1.f / float(1 << e)), par ? N::hi(bias[e]) : N::lo(bias[e])));
    }
  }
};

template <int I, int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>());
    static_for<I + 1, N>(f);
  }
}

// ----------------------------------------------------------------------- slow decoding (plain, dequant)
// Code of padded row k, column n of the layout.
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t* qweight, int kblocks, int k, int n) {
  constexpr int W = Bits<BITS>::words;
  const int c = n & 15, kin = k & 15;
  const int lane = (c & 7) * 4 + ((kin & 7) >> 1), hi = kin & 1;
  const int p = ((k & 127) >> 4) * 4 + (c >> 3) + 2 * (kin >> 3);
  const uint32_t* base = qweight + (int64_t(n >> 4) * kblocks + (k >> 7)) * (32 * W);
  auto word = [&](int wi) { return __ldg(base + (wi >> 2) * 128 + lane * min(4, W - (wi & ~3)) + (wi & 3)); };
  const Slot s = slot(BITS, p);
  if (s.pos < 0) {
    uint32_t q = 0;
    for (int b = 0; b < 3; ++b) q |= ((word(s.word + b) >> (9 + 16 * hi)) & 1u) << b;
    return q;
  }
  return (word(s.word) >> (s.pos + 16 * hi)) & Bits<BITS>::mask;
}

// scale * (q - z) of padded row k, column n, in fp32 (exact: the reference's value).
template <int BITS>
__device__ __forceinline__ float weight_at(const Args& a, int k, int n) {
  const int gi = k / a.group_rows, c = n & 15;
  const int64_t mi = (int64_t(gi) * a.ntiles + (n >> 4)) * 8 + (c & 7);
  float s[2];
  scales_f32(__ldg(a.scales + mi), a.scale_bf16, s);
  const uint32_t z = BITS == 8 ? __ldg(a.zeros + mi * 2 + (c >> 3)) : (__ldg(a.zeros + mi) >> (4 * (c >> 3))) & 15u;
  return s[c >> 3] * float(int(code_at<BITS>(a.qweight, a.kblocks, k, n)) - int(z));
}

// ------------------------------------------------------------------------------ block partial -> output
// red[warp][m * COLS + n]: each warp's partial sums for the block's ROWS rows of x and COLS columns. They are added
// in warp order; with K slices, through the workspace in slice order by the last block to arrive (see top).
template <typename TOut, int COLS, int ROWS>
__device__ void finish(const float (*red)[COLS * ROWS], const Args& a, int col0, int m0) {
  constexpr int E = COLS * ROWS, PER = (E + kThreads - 1) / kThreads;
  __shared__ int s_last;
  float p[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = threadIdx.x + i * kThreads;
    p[i] = e < E ? ((red[0][e] + red[1][e]) + red[2][e]) + red[3][e] : 0.f;
  }
  TOut* out = static_cast<TOut*>(a.out);
  auto store = [&](int e, float v) {
    const int m = m0 + e / COLS, n = col0 + e % COLS;
    if (m < a.M && n < a.N) out[int64_t(m) * a.N + n] = from_float<TOut>(v);
  };
  if (a.splits == 1) {
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (threadIdx.x + i * kThreads < E) store(threadIdx.x + i * kThreads, p[i]);
    return;
  }
  const int64_t tile = int64_t(blockIdx.z) * gridDim.x + blockIdx.x;  // (m block, column block)
  auto part = [&](int slice) { return a.ws + ((int64_t(blockIdx.z) * a.splits + slice) * gridDim.x + blockIdx.x) * E; };
  float* mine = part(blockIdx.y);
#pragma unroll
  for (int i = 0; i < PER; ++i)
    if (threadIdx.x + i * kThreads < E) mine[threadIdx.x + i * kThreads] = p[i];
  __threadfence();  // this block's partial is visible device-wide before its ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) {
    const int ticket = atomicAdd(a.counters + tile, 1);
    s_last = ticket == a.splits - 1;
    if (s_last) atomicExch(a.counters + tile, 0);  // every slice has arrived: ready for the next call
  }
  __syncthreads();
  if (!s_last) return;  // uniform: s_last is shared
  __threadfence();      // the other blocks' partials are read after their tickets
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e >= E) continue;
    float v = 0.f;
    for (int y = 0; y < a.splits; ++y) v += __ldcg(part(y) + e);  // slice order: deterministic
    store(e, v);
  }
}

// ------------------------------------------------------------------------------------------- the kernels
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return uint32_t(bit_cast<uint16_t>(lo)) | (uint32_t(bit_cast<uint16_t>(hi)) << 16);
}

// Stage of the pipeline: one k-block of NT n-tiles (codes, and the scale/zero words of its GPB groups).
template <int BITS, int GPB>
struct Stage {
  static constexpr int NT = Bits<BITS>::nt, W = Bits<BITS>::words;
  uint32_t w[NT][W];
  uint32_t s[NT][GPB], z[NT][GPB];
};

// Loads k-block b into st. wp[jj]: this lane's words of k-block 0 of n-tile jj; mp[jj]: this lane's scale/zero
// index of group 0 in tile jj; gi: the group of the k-block's first row.
template <int BITS, int TPG>
__device__ __forceinline__ void load_stage(Stage<BITS, 8 / TPG>& st, const Args& a, const uint32_t* const (&wp)[Bits<BITS>::nt],
                                           const int (&mp)[Bits<BITS>::nt], int lane, int b, int gi) {
  constexpr int NT = Bits<BITS>::nt, W = Bits<BITS>::words, GPB = 8 / TPG;
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
    const uint32_t* p = wp[jj] + b * (32 * W);
#pragma unroll
    for (int c = 0; c < W / 4; ++c) {  // 128-bit streaming loads: 512 contiguous bytes per warp
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p + c * 128) + lane);
      st.w[jj][4 * c] = v.x, st.w[jj][4 * c + 1] = v.y, st.w[jj][4 * c + 2] = v.z, st.w[jj][4 * c + 3] = v.w;
    }
    if constexpr (W % 4 != 0) {  // 3-bit: then [lane][2 words]
      const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p + (W / 4) * 128) + lane);
      st.w[jj][W - 2] = v.x, st.w[jj][W - 1] = v.y;
    }
#pragma unroll
    for (int i = 0; i < GPB; ++i) {
      const int mi = mp[jj] + (gi + i) * a.ntiles * 8;
      st.s[jj][i] = __ldg(a.scales + mi);
      st.z[jj][i] = BITS == 8 ? __ldg(reinterpret_cast<const uint16_t*>(a.zeros) + mi) : __ldg(a.zeros + mi);
    }
  }
}

// BITS: 2, 3, 4, 8; T: __half / __nv_bfloat16; MT: 8-row tiles of x (1: M <= 8, 2: up to 16);
// TPG: k-tiles (16 rows) per group: 2, 4, or 8 (group_rows a multiple of 128).
template <int BITS, typename T, int MT, int TPG>
__global__ void __launch_bounds__(kThreads) qgemm_mma(const Args a) {
  constexpr int NT = Bits<BITS>::nt, GPB = 8 / TPG, COLS = NT * 16, ROWS = MT * 8;
  using D = Deq<T, BITS>;
  __shared__ uint4 xs[kMaxSliceKB * 4 * MT * 32];  // [k-tile pair][mt][lane]: B fragments of 2 k-tiles
  __shared__ float red[kWarps][COLS * ROWS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kb0 = blockIdx.y * a.kb_per_slice, kb1 = min(kb0 + a.kb_per_slice, a.kblocks);
  const int m0 = blockIdx.z * ROWS, j0 = blockIdx.x * NT;

  // x slice -> B fragments: b0b1 = x[m][k0 + 2t, +1], b2b3 = x[m][k0 + 2t + 8, +9], m = m0 + 8 mt + g
  const T* x = static_cast<const T*>(a.x);
  for (int i = threadIdx.x; i < (kb1 - kb0) * 4 * MT * 32; i += kThreads) {
    const int l = i & 31, mt = (i >> 5) % MT, pr = (i >> 5) / MT;
    const int m = m0 + mt * 8 + (l >> 2), k0 = kb0 * kKB + pr * 32 + 2 * (l & 3);
    uint32_t v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k = k0 + (q >> 1) * 16 + (q & 1) * 8;
      T e[2] = {from_float<T>(0.f), from_float<T>(0.f)};
      if (m < a.M) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int src = __ldg(a.perm + k + h);
          if (src >= 0) e[h] = x[int64_t(m) * a.K + src];
        }
      }
      v[q] = pack2(e[0], e[1]);
    }
    xs[i] = make_uint4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();

  // This warp's k-blocks [wb0, wb1): a contiguous quarter of the slice.
  const int nkb = kb1 - kb0, wb0 = kb0 + nkb * warp / kWarps, wb1 = kb0 + nkb * (warp + 1) / kWarps;
  float acc[NT][MT][4] = {}, cg[NT][MT][4] = {};  // total, and the current group's sum (scale not applied)
  float sc[NT][2] = {};                           // the current group's scales (columns g, g + 8)
  D dq[NT];
  auto flush = [&] {
#pragma unroll
    for (int jj = 0; jj < NT; ++jj)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[jj][mt][c] = fmaf(cg[jj][mt][c], sc[jj][c >> 1], acc[jj][mt][c]), cg[jj][mt][c] = 0.f;
  };
  auto compute = [&](const Stage<BITS, GPB>& st, int b, bool group_start) {
    const uint4* xb = xs + (b - kb0) * 4 * MT * 32 + lane;
    static_for<0, 8>([&](auto tc) {
      constexpr int t = decltype(tc)::value;
      if constexpr (t % TPG == 0) {  // a group starts at this k-tile (TPG 8: maybe, if the k-block starts one)
        if (TPG < 8 || group_start) {
          flush();
#pragma unroll
          for (int jj = 0; jj < NT; ++jj) {
            dq[jj].setup(st.z[jj][t / TPG]);
            scales_f32(st.s[jj][t / TPG], a.scale_bf16, sc[jj]);
          }
        }
      }
      uint32_t bx[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 v = xb[((t >> 1) * MT + mt) * 32];
        bx[mt][0] = t & 1 ? v.z : v.x, bx[mt][1] = t & 1 ? v.w : v.y;
      }
#pragma unroll
      for (int jj = 0; jj < NT; ++jj) {
        const uint32_t af[4] = {dq[jj].template pair<4 * t>(st.w[jj]), dq[jj].template pair<4 * t + 1>(st.w[jj]),
                                dq[jj].template pair<4 * t + 2>(st.w[jj]), dq[jj].template pair<4 * t + 3>(st.w[jj])};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma<T>(cg[jj][mt], af, bx[mt][0], bx[mt][1]);
      }
    });
  };

  // Per n-tile: this lane's words of k-block 0 and its scale/zero index in group 0. A tile past the last one
  // (odd tile count) re-reads the last tile: its columns are never stored.
  const uint32_t* wp[NT];
  int mp[NT];
#pragma unroll
  for (int jj = 0; jj < NT; ++jj) {
    const int j = min(j0 + jj, a.ntiles - 1);
    wp[jj] = a.qweight + int64_t(j) * a.kblocks * (32 * Bits<BITS>::words);
    mp[jj] = j * 8 + (lane >> 2);
  }
  // Group of a k-block's first row, kept incrementally (no division in the loop): TPG 8 (group_rows = 128 kbpg):
  // group b / kbpg, a group starts where b % kbpg == 0; TPG < 8: GPB groups per k-block.
  const int kbpg = a.kb_per_group;
  int lg = TPG == 8 ? wb0 / kbpg : wb0 * GPB, lr = TPG == 8 ? wb0 % kbpg : 0;  // the next load's group, offset
  int cr = lr;                                                                   // the next compute's offset
  auto next = [&](int& g, int& r) {  // one k-block further
    if constexpr (TPG == 8) {
      if (++r == kbpg) r = 0, ++g;
    } else {
      g += GPB;
    }
  };
  auto next_c = [&] {
    if constexpr (TPG == 8)
      if (++cr == kbpg) cr = 0;
  };

  // Hot loop: two stages in registers, the next k-block's loads in flight during this one's math.
  Stage<BITS, GPB> s0, s1;
  if (wb0 < wb1) load_stage<BITS, TPG>(s0, a, wp, mp, lane, wb0, lg), next(lg, lr);
  for (int b = wb0; b < wb1; b += 2) {
    if (b + 1 < wb1) load_stage<BITS, TPG>(s1, a, wp, mp, lane, b + 1, lg), next(lg, lr);
    compute(s0, b, b == wb0 || cr == 0);
    next_c();
    if (b + 1 >= wb1) break;
    if (b + 2 < wb1) load_stage<BITS, TPG>(s0, a, wp, mp, lane, b + 2, lg), next(lg, lr);
    compute(s1, b + 1, cr == 0);
    next_c();
  }
  flush();

  // C fragment: c0, c1 -> column g, rows 2t, 2t + 1 of x; c2, c3 -> column g + 8
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int jj = 0; jj < NT; ++jj)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        red[warp][(mt * 8 + 2 * t + (c & 1)) * COLS + jj * 16 + g + 8 * (c >> 1)] = acc[jj][mt][c];
  __syncthreads();
  finish<T, COLS, ROWS>(red, a, j0 * 16, m0);
}

// fp32 x: one column per lane, the 4 warps split the slice; decodes one code at a time.
template <int BITS>
__global__ void __launch_bounds__(kThreads) qgemm_plain(const Args a) {
  constexpr int ROWS = 16;
  __shared__ float red[kWarps][kPlainCols * ROWS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kb0 = blockIdx.y * a.kb_per_slice, kb1 = min(kb0 + a.kb_per_slice, a.kblocks);
  const int nkb = kb1 - kb0, r0 = (kb0 + nkb * warp / kWarps) * kKB, r1 = (kb0 + nkb * (warp + 1) / kWarps) * kKB;
  const int m0 = blockIdx.z * ROWS, n = blockIdx.x * kPlainCols + lane;
  const float* x = static_cast<const float*>(a.x);
  float acc[ROWS] = {};
  if (n < a.N) {
    for (int k = r0; k < r1; ++k) {
      const int src = __ldg(a.perm + k);
      if (src < 0) continue;
      const float w = weight_at<BITS>(a, k, n);
#pragma unroll
      for (int m = 0; m < ROWS; ++m)
        if (m0 + m < a.M) acc[m] = fmaf(__ldg(x + int64_t(m0 + m) * a.K + src), w, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m) red[warp][m * kPlainCols + lane] = acc[m];
  __syncthreads();
  finish<float, kPlainCols, ROWS>(red, a, blockIdx.x * kPlainCols, m0);
}

// out[perm[k], n] = scale * (q - z) for every padded row k that is not padding: a thread per lane of a chunk
// (n-tile, k-block) decodes its 64 codes from registers.
template <int BITS, typename TOut>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const Args a) {
  constexpr int W = Bits<BITS>::words;
  const int64_t id = blockIdx.x * int64_t(kThreads) + threadIdx.x, chunk = id >> 5;
  if (chunk >= int64_t(a.ntiles) * a.kblocks) return;
  const int lane = int(id & 31), j = int(chunk / a.kblocks), b = int(chunk % a.kblocks), g = lane >> 2, t = lane & 3;
  const uint32_t* p = a.qweight + chunk * (32 * W);
  uint32_t w[W];
#pragma unroll
  for (int i = 0; i < W; ++i) w[i] = __ldg(p + (i >> 2) * 128 + lane * min(4, W - (i & ~3)) + (i & 3));
  TOut* out = static_cast<TOut*>(a.out);
  static_for<0, 32>([&](auto pc) {
    constexpr int P = decltype(pc)::value, kt = P >> 2, r = P & 3;
    constexpr Slot s = slot(BITS, P);
    const int row = b * kKB + kt * 16 + 2 * t + 8 * (r >> 1), col = j * 16 + g + 8 * (r & 1);
    if (col >= a.N) return;
    const int64_t mi = (int64_t(row / a.group_rows) * a.ntiles + j) * 8 + g;
    float sc[2];
    scales_f32(__ldg(a.scales + mi), a.scale_bf16, sc);
    const int z = BITS == 8 ? __ldg(a.zeros + mi * 2 + (r & 1)) : (__ldg(a.zeros + mi) >> (4 * (r & 1))) & 15;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t q;
      if constexpr (s.pos < 0)
        q = ((w[s.word] >> (9 + 16 * h)) & 1u) | (((w[s.word + 1] >> (9 + 16 * h)) & 1u) << 1) |
            (((w[s.word + 2] >> (9 + 16 * h)) & 1u) << 2);
      else
        q = (w[s.word] >> (s.pos + 16 * h)) & Bits<BITS>::mask;
      const int dst = __ldg(a.perm + row + h);
      if (dst >= 0) out[int64_t(dst) * a.N + col] = from_float<TOut>(sc[r & 1] * float(int(q) - z));
    }
  });
}

// ------------------------------------------------------------------------------------------------ launchers
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("minigptq CUDA ") + what + ": " + cudaGetErrorString(e));
}

void check_weight(const CudaWeight& w) {
  const bool ok_bits = w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 8;
  const bool ok = ok_bits && w.K > 0 && w.N > 0 && w.Kp >= w.K && w.Kp % kKB == 0 && w.G > 0 &&
                  w.G * w.group_rows == w.Kp && (w.group_rows == 32 || w.group_rows == 64 || w.group_rows % kKB == 0) &&
                  w.Kp < (int64_t(1) << 31) && w.N < (int64_t(1) << 31) && w.K < (int64_t(1) << 31);
  if (!ok)
    throw std::invalid_argument("bad CUDA layout: bits=" + std::to_string(w.bits) + " K=" + std::to_string(w.K) +
                                " N=" + std::to_string(w.N) + " Kp=" + std::to_string(w.Kp) + " G=" +
                                std::to_string(w.G) + " group_rows=" + std::to_string(w.group_rows) +
                                " (valid: bits 2/3/4/8, Kp a multiple of 128 >= K, G * group_rows = Kp, group_rows "
                                "32, 64 or a multiple of 128)");
}

Args make_args(const CudaWeight& w, const void* x, void* out, int64_t M) {
  Args a{};
  a.x = x, a.out = out, a.M = int(M), a.K = int(w.K), a.N = int(w.N);
  a.qweight = w.qweight, a.scales = w.scales, a.zeros = w.zeros, a.perm = w.perm;
  a.ntiles = int((w.N + 15) / 16), a.kblocks = int(w.Kp / kKB), a.group_rows = int(w.group_rows);
  a.kb_per_group = std::max(1, int(w.group_rows / kKB)), a.scale_bf16 = w.scale_bf16;
  a.kb_per_slice = a.kblocks, a.splits = 1;
  return a;
}

// Grid of one qgemm call: column blocks x K slices x row blocks, and the workspace it needs.
struct Plan {
  dim3 grid;
  int kb_per_slice, splits, rows;
  int64_t ws_floats, counters;
};

Plan plan(const CudaWeight& w, int64_t M, DType dtype, int sms) {
  const int kblocks = int(w.Kp / kKB), ntiles = int((w.N + 15) / 16);
  const bool plain = dtype == DType::F32;
  const int cols = plain ? kPlainCols : 16 * (w.bits == 8 ? 1 : 2);
  const int rows = plain || M > 8 ? 16 : 8;
  const int col_blocks = (ntiles * 16 + cols - 1) / cols;
  const int64_t m_blocks = (M + rows - 1) / rows;
  if (m_blocks > 65535) throw std::invalid_argument("M=" + std::to_string(M) + " is too large for the fused kernel");
  // K slices: at most kMaxSliceKB k-blocks each; enough blocks for ~4 per SM; equal slices.
  const int64_t have = int64_t(col_blocks) * m_blocks;
  const int min_split = (kblocks + kMaxSliceKB - 1) / kMaxSliceKB;
  const int want = int(std::min<int64_t>(kblocks, (4 * int64_t(std::max(sms, 0)) + have - 1) / have));  // sms 0: no more
  const int split0 = std::max(min_split, want);
  const int per = (kblocks + split0 - 1) / split0, splits = (kblocks + per - 1) / per;
  Plan p{dim3(unsigned(col_blocks), unsigned(splits), unsigned(m_blocks)), per, splits, rows, 0, 0};
  if (splits > 1) p.ws_floats = int64_t(splits) * have * cols * rows, p.counters = have;
  return p;
}

template <int BITS, typename T, int MT>
void launch_mma(const Args& a, dim3 grid, int group_rows, cudaStream_t stream) {
  if (group_rows == 32) qgemm_mma<BITS, T, MT, 2><<<grid, kThreads, 0, stream>>>(a);
  else if (group_rows == 64) qgemm_mma<BITS, T, MT, 4><<<grid, kThreads, 0, stream>>>(a);
  else qgemm_mma<BITS, T, MT, 8><<<grid, kThreads, 0, stream>>>(a);
}

template <int BITS>
void launch_bits(const Args& a, const Plan& p, DType dtype, int group_rows, cudaStream_t stream) {
  if (dtype == DType::F32) qgemm_plain<BITS><<<p.grid, kThreads, 0, stream>>>(a);
  else if (dtype == DType::F16 && p.rows == 8) launch_mma<BITS, __half, 1>(a, p.grid, group_rows, stream);
  else if (dtype == DType::F16) launch_mma<BITS, __half, 2>(a, p.grid, group_rows, stream);
  else if (p.rows == 8) launch_mma<BITS, __nv_bfloat16, 1>(a, p.grid, group_rows, stream);
  else launch_mma<BITS, __nv_bfloat16, 2>(a, p.grid, group_rows, stream);
}

template <int BITS>
void launch_dequant_bits(const Args& a, DType dtype, cudaStream_t stream) {
  const int64_t threads = int64_t(a.kblocks) * a.ntiles * 32;  // one per lane of a chunk
  const unsigned blocks = unsigned((threads + kThreads - 1) / kThreads);
  if (dtype == DType::F32) dequant_kernel<BITS, float><<<blocks, kThreads, 0, stream>>>(a);
  else if (dtype == DType::F16) dequant_kernel<BITS, __half><<<blocks, kThreads, 0, stream>>>(a);
  else dequant_kernel<BITS, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(a);
}

void check_dtype(DType dtype) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw std::invalid_argument("dtype code " + std::to_string(int(dtype)) + " is not 0, 1 or 2");
}

}  // namespace

std::pair<int64_t, int64_t> qgemm_workspace(const CudaWeight& w, int64_t M, DType dtype, int sms) {
  check_weight(w);
  check_dtype(dtype);
  if (M <= 0) throw std::invalid_argument("M=" + std::to_string(M) + " must be positive");
  const Plan p = plan(w, M, dtype, sms);
  return {p.ws_floats, p.counters};
}

void qgemm(const CudaWeight& w, const void* x, DType dtype, int64_t M, void* out, const Workspace& ws, int sms,
           void* stream) {
  check_weight(w);
  check_dtype(dtype);
  if (M <= 0) throw std::invalid_argument("M=" + std::to_string(M) + " must be positive");
  const Plan p = plan(w, M, dtype, sms);
  if (p.ws_floats > ws.floats || p.counters > ws.counters)
    throw std::invalid_argument("workspace too small: " + std::to_string(p.ws_floats) + " floats and " +
                                std::to_string(p.counters) + " counters needed (qgemm_workspace)");
  Args a = make_args(w, x, out, M);
  a.kb_per_slice = p.kb_per_slice, a.splits = p.splits, a.ws = ws.ws, a.counters = ws.counter_ptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (w.bits) {
    case 2: launch_bits<2>(a, p, dtype, int(w.group_rows), s); break;
    case 3: launch_bits<3>(a, p, dtype, int(w.group_rows), s); break;
    case 4: launch_bits<4>(a, p, dtype, int(w.group_rows), s); break;
    default: launch_bits<8>(a, p, dtype, int(w.group_rows), s); break;
  }
  check(cudaGetLastError(), "qgemm launch");
}

void dequantize(const CudaWeight& w, void* out, DType dtype, void* stream) {
  check_weight(w);
  check_dtype(dtype);
  const Args a = make_args(w, nullptr, out, 0);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (w.bits) {
    case 2: launch_dequant_bits<2>(a, dtype, s); break;
    case 3: launch_dequant_bits<3>(a, dtype, s); break;
    case 4: launch_dequant_bits<4>(a, dtype, s); break;
    default: launch_dequant_bits<8>(a, dtype, s); break;
  }
  check(cudaGetLastError(), "dequant launch");
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  return count > 0 ? "" : "no CUDA device";
}

}  // namespace minigptq::cuda
