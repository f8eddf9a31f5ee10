"""The layer-by-layer quantization driver: one loop for every architecture (GPTQ paper, section 4 and Algorithm 1's
outer loop; shared/docs/algorithm-notes.md "Sequential driver").

    inputs of block 0 <- embeddings of the calibration windows
    for each block:
        load its full-precision weights (only this block's; freed after)
        for each true-sequential group of linears (arch.sequential), e.g. [q,k,v] -> [o] -> [up,gate] -> [down]:
            run the block on every window, accumulating H = 2/n sum X X^T at the group's input
            (the forward stops right there: nothing after the group is needed yet)
            solve each linear of the group with GPTQ (minigptq/gptq.py) or RTN, pack it (QuantLinear),
            and put the *packed* weights back so later groups and blocks see exactly what the checkpoint holds
        run the block with its quantized weights -> inputs of the next block
The finished block's tensors go to the resumable work folder (minigptq/checkpoint.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import Error
from .checkpoint import PartialRun, tensor_digest
from .compat import trivial_g_idx
from .gptq import Hessian, gptq
from .loader import Checkpoint, build_empty, check_finite, internal_to_hf, load_into
from .pack import can_pack, dequantize, pack_cols, unpack_cols
from .qlinear import QuantLinear
from .quantizer import QuantConfig, rtn


class _StopForward(Exception):
    """Raised by the Hessian hook: the rest of the block is not needed for this group."""


def _forward(block: nn.Module, x: Tensor, ctx, compute: torch.dtype) -> Tensor:
    """The block on one window in fp32, with its matmuls in `compute` (bf16: autocast; the residual stream, the
    norms and the Hessians stay fp32)."""
    if compute == torch.float32:
        return block(x.float(), ctx)
    with torch.autocast(x.device.type, dtype=compute):
        return block(x.float(), ctx).float()


class _Replay:
    """Once the last linear of a sub-block is solved (attention's o, the MLP's down), the rest of that sub-block
    before it cannot change any more: for every window, that linear's input (the attention core: q/k/v, RoPE, softmax;
    the MLP's activated hidden layer) is kept from its Hessian pass, and in the later passes and the output pass the
    sub-block only applies the (solved) linear to it. The same numbers, without recomputing the rest. Costs that
    input's size per window (in act_dtype)."""

    def __init__(self, module: nn.Module, linear: nn.Module, n: int, dtype: torch.dtype):
        self.module, self.linear, self.core, self.dtype = module, linear, [None] * n, dtype
        self.done = [False] * n  # core[j] already holds the linear's output (fp32 only: the same numbers)
        self.j = 0  # the window being run

    def forward(self, x: Tensor, *args) -> Tensor:
        j = self.j
        if self.done[j]:
            return self.core[j]
        y = self.linear(self.core[j].to(x.dtype))
        if self.dtype == torch.float32 and y.dtype == torch.float32:
            self.core[j], self.done[j] = y, True  # later passes (o is run by three of them) reuse it
        return y

    def start(self) -> None:
        """From now on the sub-block replays (call once its linear is solved and packed)."""
        if all(c is not None for c in self.core):
            self.module.forward = self.forward  # an instance attribute: nn.Module.__call__ finds it first

    def stop(self) -> None:
        self.module.__dict__.pop("forward", None)
        self.core = []


def _hessian_pass(block: nn.Module, linears: list[nn.Module], xs: list[Tensor], ctx,
                  compute: torch.dtype = torch.float32, replays: list[_Replay] = ()) -> Hessian:
    """Run the block on every window until the group's input is seen; accumulate its Hessian (and keep that input in
    the replay whose linear is in the group)."""
    H = Hessian(linears[0].in_features, xs[0].device)
    capture = next((r for r in replays if r.linear in linears), None)

    def hook(_mod, args):
        H.add(args[0])
        if capture is not None:
            capture.core[capture.j] = args[0].detach().to(capture.dtype)
        raise _StopForward

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]  # members share their input: first one wins
    try:
        for j, x in enumerate(xs):
            for r in replays:
                r.j = j
            try:
                _forward(block, x, ctx, compute)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return H


def _replays(block: nn.Module, xs: list[Tensor], dtype: torch.dtype, device) -> list[_Replay]:
    """The block's replays (see _Replay): attention (o's input) always, which costs about one more set of
    activations (counted by peak_bytes); the MLP (down's input, intermediate/hidden times larger) only where that
    fits in a third of the memory available, since it only saves time."""
    out = [_Replay(block.attn, block.attn.o, len(xs), dtype)] if hasattr(block.attn, "o") else []
    down = getattr(block.mlp, "down", None)
    if down is not None:
        need = len(xs) * xs[0].shape[1] * down.in_features * torch.empty(0, dtype=dtype).element_size()
        free = available_memory(torch.device(device))
        if free is not None and 3 * need < free:
            out.append(_Replay(block.mlp, down, len(xs), dtype))
    return out


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


