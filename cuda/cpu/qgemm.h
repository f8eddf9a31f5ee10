// CPU kernels for GPTQ-packed linears: y = x @ W with W dequantized on the fly (fused), and W itself (dequantize).
// Plain C++ and SIMD intrinsics only: no torch headers, so the module does not depend on torch's C++ ABI.
// The torch reference these kernels must match is minigptq/pack.py:dequantize.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../qweight.h"

namespace minigptq {

// Auto: the best fp32 instruction set; AutoVnni: the best int8 one (avx512vnni, then avxvnni).
enum class Isa : int { Auto = 0, Scalar = 1, Avx2 = 2, Avx512 = 3, AvxVnni = 4, Avx512Vnni = 5, AutoVnni = 6 };

// out[M, N] = x[M, K] @ W, fp32 accumulation; x and out share `dtype` (F32 or BF16).
// Throws std::invalid_argument on inconsistent arguments (bad row_group / perm values, bits, sizes).
void qgemm(const QWeight& w, const void* x, DType dtype, int64_t M, void* out, int threads, Isa isa);

// The same with the activations quantized to int8 per chunk and integer dot products (VNNI): qgemm_i8.inc.
// isa: Auto (= AutoVnni), AvxVnni or Avx512Vnni; w must be in the int8 layout (w.int8 = 1).
void qgemm_i8(const QWeight& w, const void* x, DType dtype, int64_t M, void* out, int threads, Isa isa);

// out[K, N] = the dequantized weight in checkpoint row order (what pack.dequantize returns), F32 or BF16.
void dequantize(const QWeight& w, void* out, DType dtype, int threads, Isa isa);

// Instruction sets this CPU and this build can run, best last (always includes "scalar").
std::vector<std::string> available_isas();
std::string isa_name(Isa isa);
Isa resolve_isa(Isa requested);  // Auto -> the best available; throws std::invalid_argument if unavailable

}  // namespace minigptq
