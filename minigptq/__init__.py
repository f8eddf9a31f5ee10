"""minigptq: a compact, readable GPTQ implementation (Frantar et al. 2022, arXiv:2210.17323).

Public API (imported lazily so that `python -m minigptq.<command>` starts fast):
    load_model(path, dtype=None, device="cpu") -> Transformer   (full precision or GPTQ checkpoints)
    load_tokenizer(path) -> Tokenizer
    minigptq.generate.generate(model, prompts, ...) -> (new tokens per prompt, GenerationStats)
(`minigptq.generate` is also the generation command's module, so import the function from there.)
"""
import logging

__all__ = ["Error", "load_model", "load_tokenizer"]
__version__ = "0.1.0"

# Library code reports through this logger only; unconfigured, it is silent (the CLIs configure it, see cli.py).
logging.getLogger("minigptq").addHandler(logging.NullHandler())


class Error(ValueError):
    """A user mistake (bad input, setting or file): the message says what was wrong and what would be valid. The
    command-line tools turn it into one line `error: ...` and exit code 2. A ValueError, so existing handlers work."""


def __getattr__(name):
    if name == "load_model":
        from .loader import load_model
        return load_model
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    raise AttributeError(f"module 'minigptq' has no attribute {name!r}")
