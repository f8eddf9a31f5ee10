"""Arch: what one architecture gives the shared code (minigptq/arch/__init__.py lists them): its config reader, the map
from Hugging Face weight names to the shared transformer's internal names, and its true-sequential groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import Fields, ModelConfig


@dataclass(frozen=True)
class Arch:
    name: str
    config_from_hf: Callable[[Fields], ModelConfig]
    top_names: dict[str, str]          # HF module path -> internal path, outside the blocks
    layer_prefix: str                  # HF path of block i, with "{i}"
    layer_names: dict[str, str]        # HF module path inside a block -> internal path inside a block
    sequential: tuple[tuple[str, ...], ...]  # internal linear names, true-sequential groups
    # Mixture of experts (minigptq/moe.py): names in layer_names and moe_sequential may hold "{e}", an expert's
    # index; on the blocks cfg.moe_layers names, moe_sequential replaces the MLP groups of `sequential` (the
    # groups not under "attn."), with its "{e}" groups repeated expert after expert.
    moe_sequential: tuple[tuple[str, ...], ...] = ()
    alias: "Arch | None" = None  # the same model under other tensor names (transformers 5's Mixtral names)

    def for_names(self, names) -> "Arch":
        """This Arch, or its alias when the checkpoint's tensor `names` are the alias's (block 0 has a tensor under a
        name only the alias uses)."""
        if self.alias is None:
            return self
        prefix = self.alias.layer_prefix.format(i=0)
        own = {hf.format(e=0) for hf in self.layer_names}
        only = tuple(prefix + hf.format(e=0) + "." for hf in self.alias.layer_names if hf.format(e=0) not in own)
        return self.alias if any(n.startswith(only) for n in names) else self
    # HF tensor-name prefixes of parts the model does not run, skipped instead of refused as unexpected (Gemma 3's
    # vision tower in a multimodal checkpoint, minigptq/arch/gemma.py)
    ignored: tuple[str, ...] = ()

    def module_map(self, num_layers: int, num_experts: int = 0) -> dict[str, str]:
        """Every HF module path -> internal module path, for a model of `num_layers` blocks (and `num_experts`
        experts per MoE block: the "{e}" names are repeated for each)."""
        out = dict(self.top_names)
        names = [(hf.format(e=e), ours.format(e=e)) for hf, ours in self.layer_names.items()
                 for e in (range(num_experts) if "{e}" in hf else (0,))]
        for i in range(num_layers):
            for hf, ours in names:
                out[self.layer_prefix.format(i=i) + hf] = f"layers.{i}.{ours}"
        return out

    def groups(self, cfg: ModelConfig, i: int) -> list[tuple[str, ...]]:
        """Block i's true-sequential groups of internal linear names (experts expanded, one after another)."""
        if i not in cfg.moe_layers:
            return list(self.sequential)
        out = [g for g in self.sequential if all(n.startswith("attn.") for n in g)]
        if cfg.shared_expert_size:  # the groups without "{e}" are the shared expert's
            out += [g for g in self.moe_sequential if not any("{e}" in n for n in g)]
        per_expert = [g for g in self.moe_sequential if any("{e}" in n for n in g)]
        return out + [tuple(n.format(e=e) for n in g) for e in range(cfg.num_experts) for g in per_expert]
