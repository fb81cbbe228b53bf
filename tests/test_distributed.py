"""Multi-process training: the collectives, the per-rank sampler, and 2-process gloo DDP runs
on the CPU that must give the metrics of a 1-process run with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from mmval import distributed
from mmval.artifacts.checkpoint import load_checkpoint
from mmval.data.dataset import (
    BlockShuffleSampler,
    FrameAugment,
    ParquetSamples,
    collate_batch,
)
from mmval.engine.session import _for_ranks, build_session
from mmval.errors import UserError
from mmval.methods import METHODS
from mmval.recipe import Recipe, load_recipe, parse_recipe
from mmval.runner import Trainer
from tests.conftest import filled

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, port: int, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    try:
        target(*args)
    finally:
        distributed.shutdown()


def run_ranks(target: Callable[..., None], *args: Any, timeout: float = 240) -> None:
    """Run target(*args) in WORLD forked processes joined as a gloo group (a failure in any
    re-raises here; a hang fails the test instead of blocking it)."""
    context = mp.start_processes(
        _entry,
        args=(_free_port(), target, args),
        nprocs=WORLD,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {timeout} s (a deadlock?)")


# ---------------------------------------------------------------- the sampler


def test_ranks_take_their_part_of_every_global_batch():
    blocks = np.repeat(np.arange(6), 5)[:27]  # 27 samples: padded to 28 for 2 ranks
    single = BlockShuffleSampler(blocks, seed=3)
    single.set_epoch(2)
    order = list(single)
    padded = order + order[:1]
    ranks = [
        BlockShuffleSampler(blocks, seed=3, num_replicas=2, rank=r, batch_size=4) for r in (0, 1)
    ]
    parts = []
    for sampler in ranks:
        sampler.set_epoch(2)
        parts.append(list(sampler))
    assert [len(p) for p in parts] == [14, 14]
    # global batches of 8: rank 0 holds the first 4 of each, rank 1 the next 4; the last,
    # [24, 28), is cut into 2 + 2
    starts = list(range(0, 24, 8))
    assert parts[0] == [i for s in starts for i in padded[s : s + 4]] + padded[24:26]
    assert parts[1] == [i for s in starts for i in padded[s + 4 : s + 8]] + padded[26:28]
    resumed = BlockShuffleSampler(blocks, seed=0, num_replicas=2, rank=1, batch_size=4)
    resumed.load_state_dict({"seed": 3, "epoch": 2, "consumed": 8})
    assert list(resumed) == parts[1][8:]


# ---------------------------------------------------------------- the collectives


def _collectives() -> None:
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")  # gloo
    r, n = distributed.rank(), WORLD
    assert distributed.world_size() == n and distributed.is_main() == (r == 0)
    assert distributed.all_reduce(torch.tensor([r + 1.0, 2.0])).tolist() == [3.0, 4.0]
    assert distributed.all_reduce(torch.tensor([r + 1.0]), "max").tolist() == [2.0]
    # rank r holds r + 1 samples of mean r: the global mean is (1*0 + 2*1) / 3
    assert distributed.batch_mean(torch.tensor([float(r)]), r + 1).item() == pytest.approx(2 / 3)
    assert distributed.sum_dict({"a": 1.0} | ({"b": 5.0} if r else {})) == {"a": 2.0, "b": 5.0}
    gathered = distributed.gather_rows(torch.full((r + 1, 2), float(r)))
    assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert distributed.shard_bounds(5) == [(0, 2), (2, 5)][r]

    # gathered rows with gradients: loss_r = sum(c_r * all rows); d loss / d own rows must be
    # the sum over ranks of c at those rows
    x = torch.full((r + 1,), 1.0, requires_grad=True)
    rows, offset = distributed.gather_rows_with_grad(x)
    coeff = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    (coeff[r] * rows).sum().backward()
    assert offset == [0, 1][r]
    assert x.grad.tolist() == [[11.0], [22.0, 33.0]][r]

    # f(sum over ranks): value f(S) everywhere, gradient f'(S) * ranks (averaging divides it)
    y = torch.tensor(r + 1.0, requires_grad=True)
    total = distributed.differentiable_sum(y)
    (total**2).backward()
    assert total.item() == 3.0 and y.grad.item() == 2 * 3.0 * n

    with distributed.replicated():
        assert distributed.world_size() == 1 and distributed.gather_rows(x).shape == (r + 1,)

    def fail() -> None:
        raise UserError("rank 0 says no")

    with pytest.raises(UserError, match="rank 0 says no"):
        distributed.on_main(fail)
    assert distributed.on_main(lambda: f"from {distributed.rank()}") == "from 0"

    # gradients: p0 reached on both ranks, p1 on rank 1 only, p2 nowhere
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    sync = distributed.GradientSync(params)
    loss = ((r + 1.0) * params[0]).sum() + (params[1].sum() * 4.0 if r else 0.0)
    loss.backward()
    sync.reduce()
    assert params[0].grad.tolist() == [1.5, 1.5]
    assert params[1].grad.tolist() == [2.0, 2.0] and params[2].grad is None
    params[0].grad.mul_(2)  # an edit of reduced gradients (identical on every rank) is kept
    sync.reduce()
    assert params[0].grad.tolist() == [3.0, 3.0]
    (params[0].sum() * (r + 1.0)).backward()  # a new backward adds local gradients: averaged
    sync.reduce()
    assert params[0].grad.tolist() == [4.5, 4.5]
    sync.close()

    # BatchNorm cannot be synchronised on the CPU: refused, on every rank alike
    with pytest.raises(UserError, match="BatchNorm"):
        _for_ranks(nn.Sequential(nn.BatchNorm1d(3)), torch.device("cpu"))


def test_collectives_and_gradient_averaging_over_two_ranks():
    run_ranks(_collectives)


# ---------------------------------------------------------------- training


def _train(recipe: Recipe, resume: bool = False) -> None:
    Trainer(recipe, 0, resume=resume).run()


def _metrics(run: Path) -> pd.DataFrame:
    """metrics.parquet without timings (seconds, data_seconds, method_valuation_seconds)."""
    frame = pd.read_parquet(run / "metrics.parquet")
    return frame.drop(columns=[c for c in frame if c.endswith("seconds")])


@pytest.mark.parametrize(
    "method",
    [{"name": "concat"}, {"name": "ogm_ge", "alpha": 0.5}],
    ids=["concat", "ogm_ge"],
)
def test_two_process_training_matches_one_process(recipe_file, tmp_path, method):
    """Same global batch (32 = 2 x 16), no dropout: the 2-rank run must reproduce the 1-process
    metrics and weights (OGM-GE: scores reduced, gradients averaged before the modulation, GE
    noise from the lockstep generator)."""
    common = {
        "method": method,
        "train__epochs": 3,
        "model__encoder__dropout": 0.0,
    }
    Trainer(load_recipe(recipe_file(name="single", **common)), 0).run()
    run_ranks(_train, load_recipe(recipe_file(name="double", **common)))
    runs = tmp_path / "runs"
    a, b = _metrics(runs / "single/seed0"), _metrics(runs / "double/seed0")
    assert list(a.columns) == list(b.columns) and len(a) == 3
    assert a["train_loss"].iloc[-1] < a["train_loss"].iloc[0]
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-6)
    wa = load_checkpoint(runs / "single/seed0/last.pt").model
    wb = load_checkpoint(runs / "double/seed0/last.pt").model
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
    # rank 0 alone wrote the run folder, and it says how many processes trained
    written = sorted(p.name for p in (runs / "double/seed0").iterdir())
    assert written == sorted(p.name for p in (runs / "single/seed0").iterdir())
    summary = pd.read_json(runs / "double/seed0/summary.json", typ="series")
    assert summary["processes"] == 2
    frame = pd.read_parquet(runs / "double/seed0/metrics.parquet")
    assert ((frame["data_seconds"] >= 0) & (frame["data_seconds"] <= frame["seconds"])).all()


def test_two_process_resume_continues_the_run(recipe_file, tmp_path):
    """A 2-rank run stopped after 2 epochs and resumed by 2 ranks to 3 ends as an uninterrupted
    1-process 3-epoch run: rank 0 writes last.pt, every rank loads it."""
    common = {"train__epochs": 3, "model__encoder__dropout": 0.0, "method": {"name": "ogm_ge"}}
    Trainer(load_recipe(recipe_file(name="straight", **common)), 0).run()
    run_ranks(_train, load_recipe(recipe_file(name="resumed", **{**common, "train__epochs": 2})))
    run_ranks(_train, load_recipe(recipe_file(name="resumed", **common)), True)
    runs = tmp_path / "runs"
    pd.testing.assert_frame_equal(
        _metrics(runs / "straight/seed0"), _metrics(runs / "resumed/seed0"), rtol=1e-4, atol=1e-6
    )


def test_global_batch_must_split_evenly(recipe_file):
    run_ranks(_expect_user_error, load_recipe(recipe_file(train__batch_size=33)), "multiple of 2")


def _expect_user_error(recipe: Recipe, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Trainer(recipe, 0).run()


def test_persistent_workers_change_no_result(recipe_file, tmp_path):
    """With workers the loader keeps its processes between epochs; the global random stream
    (here: dropout) must be the one of a run without workers."""
    common = {"train__epochs": 3, "model__encoder__dropout": 0.3}
    Trainer(load_recipe(recipe_file(name="plain", **common)), 0).run()
    Trainer(load_recipe(recipe_file(name="workers", train__workers=2, **common)), 0).run()
    runs = tmp_path / "runs"
    pd.testing.assert_frame_equal(_metrics(runs / "plain/seed0"), _metrics(runs / "workers/seed0"))


def test_compile_keeps_checkpoints_and_trains(recipe_file, tmp_path, monkeypatch):
    """train.compile compiles the encoders in place (checkpoint keys unchanged); TorchDynamo's
    eager backend stands in for Inductor, whose C++ build takes minutes on this machine."""
    from torch._dynamo.utils import counters

    compile_module = nn.Module.compile
    monkeypatch.setattr(
        nn.Module, "compile", lambda self: compile_module(self, backend="eager", dynamic=False)
    )
    counters.clear()
    Trainer(load_recipe(recipe_file(name="compiled", train__compile=True)), 0).run()
    Trainer(load_recipe(recipe_file(name="eager")), 0).run()
    assert counters["frames"]["ok"] > 0  # the encoders' forwards went through TorchDynamo
    runs = tmp_path / "runs"
    compiled = load_checkpoint(runs / "compiled/seed0/last.pt").model
    eager = load_checkpoint(runs / "eager/seed0/last.pt").model
    assert sorted(compiled) == sorted(eager)
    frame = _metrics(runs / "compiled/seed0")
    assert frame["train_loss"].iloc[-1] < frame["train_loss"].iloc[0]


def test_persistent_workers_see_each_epochs_random_crops(synthetic_av_dir):
    """The epoch lives in shared memory: a worker kept from epoch 0 crops epoch 1's frames as a
    fresh dataset set to epoch 1 does."""
    every = list(range(len(ParquetSamples(synthetic_av_dir, "train", ["visual"]))))

    def dataset() -> ParquetSamples:
        return ParquetSamples(
            synthetic_av_dir, "train", ["visual"], train=True, seed=0, augment=FrameAugment()
        )

    kept = dataset()
    loader = DataLoader(
        kept,
        batch_size=4,
        sampler=every,
        num_workers=1,
        persistent_workers=True,
        collate_fn=collate_batch,
    )
    seen = []
    for epoch in (0, 1):
        kept.set_epoch(epoch)
        seen.append(torch.cat([b.inputs["visual"] for b in loader]))
        fresh = dataset()
        fresh.set_epoch(epoch)
        assert torch.equal(seen[-1], fresh.__getitems__(every).inputs["visual"])
    assert not torch.equal(seen[0], seen[1])


def test_channels_last_resnet_trains(synthetic_av_dir, tmp_path):
    recipe = parse_recipe(
        {
            "name": "cl",
            "seeds": [0],
            "data": {"path": str(synthetic_av_dir)},
            "model": {"encoder": {"kind": "resnet18"}},
            "train": {"epochs": 1, "batch_size": 6, "channels_last": True},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    conv = build_session(recipe, 0, torch.device("cpu")).model.encoders["visual"].trunk[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    summary = Trainer(recipe, 0).run().summary
    assert summary["finished"] and np.isfinite(summary["val_acc"])


# ---------------------------------------------------------------- every method


# random draws on each rank's own samples (same distribution, other draws than one process)
NOT_EXACT = {"opm", "cmob"}
# after the first epoch they train on re-sampled epochs whose size may be odd: the 2 ranks then
# pad it (one sample twice), so only the first epoch (and its valuation figures) must match
PADDED = {"mmcooperation_sample", "mmcooperation_modality", "mmcooperation_fixed"}


@pytest.mark.slow
def test_every_method_trains_under_ddp(recipe_file, tmp_path):
    """Each method, 3 epochs on 2 ranks: no hang, ranks in sync after every epoch (the engine
    checks weights, buffers and random state), and where the method draws nothing per sample
    the 1-process metrics."""
    runs = tmp_path / "runs"
    base = {"train__epochs": 3, "model__encoder__dropout": 0.0}
    Trainer(load_recipe(recipe_file(name="probed", **base)), 0).run()
    for m in "abc":
        unimodal = {"method": {"name": "unimodal", "modality": m}}
        Trainer(load_recipe(recipe_file(name=f"teacher-{m}", **base, **unimodal)), 0).run()
    prepared = {
        "{modality}": "a",
        "{checkpoint}": str(runs / "probed/seed0/best.pt"),
        "{teachers}": {m: str(runs / f"teacher-{m}/seed0/best.pt") for m in "abc"},
    }
    recipes = []
    # the classification methods: this data set is a classification one
    methods = {n: c for n, c in METHODS.items() if "classification" in c.Config.tasks}
    for name, cls in methods.items():
        settings = {"method__name": name, **base, **dotted(filled(cls.Config.quick, prepared))}
        if cls.Config.max_modalities is not None:
            settings["data__modalities"] = list("abc"[: cls.Config.max_modalities])
        Trainer(load_recipe(recipe_file(name=f"{name}-single", **settings)), 0).run()
        recipes.append(load_recipe(recipe_file(name=f"{name}-ranks", **settings)))
    run_ranks(_train_all, recipes, timeout=900)
    for name in methods:
        a, b = _metrics(runs / f"{name}-single/seed0"), _metrics(runs / f"{name}-ranks/seed0")
        assert list(a.columns) == list(b.columns), name
        if name in PADDED:
            a, b = a.iloc[:1], b.iloc[:1]
        if name not in NOT_EXACT:
            pd.testing.assert_frame_equal(a, b, rtol=1e-3, atol=1e-4, obj=name)


def dotted(changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe overrides as the `recipe_file` keyword arguments (`a__b=value`)."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict) and value:
            out |= dotted(value, f"{prefix}{key}__")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _train_all(recipes: list[Recipe]) -> None:
    for recipe in recipes:
        Trainer(recipe, 0).run()


@pytest.mark.slow
def test_cli_nproc_starts_the_processes(recipe_file, tmp_path):
    path = recipe_file(name="cli")
    done = subprocess.run(
        [sys.executable, "-m", "mmval", "train", "--recipe", str(path), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = pd.read_json(tmp_path / "runs/cli/seed0/summary.json", typ="series")
    assert summary["processes"] == 2
    bad = recipe_file(name="cli-bad", train__batch_size=33)
    failed = subprocess.run(
        [sys.executable, "-m", "mmval", "train", "--recipe", str(bad), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert failed.returncode == 2 and failed.stderr.count("multiple of 2") == 1


@pytest.mark.slow
def test_compile_with_inductor_on_the_cpu(recipe_file, tmp_path):
    """The default torch.compile backend (Inductor, C++ on the CPU) trains a run end to end."""
    summary = Trainer(load_recipe(recipe_file(name="inductor", train__compile=True)), 0).run()
    assert summary.summary["finished"]
    frame = _metrics(tmp_path / "runs/inductor/seed0")
    assert frame["train_loss"].iloc[-1] < frame["train_loss"].iloc[0]
