// CUDA kernels for GPTQ-packed linears: fused dequantize + matmul for small batches (decoding), dequantize for
// large ones (the caller then runs torch.matmul). Layout: cuda/qweight.h; reference: minigptq/pack.py:dequantize.
//
// qgemm_kernel: a block owns 512 columns (128 threads x 4 columns: one 16-byte load of packed words per packed
// row) and a slice of K; it stages 128 rows of x at a time (converted to fp32, gathered through perm) and the
// group index of each row in shared memory. Each thread unpacks its 4 columns in registers and accumulates
// MB rows of x in fp32:
//     w = ((2^23 + q) - (2^23 + zero)) * scale      2^23 + q is built with one OR (exact for q < 2^23), so the
//     acc[m] += x[m][k] * w                         int->float convert (quarter rate on sm_80/90) is avoided
// Rows are sorted by group at load time, so the group changes at most once per packing unit and the check is
// uniform across the block. K slices are summed with fp32 atomics into `work`, then cast to the output dtype.
// Only the CUDA runtime is used (no torch); every launch goes to the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_qgemm.h"

namespace minigptq::cuda {
namespace {

constexpr int kThreads = 128;           // threads per block
constexpr int kCols = 4;                // columns per thread: one uint4 of packed words
constexpr int kBlockCols = kThreads * kCols;
constexpr int kChunkRows = 128;         // rows of K staged in shared memory at a time; a multiple of 32
constexpr int kMaxMB = 16;              // rows of x per block (larger M: more blocks along z)

template <int BITS>
struct Unit {  // smallest whole packing unit: 32/bits rows in one word, or 32 rows in 3 words for 3-bit
  static constexpr int rows = BITS == 3 ? 32 : 32 / BITS;
  static constexpr int words = BITS == 3 ? 3 : 1;
};

template <int BITS>
struct Batch {  // units loaded together before their math: 4 x 16 bytes per thread (3-bit: 2 units = 6 x 16)
  static constexpr int units = BITS == 3 ? 2 : 4;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Code of row j of a unit for one column (w = that column's unit words). j is a constant after unrolling,
// so this is one shift (or one funnel shift for the 3-bit values that straddle two words) and one AND.
template <int BITS>
__device__ __forceinline__ uint32_t code(const uint32_t (&w)[Unit<BITS>::words], int j) {
  const int bit = BITS * j, wi = bit / 32, sh = bit % 32;
  const uint32_t hi = w[wi + 1 < Unit<BITS>::words ? wi + 1 : wi];
  return __funnelshift_r(w[wi], hi, sh) & ((1u << BITS) - 1);
}

__device__ __forceinline__ float magic(uint32_t q) { return __uint_as_float(0x4B000000u | q); }  // 2^23 + q

// Scale and 2^23 + zero of group g for 4 columns starting at n (16- and 8-byte loads).
__device__ __forceinline__ void load_group(const float* scales, const int16_t* zeros, int64_t g, int N, int n,
                                           float (&s)[kCols], float (&zb)[kCols]) {
  const float4 sv = __ldg(reinterpret_cast<const float4*>(scales + g * N + n));
  const short4 zv = __ldg(reinterpret_cast<const short4*>(zeros + g * N + n));
  s[0] = sv.x, s[1] = sv.y, s[2] = sv.z, s[3] = sv.w;
  zb[0] = 8388608.f + zv.x, zb[1] = 8388608.f + zv.y, zb[2] = 8388608.f + zv.z, zb[3] = 8388608.f + zv.w;
}

// The packed words of one unit for 4 columns: w[column][word].
template <int BITS>
__device__ __forceinline__ void load_unit(const uint32_t* p, int N, uint32_t (&w)[kCols][Unit<BITS>::words]) {
#pragma unroll
  for (int i = 0; i < Unit<BITS>::words; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + int64_t(i) * N));
    w[0][i] = v.x, w[1][i] = v.y, w[2][i] = v.z, w[3][i] = v.w;
  }
}

template <int BITS, int MB, typename T>
__global__ void __launch_bounds__(kThreads)
qgemm_kernel(const T* __restrict__ x, int M, int K, int N, const uint32_t* __restrict__ qweight,
             const float* __restrict__ scales, const int16_t* __restrict__ zeros, const int* __restrict__ row_group,
             const int* __restrict__ perm, int chunks_per_block, float* __restrict__ work) {
  using U = Unit<BITS>;
  __shared__ __align__(16) float xs[kChunkRows][MB];  // one row's MB values side by side
  __shared__ int gs[kChunkRows];
  const int n = (blockIdx.x * kThreads + threadIdx.x) * kCols;
  const int m0 = blockIdx.z * MB;
  const bool active = n < N;  // N % 4 == 0: a thread's 4 columns are all valid or all not
  float acc[MB][kCols];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[m][c] = 0.f;
  int gcur = -1;
  float s[kCols], zb[kCols];

  for (int chunk = blockIdx.y * chunks_per_block; chunk < (blockIdx.y + 1) * chunks_per_block; ++chunk) {
    const int k0 = chunk * kChunkRows;
    if (k0 >= K) break;  // uniform: the same for every thread of the block
    const int rows = min(kChunkRows, K - k0);
    __syncthreads();  // the previous chunk's readers are done with xs / gs
    for (int i = threadIdx.x; i < kChunkRows * MB; i += kThreads) {
      const int r = i / MB, m = i % MB;
      float v = 0.f;
      if (r < rows && m0 + m < M) {
        const int k = k0 + r;
        v = to_float(x[int64_t(m0 + m) * K + (perm ? perm[k] : k)]);
      }
      xs[r][m] = v;
    }
    for (int r = threadIdx.x; r < kChunkRows; r += kThreads) gs[r] = r < rows ? row_group[k0 + r] : -1;
    __syncthreads();
    if (!active) continue;  // still takes part in the barriers above

    // Units are processed in batches (Batch<BITS>): all loads of a batch are issued before its math, so each thread
    // keeps several 16-byte loads in flight (a matvec is bound by memory latency x parallelism).
    const uint32_t* base = qweight + int64_t(k0 / U::rows) * U::words * N + n;
    for (int b0 = 0; b0 < rows; b0 += Batch<BITS>::units * U::rows) {  // K % U::rows == 0: units are whole
      uint32_t w[Batch<BITS>::units][kCols][U::words];
#pragma unroll
      for (int b = 0; b < Batch<BITS>::units; ++b)
        if (b0 + b * U::rows < rows) load_unit<BITS>(base + int64_t(b0 / U::rows + b) * U::words * N, N, w[b]);
#pragma unroll
      for (int b = 0; b < Batch<BITS>::units; ++b) {
        const int r0 = b0 + b * U::rows;
        if (r0 >= rows) break;  // uniform
        const bool same_group = gs[r0] == gcur && gs[r0 + U::rows - 1] == gcur;  // rows are sorted by group
#pragma unroll
        for (int j = 0; j < U::rows; ++j) {
          if (!same_group && gs[r0 + j] != gcur) {
            gcur = gs[r0 + j];
            load_group(scales, zeros, gcur, N, n, s, zb);
          }
          float xv[MB];
#pragma unroll
          for (int m = 0; m < MB; ++m) xv[m] = xs[r0 + j][m];
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            const float wv = (magic(code<BITS>(w[b][c], j)) - zb[c]) * s[c];  // exact q - zero, one rounding
#pragma unroll
            for (int m = 0; m < MB; ++m) acc[m][c] = fmaf(xv[m], wv, acc[m][c]);
          }
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int m = 0; m < MB; ++m)
    if (m0 + m < M)
#pragma unroll
      for (int c = 0; c < kCols; ++c) atomicAdd(work + int64_t(m0 + m) * N + n + c, acc[m][c]);
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ in, T* __restrict__ out, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(in[i]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[kCols]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {  // 4 x 16-bit: one 8-byte store
    T h[kCols] = {from_float<T>(v[0]), from_float<T>(v[1]), from_float<T>(v[2]), from_float<T>(v[3])};
    uint2 u;
    memcpy(&u, h, sizeof(u));
    *reinterpret_cast<uint2*>(p) = u;
  }
}

// One unit of rows x 4 columns per thread; rows are written back to their checkpoint position perm[r].
template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads)
dequant_kernel(const uint32_t* __restrict__ qweight, const float* __restrict__ scales,
               const int16_t* __restrict__ zeros, const int* __restrict__ row_group, const int* __restrict__ perm,
               int N, T* __restrict__ out) {
  using U = Unit<BITS>;
  const int n = (blockIdx.x * kThreads + threadIdx.x) * kCols;
  const int unit = blockIdx.y;
  if (n >= N) return;
  uint32_t w[kCols][U::words];
  load_unit<BITS>(qweight + int64_t(unit) * U::words * N + n, N, w);
  int gcur = -1;
  float s[kCols], zb[kCols];
#pragma unroll
  for (int j = 0; j < U::rows; ++j) {
    const int r = unit * U::rows + j;
    if (row_group[r] != gcur) {
      gcur = row_group[r];
      load_group(scales, zeros, gcur, N, n, s, zb);
    }
    float v[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) v[c] = (magic(code<BITS>(w[c], j)) - zb[c]) * s[c];
    store4(out + int64_t(perm ? perm[r] : r) * N + n, v);
  }
}

// ------------------------------------------------------------------------------------------------ launchers
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("minigptq CUDA ") + what + ": " + cudaGetErrorString(e));
}

void check_weight(const QWeight& w) {
  if (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8)
    throw std::invalid_argument("bits=" + std::to_string(w.bits) + " is not supported; valid: 2, 3, 4, 8");
  const int64_t unit = w.bits == 3 ? 32 : 32 / w.bits;
  if (w.K <= 0 || w.K % unit || w.K >= (int64_t(1) << 31) || w.N <= 0 || w.N % 4 || w.N >= (int64_t(1) << 31) ||
      w.G <= 0)
    throw std::invalid_argument("K=" + std::to_string(w.K) + " must be a positive multiple of " +
                                std::to_string(unit) + " and N=" + std::to_string(w.N) +
                                " a positive multiple of 4 (both < 2^31), G=" + std::to_string(w.G) + " positive");
}

int sm_count() {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

template <int BITS, int MB, typename T>
void launch_qgemm(const QWeight& w, const void* x, int64_t M, float* work, cudaStream_t stream) {
  const int col_blocks = int((w.N + kBlockCols - 1) / kBlockCols), m_blocks = int((M + MB - 1) / MB);
  const int chunks = int((w.K + kChunkRows - 1) / kChunkRows);
  // Split K until the grid has ~4 blocks per SM; each block then adds its partial sums atomically.
  const int want = 4 * sm_count(), have = col_blocks * m_blocks;
  const int split = std::max(1, std::min(chunks, (want + have - 1) / have));
  const int per_block = (chunks + split - 1) / split;
  const dim3 grid(col_blocks, (chunks + per_block - 1) / per_block, m_blocks);
  if (grid.z > 65535) throw std::invalid_argument("M=" + std::to_string(M) + " is too large for the fused kernel");
  qgemm_kernel<BITS, MB, T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), int(M), int(w.K), int(w.N), w.qweight, w.scales, w.zeros, w.row_group, w.perm,
      per_block, work);
}

template <int BITS, typename T>
void qgemm_bits(const QWeight& w, const void* x, int64_t M, float* work, cudaStream_t stream) {
  // Three row-block sizes keep the number of kernels (and the compile time) down; unused rows of a block are
  // zeros in shared memory and cost FMAs only, which are cheap next to the weight traffic for M <= 4.
  if (M <= 1) launch_qgemm<BITS, 1, T>(w, x, M, work, stream);
  else if (M <= 4) launch_qgemm<BITS, 4, T>(w, x, M, work, stream);
  else launch_qgemm<BITS, kMaxMB, T>(w, x, M, work, stream);
}

template <typename T>
void qgemm_typed(const QWeight& w, const void* x, int64_t M, float* work, void* out, cudaStream_t stream) {
  check(cudaMemsetAsync(work, 0, sizeof(float) * M * w.N, stream), "cudaMemsetAsync");
  switch (w.bits) {
    case 2: qgemm_bits<2, T>(w, x, M, work, stream); break;
    case 3: qgemm_bits<3, T>(w, x, M, work, stream); break;
    case 4: qgemm_bits<4, T>(w, x, M, work, stream); break;
    default: qgemm_bits<8, T>(w, x, M, work, stream); break;
  }
  check(cudaGetLastError(), "qgemm_kernel launch");
  const int64_t count = M * w.N;
  const int blocks = int(std::min<int64_t>((count + 255) / 256, 4096));
  cast_kernel<T><<<blocks, 256, 0, stream>>>(work, static_cast<T*>(out), count);
  check(cudaGetLastError(), "cast_kernel launch");
}

template <int BITS, typename T>
void launch_dequant(const QWeight& w, T* out, cudaStream_t stream) {
  const int64_t units = w.K / Unit<BITS>::rows;
  if (units > 65535) throw std::invalid_argument("K=" + std::to_string(w.K) + " is too large to dequantize");
  const dim3 grid(unsigned((w.N + kBlockCols - 1) / kBlockCols), unsigned(units));
  dequant_kernel<BITS, T><<<grid, kThreads, 0, stream>>>(w.qweight, w.scales, w.zeros, w.row_group, w.perm,
                                                          int(w.N), out);
}

template <typename T>
void dequant_typed(const QWeight& w, void* out, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  switch (w.bits) {
    case 2: launch_dequant<2, T>(w, o, stream); break;
    case 3: launch_dequant<3, T>(w, o, stream); break;
    case 4: launch_dequant<4, T>(w, o, stream); break;
    default: launch_dequant<8, T>(w, o, stream); break;
  }
  check(cudaGetLastError(), "dequant_kernel launch");
}

}  // namespace

void qgemm(const QWeight& w, const void* x, DType dtype, int64_t M, float* work, void* out, void* stream) {
  check_weight(w);
  if (M <= 0) throw std::invalid_argument("M=" + std::to_string(M) + " must be positive");
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: qgemm_typed<float>(w, x, M, work, out, s); break;
    case DType::F16: qgemm_typed<__half>(w, x, M, work, out, s); break;
    case DType::BF16: qgemm_typed<__nv_bfloat16>(w, x, M, work, out, s); break;
    default: throw std::invalid_argument("dtype code " + std::to_string(int(dtype)) + " is not 0, 1 or 2");
  }
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  return count > 0 ? "" : "no CUDA device";
}

void dequantize(const QWeight& w, void* out, DType dtype, void* stream) {
  check_weight(w);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: dequant_typed<float>(w, out, s); break;
    case DType::F16: dequant_typed<__half>(w, out, s); break;
    case DType::BF16: dequant_typed<__nv_bfloat16>(w, out, s); break;
    default: throw std::invalid_argument("dtype code " + std::to_string(int(dtype)) + " is not 0, 1 or 2");
  }
}

}  // namespace minigptq::cuda
