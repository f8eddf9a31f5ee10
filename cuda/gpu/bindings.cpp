// pybind11 module minigptq._cuda_kernels: raw device pointers (tensor.data_ptr()), sizes and the CUDA stream
// handle (torch.cuda.current_stream().cuda_stream) in; no CUDA or torch headers here. minigptq/kernels/cuda.py checks
// every tensor first. std::invalid_argument arrives in Python as ValueError, std::runtime_error as RuntimeError.
// A layer is passed as the tuple `w` = (qweight, scales, zeros, perm, K, N, Kp, G, group_rows, bits, scale_bf16,
// perm_identity)
// (CudaLayout.args in minigptq/kernels/cuda_layout.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "qgemm.h"

namespace py = pybind11;
using namespace minigptq;

using WeightTuple = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, int64_t, int64_t,
                               int64_t, int, int, int>;

static cuda::CudaWeight weight(const WeightTuple& t) {
  const auto& [qweight, scales, zeros, perm, K, N, Kp, G, group_rows, bits, scale_bf16, perm_identity] = t;
  return cuda::CudaWeight{reinterpret_cast<const uint32_t*>(qweight), reinterpret_cast<const uint32_t*>(scales),
                          reinterpret_cast<const uint8_t*>(zeros),    reinterpret_cast<const int32_t*>(perm),
                          K, N, Kp, G, group_rows, bits, scale_bf16, perm_identity};
}

PYBIND11_MODULE(_cuda_kernels, m) {
  m.doc() = "GPTQ CUDA kernels (fused dequantize + matmul, dequantize); use minigptq.kernels, not this module.";
  m.def(
      "qgemm_workspace",
      [](const WeightTuple& w, int64_t M, int dtype, int sms, uintptr_t x) {
        const auto n = cuda::qgemm_workspace(weight(w), M, DType(dtype), sms, reinterpret_cast<const void*>(x));
        return std::make_tuple(n.floats, n.counters, n.xg_bytes);
      },
      py::arg("w"), py::arg("M"), py::arg("dtype"), py::arg("sms"), py::arg("x"),
      "(floats, counters, gathered-x bytes) of workspace qgemm needs for M rows of x (address x) of this dtype on a "
      "GPU with `sms` SMs.");
  m.def(
      "qgemm",
      [](const WeightTuple& w, uintptr_t x, int dtype, int64_t M, uintptr_t out, uintptr_t ws, int64_t ws_floats,
         uintptr_t counters, int64_t n_counters, uintptr_t xg, int64_t xg_bytes, int sms, uintptr_t stream) {
        cuda::qgemm(weight(w), reinterpret_cast<const void*>(x), DType(dtype), M, reinterpret_cast<void*>(out),
                    cuda::Workspace{reinterpret_cast<float*>(ws), ws_floats, reinterpret_cast<int*>(counters),
                                    n_counters, reinterpret_cast<void*>(xg), xg_bytes},
                    sms, reinterpret_cast<void*>(stream));
      },
      py::arg("w"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("out"), py::arg("ws"), py::arg("ws_floats"),
      py::arg("counters"), py::arg("n_counters"), py::arg("xg"), py::arg("xg_bytes"), py::arg("sms"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "out[M, N] = x[M, K] @ W (dtype 0 fp32, 1 fp16, 2 bf16; M <= 64, fp32 M <= 21): gather pass if needed + one "
      "fused launch; ws/counters/xg: qgemm_workspace's sizes.");
  m.def(
      "dequantize",
      [](const WeightTuple& w, uintptr_t out, int dtype, uintptr_t stream) {
        cuda::dequantize(weight(w), reinterpret_cast<void*>(out), DType(dtype), reinterpret_cast<void*>(stream));
      },
      py::arg("w"), py::arg("out"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "out[K, N] = the dequantized weight in checkpoint row order (dtype 0 fp32, 1 fp16, 2 bf16).");
  m.def("runtime_status", &cuda::runtime_status,
        "'' if the CUDA runtime this module links can reach a device, else the CUDA error message.");
}
