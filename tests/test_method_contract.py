"""The contract every registered method keeps, checked for each entry of `METHODS` (read when
the tests are collected, so that a new method is checked without listing it here): a quick run
with the method's declared `quick` settings finishes and its train loss falls, a run stopped
and resumed gives the metrics of an uninterrupted one, and the method's state round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.artifacts.layout import LAST
from mmval.data.dataset import Batch
from mmval.methods import (
    METHODS,
    Method,
    MethodConfig,
    TrainContext,
    build_method,
    register_method,
)
from mmval.models import ModelOutput, MultimodalModel
from mmval.recipe import recipe_json_schema
from tests.conftest import (
    assert_resume_matches,
    assert_trained,
    quick_modalities,
    quick_recipe,
    trained,
)


@pytest.fixture(scope="module")
def prepared(uci_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the placeholders of `MethodConfig.quick` stand for, on uci-mfeat: finished runs
    (a concat run, and one unimodal run per modality) whose checkpoints methods start from."""
    out = tmp_path_factory.mktemp("prepared")
    concat = trained(quick_recipe("concat", uci_dir, out))[0].run_dir
    modalities = quick_recipe("concat", uci_dir, out).data.modalities
    assert modalities is not None
    teachers = {}
    for modality in modalities:
        recipe = quick_recipe(
            "unimodal", uci_dir, out, run=f"teacher-{modality}", prepared={"{modality}": modality}
        )
        teachers[modality] = str(trained(recipe)[0].run_dir / "best.pt")
    return {
        "{modality}": modalities[0],
        "{checkpoint}": str(concat / "best.pt"),
        "{teachers}": teachers,
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) or (a != a and b != b)  # NaN equals NaN here


def check_contract(name: str, data: Path, output: Path, prepared: dict[str, Any]) -> None:
    """The checks every registered method passes (see the module docstring)."""
    recipe = quick_recipe(name, data, output, prepared=prepared)
    result, metrics = trained(recipe)
    assert_trained(result.summary, metrics, 3)
    assert_resume_matches(recipe.model_copy(update={"name": f"{name}-straight"}))
    checkpoint = load_checkpoint(result.run_dir / LAST)
    state = checkpoint.training
    assert state is not None
    fresh = build_method(recipe.method, len(checkpoint.data.classes))
    fresh.load_state_dict(state.method)
    assert _equal(fresh.state_dict(), state.method)


def skip_unless_classification(name: str) -> None:
    """The data here are classification data: a method for other tasks keeps the contract in
    its own test module (tests/test_<name>.py), on data of its task."""
    tasks = METHODS[name].Config.tasks
    if "classification" not in tasks:
        pytest.skip(f"{name} is defined for {' and '.join(tasks)}: checked in tests/test_{name}.py")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_keeps_the_contract(name, uci_dir, tmp_path, prepared):
    skip_unless_classification(name)
    check_contract(name, uci_dir, tmp_path / "runs", prepared)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_on_synthetic_av(name, synthetic_av_dir, tmp_path):
    skip_unless_classification(name)
    config = METHODS[name].Config
    if any(f"'{p}'" in str(config.quick) for p in ("{checkpoint}", "{teachers}")):
        pytest.skip("starts from uci-mfeat checkpoints")  # covered by the contract test
    first = quick_modalities(config, synthetic_av_dir)[0]
    epochs = 3 if name == "relearning" else 2  # its first re-init starts epoch 3
    recipe = quick_recipe(
        name,
        synthetic_av_dir,
        tmp_path / "runs",
        encoder={"kind": "resnet18"},
        epochs=epochs,
        batch_size=4,
        lr=1e-3,
        prepared={"{modality}": first},
    )
    result, metrics = trained(recipe)
    assert_trained(result.summary, metrics, epochs)


class LabelSmoothedConfig(MethodConfig):
    name: Literal["label_smoothed"] = "label_smoothed"
    quick: ClassVar[dict[str, Any]] = {"method": {"smoothing": 0.05}}
    smoothing: float = 0.1


class LabelSmoothed(Method):
    """A method only this test knows: cross-entropy with label smoothing, and a step count as
    state."""

    Config = LabelSmoothedConfig
    config: LabelSmoothedConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.calls = 0

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(out.logits, batch.label, label_smoothing=self.config.smoothing)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


@pytest.fixture
def label_smoothed():
    register_method(LabelSmoothed)
    yield "label_smoothed"
    METHODS.pop("label_smoothed")


def test_a_method_registered_in_a_test_is_in_the_schema_and_keeps_the_contract(
    label_smoothed, uci_dir, tmp_path, prepared
):
    schema = str(recipe_json_schema())
    assert "label_smoothed" in schema and "smoothing" in schema
    check_contract(label_smoothed, uci_dir, tmp_path / "runs", prepared)


def test_the_test_method_is_gone_after_its_test():
    assert "label_smoothed" not in METHODS
