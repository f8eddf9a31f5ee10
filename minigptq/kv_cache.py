"""The KV cache: keys and values of every layer, preallocated for the whole run after a memory check, written in
place at each step (gpt-fast's static cache), grown between the turns of a chat.

KVCache.update writes through two torch custom ops while torch.compile traces it (kv_write, kv_write_at), so that the
write stays in place instead of becoming a copy of the whole cache per layer; eager calls write directly.

The cache may be narrower than the activations (kv_dtype: "auto" keeps it in fp16 on the CPU when the model runs in
fp32, half the bytes that every decode step reads): keys and values are rounded to it when written, and read back
in the activations' dtype, so attention still computes in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import Error
from .config import ModelConfig
from .memory import available_memory


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# "auto" on the CPU for an fp32 model: fp16, 10 mantissa bits to bf16's 7. bench/results/kv_cache_cpu.json (SmolLM2
# 4-bit): both give the fp32 cache's greedy tokens on the 5 prompts, fp16's logits 10x closer (max |diff| 0.02 vs
# 0.2 of logits up to 40), and the attention reads both at the same speed (F16C converts fp16 on every x86-64 chip
# with AVX2). fp16 overflows past 65504, which bf16 does not: generation's non-finite error names --kv-dtype bf16.
CPU_HALF = torch.float16


def resolve_kv_dtype(name: str | torch.dtype, act_dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype for --kv-dtype `name` ("auto", "fp32", "fp16", "bf16" or a torch dtype of those) and a
    model whose activations are act_dtype on `device`. auto: fp16 on the CPU when the model runs in fp32, else the
    activations' dtype."""
    if isinstance(name, torch.dtype) and name in KV_DTYPES.values():
        return name
    if name == "auto":
        return CPU_HALF if torch.device(device).type == "cpu" and act_dtype == torch.float32 else act_dtype
    if name not in KV_DTYPES:
        raise Error(f"kv_dtype must be one of auto, {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def check_kv_memory(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device, hint: str) -> None:
    """Refuse a KV cache of max_len slots that cannot fit in the memory available (as quantize's check_memory does):
    a one-line error with the sizes and `hint`, how the caller's user can ask for less (e.g. "lower --context")."""
    need = 2 * cfg.num_layers * batch * cfg.num_kv_heads * max_len * cfg.head_dim * dtype.itemsize
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        raise Error(f"the KV cache for {max_len} tokens x batch {batch} ({cfg.num_layers} layers x "
                    f"{cfg.num_kv_heads} kv heads x {cfg.head_dim}, {dtype}) needs {gib(need)} but only {gib(free)} "
                    f"of {torch.device(device).type} memory is available; {hint}")


class KVCache:
    """Keys and values of every layer: k, v (layers, B, kv_heads, max_len, head_dim), allocated up front for max_len
    slots once check_kv_memory agrees; grow() makes a longer one keeping what was written (a chat's conversation)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device,
                 hint: str = "ask for fewer tokens"):
        check_kv_memory(cfg, batch, max_len, dtype, device, hint)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cfg, self.max_len = cfg, max_len

    def grow(self, max_len: int, hint: str = "ask for fewer tokens") -> None:
        """Make room for max_len slots, the slots written so far kept. New tensors: a decode step built on the old
        ones (fast_decode.StaticDecodeStep, CudaGraphStep) must be built again; generate() builds them per call, so
        grow between calls."""
        L, B, H, S, D = self.k.shape
        if max_len <= S:
            return
        check_kv_memory(self.cfg, B, max_len, self.k.dtype, self.k.device, hint)  # the old pair is still held
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(L, B, H, max_len, D)
            new[:, :, :, :S] = old
            setattr(self, name, new)
            del old  # one old tensor at a time: the peak is the new pair plus one old tensor
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor, start: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, kv_heads, T, hd) at slots start..start+T; return all keys/values up to there, in k's dtype
        (a cache narrower than k rounds them when written: the returned ones are those rounded values).
        start as a tensor (1,) on the cache's device (the static-shape decode step of CUDA graphs, T = 1): the slot is
        read on the device, and every slot is returned (the caller masks those after it)."""
        dt = k.dtype
        k, v = k.to(self.k.dtype), v.to(self.k.dtype)  # no copy when the dtypes agree
        if isinstance(start, Tensor):
            if torch.compiler.is_compiling():
                kv_write_at(self.k, self.v, k, v, layer, start)
            else:
                self.k[layer].index_copy_(2, start, k)
                self.v[layer].index_copy_(2, start, v)
            return self.k[layer].to(dt), self.v[layer].to(dt)
        end = start + k.shape[2]
        if torch.compiler.is_compiling():  # an opaque in-place op: traced as a slice assignment, the write
            kv_write(self.k, self.v, k, v, layer, start)  # would become a copy of the whole cache every layer
        else:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end].to(dt), self.v[layer, :, :, :end].to(dt)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@torch.library.custom_op("minigptq::kv_write", mutates_args=("k_cache", "v_cache"))
def kv_write(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, layer: int, start: int) -> None:
    """KVCache.update's write as one op for torch.compile: k, v (B, kv_heads, T, hd) into slots start..start+T."""
    end = start + k.shape[2]
    k_cache[layer, :, :, start:end] = k
    v_cache[layer, :, :, start:end] = v


@torch.library.custom_op("minigptq::kv_write_at", mutates_args=("k_cache", "v_cache"))
def kv_write_at(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, layer: int, slot: Tensor) -> None:
    """KVCache.update's write at a device-side slot (1,) as one op for torch.compile: k, v (B, kv_heads, 1, hd)."""
    k_cache[layer].index_copy_(2, slot, k)
    v_cache[layer].index_copy_(2, slot, v)
