"""Hostile inputs that would hang a command or take all the memory (issue #28, items 7, 8, 9 and invalid UTF-8):
side files that are FIFOs, devices or huge; KV caches larger than the memory; chat templates that loop for ever, build
gigabytes or fail in Python's own ways; text that is not UTF-8.

Every case asserts the exit code, exactly one `error:` line and no traceback, the key words of the message, and that
nothing in the case's folder changed. The commands run in-process (tests/test_hostile.py's run_cli) under an alarm,
so that a hang fails the test instead of stopping the suite.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import STORIES
from test_hostile import assert_one_error, calib_file, changed, edit_config, model_copy, quant_argv, run_cli

import minigptq
from minigptq import kv_cache


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no handler of the CLI turns it into an `error:` line."""


@pytest.fixture(autouse=True)
def alarm():
    """Each test gets 60 s; a command that hangs (a FIFO read, an endless template) fails instead of blocking."""
    def ring(signum, frame):
        raise Hang("the command hung")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root -> what it is. test_hostile.snapshot reads every file, which would block on a FIFO and
    take long on the huge sparse files here: those are recorded by kind, size and time instead."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o7777)
            elif not stat.S_ISREG(st.st_mode) or st.st_size > 2**24:
                out[rel] = ("special or big", st.st_mode, st.st_size, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def with_template(m: Path, template: str) -> None:
    edit_config(m, lambda c: {**c, "chat_template": template}, "tokenizer_config.json")


CHATML = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


def argv_for(command: str, root: Path, m: Path, extra=()) -> list[str]:
    if command == "quantize":
        return quant_argv(root, m, root / "q", *extra)
    if command == "chat":
        return ["--model", str(m), "--max-new-tokens", "3", *extra]
    return ["--model", str(m), "--prompt", "Once upon a time", "--max-new-tokens", "3", *extra]


def run_case(tmp_path, monkeypatch, command, setup, extra=(), stdin=b"hi\n", stdin_errors="strict"):
    """Set up a model copy, run the command in tmp_path -> (exit code, stderr); asserts nothing changed."""
    m = model_copy(tmp_path)
    calib_file(tmp_path)
    setup(tmp_path, m)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors=stdin_errors))
    before = snapshot(tmp_path)
    code, err = run_cli(command, argv_for(command, tmp_path, m, [a.replace("{m}", str(m)) for a in extra]))
    assert not changed(before, snapshot(tmp_path)), sorted(changed(before, snapshot(tmp_path)))
    return code, err


# -- item 7: side files that are not regular files, or too big ----------------------------------------------------

def fifo(name):
    def setup(root, m):
        (m / name).unlink(missing_ok=True)
        os.mkfifo(m / name)
    return setup


def link_to(name, target):
    def setup(root, m):
        (m / name).unlink(missing_ok=True)
        (m / name).symlink_to(target)
    return setup


def sparse(name, nbytes):
    """A file of nbytes that takes no disk space (a hole): what matters is its size."""
    def setup(root, m):
        with open(m / name, "wb") as f:
            f.truncate(nbytes)
    return setup


def nested_json(name, depth=100_000):
    def setup(root, m):
        (m / name).write_text("[" * depth + "]" * depth)
    return setup


def long_int(name, key):
    """key's value an integer of 5000 digits: json.loads refuses more than 4300 (a ValueError of its own)."""
    def setup(root, m):
        edit_config(m, lambda c: {**c, key: 0}, name)
        (m / name).write_text((m / name).read_text().replace(f'"{key}": 0', f'"{key}": {"9" * 5000}'))
    return setup


def template_file(text: bytes):
    def setup(root, m):
        (m / "chat_template.jinja").write_bytes(text)
    return setup


