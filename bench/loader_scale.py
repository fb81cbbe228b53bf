"""The training loader at CREMA-D scale: samples/s per worker, and how many workers it takes to
feed the ResNet-18 concat training step of an H200.

Data: synthetic clips in the CREMA-D raw layout (`mmval.data.synthetic_av`, 6 emotions x
`--clips` per split, 480 x 360 FLV video and 16 kHz WAV, 3 s, 1 frame/s: prep keeps frames at
1 frame/s, so a higher rate only slows the setup), prepped with `mmval prep crema-d`'s defaults
unchanged (data_manifests/crema-d.yaml: 3 frames per clip at 224 x 224 stored as JPEG q90, one
picked per sample; log-STFT audio, 22.05 kHz, n_fft 512, hop 353, 3 s tiled -> 257 x 188).
The synthetic frames are flat noisy grey with a coloured square, so their JPEGs are smaller,
and decode faster, than real faces: `jpeg_bytes_per_frame` says how small.

Loader: the training DataLoader that `Trainer` builds for recipes/concat-crema-d.yaml (OGM-GE's
published setting: batch 64, RandomResizedCrop + horizontal flip per training frame), with
`train.workers` 0, 1 and 2, iterated with nothing else to do (bench/loader.py's `loader_alone`;
epoch 1, with the worker start, left out). Samples/s per worker come from the 1- and 2-worker
runs (the machine has 2 cores, and the main process takes a share too); `scaling_2_over_1` is
the 2-worker rate over twice the 1-worker rate (1.0: linear).

Step: no GPU was lent when this was written, so by default the H200's training rate for this
model is derived from a published figure, by FLOPs:
- ResNet-50 v1.5, PyTorch, mixed precision, one A100 80GB: 2470 img/s (NVIDIA
  DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training
  performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU; URL in `A100_SOURCE`);
- H100 over A100 on vision models: about 2x (Lambda, "NVIDIA H100 Tensor Core GPU - Deep
  Learning Performance Analysis", URL in `H100_SOURCE`);
- H200 over H100: 1x for a compute-bound convnet, the H200 being the H100's GH100 die with
  more and faster memory (URL in `H200_SOURCE`) [ours: an assumption, no published ResNet
  training figure on the H200 was found];
- per sample, this model's forward multiply-accumulates against ResNet-50's at 224 x 224, both
  counted by mmval's own counter (torch's FlopCounterMode, `mmval.engine.cost`): training
  costs about 3 forwards in both, so the ratio carries over.
`--step-samples-per-s X` replaces the derived figure with a measured one (bench/gpu.py on the
day a GPU is lent: its bf16 concat samples/s) and `step_source` says "measured".
`workers_needed` = ceil(step samples/s / loader samples/s per worker, the smaller of the 1- and
2-worker figures).

Profile: one worker's work (the dataset's `__getitems__` on one epoch of the sampler's
batches, one torch thread, as in a DataLoader worker) in this process: samples per wall second
and per CPU second (the load-proof figure on a shared machine, `workers_needed_at_cpu_rate`),
then under cProfile timed on CPU: the functions with the largest own time and their share.

Run: python bench/loader_scale.py [--clips N] [--epochs E] [--step-samples-per-s X]
[--data DIR] [--quick]; `--data` times a folder `mmval prep crema-d` made instead (real clips,
or synthetic ones prepped earlier). Prints one JSON object on its last line and writes it to
bench/results/loader_scale.json (not with --quick, whose figures mean nothing;
tests/test_bench_loader_scale.py runs it).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from _results import add_quick, machine, publish
from loader import loader_alone
from torch.utils.flop_counter import FlopCounterMode

from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.engine.cost import model_cost
from mmval.engine.session import build_session
from mmval.recipe import Recipe, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "concat-crema-d.yaml"
WORKERS = (0, 1, 2)
A100_SOURCE = (
    "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/"
    "ConvNets/resnet50v1.5/README.md"
)
A100_RESNET50_AMP_IMG_PER_S = 2470.0  # 1x A100 80GB, mixed precision, pytorch-21.03 NGC
H100_SOURCE = "https://lambdalabs.com/blog/nvidia-h100-gpu-deep-learning-performance-analysis"
H100_OVER_A100_VISION = 2.0  # "vision-based models (~2x)"
H200_SOURCE = "https://aiwiki.ai/wiki/nvidia_h200"
H200_OVER_H100 = 1.0  # same GH100 compute; the H200 adds memory capacity and bandwidth
RAW_SIZE = (360, 480)  # CREMA-D's VideoFlash clips: 480 x 360


def synthetic_crema_d(root: Path, clips: int, size: tuple[int, int]) -> Path:
    """Raw CREMA-D-layout clips (all 6 emotions, `clips` per emotion and split) prepped with the
    manifest's defaults: the data folder `root/crema-d`."""
    classes = load_dataset_manifest("crema-d")[0].classes
    params = SyntheticAVParams(
        layout="crema-d", classes=classes, clips_per_class=clips, seconds=3.0, fps=1, size=size
    )
    write_synthetic_raw(root / "raw", params)
    data = root / "crema-d"
    prepare("crema-d", data, raw=root / "raw", workers=2)
    return data


