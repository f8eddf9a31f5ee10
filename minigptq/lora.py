"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on minigptq models, in PEFT's folder format.

    y = base(x) + scaling * B (A x)        A [r, K], B [N, r]; scaling = alpha / r (rsLoRA: alpha / sqrt(r))

The base stays as loaded: a QuantLinear keeps its packed weights and kernels, the adapter adds two small matmuls
beside them (LoRALinear). Where the loader fused q/k/v or gate/up into one packed kernel call (FusedQuantLinear),
LoRAFused keeps that one call and adds each part's LoRA output to its slice. In training (x requires grad) a packed
base takes minigptq/qlinear_grad.py, whose backward reads the packed weights tile by tile.

A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, whose keys are
`base_model.model.<HF module name>.lora_A.weight` / `.lora_B.weight`. read_adapter checks everything against the
model before anything is changed (one-line Error naming the offending key or setting); apply_adapter wraps the
model's linears; merge_into adds scaling * B @ A to full-precision weights (quantize --adapter); save_adapter writes
the folder back in PEFT's format so that PEFT + transformers load it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import Error
from .checkpoint_reader import SafetensorsFile
from .durable import save_tensors, write_json
from .qlinear import FusedQuantLinear, QuantLinear
from .qlinear_grad import packed_linear

PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the transformers model)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# PEFT settings that change what the adapter computes and that minigptq does not implement: (key, harmless values)
REFUSED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "use_qalora": (False, None),
           "lora_bias": (False, None), "bias": ("none", None), "modules_to_save": (None, []),
           "layer_replication": (None, []), "target_parameters": (None, []), "trainable_token_indices": (None, {}),
           "alora_invocation_tokens": (None, []), "megatron_config": (None, {}), "velora_config": (None, {}),
           "use_bdlora": (None, False), "arrow_config": (None, {})}
# Initialisations that also change the base weights (the adapter is only right on that modified base)
BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoRAWeights:
    """One linear's adapter: A [r, in_features], B [out_features, r] (float32) and the factor of B A."""
    A: Tensor
    B: Tensor
    scaling: float


def targeted(name: str, targets, exclude=None) -> bool:
    """Whether the HF module `name` is named by PEFT's target_modules (a regex for the whole name, a list of name
    suffixes, or "all-linear") and not by exclude_modules (same forms); PEFT's check_target_module_exists rules."""
    def match(spec) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return spec == "all-linear" and name != "lm_head" or re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)
    return match(targets) and not match(exclude)


