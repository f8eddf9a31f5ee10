"""Tokenizers of a checkpoint folder: tokenizer.json through `tokenizers`, tokenizer.model through `sentencepiece`.

BOS/EOS/pad come from the checkpoint's configs (config.json, generation_config.json, tokenizer_config.json); a
conversation is rendered with the checkpoint's chat template by minigptq/chat_template.py (apply_chat_template).
"""
from __future__ import annotations

from pathlib import Path

from . import Error
from .chat_template import find_template, render, special_tokens
from .checkpoint_reader import resolve_model
from .config import MAX_TOKENIZER_FILE, eos_tuple, read_file, read_json


def _side_file(path: Path) -> dict:
    """An optional JSON side file (tokenizer_config.json, generation_config.json): {} if absent. Present as a FIFO,
    a device or a folder, it is an error (read_json): not silently skipped."""
    return read_json(path) if path.exists() else {}


class Tokenizer:
    def __init__(self, path: str | Path):
        path = resolve_model(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder {str(path)!r} does not exist (expected a folder with a tokenizer)")
        tc = _side_file(path / "tokenizer_config.json")
        cfg = _side_file(path / "config.json")
        gen = _side_file(path / "generation_config.json")
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            self.kind = "tokenizers"
            self.tok = _open(lambda b: HFTokenizer.from_str(b.decode("utf-8")), path / "tokenizer.json")
            self._id = self.tok.token_to_id
        elif (path / "tokenizer.model").exists():
            import sentencepiece as spm
            self.kind = "sentencepiece"
            self.tok = spm.SentencePieceProcessor()  # then Load: model_proto=b"" would load nothing, silently
            _open(self.tok.LoadFromSerializedProto, path / "tokenizer.model")
            self._id = lambda s: (i if (i := self.tok.piece_to_id(s)) != self.tok.unk_id() or s == "<unk>" else None)
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")

        def token_id(key: str, fallback):
            tok = tc.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            i = self._id(tok) if isinstance(tok, str) else None
            return fallback if i is None else i

        V = self.vocab_size

        def config_id(d: dict, key: str):  # a usable id from a config, else None (config.json is checked elsewhere)
            i = d.get(key)
            return i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V else None

        self.bos_id = config_id(cfg, "bos_token_id")
        self.bos_id = config_id(gen, "bos_token_id") if self.bos_id is None else self.bos_id
        self.bos_id = token_id("bos_token", None) if self.bos_id is None else self.bos_id
        eos = eos_tuple(gen.get("eos_token_id")) + eos_tuple(cfg.get("eos_token_id"))
        extra = token_id("eos_token", None)
        self.eos_ids = tuple(i for i in dict.fromkeys(eos + ((extra,) if extra is not None else ())) if i < V)
        self.pad_id = config_id(cfg, "pad_token_id")
        self.pad_id = token_id("pad_token", None) if self.pad_id is None else self.pad_id
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        # sentencepiece Llama tokenizers add BOS unless told otherwise; tokenizer.json ones say so in their
        # post-processor, which add_bos_token can override.
        self.add_bos = tc.get("add_bos_token", True if self.kind == "sentencepiece" else None)
        if self.add_bos is not None and not isinstance(self.add_bos, bool):
            raise Error(f"{path / 'tokenizer_config.json'}: add_bos_token must be true or false, "
                        f"got {self.add_bos!r}")
        self.chat_template = find_template(path, tc)  # None: the checkpoint has none
        self.chat_template_source = path / ("tokenizer_config.json" if tc.get("chat_template") is not None
                                            else "chat_template.jinja")  # named in the template's errors
        self.special_tokens = special_tokens(tc)
        # Gemma's chat turns end with <end_of_turn>, not its EOS; generation_config.json lists it (eos_token_id
        # [1, 106]) but not every re-upload has that file: a template that writes the token makes it a stop token
        writes_it = self.chat_template is not None and "<end_of_turn>" in self.chat_template
        end_of_turn = self._id("<end_of_turn>") if writes_it else None
        if end_of_turn is not None and end_of_turn < V and end_of_turn not in self.eos_ids:
            self.eos_ids += (end_of_turn,)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size() if self.kind == "tokenizers" else self.tok.get_piece_size()

    def encode(self, text: str, bos: bool | None = None, special: bool = True) -> list[int]:
        """Text -> token ids; bos=None follows the checkpoint's convention. special=False: add no special token
        (no BOS either) and read the special tokens written in the text as themselves (a rendered chat)."""
        check_text(text)
        if not special:
            return self._encode_raw(text)
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

    def _encode_raw(self, text: str) -> list[int]:
        check_text(text)
        if self.kind == "tokenizers":  # its added-token matching finds the special tokens in the text
            return self.tok.encode(text, add_special_tokens=False).ids
        specials = sorted({t for k, t in self.special_tokens.items() if isinstance(t, str) and self._id(t) is not None}
                          | {t for t in self.special_tokens.get("additional_special_tokens", ()) if self._id(t)},
                          key=len, reverse=True)
        ids, rest = [], text
        while rest:  # sentencepiece sees "<s>" as three characters: split the special tokens out first
            hit = min(((rest.find(t), t) for t in specials if t in rest), default=None)
            head, rest = (rest, "") if hit is None else (rest[:hit[0]], rest[hit[0] + len(hit[1]):])
            ids += self.tok.encode(head) if head else []
            if hit is not None:
                ids.append(self._id(hit[1]))
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """A conversation [{"role": "system" | "user" | "assistant", "content": str}, ...] rendered with the
        checkpoint's chat template (minigptq/chat_template.py) -> token ids (or the text, tokenize=False), ending
        with the prompt for the assistant's turn if add_generation_prompt."""
        if self.chat_template is None:
            raise Error("this checkpoint has no chat template (tokenizer_config.json: chat_template); use plain "
                        "prompts")
        text = render(self.chat_template, messages, add_generation_prompt, source=str(self.chat_template_source),
                      **self.special_tokens)
        return self._encode_raw(text) if tokenize else text

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)


def _open(loader, file: Path):
    """Load a tokenizer file from its bytes, read here (a regular file, capped: config.read_file) so that the parsing
    library never opens a FIFO or a device itself; any failure of that library becomes a ValueError naming the file."""
    data = read_file(file, MAX_TOKENIZER_FILE)
    try:
        return loader(data)
    except Exception as e:  # tokenizers and sentencepiece raise their own types for corrupt files
        raise Error(f"{file}: cannot be read as a tokenizer ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]}); the file is corrupt or of another format") from None


def check_text(text: str) -> None:
    """Text must be a str that UTF-8 can encode. Bytes that were not UTF-8 reach Python as lone surrogates (argv
    and, in the C locale, stdin are decoded with surrogateescape); the tokenizer libraries cannot take them."""
    if not isinstance(text, str):
        raise Error(f"the text to tokenize must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"the byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        before = text[max(0, e.start - 20):e.start]
        raise Error(f"the text is not valid UTF-8: {byte} at character {e.start} ({before!r} comes before it); give "
                    f"UTF-8 text (check the encoding of the terminal or file)") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)


def check_token_ids(ids, vocab_size: int, what: str) -> None:
    """Token ids (a list or tensor) must index the model's embedding: a tokenizer larger than the model is refused."""
    top = max(ids, default=-1) if isinstance(ids, list) else (int(ids.max()) if ids.numel() else -1)
    if top >= vocab_size:
        raise Error(f"{what} holds token id {top}, but the model's vocabulary has {vocab_size} entries; the "
                    f"tokenizer does not belong to this model")
