// CUDA kernels for GPTQ-packed linears: out[M, N] = x[M, K] @ W for M <= 64 rows of x (decoding, small batches),
// and W itself for larger M (the caller then runs torch.matmul). Torch reference and test oracle:
// minigptq/pack.py:dequantize. Only the CUDA runtime is used (no torch); every launch goes to the caller's stream;
// a call is one or two launches (gather pass, fused kernel) with no allocation, synchronisation or device query
// after the first call of a kernel variant, so it can be captured in a CUDA graph.
//
// ---------------------------------------------------------------------------------------------- the layout
// Built once per layer by minigptq/kernels/cuda_layout.py:make_cuda_layout (the checkpoint is untouched):
// * Rows are sorted by group (act-order undone: the weight rows are permuted at load time) and each group is padded
//   with empty rows to `group_rows` (32, 64 or a multiple of 128), K to a multiple of 128. perm[Kp] gives the
//   checkpoint row of each padded row (-1: padding, its x is 0). A 16-row tile therefore never straddles two
//   groups. When perm is the identity (perm[k] = k for k < K, -1 after: no act-order, groups of 32/64/128 n rows),
//   the layout says so (perm_identity) and x is streamed as it is; otherwise one gather pass per call writes x in
//   padded row order (cheap: M x Kp 16-bit values) and the kernel streams that.
// * Columns are cut in tiles of 16 (n-tile j), rows in k-blocks of 128 (b); chunk (j, b) is 32 lanes' words,
//   stored [j][b][c][lane][4 words] for each group of 4 words c (3-bit: 4 words, then [lane][2 words]), so a
//   chunk is one contiguous run of 32 * words words (1 KB at 4-bit) copied verbatim into shared memory, and a
//   warp's 128-bit shared loads read 512 contiguous bytes. A lane (g = lane / 4, t = lane % 4) holds, for each of
//   the 8 k-tiles kt of 16 rows, the 8 codes of its mma.m16n8k16 A fragment (A = W^T tile: 16 columns x 16 rows):
//       register r = 0..3 of k-tile kt = "pair" p = 4 kt + r: column 16 j + g + 8 (r & 1),
//                                                      rows 128 b + 16 kt + 2 t + 8 (r >> 1) + {0, 1}
//   The two codes of a pair sit at bits [pos, pos + bits) (first row) and [16 + pos, ...) (second row) of one
//   word (slot(): word and pos of each pair):
//       4-bit: word p / 4, pos 4 (p % 4)            8 words per lane per k-block
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
// qgemm_kernel: the work is a list of "units" (column block c, k-block b), k-blocks of one column block in a
// row, c-major. A column block is NTB = WARPS * NTW n-tiles (256 columns at M <= 16, 128 above and for 8-bit); each warp
// owns NTW n-tiles of it for every k-block, so there is no reduction between warps. The grid is about one wave
// (SMs x resident blocks), and block i takes a contiguous stripe of units (stripe(): Marlin's "striped"
// partition): every block streams the same amount of weight (to one unit), and a stripe may cross column blocks.
// * Pipeline: STAGES (4) shared-memory stages, each one unit: the NTB chunks of codes, the scales and zero points
//   of its groups, and the unit's x slice (R rows x 128 values, rows padded to 136 values: conflict-free B
//   fragment loads). Every thread issues 16-byte cp.async copies (weights with an L2 evict-first hint), one
//   commit group per unit, STAGES - 1 units in flight; unit i is read after cp.async.wait_group(STAGES - 2) and a
//   barrier, and the barrier also frees the stage that unit i + STAGES - 1 is then loaded into. x rows >= R are
//   never copied nor read: their B fragments read row R - 1 again, which only feeds C rows that are not stored.
// * Math per k-tile: dequantize 8 codes into 4 half2 registers, one mma per 8 rows of x, fp32 accumulation
//   (C fragment = 16 columns x 8 rows of x). Scales are applied in fp32 once per group: acc += group_sum * scale.
// * End of a stripe's piece of a column block ("segment"): the warps write their C fragments to a shared tile
//   [R][columns]; a segment covering all of K is stored from there (coalesced, 4 columns per store, rows < M only). Otherwise its
//   rows < R go to the workspace slot of that piece (2 per block: its first and its last segment), and the last
//   piece to arrive (a counter per split column block, reset by that block) adds the pieces in K order:
//   bitwise-identical results whatever the scheduling. Only column blocks that are actually split pay this.
// * fp32 x: the gather pass splits each value into three bf16 parts (hi + mid + lo = x exactly, fp32 range) that
//   become rows m, M + m, 2M + m of the bf16 kernel; the store adds the three rows' sums (fp32 accuracy on the
//   tensor-core path, up to 21 rows of fp32 x).
// dequant_kernel (prefill): a block decodes 4 chunks (128 rows x 64 columns) into shared memory and writes whole
// output rows (perm applied to rows) with 16-byte stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "qgemm.h"

