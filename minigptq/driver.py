"""The layer-by-layer quantization driver: one loop for every architecture (GPTQ paper, section 4 and Algorithm 1's
outer loop; docs/algorithm.md).

    inputs of block 0 <- embeddings of the calibration windows
    for each block:                                                          quantize_checkpoint
        load its full-precision weights (only this block's; freed after)
        for each true-sequential group of linears (arch.sequential),         quantize_block
        e.g. [q,k,v] -> [o] -> [up,gate] -> [down]:
            run the block on every window, accumulating H = 2/n sum X X^T    hessian_pass
            at the group's input (the forward stops right there: nothing after the group is needed yet)
            solve each linear of the group with GPTQ (minigptq/gptq.py)      solve
            or RTN, pack it (QuantLinear), and put the *packed* weights      _use_packed
            back so later groups and blocks see exactly what the checkpoint holds
        run the block with its quantized weights -> inputs of the next block  next_inputs
The finished block's tensors go to the resumable work folder (minigptq/checkpoint_writer.py); the passes over the
calibration windows are in minigptq/passes.py, the solver in minigptq/gptq.py.
RTN without calibration (calib None) runs none of the passes: each linear is rounded from its own weight alone.
"""
from __future__ import annotations

import copy
import json
import math
import re
import sys
import time
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import Error
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import PartialRun, tensor_digest
from .compat import trivial_g_idx
from .gptq import Hessian, gptq
from .loader import build_empty, check_finite, internal_to_hf, load_into
from .lora import merge_into
from .memory import set_mmap_threshold, trim_heap
from .moe import expert_of, route_all
from .pack import can_pack, dequantize, pack_cols, unpack_cols
from .passes import Replay, hessian_pass, make_replays, next_inputs
from .qlinear import QuantLinear
from .quantizer import QuantConfig, QuantResult, rtn


@torch.inference_mode()
def quantize_checkpoint(ckpt: CheckpointReader, calib: Tensor | None, qcfg: QuantConfig, run: PartialRun,
                        method: str = "gptq", device="cpu", out_dtype=torch.float16,
                        log: Callable[[str], None] = print, fmt: str = "gptq", fused_all_or_none: bool = False,
                        act_dtype: torch.dtype = torch.float32, progress: bool = False,
                        moe_min_share: float = 0.01, adapter: dict | None = None) -> dict:
    """Quantize every block of `ckpt` with calibration windows calib (n, seqlen) into `run`'s work folder. calib
    None (method "rtn" only): no forward pass; each linear's log record holds its weight error (rtn without H).

    fmt: "gptq" (v1: qzeros hold zero - 1) or "gptq_v2" (raw zeros). fused_all_or_none: when one linear of a
    true-sequential group cannot be packed, keep the whole group in full precision (vLLM fuses q/k/v and gate/up).
    act_dtype: the dtype the calibration activations are kept in between blocks (bf16/fp16 halve their memory; the
    blocks still compute in fp32). log receives one line per block; progress: also show a progress bar (tqdm).
    Returns the tensors outside the blocks (HF names, out_dtype) for run.finish(). Blocks already in `run`
    (--resume) are not solved again: their saved tensors are replayed to rebuild the next block's inputs.
    moe_min_share: a routed expert that fewer than this share of the calibration tokens reach is calibrated on all
    of them (docs/algorithm.md).
    """
    if ckpt.quant is not None:
        raise Error(f"{ckpt.path} is already a GPTQ checkpoint; quantize the full-precision model instead")
    device = torch.device(device)
    set_mmap_threshold()
    model = build_empty(ckpt)
    to_hf = internal_to_hf(ckpt)
    for name, _ in model.named_children():  # everything outside the blocks, in fp32 for the computation
        if name != "layers":
            load_into(model, ckpt, name, torch.float32, device)
    merge_into(model, adapter or {}, exclude="layers.")  # quantize --adapter: a LoRA on lm_head, merged before
    top = top_tensors(model, ckpt, out_dtype)  # before any work: they must be finite in the output dtype
    if calib is None and method != "rtn":
        raise Error(f"--method {method} needs calibration windows")
    n, T = (0, 1) if calib is None else calib.shape
    ctx, pos = model.context(1, T, device, torch.float32)
    xs = [model.embed_tokens(calib[j:j + 1].to(device), pos).to(act_dtype) for j in range(n)]  # n x (1, T, hidden)
    # GPTAQ (minigptq/gptaq.py): the full-precision model's block inputs, carried alongside xs (twice the memory of
    # the activations, plus a full-precision copy of the current block); None otherwise
    xs_fp = [x.clone() for x in xs] if method == "gptaq" else None  # n x (1, T, hidden)
    done = run.done_blocks()
    L = ckpt.cfg.num_layers
    t_start = time.perf_counter()
    bar = tqdm(total=L, desc="quantizing", unit="block", disable=not progress, file=sys.stderr, leave=False)
    for i in range(L):
        load_into(model, ckpt, f"layers.{i}.", torch.float32, device, copy=True)  # ours to overwrite, freed below
        merge_into(model, adapter or {}, f"layers.{i}.")  # quantize --adapter: W += s B A, then calibrate and solve
        block = model.layers[i]
        source = block_source(ckpt, i)
        fp_block = None if xs_fp is None else copy.deepcopy(block)  # GPTAQ: stays full precision
        if i in done:
            _restore_block(block, run.load_block(i, source), to_hf, i, qcfg, fmt)
            log(f"block {i + 1}/{L}: resumed from {run.block_file(i).name}")
            replays = []
        else:
            replays = make_replays(block, xs, act_dtype, device) if xs else []
            tensors, records = quantize_block(block, i, xs, ctx, replays, ckpt, qcfg, method, fmt, fused_all_or_none,
                                              out_dtype, log, bar, fp=None if fp_block is None else (fp_block, xs_fp),
                                              min_tokens=math.ceil(moe_min_share * n * T))
        if calib is not None:
            next_inputs(block, xs, ctx, replays, act_dtype, ckpt, i)
        if fp_block is not None:  # GPTAQ: the full-precision model's inputs of the next block
            next_inputs(fp_block, xs_fp, ctx, [], act_dtype, ckpt, i)
            fp_block = None
        for r in replays:
            r.stop()
        if i not in done:
            run.save_block(i, tensors, records, source)
            errs = [r["error"] for r in records if r["method"] == method]
            log(f"block {i + 1}/{L} done: mean error {sum(errs) / max(len(errs), 1):.4g}, "
                f"{time.perf_counter() - t_start:.0f}s")
        bar.update(1)
        model.layers[i] = block.to("meta")  # free this block's weights before loading the next
        trim_heap()
    bar.close()
    return top


