"""What the commands that train nothing cost to start: `mmval --help`, `mmval recipe validate`
and `mmval report` on 10 and on 1,000 runs, against `python -c 'import torch'` (the cost none of
them should pay).

Each command runs `--repeats` times as its own process (`python -X importtime -m mmval ...`,
the `mmval` command), and reports the median wall time, the ratio
of that time to the median of `import torch`, the number of modules imported and whether torch
(torchvision, matplotlib, scipy) was among them, read from the `-X importtime` lines.

The report trees are written from one real run folder: a concat run trained for 3 epochs on a
4-class synthetic data set, copied with other methods, seeds, optim.lr grid points and data
sets, and its numbers (metrics per epoch, test predictions) redrawn per copy. 1,000 runs: 2 data
sets x 10 methods x 5 learning rates x 10 seeds, reported with `--baseline concat` (a baseline
per grid point, paired t-test and hierarchical bootstrap per row). `--quick`: the 10-run tree
only, 1 repeat, nothing written to bench/results/.

Run: python bench/startup.py [--quick] [--repeats N]. Prints one JSON object on its last line
and writes it to bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from _results import add_quick, machine, publish

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "concat-uci-mfeat.yaml"
METHODS = ("concat", "ogm_ge", "agm", "pmr", "mmcosine", "opm", "cml", "mla", "qmf", "greedy")
LRS = (0.001, 0.002, 0.005, 0.01, 0.02)
REPORT_OPTIONS = ("--baseline", "concat", "--format", "csv")
HEAVY = ("torch", "torchvision", "torchaudio", "matplotlib", "scipy")


def template_run(root: Path) -> Path:
    """One finished run folder of mmval's own making (prep and training, a few seconds)."""
    from mmval.data.prep import prepare
    from mmval.recipe import parse_recipe
    from mmval.runner import Trainer

    data = root / "data" / "synthetic"
    overrides = ["modalities=[a,b]", "dims=[8,8]", "per_class={train: 30, val: 10, test: 10}"]
    prepare("synthetic", data, overrides=overrides)
    recipe = {
        "name": "template",
        "seeds": [0],
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 32},
        "output": str(root / "template"),
    }
    return Trainer(parse_recipe(recipe, "template"), 0).run().run_dir


def write_runs(template: Path, root: Path, count: int) -> Path:
    """`count` run folders below `root` in the run-folder layout (`output/name/seed<k>/`), each
    a copy of `template` with another identity and redrawn numbers."""
    summary = json.loads((template / "summary.json").read_text())
    metrics = pd.read_parquet(template / "metrics.parquet")
    predictions = pd.read_parquet(template / "predictions.parquet")
    classes = int(predictions["label"].max()) + 1
    grid = [
        (dataset, method, lr, seed)
        for dataset in ("synthetic", "synthetic-b")
        for method in METHODS
        for lr in LRS
        for seed in range(10)
    ]
    rng = np.random.default_rng(0)
    for dataset, method, lr, seed in grid[:count] if count < len(grid) else grid:
        recipe = json.loads(json.dumps(summary["recipe"]))
        recipe["method"] = {"name": method}
        recipe["optim"]["lr"] = lr
        name = f"{method}-{dataset}-lr{lr}"
        recipe["name"], recipe["seeds"] = name, [seed]
        identity = json.dumps({k: v for k, v in recipe.items() if k != "seeds"}, sort_keys=True)
        folder = root / dataset / name / f"seed{seed}"
        folder.mkdir(parents=True)
        skill = 0.4 + 0.3 * rng.random()
        history = metrics.copy()
        for column in [c for c in history if c.endswith(("_acc", "_f1")) or "_acc_" in c]:
            history[column] = np.clip(skill + 0.05 * rng.standard_normal(len(history)), 0, 1)
        history.to_parquet(folder / "metrics.parquet", index=False)
        drawn = predictions.copy()
        right = rng.random(len(drawn)) < skill
        drawn["pred"] = np.where(right, drawn["label"], rng.integers(0, classes, len(drawn)))
        drawn.to_parquet(folder / "predictions.parquet", index=False)
        best = int(history["val_acc"].idxmax())
        row = history.iloc[best]
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        shutil.copy(template / "train.log", folder / "train.log")
        data_hash = hashlib.sha256(dataset.encode()).hexdigest()
        folder.joinpath("summary.json").write_text(
            json.dumps(
                summary
                | {k: float(row[k]) for k in row.index if k.startswith(("val_", "test_"))}
                | {
                    "dataset": dataset,
                    "data_fingerprint": data_hash,
                    "method": method,
                    "recipe_name": name,
                    "settings_hash": hashlib.sha256(identity.encode()).hexdigest()[:12],
                    "seed": seed,
                    "best_epoch": int(row["epoch"]),
                    "recipe": recipe,
                },
                indent=2,
            )
        )
    return root


def measure(command: list[str], repeats: int, cwd: Path) -> dict[str, Any]:
    """Median wall seconds of `python -X importtime <command>` over `repeats` processes, and
    what the last one imported."""
    times: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *command],
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd,
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    modules = [
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("| package")
    ]
    imported = set(modules)
    return {
        "seconds": statistics.median(times),
        "modules": len(imported),
        **{f"imports_{name}": name in imported for name in HEAVY},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_quick(parser)
    parser.add_argument("--repeats", type=int, default=None, help="processes per command")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = template_run(root)
        sizes = (10,) if args.quick else (10, 1000)
        for size in sizes:
            write_runs(template, root / f"runs{size}", size)
        cli = ["-m", "mmval"]
        commands = {
            "import_torch": ["-c", "import torch"],
            "help": [*cli, "--help"],
            "recipe_validate": [*cli, "recipe", "validate", str(RECIPE)],
            **{
                f"report_{size}": [*cli, "report", f"runs{size}", *REPORT_OPTIONS] for size in sizes
            },
        }
        results = {name: measure(command, repeats, root) for name, command in commands.items()}
    torch_seconds = results["import_torch"]["seconds"]
    for result in results.values():
        result["over_import_torch"] = round(result["seconds"] / torch_seconds, 3)
        result["seconds"] = round(result["seconds"], 3)
    output = {
        "bench": "startup",
        "repeats": repeats,
        "commands": results,
        "machine": machine(with_torch=False),
    }
    publish("startup", output, args.quick)


if __name__ == "__main__":
    main()