namespace minigptq::cuda {
namespace {

constexpr int kKB = 128;        // rows of a k-block
constexpr int kStages = 4;      // cp.async pipeline depth (units in shared memory; kStages - 1 in flight)
constexpr int kMaxRows = 64;    // rows of x (after the fp32 split) the fused kernel takes
constexpr int kXPitch = 136;    // 16-bit values per x row of a stage (128 + 8: B fragment loads conflict-free)
constexpr int kDqThreads = 128;  // dequant_kernel block

template <int BITS>
struct Bits {
  static constexpr int words = BITS == 3 ? 6 : 2 * BITS;  // 32-bit words per lane per k-block (and n-tile)
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
  void* out;
  const void* x;                // the streamed x: R rows of ldx values (padded row order when gathered)
  int M, R, parts, N;           // out [M, N]; R = parts * M rows of x (parts 3: fp32 x split in bf16 parts)
  int64_t ldx;                  // row stride of x
  int kvalid;                   // x columns that exist (K when streamed as given, Kp when gathered)
  int out_f32;                  // out is fp32 (else the kernel's 16-bit type)
  int vec_out;                  // N % 4 == 0 and out 16-byte aligned: 4 columns per store
  const uint32_t* qweight;      // [ntiles][kblocks][32 * words]
  const uint32_t* scales;       // [G][ntiles][8] 16-bit pairs
  const uint8_t* zeros;         // [G][ntiles][8][1 or 2]
  int ntiles, kblocks, kb_per_group, scale_bf16;
  int units;                    // column blocks * kblocks; block i's stripe: [stripe(i), stripe(i + 1))
  float* ws;                    // [2 * gridDim.x][R][columns]: partial sums of split column blocks
  int* counters;                // [gridDim.x], zero between calls
};

// Balanced striping: gridDim.x blocks, block i takes units [stripe(i), stripe(i + 1)): q = units / grid each and
// one more for the first units % grid blocks, so a grid of one wave leaves no SM idle (and with blocks placed on
// SMs in order, the blocks sharing an SM differ by at most one unit). owner(u): the block of unit u.
__host__ __device__ __forceinline__ int stripe(int i, int units, int grid) {
  const int q = units / grid, r = units % grid;
  return i * q + min(i, r);
}
__host__ __device__ __forceinline__ int owner(int u, int units, int grid) {
  const int q = units / grid, r = units % grid;
  return u < r * (q + 1) ? u / (q + 1) : r + (u - r * (q + 1)) / q;
}

// ------------------------------------------------------------------------------ cp.async and shared loads
// copy16: 16 bytes global -> shared, asynchronously (zero-filled when !full: nothing is read). copy8: 8 bytes.
// commit() closes a group of copies; wait<N>() returns when at most N groups of this thread are still in flight.
// Shared memory written by cp.async is read only through lds32/lds64/lds128 (the host emulation checks that the
// data has landed, i.e. its group was waited for, before such a read).
#ifndef MINIGPTQ_EMU
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ void copy16(void* dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(full ? 16 : 0));
}
__device__ __forceinline__ void copy16_stream(void* dst, const void* src, bool full, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(full ? 16 : 0), "l"(pol));
}
__device__ __forceinline__ void copy8(void* dst, const void* src, bool full) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(full ? 8 : 0));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ uint32_t lds32(const uint32_t* p) { return *p; }
__device__ __forceinline__ uint2 lds64(const uint32_t* p) { return *reinterpret_cast<const uint2*>(p); }
__device__ __forceinline__ uint4 lds128(const uint32_t* p) { return *reinterpret_cast<const uint4*>(p); }
#else
inline uint64_t evict_first_policy() { return 0; }
inline void copy16(void* dst, const void* src, bool full) { emu_cp_async(dst, src, 16, full); }
inline void copy16_stream(void* dst, const void* src, bool full, uint64_t) { emu_cp_async(dst, src, 16, full); }
inline void copy8(void* dst, const void* src, bool full) { emu_cp_async(dst, src, 8, full); }
inline void commit() { emu_cp_async_commit(); }
template <int N>
inline void wait() { emu_cp_async_wait(N); }
inline uint32_t lds32(const uint32_t* p) { emu_check_landed(p, 4); return *p; }
inline uint2 lds64(const uint32_t* p) { emu_check_landed(p, 8); return {p[0], p[1]}; }
inline uint4 lds128(const uint32_t* p) { emu_check_landed(p, 16); return {p[0], p[1], p[2], p[3]}; }
#endif

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
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

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


// ------------------------------------------------------------------------------------------- the kernels
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return uint32_t(bit_cast<uint16_t>(lo)) | (uint32_t(bit_cast<uint16_t>(hi)) << 16);
}

// Shape of the fused kernel for BITS and MT 8-row tiles of x: WARPS warps of NTW n-tiles each (a column block of
// NTB n-tiles), and the minimum resident blocks per SM its register budget is built for.
template <int BITS, int MT>
struct Cfg {
  static constexpr int WARPS = MT <= 2 ? 4 : 8;
  static constexpr int NTW = MT <= 2 ? (BITS == 8 ? 2 : 4) : 1;  // more weights per unit: less overhead per weight
  static constexpr int NTB = WARPS * NTW, THREADS = WARPS * 32, ROWS = MT * 8, COLS = NTB * 16;
  static constexpr int EP = COLS + 4;  // pitch (floats) of the epilogue tile: fragment stores conflict-free
  static constexpr int BPS = MT <= 2 ? 2 : 1;  // what shared memory allows (2 blocks, 1 at MT >= 4)
};

