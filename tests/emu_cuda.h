// Test-only host emulation of the CUDA subset that cuda/gpu/qgemm.cu uses, so the kernels' indexing, unpacking,
// tensor-core fragments and synchronisation are checked on machines without a GPU (tests/test_cuda_emu.py compiles
// cuda/gpu/qgemm.cu against this header with g++ after rewriting each `kernel<<<grid, block, smem, stream>>>(args)`
// into `emu_launch(grid, block, [&] { kernel(args); })`). Not part of the build.
//
// Every thread of a block is a fiber (ucontext) on one OS thread; a scheduler runs the runnable fibers in a fresh
// random order each round, so code that depends on the order of threads between two barriers gives different
// results from call to call. __syncthreads and the warp-collective operations (mma, __syncwarp) are barriers over
// the block / the warp: a barrier releases when every thread of its scope waits at the same source line, and the
// emulation fails (std::runtime_error -> RuntimeError in Python) on a barrier in divergent code (threads waiting at
// different lines, or some of them exited) or a deadlock. Blocks run one at a time in a random order, so a K-split
// reduction must not depend on which block arrives last. __shared__ variables are statics (one block at a time).
// Memory-ordering bugs (a missing __threadfence) cannot show here: the emulation is sequentially consistent.
// Dynamic shared memory is one buffer, filled with 0xFF at the start of every block (stale data is garbage).
// cp.async: a copy poisons its destination (0xFF) and marks it in flight; its data lands only when the issuing
// thread's cp.async.wait_group lets its group go, and a shared load through lds32/64/128 (qgemm.cu) of bytes still
// in flight fails the emulation. MINIGPTQ_EMU_WAIT_SLACK=n in the environment makes every wait_group keep n more
// groups in flight (a kernel that reads early: the tests check that this fails).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define MINIGPTQ_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;  // threadIdx is switched with the running fiber

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* d) { *d = 1; return cudaSuccess; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
// Resident blocks as on an H100/H200 SM: 228 KB of shared memory (1 KB reserved per block), 2048 threads.
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int threads, size_t smem) {
  *n = std::max(0, std::min(int(228 * 1024 / (smem + 1024)), 2048 / threads));
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------ fibers
enum EmuState { kRun, kBlockBar, kWarpBar, kDone };
struct EmuFiber {
  ucontext_t ctx;
  std::vector<char> stack;
  EmuState state = kRun;
  int line = 0;
};
inline std::vector<EmuFiber> g_fibers;
inline ucontext_t g_sched;
inline int g_cur = -1;
inline const std::function<void()>* g_body = nullptr;
inline std::mt19937 g_rng{std::random_device{}()};
inline long g_launches = 0;

inline void emu_fiber_entry() {
  (*g_body)();
  g_fibers[g_cur].state = kDone;
  swapcontext(&g_fibers[g_cur].ctx, &g_sched);
}

inline void emu_wait(EmuState s, int line) {
  if (g_cur < 0) throw std::runtime_error("emulated barrier outside a kernel");
  EmuFiber& f = g_fibers[g_cur];
  f.state = s, f.line = line;
  swapcontext(&f.ctx, &g_sched);
}
#define __syncthreads() emu_wait(kBlockBar, __LINE__)
#define __syncwarp(...) emu_wait(kWarpBar, __LINE__)

inline std::string g_fiber_error;  // a failure inside a fiber, thrown by the scheduler (exceptions cannot leave a fiber)
inline void emu_fail(const std::string& what) {
  if (g_cur < 0) throw std::runtime_error("CUDA emulation: " + what);
  g_fiber_error = what;
  ucontext_t dead;
  swapcontext(&dead, &g_sched);  // never resumed
}

// ------------------------------------------------------------------------------ dynamic shared memory, cp.async
struct EmuCopy {
  unsigned char* dst;
  std::vector<unsigned char> data;
  long group;
};
struct EmuAsync {
  std::vector<EmuCopy> pending;
  long committed = 0;  // groups closed so far
};
inline std::vector<unsigned char> g_dyn_smem, g_in_flight;  // buffer, and 1 per byte still in flight
inline std::vector<EmuAsync> g_async;                        // per thread
inline int g_wait_slack = 0;
inline void* emu_dyn_smem() { return g_dyn_smem.data(); }
inline bool emu_in_dyn(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  return !g_dyn_smem.empty() && c >= g_dyn_smem.data() && c < g_dyn_smem.data() + g_dyn_smem.size();
}
inline void emu_cp_async(void* dst, const void* src, int bytes, bool full) {
  if (!emu_in_dyn(dst)) emu_fail("cp.async destination outside shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (full && reinterpret_cast<uintptr_t>(src) % bytes))
    emu_fail("cp.async of " + std::to_string(bytes) + " bytes not aligned");
  auto* d = static_cast<unsigned char*>(dst);
  EmuCopy c{d, std::vector<unsigned char>(bytes, 0), 0};
  if (full) std::memcpy(c.data.data(), src, bytes);
  EmuAsync& a = g_async[threadIdx.x];
  c.group = a.committed;
  a.pending.push_back(std::move(c));
  std::memset(d, 0xFF, bytes);
  std::memset(g_in_flight.data() + (d - g_dyn_smem.data()), 1, bytes);
}
inline void emu_cp_async_commit() { ++g_async[threadIdx.x].committed; }
inline void emu_cp_async_wait(int n) {
  EmuAsync& a = g_async[threadIdx.x];
  const long keep_from = a.committed - n - g_wait_slack;  // groups >= this may stay in flight
  std::vector<EmuCopy> still;
  for (EmuCopy& c : a.pending) {
    if (c.group < keep_from) {
      std::memcpy(c.dst, c.data.data(), c.data.size());
      std::memset(g_in_flight.data() + (c.dst - g_dyn_smem.data()), 0, c.data.size());
    } else {
      still.push_back(std::move(c));
    }
  }
  a.pending.swap(still);
}
inline void emu_check_landed(const void* p, int bytes) {
  if (!emu_in_dyn(p)) return;
  const size_t o = static_cast<const unsigned char*>(p) - g_dyn_smem.data();
  for (int i = 0; i < bytes; ++i)
    if (g_in_flight[o + i])
      emu_fail("shared memory read before its cp.async group was waited for (offset " + std::to_string(o + i) + ")");
}

// Runs one block: all fibers to completion, releasing barriers as described at the top.
inline void emu_run_block(unsigned nthreads) {
  if (g_fibers.size() < nthreads) g_fibers.resize(nthreads);
  std::fill(g_dyn_smem.begin(), g_dyn_smem.end(), 0xFF);
  std::fill(g_in_flight.begin(), g_in_flight.end(), 0);
  g_async.assign(nthreads, EmuAsync{});
  for (unsigned t = 0; t < nthreads; ++t) {
    EmuFiber& f = g_fibers[t];
    if (f.stack.empty()) f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, emu_fiber_entry, 0);
    f.state = kRun;
  }
  std::vector<unsigned> order(nthreads);
  for (;;) {
    order.clear();
    for (unsigned t = 0; t < nthreads; ++t)
      if (g_fibers[t].state == kRun) order.push_back(t);
    std::shuffle(order.begin(), order.end(), g_rng);
    for (unsigned t : order) {
      g_cur = int(t);
      threadIdx = dim3(t);
      swapcontext(&g_sched, &g_fibers[t].ctx);
      if (!g_fiber_error.empty()) {
        const std::string e = "CUDA emulation: thread " + std::to_string(t) + ": " + g_fiber_error;
        g_fiber_error.clear();
        g_cur = -1;
        throw std::runtime_error(e);
      }
    }
    g_cur = -1;
    unsigned done = 0, at_block = 0;
    for (unsigned t = 0; t < nthreads; ++t) done += g_fibers[t].state == kDone, at_block += g_fibers[t].state == kBlockBar;
    if (done == nthreads) return;
    bool released = false;
    for (unsigned w = 0; w * 32 < nthreads; ++w) {  // warp barriers
      const unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
      unsigned waiting = 0;
      for (unsigned t = lo; t < hi; ++t) waiting += g_fibers[t].state == kWarpBar;
      if (waiting == 0) continue;
      for (unsigned t = lo; t < hi; ++t) {
        const EmuFiber& f = g_fibers[t];
        if (f.state == kDone) emu_fail("warp-collective operation with exited lanes in warp " + std::to_string(w));
        if (f.state == kBlockBar) emu_fail("warp " + std::to_string(w) + ": lanes at __syncthreads (line " +
                                           std::to_string(f.line) + ") and at a warp collective");
        if (f.state == kWarpBar && f.line != g_fibers[lo].line)
          emu_fail("warp " + std::to_string(w) + " diverged: collectives at lines " + std::to_string(f.line) + " and " +
                   std::to_string(g_fibers[lo].line));
      }
      if (waiting == hi - lo) {
        for (unsigned t = lo; t < hi; ++t) g_fibers[t].state = kRun;
        released = true;
      }
    }
    if (released) continue;
    if (at_block > 0 && at_block + done == nthreads) {  // every live thread waits at __syncthreads
      if (done > 0) emu_fail("__syncthreads with " + std::to_string(done) + " exited threads");
      for (unsigned t = 0; t < nthreads; ++t)
        if (g_fibers[t].line != g_fibers[0].line)
          emu_fail("__syncthreads at different lines " + std::to_string(g_fibers[t].line) + " and " +
                   std::to_string(g_fibers[0].line));
      for (unsigned t = 0; t < nthreads; ++t) g_fibers[t].state = kRun;
      continue;
    }
    emu_fail("deadlock");
  }
}

template <typename F>
void emu_launch(dim3 grid, dim3 block, size_t smem, F body) {
  ++g_launches;
  if (block.y != 1 || block.z != 1) emu_fail("only 1-D blocks are emulated");
  g_dyn_smem.assign(smem, 0xFF);
  g_in_flight.assign(smem, 0);
  const char* slack = std::getenv("MINIGPTQ_EMU_WAIT_SLACK");
  g_wait_slack = slack ? std::atoi(slack) : 0;
  gridDim = grid, blockDim = block;
  const std::function<void()> fn = body;
  g_body = &fn;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::shuffle(blocks.begin(), blocks.end(), g_rng);  // any block may be the last to arrive
  for (const dim3& b : blocks) {
    blockIdx = b;
    emu_run_block(block.x);
  }
  g_body = nullptr;
}

// ------------------------------------------------------------------------------------- vector types, memory
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
inline int atomicExch(int* p, int v) { const int o = *p; *p = v; return o; }
using std::max;
using std::min;

// ------------------------------------------------------------------------------------------- integer/bit ops
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {  // PRMT: byte i = selector nibble i of {y:x}
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

// ------------------------------------------------------------------------------------------ 16-bit floats
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return float(f); }
inline __half __float2half_rn(float v) { const _Float16 f = _Float16(v); __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(unsigned(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline __half2 __float2half2_rn(float v) { return {__float2half_rn(v), __float2half_rn(v)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float v) { return {__float2bfloat16_rn(v), __float2bfloat16_rn(v)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __half2 __low2half2(__half2 v) { return {v.x, v.x}; }
inline __half2 __high2half2(__half2 v) { return {v.y, v.y}; }
inline __nv_bfloat162 __low2bfloat162(__nv_bfloat162 v) { return {v.x, v.x}; }
inline __nv_bfloat162 __high2bfloat162(__nv_bfloat162 v) { return {v.y, v.y}; }
// fma rounded once: the exact a*b + c (a*b is exact in double for 16-bit inputs) rounded to the 16-bit type.
inline __half emu_hfma(__half a, __half b, __half c) {
  return __float2half_rn(float(double(__half2float(a)) * __half2float(b) + __half2float(c)));
}
inline __nv_bfloat16 emu_hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(float(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c)));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {emu_hfma(a.x, b.x, c.x), emu_hfma(a.y, b.y, c.y)}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {emu_hfma(a.x, b.x, c.x), emu_hfma(a.y, b.y, c.y)};
}

// ------------------------------------------------------------------------------------ tensor cores (mma.sync)
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: warp-collective. Every lane deposits its fragments, the warp
// meets at a barrier, each lane computes its 4 outputs from everyone's fragments, and the warp meets again before
// the scratch can be reused. Fragments (g = lane / 4, t = lane % 4; each 32-bit register holds 2 elements, the
// lower-indexed in the low half):
//   A (16 x 16, row-major): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16 x 8, "col"):      b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C/D (16 x 8, fp32):     c0, c1 (g, 2t, 2t+1)  c2, c3 (g+8, 2t, 2t+1)
// Products are exact and summed in double, then rounded to fp32 once (hardware differs in the last bits).
struct EmuMmaLane { uint32_t a[4], b[2]; };
inline EmuMmaLane g_mma[1024];
template <typename T>
inline float emu_elem(uint32_t reg, int half) {
  const uint16_t bits = uint16_t(reg >> (16 * half));
  if constexpr (std::is_same_v<T, __half>) return __half2float(__half{bits});
  else return __bfloat162float(__nv_bfloat16{bits});
}
template <typename T>
inline void emu_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const unsigned lane = threadIdx.x & 31, base = threadIdx.x - lane;
  EmuMmaLane& mine = g_mma[threadIdx.x];
  std::memcpy(mine.a, a, sizeof(mine.a));
  mine.b[0] = b0, mine.b[1] = b1;
  __syncwarp();
  auto A = [&](int row, int k) {
    const EmuMmaLane& l = g_mma[base + (row % 8) * 4 + (k % 8) / 2];
    return emu_elem<T>(l.a[row / 8 + 2 * (k / 8)], k % 2);
  };
  auto B = [&](int k, int n) {
    const EmuMmaLane& l = g_mma[base + n * 4 + (k % 8) / 2];
    return emu_elem<T>(l.b[k / 8], k % 2);
  };
  const int g = int(lane) / 4, t = int(lane) % 4;
  float r[4];
  for (int c = 0; c < 4; ++c) {
    const int row = g + 8 * (c / 2), col = 2 * t + c % 2;
    double s = 0;
    for (int k = 0; k < 16; ++k) s += double(A(row, k)) * double(B(k, col));
    r[c] = float(s + double(d[c]));
  }
  __syncwarp();
  for (int c = 0; c < 4; ++c) d[c] = r[c];
}
