"""Building minigptq's own transformer from a checkpoint folder (read by minigptq/checkpoint_reader.py).

- build_empty: the model on the meta device, a QuantLinear wherever the checkpoint holds packed weights
  (`<prefix>.qweight`): nothing is allocated and nothing random is initialised.
- load_into: the checkpoint's tensors assigned in place, after every name, shape and dtype was matched against the
  model (_plan, from the safetensors headers alone) and every floating tensor checked to be finite.
- load_model: both, then the optional speed-ups: fuse_projections (q/k/v and gate/up as one packed kernel call),
  a smaller head (quantize_head: lm_head as 8-bit RTN), and the CPU kernel choice (resolve_cpu_kernel).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import Error, kernels
from .checkpoint_reader import CheckpointReader
from .fast_decode import accelerate
from .lora import apply_adapter
from .qlinear import FusedQuantLinear, QuantLinear
from .quantizer import QuantConfig, rtn
from .transformer import MLP, Transformer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise Error(f"unknown dtype {name!r}; valid: fp32, fp16, bf16")
    return DTYPES[name]


def resolve_device(device: str, dtype: str | None = None) -> tuple[torch.device, str]:
    """A --device setting (and --dtype, None for the device's default) -> (torch.device, dtype name: fp32 on the CPU,
    fp16 on CUDA); a CUDA request without a GPU is a user error."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Error("--device cuda given but no CUDA GPU is available; use --device cpu")
    return dev, dtype or ("fp32" if dev.type == "cpu" else "fp16")


def internal_to_hf(ckpt: CheckpointReader) -> dict[str, str]:
    """Internal module path -> HF module path for this checkpoint's architecture and depth."""
    return {ours: hf for hf, ours in ckpt.arch.module_map(ckpt.cfg.num_layers, ckpt.cfg.num_experts).items()}


def build_empty(ckpt: CheckpointReader, cpu_kernel: str = "exact") -> Transformer:
    """The model on the meta device, with QuantLinear where the checkpoint holds packed weights (cpu_kernel "int8":
    they run the int8-activation kernels on a CPU that has them; "exact": fp32 arithmetic)."""
    with torch.device("meta"):
        model = Transformer(ckpt.cfg)
    if ckpt.quant is not None:
        to_hf = internal_to_hf(ckpt)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and ckpt.has(to_hf.get(name, "?") + ".qweight"):
                ql = quant_linear_like(mod, ckpt, to_hf[name])
                ql.cpu_kernel = cpu_kernel
                set_module(model, name, ql)
    return accelerate(model)  # with the fast decode paths of minigptq/fast_decode.py


CPU_KERNEL_CHOICES = ("auto",) + kernels.CPU_KERNELS  # --cpu-kernel: auto resolves to one of the kernels' choices


def resolve_cpu_kernel(cpu_kernel: str) -> bool:
    """The cpu_kernel setting, "auto" / "int8" / "exact" -> whether packed layers run the int8-activation kernels on
    the CPU ("auto": where the CPU has them)."""
    if cpu_kernel not in CPU_KERNEL_CHOICES:
        raise Error(f"cpu_kernel={cpu_kernel!r} is not one of {', '.join(CPU_KERNEL_CHOICES)}")
    if cpu_kernel == "int8" and not kernels.cpu_int8_available():
        raise Error(f"--cpu-kernel int8 needs AVX2, AVX-VNNI or AVX-512 VNNI; this CPU / build offers "
                    f"{kernels.cpu_isas() or 'no compiled kernels'}; use --cpu-kernel exact")
    return cpu_kernel == "int8" or (cpu_kernel == "auto" and kernels.cpu_int8_available())