// Byte offsets inside one pipeline stage (one unit): codes [NTB][32 * words], scales [GPB][NTB][8] words, zero
// points [GPB][NTB][8 * ZB] bytes, x [ROWS][kXPitch] 16-bit values. Every part is a multiple of 16 bytes.
template <int BITS, int MT, int TPG>
struct Stage {
  using C = Cfg<BITS, MT>;
  static constexpr int GPB = 8 / TPG, ZB = BITS == 8 ? 2 : 1, W = Bits<BITS>::words;
  static constexpr int w = 0, s = w + C::NTB * 32 * W * 4, z = s + GPB * C::NTB * 32;
  static constexpr int x = z + GPB * C::NTB * 8 * ZB, bytes = x + C::ROWS * kXPitch * 2;
  static constexpr int smem = kStages * bytes + C::ROWS * C::EP * 4;  // + the epilogue tile
};

#ifndef MINIGPTQ_EMU
#define MINIGPTQ_DYN_SMEM(name) extern __shared__ uint4 name[]
#else
#define MINIGPTQ_DYN_SMEM(name) uint4* name = reinterpret_cast<uint4*>(emu_dyn_smem())
#endif

// BITS: 2, 3, 4, 8; T: __half / __nv_bfloat16; MT: 8-row tiles of x (1, 2, 4, 8); TPG: k-tiles (16 rows) per
// group: 2, 4, or 8 (group_rows a multiple of 128). Grid: one block per stripe (stripe()).
template <int BITS, typename T, int MT, int TPG>
__global__ void __launch_bounds__(Cfg<BITS, MT>::THREADS, Cfg<BITS, MT>::BPS) qgemm_kernel(const Args a) {
  using C = Cfg<BITS, MT>;
  using S = Stage<BITS, MT, TPG>;
  using D = Deq<T, BITS>;
  constexpr int NTW = C::NTW, NTB = C::NTB, THREADS = C::THREADS, COLS = C::COLS, EP = C::EP;
  constexpr int W = Bits<BITS>::words, GPB = S::GPB, ZB = S::ZB, WPIECES = NTB * 8 * W;  // 16-byte pieces of codes
  MINIGPTQ_DYN_SMEM(smem4);
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem4);
  float* ep = reinterpret_cast<float*>(smem + kStages * S::bytes);  // [ROWS][EP]
  __shared__ int s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int kblocks = a.kblocks, grid = int(gridDim.x);
  const int u0 = stripe(blockIdx.x, a.units, grid), u1 = stripe(blockIdx.x + 1, a.units, grid);

  // ---- loader: unit lu = (column block lc, k-block lkb), first group lg (TPG 8: lr = lkb % kb_per_group). Each
  // thread copies the same pieces of every unit: its source pointers advance by a constant per unit (per group for
  // scales and zero points) and are recomputed only when the stripe moves to the next column block.
  constexpr int WR = (WPIECES + THREADS - 1) / THREADS;  // code pieces per thread
  const uint64_t pol = evict_first_policy();
  int lu = u0, lc = u0 / kblocks, lkb = u0 % kblocks;
  int lr = TPG == 8 ? lkb % a.kb_per_group : 0, lg = TPG == 8 ? lkb / a.kb_per_group : lkb * GPB;
  const uint32_t* wsrc[WR];
  bool wok[WR];
  // scale pieces (16 bytes: half a tile's 8 words) [GPB][NTB][2], then zero-point pieces (8 * ZB bytes: a tile's)
  // [GPB][NTB]: piece tid + r * THREADS of this thread, at msrc[r] for group lg
  constexpr int SP = GPB * NTB * 2, MP = GPB * NTB * 3, MR = (MP + THREADS - 1) / THREADS;
  const uint8_t* msrc[MR];
  bool mok[MR];
  const int xr = tid >> 4, xq = (tid & 15) * 8;  // x: row and column of this thread's piece (rows < R, R <= 64)
  auto column = [&] {  // source pointers of unit (lc, lkb)
#pragma unroll
    for (int r = 0; r < WR; ++r) {
      const int i = tid + r * THREADS, j = lc * NTB + i / (8 * W);
      wok[r] = j < a.ntiles && i < WPIECES;
      wsrc[r] = a.qweight + (int64_t(wok[r] ? j : 0) * kblocks + lkb) * (32 * W) + (i % (8 * W)) * 4;
    }
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      const int i = tid + r * THREADS, mi = i < SP ? i : i - SP;
      const int gi = i < SP ? mi / (NTB * 2) : mi / NTB, j = lc * NTB + (i < SP ? (mi / 2) % NTB : mi % NTB);
      mok[r] = j < a.ntiles;
      const int64_t m0 = (int64_t(lg + gi) * a.ntiles + (mok[r] ? j : 0)) * 8;
      msrc[r] = i < SP ? reinterpret_cast<const uint8_t*>(a.scales + m0 + (mi & 1) * 4) : a.zeros + m0 * ZB;
    }
  };
  column();
  const uint16_t* xsrc = static_cast<const uint16_t*>(a.x) + xr * a.ldx + xq;  // + lkb * kKB
  const int64_t xstride = (THREADS / 16) * a.ldx;                                 // rows r and r + THREADS / 16
  auto load = [&](int slot) {
    if (lu < u1) {
      uint8_t* st = smem + slot * S::bytes;
#pragma unroll
      for (int r = 0; r < WR; ++r)  // codes: NTB chunks of 32 * W contiguous words
        if (WPIECES % THREADS == 0 || tid + r * THREADS < WPIECES)
          copy16_stream(st + S::w + (tid + r * THREADS) * 16, wsrc[r], wok[r], pol);
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        const int i = tid + r * THREADS;
        if (i < SP) copy16(st + S::s + i * 16, msrc[r], mok[r]);
        else if (i < MP && ZB == 2) copy16(st + S::z + (i - SP) * 16, msrc[r], mok[r]);
        else if (i < MP) copy8(st + S::z + (i - SP) * 8, msrc[r], mok[r]);
      }
      const bool xok = lkb * kKB + xq < a.kvalid;  // zero-filled past kvalid
#pragma unroll
      for (int r = 0; r < (C::ROWS * 16 + THREADS - 1) / THREADS; ++r)  // x: 16 pieces per row, column xq
        if (xr + r * (THREADS / 16) < a.R)
          copy16(st + S::x + ((xr + r * (THREADS / 16)) * kXPitch + xq) * 2,
                 xok ? xsrc + r * xstride + lkb * kKB : xsrc, xok);
    }
    commit();  // one group per unit, empty past the stripe: the wait count stays uniform
    ++lu;
    bool next_group = false;
    if (++lkb == kblocks) {
      lkb = 0, ++lc, lr = 0, lg = 0;
      column();
      return;
    } else if constexpr (TPG == 8) {
      if (++lr == a.kb_per_group) lr = 0, ++lg, next_group = true;
    } else {
      lg += GPB, next_group = true;
    }
