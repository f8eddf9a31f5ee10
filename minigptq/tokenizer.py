"""Tokenizers of a checkpoint folder: tokenizer.json through `tokenizers`, tokenizer.model through `sentencepiece`.

BOS/EOS/pad come from the checkpoint's configs (config.json, generation_config.json, tokenizer_config.json).
"""
from __future__ import annotations

from pathlib import Path

from .config import eos_tuple, read_json


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            self.kind, self.tok = "tokenizers", HFTokenizer.from_file(str(path / "tokenizer.json"))
            self._id = self.tok.token_to_id
        elif (path / "tokenizer.model").is_file():
            import sentencepiece as spm
            self.kind, self.tok = "sentencepiece", spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            self._id = lambda s: (i if (i := self.tok.piece_to_id(s)) != self.tok.unk_id() or s == "<unk>" else None)
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")

        def token_id(key: str, fallback):
            tok = tc.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            i = self._id(tok) if isinstance(tok, str) else None
            return fallback if i is None else i

        self.bos_id = cfg.get("bos_token_id", gen.get("bos_token_id"))
        self.bos_id = token_id("bos_token", None) if self.bos_id is None else self.bos_id
        eos = eos_tuple(gen.get("eos_token_id")) + eos_tuple(cfg.get("eos_token_id"))
        extra = token_id("eos_token", None)
        self.eos_ids = tuple(dict.fromkeys(eos + ((extra,) if extra is not None else ())))
        self.pad_id = cfg.get("pad_token_id", token_id("pad_token", None))
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        # sentencepiece Llama tokenizers add BOS unless told otherwise; tokenizer.json ones say so in their
        # post-processor, which add_bos_token can override.
        self.add_bos = tc.get("add_bos_token", True if self.kind == "sentencepiece" else None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size() if self.kind == "tokenizers" else self.tok.get_piece_size()

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Text -> token ids; bos=None follows the checkpoint's convention."""
        if self.kind == "tokenizers":
            ids = self.tok.encode(text, add_special_tokens=True).ids
        else:
            ids = self.tok.encode(text)
        bos = self.add_bos if bos is None else bos
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        elif bos is False and ids[:1] == [self.bos_id]:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)
