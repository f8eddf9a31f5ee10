"""The user's workflow around the core: chat templates (against transformers), stop strings, chat sessions that keep
their KV cache, calibration from any source, a silent library and quiet CLIs, clean API errors, JSON output,
evaluation presets and hub ids from the local cache."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minigptq
from conftest import ROOT, SHARED, STORIES, WIKI_VALID
from minigptq import load_model, load_tokenizer
from minigptq.data import calibration_tokens, calibration_windows, preset_text, tokenize_file
from minigptq.generate import StopStrings, TextStream, generate

SMOL = ROOT / "models" / "SmolLM2-135M-Instruct"
needs_smol = pytest.mark.skipif(not (SMOL / "config.json").exists(), reason="models/SmolLM2-135M-Instruct not "
                                "converted (tools/convert_smollm2.py)")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2 + 2?"}],
]
LLAMA2_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
                   "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
                   "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
                   "(sys if loop.first else '') + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + "
                   "' ' + eos_token }}{% endif %}{% endfor %}")


def _hf_ids(ref, conv, agp):
    ids = ref.apply_chat_template(conv, add_generation_prompt=agp, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def stories_with_template(tmp_path) -> Path:
    m = tmp_path / "stories-chat"
    shutil.copytree(STORIES, m)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    (m / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=LLAMA2_TEMPLATE)))
    return m


@needs_smol
def test_chat_template_matches_transformers_smollm2():
    transformers = pytest.importorskip("transformers")
    ours, ref = load_tokenizer(SMOL), transformers.AutoTokenizer.from_pretrained(str(SMOL))
    for conv in CONVERSATIONS:
        for agp in (True, False):
            assert ours.apply_chat_template(conv, agp, tokenize=False) == ref.apply_chat_template(
                conv, add_generation_prompt=agp, tokenize=False)
            assert ours.apply_chat_template(conv, agp) == _hf_ids(ref, conv, agp), (conv, agp)


def test_chat_template_matches_transformers_stories260k(tmp_path):
    """stories260k has no template of its own: with Llama-2's (BOS inside the template) the text equals transformers'
    renderer, and the sentencepiece tokens read the special tokens in it as themselves."""
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    ours = load_tokenizer(stories_with_template(tmp_path))
    for conv in CONVERSATIONS:
        text = ours.apply_chat_template(conv, tokenize=False)
        ref, _ = render_jinja_template(conversations=[conv], chat_template=LLAMA2_TEMPLATE, add_generation_prompt=True,
                                       bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        assert text == ref[0]
        import re
        special = {"<s>": ours.bos_id, "</s>": ours.eos_ids[0]}
        want = [i for piece in re.split(r"(</?s>)", text) if piece
                for i in ([special[piece]] if piece in special else ours.tok.encode(piece))]
        assert ours.apply_chat_template(conv) == want and want[0] == ours.bos_id


def test_chat_template_errors(tmp_path):
    with pytest.raises(minigptq.Error, match="no chat template"):
        load_tokenizer(STORIES).apply_chat_template(CONVERSATIONS[0])
    tok = load_tokenizer(stories_with_template(tmp_path))
    with pytest.raises(minigptq.Error, match="messages must be"):
        tok.apply_chat_template([{"content": "no role"}])
    m = stories_with_template(tmp_path / "b")
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    (m / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template="{{ raise_exception('nope') }}")))
    with pytest.raises(minigptq.Error, match="nope"):
        load_tokenizer(m).apply_chat_template(CONVERSATIONS[0])


def test_stop_strings_cut_exactly_also_streaming():
    model, tok = load_model(STORIES, dtype="fp32"), load_tokenizer(STORIES)
    ids = tok.encode("Once upon a time")
    full, _ = generate(model, [ids], max_new_tokens=40)
    text = tok.decode(full[0])
    stop = text[len(text) // 2: len(text) // 2 + 5]  # a string in the middle of the greedy continuation
    assert text.count(stop) == 1 or text.index(stop) >= len(text) // 2 - 5
    stops = StopStrings(tok, [stop])
    buf = io.StringIO()
    new, stats = generate(model, [ids], max_new_tokens=40, stop=stops, on_step=TextStream(tok, ids, (), buf, [stop]))
    assert stats.finish == ["stop"] and len(new[0]) < len(full[0]) and new[0] == full[0][:len(new[0])]
    assert stops.cut(tok.decode(new[0])) == text[:text.index(stop)]
    assert buf.getvalue() == text[:text.index(stop)]  # nothing of the stop string leaked into the stream
    with pytest.raises(minigptq.Error, match="non-empty strings"):
        StopStrings(tok, [""])


@needs_smol
def test_chat_session_reuses_its_cache_and_equals_a_fresh_run():
    from minigptq.chat import ChatSession
    model, tok = load_model(SMOL, dtype="fp32"), load_tokenizer(SMOL)
    s = ChatSession(model, tok, context=512)
    first = s.reply("What is the capital of France?", max_new_tokens=12)
    cached = len(s.cached)
    second = s.reply("And of Germany?", max_new_tokens=12)
    assert "Paris" in first
    assert s.last_stats.prefill_s >= 0 and cached > 0
    # the same turn computed from scratch, on the whole rendered conversation
    convo = s.messages[:-1]
    ids = tok.apply_chat_template(convo)
    eos = tuple(dict.fromkeys(tok.eos_ids + model.cfg.eos_token_ids))
    fresh, _ = generate(model, [ids], max_new_tokens=12, eos_ids=eos)
    assert tok.decode(fresh[0]) == second


@needs_smol
def test_generate_chat_answers_paris_on_the_4bit_checkpoint(tmp_path):
    q = ROOT / "models" / "bench_quality" / "minigptq-gptq-4bit-g128"
    if not (q / "config.json").exists():
        from minigptq.quantize import quantize_model
        from minigptq.quantizer import QuantConfig
        q = quantize_model(SMOL, tmp_path / "q4", qcfg=QuantConfig(bits=4, group_size=128), dataset=WIKI_VALID,
                           nsamples=8, seqlen=256)
    r = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", str(q), "--chat", "--prompt",
                        "What is the capital of France?", "--max-new-tokens", "24", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "Paris" in out["completion"] and out["finish_reason"] in ("eos", "length") and out["prompt_tokens"] > 20


def test_calibration_from_every_source_gives_the_same_windows(tmp_path):
    tok = load_tokenizer(STORIES)
    texts = [line for line in WIKI_VALID.read_text().split("\n") if line.strip()][:300]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    from_file, what = calibration_tokens(jsonl, tok)
    assert str(jsonl) in what
    assert torch.equal(calibration_tokens(texts, tok)[0], from_file)
    assert torch.equal(calibration_tokens(from_file, tok)[0], from_file)
    chunks = [from_file[i:i + 100].tolist() for i in range(0, from_file.numel(), 100)]
    assert torch.equal(calibration_tokens(chunks, tok)[0], from_file)
    w = calibration_windows(from_file, 4, 64, seed=0)
    assert torch.equal(calibration_tokens(w, tok)[0], w)  # 2-D: the windows themselves
    assert torch.equal(calibration_tokens(WIKI_VALID, tok)[0], tokenize_file(WIKI_VALID, tok))
    for bad, needle in ((42, "calibration data must be"), ([1, "a"], "calibration data must be"),
                        (torch.zeros(2, 3), "integer tensor"), (torch.tensor([-1, 2]), ">= 0")):
        with pytest.raises(minigptq.Error, match=needle):
            calibration_tokens(bad, tok)


def test_calibration_from_chat_jsonl(tmp_path):
    m = stories_with_template(tmp_path)
    tok = load_tokenizer(m)
    rows = [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0] + [{"role": "assistant", "content": "x"}]}]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens, what = calibration_tokens(f, tok)
    want = [i for r in rows for i in tok.apply_chat_template(r["messages"], add_generation_prompt=False)]
    assert tokens.tolist() == want and "2 conversations" in what and "chat template" in what


def test_quantize_model_with_token_windows_and_a_silent_api(tmp_path):
    """quantize_model from the API prints nothing with the logger unconfigured; the windows given are used."""
    code = (f"import torch, sys\nfrom minigptq.quantize import quantize_model\nfrom minigptq.quantizer import QuantConfig\n"
            f"w = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))\n"
            f"quantize_model({str(STORIES)!r}, {str(tmp_path / 'q')!r}, qcfg=QuantConfig(bits=4, group_size=32), "
            f"dataset=w)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    q = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert "2x32" in q["meta"]["calibration"]


def test_quantize_quiet_and_per_block_lines(tmp_path):
    base = [sys.executable, "-m", "minigptq.quantize", "--model", str(STORIES), "--bits", "4", "--groupsize", "32",
            "--nsamples", "2", "--seqlen", "32", "--dataset", str(WIKI_VALID)]
    r = subprocess.run(base + ["--out", str(tmp_path / "a"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.count(" done: mean error") == 5 and "calibration: 2 random windows" in r.stderr


def test_api_errors_are_minigptq_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(minigptq.Error, match="no CUDA GPU"):
            load_model(STORIES, device="cuda")
    with pytest.raises(minigptq.Error, match="not a device"):
        load_model(STORIES, device="gpu9")
    m = tmp_path / "m"
    shutil.copytree(STORIES, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(dict(cfg, hidden_size="64")))
    with pytest.raises(minigptq.Error, match="hidden_size"):
        load_model(m)
    assert issubclass(minigptq.Error, ValueError)


def test_generate_json_and_separators():
    r = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", str(STORIES), "--prompt", "Once upon",
                        "--prompt", "The cat", "--max-new-tokens", "5", "--json"], capture_output=True, text=True,
                       cwd=ROOT)
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [x["prompt"] for x in rows] == ["Once upon", "The cat"] and all(x["completion_tokens"] == 5 for x in rows)
    r = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", str(STORIES), "--prompt", "Once upon",
                        "--prompt", "The cat", "--max-new-tokens", "5", "--quiet"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.stdout.startswith("--- [1/2]\nOnce upon") and "--- [2/2]\nThe cat" in r.stdout


def test_eval_presets_follow_the_papers_joining_rules():
    text, path = preset_text("ptb", SHARED / "data")
    lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
    assert text == " ".join(lines) and "\n" not in text
    wiki, _ = preset_text("wikitext2", SHARED / "data")
    assert wiki.count("\n\n") > 1000
    with pytest.raises(minigptq.Error, match="valid: wikitext2, ptb"):
        preset_text("c4", SHARED / "data")
    r = subprocess.run([sys.executable, "-m", "minigptq.eval", "--model", str(STORIES), "--dataset", "ptb",
                        "--data-dir", str(SHARED / "data"), "--max-windows", "2", "--seqlen", "128"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("perplexity ") and "ptb.test.txt" in r.stderr


def test_model_by_hub_id_from_the_local_cache(tmp_path):
    """A cache laid out as huggingface_hub writes it (blobs, snapshots, refs/main); offline, no download."""
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "hub" / "models--minigptq--stories260k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in STORIES.iterdir():
        shutil.copyfile(f, snap / f.name)
    code = ("import torch\nfrom minigptq import load_model\n"
            f"a, b = load_model('minigptq/stories260k'), load_model({str(STORIES)!r})\n"
            "t = torch.tensor([[1, 400, 30]])\n"
            "assert torch.equal(a(t), b(t)); print('same')\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "same" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", "minigptq/not-cached", "--prompt", "x"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and "local Hugging Face cache" in r.stderr, r.stderr
