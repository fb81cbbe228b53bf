"""Training cost of every method relative to plain concat training, on uci-mfeat.

Each `recipes/<method>-uci-mfeat.yaml` is trained for a few epochs (one seed, same data, same
batch size) in one process, one after the other; the figure per method is its median training
time per epoch (evaluation excluded, first epoch dropped as warm-up) divided by concat's. Runs
that re-sample (more or fewer steps per epoch) are compared per epoch, as a user experiences them.
Run: python bench/methods.py [--epochs N]. Prints one JSON object on its last line and writes it
to bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import pandas as pd
import torch

from mmval.engine.train import Trainer
from mmval.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def epoch_seconds(recipe_file: Path, data_root: Path, out: Path, epochs: int) -> float:
    recipe = load_recipe(
        recipe_file,
        [f"train.epochs={epochs}", "seeds=[0]", f"output={out}", f"data.root={data_root}"],
    )
    result = Trainer(recipe, 0).run()
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    return float(metrics["seconds"].iloc[1:].median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    files = sorted(RECIPES.glob("*-uci-mfeat.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {
            f.name.removesuffix("-uci-mfeat.yaml"): epoch_seconds(
                f, Path(tmp) / "data", Path(tmp) / "runs", args.epochs
            )
            for f in files
        }
    base = seconds["concat"]
    result = {
        "bench": "methods",
        "data": "uci-mfeat (6 modalities, MLP encoders), recipes/<method>-uci-mfeat.yaml",
        "epochs": args.epochs,
        "concat_epoch_s": round(base, 4),
        **{
            f"{name}_over_concat": round(s / base, 2)
            for name, s in sorted(seconds.items())
            if name != "concat"
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    out = Path(__file__).parent / "results" / "methods.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
