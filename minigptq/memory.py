"""Memory the process may still use, and keeping the C heap from growing: what the OS says, not what the GPTQ loop does.

- available_memory: free GPU memory, or on the CPU the smaller of the kernel's MemAvailable and what this process's
  memory cgroup (v1 or v2: a container's limit) still allows. Read before a run to refuse a working set that cannot
  fit (quantize: check_memory below; the KV cache: transformer.check_kv_memory) instead of being killed half-way.
- peak_bytes / check_memory: the quantization driver's working set (minigptq/driver.py), estimated up front.
- set_mmap_threshold / trim_heap: glibc's mallopt and malloc_trim, so that freeing a block's weights returns the
  memory to the OS (elsewhere, e.g. musl or macOS, they do nothing).
Imports nothing of the package but Error, so that any module may use it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from . import Error


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


# -- the quantization driver's working set -------------------------------------------------------------------------

def peak_bytes(ckpt, nsamples: int, seqlen: int, act_dtype: torch.dtype) -> dict[str, int]:
    """What the driver holds at its peak, by part: the embedding tables, the calibration activations (one set, between
    blocks, and the attention outputs driver._Replay keeps), one block's fp32 weights, and the solver: its K x K
    matrices (the Hessian and at most two more) for the widest input plus two copies of the largest weight (W being
    updated and the codes).
    The MLP's _Replay is taken only where it fits besides this; the interpreter and torch come on top (~0.3 GiB).
    ckpt: a CheckpointReader (only its cfg, a ModelConfig, is read)."""
    cfg = ckpt.cfg
    K = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    per = torch.empty(0, dtype=act_dtype).element_size()
    # the token embedding (and an untied lm_head) in fp32 for the computation plus the copy to be written (<= 2 bytes
    # a value in fp16 / bf16): with a large vocabulary (Gemma's 262k) more than one block and the solver together
    tables = cfg.vocab_size * cfg.token_dim * (1 if cfg.tie_word_embeddings else 2)
    return dict(embeddings=tables * (4 + 2),
                activations=nsamples * seqlen * (cfg.hidden_size + cfg.num_heads * cfg.head_dim) * per,
                block=4 * (2 * cfg.hidden_size * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
                           + 3 * cfg.hidden_size * cfg.intermediate_size),
                solver=4 * (3 * K * K + 2 * cfg.hidden_size * max(cfg.hidden_size, cfg.intermediate_size)))


def check_memory(ckpt, nsamples: int, seqlen: int, device: torch.device,
                 act_dtype: torch.dtype = torch.float32) -> None:
    """Refuse up front when the driver's working set (peak_bytes) cannot fit in the memory available."""
    need = peak_bytes(ckpt, nsamples, seqlen, act_dtype)
    free = available_memory(device)
    if free is not None and sum(need.values()) > free:
        raise Error(f"quantizing needs about {sum(need.values()) / 2**30:.1f} GiB (calibration activations "
                    f"{need['activations'] / 2**30:.1f} GiB for nsamples {nsamples} x seqlen {seqlen} x hidden "
                    f"{ckpt.cfg.hidden_size}, embeddings {need['embeddings'] / 2**30:.1f} GiB for a vocabulary of "
                    f"{ckpt.cfg.vocab_size}, one block {need['block'] / 2**30:.1f} GiB, solver "
                    f"{need['solver'] / 2**30:.1f} GiB) but only {free / 2**30:.1f} GiB of {device.type} memory "
                    f"is available; lower --nsamples or --seqlen, or keep the activations in --act-dtype bf16")


# -- glibc's heap ----------------------------------------------------------------------------------------------------

def set_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """Serve every allocation of 4 MiB or more with its own mapping, returned to the OS when freed. By default glibc
    raises this threshold (up to 32 MiB) each time such a block is freed, after which blocks of that size come from
    the heap and fragment it: on a 16-block model the resident set then grew by ~25 MiB per block. Process-wide
    (glibc's mallopt; elsewhere nothing happens)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
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
