"""The model configuration: one frozen dataclass that every architecture fills from its config.json.

Each architecture file (minigptq/arch/*.py) turns a Hugging Face config.json dict into a ModelConfig; the shared
transformer (minigptq/transformer.py) reads only this dataclass, never the raw JSON and never file names.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import Error
from .rope import check_angles

# Sanity bounds on config.json sizes: far above any real model, low enough that a hostile value is refused before
# anything is built from it.
MAX_DIM = 2**20        # hidden / intermediate / head widths
MAX_COUNT = 2**16      # blocks, heads
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**24


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE context extension (rope_scaling / rope_parameters of config.json, read by minigptq/arch/llama.py),
    computed by minigptq/rope.py."""
    type: str                    # "linear" | "dynamic" | "yarn" | "llama3" | "longrope"
    factor: float = 1.0          # how many times the original context the model is stretched to
    original_max: int = 0        # the context the model was pretrained at (llama3, yarn, longrope)
    low_freq_factor: float = 1.0   # llama3: wavelengths above original_max / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / high_freq_factor are kept
    beta_fast: float = 32.0      # yarn: the ramp between extrapolated and interpolated frequencies, in rotations
    beta_slow: float = 1.0
    truncate: bool = True        # yarn: round the ramp's ends to whole dimensions
    attention_factor: float = 1.0  # yarn, longrope: multiplies cos and sin (so the attention logits by its square)
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max tokens
    long_factor: tuple[float, ...] = ()   # longrope: the same beyond original_max tokens


