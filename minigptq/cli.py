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