#pragma unroll
    for (int r = 0; r < WR; ++r) wsrc[r] += 32 * W;
    if (next_group)
#pragma unroll
      for (int r = 0; r < MR; ++r)
        msrc[r] += int64_t(a.ntiles) * 8 * (tid + r * THREADS < SP ? 4 : ZB) * (TPG == 8 ? 1 : GPB);
  };

  // ---- math: this warp's NTW n-tiles of the column block
  float acc[NTW][MT][4] = {}, cg[NTW][MT][4] = {};  // total, and the current group's sum (scale not applied)
  float sc[NTW][2] = {};                            // the current group's scales (columns g, g + 8)
  D dq[NTW];
  // B fragment row of x for each 8-row tile: row 8 mt + g, or R - 1 for rows that do not exist (never copied into
  // the stage; a copy of a real row instead only feeds C fragment rows >= R, which are never stored)
  int xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) xrow[mt] = min(mt * 8 + g, a.R - 1) * (kXPitch / 2);
  auto flush = [&] {
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[jj][mt][c] = fmaf(cg[jj][mt][c], sc[jj][c >> 1], acc[jj][mt][c]), cg[jj][mt][c] = 0.f;
  };
  auto compute = [&](int slot, bool group_start) {
    const uint32_t* st = reinterpret_cast<const uint32_t*>(smem + slot * S::bytes);
    uint32_t w[NTW][W];
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj) {
      const uint32_t* p = st + S::w / 4 + (warp * NTW + jj) * 32 * W;
#pragma unroll
      for (int c = 0; c < W / 4; ++c) {
        const uint4 v = lds128(p + c * 128 + lane * 4);
        w[jj][4 * c] = v.x, w[jj][4 * c + 1] = v.y, w[jj][4 * c + 2] = v.z, w[jj][4 * c + 3] = v.w;
      }
      if constexpr (W % 4 != 0) {  // 3-bit: then [lane][2 words]
        const uint2 v = lds64(p + (W / 4) * 128 + lane * 2);
        w[jj][W - 2] = v.x, w[jj][W - 1] = v.y;
      }
    }
    const uint32_t* xs = st + S::x / 4 + t;  // word t of a row of x (k 2t, 2t + 1)
    static_for<0, 8>([&](auto tc) {
      constexpr int kt = decltype(tc)::value;
      if constexpr (kt % TPG == 0) {  // a group starts at this k-tile (TPG 8: if the k-block starts one)
        if (TPG < 8 || group_start) {
          flush();
#pragma unroll
          for (int jj = 0; jj < NTW; ++jj) {
            const int mi = ((kt / TPG) * NTB + warp * NTW + jj) * 8 + g;  // this lane's scale/zero of the tile
            const uint32_t zw = lds32(st + S::z / 4 + mi * ZB / 4);
            dq[jj].setup(ZB == 2 ? (zw >> (16 * (g & 1))) & 0xFFFFu : (zw >> (8 * (g & 3))) & 0xFFu);
            scales_f32(lds32(st + S::s / 4 + mi), a.scale_bf16, sc[jj]);
          }
        }
      }
      uint32_t bx[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        bx[mt][0] = lds32(xs + xrow[mt] + kt * 8), bx[mt][1] = lds32(xs + xrow[mt] + kt * 8 + 4);
#pragma unroll
      for (int jj = 0; jj < NTW; ++jj) {
        const uint32_t af[4] = {dq[jj].template pair<4 * kt>(w[jj]), dq[jj].template pair<4 * kt + 1>(w[jj]),
                                dq[jj].template pair<4 * kt + 2>(w[jj]), dq[jj].template pair<4 * kt + 3>(w[jj])};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma<T>(cg[jj][mt], af, bx[mt][0], bx[mt][1]);
      }
    });
  };

  // ---- end of a segment (column block c, k-blocks [kb0, kb1]): output, or the K-split reduction. Every loop moves
  // 4 columns (16 bytes of fp32) per thread and step.
  constexpr int Q = COLS / 4;  // 4-column pieces per row
  auto ep4 = [&](int e) -> float4& { return *reinterpret_cast<float4*>(ep + (e / Q) * EP + (e % Q) * 4); };
  auto store_out = [&](int col0) {  // ep rows -> out, the parts of a row added in order; coalesced along n
#pragma unroll 1
    for (int e = tid; e < a.M * Q; e += THREADS) {
      const int m = e / Q, n = col0 + (e % Q) * 4;
      if (n >= a.N) continue;
      float4 v = ep4(e);
      for (int p = 1; p < a.parts; ++p) {
        const float4 w = ep4(e + p * a.M * Q);
        v.x += w.x, v.y += w.y, v.z += w.z, v.w += w.w;
      }
      const int64_t o = int64_t(m) * a.N + n;
      if (a.vec_out && n + 4 <= a.N) {  // N % 4 == 0 and out 16-byte aligned: one 16- or 8-byte store
        if (a.out_f32) *reinterpret_cast<float4*>(static_cast<float*>(a.out) + o) = v;
        else *reinterpret_cast<uint2*>(static_cast<T*>(a.out) + o) = make_uint2(
                 pack2(from_float<T>(v.x), from_float<T>(v.y)), pack2(from_float<T>(v.z), from_float<T>(v.w)));
      } else {
        const float f[4] = {v.x, v.y, v.z, v.w};
        for (int i = 0; i < 4 && n + i < a.N; ++i) {
          if (a.out_f32) static_cast<float*>(a.out)[o + i] = f[i];
          else static_cast<T*>(a.out)[o + i] = from_float<T>(f[i]);
        }
      }
    }
  };
  auto segment_end = [&](int c, int kb0, int kb1) {
#pragma unroll
    for (int jj = 0; jj < NTW; ++jj)  // C fragment: c0, c1 -> column g, rows 2t, 2t + 1 of x; c2, c3 -> g + 8
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ci = 0; ci < 4; ++ci) {
          const int r = mt * 8 + 2 * t + (ci & 1);
          if (r < a.R) ep[r * EP + (warp * NTW + jj) * 16 + g + 8 * (ci >> 1)] = acc[jj][mt][ci];
          acc[jj][mt][ci] = 0.f;
        }
    __syncthreads();
    if (kb0 == 0 && kb1 == kblocks - 1) {  // the whole of K in this block
      store_out(c * COLS);
    } else {  // a piece: slot 2 i (the stripe's first segment) or 2 i + 1 (its last)
      const int64_t piece = int64_t(a.R) * COLS;
      float4* mine = reinterpret_cast<float4*>(a.ws + (2 * int64_t(blockIdx.x) + (c * kblocks + kb0 != u0)) * piece);
#pragma unroll 1
      for (int e = tid; e < a.R * Q; e += THREADS) mine[e] = ep4(e);
      __threadfence();  // this block's piece is visible device-wide before its ticket is taken
      __syncthreads();
      const int bf = owner(c * kblocks, a.units, grid), bl = owner((c + 1) * kblocks - 1, a.units, grid);
      if (tid == 0) {
        const int ticket = atomicAdd(a.counters + bf, 1);
        s_last = ticket == bl - bf;
        if (s_last) atomicExch(a.counters + bf, 0);  // every piece has arrived: ready for the next call
      }
      __syncthreads();
      if (s_last) {  // uniform: s_last is shared
        __threadfence();  // the other pieces are read after their tickets
#pragma unroll 1
        for (int e = tid; e < a.R * Q; e += THREADS) {
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
          for (int b = bf; b <= bl; ++b) {  // K order: deterministic
            const int64_t slot_b = 2 * int64_t(b) + (stripe(b, a.units, grid) < c * kblocks);  // b's last segment?
            const float4 w = __ldcg(reinterpret_cast<const float4*>(a.ws + slot_b * piece) + e);
            v.x += w.x, v.y += w.y, v.z += w.z, v.w += w.w;
          }
          ep4(e) = v;
        }
        __syncthreads();
        store_out(c * COLS);
      }
    }
    __syncthreads();  // ep is reused by the next segment
  };

  // ---- the pipeline: kStages - 1 units loaded ahead, then per unit: wait for it, load unit + kStages - 1 into the
  // stage the previous unit used, compute
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) load(s);
  int cc = u0 / kblocks, ckb = u0 % kblocks, kbfirst = ckb, cr = TPG == 8 ? ckb % a.kb_per_group : 0;
  int slot = 0;  // the stage of unit cu: (cu - u0) mod kStages
