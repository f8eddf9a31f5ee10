// What the instruction-set-neutral driver (qgemm.cpp) hands to the per-instruction-set kernels
// (qgemm_simd.inc, compiled once per instruction set).
#pragma once
#include <cstdint>

#include "qgemm.h"

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

// -- the int8-activation kernels (qgemm_i8.inc) ----------------------------------------------------------------
// A chunk as the int8 kernels walk it: whole packing units [u0, u0 + units) cover rows [r0, r1); the staged
// activations of rows outside [r0, r1) are 0, so a unit shared by two chunks (a group boundary inside it) is read
// once by each and counted once.
struct ChunkI8 {
  int32_t r0, r1, g;
  int32_t u0, units;
  int64_t xoff;  // first quad of this chunk in a staged row of activations
};

struct ProblemI8 {
  const QWeight* w;
  const int32_t* xq;   // [M][S] int8 activations, 4 per int32 ("quads"), in the order of qgemm_i8.inc
  const float* sx;     // [M][C] scale of each chunk's int8 activations: x ~ sx * xq
  const float* zs;     // [M][C] sum of sx * float(sum of the int8 activations) over the group's chunks up to this one
  const ChunkI8* chunks;
  int64_t C, M, S;
};

constexpr int64_t kTileCols = 64;  // columns of one tile of the int8 layout ([tiles][K*bits/32][kTileCols] words)
// Rows per chunk of the int8 kernels: each chunk has its own activation scale, as llama.cpp's Q8_0 blocks of 32
// (measured on SmolLM2 4-bit: chunks of 32 rows cost less perplexity than 128, at no measurable speed). A multiple
// of 32 rows (the 3-bit packing unit).
constexpr int32_t kChunkRowsI8 = 32;
// A chunk whose max|x| is below this counts as zero: 127 / max|x| would overflow for subnormal maxima
// (minigptq/kernels/layout.py INT8_TINY; such activations contribute < 32 * 2^-100 * |w| per chunk).
constexpr float kTinyI8 = 0x1p-100f;

// y[M][N] fp32: writes (overwrites) the columns of tiles [t0, t1). Threads get disjoint tile ranges.
using TilesI8Fn = void (*)(const ProblemI8& p, int64_t t0, int64_t t1, float* y);
// One full chunk (kChunkRowsI8 = 32 rows of x, fp32) to int8, exactly as the driver's scalar staging: returns false
// (and writes nothing) when max|x| is not finite, else writes the 32 bytes reordered within 16-byte lanes by `shuf`
// (a pshufb pattern: the packing unit's quad order), the scale max|x| / 127 and the sum of the int8 values.
using StageI8Fn = bool (*)(const float* x, const uint8_t* shuf, int8_t* dst, float* sx, int32_t* sum);
// The batched kernel (qgemm_i8b.inc, M > 16): tile ti (kTileCols columns), rows [m0, m1) of y. buf: a thread's
// buffer of batch_words(K, bits) uint32 for the unpacked tile, *have: the tile it holds (-1: none; unpacked again
// only when another tile comes). Reads the int8 layout (w.int8) or the exact kernels' GPTQ layout.
using BatchI8Fn = void (*)(const ProblemI8& p, int64_t ti, int64_t m0, int64_t m1, uint32_t* buf, int64_t* have,
                           float* y);
struct KernelsI8 {
  TilesI8Fn tiles[9];  // indexed by bits (2, 3, 4, 8)
  StageI8Fn stage32;
  BatchI8Fn batch[9];
  int64_t (*batch_words)(int64_t K, int bits);
};
// Rows of x from which qgemm_i8 takes the batched kernel (minigptq/kernels/__init__.py FUSED_MAX_ROWS + 1).
constexpr int64_t kBatchMinRowsI8 = 17;

namespace avx512vnni { KernelsI8 kernels_i8(); }
namespace avxvnni { KernelsI8 kernels_i8(); }
namespace avx2i8 { KernelsI8 kernels_i8(); }  // AVX2 vpmaddubsw + vpmaddwd: any AVX2 CPU

}  // namespace minigptq::detail