def _linears(model: nn.Module, to_hf: dict[str, str]) -> dict[str, tuple[str, nn.Module]]:
    """HF module name -> (internal name, module) for every linear an adapter may target."""
    return {to_hf[n]: (n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and n in to_hf}


def read_adapter(path: str | Path, model: nn.Module, to_hf: dict[str, str]) -> dict[str, LoRAWeights]:
    """Read and check the PEFT LoRA adapter folder `path` against `model` (internal -> HF module names `to_hf`)
    -> {internal module name: LoRAWeights}. Anything it cannot apply exactly is an Error naming it."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(path)!r} not found (expected a PEFT LoRA folder with {CONFIG} "
                                f"and {WEIGHTS})")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG}; is it a PEFT adapter folder?")
    if not (folder / WEIGHTS).is_file():
        bin_ = " (adapter_model.bin is not read: save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder}: no {WEIGHTS}{bin_}")
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Error(f"{folder / CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise Error(f"{folder / CONFIG} must hold a JSON object, got {type(cfg).__name__}")
    where = f"adapter {folder}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise Error(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; valid: LORA")
    for key, ok in REFUSED.items():
        if cfg.get(key) not in ok:
            what = "DoRA (use_dora)" if key == "use_dora" else f"{key}={cfg[key]!r}"
            raise Error(f"{where}: {what} is not supported by minigptq; valid: {key}={ok[0]!r} (plain LoRA)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INIT):
        raise Error(f"{where}: init_lora_weights={init!r} changes the base weights too, so the adapter does not fit "
                    f"this base; convert it to a plain LoRA with PEFT (path_initial_model_for_weight_conversion)")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for what, v in [("r", r), ("lora_alpha", alpha)] + [(f"rank_pattern[{k!r}]", v) for k, v in ranks.items()] + \
            [(f"alpha_pattern[{k!r}]", v) for k, v in alphas.items()]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (what[0] == "r" and v != int(v)):
            raise Error(f"{where}: {what}={v!r} must be a positive {'integer' if what[0] == 'r' else 'number'}")
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    if not isinstance(targets, (str, list)) or not targets:
        raise Error(f"{where}: target_modules={targets!r} must be a non-empty list of module names or a regex")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise Error(f"{where}: target_modules={targets!r} must hold module names (strings)")
    for what, spec in [("target_modules", targets), ("exclude_modules", exclude)] + \
            [("rank_pattern", k) for k in ranks] + [("alpha_pattern", k) for k in alphas]:
        try:
            if isinstance(spec, str):
                re.compile(spec)
        except re.error as e:
            raise Error(f"{where}: {what} {spec!r} is not a valid regular expression ({e})") from None
    linears = _linears(model, to_hf)
    leaves = sorted({hf.rpartition(".")[2] for hf in linears})
    if isinstance(targets, list):  # PEFT refuses a name that matches nothing; so do we, with the valid ones
        unknown = [t for t in targets if not any(hf == t or hf.endswith("." + t) for hf in linears)]
        if unknown:
            raise Error(f"{where}: target_modules {unknown} name no linear layer of this model; valid: {leaves}")
    tensors = SafetensorsFile(folder / WEIGHTS)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key in tensors.keys():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            kind = "DoRA magnitude" if "lora_magnitude_vector" in key else \
                "an embedding LoRA" if "lora_embedding" in key else "not a LoRA A/B weight"
            raise Error(f"{where}: tensor {key!r} ({kind}) is not supported; valid keys: "
                        f"{PREFIX}<module>.lora_A.weight / .lora_B.weight")
        hf, which = m.groups()
        if hf not in linears:
            raise Error(f"{where}: tensor {key!r} targets {hf!r}, which is not a linear layer of this model "
                        f"({len(linears)} linears named like {', '.join(leaves)})")
        if not targeted(hf, targets, exclude):
            raise Error(f"{where}: tensor {key!r} is for {hf!r}, which target_modules={targets!r} does not name")
        pairs.setdefault(hf, {})[which] = tensors.get(key)
    missing = [hf for hf in linears if targeted(hf, targets, exclude) and hf not in pairs]
    if missing and cfg.get("layers_to_transform") is None:
        raise Error(f"{where}: {WEIGHTS} has no weights for {len(missing)} module(s) that target_modules names: "
                    f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    out = {}
    for hf, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise Error(f"{where}: {hf} has lora_{next(iter(ab))} but no lora_{'B' if 'A' in ab else 'A'}")
        name, lin = linears[hf]
        rank = ranks[_pattern(ranks, hf)] if _pattern(ranks, hf) else r
        a = alphas[_pattern(alphas, hf)] if _pattern(alphas, hf) else alpha
        A, B = ab["A"], ab["B"]
        want_a, want_b = [rank, lin.in_features], [lin.out_features, rank]
        if list(A.shape) != want_a or list(B.shape) != want_b:
            raise Error(f"{where}: {hf} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but this model's "
                        f"{hf} is [{lin.out_features}, {lin.in_features}] and r={rank}, so valid shapes are {want_a} "
                        f"and {want_b}; the adapter was made for another base model")
        if not A.is_floating_point() or not B.is_floating_point():
            raise Error(f"{where}: {hf}'s lora weights are {A.dtype} / {B.dtype}; valid: a floating dtype")
        for which, t in (("A", A), ("B", B)):
            if not bool(torch.isfinite(t).all()):
                raise Error(f"{where}: {PREFIX}{hf}.lora_{which}.weight holds {int((~torch.isfinite(t)).sum())} "
                            f"non-finite value(s) (NaN or Inf)")
        scaling = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        out[name] = LoRAWeights(A.float().clone(), B.float().clone(), float(scaling))
    return out


def _pattern(patterns: dict, name: str) -> str | None:
    """PEFT's get_pattern_key: the first rank_pattern / alpha_pattern key that matches the end of `name`."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(dropout(x))); the base (nn.Linear or QuantLinear) is frozen, A and B are trained."""

    def __init__(self, base: nn.Module, w: LoRAWeights, dropout: float = 0.0):
        super().__init__()
        self.base, self.scaling = base, w.scaling
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B = nn.Parameter(w.A), nn.Parameter(w.B)  # (r, K), (N, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: Tensor) -> Tensor:
        """scaling * B A x for x (..., K) -> (..., N), in the adapter's dtype and back."""
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # (..., r)
        return ((h @ self.lora_B.T) * self.scaling).to(x.dtype)  # (..., N)

    def forward(self, x: Tensor) -> Tensor:
        return base_forward(self.base, x) + self.delta(x)


def base_forward(base: nn.Module, x: Tensor) -> Tensor:
    """A frozen base's output; a packed one under autograd takes qlinear_grad (no fp32 weight kept for backward)."""
    if isinstance(base, QuantLinear) and x.requires_grad and torch.is_grad_enabled():
        return packed_linear(x, base)
    return base(x)


class FrozenPacked(nn.Module):
    """A packed linear without an adapter, in a model being trained: its input's gradient by qlinear_grad too (the
    QuantLinear's own differentiable path would keep its dequantized fp32 weight until backward)."""

    def __init__(self, base: QuantLinear):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return base_forward(self.base, x)


def freeze_packed(model: nn.Module) -> int:
    """Wrap every packed linear that has no adapter in FrozenPacked (for training); returns how many."""
    n = 0
    for parent in list(model.modules()):
        if isinstance(parent, (LoRALinear, FrozenPacked)):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                setattr(parent, name, FrozenPacked(child))
                n += 1
    return n


class LoRAFused:
    """A FusedQuantLinear (one packed kernel call for q/k/v or gate/up) with its parts' adapters added to their
    output slices; parts without an adapter add nothing. Under autograd the parts run one by one instead (the
    fused kernel has no backward). A plain object like the FusedQuantLinear it wraps."""

    def __init__(self, fused: FusedQuantLinear, parts: list[nn.Module]):
        self.fused, self.parts, self.splits = fused, parts, fused.splits

    def __call__(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return torch.cat([p(x) if isinstance(p, LoRALinear) else base_forward(p, x) for p in self.parts], dim=-1)
        y = self.fused(x)  # (..., sum of splits)
        start = 0
        for p, n in zip(self.parts, self.splits):
            if isinstance(p, LoRALinear):
                y[..., start:start + n] += p.delta(x)
            start += n
        return y


def apply_adapter(model: nn.Module, adapter: str | Path | dict[str, LoRAWeights], to_hf: dict[str, str],
                  dropout: float = 0.0) -> dict[str, LoRAWeights]:
    """Wrap the linears the adapter (a PEFT folder, or read_adapter's result) targets in LoRALinear, in place;
    fused projections keep their one kernel call (LoRAFused). Returns the adapter's weights."""
    weights = adapter if isinstance(adapter, dict) else read_adapter(adapter, model, to_hf)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise Error("the model already has an adapter; load the model again to use another one")
    for name, w in weights.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), w, dropout))
    for mod in model.modules():  # attention (q, k, v) and MLP (gate, up) fused by the loader
        fused = mod.__dict__.get("fused")
        if isinstance(fused, FusedQuantLinear):
            names = [n for n in ("q", "k", "v", "gate", "up") if hasattr(mod, n)]
            parts = [getattr(mod, n) for n in names]
            if any(isinstance(p, LoRALinear) for p in parts):
                mod.fused = LoRAFused(fused, parts)
    model.__dict__["adapter"] = weights  # fast_decode: no one-call C++ block with an adapter (it has no LoRA term)
    return weights


