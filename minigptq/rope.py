"""Rotary position embeddings (RoPE, Su et al. 2021) and the context extensions config.json's rope_scaling names.

Each extension only changes the rotation frequencies (and, for two, scales cos and sin); the shared transformer
computes them once per forward (Transformer.context). The formulas are transformers' modeling_rope_utils.py, computed
in the same order and dtypes so that logits match it in fp32 (tests/test_archs.py):
- linear (position interpolation, Chen et al. 2023): every frequency divided by `factor`.
- dynamic (NTK-aware scaling): once a forward reaches length L > max_position_embeddings, the base becomes
  theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)). Like transformers, the frequencies follow the
  current length, so in step-by-step decoding each new token's key is rotated with the frequencies of its own step
  (the cached keys keep theirs). minigptq recomputes them from the positions of each forward and keeps no state;
  transformers also remembers the longest length one model object has seen until a forward falls back under
  max_pos, which gives the same numbers for a fresh forward and for a generation that only grows.
- yarn (Peng et al. 2023): interpolation for the low frequencies, extrapolation for the high ones, a linear ramp
  between (beta_fast, beta_slow rotations over the original context), and cos/sin scaled by attention_factor.
- llama3 (Llama 3.1+): wavelengths longer than original / low_freq_factor divided by factor, shorter than
  original / high_freq_factor kept, a smooth blend between.
- longrope (Phi-3 / Phi-3.5, Ding et al. 2024): per-frequency divisors, short_factor while the forward's length is
  within original_max_position_embeddings and long_factor beyond, and cos/sin scaled by attention_factor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import Error
from .config import MAX_POSITIONS, Fields, ModelConfig, RopeScaling

SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Ranges (lo excluded) where RoPE stays finite and meaningful. rope_theta: the base, 1e4 .. 1e7 in real models (the
# largest seen, a 1M-context Llama 3, ~3.6e9); <= 1 turns every rotation the same or faster per dimension, and a tiny
# one is 0 in fp32, so the frequencies become Inf and cos / sin NaN. The scaling factors divide the frequencies (a
# tiny one overflows them too); attention_factor multiplies cos and sin (real: ~1 .. 1.5).
THETA = dict(lo=1.0, hi=1e15)
FACTOR = dict(lo=1e-3, hi=1e6)
ATTENTION = dict(lo=0.0, hi=100.0)


def _floats(r: Fields, key: str) -> tuple[float, ...]:
    v = r.d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and math.isfinite(x) and x > 0 for x in v):
        raise Error(f"the field {key!r} of rope_scaling must be a list of positive numbers, got {str(v)[:80]}")
    return tuple(float(x) for x in v)


def scaling_from_hf(f: Fields, max_pos: int, aliases: dict[str, str] | None = None
                    ) -> tuple[float, RopeScaling | None, int]:
    """config.json -> (rope_theta, the context extension or None, the context it gives in tokens).

    RoPE settings are "rope_theta" / "rope_scaling" (transformers 4) or "rope_parameters" (transformers 5).
    aliases: older names of a type (Phi-3's "su" and "yarn" both mean longrope). The context is what vLLM derives:
    max_position_embeddings, times factor for linear and dynamic, and at least original * factor for yarn.
    """
    rope = f.dict(("rope_parameters", "rope_scaling"))
    r = Fields(rope)
    theta = r.float("rope_theta", f.float("rope_theta", 10000.0, **THETA), **THETA)
    partial = r.float("partial_rotary_factor", f.float("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise Error(f"partial_rotary_factor={partial} (RoPE on part of each head) is not supported; only 1.0 is")
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = (aliases or {}).get(kind, kind) if isinstance(kind, str) else kind
    if kind not in SUPPORTED:
        raise Error(f"RoPE scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if kind == "default":
        return theta, None, max_pos
    # transformers lets a top-level original_max_position_embeddings (Phi-3 writes one) win over rope_scaling's
    original = f.int("original_max_position_embeddings", None, hi=MAX_POSITIONS) or \
        r.int("original_max_position_embeddings", max_pos, hi=MAX_POSITIONS)
    if kind in ("linear", "dynamic"):
        factor = r.float("factor", **FACTOR)
        return theta, RopeScaling(kind, factor, max_pos), min(MAX_POSITIONS, int(max_pos * factor))
    if kind == "llama3":
        s = RopeScaling(kind, r.float("factor", **FACTOR), original, low_freq_factor=r.float("low_freq_factor"),
                        high_freq_factor=r.float("high_freq_factor"))
        if s.high_freq_factor <= s.low_freq_factor:
            raise Error(f"rope_scaling high_freq_factor={s.high_freq_factor} must exceed "
                        f"low_freq_factor={s.low_freq_factor}")
        return theta, s, max_pos
    factor = r.float("factor", max_pos / original, **FACTOR)
    if kind == "yarn":
        attention = r.d.get("attention_factor")
        if attention is None:
            mscale, mscale_all = r.float("mscale", 0.0, lo=-1.0), r.float("mscale_all_dim", 0.0, lo=-1.0)
            if mscale and mscale_all and _mscale(factor, mscale_all) <= 0:  # the divisor below
                raise Error(f"rope_scaling mscale_all_dim={mscale_all} with factor={factor} gives a scale "
                            f"0.1 * mscale_all_dim * ln(factor) + 1 <= 0; valid: a value that keeps it positive")
            attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all \
                else _mscale(factor)
        s = RopeScaling(kind, factor, original, beta_fast=r.float("beta_fast", 32.0),
                        beta_slow=r.float("beta_slow", 1.0), truncate=r.bool("truncate", True),
                        attention_factor=r.float("attention_factor", float(attention), **ATTENTION))
        return theta, s, max(max_pos, min(MAX_POSITIONS, int(original * factor)))
    if factor > 1 and original < 2:  # log(original) divides below
        raise Error(f"rope_scaling longrope with factor={factor} needs original_max_position_embeddings >= 2, "
                    f"got {original}")
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))  # longrope
    return theta, RopeScaling(kind, factor, original, attention_factor=r.float("attention_factor", attention,
                                                                               **ATTENTION),
                              short_factor=_floats(r, "short_factor"), long_factor=_floats(r, "long_factor")), max_pos


def check_angles(cfg: ModelConfig) -> None:
    """Refuse RoPE settings whose rotation angles (position * frequency) or cos / sin factor are not finite up to the
    last position: cos and sin would be NaN there (and CPU attention silently turns a NaN query into zeros). The
    field ranges above keep most values sane; this catches their combinations (e.g. a longrope factor of 1e-300)."""
    last = cfg.max_positions - 1
    for seq_len in dict.fromkeys((1, cfg.max_positions)):  # dynamic and longrope change with the length
        inv, attention = inv_freq(cfg, seq_len, "cpu")
        if not (bool(torch.isfinite(inv * last).all()) and math.isfinite(attention) and attention > 0):
            kind = cfg.rope_scaling.type if cfg.rope_scaling is not None else "none"
            raise Error(f"the RoPE settings (rope_theta={cfg.rope_theta}, rope_scaling {kind}) give non-finite "
                        f"rotation angles by position {last}; valid: settings whose frequencies stay finite in "
                        f"float32 (check rope_theta and the rope_scaling factors)")


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(cfg: ModelConfig, seq_len: int, device) -> tuple[Tensor, float]:
    """Rotation frequencies (head_dim / 2,) for a forward whose last position is seq_len - 1, and the factor that
    multiplies cos and sin."""
    d, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    exps = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d  # (d/2,): 2i / d
    if s is None or (s.type == "dynamic" and seq_len <= s.original_max):
        return 1.0 / (base ** exps), 1.0
    if s.type == "linear":
        return 1.0 / (base ** exps) / s.factor, 1.0
    if s.type == "dynamic":  # in fp32 tensors, as transformers computes it
        L = torch.tensor(seq_len, device=device)
        base = base * ((s.factor * L / s.original_max) - (s.factor - 1)) ** (d / (d - 2))
        return 1.0 / (base ** exps), 1.0
    if s.type == "llama3":
        inv = 1.0 / (base ** exps)
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = s.original_max / s.low_freq_factor, s.original_max / s.high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)  # long wavelengths: interpolated
        smooth = (s.original_max / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    if s.type == "yarn":
        pos_freqs = base ** exps
        low, high = (d * math.log(s.original_max / (rot * 2 * math.pi)) / (2 * math.log(base))
                     for rot in (s.beta_fast, s.beta_slow))  # the dimensions that turn beta_fast / beta_slow times
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001))
        extrapolate = (1 - ramp.clamp(0, 1)).to(device)  # 1: keep the frequency, 0: divide it by factor
        inv = 1.0 / (s.factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
        return inv, s.attention_factor
    ext = torch.tensor(s.long_factor if seq_len > s.original_max else s.short_factor, device=device)  # longrope
    return 1.0 / (ext * base ** exps), s.attention_factor


def cos_sin(cfg: ModelConfig, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """pos (B, T) -> cos, sin (B, 1, T, head_dim) in dtype, for rotate-half RoPE."""
    s = cfg.rope_scaling  # only dynamic and longrope depend on the length, read here (one device sync) when used
    seq_len = int(pos.max()) + 1 if s is not None and s.type in ("dynamic", "longrope") and pos.numel() else 0
    inv, attention = inv_freq(cfg, seq_len, pos.device)
    freqs = pos[..., None].float() * inv  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    if attention == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