def block_source(ckpt: Checkpoint, i: int) -> str:
    """Digest of block i's full-precision tensors as the checkpoint holds them (resume checks it)."""
    prefix = ckpt.arch.layer_prefix.format(i=i)
    return tensor_digest((n, ckpt.get(n)) for n in sorted(ckpt.names()) if n.startswith(prefix))


def top_source(ckpt: Checkpoint) -> str:
    """Digest of config.json and of every tensor outside the blocks (part of a run's fingerprint)."""
    import json
    import re
    block = re.compile(re.escape(ckpt.arch.layer_prefix).replace(r"\{i\}", r"\d+"))
    names = sorted(n for n in ckpt.names() if not block.match(n))
    return tensor_digest([("config.json", torch.frombuffer(bytearray(json.dumps(ckpt.hf_config, sort_keys=True)
                                                                     .encode()), dtype=torch.uint8))]
                         + [(n, ckpt.get(n)) for n in names])


def fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls run natively here: a GPU, or a CPU with AVX-512 BF16 or AMX (elsewhere torch emulates them)."""
    if device.type == "cuda":
        return True
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated: free GPU memory, or on CPU the smaller of MemAvailable and what the
    process's memory cgroup (v1 or v2) still allows, reclaimable file pages counted as free; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    cg = _cgroup_free()
    if cg is not None:
        found.append(cg)
    return min(found) if found else None


def _cgroup_free() -> int | None:
    """Limit minus usage of this process's memory cgroup (usage without its inactive file pages), or None."""
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if ctrl == "memory":  # v1
                base, limit, usage, inactive = f"/sys/fs/cgroup/memory{path}", "memory.limit_in_bytes", \
                    "memory.usage_in_bytes", "total_inactive_file"
                break
            if ctrl == "":  # v2
                base, limit, usage, inactive = f"/sys/fs/cgroup{path}", "memory.max", "memory.current", "inactive_file"
        else:
            return None
        lim = open(f"{base}/{limit}").read().strip()
        if lim == "max" or int(lim) >= 2**60:
            return None
        stat = dict(line.split() for line in open(f"{base}/memory.stat"))
        return int(lim) - int(open(f"{base}/{usage}").read()) + int(stat.get(inactive, 0))
    except (OSError, ValueError, UnboundLocalError):
        return None


def peak_bytes(ckpt: Checkpoint, nsamples: int, seqlen: int, act_dtype: torch.dtype) -> dict[str, int]:
    """What the driver holds at its peak, by part: the calibration activations (one set, between blocks, and the
    attention outputs _Replay keeps), one block's fp32 weights, and the solver: its K x K matrices (the Hessian and
    at most two more) for the widest input plus two copies of the largest weight (W being updated and the codes).
    The MLP's _Replay is taken only where it fits besides this; the interpreter and torch come on top (~0.3 GiB)."""
    cfg = ckpt.cfg
    K = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    per = torch.empty(0, dtype=act_dtype).element_size()
    return dict(activations=nsamples * seqlen * (cfg.hidden_size + cfg.num_heads * cfg.head_dim) * per,
                block=4 * (2 * cfg.hidden_size * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
                           + 3 * cfg.hidden_size * cfg.intermediate_size),
                solver=4 * (3 * K * K + 2 * cfg.hidden_size * max(cfg.hidden_size, cfg.intermediate_size)))


def check_memory(ckpt: Checkpoint, nsamples: int, seqlen: int, device: torch.device,
                 act_dtype: torch.dtype = torch.float32) -> None:
    """Refuse up front when the driver's working set (peak_bytes) cannot fit in the memory available."""
    need = peak_bytes(ckpt, nsamples, seqlen, act_dtype)
    free = available_memory(device)
    if free is not None and sum(need.values()) > free:
        raise Error(f"quantizing needs about {sum(need.values()) / 2**30:.1f} GiB (calibration activations "
                         f"{need['activations'] / 2**30:.1f} GiB for nsamples {nsamples} x seqlen {seqlen} x hidden "
                         f"{ckpt.cfg.hidden_size}, one block {need['block'] / 2**30:.1f} GiB, solver "
                         f"{need['solver'] / 2**30:.1f} GiB) but only {free / 2**30:.1f} GiB of {device.type} memory "
                         f"is available; lower --nsamples or --seqlen, or keep the activations in --act-dtype bf16")


