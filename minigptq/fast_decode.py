"""The fast decode paths, kept out of the reference model (minigptq/transformer.py) that a reader learns from:

- CPU, fp32, one token per step: CpuRMSNorm and CpuAttention run a decode-sized norm and the attention core (RoPE,
  cache write, softmax) as one C++ call each (cuda/cpu/decode.cpp); FastTransformer runs a whole Llama-family block
  as one call (cuda/cpu/decode.h: decode_block) when its layers are packed and fused. Same math as the modules, in
  the kernels' own summation order; anything else (prefill, the quantization driver's long windows, other dtypes,
  torch.compile, autograd) falls through to the reference modules, whose numbers it keeps exactly. The KV cache may
  be fp32, fp16 or bf16 (minigptq/kv_cache.py: kv_dtype); the C++ attention reads it back to fp32.
  `accelerate(model)` switches a model to these classes in place; the loader does so for every model it builds.
- Any device: StaticDecodeStep, a decode step of fixed shapes that reads nothing back to the host, and
  CudaGraphStep, which captures it in a CUDA graph and replays it per token; compiled_decode_step, the forward
  compiled by torch.compile. The generation loop (minigptq/generation.py) picks among them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import Error, rope
from .kernels import DecodeBlockPlan, cpu_attn_decode, cpu_available, cpu_decode_block, cpu_rms_norm
from .kv_cache import KVCache
from .masks import alibi_bias, attention_masks, key_positions
from .moe import MoE
from .transformer import Attention, Context, RMSNorm, Transformer


# ------------------------------------------------------------------------------------ CPU: one C++ call per step
KV_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the caches cuda/cpu/decode.cpp reads


def _cpu_fast(x: Tensor) -> bool:
    """x may take the CPU decode-step operations of cuda/cpu/decode.cpp: fp32 on the CPU, inference, not traced."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and cpu_available() \
        and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


class CpuRMSNorm(RMSNorm):
    """RMSNorm; decode-sized fp32 CPU inputs (<= 16 rows) take one C++ call (cpu_rms_norm) instead of a composite
    op: the same math in its own summation order, so longer inputs (prefill, the quantization driver) keep torch's
    numbers exactly."""

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() <= 16 * x.shape[-1] and _cpu_fast(x) and self.weight.dtype == torch.float32 and x.is_contiguous():
            return cpu_rms_norm(x, self.weight + self.offset if self.offset else self.weight, self.eps)  # Gemma: 1 + w
        return super().forward(x)


class CpuAttention(Attention):
    """Attention; one new fp32 token per sequence on the CPU runs RoPE, the cache write and the attention core as
    one C++ call (cpu_attn_decode) between the projections."""

    def forward(self, x: Tensor, ctx: Context, layer: int) -> Tensor:
        mask, _ = ctx.attn_mask(self.windowed)
        cos, sin = ctx.rope(self.windowed)
        # Gemma 2's soft-capped scores have no place in the C++ attention (its softmax takes q.k * scale + mask as
        # is): those layers run the module path. A scale other than 1 / sqrt(hd) is folded into q (_decode_step).
        if x.shape[1] == 1 and ctx.cache is not None and isinstance(ctx.start, int) and _cpu_fast(x) and \
                ctx.cache.k.dtype in KV_CPU_DTYPES and not self.softcap and \
                (cos is None or cos.dtype == torch.float32) and (mask is None or mask.is_contiguous()):
            return self.o(self._decode_step(x, ctx, layer, mask, cos, sin))
        return super().forward(x, ctx, layer)

    def _decode_step(self, x: Tensor, ctx: Context, layer: int, mask: Tensor | None, cos: Tensor | None,
                     sin: Tensor | None) -> Tensor:
        """One token per sequence on the CPU: the projections, then RoPE, the cache write and the attention in one
        call (cpu_attn_decode) -> (B, 1, heads * hd), what forward's torch path computes."""
        h, kvh, hd = self.h, self.kvh, self.hd
        if hasattr(self, "q_norm") or self.scale is not None:  # q, k as RoPE's inputs, normed / scaled in torch
            q, k, v = self.project(x)
            if self.scale is not None:  # the C++ softmax scales by 1 / sqrt(hd); RoPE is linear in q
                q = q * (self.scale * hd ** 0.5)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            q_row, kv_row, stride = h * hd, kvh * hd, hd
        elif self.per_head:  # BLOOM: per head [q; k; v]
            y = self.qkv(x).contiguous()
            q, k, v, q_row, kv_row, stride = y, y[..., hd:], y[..., 2 * hd:], 3 * h * hd, 3 * h * hd, 3 * hd
        elif self.fused is not None or hasattr(self, "qkv"):  # [q | k | v]
            y = (self.fused(x) if self.fused is not None else self.qkv(x)).contiguous()
            q, k, v = y, y[..., h * hd:], y[..., (h + kvh) * hd:]
            q_row = kv_row = (h + 2 * kvh) * hd
            stride = hd
        else:
            q, k, v = self.q(x).contiguous(), self.k(x).contiguous(), self.v(x).contiguous()
            q_row, kv_row, stride = h * hd, kvh * hd, hd
        return cpu_attn_decode(q, k, v, q_row, kv_row, stride, cos, sin, ctx.cache.k, ctx.cache.v, layer,
                               mask, h, ctx.start)


