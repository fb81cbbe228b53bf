"""LCKD: learnable cross-modal knowledge distillation for segmentation with missing sequences.

Paper: Wang et al., "Learnable Cross-modal Knowledge Distillation for Multi-modal Learning with
Missing Modality", MICCAI 2023 (arXiv 2310.01035). Follows the official code, github
billhhh/LCKD at commit 5ba51b5366a74d01906cc8389855bb8e3e1ae42a: `DualNet.py` (`DualNet.forward`,
309-406), `train.py` (the loop, 185-301; `validate`, 157-182; `dice_score` and
`compute_dice_score`, 88-114), `loss_Dual.py` (`DiceLoss4BraTS`, `BCELoss4BraTS`, 11-82) and
`run.sh` (the BraTS 2018 schedule); spec: docs/methods.md#lckd.

The network is LCKD's shape: one encoder shared by every sequence (`DualNet.py` 352-353) and the
mean of the present sequences' bottleneck features in place of the absent ones' (379-387), here
the 3-D U-Net `mmval.models.unet3d.UNet3D` with `shared_encoder: true, fill: mean` (a recipe
problem otherwise). The official 3-D ResNet-50 + ASPP encoder and its decoder (`U_Res3D_enc`,
`U_Res3D_dec`) are not reproduced [ours: the U-Net substitutes for them].

What it changes, per batch:
- presence: during the first `warmup_epochs` every sequence is present (`run.sh`'s first run,
  `--mode` default `0,1,2,3`); afterwards LCKD's random mode (`DualNet.py` 335-342): once per
  batch the number of present sequences uniform in {1, ..., M-1}, then a uniform subset of that
  size (`mmval.tasks.volumes.random_presence(..., "lckd")`); the model is called with it.
- loss (`train.py` 259-262): L = L_seg + kd_wt * L_kd, with L_seg the task's loss (LCKD's
  `region_dice_bce`: Dice + BCE on sigmoid ET, WT, TC maps; other losses are refused) and
  L_kd = sum over teachers t present, sum over present sequences s (the teacher itself included,
  "teach all", 375) of mean |f_t.detach() - f_s| over the bottleneck features f (`nn.L1Loss`,
  325, 364-377). The t = s term is zero in value and gradient. With one sequence present L_kd = 0.
- teachers (`train.py` 294-301, `validate`): every `teacher_every` epochs each sequence alone is
  evaluated on the validation split; per region (ET, WT, TC) the sequence with the highest mean
  Dice is taken (the first in model order on a tie, as `list.index(max(...))`); the teachers
  are the union of the three ("multi-teacher", 299). The Dice is the official soft one
  (`dice_score`, 88-98): per case 2 sum(p t) / (sum p + sum t + 1) on sigmoid probabilities p
  of each region channel.

Deviations [ours]:
- counted in epochs: the official re-chooses teachers every `val_pred_every` = 5000 steps and
  warms up for 80000 steps (`run.sh`); the defaults here are those at 142.5 steps per epoch
  (285 cases of `BraTS18_train_all.csv`, batch 2): 35 and 561 epochs.
- teachers are chosen before the first step of epochs 0, N, 2N, ... in evaluation mode (the
  official validates after the steps 0, 5000, ... in training mode, where its instance norm
  behaves the same, and trains its very first step with the default teacher `--teachers=0`,
  FLAIR); the per-region choice reads the mean over cases (the official sums over cases: the
  same choice).
- validation volumes go through the task's evaluation forward (whole volume, or the task's
  sliding window when `task.patch` is set; the official slides 80 x 160 x 160 windows with
  overlap 1/3).

State for resume: the teachers and the figures of their choice (plain lists). DDP: every rank
evaluates the whole validation split with the same weights (the same teachers everywhere); the
presence is drawn on each rank for its share of the batch (the official trains on one GPU); the
loss is a batch mean, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.errors import UserError
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts
from mmval.models import ModelConfig, ModelOutput
from mmval.tasks.volumes import brats_regions, random_presence

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")

REGIONS = ("et", "wt", "tc")  # LCKD's channel order of the region outputs (`id2trainId`)


class LCKDConfig(MethodConfig):
    name: Literal["lckd"] = "lckd"
    source: ClassVar[str] = "billhhh/LCKD@5ba51b5366a74d01906cc8389855bb8e3e1ae42a"
    tasks: ClassVar[tuple[str, ...]] = ("segmentation",)
    min_modalities: ClassVar[int] = 2  # its random mode keeps 1..M-1 sequences
    quick: ClassVar[dict[str, Any]] = {
        "model": {"unet": {"base": 4, "levels": 3, "shared_encoder": True, "fill": "mean"}},
        "task": {"name": "segmentation", "loss": "region_dice_bce"},
        "method": {"warmup_epochs": 1, "teacher_every": 1},
    }
    kd_wt: float = Field(
        default=0.1, ge=0.0, description="weight of the distillation term (train.py `kd_wt`)"
    )
    teacher_every: int = Field(
        default=35,
        ge=1,
        description="epochs between teacher choices on the validation split (official: every "
        "`val_pred_every` = 5000 steps, 35 epochs of BraTS 2018 at batch 2) [ours: in epochs]",
    )
    warmup_epochs: int = Field(
        default=561,
        ge=0,
        description="epochs with every sequence present before LCKD's random missing mode "
        "(official: 80000 steps, 561 epochs of BraTS 2018 at batch 2) [ours: in epochs]",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        unet = model.unet
        if unet is None or not unet.shared_encoder or unet.fill != "mean":
            return [
                (
                    "model.unet",
                    "lckd trains LCKD's network: one encoder shared by the sequences and the "
                    "mean of the present ones' features for the absent ones; set model.unet: "
                    "{shared_encoder: true, fill: mean}",
                )
            ]
        return []

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts("warmup_epochs", self.warmup_epochs, epochs, "LCKD's missing mode")


def kd_loss(
    features: dict[str, torch.Tensor], present: torch.Tensor, teachers: list[str]
) -> torch.Tensor:
    """LCKD's distillation term (`DualNet.py` 364-377): for each teacher t and each sequence s
    (teachers included), mean |f_t.detach() - f_s| over the samples where both are present and
    every feature entry; summed. `features` in `present`'s column order ([B, M] bool)."""
    names = list(features)
    total = next(iter(features.values())).new_zeros(())
    for t in teachers:
        i = names.index(t)
        for j, s in enumerate(names):
            rows = present[:, i] & present[:, j]
            if rows.any():
                teacher = features[t][rows].detach()
                total = total + (teacher - features[s][rows]).abs().mean()
    return total