SIDE_FILES = [  # (id, command, setup, extra, needles)
    ("fifo-tokenizer-config-generate", "generate", fifo("tokenizer_config.json"), (),
     ["tokenizer_config.json", "FIFO"]),
    ("fifo-tokenizer-config-quantize", "quantize", fifo("tokenizer_config.json"), (),
     ["tokenizer_config.json", "FIFO"]),
    ("fifo-config-generate", "generate", fifo("config.json"), (), ["config.json", "FIFO"]),
    ("fifo-config-quantize", "quantize", fifo("config.json"), (), ["config.json", "FIFO"]),
    ("fifo-generation-config", "generate", fifo("generation_config.json"), (), ["generation_config.json", "FIFO"]),
    ("fifo-tokenizer-model", "generate", fifo("tokenizer.model"), (), ["tokenizer.model", "FIFO"]),
    ("fifo-tokenizer-json", "generate", fifo("tokenizer.json"), (), ["tokenizer.json", "FIFO"]),
    ("fifo-chat-template", "chat", fifo("chat_template.jinja"), (), ["chat_template.jinja", "FIFO"]),
    ("fifo-index", "generate", fifo("model.safetensors.index.json"), (), ["index.json", "FIFO"]),
    ("fifo-quantize-config", "generate", fifo("quantize_config.json"), (), ["quantize_config.json", "FIFO"]),
    ("zero-tokenizer-config", "generate", link_to("tokenizer_config.json", "/dev/zero"), (),
     ["tokenizer_config.json", "character device"]),
    ("zero-generation-config", "quantize", link_to("generation_config.json", "/dev/zero"), (),
     ["generation_config.json", "character device"]),
    ("zero-config", "generate", link_to("config.json", "/dev/zero"), (), ["config.json", "character device"]),
    ("zero-tokenizer-model", "quantize", link_to("tokenizer.model", "/dev/zero"), (),
     ["tokenizer.model", "character device"]),
    ("zero-tokenizer-json", "generate", link_to("tokenizer.json", "/dev/zero"), (),
     ["tokenizer.json", "character device"]),
    ("zero-chat-template", "chat", link_to("chat_template.jinja", "/dev/zero"), (),
     ["chat_template.jinja", "character device"]),
    ("zero-quantize-config", "generate", link_to("quantize_config.json", "/dev/zero"), (),
     ["quantize_config.json", "character device"]),
    ("huge-tokenizer-config", "generate", sparse("tokenizer_config.json", 65 * 2**20), (),
     ["tokenizer_config.json", "64 MiB"]),
    ("huge-config", "quantize", sparse("config.json", 2**36), (), ["config.json", "64 MiB"]),
    ("huge-tokenizer-model", "generate", sparse("tokenizer.model", 513 * 2**20), (), ["tokenizer.model", "512 MiB"]),
    ("huge-chat-template", "chat", sparse("chat_template.jinja", 65 * 2**20), (), ["chat_template.jinja", "64 MiB"]),
    # past the list: JSON nested past Python's recursion limit, an integer past int()'s 4300 digits, a template
    # file that is not UTF-8, a tokenizer.json that is not UTF-8
    ("nested-config", "generate", nested_json("config.json"), (), ["config.json", "not valid JSON"]),
    ("nested-tokenizer-config", "quantize", nested_json("tokenizer_config.json"), (),
     ["tokenizer_config.json", "not valid JSON"]),
    ("long-int-config", "generate", long_int("config.json", "vocab_size"), (), ["config.json", "not valid JSON"]),
    ("latin1-chat-template", "chat", template_file(b"\xe9t\xe9 {{ messages }}"), (),
     ["chat_template.jinja", "UTF-8"]),
    ("latin1-tokenizer-json", "generate", lambda root, m: (m / "tokenizer.json").write_bytes(b'{"a": "\xe9"}'), (),
     ["tokenizer.json"]),
]


@pytest.mark.parametrize("command,setup,extra,needles",
                         [pytest.param(c, s, e, n, id=i) for i, c, s, e, n in SIDE_FILES])
def test_side_file_is_read_bounded(tmp_path, monkeypatch, command, setup, extra, needles):
    code, err = run_case(tmp_path, monkeypatch, command, setup, extra)
    assert_one_error(code, err, 2, needles)


def test_fifo_in_an_out_folder_is_not_read(tmp_path, monkeypatch):
    """--overwrite reads the old checkpoint's quantize_config.json to see whether minigptq wrote it: a FIFO there
    is refused (not ours), not waited on."""
    def setup(root, m):
        (root / "q").mkdir()
        os.mkfifo(root / "q" / "quantize_config.json")
    code, err = run_case(tmp_path, monkeypatch, "quantize", setup, ["--overwrite"])
    assert_one_error(code, err, 2, ["not a checkpoint minigptq wrote"])


def test_read_file_refuses_a_file_swapped_for_a_fifo(tmp_path, monkeypatch):
    """A file replaced by a FIFO between the stat and the open (a race with the user) is refused, not waited on."""
    from minigptq import config
    p = tmp_path / "x.json"
    p.write_text("{}")
    real_open = os.open

    def swap_then_open(path, flags, *a):
        if Path(path) == p:
            p.unlink()
            os.mkfifo(p)
            assert flags & os.O_NONBLOCK  # else this open would block for ever
        return real_open(path, flags, *a)
    monkeypatch.setattr(config.os, "open", swap_then_open)
    with pytest.raises(minigptq.Error, match="FIFO"):
        config.read_json(p)


