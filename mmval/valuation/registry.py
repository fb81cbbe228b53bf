"""The valuation methods by name. To add a method, write its file and list its class here."""

from __future__ import annotations

from mmval.valuation.base import ValuationMethod
from mmval.valuation.cmob import CMoB
from mmval.valuation.config import ValuationConfig
from mmval.valuation.shapley import ExactShapley
from mmval.valuation.shapley_mc import MonteCarloShapley

METHODS: dict[str, type[ValuationMethod]] = {
    cls.name: cls for cls in (ExactShapley, MonteCarloShapley, CMoB)
}


def build_method(config: ValuationConfig, modalities: list[str]) -> ValuationMethod:
    return METHODS[config.method](config, modalities)