class FastTransformer(Transformer):
    """Transformer whose CPU decode steps run each block as one C++ call where every block qualifies
    (decode_plans); otherwise the blocks' own modules, which are the reference."""

    def decode_plans(self) -> list | None:
        """One DecodeBlockPlan per block when every block can run its CPU decode step as one C++ call
        (cuda/cpu/decode.h: decode_block): a Llama-family block (RMSNorm, pre-norm, SiLU-gated MLP) whose q/k/v and
        gate/up are fused packed layers, o and down packed too, fp32 norms. Else None: the modules run, which is
        also the reference. Made once; remade when a layer's kernel layout changes (e.g. after .to()).
        RoPE tables (any scaling) and masks (padding, sliding window) come from the Context, so those blocks qualify;
        Qwen3's q/k norms and Phi-3's stored qkv / gate_up layers have no place in the C++ block and run the modules."""
        cfg = self.cfg
        if cfg.norm != "rms" or not cfg.pre_norm or cfg.residual_from_norm or cfg.fused_qkv or not cfg.gated_mlp \
                or cfg.activation not in ("silu", "swish") or cfg.positions == "alibi" or cfg.qk_norm \
                or cfg.fused_gate_up or cfg.moe_layers:  # MoE blocks: moe.MoE routes, one call per active expert
            return None
        # Gemma 2 / 3 (also GeGLU, so excluded above): the C++ block has no (1 + w) norms, no norms after attention
        # and MLP, one RoPE table and 1 / sqrt(hd) scores; its layers take CpuRMSNorm / CpuAttention instead
        if cfg.sandwich_norms or cfg.norm_offset or cfg.attn_scale or cfg.attn_softcap or cfg.rope_local_theta:
            return None
        if self.__dict__.get("adapter") is not None:  # LoRA (minigptq/lora.py): the C++ block has no LoRA term
            return None
        plans = self.__dict__.get("_decode_plans")
        if plans is not None and all(p.current(b) for p, b in zip(plans, self.layers)):
            return plans
        plans = [DecodeBlockPlan.make(b, cfg) for b in self.layers]
        plans = None if any(p is None for p in plans) else plans
        self.__dict__["_decode_plans"] = plans
        return plans

    def body(self, x: Tensor, ctx: Context) -> Tensor:
        T = x.shape[1]
        plans = self.decode_plans() if T == 1 and ctx.cache is not None and isinstance(ctx.start, int) \
            and _cpu_fast(x) else None
        if plans is None or ctx.cache.k.dtype not in KV_CPU_DTYPES or \
                not all(m is None or m.is_contiguous() for m in (ctx.mask, ctx.window_mask)):
            return super().body(x, ctx)
        x = x.contiguous()  # (B, 1, hidden), updated in place block by block by one C++ call each
        for i, plan in enumerate(plans):
            mask = ctx.attn_mask(self.layers[i].attn.windowed)[0]
            cpu_decode_block(plan, x, ctx.cos, ctx.sin, ctx.cache.k, ctx.cache.v, i, mask, ctx.start)
        return x


