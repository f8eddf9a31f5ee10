"""minigptq: a compact, readable GPTQ implementation (Frantar et al. 2022, arXiv:2210.17323).

Public API:
    load_model(path, dtype=None, device="cpu") -> Transformer   (full precision or GPTQ checkpoints; minigptq/loader.py)
    load_tokenizer(path) -> Tokenizer                            (minigptq/tokenizer.py)
    minigptq.generate.generate(model, prompts, ...) -> (new tokens per prompt, GenerationStats)
(`minigptq.generate` is also the generation command's module, so import the function from there.)
"""
import importlib
import logging

__all__ = ["Error", "load_model", "load_tokenizer"]
__version__ = "0.1.0"

# Library code reports through this logger only; unconfigured, it is silent (the CLIs configure it, see cli.py).
logging.getLogger("minigptq").addHandler(logging.NullHandler())


class Error(ValueError):
    """A user mistake (bad input, setting or file): the message says what was wrong and what would be valid. The
    command-line tools turn it into one line `error: ...` and exit code 2. A ValueError, so existing handlers work."""


# load_model and load_tokenizer are looked up on first use (PEP 562), not imported here: this file runs before every
# `python -m minigptq.<command>`, whose first act is to catch Ctrl-C while torch loads (cli.quiet_start), and
# `import minigptq` stays ~0.1 s instead of torch's seconds. The table names the only two modules this file uses.
_API = {"load_model": "minigptq.loader", "load_tokenizer": "minigptq.tokenizer"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'minigptq' has no attribute {name!r}")
