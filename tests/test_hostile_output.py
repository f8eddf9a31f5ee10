"""No silent wrong results (issue 28, items 4-6 and beside them): non-finite activations, degenerate RoPE numbers,
the completion's text in every output mode, and inspect's verdicts on checkpoints no loader takes.

Every failing case asserts the exit code, exactly one `error:` line without a traceback, the key words of the
message, that stdout holds no result, and that nothing in the case's folder changed.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import STORIES
from test_hostile import gptq_ckpt  # noqa: F401 (a fixture: the 4-bit act-order stories260k checkpoint)
from test_hostile import NORM, assert_one_error, run_out, calib_file, changed, edit_config, edit_tensors, model_copy, snapshot

MLP_NORM = "model.layers.2.post_attention_layernorm.weight"
O = "model.layers.1.self_attn.o_proj"  # quantized in gptq_ckpt (stories260k keeps its MLP in full precision)


def gen_argv(m, *extra, prompt="Lily", n=4):
    return ["--model", str(m), "--prompt", prompt, "--max-new-tokens", str(n), *extra]


def eval_argv(root, m, *extra):
    return ["--model", str(m), "--dataset", str(root / "calib.txt"), "--seqlen", "64", "--max-windows", "1", *extra]


def fails(root, module, argv, needles, stdout_may_hold=""):
    """Run a command that must fail: exit 2, one error line with `needles`, no result on stdout, nothing changed."""
    before = snapshot(root)
    code, out, err = run_out(module, argv)
    assert_one_error(code, err, 2, needles)
    assert out == stdout_may_hold, out  # a stream may have echoed the prompt, never a generated token
    assert not changed(before, snapshot(root))
    return err


def fill(name, value):
    return lambda sd: {**sd, name: torch.full_like(sd[name], value)}


# -- item 4: non-finite activations are an error naming the first block, never a result -----------------------------

@pytest.fixture
def overflowing(tmp_path):
    """stories260k whose block-2 MLP norm weight (finite, 3e38) makes the activations overflow to Inf / NaN."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    edit_tensors(m, fill(MLP_NORM, 3e38))
    return m


def test_eval_nan_is_an_error_naming_the_block(tmp_path, overflowing):
    fails(tmp_path, "eval", eval_argv(tmp_path, overflowing), ["non-finite logits", "block 2 (of 5)"])


def test_eval_chunked_nan_is_an_error(tmp_path, overflowing):
    fails(tmp_path, "eval", eval_argv(tmp_path, overflowing, "--chunk", "16"), ["non-finite", "block 2"])


@pytest.mark.parametrize("extra,echo", [((), "Lily"), (("--quiet",), ""), (("--json",), ""),
                                        (("--temperature", "1", "--top-k", "5", "--quiet"), ""),
                                        (("--prompt", "Once upon", "--quiet"), "")],
                         ids=["stream", "quiet", "json", "sampling", "two-prompts"])
def test_generate_nan_prints_no_token(tmp_path, overflowing, extra, echo):
    """The logits of the prefill are checked before a stream shows the first token (multinomial, which fails on
    NaN, never sees them); the stream has only echoed the prompt."""
    fails(tmp_path, "generate", gen_argv(overflowing, *extra), ["non-finite logits", "block 2 (of 5)"],
          stdout_may_hold=echo)


def test_generate_nan_at_a_later_step(tmp_path, monkeypatch):
    """Finite logits for the prompt and the first step, NaN at the second step (e.g. an activation that overflows
    only at a later position): the stream shows the tokens before, never the broken one, and the run fails."""
    from minigptq.transformer import Transformer
    m = model_copy(tmp_path)
    _, two_tokens, _ = run_out("generate", gen_argv(m, "--quiet", n=2))
    real, calls = Transformer.forward, []

    def forward(self, tokens, *args, **kw):
        calls.append(tokens.shape[1])
        y = real(self, tokens, *args, **kw)
        return y.fill_(float("nan")) if len(calls) == 3 else y  # 1: the prefill, 2: step 1, 3: step 2
    monkeypatch.setattr(Transformer, "forward", forward)
    fails(tmp_path, "generate", gen_argv(m, n=6), ["non-finite logits at generated token 3", "no result"],
          stdout_may_hold=two_tokens.rstrip("\n"))