class CpuMoE(MoE):
    """MoE; one fp32 token on the CPU (decode at batch 1) with packed, fused experts: the k routed experts' gate/up
    (one kernel call each), the SwiGLU of all k at once, their down projections (one call each) and the weighted
    sum as one matmul: about 2k + 6 torch ops instead of the reference's grouping, ~8 per expert. The same math;
    anything else runs the reference (minigptq/moe.py)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() != x.shape[-1] or not _cpu_fast(x) or self.calibrate_all is not None:
            return super().forward(x)
        x2 = x.reshape(1, -1)  # (1, d)
        w, idx = self.route(x2)  # (1, k) each
        experts = [self.experts[e] for e in idx[0].tolist()]
        if any(ex.fused is None for ex in experts):
            return super().forward(x)
        gate, up = torch.cat([ex.fused(x2) for ex in experts]).chunk(2, dim=-1)  # (k, width) each
        h = experts[0].act(gate) * up  # (k, width)
        y = w @ torch.cat([ex.down(hj) for ex, hj in zip(experts, h.split(1))])  # (1, k) @ (k, d) -> (1, d)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return y.view(x.shape)


def accelerate(model: Transformer) -> Transformer:
    """Switch `model` in place to the fast CPU decode paths: its RMSNorm, Attention, MoE and itself become CpuRMSNorm,
    CpuAttention, CpuMoE and FastTransformer (the same parameters, buffers and state_dict; only forward differs, and
    only where the fast path applies). Idempotent; returns the model."""
    for m in model.modules():
        if type(m) is RMSNorm:
            m.__class__ = CpuRMSNorm
        elif type(m) is Attention:
            m.__class__ = CpuAttention
        elif type(m) is MoE:
            m.__class__ = CpuMoE
    if type(model) is Transformer:
        model.__class__ = FastTransformer
    return model


# ----------------------------------------------------------------------- any device: static, graphed, compiled
def compiled_decode_step(model: Transformer) -> Callable[..., Tensor]:
    """model.forward compiled by torch.compile for one-token decode steps, made once per model and kept on it.

    dynamic=True: the cache slot and the number of keys change every step, so they are traced as symbols instead of
    triggering a recompilation per step. QuantLinear enters the graph as the custom op minigptq::qgemm_tensors.
    """
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = torch.compile(model.forward, dynamic=True)
        model.__dict__["_compiled_decode_step"] = step  # a plain attribute: not a submodule, not in state_dict
    return step


class StaticDecodeStep:
    """One decode step whose shapes never change and that reads nothing back to the host, so that a CUDA graph can
    capture it once and replay it for every token (CudaGraphStep).

    Where Transformer.forward slices the cache to the keys written so far and builds masks and positions on the
    host, this step writes the new key and value at a device-side slot (KVCache.update with a tensor) and attends
    over every slot of the cache, with a mask that hides the slots after the current one (and left padding, and the
    sliding window). Positions and RoPE tables of every slot are made once. The same numbers as a dynamic step up to
    rounding (the masked keys weigh exactly 0). Set `tokens` (B, 1) and `slot` (1,), then call -> logits (B, 1, V).
    """

    def __init__(self, model: Transformer, cache: KVCache, key_valid: Tensor):
        cfg, (B, S) = model.cfg, key_valid.shape
        if not self.supported(model):
            raise Error(f"{self.unsupported(model)}: the decode step has no static form (run without CUDA graphs)")
        dev, dtype = key_valid.device, model.act_dtype
        if S < cache.max_len:  # a cache longer than this generation: its later slots are never valid
            key_valid = torch.cat([key_valid, key_valid.new_zeros(B, cache.max_len - S)], dim=1)
            S = cache.max_len
        self.model, self.cache, self.key_valid = model, cache, key_valid
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(S, device=dev)
        self.kpos = key_positions(key_valid)  # (B, S)
        self.cos = self.sin = self.cos_local = self.sin_local = None
        if cfg.positions == "rope":
            self.cos, self.sin = rope.cos_sin(cfg, self.kpos, dtype)  # (B, 1, S, hd)
            if cfg.rope_local_theta:  # Gemma 3's sliding-window blocks
                self.cos_local, self.sin_local = rope.cos_sin(cfg, self.kpos, dtype, local=True)  # (B, 1, S, hd)
        # made once: the slopes' host-to-device copy may not happen inside a graph capture
        self.alibi = alibi_bias(cfg, self.kpos, dtype) if cfg.positions == "alibi" else None
        self.window = cfg.sliding_window if cfg.window_layers else 0

    @staticmethod
    def supported(model: Transformer) -> bool:
        return not StaticDecodeStep.unsupported(model)

    @staticmethod
    def unsupported(model: Transformer) -> str:
        """Why the decode step of `model` has no static form, or "" if it has one."""
        s = model.cfg.rope_scaling
        if s is not None and s.type in ("dynamic", "longrope"):
            return f"rope_scaling {s.type!r} depends on the sequence length at every step"
        if model.cfg.moe_layers:  # moe.MoE reads how many tokens each expert got to pick the experts it runs
            return "a mixture of experts reads its routing back to the host at every step"
        return ""

    def __call__(self) -> Tensor:
        m, slot = self.model, self.slot
        mask, window_mask = attention_masks(self.slots, slot, self.key_valid, self.key_valid.shape[0], self.window,
                                            m.act_dtype, self.alibi)
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos.index_select(2, slot), self.sin.index_select(2, slot)  # (B, 1, 1, hd)
        cos_local = sin_local = None
        if self.cos_local is not None:
            cos_local, sin_local = self.cos_local.index_select(2, slot), self.sin_local.index_select(2, slot)
        x = m.embed_tokens(self.tokens, self.kpos.index_select(1, slot))
        ctx = Context(mask, False, cos, sin, self.cache, slot, window_mask, cos_local, sin_local)
        for block in m.layers:
            x = block(x, ctx)
        return m.head(x)


class CudaGraphStep:
    """The static decode step captured in one CUDA graph (after a warm-up on a side stream that also pays any
    torch.compile compilation) and replayed per token: one launch of the whole step instead of hundreds of kernel
    launches and their host work. Call with the new tokens (B,) and their cache slot -> logits (B, 1, V), a buffer
    that the next call overwrites."""

    def __init__(self, model: Transformer, cache: KVCache, key_valid: Tensor, first_slot: int, compile: bool = False):
        self.step = StaticDecodeStep(model, cache, key_valid)
        self.step.slot.fill_(first_slot)  # the warm-up writes (junk) keys there only; the first real step rewrites them
        fn = torch.compile(self.step.__call__, dynamic=False) if compile else self.step.__call__
        dev = key_valid.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn()

    def __call__(self, tokens: Tensor, slot: int) -> Tensor:
        self.step.tokens.copy_(tokens.view(-1, 1))
        self.step.slot.fill_(slot)
        self.graph.replay()
        return self.logits
