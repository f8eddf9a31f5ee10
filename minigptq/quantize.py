"""`python -m minigptq.quantize`: quantize a full-precision checkpoint folder with GPTQ (or RTN) into a GPTQ checkpoint.

See minigptq/driver.py for the layer-by-layer loop and minigptq/gptq.py for the solver.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import Error, __version__, driver
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import PartialRun, tensor_digest
from .cli import add_debug_flag, run
from .compat import format_report, report
from .data import calibration_tokens, calibration_windows, sample_from_model
from .loader import build_empty, check_checkpoint, internal_to_hf, load_model, parse_dtype, resolve_device
from .lora import read_adapter
from .memory import check_memory
from .out_folder import check_out, out_state
from .pack import can_pack
from .quantizer import QuantConfig
from .tokenizer import check_token_ids, load_tokenizer

logger = logging.getLogger("minigptq")


def calibration(model_path, ckpt, dataset, nsamples: int, seqlen: int, seed: int, device, log) -> torch.Tensor:
    """Calibration windows (nsamples, seqlen): from `dataset`, or sampled from the model itself (data-free)."""
    tok = load_tokenizer(model_path)
    if dataset is not None:
        tokens, what = calibration_tokens(dataset, tok)
        check_token_ids(tokens, ckpt.cfg.vocab_size, f"the calibration tokens ({what})")
        if tokens.dim() == 2:
            log(f"calibration: {what}")
            return tokens
        windows = calibration_windows(tokens, nsamples, seqlen, seed, source=what)
        log(f"calibration: {nsamples} random windows of {seqlen} tokens from {what} (seed {seed})")
        return windows
    log(f"calibration: no --dataset given, so using data-free calibration: sampling {nsamples} sequences of "
        f"{seqlen} tokens from the model itself (seed {seed}); this loads the whole model once")
    model = load_model(model_path, dtype="fp32", device=device)
    return sample_from_model(model, nsamples, seqlen, seed, tok.bos_id)


def quant_config_json(qcfg: QuantConfig, method: str, ckpt, records: list[dict], calib_note: str,
                      fmt: str = "gptq") -> dict:
    """quantize_config.json, understood by transformers/optimum, GPTQModel and vLLM (docs/gptq-format.md)."""
    # desc_act tells loaders to honour g_idx; written only when some g_idx is not the trivial k // group_size
    # (act-order with static groups, or one group per row, leaves none), since vLLM refuses desc_act: true.
    desc_act = any(not r.get("g_idx_trivial", True) for r in records)
    q = dict(bits=qcfg.bits, group_size=qcfg.group_size, damp_percent=qcfg.percdamp, desc_act=desc_act,
             static_groups=qcfg.static_groups, sym=qcfg.sym, true_sequential=True, quant_method="gptq",
             checkpoint_format=fmt, format=fmt, pack_dtype="int32", lm_head=False,
             meta=dict(quantizer=[f"minigptq:{__version__}"], method=method, mse=qcfg.mse, blocksize=qcfg.blocksize,
                       calibration=calib_note, act_group_aware=qcfg.act_group_aware,
                       **(dict(gptaq_alpha=qcfg.gptaq_alpha) if method == "gptaq" else {})))
    kept = sorted({r["module"] for r in records if r["method"].startswith("kept")})
    if kept:
        # Layers the format cannot pack stay nn.Linear. optimum/transformers read modules_in_block_to_quantize
        # (suffixes of the quantized names); GPTQModel reads "dynamic" rules where "-:regex" means "do not quantize".
        prefix = re.compile(re.escape(ckpt.arch.layer_prefix).replace(r"\{i\}", r"\d+"))
        kept_suffix = {prefix.sub("", k, count=1) for k in kept}
        # every block's groups (a MoE's blocks have experts, its dense ones not), as suffixes, each group once
        to_hf, L = internal_to_hf(ckpt), ckpt.cfg.num_layers
        suffixes = dict.fromkeys(tuple(prefix.sub("", to_hf[f"layers.{i}.{n}"], count=1) for n in g)
                                 for i in range(L) for g in ckpt.arch.groups(ckpt.cfg, i))
        groups = [[h for h in g if h not in kept_suffix] for g in suffixes]
        q["modules_in_block_to_quantize"] = [g for g in groups if g]
        q["dynamic"] = {f"-:^{re.escape(k)}$": {} for k in kept}
    return q


def default_out(model: str | Path, method: str, bits: int, group_size: int) -> Path:
    """<model>-<method>-<bits>bit[-g<group>] beside the model folder (never inside it, even for `--model .`)."""
    m = Path(model)
    if m.name in ("", ".", ".."):  # "." or "..": name the folder by its real name, beside it
        m = m.resolve()
    return m.parent / f"{m.name}-{method}-{bits}bit{'' if group_size == -1 else f'-g{group_size}'}"


# The defaults of the command line and quantize_model: GAR on (measured better than the paper's column order at 4 and
# 3 bits on WikiText-2 and PTB, bench/results/quality_smollm2_table.json; g_idx stays trivial, so vLLM serves it),
# damping 0.05 (with GAR: about even with 0.01 at 4 bits, far better at 3 bits). QuantConfig() itself is the paper's
# Algorithm 1 (columns in order, damping 0.01), bit-exact with its reference code; `--paper` asks for it.
DEFAULT_QCFG = QuantConfig(act_group_aware=True, percdamp=0.05)


def quantize_model(model: str | Path, out: str | Path | None = None, *, qcfg: QuantConfig = DEFAULT_QCFG,
                   method: str = "gptq", dataset=None, nsamples: int = 128, seqlen: int = 2048,
                   seed: int = 0, dtype: str = "fp16", device: str = "cpu", overwrite: bool = False,
                   resume: bool = False, fmt: str = "gptq", target: str | None = None, act_dtype: str = "fp32",
                   log: Callable[[str], None] | None = None, progress: bool = False,
                   moe_min_share: float = 0.01, adapter: str | Path | None = None,
                   layer_errors: bool = False) -> Path:
    """Quantize the checkpoint folder `model` into a GPTQ checkpoint folder `out`; returns `out`.

    dataset: calibration data: a .txt / .jsonl file (text or chat "messages" rows), a list of strings, a list of
    token-id lists, a 1-D tensor of token ids, or a 2-D tensor of windows (data.calibration_tokens); None = data-free.
    fmt: "gptq" (v1, the widest compatibility; asymmetric zero points are clamped to >= 1 so they never wrap) or
    "gptq_v2" (raw zero points; GPTQModel only loads asymmetric checkpoints of other tools in this form).
    target: "vllm" refuses settings vLLM would not serve and keeps the layers it fuses all quantized or all kept.
    act_dtype: dtype of the calibration activations kept between blocks (fp32; bf16 or fp16 halve their memory; the
    calibration forward passes and the solver compute in fp32 always).
    log: receives the progress messages (default: the "minigptq" logger at INFO, silent unless configured);
    progress: show a progress bar over the blocks on stderr.
    moe_min_share: a mixture of experts' expert that fewer than this share of the calibration tokens are routed to
    is calibrated on all of them (docs/algorithm.md).
    adapter: a PEFT LoRA adapter folder merged into the full-precision weights (W += scaling * B A) block by block
    before calibration and quantization (minigptq/lora.py), so the checkpoint is the adapted model.
    layer_errors: with method "rtn", run the calibration forward passes anyway, so that quant_log.tsv holds each
    layer's error on the calibration activations as for gptq. Without it RTN reads no data and runs no forward pass
    (it needs neither: the checkpoint is the same byte for byte), and the log's error is the weight error
    1/2 ||W - Q||_F^2, marked "no calibration" in its note column. gptq and gptaq always calibrate.
    Everything is validated before the first file is written; `out` is never the model folder or a folder that is
    not minigptq's own checkpoint (see out_folder.check_out).
    """
    log = log or logger.info
    if fmt not in ("gptq", "gptq_v2"):
        raise Error(f"format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    if method not in ("gptq", "gptaq", "rtn"):
        raise Error(f"method must be 'gptq', 'gptaq' or 'rtn', got {method!r}")
    for name, v, lo in (("nsamples", nsamples, 1), ("seqlen", seqlen, 2), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise Error(f"--{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(moe_min_share, bool) or not isinstance(moe_min_share, (int, float)) or not 0 <= moe_min_share <= 1:
        raise Error(f"--moe-min-share must be a number in [0, 1], got {moe_min_share!r}")
    out_dtype, acts = parse_dtype(dtype), parse_dtype(act_dtype)
    device, _ = resolve_device(device)
    ckpt = CheckpointReader(model)
    if ckpt.quant is not None:
        raise Error(f"{model} is already a GPTQ checkpoint; quantize the full-precision model instead")
    if method == "gptaq" and ckpt.cfg.moe_layers:  # its full-precision inputs would be routed to other experts
        raise Error(f"--method gptaq does not support mixtures of experts ({ckpt.cfg.model_type}); use gptq or rtn")
    check_checkpoint(ckpt)  # every tensor's name, shape and dtype, before anything is computed or written
    lora = None if adapter is None else read_adapter(adapter, build_empty(ckpt), internal_to_hf(ckpt))
    if lora and "lm_head" in lora and ckpt.cfg.tie_word_embeddings:
        raise Error(f"adapter {adapter} adapts lm_head, which this model ties to the token embeddings: merging it "
                    f"would change both; valid: an adapter without lm_head in its target_modules")
    if target is not None:
        check_target(target, ckpt, qcfg, fmt)
    if isinstance(dataset, torch.Tensor) and dataset.dim() == 2:  # the windows themselves
        nsamples, seqlen = dataset.shape
        if seqlen > ckpt.cfg.max_positions or seqlen < 2:
            raise Error(f"the calibration windows have {seqlen} tokens; valid: 2 to the model's context "
                        f"({ckpt.cfg.max_positions})")
    seqlen = min(seqlen, ckpt.cfg.max_positions)
    calibrate = method != "rtn" or layer_errors  # RTN rounds each weight alone: no data, no forward pass
    if not calibrate and isinstance(dataset, (str, Path)) and not Path(dataset).is_file():
        raise FileNotFoundError(f"--dataset {dataset}: no such file (--method rtn reads no data: leave --dataset out, "
                                f"or give --layer-errors to log each layer's error on it)")
    out = check_out(out if out is not None else default_out(model, method, qcfg.bits, qcfg.group_size), model,
                    overwrite, log)
    seen = out_state(out)  # what check_out accepted; the commit refuses to replace anything else (PartialRun)
    check_memory(ckpt, nsamples if calibrate else 1, seqlen if calibrate else 1, device, acts)
    t0 = time.perf_counter()
    if calibrate:
        windows = calibration(model, ckpt, dataset, nsamples, seqlen, seed, device, log)
        nsamples, seqlen = windows.shape  # given windows (a 2-D tensor) set both
    else:
        windows, nsamples, seqlen, seed = None, 0, 0, 0
        log("calibration: none (--method rtn needs no data; --layer-errors runs it to log each layer's error on "
            "calibration activations)" + ("; --dataset is not read" if dataset is not None else ""))
    # What a resumed run must share with the interrupted one: the settings and the inputs' contents (not their
    # paths, so a moved model folder still resumes). Each block's own weights are checked when it is reused.
    settings = dict(method=method, **vars(qcfg), nsamples=nsamples, seqlen=seqlen, seed=seed, dtype=dtype, fmt=fmt,
                    act_dtype=act_dtype, version=__version__,
                    calibration_sha256=None if windows is None else tensor_digest([("windows", windows)]),
                    model_sha256=driver.top_source(ckpt))
    if ckpt.cfg.moe_layers:  # the rule for rarely routed experts changes what is solved
        settings["moe_min_share"] = moe_min_share
    if lora is not None:  # a resumed run must merge the same adapter
        settings["adapter_sha256"] = tensor_digest([(f"{k}.{n}", t) for k, w in sorted(lora.items()) for n, t in
                                                    (("A", w.A), ("B", w.B), ("scaling", torch.tensor(w.scaling)))])
    with PartialRun(out, resume=resume, overwrite=overwrite, log=log, seen=seen) as partial:
        partial.start(settings)
        log(f"quantizing {model} ({ckpt.cfg.model_type}, {ckpt.cfg.num_layers} blocks) with {method.upper()} "
            f"{qcfg.bits}-bit, group {qcfg.group_size}, {'sym' if qcfg.sym else 'asym'}"
            f"{', act-order' if qcfg.act_order else ''}{', group-aware act-order' if qcfg.act_group_aware else ''}"
            f" on {device} -> {out}")
        top = driver.quantize_checkpoint(ckpt, windows, qcfg, partial, method, device, out_dtype, log, fmt,
                                         fused_all_or_none=target == "vllm", act_dtype=acts, progress=progress,
                                         moe_min_share=moe_min_share, adapter=lora)
        records = partial.records()
        source = dataset if isinstance(dataset, (str, Path)) else type(dataset).__name__ if dataset is not None \
            else "data-free (model samples)"
        calib_note = f"{source}, {nsamples}x{seqlen}, seed {seed}" if calibrate else "none (rtn)"
        partial.finish(top, ckpt.path, ckpt.hf_config, quant_config_json(qcfg, method, ckpt, records, calib_note, fmt),
                       out_dtype)
    kept = [r["module"] for r in records if r["method"].startswith("kept")]
    if kept:
        log(f"{len(kept)} linear layer(s) kept in full precision (shape not packable): {', '.join(kept[:6])}"
            f"{' ...' if len(kept) > 6 else ''}")
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s (per-layer log: {out / 'quant_log.tsv'})")
    verdicts = report(out)
    log(format_report(out, verdicts))
    if target == "vllm" and not verdicts[2].ok:  # check_target and the driver make this impossible
        raise RuntimeError(f"--target vllm wrote a checkpoint vLLM refuses: {verdicts[2].reasons}")
    return out


def check_target(target: str, ckpt, qcfg: QuantConfig, fmt: str) -> None:
    """Refuse, before any work, the settings that the target loader would not serve (minigptq/compat.py's rules)."""
    if target != "vllm":
        raise Error(f"--target must be 'vllm', got {target!r}")
    bad = []
    if qcfg.bits not in (4, 8):
        bad.append(f"--bits {qcfg.bits} (vLLM serves 4 or 8 bits)")
    if not qcfg.sym:
        bad.append("--no-sym (vLLM serves symmetric checkpoints only)")
    if fmt != "gptq":
        bad.append(f"--format {fmt} (vLLM reads v1, the default --format gptq)")
    if qcfg.act_order and not qcfg.static_groups and qcfg.group_size != -1:
        bad.append("--act-order without --static-groups (its g_idx needs desc_act: true, which vLLM refuses; add "
                   "--static-groups)")
    if qcfg.group_size != -1:  # the input widths of the layers that will be packed (whole fused groups)
        block = build_empty(ckpt).layers[0]
        groups = [[block.get_submodule(n) for n in g] for g in ckpt.arch.groups(ckpt.cfg, 0)]
        widths = sorted({lin.in_features for g in groups
                         if all(can_pack(x.in_features, x.out_features, qcfg.bits) is None for x in g) for lin in g})
        odd = [k for k in widths if k % qcfg.group_size]
        if odd:
            valid = [g for g in (32, 64, 128, 256) if all(k % g == 0 for k in widths)]
            bad.append(f"--groupsize {qcfg.group_size} does not divide the layers' input widths {odd} (vLLM needs it "
                       f"to; valid: {', '.join(map(str, valid + [-1]))})")
    if bad:
        raise Error(f"--target vllm: vLLM would not serve this checkpoint: {'; '.join(bad)}")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The command line's QuantConfig: GAR unless --no-act-group-aware, --act-order (the two exclude each other) or
    --paper (the paper's column order); damping 0.05, or the paper's 0.01 with --paper, unless --percdamp."""
    if args.paper and (args.act_group_aware or args.act_order):
        raise Error("--paper is the paper's column order: it excludes --act-group-aware and --act-order")
    gar = args.act_group_aware if args.act_group_aware is not None else not (args.act_order or args.paper)
    damp = args.percdamp if args.percdamp is not None else QuantConfig.percdamp if args.paper else DEFAULT_QCFG.percdamp
    return QuantConfig(bits=args.bits, group_size=args.groupsize, sym=args.sym, act_order=args.act_order,
                       static_groups=args.static_groups, percdamp=damp, blocksize=args.blocksize,
                       mse=args.mse, act_group_aware=gar, gptaq_alpha=args.gptaq_alpha)


def main(args: argparse.Namespace) -> None:
    qcfg = config_from_args(args)
    quantize_model(args.model, args.out, qcfg=qcfg, method=args.method, dataset=args.dataset,
                   nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, dtype=args.dtype, device=args.device,
                   overwrite=args.overwrite, resume=args.resume, fmt=args.format, target=args.target,
                   act_dtype=args.act_dtype, progress=not args.quiet and sys.stderr.isatty(),
                   moe_min_share=args.moe_min_share, adapter=args.adapter, layer_errors=args.layer_errors)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigptq.quantize",
                                description="Quantize a Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, Phi-3, "
                                            "Gemma 2/3, Mixtral, Qwen-MoE, OPT or BLOOM) with GPTQ into the "
                                            "standard GPTQ checkpoint format.")
    p.add_argument("--model", required=True, help="full-precision checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default: <model>-<method>-<bits>bit-g<groupsize>)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--groupsize", type=int, default=128,
                   help="inputs per quantization group; -1 = one group per output row (default 128)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grid (default); --no-sym for asymmetric")
    p.add_argument("--act-order", action="store_true",
                   help="quantize columns in order of decreasing Hessian diagonal (desc_act)")
    p.add_argument("--static-groups", action="store_true",
                   help="compute group grids up front on the unpermuted weight (with --act-order)")
    p.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="GAR: act-order that moves whole groups (by their largest Hessian diagonal) and orders columns "
                        "within each; g_idx stays trivial, so vLLM serves it (GPTQModel's act_group_aware). Default: "
                        "on, unless --act-order or --paper (measured better: README, Results)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings: columns in order (no GAR), damping 0.01, bit-exact with its reference "
                        "code")
    p.add_argument("--gptaq-alpha", type=float, default=0.25,
                   help="with --method gptaq: fraction in [0, 1] of the shift towards the full-precision model's "
                        "output (default 0.25, as GPTQModel)")
    p.add_argument("--percdamp", type=float, default=None,
                   help="Hessian damping as a fraction of its mean diagonal (default 0.05, with --paper 0.01; raised "
                        "automatically if Cholesky fails)")
    p.add_argument("--moe-min-share", type=float, default=0.01,
                   help="mixture of experts: an expert routed fewer than this share of the calibration tokens is "
                        "calibrated on all of them (default 0.01; docs/algorithm.md)")
    p.add_argument("--blocksize", type=int, default=128, help="columns per lazy batch update (default 128)")
    p.add_argument("--mse", action="store_true", help="search the grid range that minimises the error (slower)")
    p.add_argument("--method", choices=["gptq", "gptaq", "rtn"], default="gptq",
                   help="gptq (default), gptaq (GPTQ fitted to the full-precision model's outputs; keeps a second "
                        "set of calibration activations) or rtn: round-to-nearest baseline with the same grid")
    p.add_argument("--layer-errors", action="store_true",
                   help="with --method rtn: run the calibration forward passes so that quant_log.tsv holds each "
                        "layer's error on the calibration activations (default for rtn: no data read, no forward "
                        "pass, the same checkpoint; the log's error is then 1/2 ||W - Q||_F^2); gptq always calibrates")
    p.add_argument("--dataset", default=None,
                   help="calibration data: a .txt file, or a .jsonl file with a \"text\" field or a \"messages\" list "
                        "per line (chat data, rendered with the model's chat template); default: data-free, sampled "
                        "from the model")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048, capped at the context)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="dtype of the parts left unquantized (embeddings, norms, lm_head; default fp16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to compute (default cpu)")
    p.add_argument("--act-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype the calibration activations are kept in between blocks (default fp32; bf16 halves their "
                        "memory, the blocks still compute in fp32)")
    p.add_argument("--format", choices=["gptq", "gptq_v2"], default="gptq",
                   help="checkpoint format: gptq (v1, default, widest compatibility) or gptq_v2 (raw zero points; "
                        "GPTQModel loads other tools' asymmetric checkpoints only in this form)")
    p.add_argument("--target", choices=["vllm"], default=None,
                   help="refuse settings the target would not serve and keep the layers it fuses (q/k/v, gate/up) all "
                        "quantized or all kept; vllm: symmetric 4/8-bit v1, no desc_act (--act-order needs "
                        "--static-groups), a group size dividing every layer's input width")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder to merge into the full-precision weights before quantizing "
                        "(calibration runs through the merged model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and any interrupted run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--quiet", action="store_true", help="print only errors (no progress, no per-block lines)")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