def test_eval_perplexity_overflow_is_an_error(tmp_path):
    """Finite but absurd logits (final norm weight 1e30): exp(mean NLL) overflows; no 'perplexity inf'."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    edit_tensors(m, fill(NORM, 1e30))
    fails(tmp_path, "eval", eval_argv(tmp_path, m), ["perplexity", "overflows", "degenerate"])


def test_gptq_scales_that_overflow_the_weights(tmp_path, gptq_ckpt):
    """Finite fp32 scales of 3e38: scale * (q - zero) is Inf in fp32; refused at load, naming the layer."""
    q = tmp_path / "q"
    shutil.copytree(gptq_ckpt, q)
    calib_file(tmp_path)
    edit_tensors(q, lambda sd: {**sd, f"{O}.scales": torch.full(sd[f"{O}.scales"].shape, 3e38)})
    for module, argv in (("eval", eval_argv(tmp_path, q)), ("generate", gen_argv(q, "--quiet"))):
        fails(tmp_path, module, argv, [f"{O}", "scales", "overflow float32", "valid: |scale| <="])


def test_gptq_scales_that_overflow_the_activations(tmp_path, gptq_ckpt):
    """Scales just under the limit: the weights are finite, the layer's outputs are not."""
    q = tmp_path / "q"
    shutil.copytree(gptq_ckpt, q)
    calib_file(tmp_path)
    edit_tensors(q, lambda sd: {**sd, f"{O}.scales": torch.full(sd[f"{O}.scales"].shape, 2e37)})
    fails(tmp_path, "eval", eval_argv(tmp_path, q), ["non-finite logits", "block 1 (of 5)"])
    fails(tmp_path, "generate", gen_argv(q, "--json"), ["non-finite logits", "block 1 (of 5)"])


# -- RoPE numbers: degenerate values refused with the valid range; every real model's value accepted -------------

def set_fields(**kv):
    return lambda c: {**c, **kv}


@pytest.mark.parametrize("fields,needles", [
    (dict(rope_theta=1e-300), ["rope_theta", "(1, 1e+15]", "1e-300"]),
    (dict(rope_theta=1.0), ["rope_theta", "(1, 1e+15]"]),
    (dict(rope_theta=1e300), ["rope_theta", "1e+300"]),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e-300}), ["rope_theta"]),
    (dict(rope_scaling={"rope_type": "linear", "factor": 1e-300}), ["factor", "(0.001, 1e+06]"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 1e6, "original_max_position_embeddings": 64,
                        "mscale": 1.0, "mscale_all_dim": -0.99}), ["mscale_all_dim", "<= 0"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": 1e300}), ["attention_factor"]),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 1,
                        "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}), ["original_max_position", ">= 2"]),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 256,
                        "short_factor": [1e-300] * 4, "long_factor": [1.0] * 4}), ["non-finite rotation angles"]),
    (dict(head_dim=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["dynamic", "head_dim >= 4"]),
], ids=["theta-tiny", "theta-1", "theta-huge", "theta-in-rope-parameters", "linear-factor-tiny",
        "yarn-mscale-zero-divisor", "yarn-attention-huge", "longrope-original-1", "longrope-factor-tiny",
        "dynamic-head-dim-2"])
def test_degenerate_rope_is_refused(tmp_path, fields, needles):
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    edit_config(m, set_fields(**fields))
    fails(tmp_path, "generate", gen_argv(m, "--quiet"), needles)
    if fields.get("rope_theta") == 1e-300:
        fails(tmp_path, "eval", eval_argv(tmp_path, m), needles)