#pragma unroll 1
  for (int cu = u0; cu < u1; ++cu) {
    wait<kStages - 2>();  // this thread's copies of unit cu have landed
    __syncthreads();      // everyone's have; and every warp is done with the stage loaded next
    load(slot == 0 ? kStages - 1 : slot - 1);
    compute(slot, ckb == kbfirst || cr == 0);
    slot = slot == kStages - 1 ? 0 : slot + 1;
    if (ckb == kblocks - 1 || cu == u1 - 1) {
      flush();
      segment_end(cc, kbfirst, ckb);
    }
    if (++ckb == kblocks) {
      ckb = 0, ++cc, kbfirst = 0, cr = 0;
    } else if constexpr (TPG == 8) {
      if (++cr == a.kb_per_group) cr = 0;
    }
  }
  wait<0>();
}

// x [M, K] (TIn) -> xg [parts * M, Kp] (T) in padded row order (perm; -1: 0). parts 3 (fp32 x): rows m, M + m,
// 2M + m hold bf16 hi, mid, lo with hi + mid + lo = x exactly. A thread writes 8 values of each part (16 bytes).
template <typename TIn, typename T>
__global__ void __launch_bounds__(256) gather_kernel(const TIn* x, int M, int K, const int* perm, int Kp, int parts,
                                                      T* xg) {
  const int64_t id = blockIdx.x * int64_t(256) + threadIdx.x;
  if (id >= int64_t(M) * (Kp / 8)) return;
  const int m = int(id / (Kp / 8)), k0 = int(id % (Kp / 8)) * 8;
  uint32_t v[3][4];
#pragma unroll
  for (int i = 0; i < 8; i += 2) {
    float e[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int src = __ldg(perm + k0 + i + h);
      e[h] = src >= 0 ? to_float(x[int64_t(m) * K + src]) : 0.f;
    }
    if (parts == 1) {
      v[0][i / 2] = pack2(from_float<T>(e[0]), from_float<T>(e[1]));
    } else {
#pragma unroll
      for (int p = 0; p < 3; ++p) {
        const T a0 = from_float<T>(e[0]), a1 = from_float<T>(e[1]);
        v[p][i / 2] = pack2(a0, a1);
        e[0] -= to_float(a0), e[1] -= to_float(a1);  // exact
      }
    }
  }
  for (int p = 0; p < parts; ++p)
    *reinterpret_cast<uint4*>(xg + (int64_t(p) * M + m) * Kp + k0) = make_uint4(v[p][0], v[p][1], v[p][2], v[p][3]);
}

