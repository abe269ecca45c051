"""What every study returns: its configuration, multi-seed summaries, the checks of its claims, and the curves
its figures draw; plus quick mode and parameter resolution shared by all studies."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bnstudy.io import write_json

DEFAULT_SEEDS = (0, 1, 2)
QUICK_ENV = "BNSTUDY_QUICK"


@dataclass
class Check:
    """One claim, whether our numbers bear it out, and the number(s) the verdict rests on."""

    claim: str
    passed: bool
    value: Any = None


@dataclass
class StudyResult:
    """A study's outcome. ``checks`` are invariants (a failure means a bug); ``findings`` are the seed
    notebooks' empirical claims, reported as our runs found them, true or not."""

    name: str
    config: dict[str, Any]
    seeds: list[int]
    summary: dict[str, Any]
    checks: dict[str, Check] = field(default_factory=dict)
    findings: dict[str, Check] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def failed_checks(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.passed]

    def report(self) -> str:
        """One line per check and finding: ✓ when it holds, ✗ when not."""
        lines = [f"{self.name} (seeds {', '.join(map(str, self.seeds))})"]
        for kind, entries in (("check", self.checks), ("finding", self.findings)):
            for key, entry in entries.items():
                lines.append(f"  {kind:<7} {'✓' if entry.passed else '✗'} {key}: {entry.claim}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/result.json``."""
        return write_json(Path(directory) / "result.json", self.to_dict())


def is_quick(quick: bool | None = None) -> bool:
    """``quick`` if given, else whether ``$BNSTUDY_QUICK`` is set to a true value (how notebooks run in tests)."""
    if quick is not None:
        return quick
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


P = TypeVar("P")


def choose_params(full: P, quick_changes: dict[str, Any], quick: bool | None, overrides: dict[str, Any]) -> P:
    """The seed's parameters (``full``), shrunk by ``quick_changes`` in quick mode, then the caller's overrides."""
    params = dataclasses.replace(full, **quick_changes) if is_quick(quick) else full
    return dataclasses.replace(params, **overrides)


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; 0 for one value) across seeds, with the values themselves."""
    vals = [float(v) for v in values]
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "values": vals}


def mean_std_curves(curves: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per-epoch mean and sample std of equally long curves, one per seed."""
    columns = [mean_std(column) for column in zip(*curves)]
    return {"mean": [c["mean"] for c in columns], "std": [c["std"] for c in columns]}


def history_summary(histories: Sequence[dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """For each metric of per-seed training histories: its per-epoch ``curve`` and its ``final`` value, as mean
    and std across seeds."""
    return {
        key: {
            "curve": mean_std_curves([h[key] for h in histories]),
            "final": mean_std([h[key][-1] for h in histories]),
        }
        for key in histories[0]
    }


def fmt(stat: dict[str, Any], digits: int = 4) -> str:
    """'mean ± std' for a :func:`mean_std` entry."""
    return f"{stat['mean']:.{digits}g} ± {stat['std']:.2g}"
