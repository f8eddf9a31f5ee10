"""The driver's forward passes over the calibration windows (minigptq/driver.py runs them for every block):

- hessian_pass: run the block on every window until a group's input is seen, accumulating that input's Hessian
  H = 2/n sum X X^T (gptq.Hessian); a hook then stops the forward, since nothing after the group is needed yet.
- Replay: once a sub-block's last linear is solved, its input is kept and later passes skip what comes before it.
- next_inputs: the block with its quantized weights on every window -> the next block's inputs.
Every pass computes in fp32; the windows' activations are kept in act_dtype between blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import Error
from .checkpoint_reader import CheckpointReader
from .gptaq import AsymHessian
from .gptq import Hessian
from .memory import available_memory


class _StopForward(Exception):
    """Raised by the Hessian hook: the rest of the block is not needed for this group."""


def forward(block: nn.Module, x: Tensor, ctx) -> Tensor:
    """The block on one window, in fp32."""
    return block(x.float(), ctx)


class Replay:
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


def hessian_pass(block: nn.Module, linears: list[nn.Module], xs: list[Tensor], ctx,
                  replays: list[Replay] = (), fp: tuple[nn.Module, nn.Module, list[Tensor]] | None = None) -> Hessian:
    """Run the block on every window until the group's input is seen; accumulate its Hessian (and keep that input in
    the replay whose linear is in the group). fp = (full-precision block, its copy of the group's first linear, the
    full-precision model's block inputs): GPTAQ, which also needs that linear's input in the full-precision model,
    computed window by window just before (an AsymHessian is returned)."""
    H = Hessian(linears[0].in_features, xs[0].device) if fp is None else AsymHessian(linears[0].in_features,
                                                                                     xs[0].device)
    capture = next((r for r in replays if r.linear in linears), None)
    x_fp = [None]  # the current window's input of the group in the full-precision model

    def fp_hook(_mod, args):
        x_fp[0] = args[0]
        raise _StopForward

    def hook(_mod, args):
        if fp is None:
            H.add(args[0])
        elif x_fp[0] is None or x_fp[0].shape != args[0].shape:  # MoE experts: the two models route differently
            raise Error("--method gptaq needs the same tokens at a layer in both models; it does not support MoE "
                        "experts (whose routed tokens differ); use --method gptq")
        else:
            H.add_pair(args[0], x_fp[0])
        if capture is not None:
            capture.core[capture.j] = args[0].detach().to(capture.dtype)
        raise _StopForward

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]  # members share their input: first one wins
    if fp is not None:
        handles.append(fp[1].register_forward_pre_hook(fp_hook))
    try:
        for j, x in enumerate(xs):
            for r in replays:
                r.j = j
            if fp is not None:  # GPTAQ: the full-precision block on the full-precision inputs, up to the group
                x_fp[0] = None  # never pair a window with another window's input
                try:
                    forward(fp[0], fp[2][j], ctx)
                except _StopForward:
                    pass
            try:
                forward(block, x, ctx)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return H


def make_replays(block: nn.Module, xs: list[Tensor], dtype: torch.dtype, device) -> list[Replay]:
    """The block's replays (see Replay): attention (o's input) always, which costs about one more set of
    activations (counted by memory.peak_bytes); the MLP (down's input, intermediate/hidden times larger) only where that
    fits in a third of the memory available, since it only saves time."""
    out = [Replay(block.attn, block.attn.o, len(xs), dtype)] if hasattr(block.attn, "o") else []
    down = getattr(block.mlp, "down", None)
    if down is not None:
        need = len(xs) * xs[0].shape[1] * down.in_features * torch.empty(0, dtype=dtype).element_size()
        free = available_memory(torch.device(device))
        if free is not None and 3 * need < free:
            out.append(Replay(block.mlp, down, len(xs), dtype))
    return out


def next_inputs(block: nn.Module, xs: list[Tensor], ctx, replays: list[Replay], act_dtype: torch.dtype,
                 ckpt: CheckpointReader, i: int) -> None:
    """Run the block (quantized) on every window; the outputs replace the inputs window by window, so that one set
    of activations is held."""
    for j, x in enumerate(xs):
        for r in replays:
            r.j = j
        y = forward(block, x, ctx)
        if not torch.isfinite(y).all():
            raise Error(f"non-finite activations (NaN/Inf) at the output of block {i} "
                        f"({ckpt.arch.layer_prefix.format(i=i).rstrip('.')}) for calibration window {j}; "
                        f"the checkpoint's weights overflow or contain NaN/Inf")
        xs[j] = y.to(act_dtype)
