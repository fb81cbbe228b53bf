"""Per-sample modality valuation. Each method has its own file behind `ValuationMethod`
(`base.py`), listed in `registry.py`; `engine.py` masks modalities and evaluates subsets in
batches; `run.py` values a checkpoint or a model on a split; `training.py` does it every few
epochs during training; `summary.py` sums up a table of contributions.

Only the torch-free configs are imported here, so that `mmval report` (which reads contribution
tables through `summary.py`) does not import torch.
"""

from __future__ import annotations

from mmval.valuation.config import TrainValuationConfig, ValuationConfig

__all__ = ["TrainValuationConfig", "ValuationConfig"]
