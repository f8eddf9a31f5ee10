"""What every minigptq command line shares: the --debug flag and the one-line error on user mistakes."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

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


def resolve_device(device: str, dtype: str | None = None):
    """-> (torch.device, dtype name); a CUDA request without a GPU is a user error."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA GPU is available; use --device cpu")
    return dev, dtype or ("fp32" if dev.type == "cpu" else "fp16")


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv=None) -> None:
    """Parse argv, call main(args); a user error prints 'error: ...' on stderr and exits 2 (traceback with --debug)."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
