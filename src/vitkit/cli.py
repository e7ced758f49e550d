"""The `vitkit` command: argparse subcommands only. Each one parses, then calls a library function.

Exit codes: 0 success; 1 some inputs failed (predict/eval report which); 2 a usage error or a
file that cannot be used, reported in one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import VitkitError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line naming the argument."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _model_from(source: str, *, model_name: str | None = None):
    """A variant name builds a fresh model; anything else loads through load_pretrained."""
    from pathlib import Path

    from .pretrained import create_model, load_pretrained
    from .variants import resolve

    try:
        resolve(source)
    except ValueError as error:
        if not Path(source).exists() and not source.startswith("hf-hub:"):
            raise VitkitError(f"{source!r} is neither a file, a directory nor a model name: {error}") from None
        return load_pretrained(source, model=model_name)
    return create_model(source)


# ---------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameters and FLOPs of a model",
                       description="Show a model's architecture, parameters by component and forward FLOPs per image.")
    p.add_argument("source", help="a variant name (ViT-B/16, vit_base_patch16_224, base) or any load_pretrained source")
    p.add_argument("--model", help="variant name, for weight files that cannot say the whole architecture")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from .info import describe

    model = _model_from(args.source, model_name=args.model)
    print(describe(model))
    return EXIT_OK


# ---------------------------------------------------------------------------- main
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers: build, load, train, inspect and ship.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VitkitError as error:
        print(f"vitkit {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