@dataclass(frozen=True)
class ModelConfig:
    model_type: str              # "llama" | "qwen3" | "phi3" | "opt" | "bloom" | "gemma2" | "gemma3"
    vocab_size: int              # rows of the token embedding
    hidden_size: int             # width of the residual stream
    num_layers: int              # transformer blocks
    num_heads: int               # query heads
    num_kv_heads: int            # key/value heads (< num_heads: grouped-query attention)
    head_dim: int                # width of one head
    intermediate_size: int       # width of the MLP's hidden layer
    max_positions: int           # the model's context length
    norm: str                    # "rms" (Llama) | "layer" (OPT, BLOOM)
    norm_eps: float
    positions: str               # "rope" (Llama) | "learned" (OPT, offset 2) | "alibi" (BLOOM)
    activation: str              # "silu" | "relu" | "gelu" | "gelu_tanh"
    gated_mlp: bool              # SwiGLU: down(act(gate(x)) * up(x)); else down(act(up(x)))
    qkv_bias: bool               # bias on the q/k/v projections
    o_bias: bool                 # bias on the attention output projection
    mlp_bias: bool               # bias on the MLP projections
    tie_word_embeddings: bool    # lm_head shares the token embedding's weight
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # a context extension of RoPE (Llama 3.1, YaRN, ...); None: plain RoPE
    qk_norm: bool = False        # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE
    sliding_window: int = 0      # Mistral, Qwen2/3, Phi-3: a query sees only the last sliding_window tokens (0: all)
    window_layers: tuple[int, ...] = ()  # the blocks that use sliding_window (Qwen2/3 may exempt the first ones)
    fused_qkv: str = ""          # one q/k/v linear: "per_head" (BLOOM's [heads, 3, head_dim]) | "concat"
                                 # (Phi-3's [q | k | v]); "": three linears
    fused_gate_up: bool = False  # Phi-3: one gate_up linear, [gate | up]
    pre_norm: bool = True        # False: post-LayerNorm blocks (OPT-350M's do_layer_norm_before=False)
    final_norm: bool = True      # a norm after the last block
    embed_norm: bool = False     # BLOOM: LayerNorm right after the token embedding
    residual_from_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    embed_dim: int = 0           # token-embedding width if it differs from hidden_size (OPT-350M's word_embed_proj_dim)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in
    # Mixture of experts (minigptq/moe.py; Mixtral, Qwen2-MoE, Qwen3-MoE); num_experts 0: a dense model
    num_experts: int = 0         # routed experts in each MoE block
    experts_per_token: int = 0   # top-k: how many experts each token is sent to
    moe_intermediate_size: int = 0  # width of one expert's hidden layer
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (Mixtral always does)
    shared_expert_size: int = 0  # Qwen2-MoE: hidden width of the expert every token also goes through (0: none)
    moe_layers: tuple[int, ...] = ()  # the blocks whose MLP is the MoE (decoder_sparse_step, mlp_only_layers)
    # Gemma 2 / 3 (minigptq/arch/gemma.py); the defaults leave every other architecture as it was
    norm_offset: float = 0.0     # RMSNorm scales by (norm_offset + weight): Gemma stores w around 0 and uses 1 + w
    embed_scale: bool = False    # token embeddings times sqrt(hidden_size), rounded to the activation dtype first
    sandwich_norms: bool = False  # a norm on the attention output and on the MLP output too, before each residual add
    attn_scale: float = 0.0      # multiplies q.k; 0: 1 / sqrt(head_dim). Gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float = 0.0    # Gemma 2: attention logits become cap * tanh(logits / cap) before the mask; 0: none
    final_softcap: float = 0.0   # Gemma 2: the same on the output logits (final_logit_softcapping); 0: none
    rope_local_theta: float = 0.0  # Gemma 3: plain-RoPE base of the sliding-window blocks; 0: they use rope_theta

    def __post_init__(self):
        """Cross-field checks (each field's own type and range were checked by Fields)."""
        if self.num_heads % self.num_kv_heads:
            raise Error(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise Error(f"head_dim={self.head_dim} must be even for rotary position embeddings")
        r = self.rope_scaling
        if r is not None and r.type == "dynamic" and self.head_dim < 4:  # its base is raised to d / (d - 2)
            raise Error(f"rope_scaling dynamic needs head_dim >= 4, got {self.head_dim}")
        if r is not None and r.type == "longrope" and {len(r.short_factor), len(r.long_factor)} != {self.head_dim // 2}:
            raise Error(f"rope_scaling short_factor and long_factor must each hold head_dim / 2 = "
                        f"{self.head_dim // 2} numbers, got {len(r.short_factor)} and {len(r.long_factor)}")
        if not self.norm_eps >= 1e-37:  # the norms add it in float32, where a smaller one is subnormal or 0: an
            # all-zero row (a padding embedding) would then be divided by 0 and turn NaN
            raise Error(f"the norm epsilon (rms_norm_eps / layer_norm_epsilon) {self.norm_eps:g} is too small for "
                        f"float32; valid: [1e-37, 1]")
        if self.positions == "rope":
            check_angles(self)
        for name in ("bos_token_id", "pad_token_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < self.vocab_size:
                raise Error(f"{name}={i} lies outside the vocabulary [0, {self.vocab_size})")
        bad = [i for i in self.eos_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise Error(f"eos_token_id {bad} lies outside the vocabulary [0, {self.vocab_size})")
        if self.moe_layers and not 1 <= self.experts_per_token <= self.num_experts:
            raise Error(f"num_experts_per_tok={self.experts_per_token} must lie in [1, num_experts="
                        f"{self.num_experts}]")

    @property
    def token_dim(self) -> int:
        """Width of the token embedding and of lm_head's input."""
        return self.embed_dim or self.hidden_size


# Caps on the side files of a checkpoint, read whole into memory: far above any real one (Gemma's tokenizer.json is
# ~33 MB), low enough that a file linked to /dev/zero or a huge one is refused before it is read.
MAX_SIDE_FILE = 64 * 2**20       # JSON configs, the safetensors index, chat_template.jinja
MAX_TOKENIZER_FILE = 512 * 2**20  # tokenizer.json, tokenizer.model

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int) -> Error:
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return Error(f"{path} is {kind}, expected a regular file")


def read_file(path: Path, cap: int = MAX_SIDE_FILE) -> bytes:
    """The bytes of a regular file of at most `cap` bytes. A FIFO would block the read for ever and a device
    (/dev/zero) never ends, so anything but a regular file is refused before reading, as is a bigger file."""
    st = os.stat(path)  # follows links: a link to /dev/zero is a device
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    # O_NONBLOCK: should the file be swapped for a FIFO after the stat, the open still returns, and fstat refuses it
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        data = f.read(cap + 1) if st.st_size <= cap else b""  # + 1: catches a file that grew since the fstat
    if max(st.st_size, len(data)) > cap:
        raise Error(f"{path} is {max(st.st_size, len(data))} bytes, over the {cap // 2**20} MiB limit for this file "
                    f"(real ones are far smaller)")
    return data


def read_json(path: Path) -> dict:
    """Read a JSON file that must hold an object; a parse failure or another type is a ValueError naming the file."""
    data = read_file(path)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, an integer of over 4300 digits
        raise Error(f"{path} is not valid JSON: {' '.join(str(e).split())[:200] or 'nested too deeply'}") from None
    if not isinstance(obj, dict):
        raise Error(f"{path} must hold a JSON object {{...}}, got a {type(obj).__name__}")
    return obj


_REQUIRED = object()


class Fields:
    """Typed reads of a config.json dict. Each error names the field, the bad value and what is valid; the caller
    adds the file name. A field that is absent or null takes its default."""

    def __init__(self, d: dict):
        self.d = d

    def _get(self, keys, default):
        keys = (keys,) if isinstance(keys, str) else keys
        for k in keys:
            if self.d.get(k) is not None:
                return k, self.d[k]
        if default is _REQUIRED:
            raise Error(f"the field {' / '.join(map(repr, keys))} is missing")
        return keys[0], default

    def int(self, keys, default=_REQUIRED, lo: int = 1, hi: int = MAX_DIM) -> int | None:
        k, v = self._get(keys, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise Error(f"the field {k!r} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    def float(self, keys, default=_REQUIRED, lo: float = 0.0, hi: float = math.inf) -> float:
        """A finite number in (lo, hi]: integers are accepted (JSON writes 10000.0 as 10000)."""
        k, v = self._get(keys, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo < v <= hi):
            raise Error(f"the field {k!r} must be a finite number in ({lo:g}, {hi:g}], got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        k, v = self._get(key, default)
        if not isinstance(v, bool):
            raise Error(f"the field {k!r} must be true or false, got {v!r}")
        return v

    def str(self, key: str, default=_REQUIRED, choices=None) -> str:
        k, v = self._get(key, default)
        if not isinstance(v, str) or (choices is not None and v not in choices):
            valid = f"one of {', '.join(sorted(choices))}" if choices is not None else "a string"
            raise Error(f"the field {k!r} must be {valid}, got {v!r}")
        return v

    def dict(self, keys) -> dict:
        k, v = self._get(keys, {})
        if not isinstance(v, dict):
            raise Error(f"the field {k!r} must be an object {{...}} or null, got {v!r}")
        return v

    def token_id(self, key: str) -> int | None:
        """A special token id; negative means "none" (old Llama configs write pad_token_id -1)."""
        k, v = self._get(key, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise Error(f"the field {k!r} must be a token id (an integer; negative or null = none), got {v!r}")
        return None if v is None or v < 0 else v

    def token_ids(self, key: str) -> tuple[int, ...]:
        """eos_token_id: an int, a list of ints or null."""
        k, v = self._get(key, None)
        vs = v if isinstance(v, list) else [] if v is None else [v]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in vs):
            raise Error(f"the field {k!r} must be a token id >= 0 or a list of them, got {v!r}")
        return tuple(vs)

    def common(self) -> dict:
        """The ModelConfig fields every architecture reads the same way."""
        return dict(bos_token_id=self.token_id("bos_token_id"), eos_token_ids=self.token_ids("eos_token_id"),
                    pad_token_id=self.token_id("pad_token_id"),
                    torch_dtype=self.str("torch_dtype", self.d.get("dtype") or "float32"))


def eos_tuple(value) -> tuple[int, ...]:
    """An eos_token_id from a side file (generation_config.json): an int, a list of ints or null; other values
    are ignored (the model's own config.json is validated by Fields)."""
    vs = value if isinstance(value, list) else [value]
    return tuple(i for i in vs if isinstance(i, int) and not isinstance(i, bool) and i >= 0)