// out[perm[k], n] = scale * (q - z) for every padded row k that is not padding. A block: k-block blockIdx.y, n-tiles
// 4 blockIdx.x .. + 3 (one per warp, decoded from registers into shared memory), then whole rows of 64 columns
// stored with 16-byte stores (vec: N * sizeof(TOut) and out are 16-byte aligned) in full sectors.
template <int BITS, typename TOut>
__global__ void __launch_bounds__(kDqThreads) dequant_kernel(const Args a, const int* perm, int group_rows, int vec) {
  constexpr int W = Bits<BITS>::words, VEC = 16 / sizeof(TOut), PITCH = 64 + VEC;
  __shared__ __align__(16) TOut tile[kKB * PITCH];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3, b = blockIdx.y;
  const int j = blockIdx.x * 4 + warp;
  if (j < a.ntiles) {
    const uint32_t* p = a.qweight + (int64_t(j) * a.kblocks + b) * (32 * W);
    uint32_t w[W];
#pragma unroll
    for (int i = 0; i < W; ++i) w[i] = __ldg(p + (i >> 2) * 128 + lane * min(4, W - (i & ~3)) + (i & 3));
    static_for<0, 32>([&](auto pc) {
      constexpr int P = decltype(pc)::value, kt = P >> 2, r = P & 3;
      constexpr Slot s = slot(BITS, P);
      const int row = kt * 16 + 2 * t + 8 * (r >> 1), col = g + 8 * (r & 1);
      const int64_t mi = (int64_t((b * kKB + row) / group_rows) * a.ntiles + j) * 8 + g;
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
        tile[(row + h) * PITCH + warp * 16 + col] = from_float<TOut>(sc[r & 1] * float(int(q) - z));
      }
    });
  }
  __syncthreads();
  TOut* out = static_cast<TOut*>(a.out);
  const int col0 = blockIdx.x * 64;
  for (int i = threadIdx.x; i < kKB * (64 / VEC); i += kDqThreads) {
    const int row = i / (64 / VEC), c = (i % (64 / VEC)) * VEC, dst = __ldg(perm + b * kKB + row);
    if (dst < 0 || col0 + c >= a.N) continue;
    TOut* o = out + int64_t(dst) * a.N + col0 + c;
    if (vec && col0 + c + VEC <= a.N) {
      *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(tile + row * PITCH + c);
    } else {
      for (int e = 0; e < VEC && col0 + c + e < a.N; ++e) o[e] = tile[row * PITCH + c + e];
    }
  }
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

void check_dtype(DType dtype) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw std::invalid_argument("dtype code " + std::to_string(int(dtype)) + " is not 0, 1 or 2");
}

using KernelFn = void (*)(Args);

// The fused kernel variant for (bits, 16-bit type, MT, group rows), its block size and dynamic shared memory.
struct Variant {
  KernelFn fn;
  int threads, smem, cols;
};

