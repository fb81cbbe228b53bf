"""Layering: no import cycle between mmval's subpackages and top-level modules, and the parts
that read run folders without training stay free of torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "mmval"
RECIPES = Path(__file__).parents[1] / "recipes"


def unit_of(module: str) -> str | None:
    """`mmval.engine.loop` -> `engine`, `mmval.recipe` -> `recipe`; None for the package root."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mmval" and len(parts) > 1 else None


def imported_modules(path: Path) -> set[str]:
    """Every module an mmval file imports, anywhere in it (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from mmval import distributed` imports the module mmval.distributed
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports (a unit: a subpackage or a top-level module)."""
    units = {p.stem for p in PACKAGE.glob("*.py")} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")
    }
    units -= {"__init__", "__main__"}
    graph: dict[str, set[str]] = {unit: set() for unit in units}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        if source not in units:
            continue
        for module in imported_modules(path):
            target = unit_of(module)
            if target in units and target != source:
                graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first unit repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        stack.append(unit)
        for target in sorted(graph[unit]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[unit] = "done"
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "engine" in graph["runner"] and "valuation" in graph["runner"]
    assert "recipe" in graph["engine"] and "methods" in graph["recipe"]


def test_no_import_cycle_between_subpackages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["mmval.report", "mmval.artifacts.layout", "mmval.settings"])
def test_reading_run_folders_does_not_import_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Two seeds of concat, one epoch each, with their test predictions."""
    from mmval.recipe import parse_recipe
    from mmval.runner import Trainer

    out = tmp_path_factory.mktemp("runs")
    recipe = {
        "name": "one",
        "seeds": [0, 1],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [8], "out_dim": 4}},
        "train": {"epochs": 1, "batch_size": 64},
        "output": str(out),
    }
    for seed in (0, 1):
        Trainer(parse_recipe(recipe, "one"), seed).run()
    return out


HEAVY = {"torch", "torchvision", "torchaudio", "av", "matplotlib"}


def command_imports(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the whole command as the `mmval` entry point runs it; (the process, the modules
    `-X importtime` lists)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mmval", *args],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    imported = {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "mmval.cli.main" in imported  # the listing is there
    return done, imported


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["report", "{runs}"],
        ["report", "{runs}", "--baseline", "concat", "--format", "md"],
    ],
)
def test_commands_that_train_nothing_do_not_import_torch(args, finished_runs):
    """matplotlib too: only a report with figures draws."""
    done, imported = command_imports([a.replace("{runs}", str(finished_runs)) for a in args])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported & HEAVY


@pytest.mark.parametrize(
    "args",
    [
        ["recipe", "validate", "{recipes}/concat-uci-mfeat.yaml"],
        ["recipe", "validate", "{recipes}/c3r-uci-mfeat.yaml"],  # plug-ins
        ["recipe", "validate", "{recipes}/imml-uci-mfeat.yaml"],
        ["recipe", "validate", "{recipes}/concat-cmu-mosi-regression.yaml"],  # tasks
        ["recipe", "validate", "{recipes}/lckd-brats2018.yaml"],  # segmentation, 3-D U-Net
        ["recipe", "validate", "{recipes}/ave_att-ave-localisation.yaml"],
        ["recipe", "validate", "{recipes}/ogm_ge-crema-d.yaml"],  # data.augment, resnet18
        [
            "recipe",
            "validate",
            "{recipes}/mla-uci-mfeat.yaml",
            "--set",
            "data.corrupt=[pix=mask:5]",
        ],
        ["recipe", "validate", "{recipes}/late_fusion-food101-qmf.yaml"],  # resnet152, hf BERT
        ["recipe", "validate", "{recipes}/qmf-nyud2.yaml"],  # pretrained weights
        ["recipe", "show"],
        ["recipe", "show", "ogm_ge"],
        ["recipe", "schema"],
        ["prep", "--list"],
    ],
)
def test_reading_recipes_does_not_import_torch(args):
    """`recipe validate` checks every section (methods, fusions, plug-ins, tasks, encoders,
    corruptions) against the registries without building anything; the weights a recipe
    names are only paths then."""
    args = [a.replace("{recipes}", str(RECIPES)) for a in args]
    done, imported = command_imports(args, env={"MMVAL_WEIGHTS": "/weights"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported & HEAVY, sorted(imported & HEAVY)


def test_a_refused_sweep_does_not_import_torch():
    """`recipe validate` on a sweep says to use `mmval train --recipe` (exit 2)."""
    sweep = RECIPES / "sweep-plugins-uci-mfeat.yaml"
    done, imported = command_imports(["recipe", "validate", str(sweep)])
    assert done.returncode == 2 and "is a sweep" in done.stderr, done.stderr[-2000:]
    assert not imported & HEAVY
