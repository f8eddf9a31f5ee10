"""Writing GPTQ checkpoints: atomically, resumably, in the standard format (shared/docs/gptq-format.md).

A quantization run keeps its work in a hidden folder beside the output, `.<out>.partial/`:
    state.json               settings fingerprint and the per-layer log of every finished block
    block_0000.safetensors   the finished blocks' tensors (HF names), one file per block
    top.safetensors          the tensors outside the blocks (embeddings, final norm, lm_head)
Only when every block is done is the checkpoint assembled in `.<out>.tmp/` and renamed to `<out>`, so an
interrupted run never leaves a half-written checkpoint, and `--resume` restarts from the last finished block.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
SHARD_BYTES = 4 * 2**30  # the assembled checkpoint is split into shards of at most this size


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """safetensors file written atomically; tensors made contiguous CPU copies first."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class PartialRun:
    """The resumable work folder of one quantization run (see the module docstring)."""

    def __init__(self, out: Path, settings: dict, resume: bool, overwrite: bool):
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self.settings = settings
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"output {self.out} already exists; pass --overwrite to replace it")
        if self.dir.exists() and not resume:
            if not overwrite:
                raise FileExistsError(f"an interrupted run left {self.dir}; pass --resume to continue it or "
                                      f"--overwrite to start over")
            shutil.rmtree(self.dir)
        self.state = {"fingerprint": fingerprint(settings), "settings": settings, "blocks": {}}
        if self.dir.exists():
            old = json.loads((self.dir / "state.json").read_text()) if (self.dir / "state.json").exists() else None
            if old is None:  # killed before the first block finished: nothing to keep
                shutil.rmtree(self.dir)
            elif old["fingerprint"] != self.state["fingerprint"]:
                raise ValueError(f"cannot resume {self.dir}: it was started with other settings "
                                 f"({old['settings']}); rerun with those or use --overwrite")
            else:
                self.state = old
        self.resumed = bool(self.state["blocks"])
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "state.json", self.state)

    def discard_if_fresh(self) -> None:
        """Remove the work folder unless it holds blocks from an earlier, interrupted run (kept for --resume)."""
        if not self.resumed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def done_blocks(self) -> set[int]:
        return {int(i) for i in self.state["blocks"]}

    def block_file(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, Tensor], log: list[dict]) -> None:
        save_tensors(self.block_file(i), tensors)  # the tensors first: a block counts as done once state.json says so
        self.state["blocks"][str(i)] = log
        write_json(self.dir / "state.json", self.state)

    def load_block(self, i: int) -> dict[str, Tensor]:
        from .loader import SafetensorsFile
        f = SafetensorsFile(self.block_file(i))
        return {k: f.get(k).clone() for k in f.keys()}

    def finish(self, top: dict[str, Tensor], src: Path, config: dict, quant_config: dict, overwrite: bool,
               dtype: torch.dtype = torch.float16) -> None:
        """Assemble the checkpoint in a temporary folder, then rename it into place and drop the work folder."""
        from .loader import SafetensorsFile
        tmp = self.out.parent / f".{self.out.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        files = [SafetensorsFile(self.block_file(i)) for i in sorted(self.done_blocks())]
        tensors = dict(top)
        for f in files:
            tensors.update({k: f.get(k) for k in f.keys()})
        write_shards(tmp, tensors)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        write_json(tmp / "config.json", dict(config, quantization_config=quant_config, torch_dtype=str(dtype).removeprefix("torch.")))
        write_json(tmp / "quantize_config.json", quant_config)
        rows = [r for i in sorted(self.done_blocks()) for r in self.state["blocks"][str(i)]]
        (tmp / "quant_log.tsv").write_text("block\tmodule\tmethod\terror\tpercdamp\tseconds\n" + "".join(
            f"{r['block']}\t{r['module']}\t{r['method']}\t{r['error']:.6g}\t{r['percdamp']}\t{r['seconds']:.3f}\n"
            for r in rows))
        if self.out.exists():  # --overwrite: move the old one aside first so the swap is two renames
            old = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(tmp, self.out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, self.out)
        shutil.rmtree(self.dir)


def write_shards(folder: Path, tensors: dict[str, Tensor]) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past SHARD_BYTES."""
    shards, size = [{}], 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_tensors(folder / "model.safetensors", shards[0])
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(folder / fname, shard)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
