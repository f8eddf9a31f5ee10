// What the instruction-set-neutral driver (cpu_qgemm.cpp) hands to the per-instruction-set kernels
// (cpu_qgemm_simd.inc, compiled once per instruction set).
#pragma once
#include <cstdint>

#include "cpu_qgemm.h"

namespace minigptq::detail {

// Rows [r0, r1) of the sorted layout, all in group g. Chunks never cross a group boundary or a multiple of
// kChunkRows, so the scale and zero are applied once per chunk and packing units stay aligned.
struct Chunk {
  int32_t r0, r1, g;
};
constexpr int32_t kChunkRows = 128;  // a multiple of 32 rows: the 3-bit packing unit

struct Problem {
  const QWeight* w;
  const float* xs;    // [M][K] activations as fp32, in sorted row order (perm applied)
  const float* xsum;  // [M][C] sum of xs over each chunk's rows (for the zero-point term)
  const Chunk* chunks;
  int64_t C;          // number of chunks
  int64_t M;          // rows of x
};

// y[M][N] fp32: writes (overwrites) the columns [n0, n1) of x @ W. Threads get disjoint column ranges.
using PanelFn = void (*)(const Problem& p, int64_t n0, int64_t n1, float* y);
// row[N] fp32 = sorted row r of the dequantized weight.
using DequantRowFn = void (*)(const QWeight& w, int64_t r, float* row);

struct Kernels {
  PanelFn panel[9];         // indexed by bits (2, 3, 4, 8)
  DequantRowFn dequant[9];
  int64_t tile_cols;        // columns of one register tile: panels are multiples of this
};

namespace scalar { Kernels kernels(); }
namespace avx2 { Kernels kernels(); }
namespace avx512 { Kernels kernels(); }

}  // namespace minigptq::detail