def top_tensors(model: nn.Module, ckpt: Checkpoint, out_dtype) -> dict[str, Tensor]:
    """The tensors outside the blocks under their HF names, in the output dtype, checked to be finite there."""
    to_hf = internal_to_hf(ckpt)
    top = {}
    for name, mod in model.named_children():
        if name != "layers":
            for leaf, t in mod.named_parameters():
                top[f"{to_hf[name]}.{leaf}"] = t.detach().to(out_dtype)
    if ckpt.cfg.tie_word_embeddings:
        top.pop("lm_head.weight", None)
    _check_stored(top, str(ckpt.path))
    return top


@torch.inference_mode()
def quantize_checkpoint(ckpt: Checkpoint, calib: Tensor, qcfg: QuantConfig, run: PartialRun, method: str = "gptq",
                        device="cpu", out_dtype=torch.float16, log: Callable[[str], None] = print,
                        fmt: str = "gptq", fused_all_or_none: bool = False,
                        act_dtype: torch.dtype = torch.float32, progress: bool = False,
                        compute: torch.dtype = torch.float32) -> dict:
    """Quantize every block of `ckpt` with calibration windows calib (n, seqlen) into `run`'s work folder.

    fmt: "gptq" (v1: qzeros hold zero - 1) or "gptq_v2" (raw zeros). fused_all_or_none: when one linear of a
    true-sequential group cannot be packed, keep the whole group in full precision (vLLM fuses q/k/v and gate/up).
    act_dtype: the dtype the calibration activations are kept in between blocks (bf16/fp16 halve their memory; the
    blocks still compute in fp32). compute: dtype of the calibration forward passes' matmuls (bf16: several times
    faster on CPUs with AVX-512 BF16 / AMX, see fast_bf16). log receives one line per block; progress: also show a
    progress bar (tqdm).
    Returns the tensors outside the blocks (HF names, out_dtype) for run.finish(). Blocks already in `run`
    (--resume) are not solved again: their saved tensors are replayed to rebuild the next block's inputs.
    """
    if ckpt.quant is not None:
        raise Error(f"{ckpt.path} is already a GPTQ checkpoint; quantize the full-precision model instead")
    device = torch.device(device)
    _fix_mmap_threshold()
    model = build_empty(ckpt)
    to_hf = internal_to_hf(ckpt)
    for name, _ in model.named_children():  # everything outside the blocks, in fp32 for the computation
        if name != "layers":
            load_into(model, ckpt, name, torch.float32, device)
    top = top_tensors(model, ckpt, out_dtype)  # before any work: they must be finite in the output dtype
    n, T = calib.shape
    ctx, pos = model.context(1, T, device, torch.float32)
    xs = [model.embed_tokens(calib[j:j + 1].to(device), pos).to(act_dtype) for j in range(n)]  # n x (1, T, hidden)
    done = run.done_blocks()
    L = ckpt.cfg.num_layers
    t_start = time.perf_counter()
    bar = tqdm(total=L, desc="quantizing", unit="block", disable=not progress, file=sys.stderr, leave=False)
    for i in range(L):
        load_into(model, ckpt, f"layers.{i}.", torch.float32, device, copy=True)  # ours to overwrite, freed below
        block = model.layers[i]
        source = block_source(ckpt, i)
        if i in done:
            skip = _replay_block(block, run.load_block(i, source), to_hf, i, qcfg, fmt)
            log(f"block {i + 1}/{L}: resumed from {run.block_file(i).name}")
        else:
            tensors, records, skip = {}, [], set()
            replays = _replays(block, xs, act_dtype, device)
            for group in ckpt.arch.sequential:
                linears = {name: block.get_submodule(name) for name in group}
                unpackable = {name: can_pack(lin.in_features, lin.out_features, qcfg.bits)
                              for name, lin in linears.items()}
                if fused_all_or_none and any(unpackable.values()):  # vLLM fuses a group into one layer
                    first = next(n for n, r in unpackable.items() if r)
                    unpackable = {n: r or f"kept with {to_hf[f'layers.{i}.{first}']}: vLLM fuses them"
                                  for n, r in unpackable.items()}
                if all(unpackable.values()):
                    H = None  # nothing in this group will be solved
                else:
                    H = _hessian_pass(block, list(linears.values()), xs, ctx, compute, replays)
                prepared = {}  # what the group's linears share of the solver's work (gptq's `shared`)
                for name, lin in linears.items():
                    hf = to_hf[f"layers.{i}.{name}"]
                    t0 = time.perf_counter()
                    if unpackable[name]:
                        records.append(dict(block=i, module=hf, method="kept", error=0.0, percdamp=0.0,
                                            seconds=0.0, reason=unpackable[name]))
                        log(f"  {hf}: kept in full precision ({unpackable[name]})")
                        continue
                    try:
                        if method == "gptq":  # one Cholesky per group, H its workspace (3 K^2 at most)
                            res = gptq(lin.weight, H.H, qcfg, log=log, consume_h=True, shared=prepared)
                        else:
                            res = rtn(lin.weight, qcfg, H.H)
                    except ValueError as e:  # NaN/Inf in W or H, or a Hessian that no damping fixes
                        raise Error(f"{hf}: {e}") from None
                    ql = QuantLinear.from_codes(res.qweight, res.scales.to(torch.float16), res.zeros, res.g_idx,
                                                None if lin.bias is None else lin.bias.to(torch.float16),
                                                qcfg.bits, qcfg.group_size, dtype=torch.float16)
                    loss, percdamp = float(res.loss), float(res.percdamp)
                    trivial = trivial_g_idx(res.g_idx, qcfg.group_size)
                    del res  # memory: its dequantized weight is not needed (lin gets the packed one's)
                    if fmt == "gptq_v2":
                        _to_v2(ql)
                    _use_packed(lin, ql)
                    tensors.update({f"{hf}.{k}": v for k, v in ql.state_dict().items()})
                    skip.add(name)
                    records.append(dict(block=i, module=hf, method=method, error=loss, percdamp=percdamp,
                                        seconds=time.perf_counter() - t0, g_idx_trivial=trivial))
                    bar.set_postfix_str(f"{name} err {loss:.4g}")
                H = prepared = None  # this group's Hessian is spent (it was the solver's workspace)
                for r in replays:
                    if r.linear in linears.values():
                        r.start()
            tensors.update(_block_tensors(block, to_hf, i, skip, out_dtype))
            _check_stored(tensors, str(ckpt.path))
        for j, x in enumerate(xs):  # the outputs replace the inputs window by window: one set of activations
            for r in replays if i not in done else ():
                r.j = j
            y = _forward(block, x, ctx, compute)
            if not torch.isfinite(y).all():
                raise Error(f"non-finite activations (NaN/Inf) at the output of block {i} "
                                 f"({ckpt.arch.layer_prefix.format(i=i).rstrip('.')}) for calibration window {j}; "
                                 f"the checkpoint's weights overflow or contain NaN/Inf")
            xs[j] = y.to(act_dtype)
        for r in replays if i not in done else ():
            r.stop()
        if i not in done:
            run.save_block(i, tensors, records, source)
            errs = [r["error"] for r in records if r["method"] == method]
            log(f"block {i + 1}/{L} done: mean error {sum(errs) / max(len(errs), 1):.4g}, "
                f"{time.perf_counter() - t_start:.0f}s")
        bar.update(1)
        model.layers[i] = block.to("meta")  # free this block's weights before loading the next
        _trim_heap()
    bar.close()
    return top


