"""The GPU path in one command: what CPU runs cannot check, checked and measured on the device.

On synthetic clips in the Kinetics-Sounds layout (3 classes, 3 frames and an fbank per clip,
ResNet-18 encoders, concat head, the setting of recipes/concat-synthetic-av.yaml), one after the
other, every run through `Trainer` as `mmval train` runs it:
- precision: concat trained in fp32 and in bf16 with channels-last from the same seed: the loss
  falls in both, and the test accuracies are compared (the same within noise is the goal); the
  bf16 / fp32 epoch-time ratio;
- OGM-GE in bf16 with channels-last: its loss falls, its coefficients are logged;
- data wait: the share of the bf16 run's epoch time spent waiting for batches (`data_seconds`
  over `seconds`, epoch 1 left out; goal under 5 %), with `train.workers` as given;
- compile: the epoch time without and with `train.compile` (epoch 1, which compiles, left out):
  the speedup;
- distributed: the concat run again with `mmval train --nproc 2`; with two or more GPUs this is
  NCCL, one process per GPU; with one GPU (NCCL takes one process per GPU) or none, two CPU
  processes over gloo, and the JSON says so;
- valuation: exact Shapley values of the test split of the bf16 run's best.pt, samples per
  second and their cost relative to one plain evaluation pass of the same split.
Run: python bench/gpu.py [--device auto|cuda|cpu] [--clips N] [--epochs E] [--workers W]
[--quick]. `--quick` shrinks everything to a CPU smoke test and skips compilation (inductor
compiles ResNet-18 for minutes on a CPU); tests/test_bench_gpu.py runs it.
Prints one JSON object on its last line and writes it to bench/results/gpu.json (not with
--quick, whose figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _results import add_quick, machine, publish, synthetic_kinetics_sounds

from mmval.artifacts.layout import BEST, SUMMARY
from mmval.data.dataset import ParquetSamples
from mmval.engine.loop import predict
from mmval.engine.session import resolve_device
from mmval.recipe import Recipe, load_recipe
from mmval.runner import Trainer
from mmval.tasks import CLASSIFICATION
from mmval.valuation.config import ValuationConfig
from mmval.valuation.registry import build_method
from mmval.valuation.run import load_with_data, value_dataset

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_for(
    recipe: str, data: Path, output: Path, args: argparse.Namespace, *sets: str
) -> Recipe:
    return load_recipe(
        RECIPES / recipe,
        [
            f"data.path={data}",
            f"output={output}",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch}",
            f"train.device={args.device}",
            f"train.workers={args.workers}",
            "seeds=[0]",
            *sets,
        ],
    )


def train(recipe: Recipe) -> tuple[pd.DataFrame, dict[str, Any], Path]:
    run_dir = Trainer(recipe, 0).run().run_dir
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    return metrics, json.loads((run_dir / SUMMARY).read_text()), run_dir


def after_warmup(metrics: pd.DataFrame) -> pd.DataFrame:
    """Epochs 2 on (epoch 1 warms up the allocator, the workers and compilation)."""
    return metrics.iloc[1:] if len(metrics) > 1 else metrics


def loss_fell(metrics: pd.DataFrame) -> dict[str, Any]:
    first, last = float(metrics["train_loss"].iloc[0]), float(metrics["train_loss"].iloc[-1])
    return {
        "train_loss_first": round(first, 4),
        "train_loss_last": round(last, 4),
        "fell": last < first,
    }


def epoch_seconds(metrics: pd.DataFrame) -> float:
    return float(after_warmup(metrics)["seconds"].mean())


def distributed(data: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The concat run under `mmval train --nproc 2`, on GPUs when there are two, else on CPU."""
    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    device = "cuda" if gpus >= 2 else "cpu"
    recipe = root / "ddp.yaml"
    recipe.write_text(
        "\n".join(
            [
                f"base: {RECIPES / 'concat-synthetic-av.yaml'}",
                "name: ddp",
                f"output: {root / 'ddp-runs'}",
                f"data: {{path: {data}}}",
                f"train: {{epochs: {args.epochs}, batch_size: {args.batch}, device: {device}, "
                f"workers: 0}}",
                # BatchNorm is exact under DDP only as SyncBatchNorm, which PyTorch runs on GPUs:
                # on the CPU the ResNet-18 encoders give way to MLPs
                *(
                    ["model: {encoder: {kind: mlp, hidden: [64], out_dim: 32}}"]
                    if device == "cpu"
                    else []
                ),
                "seeds: [0]",
                "",
            ]
        )
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mmval", "train", "--recipe", str(recipe), "--nproc", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    summary_file = root / "ddp-runs" / "ddp" / "seed0" / SUMMARY
    result: dict[str, Any] = {
        "backend": "nccl" if device == "cuda" else "gloo",
        "processes": 2,
        "device": device,
        "finished": done.returncode == 0 and summary_file.is_file(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if gpus < 2:
        result["note"] = (
            f"{gpus} GPU(s): NCCL takes one process per GPU, so the two processes ran on the CPU "
            "over gloo; NCCL is checked on a machine with two GPUs"
        )
    if result["finished"]:
        result["test_acc"] = round(json.loads(summary_file.read_text())["test_acc"], 4)
    else:
        result["error"] = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
    return result


def valuation(run_dir: Path, device: torch.device) -> dict[str, Any]:
    """Exact Shapley values of the test split against one plain evaluation pass."""
    loaded = load_with_data(run_dir / BEST)
    model = loaded.model.to(device).eval()
    dataset = ParquetSamples(loaded.root, "test", loaded.modalities, manifest=loaded.manifest)
    config = ValuationConfig().for_task(CLASSIFICATION)
    method = build_method(config, loaded.modalities)

    def timed(work: Any) -> float:
        work()  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    evaluation = timed(lambda: predict(model, dataset, device, CLASSIFICATION, batch_size=256))
    shapley = timed(
        lambda: value_dataset(model, dataset, method, config, fills=None, device=device)
    )
    return {
        "samples": len(dataset),
        "samples_per_second": round(len(dataset) / shapley, 1),
        "cost_over_evaluation_pass": round(shapley / evaluation, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--clips", type=int, default=96, help="clips per class and split")
    parser.add_argument("--size", type=int, default=224, help="frame size (CREMA-D's 224)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="4", help="train.workers of the timed runs")
    add_quick(parser)
    args = parser.parse_args()
    if args.quick:
        args.clips, args.size, args.epochs, args.batch, args.workers = 2, 32, 2, 4, "0"
    device = resolve_device(args.device)
    args.device = device.type
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine(),
        "data": f"synthetic Kinetics-Sounds layout, 3 classes x {args.clips} clips per split, "
        f"3 frames {args.size}x{args.size} + fbank 256x128, ResNet-18 concat, batch {args.batch}, "
        f"{args.epochs} epochs",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_kinetics_sounds(root, args.clips, args.size, min(4, os.cpu_count() or 1))
        fp32, fp32_summary, _ = train(
            recipe_for(
                "concat-synthetic-av.yaml", data, root / "fp32", args, "train.precision=fp32"
            )
        )
        fast = ("train.precision=bf16", "train.channels_last=true")
        bf16, bf16_summary, bf16_run = train(
            recipe_for("concat-synthetic-av.yaml", data, root / "bf16", args, *fast)
        )
        result["precision"] = {
            "fp32": {**loss_fell(fp32), "test_acc": round(fp32_summary["test_acc"], 4)},
            "bf16_channels_last": {
                **loss_fell(bf16),
                "test_acc": round(bf16_summary["test_acc"], 4),
            },
            "test_acc_difference": round(bf16_summary["test_acc"] - fp32_summary["test_acc"], 4),
            "epoch_seconds_bf16_over_fp32": round(epoch_seconds(bf16) / epoch_seconds(fp32), 3),
        }
        ogm, ogm_summary, _ = train(
            recipe_for("ogm_ge-synthetic-av.yaml", data, root / "ogm", args, *fast)
        )
        coefficients = [c for c in ogm.columns if c.startswith("method_coef_")]
        result["ogm_ge_bf16"] = {
            **loss_fell(ogm),
            "test_acc": round(ogm_summary["test_acc"], 4),
            "coefficients_logged": coefficients,
        }
        timed = after_warmup(bf16)
        result["data_wait_share"] = round(
            float((timed["data_seconds"] / timed["seconds"]).mean()), 4
        )
        result["data_wait_goal"] = "under 0.05 on a GPU"
        if args.quick:  # inductor compiles ResNet-18 for minutes on a CPU
            result["compile_speedup"] = None
        else:
            compiled, _, _ = train(
                recipe_for(
                    "concat-synthetic-av.yaml",
                    data,
                    root / "compiled",
                    args,
                    *fast,
                    "train.compile=true",
                )
            )
            result["compile_speedup"] = round(epoch_seconds(bf16) / epoch_seconds(compiled), 3)
        result["distributed"] = distributed(data, root, args)
        result["valuation"] = valuation(bf16_run, device)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    publish("gpu", result, args.quick)


if __name__ == "__main__":
    main()