# -- item 8: the KV cache, sized to the run and checked against the memory --------------------------------------------

def long_context(root, m):
    """stories260k told its context is 2^20 tokens (RoPE: the weights do not depend on it)."""
    edit_config(m, lambda c: {**c, "max_position_embeddings": 2**20})


def test_generate_refuses_a_kv_cache_larger_than_the_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 32 * 2**20)  # the fp16 cache needs 61 MiB
    code, err = run_case(tmp_path, monkeypatch, "generate", long_context, ["--max-new-tokens", "100000"])
    assert_one_error(code, err, 2, ["KV cache for 100005 tokens", "32", "--max-new-tokens"])


def test_generate_sizes_its_cache_to_the_run(tmp_path, monkeypatch):
    """--max-new-tokens 10**9 on a 2^20-token model: the cache is prompt + max_new_tokens capped by the context, and
    with little memory that is refused before anything is allocated (it was 1.3 GB, unchecked)."""
    from minigptq.transformer import KVCache
    real_memory, real_init = kv_cache.available_memory, KVCache.__init__
    sizes = []

    def init(self, cfg, batch, max_len, *a, **k):
        sizes.append(max_len)
        real_init(self, cfg, batch, max_len, *a, **k)
    monkeypatch.setattr(KVCache, "__init__", init)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 256 * 2**20)
    code, err = run_case(tmp_path, monkeypatch, "generate", long_context, ["--max-new-tokens", str(10**9)])
    assert_one_error(code, err, 2, ["KV cache for 1048576 tokens", "--max-new-tokens"])
    monkeypatch.setattr(kv_cache, "available_memory", real_memory)
    code, err = run_case(tmp_path / "b", monkeypatch, "generate", long_context, ["--max-new-tokens", "5"])
    assert_one_error(code, err, 0)
    assert sizes == [2**20, 5 + 5], sizes  # the prompt (BOS + 4 tokens) and 5 new ones, not the 2^20 of the context


def test_chat_cache_starts_small_and_grows(tmp_path, monkeypatch):
    """chat on a 2^20-token model allocated the whole context (1.3 GB) up front: now 256 slots, grown per turn; with
    too little memory for the whole context a note says so, and the chat itself runs."""
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 8 * 2**20)
    code, err = run_case(tmp_path, monkeypatch, "chat",
                         lambda root, m: (long_context(root, m), with_template(m, CHATML)),
                         stdin=b"hi\nOnce upon a time\n")
    assert_one_error(code, err, 0)
    assert "note: the KV cache for 1048576 tokens" in err and "--context" in err


def test_chat_refuses_to_grow_past_the_memory(tmp_path, monkeypatch):
    """The cache starts at 256 slots (164 KB, fp16); growing it past the memory available ends the chat with one line
    that says how to ask for less."""
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 200_000)
    code, err = run_case(tmp_path, monkeypatch, "chat", lambda root, m: with_template(m, CHATML),
                         ["--max-new-tokens", "400"], stdin=b"hi\n")
    assert_one_error(code, err, 2, ["KV cache for", "--context", "--max-new-tokens"])


def test_chat_longer_than_its_context(tmp_path, monkeypatch):
    """A conversation that outgrows --context ends with one line that says what to do (was: "shorten it")."""
    code, err = run_case(tmp_path, monkeypatch, "chat", lambda root, m: with_template(m, CHATML),
                         ["--context", "40", "--max-new-tokens", "20"], stdin=b"Once upon a time\nAnd then\nThe end\n")
    assert_one_error(code, err, 2, ["the conversation has", "context of 40", "/reset", "--context"])


def test_a_grown_chat_cache_gives_the_same_tokens(tmp_path, monkeypatch):
    """Greedy replies with the cache grown in steps (from 16 slots, doubled across turns) equal those with one cache
    of the whole context allocated up front, turn by turn (the CPU decode fast path reads the cache it is given)."""
    from minigptq.chat import ChatSession
    m = model_copy(tmp_path)
    with_template(m, CHATML)
    model, tok = minigptq.load_model(m, dtype="fp32"), minigptq.load_tokenizer(m)
    monkeypatch.setattr(ChatSession, "FIRST", 16)
    grown, big = ChatSession(model, tok, context=512), ChatSession(model, tok, context=512)
    big.cache.grow(512)
    sizes = []
    for text in ("Once upon a time", "Lily and Tom went to the park", "The end"):
        assert grown.reply(text, max_new_tokens=24) == big.reply(text, max_new_tokens=24)
        assert grown.cached == big.cached
        sizes.append(grown.cache.max_len)
    assert 16 < sizes[0] < sizes[1] < sizes[2] <= 512, sizes  # grown at every turn


