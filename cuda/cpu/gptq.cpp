// The inner loop of GPTQ (Algorithm 1, lines 4-7) for one block of columns, in C++: what minigptq/gptq.py's
// torch loop computes, bit for bit. Rows are independent (every row sees the same Hinv), so each thread takes
// whole rows and runs all b columns of a row in registers and L1 instead of one torch call per column and operation.
// Exactness: every step is one IEEE operation in the same order as the torch code (w / s, round half to even,
// + z, clamp, q - z, s * (.), w - deq, / d, err * h, W - (.)); the file is compiled with -ffp-contract=off, so no
// multiply-add is fused.
#include "gptq.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace minigptq {

void gptq_block(float* W1, int64_t N, int64_t b, const float* Hinv1, int64_t ldh, const float* S, const float* Z,
                float maxq, float* codes, float* err, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t r = 0; r < N; ++r) {
    float* w = W1 + r * b;
    for (int64_t i = 0; i < b; ++i) {
      const float s = S[i * N + r], z = Z[i * N + r];
      const float q = std::min(std::max(std::nearbyint(w[i] / s) + z, 0.0f), maxq);  // line 5
      const float e = (w[i] - s * (q - z)) / Hinv1[i * ldh + i];                        // line 6
      codes[r * b + i] = q;
      err[r * b + i] = e;
      const float* h = Hinv1 + i * ldh;
      for (int64_t j = i + 1; j < b; ++j) w[j] -= e * h[j];  // line 7
    }
  }
}

}  // namespace minigptq