template <int BITS, typename T, int MT>
Variant variant_mt(int group_rows) {
  using C = Cfg<BITS, MT>;
#ifdef MINIGPTQ_STATIC_SUBSET  // tools/cuda_static.py --quick: only the kernels it models (groups of 128 rows)
  return {qgemm_kernel<BITS, T, MT, 8>, C::THREADS, Stage<BITS, MT, 8>::smem, C::COLS};
#endif
  if (group_rows == 32) return {qgemm_kernel<BITS, T, MT, 2>, C::THREADS, Stage<BITS, MT, 2>::smem, C::COLS};
  if (group_rows == 64) return {qgemm_kernel<BITS, T, MT, 4>, C::THREADS, Stage<BITS, MT, 4>::smem, C::COLS};
  return {qgemm_kernel<BITS, T, MT, 8>, C::THREADS, Stage<BITS, MT, 8>::smem, C::COLS};
}

template <int BITS, typename T>
Variant variant_t(int mt, int group_rows) {
  if (mt == 1) return variant_mt<BITS, T, 1>(group_rows);
  if (mt == 2) return variant_mt<BITS, T, 2>(group_rows);
  if (mt == 4) return variant_mt<BITS, T, 4>(group_rows);
  return variant_mt<BITS, T, 8>(group_rows);
}

template <int BITS>
Variant variant_bits(bool bf16, int mt, int group_rows) {
  return bf16 ? variant_t<BITS, __nv_bfloat16>(mt, group_rows) : variant_t<BITS, __half>(mt, group_rows);
}

Variant variant(int bits, bool bf16, int mt, int group_rows) {
  switch (bits) {
    case 2: return variant_bits<2>(bf16, mt, group_rows);
    case 3: return variant_bits<3>(bf16, mt, group_rows);
    case 4: return variant_bits<4>(bf16, mt, group_rows);
    default: return variant_bits<8>(bf16, mt, group_rows);
  }
}

// Blocks of variant v resident per SM (the occupancy calculator, once per variant; it also raises the kernel's
// dynamic shared memory limit, once). Host-side attribute calls only: no stream work, capture-safe.
int resident_blocks(const Variant& v) {
  constexpr int kMaxVariants = 4 * 2 * 4 * 3;
  static std::atomic<int> cache[kMaxVariants * 2];  // [slot]: (fn index + 1) << 8 | blocks, filled once
  static std::atomic<KernelFn> fns[kMaxVariants];
  int i = 0;
  for (; i < kMaxVariants; ++i) {
    KernelFn f = fns[i].load();
    if (f == v.fn) return cache[i].load();
    if (f == nullptr) break;
  }
  check(cudaFuncSetAttribute(reinterpret_cast<const void*>(v.fn), cudaFuncAttributeMaxDynamicSharedMemorySize,
                             v.smem),
        "raising the kernel's shared memory limit");
  int blocks = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, v.fn, v.threads, size_t(v.smem)), "occupancy");
  blocks = std::max(blocks, 1);
  if (i < kMaxVariants) {  // racing threads compute the same value; a lost slot only means a later re-query
    KernelFn expected = nullptr;
    cache[i].store(blocks);
    fns[i].compare_exchange_strong(expected, v.fn);
  }
  return blocks;
}

// One qgemm call: the variant, the striped grid, and the workspace it needs.
struct Plan {
  Variant v;
  int parts, R, mt, units, grid;
  int64_t ws_floats, counters;
};

Plan plan(const CudaWeight& w, int64_t M, DType dtype, int sms) {
  if (M <= 0) throw std::invalid_argument("M=" + std::to_string(M) + " must be positive");
  const int parts = dtype == DType::F32 ? 3 : 1;
  if (M * parts > kMaxRows)
    throw std::invalid_argument("M=" + std::to_string(M) + " rows of " + (parts == 3 ? "fp32" : "16-bit") +
                                " x are too many for the fused kernel (at most " + std::to_string(kMaxRows / parts) +
                                "): dequantize + matmul");
  Plan p{};
  p.parts = parts, p.R = int(M) * parts;
  p.mt = p.R <= 8 ? 1 : p.R <= 16 ? 2 : p.R <= 32 ? 4 : 8;
  p.v = variant(w.bits, dtype != DType::F16, p.mt, int(w.group_rows));  // fp32 x: bf16 parts
  const int64_t ntiles = (w.N + 15) / 16, ntb = p.v.cols / 16, kblocks = w.Kp / kKB;
  const int64_t units = (ntiles + ntb - 1) / ntb * kblocks;
  if (units >= (int64_t(1) << 31)) throw std::invalid_argument("layer too large for the fused kernel");
  // About one wave: every resident block slot gets an equal stripe (sms < 0: exactly -sms blocks, for tests).
  const int64_t slots = sms < 0 ? -int64_t(sms) : std::max<int64_t>(1, int64_t(sms) * resident_blocks(p.v));
  p.units = int(units), p.grid = int(std::min(units, slots));
  bool split = false;  // some column block is split over blocks: pieces and counters
  for (int i = 1; i < p.grid && !split; ++i) split = stripe(i, p.units, p.grid) % kblocks != 0;
  if (split) p.ws_floats = 2 * int64_t(p.grid) * p.R * p.v.cols, p.counters = p.grid;
  return p;
}

template <int BITS, typename TOut>
void launch_dequant(const Args& a, const int* perm, int group_rows, int vec, cudaStream_t stream) {
  const dim3 grid(unsigned((a.ntiles + 3) / 4), unsigned(a.kblocks));
  dequant_kernel<BITS, TOut><<<grid, kDqThreads, 0, stream>>>(a, perm, group_rows, vec);
}

