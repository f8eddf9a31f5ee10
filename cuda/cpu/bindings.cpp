// pybind11 module minigptq._cpu_kernels: raw pointers (tensor.data_ptr()) and sizes in, nothing allocated here.
// minigptq/kernels/cpu.py checks dtypes, shapes and contiguity before calling; C++ exceptions of type
// std::invalid_argument arrive in Python as ValueError. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "decode.h"
#include "gptq.h"
#include "qgemm.h"

namespace py = pybind11;
using namespace minigptq;

namespace {

// The fixed part of one block's decode step: its packed layers and norms, made once per block (DecodeBlockPlan in
// minigptq/kernels/cpu.py) and kept; each step then passes only x, the position and the cache.
struct BlockPlan {
  QWeight layers[4];  // qkv, o, gate_up, down
  DecodeBlock blk;
};

using LayerPtrs = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t, int64_t, int>;

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "GPTQ CPU kernels (fused dequantize + matmul, dequantize); use minigptq.kernels, not this module.";
  m.def(
      "gptq_block",
      [](uintptr_t W1, int64_t N, int64_t b, uintptr_t Hinv1, int64_t ldh, uintptr_t S, uintptr_t Z, float maxq,
         uintptr_t codes, uintptr_t err, int threads) {
        gptq_block(reinterpret_cast<float*>(W1), N, b, reinterpret_cast<const float*>(Hinv1), ldh,
                   reinterpret_cast<const float*>(S), reinterpret_cast<const float*>(Z), maxq,
                   reinterpret_cast<float*>(codes), reinterpret_cast<float*>(err), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "qgemm",
      [](uintptr_t x, int dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         uintptr_t row_group, uintptr_t perm, int64_t K, int64_t N, int64_t G, int bits, uintptr_t out,
         int threads, int isa) {
        qgemm(make_qweight(qweight, scales, zeros, row_group, perm, K, N, G, bits), reinterpret_cast<const void*>(x),
              DType(dtype), M, reinterpret_cast<void*>(out), threads, Isa(isa));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("row_group"), py::arg("perm"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("bits"),
      py::arg("out"), py::arg("threads"), py::arg("isa"), py::call_guard<py::gil_scoped_release>(),
      "out[M, N] = x[M, K] @ W (dtype 0 = fp32, 2 = bf16 for x and out); perm = 0 for none; isa 0 = auto.");
  m.def(
      "qgemm_i8",
      [](uintptr_t x, int dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         uintptr_t row_group, uintptr_t perm, int64_t K, int64_t N, int64_t G, int bits, uintptr_t out,
         int threads, int isa, int int8) {
        QWeight w = make_qweight(qweight, scales, zeros, row_group, perm, K, N, G, bits);
        w.int8 = int8;
        qgemm_i8(w, reinterpret_cast<const void*>(x), DType(dtype), M, reinterpret_cast<void*>(out), threads, Isa(isa));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("row_group"), py::arg("perm"), py::arg("K"), py::arg("N"), py::arg("G"), py::arg("bits"),
      py::arg("out"), py::arg("threads"), py::arg("isa"), py::arg("int8") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "qgemm with int8 activations and integer dot products (VNNI, or AVX2 vpmaddubsw); isa 0 = auto (best int8). "
      "int8 = 1: qweight in the int8 layout; 0: the exact kernels' layout (M > 16 rows only, the batched kernel).");
  m.def(
      "dequantize",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t row_group, uintptr_t perm, int64_t K,
         int64_t N, int64_t G, int bits, uintptr_t out, int dtype, int threads, int isa, int int8) {
        QWeight w = make_qweight(qweight, scales, zeros, row_group, perm, K, N, G, bits);
        w.int8 = int8;
        dequantize(w, reinterpret_cast<void*>(out), DType(dtype), threads, Isa(isa));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("row_group"), py::arg("perm"), py::arg("K"),
      py::arg("N"), py::arg("G"), py::arg("bits"), py::arg("out"), py::arg("dtype"), py::arg("threads"),
      py::arg("isa"), py::arg("int8") = 0, py::call_guard<py::gil_scoped_release>(),
      "out[K, N] = the dequantized weight in checkpoint row order (dtype 0 = fp32, 2 = bf16); int8 = 1 for the "
      "int8 layout.");
  m.def(
      "rms_norm",
      [](uintptr_t x, uintptr_t w, float eps, int64_t M, int64_t D, uintptr_t out) {
        rms_norm(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w), eps, M, D,
                 reinterpret_cast<float*>(out));
      },
      py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("M"), py::arg("D"), py::arg("out"),
      "out[M, D] = w * x / sqrt(mean(x^2) + eps), fp32.");
  m.def(
      "attn_decode",
      [](uintptr_t q, uintptr_t k, uintptr_t v, int64_t q_row, int64_t kv_row, int64_t head_stride, uintptr_t cos,
         uintptr_t sin, uintptr_t k_cache, uintptr_t v_cache, uintptr_t mask, int64_t mask_heads,
         int64_t mask_stride, uintptr_t out, int64_t B, int64_t H, int64_t KVH, int64_t hd, int64_t Smax,
         int64_t slot, int threads, int kv_type) {
        const auto f = [](uintptr_t p) { return reinterpret_cast<const float*>(p); };
        attn_decode(DecodeAttn{f(q), f(k), f(v), q_row, kv_row, head_stride, f(cos), f(sin),
                               reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache), f(mask),
                               mask_heads, mask_stride, reinterpret_cast<float*>(out), B, H, KVH, hd, Smax, slot,
                               KvType(kv_type)},
                    threads);
      },
      "One decode step of attention (RoPE, KV-cache write, softmax attention), fp32 activations; the cache "
      "kv_type 0 = fp32, 1 = fp16, 2 = bf16; see cuda/cpu/decode.h.");
  py::class_<BlockPlan>(m, "BlockPlan", "The fixed pointers and sizes of one block for decode_block.");
  m.def(
      "block_plan",
      [](std::vector<LayerPtrs> layers, std::vector<uintptr_t> biases, uintptr_t attn_norm, uintptr_t mlp_norm,
         float eps, int int8, int64_t D, int64_t H, int64_t KVH, int64_t hd, int64_t F) {
        if (layers.size() != 4 || biases.size() != 4) throw std::invalid_argument("block_plan: 4 layers, 4 biases");
        auto plan = std::make_unique<BlockPlan>();
        for (int i = 0; i < 4; ++i) {
          const auto& [qw, sc, z, rg, pm, K, N, G, bits] = layers[i];
          plan->layers[i] = make_qweight(qw, sc, z, rg, pm, K, N, G, bits);
          plan->layers[i].int8 = int8;
        }
        const auto f = [](uintptr_t p) { return reinterpret_cast<const float*>(p); };
        plan->blk = DecodeBlock{f(attn_norm), f(mlp_norm), eps, &plan->layers[0], &plan->layers[1],
                                &plan->layers[2], &plan->layers[3], f(biases[0]), f(biases[1]), f(biases[2]),
                                f(biases[3]), int8, D, H, KVH, hd, F};
        return plan;
      },
      "A BlockPlan from 4 layers (qweight, scales, zeros, row_group, perm, K, N, G, bits) and 4 bias pointers "
      "(0 = none), in the order qkv, o, gate_up, down.");
  m.def(
      "decode_block",
      [](const BlockPlan& plan, uintptr_t x, int64_t B, uintptr_t cos, uintptr_t sin, uintptr_t k_cache,
         uintptr_t v_cache, uintptr_t mask, int64_t mask_heads, int64_t mask_stride, int64_t Smax, int64_t slot,
         int threads, int kv_type) {
        const auto f = [](uintptr_t p) { return reinterpret_cast<const float*>(p); };
        const DecodeBlock& b = plan.blk;
        DecodeAttn a{nullptr, nullptr, nullptr, 0, 0, 0, f(cos), f(sin), reinterpret_cast<void*>(k_cache),
                     reinterpret_cast<void*>(v_cache), f(mask), mask_heads, mask_stride, nullptr, B, b.H, b.KVH,
                     b.hd, Smax, slot, KvType(kv_type)};
        decode_block(b, reinterpret_cast<float*>(x), a, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "One block's decode step in place on x[B, D] (cuda/cpu/decode.h: decode_block); k/v_cache: this layer's, "
      "of kv_type (0 = fp32, 1 = fp16, 2 = bf16).");
  m.def("available_isas", &available_isas, "Instruction sets this CPU can run, best last.");
  m.def(
      "resolve_isa", [](int isa) { return isa_name(resolve_isa(Isa(isa))); },
      "Name of the instruction set a request (0 auto, 1 scalar, 2 avx2, 3 avx512, 4 avxvnni, 5 avx512vnni, "
      "6 best int8) runs; ValueError if unavailable.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