@pytest.mark.parametrize("theta", [10000.0, 5e5, 1e6, 5e6, 1e7, 3.58e9])
def test_real_rope_theta_values_are_valid(theta):
    """Llama 2 (1e4), Llama 3 (5e5), Qwen / Mistral (1e6), Yi / Qwen3 long (5e6, 1e7), 1M-context Llama 3 (~3.6e9)."""
    from minigptq.arch import get_arch
    from minigptq.config import Fields
    hf = dict(json.loads((STORIES / "config.json").read_text()), rope_theta=theta)
    assert get_arch("llama").config_from_hf(Fields(hf)).rope_theta == theta


def test_real_rope_theta_generates(tmp_path):
    m = model_copy(tmp_path)
    edit_config(m, set_fields(rope_theta=5e6))
    code, out, err = run_out("generate", gen_argv(m, "--quiet"))
    assert_one_error(code, err, 0)
    assert out.startswith("Lily") and "\ufffd" not in out


def test_fp16_overflow_says_use_fp32(tmp_path):
    """A norm weight of 6e4 fits fp16 but its products do not: with --dtype fp16 the error says to use fp32."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    edit_tensors(m, fill(MLP_NORM, 6e4))
    fails(tmp_path, "eval", eval_argv(tmp_path, m, "--dtype", "fp16"), ["non-finite", "block 2", "--dtype fp32"])
    code, out, err = run_out("eval", eval_argv(tmp_path, m, "--dtype", "fp32"))
    assert_one_error(code, err, 0)
    assert out.startswith("perplexity ")


def test_norm_epsilon_too_small_for_fp32(tmp_path):
    m = model_copy(tmp_path)
    edit_config(m, set_fields(rms_norm_eps=1e-300))
    fails(tmp_path, "generate", gen_argv(m, "--quiet"), ["norm epsilon", "1e-300", "[1e-37, 1]"])


# -- item 4 beside it: eval's context of one token ------------------------------------------------------------------

def test_eval_context_of_one_token(tmp_path):
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    edit_config(m, set_fields(max_position_embeddings=1))
    fails(tmp_path, "eval", eval_argv(tmp_path, m), ["max_position_embeddings 1", "2 tokens"])


# -- item 5: the completion reads as the full text, in every output mode --------------------------------------------

def test_space_after_the_prompt_in_every_mode(tmp_path):
    """SentencePiece drops the space of a first '\u2581and' decoded alone: stream, --quiet, --json and several prompts
    must all show "Lily and", as decode(prompt + new) does."""
    m = model_copy(tmp_path)
    _, stream, _ = run_out("generate", gen_argv(m, n=6))
    _, quiet, _ = run_out("generate", gen_argv(m, "--quiet", n=6))
    _, js, _ = run_out("generate", gen_argv(m, "--json", n=6))
    _, two, _ = run_out("generate", gen_argv(m, "--prompt", "Once upon a", "--quiet", n=6))
    assert stream.startswith("Lily and ") and stream == quiet, (stream, quiet)
    assert "Lily" + json.loads(js)["completion"] == quiet.rstrip("\n")
    blocks = two.split("--- [")[1:]
    assert blocks[0].splitlines()[1].startswith("Lily and ") and blocks[1].splitlines()[1].startswith("Once upon a ")


def test_stop_string_with_a_leading_space(tmp_path):
    """--stop ' and' matches the first new token: the stop check reads the text as shown, not the token alone."""
    m = model_copy(tmp_path)
    code, out, err = run_out("generate", gen_argv(m, "--json", "--stop", " and", n=8))
    assert_one_error(code, err, 0)
    r = json.loads(out)
    assert (r["finish_reason"], r["completion"], r["completion_tokens"]) == ("stop", "", 1), r


def test_stream_shows_what_it_held_back(tmp_path):
    """The stream holds back a tail that may begin a stop string; when the run ends without it, that tail is shown,
    so the stream equals --quiet (it dropped it before)."""
    m = model_copy(tmp_path)
    _, text, _ = run_out("generate", gen_argv(m, "--quiet", n=8))
    stop = text.rstrip("\n")[-2:] + "\u00a7\u00a7"  # its first two characters end the text; it never completes
    _, stream, _ = run_out("generate", gen_argv(m, "--stop", stop, n=8))
    _, quiet, _ = run_out("generate", gen_argv(m, "--stop", stop, "--quiet", n=8))
    assert stream == quiet == text, (stream, quiet, text)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """stories260k with a byte-level BPE tokenizer.json (vocab <= 512) instead of its SentencePiece model."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    root = tmp_path_factory.mktemp("bpe")
    m = model_copy(root)
    (m / "tokenizer.model").unlink()
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Lily and Tom went to the park. They saw a big dog, café, naïve, 日本."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, initial_alphabet=
                                                      pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>"]))
    tok.save(str(m / "tokenizer.json"))
    (m / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return m


def test_completion_text_byte_level_bpe(bpe_model):
    from minigptq.generate import completion_text
    from minigptq.tokenizer import load_tokenizer
    tok = load_tokenizer(bpe_model)
    for prompt, rest in [("Lily", " and Tom went"), ("café", " naïve 日本"), ("Lily and", " Tom")]:
        ids = tok.encode(prompt + rest, bos=False)
        p = tok.encode(prompt, bos=False)
        assert ids[:len(p)] == p
        assert completion_text(tok, p, ids[len(p):]) == rest
    m = bpe_model
    _, stream, _ = run_out("generate", gen_argv(m, n=6))
    _, quiet, _ = run_out("generate", gen_argv(m, "--quiet", n=6))
    _, js, _ = run_out("generate", gen_argv(m, "--json", n=6))
    assert stream == quiet and "Lily" + json.loads(js)["completion"] == quiet.rstrip("\n"), (stream, quiet, js)


def test_completion_text_sentencepiece():
    from minigptq.generate import completion_text
    from minigptq.tokenizer import load_tokenizer
    tok = load_tokenizer(STORIES)
    ids = tok.encode("Lily and Tom went")
    p = tok.encode("Lily")
    assert completion_text(tok, p, ids[len(p):]) == " and Tom went" and tok.decode(ids[len(p):]) == "and Tom went"


# -- items 6 and beside it: inspect -------------------------------------------------------------------------------

def inspect_case(tmp_path, gptq_ckpt, setup):
    q = tmp_path / "q"
    shutil.copytree(gptq_ckpt, q)
    setup(q)
    before = snapshot(tmp_path)
    code, out, err = run_out("inspect", [str(q)])
    assert_one_error(code, err, 0)
    jcode, jout, jerr = run_out("inspect", [str(q), "--json"])
    assert_one_error(jcode, jerr, 0)
    assert not changed(before, snapshot(tmp_path))
    return out, json.loads(jout)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensor,fn,implied", [
    ("qweight", lambda t: t[:4], "[8, 64]"),
    ("qweight", lambda t: t.reshape(-1), "[8, 64]"),
    ("qweight", lambda t: t[0, 0], "[8, 64]"),
    ("qzeros", lambda t: torch.cat([t, t], 1), "[4, 8]"),
    ("scales", lambda t: t[:, :32].contiguous(), "[4, 64]"),
    ("g_idx", lambda t: t[:10], "[64]"),
], ids=["qweight-short", "qweight-1d", "qweight-0d", "qzeros-wide", "scales-narrow", "g_idx-short"])
def test_inspect_misshapen_tensor_will_not_load(tmp_path, gptq_ckpt, tensor, fn, implied):
    name = f"{Q}.{tensor}"
    out, js = inspect_case(tmp_path, gptq_ckpt, lambda q: edit_tensors(q, lambda sd: {**sd, name: fn(sd[name])}))
    lines = out.splitlines()[2:]  # the summary, "compatibility of ...:", then one line per loader
    assert len(lines) == 4 and all("no: it will not load" in ln and name in ln and implied in ln for ln in lines), out
    assert all(not v["ok"] and name in v["reasons"][0] for v in js["loaders"]), js


