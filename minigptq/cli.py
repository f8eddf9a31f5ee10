"""What every minigptq command line shares: the --debug flag and the one-line error on user mistakes.

Exit codes: 0 done; 2 a bad input or a problem of the machine (disk full, read-only folder, out of memory), with
one line `error: ...`; 1 an unexpected exception, which is a bug in minigptq (one line; --debug shows the
traceback); 130 / 143 interrupted by Ctrl-C / SIGTERM; 141, silently, when the reader of stdout goes away (a pipe
into `head`). Whatever the exit, each command removes what it created
and has no use for (quantize keeps finished blocks for --resume after an interruption or a resource problem).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Callable

from . import Error

# Errors that mean "the input was wrong", not "minigptq has a bug": a one-line message and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--dtype and --device, shared by the commands that run a model."""
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="activation / full-precision weight dtype (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    p.add_argument("--cpu-kernel", choices=["auto", "int8", "exact"], default="auto",
                   help="packed layers on the CPU: int8 = activations quantized to int8 and integer dot products "
                        "(fastest; ~0.5%% relative error per layer), exact = fp32 arithmetic, auto = int8 where the "
                        "CPU has AVX2, AVX-VNNI or AVX-512 VNNI (default)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to run on top of "
                        "the model; packed weights stay packed (minigptq/lora.py)")


def add_kv_flag(p: argparse.ArgumentParser) -> None:
    """--kv-dtype, shared by generate, chat and eval (minigptq/kv_cache.py: resolve_kv_dtype)."""
    p.add_argument("--kv-dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="dtype of the KV cache: auto = fp16 on the CPU when the model runs in fp32 (half the bytes "
                        "per cached token; attention still computes in fp32), else the model's dtype (default auto)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p and --seed, shared by generate and chat."""
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def quiet_start() -> None:
    """The first thing `python -m minigptq.<command>` does, before its imports load torch (a second or more):
    Ctrl-C or SIGTERM meanwhile ends the process with one line and exit code 130 / 143 instead of Python's
    traceback (nothing has been created yet, so there is nothing to clean up). run() puts back the
    KeyboardInterrupt / Terminated exceptions that its cleanup relies on."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _terminated_while_starting)


def _interrupted_while_starting(signum, frame):
    print("interrupted", file=sys.stderr)
    sys.exit(130)


def _terminated_while_starting(signum, frame):
    print("terminated", file=sys.stderr)
    sys.exit(143)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Stderr(logging.Handler):
    """The "minigptq" logger's messages on stderr, written around any progress bar (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(quiet: bool) -> None:
    """The CLIs show the library's INFO messages (--quiet: warnings only); the library itself prints nothing."""
    logger = logging.getLogger("minigptq")
    for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
        logger.removeHandler(h)
    logger.addHandler(_Stderr())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse argv, call main(args); errors end as one line 'error: ...' and an exit code (module docstring)."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if main_thread and signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # quiet_start's
            signal.signal(signal.SIGINT, signal.default_int_handler)
        main(args)
    except KeyboardInterrupt as e:
        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except BrokenPipeError:  # stdout's reader went away (`inspect --json | head -1`): stop quietly, as Unix tools do
        _discard_stdout()
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a tool that SIGPIPE ended
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, USER_ERRORS):
            msg, code = _one_line(e), 2
        elif isinstance(e, (MemoryError, _torch_oom())):
            msg, code = f"out of memory ({_one_line(e)}); lower --nsamples/--seqlen or use a smaller batch", 2
        elif isinstance(e, OSError):  # full disk, read-only file system, I/O error
            msg, code = _one_line(e), 2
        else:
            msg, code = (f"internal error, a bug in minigptq: {type(e).__name__}: {_one_line(e)} (rerun with --debug "
                         f"and report the traceback)"), 1
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(code)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of what is left in its buffer does not fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):  # stdout is not a file (replaced by a test, closed): nothing will flush to it
        pass


def _torch_oom():
    import torch
    return torch.OutOfMemoryError
