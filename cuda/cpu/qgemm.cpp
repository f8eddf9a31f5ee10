// The instruction-set-neutral part of the CPU kernels: argument checks, staging of x (dtype conversion and the
// act-order permutation), the split of rows into chunks and of columns into per-thread panels, and the portable
// scalar build of the hot loop. The hot loop itself is qgemm_simd.inc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "qgemm.h"
#include "qgemm_detail.h"

namespace minigptq {

// ---------------------------------------------------------------------------- portable scalar build (1 lane)
namespace detail::scalar {
struct V {
  using f = float;
  using i = uint32_t;
  using m = bool;
  static constexpr int L = 1, TW = 4, MB = 4;
  static inline m mask(int valid) { return valid > 0; }
  static inline i load_w(const uint32_t* p, m k) { return k ? *p : 0u; }
  static inline f load_f(const float* p, m k) { return k ? *p : 0.f; }
  static inline void store_f(float* p, f v, m k) { if (k) *p = v; }
  static inline f load_z(const int16_t* p, m k, int) { return k ? float(*p) : 0.f; }
  static inline f zero() { return 0.f; }
  static inline f set1(float a) { return a; }
  static inline f fmadd(f a, f b, f c) { return a * b + c; }
  static inline f fnmadd(f a, f b, f c) { return c - a * b; }
  static inline f mul(f a, f b) { return a * b; }
  template <int S> static inline i srli(i v) { return v >> S; }
  template <int S> static inline i slli(i v) { return v << S; }
  static inline i srl(i v, int s) { return v >> s; }
  static inline i sll(i v, int s) { return v << s; }
  static inline i or_(i a, i b) { return a | b; }
  template <int BITS> static inline f codes(i v) { return float(v & ((1u << BITS) - 1)); }
};
#include "qgemm_simd.inc"
}  // namespace detail::scalar

#if !(defined(__x86_64__) || defined(_M_X64))
namespace detail::avx2 { Kernels kernels() { return scalar::kernels(); } }
namespace detail::avx512 { Kernels kernels() { return scalar::kernels(); } }
namespace detail::avx512vnni { KernelsI8 kernels_i8() { return {}; } }
namespace detail::avxvnni { KernelsI8 kernels_i8() { return {}; } }
namespace detail::avx2i8 { KernelsI8 kernels_i8() { return {}; } }
#endif

namespace {

using detail::Chunk;

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, like torch's .to(torch.bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == Isa::Avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::Avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  if (isa == Isa::Avx512Vnni) return cpu_has(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
  if (isa == Isa::AvxVnni) return cpu_has(Isa::Avx2) && __builtin_cpu_supports("avxvnni");
#endif
  return isa == Isa::Scalar;
}

const detail::Kernels& kernels_for(Isa isa) {
  // A table is built only where the CPU runs its instruction set: the function returning it is compiled under that
  // set's target pragma and may use its registers itself (GCC 12 fills the AVX-512 table with zmm stores: SIGILL on
  // AVX2-only CPUs before any kernel was chosen).
  static const detail::Kernels scalar = detail::scalar::kernels(),
                               avx2 = cpu_has(Isa::Avx2) ? detail::avx2::kernels() : scalar,
                               avx512 = cpu_has(Isa::Avx512) ? detail::avx512::kernels() : scalar;
  return isa == Isa::Avx512 ? avx512 : isa == Isa::Avx2 ? avx2 : scalar;
}

void invalid(const std::string& what) { throw std::invalid_argument(what); }

// Sizes, then one pass over row_group / perm: their values index memory, so they are checked on every call
// (O(K), negligible next to the O(K*N) kernel). Returns the chunks of the sorted rows.
std::vector<Chunk> check_and_chunk(const QWeight& w, int32_t chunk_rows = detail::kChunkRows) {
  if (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8)
    invalid("bits=" + std::to_string(w.bits) + " is not supported; valid: 2, 3, 4, 8");
  const int64_t unit = w.bits == 3 ? 32 : 32 / w.bits;
  if (w.K <= 0 || w.N <= 0 || w.G <= 0 || w.K % unit)
    invalid("K=" + std::to_string(w.K) + ", N=" + std::to_string(w.N) + ", G=" + std::to_string(w.G) +
            ": K must be a positive multiple of " + std::to_string(unit) + " for " + std::to_string(w.bits) +
            "-bit, N and G positive");
  // This runs on every call (the layout is only pointers here), so the common case is cheap: a block of
  // chunk_rows rows that all hold one group is one chunk, checked with a loop the compiler vectorizes.
  std::vector<Chunk> chunks;
  chunks.reserve(size_t(w.K / chunk_rows + w.G + 1));
  int32_t prev = 0;
  for (int64_t r0 = 0; r0 < w.K; r0 += chunk_rows) {
    const int64_t r1 = std::min<int64_t>(w.K, r0 + chunk_rows);
    const int32_t g0 = w.row_group[r0];
    uint32_t differ = 0, outside = 0;
    for (int64_t r = r0; r < r1; ++r) differ |= uint32_t(w.row_group[r] ^ g0);
    if (w.perm)
      for (int64_t r = r0; r < r1; ++r) outside |= uint32_t(uint64_t(uint32_t(w.perm[r])) >= uint64_t(w.K));
    if (!differ && !outside && g0 >= prev && g0 < w.G) {
      chunks.push_back({int32_t(r0), int32_t(r1), g0});
      prev = g0;
      continue;
    }
    for (int64_t r = r0; r < r1; ++r) {  // group boundaries inside the block, or an error to name
      const int32_t g = w.row_group[r];
      if (g < prev || g >= w.G)
        invalid("row_group[" + std::to_string(r) + "]=" + std::to_string(g) + " must be nondecreasing and in [0, " +
                std::to_string(w.G) + ")");
      if (w.perm && (w.perm[r] < 0 || w.perm[r] >= w.K))
        invalid("perm[" + std::to_string(r) + "]=" + std::to_string(w.perm[r]) + " is outside [0, " +
                std::to_string(w.K) + ")");
      if (r == r0 || g != prev) chunks.push_back({int32_t(r), int32_t(r), g});
      chunks.back().r1 = int32_t(r + 1);
      prev = g;
    }
  }
  return chunks;
}

int clamp_threads(int threads, int64_t work_items) {
#ifdef _OPENMP
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, work_items)));
#else
  (void)threads, (void)work_items;
  return 1;