def recipe_for(data: Path, epochs: int, workers: int, output: Path) -> Recipe:
    """recipes/concat-crema-d.yaml as published (batch, augmentation) on the synthetic data."""
    overrides = [
        f"data.path={data}",
        f"train.epochs={epochs}",
        f"train.workers={workers}",
        "train.device=cpu",
        f"output={output}",
        "seeds=[0]",
    ]
    return load_recipe(RECIPE, overrides)


def forward_macs(model: torch.nn.Module, inputs: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


def model_macs(recipe: Recipe) -> dict[str, Any]:
    """Forward multiply-accumulates per sample of the concat model (mmval's cost counter, one
    validation sample, with each encoder's part) and of torchvision's ResNet-50 at 224."""
    session = build_session(recipe.for_seed(0), 0, torch.device("cpu"))
    sample = session.datasets["val"][0].inputs
    total = model_cost(session.model, session.task, sample)["macs_per_sample"]
    encoders = {}
    for name, encoder in session.model.encoders.items():
        encoder.eval()
        encoders[name] = forward_macs(encoder, sample[name])
    resnet50 = torchvision.models.resnet50().eval()
    return {
        "concat_per_sample": total,
        "by_encoder": encoders,
        "input_shapes": {name: list(x.shape[1:]) for name, x in sample.items()},
        "resnet50_224": forward_macs(resnet50, torch.zeros(1, 3, 224, 224)),
    }


def published_step(macs: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The H200's samples/s for this model, scaled from the published ResNet-50 figure."""
    ratio = macs["resnet50_224"] / macs["concat_per_sample"]
    rate = A100_RESNET50_AMP_IMG_PER_S * H100_OVER_A100_VISION * H200_OVER_H100 * ratio
    return rate, {
        "a100_resnet50_amp_img_per_s": A100_RESNET50_AMP_IMG_PER_S,
        "a100_source": A100_SOURCE,
        "h100_over_a100_vision": H100_OVER_A100_VISION,
        "h100_source": H100_SOURCE,
        "h200_over_h100": H200_OVER_H100,
        "h200_source": H200_SOURCE,
        "resnet50_over_concat_macs": round(ratio, 3),
        "formula": "2470 img/s x 2.0 x 1.0 x ResNet-50 MACs / concat MACs per sample",
    }


def profile_worker(recipe: Recipe, top: int) -> dict[str, Any]:
    """One worker's work on one epoch in this process (one torch thread, as in a DataLoader
    worker): its samples per wall second and per CPU second (this process's CPU time, which
    other processes on the machine do not inflate), then a cProfile on CPU time of the same
    epoch: the functions with the largest own time and their share."""
    session = build_session(recipe.for_seed(0), 0, torch.device("cpu"))
    dataset, sampler = session.datasets["train"], session.sampler
    batch = recipe.train.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = sampler.epoch_order()
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        dataset.__getitems__(batches[0])  # the first read of each row group is checked once
        wall, cpu = time.perf_counter(), time.process_time()
        for b in batches:
            dataset.__getitems__(b)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(lambda: [dataset.__getitems__(b) for b in batches])
    finally:
        torch.set_num_threads(threads)
    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    return {
        "samples": len(order),
        "samples_per_s": round(len(order) / wall, 1),
        "samples_per_cpu_s": round(len(order) / cpu, 1),
        "own_cpu_time_share": {
            f"{Path(file).name}:{line}({name})": round(row[2] / total, 3)
            for (file, line, name), row in rows
        },
    }


def jpeg_bytes(data: Path) -> float:
    import pyarrow.parquet as pq

    sizes = [
        len(frame)
        for shard in sorted((data / "train").glob("*.parquet"))
        for frames in pq.read_table(shard, columns=["visual"]).column("visual").to_pylist()
        for frame in frames
    ]
    return float(np.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="clips per emotion and split")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs (>= 2)")
    parser.add_argument(
        "--step-samples-per-s",
        type=float,
        default=None,
        help="measured training samples/s of the concat model on the GPU (bench/gpu.py)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a folder `mmval prep crema-d` made: no setup"
    )
    add_quick(parser)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is a warm-up)")
    clips, size = (2, (64, 80)) if args.quick else (args.clips, RAW_SIZE)
    load = os.getloadavg()[0]  # other processes on the machine skew every figure below
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        data = args.data or synthetic_crema_d(root, clips, size)
        setup_s = time.perf_counter() - started
        rates = {}
        for workers in WORKERS:
            recipe = recipe_for(data, args.epochs, workers, root / f"runs{workers}")
            rates[f"workers{workers}"] = loader_alone(recipe, torch.device("cpu"), args.epochs)
        recipe = recipe_for(data, args.epochs, 0, root / "runs")
        profile = profile_worker(recipe, top=8)
        macs = model_macs(recipe)
        train_samples = len(build_session(recipe.for_seed(0), 0, torch.device("cpu")).sampler)
        frame_bytes = jpeg_bytes(data)
    per_worker = {"workers1": rates["workers1"], "workers2": rates["workers2"] / 2}
    per_worker_rate = min(per_worker.values())  # the conservative one
    if args.step_samples_per_s is None:
        step_rate, derivation = published_step(macs)
        step_source = f"published: {A100_SOURCE} (scaled: see step_derivation)"
    else:
        step_rate, derivation, step_source = args.step_samples_per_s, None, "measured"
    result: dict[str, Any] = {
        "bench": "loader_scale",
        "data": str(args.data)
        if args.data
        else f"synthetic CREMA-D layout, 6 emotions x {clips} clips per split, raw "
        f"{size[1]}x{size[0]}, prepped with data_manifests/crema-d.yaml's defaults",
        "recipe": f"recipes/concat-crema-d.yaml (batch {recipe.train.batch_size}, "
        "RandomResizedCrop + flip)",
        "train_samples": train_samples,
        "jpeg_bytes_per_frame": round(frame_bytes),
        "epochs_timed": args.epochs - 1,
        "loader_samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "loader_samples_per_s_per_worker": {k: round(v, 1) for k, v in per_worker.items()},
        "scaling_2_over_1": round(rates["workers2"] / (2 * rates["workers1"]), 2),
        "macs": macs,
        "step_samples_per_s": round(step_rate, 1),
        "step_source": step_source,
        "step_derivation": derivation,
        "workers_needed": math.ceil(step_rate / per_worker_rate),
        # the same with the in-process rate per CPU second: what a worker on a core of its
        # own gets, whatever else ran on this machine during the measurement
        "workers_needed_at_cpu_rate": math.ceil(step_rate / profile["samples_per_cpu_s"]),
        "assumptions": (
            "workers_needed = ceil(step samples/s / the smaller of the 1- and 2-worker "
            "per-worker rates), workers_needed_at_cpu_rate the same with one worker's samples "
            "per CPU second (profile_one_worker): one loader worker per core, on cores like "
            "this machine's; the step figure is the GPU's alone (no data wait); synthetic "
            "JPEGs are smaller than real frames, so decode (see the profile) is a lower bound"
        ),
        "profile_one_worker": profile,
        "setup_seconds": round(setup_s, 1),
        "machine": f"{machine()}, CPU only, load average {load:.1f} at start",
    }
    publish("loader_scale", result, args.quick)


if __name__ == "__main__":
    main()