def quantize_block(block: nn.Module, i: int, xs: list[Tensor], ctx, replays: list[Replay], ckpt: CheckpointReader,
                   qcfg: QuantConfig, method: str, fmt: str, fused_all_or_none: bool, out_dtype: torch.dtype,
                   log: Callable[[str], None], bar: tqdm, fp: tuple[nn.Module, list[Tensor]] | None = None,
                   min_tokens: int = 1) -> tuple[dict[str, Tensor], list[dict]]:
    """Solve block i group by group (true-sequential order), leaving its linears computing with their packed weights
    -> (the block's tensors to store, under HF names, one log record per linear)."""
    to_hf = internal_to_hf(ckpt)
    tensors, records, skip = {}, [], set()
    for group in ckpt.arch.groups(ckpt.cfg, i):  # a MoE block: its experts one after another
        linears = {name: block.get_submodule(name) for name in group}
        unpackable = _unpackable(linears, qcfg.bits, fused_all_or_none, [to_hf[f"layers.{i}.{n}"] for n in group])
        # nothing in the group solved: no Hessian needed
        # GPTAQ (fp = (full-precision block, its inputs)): also the group's input in the full-precision model
        fp_group = None if fp is None else (fp[0], fp[0].get_submodule(group[0]), fp[1])
        if fp is not None and expert_of(group[0]) is not None:  # the two models would route different tokens
            raise Error(f"--method gptaq does not support MoE experts ({to_hf[f'layers.{i}.{group[0]}']}); "
                        f"use --method gptq")
        H = None if all(unpackable.values()) or not xs else hessian_pass(block, list(linears.values()), xs, ctx,
                                                                            replays, fp=fp_group)
        # MoE: an expert's Hessian is from the tokens routed to it; below min_tokens, from every token (the routing
        # bypassed for this pass only; docs/algorithm.md), so no expert is left with a Hessian of too few tokens
        routed, note, expert = None if H is None else H.n, "", expert_of(group[0])
        if H is not None and expert is not None and H.n < min_tokens:
            note = f"all tokens: {H.n} routed < {min_tokens}"
            log(f"  {to_hf[f'layers.{i}.{group[0]}']}: {note}")
            with route_all(block.mlp, expert):
                H = hessian_pass(block, list(linears.values()), xs, ctx, replays, fp=fp_group)
        prepared = {}  # what the group's linears share of the solver's work (gptq's `shared`)
        for name, lin in linears.items():
            hf = to_hf[f"layers.{i}.{name}"]
            t0 = time.perf_counter()
            if unpackable[name]:
                records.append(dict(block=i, module=hf, method="kept", error=0.0, percdamp=0.0,
                                    seconds=0.0, reason=unpackable[name]))
                log(f"  {hf}: kept in full precision ({unpackable[name]})")
                continue
            ql, loss, percdamp, trivial = solve(lin, H, qcfg, method, fmt, hf, log, prepared)
            if xs:  # later groups and blocks compute with the packed weight (nothing computes without data)
                _use_packed(lin, ql)
            tensors.update({f"{hf}.{k}": v for k, v in ql.state_dict().items()})
            skip.add(name)
            records.append(dict(block=i, module=hf, method=method, error=loss, percdamp=percdamp,
                                seconds=time.perf_counter() - t0, g_idx_trivial=trivial, tokens=routed,
                                note=note if xs else "no calibration: error = 1/2 ||W - Q||_F^2"))
            bar.set_postfix_str(f"{name} err {loss:.4g}")
        H = prepared = None  # this group's Hessian is spent (it was the solver's workspace)
        for r in replays:
            if r.linear in linears.values():
                r.start()
    tensors.update(_block_tensors(block, to_hf, i, skip, out_dtype))
    _check_stored(tensors, str(ckpt.path))
    return tensors, records


