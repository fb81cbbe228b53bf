"""Data loader throughput alone and inside training, and the share of step time spent waiting
for data, for a ResNet-18 audio-visual concat model (the target on a GPU: under 5 %).

Synthetic clips in the Kinetics-Sounds layout (3 classes x `--clips` per split, 3 frames of
112 x 112 and a 256 x 128 fbank per clip) are written and prepped once. Then, with
`train.workers` 0 and 2 side by side:
- loader: the training DataLoader that `Trainer` builds (ParquetSamples in training mode +
  BlockShuffleSampler + collate_batch, batch 32, with the engine's worker settings) is iterated
  for `--epochs` epochs with nothing else to do: samples/s;
- trainer: `recipes/concat-synthetic-av.yaml` through `Trainer` for `--epochs` epochs: samples/s
  from each epoch's `seconds`, and the data-wait share from `data_seconds` when metrics.parquet
  has that column;
- plain loop: the model, optimizer and loader that `Trainer` builds, with a bare forward /
  cross-entropy / backward / step (the loss read back every step, as the engine does), timing
  the time blocked in the loader's `next()` against the whole step: the data-wait share
  measured outside the engine, to cross-check its `data_seconds`.
Epoch 1 of each is a warm-up and is left out (allocator, first worker fork). Ratios: loader over
training throughput (the headroom of the loader), workers 2 over 0. Run: python bench/loader.py
[--clips N] [--epochs E] [--device auto|cpu|cuda] [--quick]. Prints one JSON object on its last
line and writes it to bench/results/loader.json (not with --quick, a smoke run on tiny data
whose figures mean nothing; tests/test_bench_loader.py runs it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from _results import add_quick, machine, publish, synthetic_kinetics_sounds

from mmval.data.dataset import ParquetSamples
from mmval.engine.session import build_session, resolve_device
from mmval.recipe import Recipe, load_recipe
from mmval.runner import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "concat-synthetic-av.yaml"
BATCH = 32
WORKERS = (0, 2)


def recipe_for(data: Path, epochs: int, workers: int, device: str, output: Path) -> Recipe:
    overrides = [
        f"data.path={data}",
        f"train.epochs={epochs}",
        f"train.batch_size={BATCH}",
        f"train.workers={workers}",
        f"train.device={device}",
        f"output={output}",
        "seeds=[0]",
    ]
    return load_recipe(RECIPE, overrides)


def engine_session(recipe: Recipe, device: torch.device) -> Any:
    """What `Trainer` builds before its first step: the training DataLoader and sampler exactly
    as the engine makes them (workers, prefetch, persistence), the model and its optimizer."""
    return build_session(recipe.for_seed(0), 0, device)


def start_epoch(session: Any, epoch: int) -> None:
    session.sampler.set_epoch(epoch)
    session.datasets["train"].set_epoch(epoch)


def loader_alone(recipe: Recipe, device: torch.device, epochs: int) -> float:
    """Samples/s of iterating the training loader (batches moved to the device); epoch 1 is
    left out."""
    session = engine_session(recipe, device)
    seen, seconds = 0, 0.0
    for epoch in range(epochs):
        start_epoch(session, epoch)
        started = time.perf_counter()
        count = 0
        for batch in session.loader:
            batch = batch.to(device)
            count += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch > 0:
            seen, seconds = seen + count, seconds + time.perf_counter() - started
    return seen / seconds


def plain_loop(recipe: Recipe, device: torch.device, epochs: int) -> tuple[float, float]:
    """(samples/s, share of step time blocked in next()) of a bare training loop."""
    session = engine_session(recipe, device)
    model, optimizer = session.model, session.optimizer
    model.train()
    seen, waited, total = 0, 0.0, 0.0
    for epoch in range(epochs):
        start_epoch(session, epoch)
        batches = iter(session.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches).to(device)
            except StopIteration:
                break
            fetched = time.perf_counter()
            loss = F.cross_entropy(model(batch.inputs).logits, batch.label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # waits for the device, as the engine's loss log does every step
            if epoch > 0:
                seen += len(batch)
                waited += fetched - started
                total += time.perf_counter() - started
    return seen / total, waited / total


def trainer_epochs(recipe: Recipe) -> pd.DataFrame:
    result = Trainer(recipe, 0).run()
    return pd.read_parquet(result.run_dir / "metrics.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="clips per class and split")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per contender (>= 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_quick(parser)
    args = parser.parse_args()
    size = 112
    if args.quick:
        args.clips, args.epochs, size = 2, 2, 32
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is a warm-up)")
    device = resolve_device(args.device)
    load = os.getloadavg()[0]  # other processes on the machine skew every figure below
    result: dict[str, object] = {"bench": "loader"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_kinetics_sounds(root, args.clips, size, workers=2)
        loader_rate, train_rate, plain_rate, plain_wait, engine_wait = {}, {}, {}, {}, {}
        train_samples = 0
        for workers in WORKERS:
            key = f"workers{workers}"
            recipe = recipe_for(data, args.epochs, workers, device.type, root / f"runs{workers}")
            loader_rate[key] = loader_alone(recipe, device, args.epochs)
            plain_rate[key], plain_wait[key] = plain_loop(recipe, device, args.epochs)
            metrics = trainer_epochs(recipe).iloc[1:]  # epoch 1: warm-up
            train_samples = len(ParquetSamples(data, recipe.data.splits.train, []))
            train_rate[key] = train_samples / float(metrics["seconds"].mean())
            if "data_seconds" in metrics:
                engine_wait[key] = float((metrics["data_seconds"] / metrics["seconds"]).mean())
    result |= {
        "data": f"synthetic Kinetics-Sounds layout, 3 classes x {args.clips} clips per split, "
        f"3 frames {size}x{size} + fbank 256x128, ResNet-18 concat, batch {BATCH}",
        "device": str(device),
        "train_samples": train_samples,
        "epochs_timed": args.epochs - 1,
        "loader_samples_per_s": rounded(loader_rate),
        "trainer_samples_per_s": rounded(train_rate),
        "plain_loop_samples_per_s": rounded(plain_rate),
        "data_wait_share_plain_loop": rounded(plain_wait, 4),
        "data_wait_share_engine": rounded(engine_wait, 4) if engine_wait else None,
        "loader_over_trainer": {k: round(loader_rate[k] / train_rate[k], 2) for k in train_rate},
        "workers2_over_workers0": {
            "loader": round(loader_rate["workers2"] / loader_rate["workers0"], 2),
            "trainer": round(train_rate["workers2"] / train_rate["workers0"], 2),
        },
        "target": "data wait under 5 % of step time on a GPU",
        "machine": f"{machine()}, "
        + (torch.cuda.get_device_name() if device.type == "cuda" else "CPU only (no GPU)")
        + f", load average {load:.1f} at start",
    }
    if not engine_wait:
        result["note"] = (
            "metrics.parquet has no data_seconds column: the data-wait share is the plain loop's"
        )
    publish("loader", result, args.quick)


def rounded(values: dict[str, float], digits: int = 1) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


if __name__ == "__main__":
    main()