def test_kv_cache_grow_keeps_what_was_written():
    from minigptq.transformer import KVCache
    cfg = minigptq.load_model(STORIES, dtype="fp32").cfg
    c = KVCache(cfg, 2, 4, torch.float32, "cpu")
    c.k.normal_(), c.v.normal_()
    k, v = c.k.clone(), c.v.clone()
    c.grow(9)
    assert c.max_len == 9 and c.k.shape[3] == 9
    assert torch.equal(c.k[:, :, :, :4], k) and torch.equal(c.v[:, :, :, :4], v)
    assert not c.k[:, :, :, 4:].any() and not c.v[:, :, :, 4:].any()


# -- item 9: chat templates that loop for ever, build gigabytes, or fail in Python's own ways ------------------------

TEMPLATES = [  # (id, template, needles)
    ("nested-loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     ["1000000 steps"]),
    ("loops-over-a-string", "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     ["1000000 steps"]),
    ("string-times-huge", "{{ 'x' * 10**9 }}", ["operator *", "1000000000 characters"]),
    ("string-doubling-concat", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", ["operator ~"]),
    ("string-doubling-plus", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", ["operator +"]),
    ("integer-power", "{{ 10 ** (10 ** 10) }}", ["operator **", "bits"]),
    ("integer-squaring", "{% set ns = namespace(n=10) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
     "{% endfor %}", ["operator *", "bits"]),
    ("list-times-huge", "{{ [0] * 10**8 }}", ["operator *", "items"]),
    ("buffered-literal", "{% set x %}{% for i in range(100000) %}{% for j in range(9) %}" + "y" * 2000 +
     "{% endfor %}{% endfor %}{% endset %}", ["characters in all"]),
    ("replace-amplifies", "{{ ('x' * 100000).replace('x', 'y' * 100000) }}", ["str.replace()"]),
    ("replace-filter", "{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", ["filter replace"]),
    ("format-width", "{{ '%999999999s' % 'x' }}", ["operator %"]),
    ("str-format-width", "{{ '{:>999999999}'.format('x') }}", ["str.format()"]),
    ("center-huge", "{{ 'x'|center(10**9) }}", ["1000000000"]),
    ("join-of-copies", "{% set b = 'x' * 10000000 %}{{ ([b] * 1000)|join }}", ["characters in all"]),
    ("indent-string", "{{ ('a\n' * 100000)|indent('x' * 1000) }}", ["filter indent"]),
    ("print-a-huge-list", "{% set x = [1] * 100000 %}{{ [x] * 100000 }}", ["characters"]),
    ("tojson-indent", "{{ messages|tojson(indent=10**6) }}", ["indent"]),
    ("lipsum", "{{ lipsum(10**6) }}", ["lipsum"]),
    ("divide-by-zero", "{{ 1 / 0 }}", ["ZeroDivisionError"]),
    ("type-error", "{{ 1 + 'a' }}", ["TypeError"]),
    ("endless-recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ["RecursionError"]),
    ("recursive-loop", "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", ["RecursionError"]),
    ("include", "{% include 'other.jinja' %}", ["{% include %}", "not allowed"]),
    ("import", "{% import 'macros.jinja' as m %}", ["{% import %}", "not allowed"]),
    ("from-import", "{% from 'macros.jinja' import f %}", ["{% from ... import %}", "not allowed"]),
    ("extends", "{% extends 'base.jinja' %}", ["{% extends %}", "not allowed"]),
    ("loops-nested-past-python", "{% for a in [1] %}" * 30 + "x" + "{% endfor %}" * 30, ["SyntaxError"]),
    ("too-long", "x" * (2**20 + 1), ["1048577 characters"]),
    ("undefined-call", "{{ nothing() }}", ["undefined"]),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("template,needles", [pytest.param(t, n, id=i) for i, t, n in TEMPLATES])
def test_hostile_chat_template(tmp_path, monkeypatch, command, template, needles):
    if command == "chat" and template.startswith("{% for a in range(100000)"):
        pytest.skip("the same template through generate is enough: this one takes a second")
    extra = ["--chat"] if command == "generate" else []
    code, err = run_case(tmp_path, monkeypatch, command, lambda root, m: with_template(m, template), extra)
    assert_one_error(code, err, 2, ["the chat template in", "tokenizer_config.json failed", *needles])


def test_real_templates_render_as_transformers_does():
    """The bounds change nothing for real templates: loops with loop.*, namespaces, macros, tojson, filters, the
    {% generation %} tag and raise_exception render exactly as transformers renders them."""
    from transformers.utils.chat_template_utils import render_jinja_template
    from minigptq.chat_template import render
    templates = [
        CHATML,
        # Llama-3-style: a system message split off, a namespace, trim, loop.first / loop.last
        "{% set ns = namespace(sys='') %}{% if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]"
        "['content']|trim %}{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
        "{% endif %}{{ bos_token }}{% if ns.sys %}<|start_header_id|>system<|end_header_id|>\n\n{{ ns.sys }}"
        "<|eot_id|>{% endif %}{% for m in loop_messages %}{% if loop.first %}{% endif %}<|start_header_id|>"
        "{{ m['role'] }}<|end_header_id|>\n\n{{ m['content']|trim }}<|eot_id|>{% endfor %}{% if "
        "add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        # Mistral-style: alternation checked with raise_exception, loop.index0 over a filtered loop
        "{{ bos_token }}{% for m in messages if m['role'] != 'system' %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
        "m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
        # tools and JSON, a macro, string methods, the generation tag, a recursive loop
        "{% macro show(x) %}{{ x|tojson(indent=2) }}{% endmacro %}{% for m in messages %}{{ m['role']|upper }}:"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'].strip() }}{% endgeneration %}{% else %}"
        "{{ m['content'].replace('2', 'two')|center(30) }}{% endif %}{{ show({'n': loop.index, 'k': [1, 2]}) }}"
        "{% endfor %}{% for x in [[1, [2]], 3] recursive %}{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}"
        "{% endif %}{% endfor %}{{ '%s-%05d'|format('a', 7) }}{{ '{}|{:>4}'.format('b', 8) }}{{ ['p', 'q']|join('/') }}",
    ]
    conv = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "Thanks"}]
    special = dict(bos_token="<s>", eos_token="</s>")
    for t in templates:
        for c in (conv, conv[1:]):
            ref, _ = render_jinja_template(conversations=[c], chat_template=t, add_generation_prompt=True, **special)
            assert render(t, c, True, **special) == ref[0], t[:60]
    with pytest.raises(minigptq.Error, match="roles must alternate"):
        render(templates[2], conv[1:2] * 2, True, **special)


def test_slow_template_stops_at_the_time_bound(monkeypatch):
    """Besides the count of steps, wall time is bounded: a step that found the deadline passed stops the rendering."""
    from minigptq import template_sandbox as template
    from minigptq.chat_template import render
    monkeypatch.setattr(template, "MAX_SECONDS", 0.2)
    with pytest.raises(minigptq.Error, match="over 0.2 s"):
        render("{% set s = 'x' * 1000000 %}{% for a in range(100000) %}{{ s.count('y') }}{% endfor %}",
               [{"role": "user", "content": "x"}])


# -- invalid UTF-8: --prompt (argv) and chat's stdin ------------------------------------------------------------------

def test_prompt_with_invalid_utf8(tmp_path, monkeypatch):
    bad = b"Once \xff upon".decode("utf-8", "surrogateescape")  # what Python makes of such a byte in argv
    code, err = run_case(tmp_path, monkeypatch, "generate", lambda root, m: None, ["--prompt", bad])
    assert_one_error(code, err, 2, ["not valid UTF-8", "0xff", "character 5"])


def test_system_with_invalid_utf8(tmp_path, monkeypatch):
    bad = b"Be \xc3 brief".decode("utf-8", "surrogateescape")
    code, err = run_case(tmp_path, monkeypatch, "generate", lambda root, m: with_template(m, CHATML),
                         ["--system", bad])
    assert_one_error(code, err, 2, ["not valid UTF-8", "0xc3"])


@pytest.mark.parametrize("errors,needles", [("strict", ["stdin is not valid utf-8", "0xff"]),
                                            ("surrogateescape", ["not valid UTF-8", "0xff"])])
def test_chat_stdin_with_invalid_utf8(tmp_path, monkeypatch, errors, needles):
    """A UTF-8 locale decodes stdin strictly (a UnicodeDecodeError), the C locale with surrogateescape (lone
    surrogates): either way one line, exit 2."""
    code, err = run_case(tmp_path, monkeypatch, "chat", lambda root, m: with_template(m, CHATML), [],
                         stdin=b"hi\nOnce \xff upon\n", stdin_errors=errors)
    assert_one_error(code, err, 2, needles)


def test_the_bounds_matrix_is_large():
    n = len(SIDE_FILES) + 2 * len(TEMPLATES)
    assert n >= 80, n