def _fix_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """Serve every allocation of 4 MiB or more with its own mapping, returned to the OS when freed. By default glibc
    raises this threshold (up to 32 MiB) each time such a block is freed, after which blocks of that size come from
    the heap and fragment it: on a 16-block model the resident set then grew by ~25 MiB per block. Process-wide
    (glibc's mallopt; elsewhere nothing happens)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _trim_heap() -> None:
    """Give the freed heap back to the OS. glibc keeps freed blocks of up to 32 MiB (its mmap threshold grows with
    every large free) on its heap, so without this each block's weights and solver matrices left the resident set a
    little higher than the last (SmolLM2: 601 -> 817 MiB over 30 blocks without it; 655-732 MiB, no trend, with it)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim
    except OSError:
        return None


_LIBC = _load_libc()


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


def _replay_block(block: nn.Module, saved: dict[str, Tensor], to_hf: dict[str, str], i: int,
                  qcfg: QuantConfig, fmt: str) -> set[str]:
    """Put a finished block's saved quantized weights back into its fp32 linears (resume)."""
    quantized = set()
    for name, lin in block.named_modules():
        hf = to_hf.get(f"layers.{i}.{name}")
        if isinstance(lin, nn.Linear) and f"{hf}.qweight" in saved:
            ql = QuantLinear(lin.in_features, lin.out_features, qcfg.bits, qcfg.group_size,
                             bias=lin.bias is not None, dtype=torch.float16)
            ql.checkpoint_format = fmt
            ql.load_state_dict({k[len(hf) + 1:]: v for k, v in saved.items() if k.startswith(hf + ".")})
            ql.post_load()
            _use_packed(lin, ql)
            quantized.add(name)
    return quantized
