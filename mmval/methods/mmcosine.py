"""MMCosine: modality-wise cosine logits, trained with plain cross-entropy.

Paper: Xu, Feng, Hu, Wei, "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual
Fine-Grained Learning", ICASSP 2023. Follows the official code (GeWu-Lab/MMCosine_ICASSP23 at
00ba0a9cbd9b866b5017e972a1266d7b664bf86e, `main_CD.py`, `--mmcosine True`); spec:
docs/methods.md#mmcosine.

What it changes: only the head. z_m[c] = s cos(h_m, w_{m,c}) against modality m's slice of a
bias-free concat head, z = sum_m z_m, L = CE(z, y) (`train_epoch`, lines 113-118), and the same
logits predict (`acc`). That head is the model option `model.fusion: cosine`
(`mmval.models.fusions.heads.CosineFusion`), so every method can use it and checkpoints are
valued like any other; this method is plain CE and refuses any other fusion. The scale s is
`model.fusion.scale`: official default 10 (the recipes' default), BalanceBenchmark 15.

The official validation (`valid`, lines 181 and 196) scores the fused accuracy with the model's
plain output, the linear concat head W [h_1; ...; h_M] + b, not with the cosine sum: that
read-out is logged too, as `val_linear_acc` / `test_linear_acc` (`eval_readouts`), so that the
published figure can be compared; model selection and `acc` stay the cosine prediction, the
one the method trains. The official head's bias gets no gradient from the cosine loss and keeps
its random initial value; the cosine fusion has no bias, so the linear read-out here is W [h].

M > 2: native (the sum runs over all modalities).

Deviations: the official optional NCE term between the two modalities' features (`--lam`,
default 0, supplementary material only) is not implemented. BalanceBenchmark's
`MMCosine_trainer.py` trains with the plain concat logits outside its modulation window
(default epochs 0-80, i.e. the whole run); here the cosine head is used in every epoch, since a
model's head cannot change between training and evaluation.

DDP: nothing is reduced: the loss is a batch mean of per-sample terms, so the gradients
averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch

    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class MMCosineConfig(MethodConfig):
    fusion: ClassVar[str] = "cosine"
    fusions: ClassVar[tuple[str, ...] | None] = ("cosine",)
    name: Literal["mmcosine"] = "mmcosine"
    source: ClassVar[str] = "GeWu-Lab/MMCosine_ICASSP23@00ba0a9cbd9b866b5017e972a1266d7b664bf86e"


class MMCosine(Method):
    Config: ClassVar[type[MethodConfig]] = MMCosineConfig

    def eval_readouts(self, model: MultimodalModel, out: ModelOutput) -> dict[str, torch.Tensor]:
        """The official validation's fused output: the cosine head's weight as a plain linear
        head over the concatenated features."""
        fusion = model.fusion
        from mmval.models.fusions.heads import CosineFusion

        assert isinstance(fusion, CosineFusion)
        return {"linear": fusion.fc(torch.cat([out.features[m] for m in fusion.names], dim=1))}