def _unpackable(linears: dict[str, nn.Module], bits: int, fused_all_or_none: bool, hf_names: list[str]
                ) -> dict[str, str | None]:
    """Per linear of a group: why the format cannot pack it (kept in full precision), or None."""
    unpackable = {name: can_pack(lin.in_features, lin.out_features, bits) for name, lin in linears.items()}
    if fused_all_or_none and any(unpackable.values()):  # vLLM fuses a group into one layer
        first = hf_names[next(k for k, r in enumerate(unpackable.values()) if r)]
        unpackable = {n: r or f"kept with {first}: vLLM fuses them" for n, r in unpackable.items()}
    return unpackable


def solve(lin: nn.Linear, H: Hessian, qcfg: QuantConfig, method: str, fmt: str, hf: str,
          log: Callable[[str], None], prepared: dict) -> tuple[QuantLinear, float, float, bool]:
    """One linear's weight, quantized with GPTQ (one Cholesky per group: H is its workspace, 3 K^2 at most) or RTN,
    and packed -> (the QuantLinear, its loss, the damping used, whether its g_idx is the trivial k // group_size)."""
    try:
        if method in ("gptq", "gptaq"):  # gptaq: H is an AsymHessian (minigptq/gptaq.py), D its asymmetric term
            res = gptq(lin.weight, H.H, qcfg, log=log, consume_h=True, shared=prepared,
                       dXXT=H.D if method == "gptaq" else None)
        else:
            res = rtn(lin.weight, qcfg, None if H is None else H.H)
    except ValueError as e:  # NaN/Inf in W or H, or a Hessian that no damping fixes
        raise Error(f"{hf}: {e}") from None
    ql = _pack(res, lin, qcfg, fmt)
    # res is dropped on return: its dequantized weight is not needed (lin gets the packed one's)
    return ql, float(res.loss), float(res.percdamp), trivial_g_idx(res.g_idx, qcfg.group_size)


def _pack(res: QuantResult, lin: nn.Linear, qcfg: QuantConfig, fmt: str) -> QuantLinear:
    ql = QuantLinear.from_codes(res.qweight, res.scales.to(torch.float16), res.zeros, res.g_idx,
                                None if lin.bias is None else lin.bias.to(torch.float16),
                                qcfg.bits, qcfg.group_size, dtype=torch.float16)
    if fmt == "gptq_v2":
        _to_v2(ql)
    return ql


# -- what is stored -------------------------------------------------------------------------------------------------

def _block_tensors(block: nn.Module, prefix_map: dict[str, str], i: int, skip: set[str], dtype) -> dict[str, Tensor]:
    """Full-precision tensors of block i that are not quantized, under their HF names, in the output dtype."""
    out = {}
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        module, _, leaf = name.rpartition(".")
        if module in skip:
            continue
        out[f"{prefix_map[f'layers.{i}.{module}']}.{leaf}"] = t.detach().to(dtype)
    return out


