"""The `jaxcnmf` command line: a thin layer over the library, one module per sub-command.

Each module in this package defines `add_parser(subparsers)` (which registers its sub-command and sets `run`) and
`run(args) -> int`. Errors about the user's input (`JaxcnmfError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command name -> module in this package. Order is the order `jaxcnmf --help` lists them.
COMMANDS = {
    "demo": "demo",
    "fit": "fit",
    "simulate": "simulate",
    "score": "score",
    "deconvolve": "deconvolve",
    "report": "report",
}


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="jaxcnmf",
        description="Find, demix and deconvolve neurons in calcium-imaging movies (CNMF in JAX).",
    )
    parser.add_argument("--version", action="version", version=f"jaxcnmf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:  # a sub-command whose module is not written yet
            if e.name == f"{__name__}.{module}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import JaxcnmfError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    from .._cache import enable_compilation_cache

    enable_compilation_cache()
    try:
        return int(args.run(args) or 0)
    except JaxcnmfError as e:
        print(f"jaxcnmf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcnmf {args.command}: interrupted; no partial output was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