#endif
}

// run(y) writes fp32 results of n elements; they land in `out` directly, or through a buffer converted to bf16.
template <class Run>
void with_fp32_output(DType dtype, int64_t n, void* out, Run run) {
  if (dtype == DType::F32) return run(static_cast<float*>(out));
  thread_local std::vector<float> y;
  y.resize(n);
  run(y.data());
  uint16_t* o = static_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(y[i]);
}

void check_dtype(DType dtype) {
  if (dtype != DType::F32 && dtype != DType::BF16)
    invalid("dtype code " + std::to_string(int(dtype)) + " is not supported on the CPU; valid: 0 (fp32), 2 (bf16)");
}

}  // namespace

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx512Vnni: return "avx512vnni";
    default: return "auto";
  }
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::AvxVnni, Isa::Avx512Vnni})
    if (cpu_has(isa)) out.push_back(isa_name(isa));
  return out;
}

Isa resolve_isa(Isa requested) {
  if (requested == Isa::Auto) return cpu_has(Isa::Avx512) ? Isa::Avx512 : cpu_has(Isa::Avx2) ? Isa::Avx2 : Isa::Scalar;
  if (requested == Isa::AutoVnni) {  // the best int8 kernels: VNNI, else AVX2 (vpmaddubsw + vpmaddwd)
    if (cpu_has(Isa::Avx512Vnni)) return Isa::Avx512Vnni;
    if (cpu_has(Isa::AvxVnni)) return Isa::AvxVnni;
    if (cpu_has(Isa::Avx2)) return Isa::Avx2;
    invalid("the int8 kernels need AVX2 (or AVX-512 VNNI, AVX-VNNI), which this CPU lacks; use the exact (fp32) "
            "kernels");
  }
  if (!cpu_has(requested)) invalid("instruction set " + isa_name(requested) + " is not available on this CPU");
  return requested;
}

