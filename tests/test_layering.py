"""Import layering: each part of bnstudy imports only the parts below it, and what runs on the edge device imports
neither torch nor bnstudy. Read from the source (every import statement, module level or inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# "bnstudy" itself (`from bnstudy import __version__`) matches only exactly; "*" allows everything.
CORE = {
    "bnstudy",
    "bnstudy.errors",
    "bnstudy.io",
    "bnstudy.data",
    "bnstudy.reference",
    "bnstudy.models",
    "bnstudy.norms",
    "bnstudy.precision",
    "bnstudy.machine",
    "bnstudy.memory",
}
RUN_FORMATS = {"bnstudy.training.run_directory", "bnstudy.training.checkpoint"}
# module prefix -> what its imports may start with (besides itself)
ALLOWED = {
    "bnstudy.errors": set(),
    "bnstudy.io": {"bnstudy.errors"},
    "bnstudy.distributed": {"bnstudy.errors", "bnstudy.io", "bnstudy.distributed"},
    "bnstudy.training.run_directory": {"bnstudy.errors", "bnstudy.io"},
    "bnstudy.training.checkpoint": CORE | {"bnstudy.distributed", "bnstudy.training.run_directory"},
    "bnstudy.edge": CORE | {"bnstudy.distributed", "bnstudy.edge"} | RUN_FORMATS,
    "bnstudy.traces": CORE | {"bnstudy.distributed", "bnstudy.traces", "bnstudy.training.run_directory"},
    "bnstudy.training": CORE | {"bnstudy.distributed", "bnstudy.traces.record", "bnstudy.training", "bnstudy.edge.qat"},
    "bnstudy.studies": CORE | {"bnstudy.distributed", "bnstudy.edge", "bnstudy.studies"},
    "bnstudy.benchmarks": CORE
    | {"bnstudy.distributed", "bnstudy.edge", "bnstudy.traces", "bnstudy.training", "bnstudy.benchmarks"},
    "bnstudy.commands": {"*"},
    "bnstudy.__main__": {"bnstudy.commands"},
    "bnstudy": CORE | {"bnstudy.distributed.syncbn"},  # the shared building blocks at the top
}
DEVICE_SIDE = ["deploy/infer.py", "deploy/edge.py", "deploy/latency.py"]
NEVER_ON_DEVICE = ("torch", "torchvision", "onnx", "onnxscript", "bnstudy")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                module_path = ROOT / Path(*candidate.split("."))
                found.add(candidate if module_path.with_suffix(".py").exists() or module_path.is_dir() else node.module)
    return found


def rule_for(name: str) -> tuple[str, set[str]]:
    key = max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)
    return key, ALLOWED[key]


def layering_violations(sources: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, imported in sources.items():
        key, allowed = rule_for(name)
        for target in sorted(i for i in imported if i == "bnstudy" or i.startswith("bnstudy.")):
            ok = target == name or any(
                a == "*" or target == a or (a != "bnstudy" and target.startswith(a + ".")) for a in allowed | {key}
            )
            if not ok:
                problems.append(f"{name} imports {target}")
    return problems


def package_sources() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted((ROOT / "bnstudy").rglob("*.py"))}


def test_every_module_has_a_rule():
    for name in package_sources():
        rule_for(name)  # raises ValueError (max of nothing) for a module no rule covers


def test_layers_are_not_crossed():
    assert layering_violations(package_sources()) == []


def test_a_crossed_layer_is_caught():
    sources = package_sources()
    sources["bnstudy.distributed.syncbn"] = sources["bnstudy.distributed.syncbn"] | {"bnstudy.training.loop"}
    sources["bnstudy.edge.fold"] = sources["bnstudy.edge.fold"] | {"bnstudy.commands"}
    assert layering_violations(sources) == [
        "bnstudy.distributed.syncbn imports bnstudy.training.loop",
        "bnstudy.edge.fold imports bnstudy.commands",
    ]


@pytest.mark.parametrize("script", DEVICE_SIDE)
def test_device_side_never_imports_torch_or_bnstudy(script):
    imported = imports(ROOT / script)
    assert not [name for name in imported if name.split(".")[0] in NEVER_ON_DEVICE]


def test_subpackages_say_what_they_are_for_and_may_import():
    for init in sorted((ROOT / "bnstudy").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init} does not say what it may import"
