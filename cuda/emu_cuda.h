// Test-only host emulation of the CUDA subset cuda_qgemm.cu uses, so the kernels' indexing, unpacking and
// synchronisation are checked on machines without a GPU (tests/test_kernels.py compiles cuda_qgemm.cu against
// this header with g++ after rewriting each `kernel<<<grid, block, smem, stream>>>(args)` into
// `emu_launch(grid, block, [&] { kernel(args); })`). Not part of the build. Every block runs as blockDim.x
// std::threads with a std::barrier for __syncthreads, one block at a time, so __shared__ can be a local static.
// EMU_SMS sets the multiprocessor count the launchers see (it changes how K is split across blocks).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* d) { *d = 1; return cudaSuccess; }
#ifndef EMU_SMS
#define EMU_SMS 132
#endif
inline int g_sms = EMU_SMS;
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = g_sms; return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct short4 { short x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  return unsigned(((uint64_t(hi) << 32) | lo) >> (sh & 31));
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline std::mutex g_atomic;
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> l(g_atomic);
  const float o = *p;
  *p = o + v;
  return o;
}
using std::min;
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline int g_launches = 0;
template <typename F> void emu_launch(dim3 grid, dim3 block, F body) {
  ++g_launches;
  gridDim = grid; blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(block.x);
        g_barrier = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block.x; ++t)
          ts.emplace_back([&, t] { threadIdx = dim3(t); blockIdx = dim3(bx, by, bz); body(); });
        for (auto& th : ts) th.join();
      }
}
