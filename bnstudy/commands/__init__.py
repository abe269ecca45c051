"""The thin ``bnstudy`` command line. Each subcommand lives in ``bnstudy/commands/<name>.py`` and registers
itself; heavy imports happen inside the command, so ``bnstudy --help`` stays fast.

May import every other part of bnstudy; nothing imports it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from bnstudy import __version__
from bnstudy.errors import ArgumentParser, UserError

COMMAND_MODULES = ("compare", "export", "study", "sweep", "trace", "bench", "report")


class Registry:
    """Where command modules add their parsers: top-level commands and ``bnstudy bench <target>``."""

    def __init__(self, parser: ArgumentParser) -> None:
        self._commands = parser.add_subparsers(dest="command", metavar="COMMAND")
        self._bench_parser: ArgumentParser | None = None
        self._bench = None

    def command(self, name: str, help: str) -> ArgumentParser:
        return self._commands.add_parser(name, help=help, description=help)

    def bench(self, name: str, help: str) -> ArgumentParser:
        if self._bench is None:
            self._bench_parser = self.command("bench", "benchmarks that print ratios measured in one run")
            self._bench = self._bench_parser.add_subparsers(dest="target", metavar="TARGET", required=True)
        return self._bench.add_parser(name, help=help, description=help)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="bnstudy", description="Study BatchNorm end to end: math, training, distributed statistics, export."
    )
    parser.add_argument("--version", action="version", version=f"bnstudy {__version__}")
    registry = Registry(parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"bnstudy.commands.{name}").register(registry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: options and inputs are checked before anything starts or is written; a bad one is a
    one-line error on stderr and exit status 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            parser.error(f"a COMMAND is required ({', '.join(COMMAND_MODULES)})")
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"bnstudy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnstudy: interrupted", file=sys.stderr)
        return 130
