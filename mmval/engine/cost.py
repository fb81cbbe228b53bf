"""What a model costs, counted by mmval itself and recorded once per run in summary.json.

`parameters` (and `trainable_parameters`) are `numel()` sums over the model that predicts (the
method's extra modules and passes are not counted); `macs_per_sample` is one evaluation
forward of it on one sample of the validation split (batch 1, the data's own shapes), counted
by torch's `FlopCounterMode` as floating-point operations / 2 (it counts 2 per multiply-add:
`torch/utils/flop_counter.py`, `mm_flop`, `conv_flop_count`). That counter sees matrix
products, convolutions and attention kernels only: element-wise work, normalisation, pooling
and embedding look-ups are not in the figure. Attention is counted under the math SDPA backend
with the Transformer fast path off, since torch's fused CPU kernels are not in its registry
(they would count 0).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmval.tasks import Task


def model_cost(model: nn.Module, task: Task, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameters and multiply-accumulates of one evaluation forward of `model` on `inputs`
    (one sample). The model is left as it was: its modes are restored, and the forward runs
    under no_grad in eval mode, with the random state forked, so training draws the same
    numbers as without it."""
    parameters = list(model.parameters())
    modes = {module: module.training for module in model.modules()}
    device = next(iter(inputs.values())).device
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        with ExitStack() as stack:
            stack.enter_context(
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            )
            stack.enter_context(torch.no_grad())
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.compiler.set_stance("force_eager"))  # train.compile
            torch.backends.mha.set_fastpath_enabled(False)
            counter = stack.enter_context(FlopCounterMode(display=False))
            model.eval()
            task.eval_forward(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes.items():
            module.training = training
    return {
        "parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "macs_per_sample": counter.get_total_flops() // 2,
    }
