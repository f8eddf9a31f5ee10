// The kernel layout of one quantized linear, shared by the CPU and CUDA kernels. QuantLinear.post_load builds it
// from the checkpoint tensors (minigptq/kernels/layout.py:make_layout); the checkpoint tensors themselves stay
// untouched.
// "Sorted" rows: the K input rows reordered so that each group is one contiguous run (act-order undone); when
// g_idx is already nondecreasing the sorted order is the checkpoint order and perm is null.
#pragma once
#include <cstdint>

namespace minigptq {

struct QWeight {
  const uint32_t* qweight;   // [K*bits/32, N] codes packed along K (GPTQ layout), rows in sorted order;
                             // int8 layout: [ceil(N/64)][K*bits/32][64] (cpu/qgemm_i8.inc)
  const float* scales;       // [G, N] fp32 scales (int8 layout: [ceil(N/64)][G][64])
  const int16_t* zeros;      // [G, N] zero points as plain integers, checkpoint_format's +1 added (int8: tiled)
  const int32_t* row_group;  // [K] group of each sorted row; nondecreasing, in [0, G)
  const int32_t* perm;       // [K] checkpoint row of each sorted row, or nullptr for the identity
  int64_t K, N, G;
  int bits;                  // 2, 3, 4 or 8
  int int8 = 0;              // 1: the int8 kernels' layout (cpu/qgemm_i8.inc): column tiles, 3-bit byte fields
};

// A QWeight from the integer addresses (tensor.data_ptr()) the pybind11 bindings receive from minigptq/kernels/.
inline QWeight make_qweight(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t row_group,
                            uintptr_t perm, int64_t K, int64_t N, int64_t G, int bits) {
  return QWeight{reinterpret_cast<const uint32_t*>(qweight), reinterpret_cast<const float*>(scales),
                 reinterpret_cast<const int16_t*>(zeros),    reinterpret_cast<const int32_t*>(row_group),
                 reinterpret_cast<const int32_t*>(perm),     K, N, G, bits};
}

// Element type of activations and outputs (minigptq/kernels/common.py: DTYPE_CODES).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

}  // namespace minigptq