void qgemm(const QWeight& w, const void* x, DType dtype, int64_t M, void* out, int threads, Isa isa) {
  check_dtype(dtype);
  if (M <= 0) invalid("M=" + std::to_string(M) + " must be positive");
  if (w.int8) invalid("the fp32 kernels read the GPTQ layout, not the int8 kernels' layout");
  const std::vector<Chunk> chunks = check_and_chunk(w);
  const detail::Kernels& kern = kernels_for(resolve_isa(isa));
  const int64_t K = w.K, N = w.N, C = int64_t(chunks.size());

  // Stage x: fp32, sorted row order, and its sum over each chunk (for the zero-point term).
  thread_local std::vector<float> xs, xsum;
  xs.resize(M * K);
  xsum.assign(M * C, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xs.data() + m * K;
    for (int64_t r = 0; r < K; ++r) {
      const int64_t src = m * K + (w.perm ? w.perm[r] : r);
      dst[r] = dtype == DType::BF16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[src])
                                    : static_cast<const float*>(x)[src];
    }
    for (int64_t c = 0; c < C; ++c) {
      float s = 0.f;
      for (int32_t r = chunks[c].r0; r < chunks[c].r1; ++r) s += dst[r];
      xsum[m * C + c] = s;
    }
  }
  const detail::Problem p{&w, xs.data(), xsum.data(), chunks.data(), C, M};

  // Columns -> panels of whole register tiles, a multiple of the thread count, at most ~kPanelCols wide.
  constexpr int64_t kPanelCols = 1024;
  const int64_t tile = kern.tile_cols, tiles = (N + tile - 1) / tile;
  const int nt = clamp_threads(threads, tiles);
  int64_t panels = std::max<int64_t>(nt, (tiles * tile + kPanelCols - 1) / kPanelCols);
  panels = std::min(tiles, (panels + nt - 1) / nt * nt);
  const int64_t panel_cols = (tiles + panels - 1) / panels * tile;
  panels = (N + panel_cols - 1) / panel_cols;

  const detail::PanelFn panel = kern.panel[w.bits];
  with_fp32_output(dtype, M * N, out, [&](float* y) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < panels; ++i) panel(p, i * panel_cols, std::min(N, (i + 1) * panel_cols), y);
  });
}

// -- int8 activations ---------------------------------------------------------------------------------------------

namespace {

constexpr int unit_rows(int bits) { return bits == 3 ? 32 : 32 / bits; }

// Row (within its packing unit) of byte b of quad q: the order in which qgemm_i8.inc unpacks codes to bytes.
inline int quad_row(int bits, int q, int b) { return bits == 3 ? 4 * q + b : unit_rows(bits) / 4 * b + q; }

// Sorted row r of an int8 layout (column tiles; 3-bit in byte fields) -> the dequantized row [N] (M > 16 rows of x).
void int8_layout_row(const QWeight& w, int64_t r, float* row) {
  using detail::kTileCols;
  const int64_t N = w.N, Kw = w.K * w.bits / 32, g = w.row_group[r];
  // word rows (within a tile) and shifts of the code's bits: [low or all, high (3-bit quads 6, 7 only)]
  int64_t wi[2] = {0, 0}, sh[2] = {0, -1};
  uint32_t mask = (1u << w.bits) - 1;
  if (w.bits == 3) {  // the byte-field layout (minigptq/kernels/layout.py:_field_positions)
    const int64_t u = r / 32, s = r % 32 / 4, b = r % 4;
    if (s < 6) {
      wi[0] = 3 * u + s / 2, sh[0] = 8 * b + 3 * (s % 2);
    } else {
      wi[0] = 3 * u + s - 6, sh[0] = 8 * b + 6, wi[1] = 3 * u + 2, sh[1] = 8 * b + s, mask = 3u;
    }
  } else {
    const int64_t per = 32 / w.bits;
    wi[0] = r / per, sh[0] = w.bits * (r % per);
  }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = n / kTileCols, col = n % kTileCols, sz = (t * w.G + g) * kTileCols + col;
    const uint32_t* tile = w.qweight + t * Kw * kTileCols + col;
    uint32_t q = (tile[wi[0] * kTileCols] >> sh[0]) & mask;
    if (sh[1] >= 0) q |= ((tile[wi[1] * kTileCols] >> sh[1]) & 1u) << 2;
    row[n] = w.scales[sz] * float(int(q) - w.zeros[sz]);
  }
}

}  // namespace