def test_inspect_shapes_consistent_with_other_bits(tmp_path, gptq_ckpt):
    """config.json says 8 bits while the tensors are 4-bit: the shapes contradict the quantization config."""
    def setup(q):
        edit_config(q, lambda c: {**c, "quantization_config": {**c["quantization_config"], "bits": 8}})
        edit_config(q, lambda c: {**c, "bits": 8}, "quantize_config.json")
    out, js = inspect_case(tmp_path, gptq_ckpt, setup)
    assert all(not v["ok"] and "bits=8" in v["reasons"][0] for v in js["loaders"]), js


def test_inspect_packed_layer_missing_a_tensor(tmp_path, gptq_ckpt):
    name = f"{Q}.scales"
    out, js = inspect_case(tmp_path, gptq_ckpt, lambda q: edit_tensors(q, lambda sd: {k: v for k, v in sd.items()
                                                                                     if k != name}))
    assert all(not v["ok"] and f"{name} is missing" in v["reasons"][0] for v in js["loaders"]), js


def test_inspect_gptq_config_without_packed_tensors(tmp_path):
    """A full-precision model whose config.json claims GPTQ: no loader finds the qweight tensors it expects."""
    m = model_copy(tmp_path)
    edit_config(m, set_fields(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32}))
    before = snapshot(tmp_path)
    code, out, err = run_out("inspect", [str(m), "--json"])
    assert_one_error(code, err, 0)
    js = json.loads(out)
    assert js["quantized_layers"] == 0 and all(not v["ok"] and "no packed tensors" in v["reasons"][0]
                                               for v in js["loaders"]), js
    assert not changed(before, snapshot(tmp_path))