def quant_linear_like(linear: nn.Linear, ckpt: CheckpointReader, hf_name: str) -> nn.Module:
    q = ckpt.quant
    scales = hf_name + ".scales"  # a missing or integer one is reported by _plan, naming it
    dtype = ckpt.get(scales).dtype if ckpt.has(scales) else torch.float16
    try:
        with torch.device("meta"):
            ql = QuantLinear(linear.in_features, linear.out_features, q["bits"], q["group_size"],
                             bias=linear.bias is not None, dtype=dtype if dtype.is_floating_point else torch.float16)
    except ValueError as e:
        raise Error(f"{ckpt.path}: {hf_name}: {e}") from None
    ql.checkpoint_format = q["checkpoint_format"]
    return ql


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _plan(model: Transformer, ckpt: CheckpointReader, prefix: str) -> list[tuple[str, nn.Module, str]]:
    """Match the model's tensors under `prefix` with the checkpoint's -> [(HF name, module, leaf)].

    Checks names and shapes only (the safetensors headers), so it is cheap: missing, unexpected or misshapen
    tensors raise ValueError naming them before any data is read.
    """
    to_hf = internal_to_hf(ckpt)
    expected = {}  # internal tensor name -> (module, leaf, shape)
    for mname, mod in model.named_modules():
        for leaf, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = f"{mname}.{leaf}" if mname else leaf
            if full.startswith(prefix) and not (full == "lm_head.weight" and ckpt.cfg.tie_word_embeddings):
                expected[full] = (mod, leaf, tuple(t.shape), t.dtype)
    wanted_hf = {to_hf[n.rpartition(".")[0]] + "." + n.rpartition(".")[2]: n for n in expected}
    missing = [hf for hf in wanted_hf if not ckpt.has(hf)]
    if missing:
        raise Error(f"{ckpt.path}: {len(missing)} tensor(s) missing from the checkpoint: "
                    f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    hf_prefixes = tuple(h + "." for o, h in to_hf.items() if (o + ".").startswith(prefix) or not prefix)
    unexpected = [n for n in ckpt.names() if n.startswith(hf_prefixes) and n not in wanted_hf
                  and not n.endswith(("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias"))
                  and not (n == f"{to_hf['lm_head']}.weight" and ckpt.cfg.tie_word_embeddings)]
    if not prefix:
        unexpected += [n for n in ckpt.names() if not n.startswith(tuple(h + "." for h in to_hf.values()))
                       and not n.startswith(ckpt.arch.ignored)]  # e.g. Gemma 3's vision tower
    if unexpected:
        raise Error(f"{ckpt.path}: {len(unexpected)} unexpected tensor(s) in the checkpoint: "
                    f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    plan = []
    for hf, ours in wanted_hf.items():
        mod, leaf, shape, want = expected[ours]
        t = ckpt.get(hf)
        got = tuple(t.shape)
        kind_ok = t.is_floating_point() if want.is_floating_point else \
            (t.dtype == want if leaf in ("qweight", "qzeros") else t.dtype in (torch.int16, torch.int32, torch.int64))
        if not kind_ok:
            valid = "a floating dtype (F32, F16, BF16)" if want.is_floating_point else \
                ("int32" if leaf in ("qweight", "qzeros") else "an integer dtype")
            raise Error(f"{ckpt.path}: tensor {hf} is stored as {str(t.dtype).removeprefix('torch.')}; "
                        f"valid: {valid}")
        if got != shape:
            if isinstance(mod, QuantLinear):
                q = ckpt.quant
                raise Error(f"{ckpt.path}: tensor {hf} has shape {list(got)}, but the quantize_config "
                            f"(bits={q['bits']}, group_size={q['group_size']}) and config.json imply "
                            f"{list(shape)}; the quantization config disagrees with the tensors")
            raise Error(f"{ckpt.path}: tensor {hf} has shape {list(got)}, expected {list(shape)} "
                        f"from config.json")
        plan.append((hf, mod, leaf))
    return plan


def check_checkpoint(ckpt: CheckpointReader) -> None:
    """Validate every tensor name and shape of a checkpoint against its config, reading headers only."""
    _plan(build_empty(ckpt), ckpt, "")


def load_into(model: Transformer, ckpt: CheckpointReader, prefix: str = "", dtype: torch.dtype | None = None,
              device="cpu", copy: bool = False) -> None:
    """Assign the checkpoint's tensors to every parameter/buffer of `model` whose internal name starts with `prefix`.

    Floating tensors are cast to `dtype` (None: keep the checkpoint's), except the packed layers' own tensors
    (QuantLinear keeps fp16 scales whatever the activation dtype). Name, shape or dtype problems and NaN/Inf in a
    tensor (as stored, or after the cast) raise ValueError naming the tensor.
    copy: give every tensor its own memory even where no cast or move is needed. Without it such tensors are views
    of the memory-mapped file; writing into them (the quantization driver does) would turn the mapped pages into
    private copies that live as long as the mapping.
    """
    for hf, mod, leaf in _plan(model, ckpt, prefix):
        t = src = ckpt.get(hf)
        keep = isinstance(mod, QuantLinear) and leaf != "bias"
        if t.is_floating_point():
            check_finite(t, f"{ckpt.path}: tensor {hf}")
            if dtype is not None and not keep:
                t = t.to(dtype)
                check_finite(t, f"{ckpt.path}: tensor {hf}", "load it in fp32 or bf16 (--dtype)")
        t = t.to(device, copy=copy and t.data_ptr() == src.data_ptr())
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
    if ckpt.cfg.tie_word_embeddings and "lm_head.weight".startswith(prefix):
        model.lm_head.weight = model.embed.weight
    to_hf = internal_to_hf(ckpt)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name.startswith(prefix.rstrip(".")):
            try:
                mod.post_load()
            except ValueError as e:
                raise Error(f"{ckpt.path}: {to_hf.get(name, name)}: {e}") from None


def check_finite(t: Tensor, what: str, fix: str = "") -> None:
    """Raise ValueError if t holds NaN or +-Inf. `what` names the tensor; `fix` says what to do when the values
    only overflow t's dtype (they were finite before a cast)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        hint = f"; its values overflow {str(t.dtype).removeprefix('torch.')}: {fix}" if fix else ""
        raise Error(f"{what} holds {n} non-finite value(s) ({kind}){hint}")


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device="cpu",
               head_dtype: str | torch.dtype | None = None, cpu_kernel: str = "auto", fuse: bool = True,
               adapter: str | Path | None = None) -> Transformer:
    """Load a checkpoint folder (full precision or GPTQ) -> Transformer in eval mode, on `device`.

    dtype: fp32/fp16/bf16 for the floating tensors, or None for the checkpoint's own dtype.
    head_dtype: store the token embedding and lm_head in this dtype instead (e.g. bf16 with fp32 activations:
    in small models they are most of the bytes read per token); "int8" = lm_head quantized to 8 bits (RTN,
    groups of 128, run by the packed kernels) and the embedding table in bf16; None = dtype.
    cpu_kernel: for packed layers on the CPU, "int8" = activations quantized to int8 per chunk of 32 inputs and
    integer dot products (AVX-512 VNNI / AVX-VNNI / AVX2; about 0.5% relative error per layer, see docs/kernels.md),
    "exact" = fp32 arithmetic, "auto" = int8 where the CPU runs it (any x86-64 with AVX2), else exact.
    fuse: run packed q/k/v and gate/up as one kernel call each (same outputs; fewer calls per token).
    adapter: a PEFT LoRA adapter folder applied on top (minigptq/lora.py: the base stays packed).
    """
    kernel = "int8" if resolve_cpu_kernel(cpu_kernel) else "exact"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Error(f"device {device!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Error(f"device {str(device)!r} requested but no CUDA GPU is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise Error(f"device {str(device)!r} is not supported; valid: cpu, cuda")
    ckpt = CheckpointReader(path)
    model = build_empty(ckpt, cpu_kernel=kernel)
    load_into(model, ckpt, "", parse_dtype(dtype), device)
    if fuse:
        fuse_projections(model)
    if head_dtype == "int8":
        quantize_head(model, cpu_kernel=kernel)
    elif head_dtype is not None:
        head_dtype = parse_dtype(head_dtype)
        for mod in (model.embed, model.lm_head):
            mod.weight = nn.Parameter(mod.weight.to(head_dtype), requires_grad=False)
        if ckpt.cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
    if adapter is not None:
        apply_adapter(model, adapter, internal_to_hf(ckpt))
    model.checkpoint = ckpt  # keeps the memory maps alive as long as the model
    return model.eval()


def fuse_projections(model: Transformer) -> int:
    """Give every block's attention (q, k, v) and gated MLP (gate, up; each expert's and the shared expert's in a
    mixture of experts) one FusedQuantLinear where their packed layers can share a layout; returns how many were
    fused."""
    n = 0
    for block in model.layers:
        mlps = [m for m in block.mlp.modules() if isinstance(m, MLP)]  # the MLP itself, or a MoE's experts
        for mod, names in [(block.attn, ("q", "k", "v"))] + [(m, ("gate", "up")) for m in mlps]:
            parts = [getattr(mod, name, None) for name in names]
            if all(p is not None for p in parts) and FusedQuantLinear.compatible(parts):
                mod.fused = FusedQuantLinear(parts)
                n += 1
    return n


def quantize_head(model: Transformer, group_size: int = 128, cpu_kernel: str = "exact") -> None:
    """Replace lm_head by an 8-bit QuantLinear (round-to-nearest, symmetric, groups of `group_size`); store the
    embedding table in bf16. At 8 bits RTN is near-lossless; the head is then a quarter of its fp32 bytes."""
    W = model.lm_head.weight.detach()  # (vocab, token_dim)
    gs = group_size if W.shape[1] % group_size == 0 or W.shape[1] > group_size else -1
    res = rtn(W, QuantConfig(bits=8, group_size=gs))
    head = QuantLinear.from_codes(res.qweight, res.scales.to(torch.float16), res.zeros, res.g_idx, None, 8, gs,
                                  cpu_kernel=cpu_kernel)
    model.lm_head = head.to(W.device)
    model.embed.weight = nn.Parameter(model.embed.weight.to(torch.bfloat16), requires_grad=False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers; shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
