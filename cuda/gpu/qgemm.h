// CUDA kernels for GPTQ-packed linears (qgemm.cu), declared without CUDA or torch headers so that the
// pybind11 bindings (bindings.cpp) compile with the host compiler alone.
#pragma once
#include <cstdint>
#include <string>
#include <utility>

#include "../qweight.h"

namespace minigptq::cuda {

// One layer in the CUDA layout (minigptq/kernels/cuda_layout.py:make_cuda_layout; bit diagram at the top of
// qgemm.cu).
struct CudaWeight {
  const uint32_t* qweight;  // [ceil(N/16)][Kp/128][32 lanes * words] interleaved codes
  const uint32_t* scales;   // [G][ceil(N/16)][8] pairs of 16-bit scales (fp16, or bf16 if scale_bf16)
  const uint8_t* zeros;     // [G][ceil(N/16)][8][1 or 2 (8-bit)] packed zero points
  const int32_t* perm;      // [Kp] checkpoint row of each padded sorted row, -1 for padding
  int64_t K, N, Kp, G, group_rows;
  int bits;
  int scale_bf16;
  int perm_identity;        // 1: perm[k] = k for k < K and -1 after (x is streamed as it is, no gather pass)
};

// Scratch of one qgemm call, owned by the caller (one per device and stream): the pieces of split column blocks,
// counters that must be zero before the first call (each call leaves them zero), and the gathered x.
struct Workspace {
  float* ws;
  int64_t floats;
  int* counter_ptr;
  int64_t counters;
  void* xg;          // 16-byte aligned
  int64_t xg_bytes;
};

// What a qgemm call with these sizes needs (0: none): floats and counters of the K-split reduction, bytes of the
// gathered x (0 when x is streamed as it is: identity perm, 16-bit, K % 8 == 0 and x 16-byte aligned).
struct QgemmNeeds {
  int64_t floats, counters, xg_bytes;
};
// sms: the device's SM count (< 0: exactly -sms blocks, for tests).
QgemmNeeds qgemm_workspace(const CudaWeight& w, int64_t M, DType dtype, int sms, const void* x);

// out[M, N] = x[M, K] @ W for M <= 64 (16-bit x) or M <= 21 (fp32 x): on `stream` (a cudaStream_t), the gather
// pass (when needed) and one fused kernel launch, fp32 accumulation, deterministic. x, out: `dtype` (F32: x split
// into bf16 parts, fp32 out). All pointers on the current device.
// Throws std::invalid_argument for bad sizes, std::runtime_error for CUDA errors.
void qgemm(const CudaWeight& w, const void* x, DType dtype, int64_t M, void* out, const Workspace& ws, int sms,
           void* stream);

// out[K, N] = the dequantized weight in checkpoint row order (what pack.dequantize returns), in `dtype`.
void dequantize(const CudaWeight& w, void* out, DType dtype, void* stream);

// "" if this module's CUDA runtime can reach a device (the driver may be too old for the toolkit it was built
// with), else the CUDA error message.
std::string runtime_status();

}  // namespace minigptq::cuda
