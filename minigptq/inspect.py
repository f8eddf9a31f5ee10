"""`python -m minigptq.inspect CKPT`: a GPTQ checkpoint's settings, and which loaders will take it (and why not).

The verdicts come from the written config and tensors alone, with the rules in minigptq/compat.py.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import json
from dataclasses import asdict

from .checkpoint_reader import CheckpointReader
from .cli import add_debug_flag, run
from .compat import format_report, layer_facts, quantizer_names, report


def main(args: argparse.Namespace) -> None:
    verdicts = report(args.model)
    ckpt = CheckpointReader(args.model)
    q = ckpt.quant
    layers, _ = layer_facts(ckpt)
    tools, note = quantizer_names(q)
    summary = dict(model_type=ckpt.cfg.model_type, bits=q["bits"], group_size=q["group_size"], sym=q["sym"],
                   desc_act=q["desc_act"], checkpoint_format=q["checkpoint_format"], quantized_layers=len(layers),
                   quantizer=tools or None)
    if note:
        summary["note"] = note
    if args.json:
        print(json.dumps(dict(summary, loaders=[asdict(v) for v in verdicts]), indent=2))
        return
    print(f"{args.model}: {summary['model_type']}, {q['bits']}-bit, group {q['group_size']}, "
          f"{'sym' if q['sym'] else 'asym'}, desc_act {str(q['desc_act']).lower()}, {q['checkpoint_format']}, "
          f"{len(layers)} quantized layers (written by {', '.join(tools or ['an unnamed tool'])}"
          f"{'; ' + note if note else ''})")
    print(format_report(args.model, verdicts))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigptq.inspect",
                                description="Show a GPTQ checkpoint's settings and which loaders (transformers, "
                                            "GPTQModel, vLLM current and older) will take it, and why not.")
    p.add_argument("model", help="GPTQ checkpoint folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
