"""Which loaders will take a GPTQ checkpoint, and why not, from its written config and tensors alone.

The rules, gathered from the loaders' sources (transformers 5, GPTQModel 7.7, vLLM 0.21 and 0.22+):
- transformers (through GPTQModel): bits 2/3/4/8, symmetric or asymmetric, v1 ("gptq") or v2 ("gptq_v2"),
  act-order (desc_act) with any g_idx.
- GPTQModel: the same, except asymmetric v1 checkpoints written by another tool: it refuses them (old AutoGPTQ files
  corrupted wrapped zero points), so minigptq writes asymmetric checkpoints for it with --format gptq_v2.
- vLLM current (0.22 and later, one AutoGPTQConfig for every GPTQ checkpoint): symmetric 4- or 8-bit v1 only,
  `desc_act: false`.
- vLLM older (0.21, exllama kernels): bits 2/3/4/8, symmetric, or asymmetric in v2; act-order allowed.
- None of them loads a checkpoint whose tensors contradict config.json and the quantization config (transformers and
  vLLM stop at the first size mismatch): the shapes are checked first.
- Both vLLMs fuse the projections that read the same input (q/k/v -> qkv_proj, gate/up -> gate_up_proj: the
  true-sequential groups of more than one linear): they must be all quantized or all kept. Their kernels need the
  group size to divide every quantized layer's input width, and trust `desc_act`: with `desc_act: false` g_idx must be
  the trivial k // group_size.
- Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; docs/models.md): GPTQModel loads the experts as separate packed
  linears (Qwen2-MoE, Qwen3-MoE; its Mixtral wants transformers 5's renamed experts). transformers 5 does not: it
  fuses each block's experts into one 3-D parameter that its GPTQ loader leaves alone. vLLM's fused-MoE layer stacks
  the experts of a block into one tensor per projection (w13 = [gate | up], w2 = down) and runs them with its MoE
  GPTQ kernels (Marlin MoE; MoE-WNA16 where a shape or group size does not suit Marlin), so every routed expert of a
  block must be quantized alike (none kept) and the router (and Qwen2-MoE's shared_expert_gate) must stay in full
  precision, as minigptq writes them. From vLLM's sources as we know them; no vLLM runs here to check it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import Error
from .checkpoint_reader import CheckpointReader
from .loader import build_empty, internal_to_hf

LOADERS = ("transformers", "GPTQModel", "vLLM current (>= 0.22)", "vLLM older (0.21)")


@dataclass
class Verdict:
    loader: str
    ok: bool
    reasons: list[str] = field(default_factory=list)  # why not (empty when ok)


def trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True if g_idx is k // group_size (all 0 for group_size -1): act-order left no trace that a loader needs."""
    K = g_idx.numel()
    gs = K if group_size == -1 else group_size
    return bool(torch.equal(g_idx.to(torch.int64).cpu(), torch.arange(K) // max(gs, 1)))


def layer_facts(ckpt: CheckpointReader) -> tuple[dict[str, dict], list[str]]:
    """-> ({quantized layer (HF name): {"K", "trivial"}}, [problems with fused groups])."""
    q = ckpt.quant
    layers = {}
    for name in ckpt.names():
        if name.endswith(".qweight"):
            prefix = name[:-len(".qweight")]
            g_idx = ckpt.get(prefix + ".g_idx") if ckpt.has(prefix + ".g_idx") else None
            shape = ckpt.get(name).shape  # a misshapen qweight is reported by tensor_problems, not here
            K = shape[0] * 32 // q["bits"] if len(shape) == 2 else 0
            layers[prefix] = dict(K=K, trivial=g_idx is None or trivial_g_idx(g_idx, q["group_size"]))
    fused = []
    to_hf = internal_to_hf(ckpt)
    for i in range(ckpt.cfg.num_layers):
        for group in ckpt.arch.groups(ckpt.cfg, i):  # a MoE block: each expert's gate / up too
            if len(group) > 1:
                names = [to_hf[f"layers.{i}.{m}"] for m in group]
                done = [n in layers for n in names]
                if any(done) and not all(done):
                    fused.append(f"{', '.join(n for n, d in zip(names, done) if d)} quantized but "
                                 f"{', '.join(n for n, d in zip(names, done) if not d)} kept")
    return layers, fused


def moe_problems(ckpt: CheckpointReader, layers: dict[str, dict]) -> list[str]:
    """Why vLLM's fused-MoE layer would not take the experts: some of a block's experts quantized and others kept,
    or a quantized router. Empty for a dense model."""
    to_hf, out = internal_to_hf(ckpt), []
    for i in ckpt.cfg.moe_layers:
        experts = [to_hf[f"layers.{i}.mlp.experts.{e}.{p}"] for e in range(ckpt.cfg.num_experts)
                   for p in ("gate", "up", "down")]
        kept = [n for n in experts if n not in layers]
        if kept and len(kept) < len(experts):
            out.append(f"its fused-MoE layer stacks all experts of a block, which must be quantized alike: "
                       f"{kept[0]} is kept in full precision")
        if to_hf[f"layers.{i}.mlp.router"] in layers:
            out.append(f"the router {to_hf[f'layers.{i}.mlp.router']} must stay in full precision")
    return out[:2]


def quantizer_names(q: dict) -> tuple[list[str], str]:
    """-> (the tools named by the quantization config's meta.quantizer, a note when that field is malformed).
    GPTQModel writes {"meta": {"quantizer": ["gptqmodel:X"]}}; another shape names no tool."""
    meta = q.get("meta")
    if meta is None:
        return [], ""
    if not isinstance(meta, dict):
        return [], f"meta is {repr(meta)[:80]}, not an object: ignored"
    tools = meta.get("quantizer")
    tools = [tools] if isinstance(tools, str) else [] if tools is None else tools
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        return [], f"meta.quantizer is {repr(tools)[:80]}, not a list of tool names: ignored"
    return tools, ""


def tensor_problems(ckpt: CheckpointReader) -> list[str]:
    """The tensors whose shape contradicts config.json and the quantization config (bits, group size), or that a
    packed layer lacks: with one, no loader takes the checkpoint. Reads the safetensors headers only."""
    q = ckpt.quant
    packed = [n[:-len(".qweight")] for n in ckpt.names() if n.endswith(".qweight")]
    if not packed:
        return ["it holds no packed tensors (qweight): a GPTQ quantization config over full-precision weights"]
    missing = [f"{p}.{leaf}" for p in packed for leaf in ("qzeros", "scales") if not ckpt.has(f"{p}.{leaf}")]
    if missing:
        return [f"{m} is missing (a packed layer needs qweight, qzeros and scales)" for m in missing]
    try:
        model = build_empty(ckpt)  # on the meta device: the shapes config.json and bits / group_size imply
    except ValueError as e:
        return [str(e)]
    to_hf, out = internal_to_hf(ckpt), []
    for mname, mod in model.named_modules():
        for leaf, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            hf = f"{to_hf.get(mname, mname)}.{leaf}"
            if ckpt.has(hf) and tuple(ckpt.get(hf).shape) != tuple(t.shape):
                out.append(f"{hf} has shape {list(ckpt.get(hf).shape)}, but config.json (and bits={q['bits']}, "
                           f"group_size={q['group_size']}) imply {list(t.shape)}")
    return out


def report(path: str | Path) -> list[Verdict]:
    """One Verdict per loader in LOADERS for the checkpoint folder `path`."""
    ckpt = CheckpointReader(path)
    q = ckpt.quant
    if q is None:
        raise Error(f"{path} is not a GPTQ checkpoint (no quantization_config)")
    bits, gs, sym, desc_act, fmt = q["bits"], q["group_size"], q["sym"], q["desc_act"], q["checkpoint_format"]
    bad = tensor_problems(ckpt)
    if bad:
        why = f"it will not load: {bad[0]}" + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
        return [Verdict(name, False, [why]) for name in LOADERS]
    layers, fused = layer_facts(ckpt)
    quantizer = " ".join(quantizer_names(q)[0]).lower()
    nontrivial = [n for n, f in layers.items() if not f["trivial"]]
    indivisible = [f"{n} (in_features {f['K']})" for n, f in layers.items() if gs != -1 and f["K"] % gs]

    common_vllm = moe_problems(ckpt, layers)
    if fused:
        common_vllm.append(f"it fuses q/k/v and gate/up, which must be all quantized or all kept: {fused[0]}"
                           f"{f' (and {len(fused) - 1} more)' if len(fused) > 1 else ''}")
    if indivisible:
        common_vllm.append(f"group_size {gs} must divide every quantized layer's input width: {indivisible[0]}")
    if nontrivial and not desc_act:
        common_vllm.append(f"desc_act is false but {nontrivial[0]} has an act-order g_idx, which it would ignore")

    current = list(common_vllm)
    if bits not in (4, 8):
        current.append(f"only 4- and 8-bit GPTQ checkpoints are served; this one is {bits}-bit")
    if not sym:
        current.append("only symmetric checkpoints are served; this one is asymmetric (sym: false)")
    if desc_act:
        current.append("desc_act: true is refused (act-order with --static-groups writes desc_act: false)")
    if fmt != "gptq":
        current.append(f"checkpoint_format {fmt!r}: only v1 ('gptq') is read")

    older = list(common_vllm)
    if not sym and fmt != "gptq_v2":
        older.append("asymmetric checkpoints are read correctly only in checkpoint_format gptq_v2")

    gptqmodel = []
    if not sym and fmt == "gptq" and "gptqmodel" not in quantizer:
        gptqmodel.append("it refuses asymmetric v1 checkpoints written by other tools; write --format gptq_v2")
    transformers = []
    if ckpt.cfg.moe_layers:  # checked with transformers 5.23 and GPTQModel 7.7 (tests/test_moe.py)
        transformers.append("transformers 5 holds each block's experts as one fused 3-D parameter, which its GPTQ "
                            "loader does not replace: the packed experts are dropped and re-initialised at random")
        if ckpt.cfg.model_type == "mixtral" and ckpt.arch.alias is not None:  # the original names, not RENAMED
            gptqmodel.append("GPTQModel 7.7 reads Mixtral experts only under transformers 5's names (mlp.experts.{e}."
                             "gate_proj), not the block_sparse_moe.experts.{e}.w1 names kept here (which vLLM reads)")
        if len(ckpt.cfg.moe_layers) < ckpt.cfg.num_layers:
            gptqmodel.append("GPTQModel 7.7 leaves the dense blocks of a MoE model (mlp_only_layers, "
                             "decoder_sparse_step) unpacked")
    return [Verdict("transformers", not transformers, transformers), Verdict("GPTQModel", not gptqmodel, gptqmodel),
            Verdict(LOADERS[2], not current, current), Verdict(LOADERS[3], not older, older)]


def format_report(path: str | Path, verdicts: list[Verdict]) -> str:
    width = max(len(v.loader) for v in verdicts)
    lines = [f"compatibility of {path}:"]
    for v in verdicts:
        lines.append(f"  {v.loader:<{width}}  {'yes' if v.ok else 'no: ' + v.reasons[0]}")
        lines += [f"  {'':<{width}}      {r}" for r in v.reasons[1:]]
    return "\n".join(lines)
