"""minigptq: a compact, readable GPTQ implementation (Frantar et al. 2022, arXiv:2210.17323).

Public API (imported lazily so that `python -m minigptq.<command>` starts fast):
    load_model(path, dtype=None, device="cpu") -> Transformer   (full precision or GPTQ checkpoints)
    load_tokenizer(path) -> Tokenizer
    minigptq.generate.generate(model, prompts, ...) -> (new tokens per prompt, GenerationStats)
(`minigptq.generate` is also the generation command's module, so import the function from there.)
"""
__all__ = ["load_model", "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_model":
        from .loader import load_model
        return load_model
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    raise AttributeError(f"module 'minigptq' has no attribute {name!r}")