def new_adapter(model: nn.Module, to_hf: dict[str, str], targets: list[str], r: int, alpha: float,
                rslora: bool = False, seed: int = 0) -> dict[str, LoRAWeights]:
    """Fresh weights for the linears named by `targets` (HF name suffixes, or ["all-linear"]), initialised as PEFT
    does: A Kaiming-uniform (a = sqrt(5)), B zero, so the adapted model starts equal to the base."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise Error(f"rank r={r!r} must be a positive integer")
    linears = _linears(model, to_hf)
    spec = "all-linear" if targets == ["all-linear"] else targets
    chosen = sorted((hf for hf in linears if targeted(hf, spec)), key=lambda hf: linears[hf][0])
    leaves = sorted({hf.rpartition(".")[2] for hf in linears})
    unknown = [t for t in targets if t != "all-linear" and not any(targeted(hf, [t]) for hf in linears)]
    if unknown or not chosen:
        raise Error(f"target modules {unknown or targets} name no linear layer of this model; valid: {leaves} or "
                    f"all-linear")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for hf in chosen:
        name, lin = linears[hf]
        bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)): bound = sqrt(3) * sqrt(1/3) / sqrt(K)
        A = (torch.rand(r, lin.in_features, generator=g) * 2 - 1) * bound  # (r, K)
        out[name] = LoRAWeights(A, torch.zeros(lin.out_features, r), alpha / math.sqrt(r) if rslora else alpha / r)
    return out


def adapter_tensors(model: nn.Module, to_hf: dict[str, str]) -> dict[str, Tensor]:
    """The model's adapter under PEFT's key names (float32 CPU copies)."""
    return {f"{PREFIX}{to_hf[n]}.lora_{w}.weight": getattr(m, f"lora_{w}").detach().float().cpu().clone()
            for n, m in model.named_modules() if isinstance(m, LoRALinear) for w in "AB"}


def save_adapter(model: nn.Module, to_hf: dict[str, str], out: str | Path, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, base: str = "") -> None:
    """Write the model's adapter as a PEFT LoRA folder (each file atomically), loadable by PeftModel.from_pretrained."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, to_hf)
    leaves = sorted({k.rsplit(".", 2)[0].rpartition(".")[2] for k in tensors})  # "...q_proj.lora_A.weight" -> q_proj
    save_tensors(out / WEIGHTS, tensors)
    write_json(out / CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
        "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": leaves, "use_rslora": rslora,
        "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None})


@torch.no_grad()
def merge_into(model: nn.Module, weights: dict[str, LoRAWeights], prefix: str = "", exclude: str | None = None) -> int:
    """W += scaling * B @ A (computed in float64) for every adapted full-precision linear under `prefix` and not under
    `exclude`; returns how many were merged. A packed (QuantLinear) target is an Error: merge before quantizing."""
    n = 0
    for name, w in weights.items():
        if not name.startswith(prefix) or (exclude is not None and name.startswith(exclude)):
            continue
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise Error(f"cannot merge the adapter into {name}: it is {type(lin).__name__}, not a full-precision "
                        f"linear; merge into the full-precision model (quantize --adapter)")
        delta = (w.B.double() @ w.A.double()) * w.scaling  # (N, K)
        lin.weight.copy_((lin.weight.double() + delta).to(lin.weight.dtype))
        n += 1
    return n
