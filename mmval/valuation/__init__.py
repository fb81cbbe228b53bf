"""Per-sample modality valuation. Each method has its own file behind `ValuationMethod`
(`base.py`); `engine.py` masks modalities and evaluates subsets in batches; `run.py` values a
checkpoint or a model on a split; `training.py` does it every few epochs during training. To add
a method, write its file and list its class in METHODS."""

from __future__ import annotations

from mmval.valuation.base import BatchValues, Game, ValuationMethod
from mmval.valuation.cmob import CMoB
from mmval.valuation.config import TrainValuationConfig, ValuationConfig
from mmval.valuation.shapley import ExactShapley
from mmval.valuation.shapley_mc import MonteCarloShapley

METHODS: dict[str, type[ValuationMethod]] = {
    cls.name: cls for cls in (ExactShapley, MonteCarloShapley, CMoB)
}


def build_method(config: ValuationConfig, modalities: list[str]) -> ValuationMethod:
    return METHODS[config.method](config, modalities)


__all__ = [
    "METHODS",
    "BatchValues",
    "Game",
    "TrainValuationConfig",
    "ValuationConfig",
    "ValuationMethod",
    "build_method",
]
