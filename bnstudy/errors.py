"""The one exception type the CLI turns into a one-line error message instead of a traceback, the one way to quote a
library's error inside such a message, and the argument parser whose usage errors are one line too."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable


class UserError(Exception):
    """Bad input or state the user can fix; the message names the problem and the fix in one line."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type name when empty), shortened at a word boundary."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def check_at_least(option: str, value: float, minimum: float) -> None:
    """Refuse ``option`` below ``minimum`` (or not a number at all): a count of 0 never means "all" here."""
    if not value >= minimum:  # also catches NaN
        raise UserError(f"{option} must be at least {minimum:g}, got {value:g}")


def check_positive(option: str, value: float) -> None:
    """Refuse ``option`` unless it is a finite number above 0 (learning rates, step sizes)."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} must be a number above 0, got {value:g}")


MAX_SEED = 2**32 - 1  # what numpy's and torch's generators all accept


def check_seed(value: int, option: str = "--seed") -> None:
    """Refuse a seed the random generators would reject or wrap around."""
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{option} must lie in 0..{MAX_SEED}, got {value}")


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
    """Refuse an unknown name, listing the valid ones."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def env_choice(name: str, choices: tuple[str, ...], what: str) -> str:
    """The value of environment variable ``name`` (case and spaces ignored; unset or empty: the first choice),
    refused in one line unless it is one of ``choices``."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise UserError(f"{name}={value!r} is not {what}; use one of {', '.join(choices)}")
    return value


class UsageError(UserError):
    """A command line argparse cannot parse."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors, so the entry point prints them as one line like every other
    error (instead of the usage block) and exits 2, and torchrun's ranks print them once; subcommand parsers inherit
    it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see {self.prog} --help")