template <int BITS>
void launch_dequant_bits(const Args& a, const int* perm, int group_rows, DType dtype, cudaStream_t stream) {
  const int vec = (int64_t(a.N) * (dtype == DType::F32 ? 4 : 2)) % 16 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  if (dtype == DType::F32) launch_dequant<BITS, float>(a, perm, group_rows, vec, stream);
  else if (dtype == DType::F16) launch_dequant<BITS, __half>(a, perm, group_rows, vec, stream);
  else launch_dequant<BITS, __nv_bfloat16>(a, perm, group_rows, vec, stream);
}

template <typename TIn, typename T>
void launch_gather(const CudaWeight& w, const void* x, int M, int parts, void* xg, cudaStream_t stream) {
  const int64_t threads = int64_t(M) * (w.Kp / 8);
  gather_kernel<TIn, T><<<unsigned((threads + 255) / 256), 256, 0, stream>>>(
      static_cast<const TIn*>(x), M, int(w.K), w.perm, int(w.Kp), parts, static_cast<T*>(xg));
}

// Whether x can be streamed as it is: identity perm, a 16-bit x, rows of whole 16-byte pieces, aligned.
bool direct_x(const CudaWeight& w, const void* x, DType dtype) {
  return w.perm_identity && dtype != DType::F32 && w.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

}  // namespace

QgemmNeeds qgemm_workspace(const CudaWeight& w, int64_t M, DType dtype, int sms, const void* x) {
  check_weight(w);
  check_dtype(dtype);
  const Plan p = plan(w, M, dtype, sms);
  const int64_t xg = direct_x(w, x, dtype) ? 0 : int64_t(p.R) * w.Kp * 2;
  return {p.ws_floats, p.counters, xg};
}

void qgemm(const CudaWeight& w, const void* x, DType dtype, int64_t M, void* out, const Workspace& ws, int sms,
           void* stream) {
  check_weight(w);
  check_dtype(dtype);
  const Plan p = plan(w, M, dtype, sms);
  const bool direct = direct_x(w, x, dtype);
  const int64_t xg_bytes = direct ? 0 : int64_t(p.R) * w.Kp * 2;
  if (p.ws_floats > ws.floats || p.counters > ws.counters || xg_bytes > ws.xg_bytes ||
      (xg_bytes && reinterpret_cast<uintptr_t>(ws.xg) % 16))
    throw std::invalid_argument("workspace too small: " + std::to_string(p.ws_floats) + " floats, " +
                                std::to_string(p.counters) + " counters and " + std::to_string(xg_bytes) +
                                " 16-byte aligned bytes of x needed (qgemm_workspace), got " +
                                std::to_string(ws.floats) + ", " + std::to_string(ws.counters) + ", " +
                                std::to_string(ws.xg_bytes));
  const auto s = static_cast<cudaStream_t>(stream);
  Args a{};
  a.out = out, a.M = int(M), a.R = p.R, a.parts = p.parts, a.N = int(w.N), a.out_f32 = dtype == DType::F32;
  a.qweight = w.qweight, a.scales = w.scales, a.zeros = w.zeros, a.scale_bf16 = w.scale_bf16;
  a.ntiles = int((w.N + 15) / 16), a.kblocks = int(w.Kp / kKB), a.kb_per_group = std::max(1, int(w.group_rows / kKB));
  a.units = p.units, a.ws = ws.ws, a.counters = ws.counter_ptr;
  a.vec_out = w.N % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (direct) {
    a.x = x, a.ldx = w.K, a.kvalid = int(w.K);
  } else {  // one gather pass: perm applied, padding zeroed, fp32 split into bf16 parts
    a.x = ws.xg, a.ldx = w.Kp, a.kvalid = int(w.Kp);
    if (dtype == DType::F32) launch_gather<float, __nv_bfloat16>(w, x, int(M), 3, ws.xg, s);
    else if (dtype == DType::F16) launch_gather<__half, __half>(w, x, int(M), 1, ws.xg, s);
    else launch_gather<__nv_bfloat16, __nv_bfloat16>(w, x, int(M), 1, ws.xg, s);
    check(cudaGetLastError(), "gather launch");
  }
  const KernelFn fn = p.v.fn;
  fn<<<unsigned(p.grid), unsigned(p.v.threads), size_t(p.v.smem), s>>>(a);
  check(cudaGetLastError(), "qgemm launch");
}

void dequantize(const CudaWeight& w, void* out, DType dtype, void* stream) {
  check_weight(w);
  check_dtype(dtype);
  Args a{};
  a.out = out, a.N = int(w.N), a.qweight = w.qweight, a.scales = w.scales, a.zeros = w.zeros;
  a.scale_bf16 = w.scale_bf16, a.ntiles = int((w.N + 15) / 16), a.kblocks = int(w.Kp / kKB);
  const auto s = static_cast<cudaStream_t>(stream);
  const int gr = int(w.group_rows);
  switch (w.bits) {
    case 2: launch_dequant_bits<2>(a, w.perm, gr, dtype, s); break;
    case 3: launch_dequant_bits<3>(a, w.perm, gr, dtype, s); break;
    case 4: launch_dequant_bits<4>(a, w.perm, gr, dtype, s); break;
    default: launch_dequant_bits<8>(a, w.perm, gr, dtype, s); break;
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
