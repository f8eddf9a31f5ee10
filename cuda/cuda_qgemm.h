// CUDA kernels for GPTQ-packed linears (cuda_qgemm.cu), declared without CUDA or torch headers so that the
// pybind11 bindings (cuda_bindings.cpp) compile with the host compiler alone.
#pragma once
#include <cstdint>
#include <string>

#include "qweight.h"

namespace minigptq::cuda {

// out[M, N] = x[M, K] @ W, fused dequantize + matmul with fp32 accumulation, for small M (decoding).
// x, out: `dtype` (F32, F16 or BF16); work: fp32 [M, N] scratch (partial sums over K slices).
// All pointers on the current CUDA device; everything runs on `stream` (a cudaStream_t).
// Throws std::invalid_argument for bad sizes, std::runtime_error for CUDA errors.
void qgemm(const QWeight& w, const void* x, DType dtype, int64_t M, float* work, void* out, void* stream);

// out[K, N] = the dequantized weight in checkpoint row order (what pack.dequantize returns), in `dtype`.
void dequantize(const QWeight& w, void* out, DType dtype, void* stream);

// "" if this module's CUDA runtime can reach a device (the driver may be too old for the toolkit it was built
// with), else the CUDA error message.
std::string runtime_status();

}  // namespace minigptq::cuda
