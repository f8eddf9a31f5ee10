#pragma once
#include <cstdint>

namespace minigptq {

// One block of b columns of GPTQ's inner loop over N rows. W1 [N, b] row-major is updated in place (the
// error-compensated weights); Hinv1 is the block's [b, b] part of the upper Cholesky factor of H^-1 with row stride
// ldh; S and Z [b, N] hold each column's scale and zero point per row; codes and err [N, b] receive the integer
// codes (as floats) and the scaled errors E. fp32 throughout.
void gptq_block(float* W1, int64_t N, int64_t b, const float* Hinv1, int64_t ldh, const float* S, const float* Z,
                float maxq, float* codes, float* err, int threads);

}  // namespace minigptq
