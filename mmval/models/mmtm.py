"""MMTM mid-fusion: modalities exchange channel gates between encoder stages.

MMTM (Joze et al., CVPR 2020), in the form Greedy (Wu et al., ICML 2022) uses
(nyukat/greedy_multimodal_learning @a190e03755bd8d0883b2c5c0cd7921d2561ce2ee,
`src/balanced_mmtm.py::MMTM_mitigate`, `src/model.py`): after
a chosen stage, each modality's maps are squeezed by global average pooling to S_m, then
E = ReLU(W_s [S_1; ...; S_M]) with int(2 * sum_m C_m / ratio) units, and each modality's maps are
scaled channel-wise by gate_m = sigmoid(W_m E). The official model places blocks after ResNet
stages 2, 3 and 4 with ratio 4; it is written for two modalities, the form extends to M as the
concatenated squeeze. Each block keeps, per modality, the running mean of the batch-mean gate
over training steps: Greedy's re-balancing steps replace the "caring" modality's gate by it,
cutting that modality's conditioning on the others. The official code updates the second
modality's running mean from the first modality's gate (a slip); here each keeps its own.
Running means are updated in training steps only (the official code also counts evaluation
forwards).

Encoders that can be split in stages (resnet18 and resnet: the four residual stages; mlp: each
hidden block, then the output block) expose `stem`, `run_stage`, `squeeze`, `excite` and `pool`.
"""

from __future__ import annotations

import torch
from torch import nn

from mmval.distributed import batch_mean
from mmval.errors import UserError
from mmval.models.config import MMTMConfig


class MMTMBlock(nn.Module):
    def __init__(self, channels: dict[str, int], ratio: float) -> None:
        super().__init__()
        self.names = list(channels)
        width = max(1, int(2 * sum(channels.values()) / ratio))
        self.squeeze = nn.Linear(sum(channels.values()), width)
        self.excite = nn.ModuleDict({m: nn.Linear(width, c) for m, c in channels.items()})
        for m, c in channels.items():
            self.register_buffer(f"running_gate_{m}", torch.zeros(c))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def running_gate(self, modality: str) -> torch.Tensor:
        return getattr(self, f"running_gate_{modality}")

    def forward(
        self, squeezed: dict[str, torch.Tensor], caring: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Gates [B, C_m] by modality from the squeezed maps [B, C_m]."""
        joint = torch.relu(self.squeeze(torch.cat([squeezed[m] for m in self.names], dim=1)))
        gates = {m: torch.sigmoid(self.excite[m](joint)) for m in self.names}
        if not self.training:
            return gates
        with torch.no_grad():
            n = self.steps.item()
            for m in self.names:
                avg = self.running_gate(m)
                mean = batch_mean(gates[m].float().mean(0), len(gates[m]))  # DDP: global batch
                avg.copy_((mean + avg * n) / (n + 1))
            self.steps += 1
        if caring is not None:
            gates[caring] = (
                self.running_gate(caring).to(gates[caring].dtype).expand_as(gates[caring])
            )
        return gates


class MMTMFusion(nn.Module):
    """Runs staged encoders side by side with MMTM blocks after the configured stages."""

    def __init__(self, config: MMTMConfig, encoders: nn.ModuleDict) -> None:
        super().__init__()
        unstaged = [m for m, enc in encoders.items() if not hasattr(enc, "stage_channels")]
        if unstaged:
            raise UserError(
                "model.mmtm: mid-fusion needs encoders that run in stages (resnet18, resnet or "
                f"mlp); {', '.join(unstaged)} cannot."
            )
        depth = min(len(enc.stage_channels) for enc in encoders.values())
        bad = [s for s in config.stages if not 1 <= s <= depth]
        if bad:
            raise UserError(
                f"model.mmtm.stages: {bad} out of range; these encoders have stages 1..{depth}."
            )
        self.blocks = nn.ModuleDict(
            {
                str(s): MMTMBlock(
                    {m: enc.stage_channels[s - 1] for m, enc in encoders.items()}, config.ratio
                )
                for s in sorted(set(config.stages))
            }
        )
        # set by a method for the next training forward (Greedy's re-balancing); never saved
        self.caring: str | None = None

    def encode(
        self, encoders: nn.ModuleDict, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        batch = len(next(iter(inputs.values())))
        maps = {m: enc.stem(inputs[m]) for m, enc in encoders.items()}
        depth = max(len(enc.stage_channels) for enc in encoders.values())
        for i in range(depth):
            maps = {
                m: enc.run_stage(i, maps[m]) if i < len(enc.stage_channels) else maps[m]
                for m, enc in encoders.items()
            }
            key = str(i + 1)
            if key not in self.blocks:
                continue
            gates = self.blocks[key](
                {m: enc.squeeze(maps[m], batch) for m, enc in encoders.items()}, self.caring
            )
            maps = {m: enc.excite(maps[m], gates[m]) for m, enc in encoders.items()}
        return {m: enc.pool(maps[m], batch) for m, enc in encoders.items()}
