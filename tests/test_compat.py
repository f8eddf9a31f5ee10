"""The compatibility report (minigptq/compat.py, `python -m minigptq.inspect`) and `--target vllm`: one test per
rule, each on a checkpoint the test writes, plus which config file wins when a checkpoint holds two."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import STORIES, WIKI_VALID
from minigptq.compat import report
from minigptq.loader import load_model
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig

CURRENT, OLDER = 2, 3  # indices of the vLLM verdicts in compat.LOADERS


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(WIKI_VALID.read_text()[:30000])
    return f


@pytest.fixture(scope="module")
def write(tmp_path_factory, calib):
    """write(name, model=STORIES, **settings) -> a checkpoint quantized with those settings (cached per name)."""
    root = tmp_path_factory.mktemp("compat")
    done = {}

    def make(name, model=STORIES, fmt="gptq", target=None, **q):
        if name not in done:
            done[name] = quantize_model(model, root / name, qcfg=QuantConfig(**{"group_size": 32, **q}), dataset=calib,
                                        nsamples=2, seqlen=64, fmt=fmt, target=target, log=lambda m: None)
        return done[name]
    return make


def verdicts(path):
    v = report(path)
    return {x.loader: x for x in v}, v


def test_symmetric_4bit_loads_everywhere(write):
    _, v = verdicts(write("sym4"))
    assert all(x.ok for x in v), v


def test_rule_bits_current_vllm_serves_4_and_8_only(write):
    _, v = verdicts(write("sym3", bits=3))
    assert not v[CURRENT].ok and "4- and 8-bit" in v[CURRENT].reasons[0]
    assert v[OLDER].ok and v[0].ok and v[1].ok
    _, v = verdicts(write("sym8", bits=8, group_size=-1))  # at 8 bits the MLP (172 wide) is packed too
    assert v[CURRENT].ok


def test_rule_asymmetric_v1_vs_v2(write):
    _, v1 = verdicts(write("asym-v1", sym=False))
    assert v1[0].ok  # transformers
    assert not v1[1].ok and "gptq_v2" in v1[1].reasons[0]  # GPTQModel refuses other tools' asymmetric v1
    assert not v1[CURRENT].ok and any("symmetric" in r for r in v1[CURRENT].reasons)
    assert not v1[OLDER].ok and "gptq_v2" in v1[OLDER].reasons[0]
    _, v2 = verdicts(write("asym-v2", sym=False, fmt="gptq_v2"))
    assert v2[0].ok and v2[1].ok and v2[OLDER].ok
    assert not v2[CURRENT].ok and any("only v1" in r for r in v2[CURRENT].reasons)


def test_rule_gptqmodel_takes_its_own_asymmetric_v1(write, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(write("asym-v1", sym=False), q)
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((q / name).read_text())
        meta = cfg.get("quantization_config", cfg)["meta"]
        meta["quantizer"] = ["gptqmodel:7.7.0"]
        (q / name).write_text(json.dumps(cfg))
    _, v = verdicts(q)
    assert v[1].ok


def test_rule_desc_act_written_only_for_a_nontrivial_g_idx(write):
    def desc_act(path):
        return json.loads((path / "quantize_config.json").read_text())["desc_act"]
    act = write("act", act_order=True)
    assert desc_act(act) is True
    _, v = verdicts(act)
    assert not v[CURRENT].ok and "desc_act" in v[CURRENT].reasons[0] and v[OLDER].ok
    static = write("act-static", act_order=True, static_groups=True)
    assert desc_act(static) is False and verdicts(static)[1][CURRENT].ok
    one_group = write("act-rowwise", act_order=True, group_size=-1)
    assert desc_act(one_group) is False and verdicts(one_group)[1][CURRENT].ok
    # the checkpoints still compute the same thing: desc_act only tells loaders whether g_idx matters
    tokens = torch.tensor([[1, 300, 40, 7, 99]])
    with torch.inference_mode():
        assert torch.isfinite(load_model(static, dtype="fp32")(tokens)).all()


def test_rule_desc_act_false_with_an_act_order_g_idx(write, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(write("act", act_order=True), q)
    for name in ("quantize_config.json", "config.json"):
        cfg = json.loads((q / name).read_text())
        cfg.get("quantization_config", cfg)["desc_act"] = False
        (q / name).write_text(json.dumps(cfg))
    _, v = verdicts(q)
    assert not v[CURRENT].ok and any("would ignore" in r for r in v[CURRENT].reasons)
    assert not v[OLDER].ok and v[0].ok


def test_rule_group_size_must_divide_the_input_widths(write, calib, tmp_path):
    _, v = verdicts(write("g48", group_size=48))  # q/k/v/o have 64 inputs
    assert not v[CURRENT].ok and "group_size 48" in v[CURRENT].reasons[0] and not v[OLDER].ok and v[0].ok
    with pytest.raises(ValueError, match="--groupsize 48 does not divide the layers' input widths \\[64\\]"):
        quantize_model(STORIES, tmp_path / "x", qcfg=QuantConfig(group_size=48), dataset=calib, nsamples=2,
                       seqlen=64, target="vllm", log=lambda m: None)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def odd_kv(tmp_path_factory):
    """A Llama whose k/v projections (6 outputs) cannot be packed while q (96 outputs) can."""
    pytest.importorskip("transformers")
    import transformers as tf
    out = tmp_path_factory.mktemp("oddkv") / "m"
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=1, head_dim=6, vocab_size=512, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(STORIES / name, out / name)
    return out


def test_rule_fused_layers_all_quantized_or_all_kept(write, odd_kv):
    _, v = verdicts(write("oddkv", model=odd_kv))
    assert not v[CURRENT].ok and "fuses" in v[CURRENT].reasons[0] and "k_proj" in v[CURRENT].reasons[0]
    assert not v[OLDER].ok and v[0].ok and v[1].ok
    fused = write("oddkv-vllm", model=odd_kv, target="vllm")
    assert all(x.ok for x in verdicts(fused)[1])
    log = (fused / "quant_log.tsv").read_text()
    assert "model.layers.0.self_attn.q_proj\tkept" in log  # kept with its fused partners k/v
    tokens = torch.tensor([[1, 300, 40, 7]])
    with torch.inference_mode():
        assert torch.isfinite(load_model(fused, dtype="fp32")(tokens)).all()


@pytest.mark.parametrize("settings,fmt,needle", [
    (dict(bits=3), "gptq", "--bits 3"), (dict(sym=False), "gptq", "--no-sym"), (dict(), "gptq_v2", "--format gptq_v2"),
    (dict(act_order=True), "gptq", "--static-groups"),
])
def test_target_vllm_refuses_what_vllm_would_not_serve(calib, tmp_path, settings, fmt, needle):
    with pytest.raises(ValueError, match="--target vllm") as e:
        quantize_model(STORIES, tmp_path / "x", qcfg=QuantConfig(group_size=32, **settings), dataset=calib,
                       nsamples=2, seqlen=64, fmt=fmt, target="vllm", log=lambda m: None)
    assert needle in str(e.value)
    assert not list(tmp_path.iterdir())


def test_config_json_is_read_first_and_must_agree(write, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(write("sym4"), q)
    (q / "quantize_config.json").unlink()  # config.json's quantization_config alone is enough
    assert load_model(q).cfg.model_type == "llama"
    cfg = json.loads((q / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (q / "config.json").write_text(json.dumps(cfg))
    (q / "quantize_config.json").write_text(json.dumps(qc))  # and quantize_config.json alone too
    load_model(q)
    (q / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(qc, group_size=64))))
    with pytest.raises(ValueError, match="disagree on group_size \\(64 vs 32\\)"):
        load_model(q)


def test_report_in_quantize_log_and_inspect_cli(write, calib, tmp_path, capsys):
    from minigptq.cli import run
    from minigptq import inspect
    lines = []
    quantize_model(STORIES, tmp_path / "q", qcfg=QuantConfig(bits=3, group_size=32), dataset=calib, nsamples=2,
                   seqlen=64, log=lines.append)
    assert "vLLM current (>= 0.22)  no: only 4- and 8-bit" in lines[-1]
    run(inspect.main, inspect.parser(), [str(tmp_path / "q"), "--json"])  # returns: exit code 0
    out = json.loads(capsys.readouterr().out)
    assert out["bits"] == 3 and [x["ok"] for x in out["loaders"]] == [True, True, False, True]
    with pytest.raises(SystemExit) as e:
        run(inspect.main, inspect.parser(), [str(STORIES)])
    assert e.value.code == 2 and "not a GPTQ checkpoint" in capsys.readouterr().err
