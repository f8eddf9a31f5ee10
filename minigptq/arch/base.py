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

    def module_map(self, num_layers: int) -> dict[str, str]:
        """Every HF module path -> internal module path, for a model of `num_layers` blocks."""
        out = dict(self.top_names)
        for i in range(num_layers):
            for hf, ours in self.layer_names.items():
                out[self.layer_prefix.format(i=i) + hf] = f"layers.{i}.{ours}"
        return out
