// The small operations of a CPU decode step (decode.cpp). fp32 activations; the KV cache fp32 or half precision;
// raw pointers, no torch headers.
#pragma once
#include <cstdint>

namespace minigptq {

// out[M][D] = w * (x * 1/sqrt(mean(x^2) + eps)) per row: RMSNorm as minigptq/transformer.py computes it in fp32.
void rms_norm(const float* x, const float* w, float eps, int64_t M, int64_t D, float* out);

// The KV cache's element type: fp32, or half the bytes as fp16 / bf16. A new key or value is rounded to it to the
// nearest even, as torch's .to() rounds; attention reads the cache back to fp32 and accumulates in fp32.
enum class KvType : int { F32 = 0, F16 = 1, BF16 = 2 };

// One new token per sequence: rotate q and k (RoPE, rotate-half; cos/sin null = no rotation), write k and v into the
// cache at `slot`, attend over slots [0, slot] with an optional additive mask, write out[B][H*hd].
// q/k/v head h of row b starts at q + b * q_row + h * head_stride (k and v: kv_row), so one fused q|k|v output
// (head_stride hd) and BLOOM's per-head [q; k; v] layout (head_stride 3 hd) are both read in place.
struct DecodeAttn {
  const float *q, *k, *v;
  int64_t q_row, kv_row, head_stride;
  const float *cos, *sin;       // [B][hd] for this token's position, or null
  void *k_cache, *v_cache;      // this layer's [B][KVH][Smax][hd], of kv_type
  const float* mask;            // [B][mask_heads][mask_stride] additive (-inf = masked), or null
  int64_t mask_heads, mask_stride;
  float* out;                   // [B][H*hd]
  int64_t B, H, KVH, hd, Smax, slot;
  KvType kv_type = KvType::F32;
};
void attn_decode(const DecodeAttn& a, int threads);  // threads: OpenMP threads over (sequence, kv head)

// One Llama-family block for one new token per sequence, in place on x[B][D]:
//   x += o(attn(rope(qkv(rms_norm(x)))));  x += down(silu(gate) * up) with [gate | up] = gate_up(rms_norm(x))
// The four packed linears run the fused kernels (int8 ones where `int8` is set), attention is attn_decode.
// The reference, and the fallback everywhere else, is Block.forward in minigptq/transformer.py.
struct QWeight;  // qweight.h
struct DecodeBlock {
  const float *attn_norm, *mlp_norm;  // [D] RMSNorm weights
  float eps;
  const QWeight *qkv, *o, *gate_up, *down;  // packed [q | k | v], o, [gate | up], down
  const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;  // fp32 or null
  int int8;                                 // 1: the int8-activation kernels (layouts made for them)
  int64_t D, H, KVH, hd, F;                 // hidden, heads, kv heads, head dim, intermediate
};
void decode_block(const DecodeBlock& blk, float* x, const DecodeAttn& attn, int threads);

}  // namespace minigptq