def _check_stored(tensors: dict[str, Tensor], where: str) -> None:
    """Every tensor about to be written must be finite in its storage dtype (fp16 overflows at 65504)."""
    for name, t in tensors.items():
        fix = ("the weights are too large for the GPTQ format's fp16 scales" if name.endswith(".scales")
               else "pass --dtype bf16 or --dtype fp32")
        check_finite(t, f"{where}: tensor {name} as stored", fix)


def block_source(ckpt: CheckpointReader, i: int) -> str:
    """Digest of block i's full-precision tensors as the checkpoint holds them (resume checks it)."""
    prefix = ckpt.arch.layer_prefix.format(i=i)
    return tensor_digest((n, ckpt.get(n)) for n in sorted(ckpt.names()) if n.startswith(prefix))


def top_source(ckpt: CheckpointReader) -> str:
    """Digest of config.json and of every tensor outside the blocks (part of a run's fingerprint)."""
    block = re.compile(re.escape(ckpt.arch.layer_prefix).replace(r"\{i\}", r"\d+"))
    names = sorted(n for n in ckpt.names() if not block.match(n))
    return tensor_digest([("config.json", torch.frombuffer(bytearray(json.dumps(ckpt.hf_config, sort_keys=True)
                                                                     .encode()), dtype=torch.uint8))]
                         + [(n, ckpt.get(n)) for n in names])


def top_tensors(model: nn.Module, ckpt: CheckpointReader, out_dtype) -> dict[str, Tensor]:
    """The tensors outside the blocks under their HF names, in the output dtype, checked to be finite there."""
    to_hf = internal_to_hf(ckpt)
    top = {}
    for name, mod in model.named_children():
        if name != "layers":
            for leaf, t in mod.named_parameters():
                top[f"{to_hf[name]}.{leaf}"] = t.detach().to(out_dtype)
    if ckpt.cfg.tie_word_embeddings:
        top.pop(f"{to_hf['lm_head']}.weight", None)  # "lm_head.weight"; Gemma 3 multimodal: language_model.lm_head
    # parts the model does not run (Gemma 3's vision tower) are copied, so that the output is the whole checkpoint
    # its other loaders expect
    for n in (n for n in ckpt.names() if n.startswith(ckpt.arch.ignored)):
        t = ckpt.get(n)
        top[n] = t.to(out_dtype) if t.is_floating_point() else t.clone()
    _check_stored(top, str(ckpt.path))
    return top


# -- packed weights back into the fp32 block ----------------------------------------------------------------------

def _use_packed(lin: nn.Linear, ql: QuantLinear, rows: int = 256) -> None:
    """Make the fp32 linear compute with exactly the packed checkpoint's weight and (fp16) bias. Dequantized
    `rows` output features at a time: the torch reference makes several temporaries of the size it is given."""
    b, N = ql.bits, ql.out_features
    for n0 in range(0, N, rows):  # rows is a multiple of 32, so every slice of qzeros starts on a word
        n1 = min(N, n0 + rows)
        Wt = dequantize(ql.qweight[:, n0:n1].contiguous(), ql.qzeros[:, n0 * b // 32: -(-n1 * b // 32)].contiguous(),
                        ql.scales[:, n0:n1].float(), ql.g_idx, b, ql.checkpoint_format)  # (K, n1 - n0)
        lin.weight[n0:n1].copy_(Wt.T)
    if lin.bias is not None:
        lin.bias.copy_(ql.bias.to(lin.bias.dtype))


def _to_v2(ql: QuantLinear) -> None:
    """Store raw zero points (GPTQModel's "gptq_v2") instead of v1's zero - 1."""
    ql.qzeros = pack_cols(unpack_cols(ql.qzeros, ql.bits, ql.out_features) + 1, ql.bits)
    ql.checkpoint_format = "gptq_v2"
    ql.post_load()


def _restore_block(block: nn.Module, saved: dict[str, Tensor], to_hf: dict[str, str], i: int,
                   qcfg: QuantConfig, fmt: str) -> None:
    """Put a finished block's saved quantized weights back into its fp32 linears (resume)."""
    for name, lin in block.named_modules():
        hf = to_hf.get(f"layers.{i}.{name}")
        if isinstance(lin, nn.Linear) and f"{hf}.qweight" in saved:
            ql = QuantLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                             bias=lin.bias is not None, dtype=torch.float16)
            ql.checkpoint_format = fmt
            ql.load_state_dict({k[len(hf) + 1:]: v for k, v in saved.items() if k.startswith(hf + ".")})
            ql.post_load()
            _use_packed(lin, ql)