def soft_region_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per case and region [B, 3] (ET, WT, TC) the soft Dice LCKD picks teachers by
    (`train.py` 88-114): 2 sum(p t) / (sum p + sum t + 1), p the sigmoid of each channel."""
    prob = logits.float().sigmoid().flatten(2)
    truth = brats_regions(target).flatten(2)
    return 2.0 * (prob * truth).sum(2) / (prob.sum(2) + truth.sum(2) + 1.0)


class LCKD(Method):
    Config = LCKDConfig
    config: LCKDConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.teachers: list[str] = []
        self.chosen_at = -1  # the epoch whose start chose the teachers
        self.choice: dict[str, float] = {}  # each sequence's validation Dice then
        self._present: torch.Tensor | None = None

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        """No modules; checks the task settings the recipe cross-checks cannot see."""
        config = getattr(self.task, "config", None)
        if getattr(config, "loss", None) != "region_dice_bce":
            raise UserError(
                "lckd trains with LCKD's region loss (Dice + BCE on sigmoid ET, WT, TC maps); "
                "set task: {name: segmentation, loss: region_dice_bce}."
            )
        if getattr(config, "missing", "none") != "none":
            raise UserError(
                "lckd draws the missing sequences itself (method.warmup_epochs, then LCKD's "
                "random mode); set task.missing: none."
            )
        return nn.ModuleDict()

    @no_grad
    def _single_sequence_dice(self, model: nn.Module, ctx: TrainContext) -> np.ndarray:
        """[M, 3]: the mean soft Dice of ET, WT, TC on the validation split with each sequence
        alone present, in evaluation mode."""
        from mmval.models.method_modules import _Presence

        names = list(model.modalities)
        sums = torch.zeros(len(names), len(REGIONS), dtype=torch.float64)
        cases = 0
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.batches("val"):
                assert batch.target is not None, "a segmentation data set stores a target"
                for i in range(len(names)):
                    row = torch.zeros(1, len(names), dtype=torch.bool, device=batch.label.device)
                    row[0, i] = True
                    out = self.task.eval_forward(_Presence(model, row), batch.inputs)
                    sums[i] += soft_region_dice(out.logits, batch.target).sum(0).double().cpu()
                cases += len(batch)
        finally:
            model.train(was_training)
        if cases == 0:
            raise UserError("lckd chooses its teachers on the validation split, which is empty.")
        return (sums / cases).numpy()

    def on_epoch_start(self, model: nn.Module, ctx: TrainContext) -> None:
        if ctx.epoch % self.config.teacher_every or self.chosen_at == ctx.epoch:
            return
        names = list(model.modalities)
        dice = self._single_sequence_dice(model, ctx)
        best = {region: names[int(np.argmax(dice[:, k]))] for k, region in enumerate(REGIONS)}
        self.teachers = [m for m in names if m in best.values()]
        self.chosen_at = ctx.epoch
        self.choice = {
            f"val_dice_{region}_{m}": float(dice[i, k])
            for k, region in enumerate(REGIONS)
            for i, m in enumerate(names)
        }

    def forward(self, model: nn.Module, batch: Batch, ctx: TrainContext) -> ModelOutput:
        m = len(model.modalities)
        if ctx.epoch < self.config.warmup_epochs:
            present = torch.ones(len(batch), m, dtype=torch.bool)
        else:
            present = random_presence(len(batch), m, "lckd")
        self._present = present.to(batch.label.device)
        return model(batch.inputs, present=self._present)

    def objective(
        self, model: nn.Module, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self._present is not None, "forward sets the presence"
        seg = self.task.loss(out.logits, batch)
        kd = kd_loss(out.features, self._present, self.teachers)
        return seg + self.config.kd_wt * kd, {"seg": float(seg.detach()), "kd": float(kd.detach())}

    def on_epoch_end(self, model: nn.Module, ctx: TrainContext) -> dict[str, float]:
        """The teachers of this epoch (1 or 0 per sequence) and, in an epoch that chose them,
        each sequence's validation Dice per region."""
        figures = {f"teacher_{m}": float(m in self.teachers) for m in model.modalities}
        if self.chosen_at == ctx.epoch:
            figures |= self.choice
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {"teachers": list(self.teachers), "chosen_at": self.chosen_at, "choice": self.choice}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teachers = list(state["teachers"])
        self.chosen_at = int(state["chosen_at"])
        self.choice = dict(state["choice"])
