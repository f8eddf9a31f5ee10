"""Tests of tools/convert_smollm2.py: its GGUF reader and dequantizers on a synthetic file (always run), and the
converted checkpoint models/SmolLM2-135M-Instruct/ (skipped until `python tools/convert_smollm2.py` has been run).

The dequantizers are checked against plain scalar loops written after ggml-quants.c (dequantize_row_q4_1 / _q8_0).
"""
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "SmolLM2-135M-Instruct"

_spec = importlib.util.spec_from_file_location("convert_smollm2", ROOT / "tools" / "convert_smollm2.py")
conv = sys.modules["convert_smollm2"] = importlib.util.module_from_spec(_spec)  # registered for @dataclass
_spec.loader.exec_module(conv)


# --- scalar references (one block at a time, as the C code does) ---------------------------------------------
def ref_q4_1(raw: bytes) -> list[float]:
    out = []
    for b in range(0, len(raw), 20):
        d, m = (float(np.frombuffer(raw[b + i:b + i + 2], "<f2")[0]) for i in (0, 2))
        qs = raw[b + 4:b + 20]
        out += [d * (q & 0x0F) + m for q in qs] + [d * (q >> 4) + m for q in qs]  # elements 0..15, then 16..31
    return out


def ref_q8_0(raw: bytes) -> list[float]:
    out = []
    for b in range(0, len(raw), 34):
        d = float(np.frombuffer(raw[b:b + 2], "<f2")[0])
        out += [d * q for q in np.frombuffer(raw[b + 2:b + 34], np.int8)]
    return out


# --- a tiny GGUF writer for the synthetic file ----------------------------------------------------------------
def _s(x: str) -> bytes:
    return struct.pack("<Q", len(x.encode())) + x.encode()


def write_gguf(path: Path, meta: list[tuple[str, int, bytes]], tensors: list[tuple[str, tuple, int, bytes]],
               align: int = 32) -> None:
    """meta: (key, value type, encoded value); tensors: (name, ne innermost-first, ggml type, raw bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    head += b"".join(_s(k) + struct.pack("<I", t) + v for k, t, v in meta)
    data, infos = b"", b""
    for name, ne, gtype, raw in tensors:
        data += b"\0" * (-len(data) % align)
        infos += _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        infos += struct.pack("<IQ", gtype, len(data))
        data += raw
    head += infos
    path.write_bytes(head + b"\0" * (-len(head) % align) + data)


def test_reader_and_dequantizers_match_scalar_reference(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = 4, 64  # two blocks per row
    d = rng.uniform(0.01, 0.1, rows * cols // 32).astype("<f2")
    m = rng.uniform(-1, 0, rows * cols // 32).astype("<f2")
    q4 = b"".join(di.tobytes() + mi.tobytes() + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
                  for di, mi in zip(d, m))
    q8 = b"".join(di.tobytes() + rng.integers(-128, 128, 32, dtype=np.int8).tobytes() for di in d)
    f32 = rng.standard_normal(cols).astype("<f4")
    f16 = rng.standard_normal(cols).astype("<f2")
    meta = [("general.alignment", 4, struct.pack("<I", 64)), ("a.u8", 0, b"\x07"),
            ("a.i16", 3, struct.pack("<h", -3)),
            ("a.f32", 6, struct.pack("<f", 1e-5)), ("a.bool", 7, b"\x01"), ("a.str", 8, _s("héllo")),
            ("a.u64", 10, struct.pack("<Q", 2**40)), ("a.f64", 12, struct.pack("<d", 0.25)),
            ("a.ints", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3)),
            ("a.strs", 9, struct.pack("<IQ", 8, 2) + _s("a b") + _s("Ġx"))]
    F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8  # ggml type ids
    tensors = [("q4", (cols, rows), Q4_1, q4), ("q8", (cols, rows), Q8_0, q8),
               ("f32", (cols,), F32, f32.tobytes()), ("f16", (cols,), F16, f16.tobytes())]
    path = tmp_path / "tiny.gguf"
    write_gguf(path, meta, tensors, align=64)
    got_meta, got = conv.read_gguf(path)
    assert {k: v for k, v in got_meta.items() if not k.startswith("GGUF.")} == {
        "general.alignment": 64, "a.u8": 7, "a.i16": -3, "a.f32": 1e-5, "a.bool": True, "a.str": "héllo",
        "a.u64": 2**40, "a.f64": 0.25, "a.ints": [1, -2, 3], "a.strs": ["a b", "Ġx"]}
    assert conv.dequantize(got["q4"]).shape == (rows, cols)
    np.testing.assert_allclose(conv.dequantize(got["q4"]).ravel(), ref_q4_1(q4), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(conv.dequantize(got["q8"]).ravel(), ref_q8_0(q8), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(conv.dequantize(got["f32"]), f32)
    np.testing.assert_array_equal(conv.dequantize(got["f16"]), f16.astype(np.float32))
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        conv.read_gguf(tmp_path / "cut.gguf")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of head_dim 4
    permuted = w.reshape(3, 2, 12 // 3 // 2, 5).swapaxes(1, 2).reshape(12, 5)  # convert_hf_to_gguf.py permute
    np.testing.assert_array_equal(conv.unpermute_rope(permuted, 3), w)


# --- the converted checkpoint ---------------------------------------------------------------------------------
@pytest.fixture
def ckpt() -> Path:
    if not (CKPT / "config.json").exists():
        pytest.skip(f"{CKPT} not converted yet: run `python tools/convert_smollm2.py`")
    return CKPT


def test_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    expected = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True, "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2}
    assert {k: cfg.get(k) for k in expected} == expected
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    special = (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["add_bos_token"])
    assert special == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in tok_cfg["chat_template"]


def test_tensor_names_and_shapes(ckpt):
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    per_layer = {"input_layernorm": (576,), "post_attention_layernorm": (576,), "self_attn.q_proj": (576, 576),
                 "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
                 "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}  # tied: no lm_head.weight
    expected |= {f"model.layers.{i}.{k}.weight": s for i in range(30) for k, s in per_layer.items()}
    assert shapes == expected


def test_tokenizer_round_trip(ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = "<|im_start|>user\nIn 2024,  3.14 cafés\tcost ½ — 日本 🙂<|im_end|>\n"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.tokens[-2] == "<|im_end|>"  # specials are single tokens, no BOS added
    assert [t for t in enc.tokens if t in "0123456789"] == list("2024314")  # digits split one by one
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
