"""LCKD on fake BraTS 2018 volumes: it trains, logs its distillation term and the teachers it
picks per region, resumes as an uninterrupted run, distils nothing when one sequence is present,
and its L1 term and teacher Dice match hand computations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.artifacts.layout import LAST
from mmval.errors import UserError
from mmval.methods import build_method
from mmval.methods.lckd import REGIONS, kd_loss, soft_region_dice
from mmval.recipe import Recipe
from tests.conftest import assert_resume_matches, assert_trained, quick_recipe, trained

SEQUENCES = ["flair", "t1ce", "t1", "t2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def lckd_recipe(prepared: Path, out: Path, **changes: Any) -> Recipe:
    """A short lckd run on the fake volumes (the method's quick settings), every sequence."""
    base = {"data": {"modalities": SEQUENCES}, "method": {"teacher_every": 3}}
    return quick_recipe(
        "lckd",
        prepared,
        out,
        epochs=6,
        batch_size=4,
        lr=0.01,
        changes=_merge(base, changes),
    )


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def test_lckd_trains_logs_kd_and_teachers_and_resumes(brats_data, tmp_path):
    recipe = lckd_recipe(brats_data, tmp_path / "runs")
    metrics = assert_resume_matches(recipe)  # killed after epoch 2: teachers from the state
    assert_trained({"finished": True}, metrics, 6)
    assert metrics["method_kd"].notna().all() and (metrics["method_kd"] > 0).any()
    total = metrics["method_seg"] + 0.1 * metrics["method_kd"]
    np.testing.assert_allclose(metrics["train_loss"], total, rtol=1e-5)
    chosen = metrics[metrics[f"method_val_dice_et_{SEQUENCES[0]}"].notna()]
    assert chosen["epoch"].tolist() == [1, 4]  # chosen before epochs 0 and 3 (0-based)
    for _, row in chosen.iterrows():
        best = {
            SEQUENCES[int(np.argmax([row[f"method_val_dice_{r}_{m}"] for m in SEQUENCES]))]
            for r in REGIONS
        }
        teachers = {m for m in SEQUENCES if row[f"method_teacher_{m}"] == 1.0}
        assert teachers == best
    # the teachers hold until the next choice
    flags = metrics[[f"method_teacher_{m}" for m in SEQUENCES]].to_numpy()
    np.testing.assert_array_equal(flags[0], flags[1])
    np.testing.assert_array_equal(flags[3], flags[5])
    state = load_checkpoint(tmp_path / "runs" / recipe.name / "seed0" / LAST).training
    assert state is not None and state.method["chosen_at"] == 3
    fresh = build_method(recipe.method, 4)
    fresh.load_state_dict(state.method)
    assert fresh.state_dict() == state.method
    assert set(state.method["teachers"]) == {m for m in SEQUENCES if flags[-1][SEQUENCES.index(m)]}


def test_one_present_sequence_distils_nothing(brats_data, tmp_path):
    # two sequences: after the warm-up LCKD's random mode keeps exactly one
    recipe = lckd_recipe(
        brats_data, tmp_path / "runs", data={"modalities": SEQUENCES[:2]}, train={"epochs": 3}
    )
    _, metrics = trained(recipe)
    assert metrics["method_kd"].iloc[0] > 0  # warm-up: both present
    assert (metrics["method_kd"].iloc[1:] == 0.0).all()


def test_kd_loss_is_lckd_l1_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    c = torch.tensor([[2.0, 4.0], [0.0, 0.0]], requires_grad=True)
    present = torch.tensor([[True, True, True], [True, False, False]])
    # teachers a and c; pairs over the rows where both are present, mean over entries:
    # (a, a) 0; (a, b) row 0: (1 + 2) / 2; (a, c) row 0: (1 + 2) / 2;
    # (c, a) row 0: (1 + 2) / 2; (c, b) row 0: (2 + 4) / 2; (c, c) 0
    got = kd_loss({"a": a, "b": b, "c": c}, present, ["a", "c"])
    assert got.item() == pytest.approx(1.5 + 1.5 + 1.5 + 3.0)
    got.backward()
    # the teacher side is detached: a's gradient comes only from (c, a), c's only from (a, c)
    assert a.grad is not None and c.grad is not None and b.grad is not None
    np.testing.assert_allclose(a.grad.numpy(), [[-0.5, -0.5], [0.0, 0.0]])
    np.testing.assert_allclose(c.grad.numpy(), [[0.5, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(b.grad.numpy(), [[-1.0, -1.0], [0.0, 0.0]])
    alone = torch.tensor([[False, True, False], [False, True, False]])
    assert kd_loss({"a": a, "b": b, "c": c}, alone, ["a", "c"]).item() == 0.0
    assert kd_loss({"a": a, "b": b, "c": c}, alone, ["b"]).item() == 0.0


def test_teacher_dice_is_lckd_soft_dice():
    target = torch.tensor([[[[0, 1], [2, 3]]]])  # [1, 1, 2, 2]: one voxel of each class
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]]).view(1, 1, 1, 2, 2).expand(1, 3, 1, 2, 2)
    p = [0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-2))]
    truth = {"et": [0, 0, 0, 1], "wt": [0, 1, 1, 1], "tc": [0, 1, 0, 1]}
    got = soft_region_dice(logits, target)[0]
    for k, region in enumerate(REGIONS):
        t = truth[region]
        want = 2 * sum(x * y for x, y in zip(p, t, strict=True)) / (sum(p) + sum(t) + 1)
        assert got[k].item() == pytest.approx(want, rel=1e-6)


def test_lckd_refuses_other_networks_losses_and_missing_draws(brats_data, tmp_path):
    with pytest.raises(UserError, match=r"model\.unet: lckd trains LCKD's network"):
        lckd_recipe(brats_data, tmp_path / "runs", model={"unet": {"shared_encoder": False}})
    with pytest.raises(UserError, match="region_dice_bce"):
        trained(lckd_recipe(brats_data, tmp_path / "runs", task={"loss": "dice_wce"}))
    with pytest.raises(UserError, match=r"task\.missing: none"):
        trained(lckd_recipe(brats_data, tmp_path / "runs", task={"missing": "lckd"}))
