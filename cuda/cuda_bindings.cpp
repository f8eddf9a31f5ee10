// pybind11 module minigptq._cuda_kernels: raw device pointers (tensor.data_ptr()), sizes and the CUDA stream
// handle (torch.cuda.current_stream().cuda_stream) in; no CUDA or torch headers here. minigptq/kernels.py checks
// every tensor first. std::invalid_argument arrives in Python as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "cuda_qgemm.h"

namespace py = pybind11;
using namespace minigptq;

PYBIND11_MODULE(_cuda_kernels, m) {
  m.doc() = "GPTQ CUDA kernels (fused dequantize + matmul, dequantize); use minigptq.kernels, not this module.";
  m.def(
      "qgemm",
      [](uintptr_t x, int dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         uintptr_t row_group, uintptr_t perm, int64_t K, int64_t N, int64_t G, int bits, uintptr_t work,
         uintptr_t out, uintptr_t stream) {
        cuda::qgemm(make_qweight(qweight, scales, zeros, row_group, perm, K, N, G, bits),
                    reinterpret_cast<const void*>(x), DType(dtype), M, reinterpret_cast<float*>(work),
                    reinterpret_cast<void*>(out), reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("row_group"), py::arg("perm"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("bits"),
      py::arg("work"), py::arg("out"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "out[M, N] = x[M, K] @ W (dtype 0 fp32, 1 fp16, 2 bf16); work: fp32 [M, N] scratch; perm = 0 for none.");
  m.def(
      "dequantize",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t row_group, uintptr_t perm, int64_t K,
         int64_t N, int64_t G, int bits, uintptr_t out, int dtype, uintptr_t stream) {
        cuda::dequantize(make_qweight(qweight, scales, zeros, row_group, perm, K, N, G, bits),
                         reinterpret_cast<void*>(out), DType(dtype), reinterpret_cast<void*>(stream));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("row_group"), py::arg("perm"), py::arg("K"),
      py::arg("N"), py::arg("G"), py::arg("bits"), py::arg("out"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "out[K, N] = the dequantized weight in checkpoint row order (dtype 0 fp32, 1 fp16, 2 bf16).");
  m.def("runtime_status", &cuda::runtime_status,
        "'' if the CUDA runtime this module links can reach a device, else the CUDA error message.");
}