@pytest.mark.parametrize("meta,note", [
    ("x", "meta is 'x', not an object"), ([1], "meta is [1], not an object"),
    ({"quantizer": [1, 2]}, "meta.quantizer is [1, 2], not a list of tool names"),
    ({"quantizer": 5}, "meta.quantizer is 5"), ({"quantizer": None}, None), ({"quantizer": "gptqmodel:4.0"}, None),
], ids=["meta-string", "meta-list", "quantizer-ints", "quantizer-int", "quantizer-null", "quantizer-string"])
def test_inspect_odd_meta(tmp_path, gptq_ckpt, meta, note):
    def setup(q):
        edit_config(q, lambda c: {**c, "quantization_config": {**c["quantization_config"], "meta": meta}})
        edit_config(q, lambda c: {**c, "meta": meta}, "quantize_config.json")
    out, js = inspect_case(tmp_path, gptq_ckpt, setup)
    first = out.splitlines()[0]
    if note is None:
        assert "note" not in js and ("gptqmodel:4.0" in first if isinstance(meta["quantizer"], str) else
                                     "an unnamed tool" in first), out
    else:
        assert "an unnamed tool" in first and note in first and note in js["note"], out
        assert js["quantizer"] is None


# -- beside the list: sampling numbers at their edges ---------------------------------------------------------------

@pytest.mark.parametrize("extra,needles", [
    (("--seed", str(2**64)), ["seed", "[-2**63, 2**64)"]),
    (("--seed", str(-2**63 - 1)), ["seed"]),
    (("--temperature", "-0.0001"), ["temperature"]),
], ids=["seed-2^64", "seed-below", "temperature-negative"])
def test_sampling_edges_refused_before_any_output(tmp_path, extra, needles):
    m = model_copy(tmp_path)
    fails(tmp_path, "generate", gen_argv(m, *extra), needles)  # not even the prompt's echo


@pytest.mark.parametrize("temperature", ["1e-300", "1e-45", "5e-324"])
def test_tiny_temperature_is_greedy(tmp_path, temperature):
    """Dividing fp32 logits by 1e-300 (0 in fp32) gave Inf, NaN probabilities and an internal error."""
    m = model_copy(tmp_path)
    code, out, err = run_out("generate", gen_argv(m, "--quiet", "--temperature", temperature))
    assert_one_error(code, err, 0)
    assert out == run_out("generate", gen_argv(m, "--quiet"))[1]