void qgemm_i8(const QWeight& w, const void* x, DType dtype, int64_t M, void* out, int threads, Isa isa) {
  check_dtype(dtype);
  if (M <= 0) invalid("M=" + std::to_string(M) + " must be positive");
  // M > 16 rows: the batched kernel (qgemm_i8b.inc), which reads either layout; fewer: the int8 layout only
  const bool batched = M >= detail::kBatchMinRowsI8;
  if (!w.int8 && !batched)
    invalid("the int8 kernels read the int8 layout (make_layout(..., cpu_kernel=\"int8\")) for M <= 16 rows, got M=" +
            std::to_string(M) + " with the exact layout");
  const std::vector<Chunk> chunks = check_and_chunk(w, detail::kChunkRowsI8);
  const Isa resolved = resolve_isa(isa == Isa::Auto ? Isa::AutoVnni : isa);
  const detail::KernelsI8 kern = resolved == Isa::Avx512Vnni ? detail::avx512vnni::kernels_i8()
                                 : resolved == Isa::AvxVnni  ? detail::avxvnni::kernels_i8()
                                 : resolved == Isa::Avx2     ? detail::avx2i8::kernels_i8()
                                                             : detail::KernelsI8{};
  if (!kern.tiles[w.bits]) invalid("instruction set " + isa_name(resolved) + " has no int8 kernels; valid: " +
                                   "avx512vnni, avxvnni, avx2");
  const int U = unit_rows(w.bits), Q = U / 4;
  const int64_t K = w.K, N = w.N, C = int64_t(chunks.size());

  std::vector<detail::ChunkI8> ck(C);
  int64_t S = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int32_t u0 = chunks[c].r0 / U, u1 = (chunks[c].r1 + U - 1) / U;
    ck[c] = {chunks[c].r0, chunks[c].r1, chunks[c].g, u0, u1 - u0, S};
    S += int64_t(u1 - u0) * Q;
  }

  // Stage x: fp32 in sorted row order, then per chunk int8 with one scale, laid out in quads.
  int order[32];  // order[i] = row (within a unit) of staged byte i: byte b of quad q is row quad_row(q, b)
  for (int q = 0; q < Q; ++q)
    for (int b = 0; b < 4; ++b) order[4 * q + b] = quad_row(w.bits, q, b);
  uint8_t shuf[32];  // the same order as a pshufb pattern over 32 bytes of whole units (3-bit: units of 32, in order)
  for (int i = 0; i < 32; ++i) shuf[i] = uint8_t((U > 16 ? i : i / U * U + order[i % U]) % 16);
  thread_local std::vector<float> xs, sx, zs;
  thread_local std::vector<int32_t> xq, sxq;
  int8_t span[detail::kChunkRowsI8 + 64];  // one chunk's int8 activations in row order, whole units, zero-padded
  if (w.perm || dtype == DType::BF16) xs.resize(K);
  xq.resize(M * S);
  sx.resize(M * C);
  sxq.resize(M * C);
  zs.resize(M * C);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = static_cast<const float*>(x) + m * K;
    if (w.perm) {
      for (int64_t r = 0; r < K; ++r) {
        const int64_t src = m * K + w.perm[r];
        xs[r] = dtype == DType::BF16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[src])
                                     : static_cast<const float*>(x)[src];
      }
      xr = xs.data();
    } else if (dtype == DType::BF16) {
      const uint16_t* xb = static_cast<const uint16_t*>(x) + m * K;
      for (int64_t r = 0; r < K; ++r) xs[r] = bf16_to_f32(xb[r]);
      xr = xs.data();
    }
    for (int64_t c = 0; c < C; ++c) {
      const detail::ChunkI8& ch = ck[c];
      int8_t* dst = reinterpret_cast<int8_t*>(xq.data() + m * S + ch.xoff);
      // A whole aligned chunk (the common case): vector code, the same numbers as the loop below.
      if (ch.r1 - ch.r0 == detail::kChunkRowsI8 && ch.r0 % U == 0 &&
          kern.stage32(xr + ch.r0, shuf, dst, &sx[m * C + c], &sxq[m * C + c]))
        continue;
      const int64_t base = int64_t(ch.u0) * U, n = int64_t(ch.units) * U;
      float amax = 0.f;
      bool finite = true;
      for (int32_t r = ch.r0; r < ch.r1; ++r) {
        const float a = std::fabs(xr[r]);
        if (!std::isfinite(a)) finite = false;
        else if (a > amax) amax = a;
      }
      // as the torch reference: x * (127 / max|x|); a chunk with Inf or NaN gets codes 0 and scale NaN
      const float inv = finite && amax >= detail::kTinyI8 ? 127.f / amax : 0.f;
      std::memset(span, 0, size_t(n));
      int32_t sum = 0;
      for (int32_t r = ch.r0; r < ch.r1 && inv != 0.f; ++r) {
        // round half to even (like torch.round) by adding and removing 1.5 * 2^23; no FMA here: this file is
        // compiled with -ffp-contract=off, so x * inv is rounded to fp32 first, as in the reference
        float t = xr[r] * inv;
        t = (t + 12582912.f) - 12582912.f;
        t = std::min(127.f, std::max(-127.f, t));
        span[r - base] = int8_t(t);
        sum += int32_t(t);
      }
      for (int64_t u = 0; u < n; u += U)
        for (int i = 0; i < U; ++i) dst[u + i] = span[u + order[i]];
      sx[m * C + c] = finite ? amax / 127.f : NAN;  // NaN/Inf in x gives NaN out, as the fp32 path does
      sxq[m * C + c] = sum;
    }
    for (int64_t c = 0; c < C; ++c) {  // zs: sx * sum(xq) summed over each group's chunks, in chunk order
      const float before = c > 0 && ck[c - 1].g == ck[c].g ? zs[m * C + c - 1] : 0.f;
      zs[m * C + c] = before + sx[m * C + c] * float(sxq[m * C + c]);
    }
  }
  const detail::ProblemI8 p{&w, xq.data(), sx.data(), zs.data(), ck.data(), C, M, S};

  const int64_t tiles = (N + detail::kTileCols - 1) / detail::kTileCols;
  if (batched) {
    // Work items: (tile, block of rows), tile-major, contiguous ranges per thread, so that a thread unpacks each of
    // its tiles once. A block's int8 activations (rows x K bytes) stay in L2 while the tile's column strips pass.
    const int64_t rows = std::max<int64_t>(48, (196608 / K) / 48 * 48), blocks = (M + rows - 1) / rows;
    const int64_t items = tiles * blocks;
    const int nt = clamp_threads(threads, items);
    const detail::BatchI8Fn run = kern.batch[w.bits];
    const int64_t words = kern.batch_words(K, w.bits);
    with_fp32_output(dtype, M * N, out, [&](float* y) {
#pragma omp parallel num_threads(nt) if (nt > 1)
      {
        int i = 0;
#ifdef _OPENMP
        i = omp_get_thread_num();
#endif
        thread_local std::vector<uint32_t> buf;
        buf.resize(size_t(words));
        int64_t have = -1;
        for (int64_t it = items * i / nt; it < items * (i + 1) / nt; ++it) {
          const int64_t ti = it / blocks, m0 = it % blocks * rows;
          run(p, ti, m0, std::min(M, m0 + rows), buf.data(), &have, y);
        }
      }
    });
    return;
  }

  // Tiles -> threads: contiguous ranges of whole tiles, one per thread.
  const int nt = clamp_threads(threads, tiles);
  const detail::TilesI8Fn run = kern.tiles[w.bits];
  with_fp32_output(dtype, M * N, out, [&](float* y) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int i = 0; i < nt; ++i) run(p, tiles * i / nt, tiles * (i + 1) / nt, y);
  });
}

void dequantize(const QWeight& w, void* out, DType dtype, int threads, Isa isa) {
  check_dtype(dtype);
  check_and_chunk(w);
  const detail::DequantRowFn row_fn = w.int8 ? int8_layout_row : kernels_for(resolve_isa(isa)).dequant[w.bits];
  const int64_t K = w.K, N = w.N;
  const int nt = clamp_threads(threads, K);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> row(dtype == DType::BF16 ? N : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < K; ++r) {
      const int64_t dst = w.perm ? w.perm[r] : r;  // back to checkpoint row order
      if (dtype == DType::F32) {
        row_fn(w, r, static_cast<float*>(out) + dst * N);
      } else {
        row_fn(w, r, row.data());
        uint16_t* o = static_cast<uint16_t*>(out) + dst * N;
        for (int64_t n = 0; n < N; ++n) o[n] = f32_to_bf16(row[n]);
      }
    }
  }
}

}  // namespace minigptq
