"""Rotary position embeddings (RoPE, Su et al. 2021) and the context extensions config.json's rope_scaling names.

Each extension only changes the rotation frequencies (and, for two, scales cos and sin); the shared transformer
computes them once per forward (Transformer.context). Their settings (config.RopeScaling) are read from config.json
by minigptq/arch/llama.py (scaling_from_hf). The formulas are transformers' modeling_rope_utils.py, computed in the
same order and dtypes so that logits match it in fp32 (tests/test_archs.py):
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


def check_angles(cfg) -> None:
    """Refuse RoPE settings whose rotation angles (position * frequency) or cos / sin factor are not finite up to the
    last position: cos and sin would be NaN there (and CPU attention silently turns a NaN query into zeros). The
    field ranges (arch/llama.py) keep most values sane; this catches their combinations (e.g. a longrope factor of
    1e-300). cfg: a ModelConfig (this module reads its head_dim, rope_theta, rope_scaling and max_positions)."""
    last = cfg.max_positions - 1
    for seq_len, local in dict.fromkeys([(1, False), (cfg.max_positions, False), (1, bool(cfg.rope_local_theta))]):
        inv, attention = inv_freq(cfg, seq_len, "cpu", local)  # dynamic and longrope change with the length
        if not (bool(torch.isfinite(inv * last).all()) and math.isfinite(attention) and attention > 0):
            kind = cfg.rope_scaling.type if cfg.rope_scaling is not None else "none"
            raise Error(f"the RoPE settings (rope_theta={cfg.rope_theta}, rope_scaling {kind}) give non-finite "
                        f"rotation angles by position {last}; valid: settings whose frequencies stay finite in "
                        f"float32 (check rope_theta and the rope_scaling factors)")


def inv_freq(cfg, seq_len: int, device, local: bool = False) -> tuple[Tensor, float]:
    """Rotation frequencies (head_dim / 2,) for a forward whose last position is seq_len - 1, and the factor that
    multiplies cos and sin. local: those of the sliding-window blocks where they have their own base (Gemma 3's
    rope_local_theta, plain RoPE)."""
    d, base, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    if local and cfg.rope_local_theta:
        base, s = cfg.rope_local_theta, None
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


def cos_sin(cfg, pos: Tensor, dtype: torch.dtype, local: bool = False) -> tuple[Tensor, Tensor]:
    """pos (B, T) -> cos, sin (B, 1, T, head_dim) in dtype, for rotate-half RoPE (local: see inv_freq)."""
    # only dynamic and longrope depend on the length, read here (one device sync) when used
    s = None if local else cfg.rope_scaling
    seq_len = int(pos.max()) + 1 if s is not None and s.type in ("dynamic", "longrope") and pos.numel() else 0
    inv, attention = inv_freq(cfg, seq_len, pos.device, local)
    freqs = pos[..., None].float() * inv  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    if attention == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
