"""ReconBoost: alternating boosting over modalities, with memory consolidation and global
rectification.

Paper: Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality Reconcilement",
ICML 2024. Follows the official code (huacong/ReconBoost, commit
14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932: `train.py` `main` for two modalities,
`train_MSA.py` `main` for three, `schedule.py` `schedule_model` (fixed mode),
`models/dynamic_net.py` `DynamicNet` and `Head`, `models/CREMA/basic_model.py`, `utils.py`
`check_status`, the README's commands). Compared with BalanceBenchmark's port
(GeWu-Lab/BalanceBenchmark `balancemm/trainer/ReconBoost_trainer.py`,
`BaseClassifierReconBoostModel` in `balancemm/models/avclassify_model.py`,
`configs/trainer_config.yaml` ReconBoost); spec:
docs/methods.md#reconboost. Of the paper only the abstract was read; the
code has three parts, which its names tie to the paper's: the boosting loss (the KL-based
reconcilement in gradient-boosting form), `ga_loss` (memory consolidation, by elimination) and
phase 2 (commented "global rectification scheme" in `train_MSA.py`).

What it changes: the schedule and the step (`train_step`), plus the ensemble's learnable scale b
(`build_modules`; official `DynamicNet.boost_rate`, init `--boost_rate` 1.0).
- Schedule: stage s trains the learner of modality modalities[s mod M] (the model's order;
  `schedule_model`'s fixed mode cycles audio, visual on CREMA-D/AVE and text, visual, audio on
  MOSEI, so M > 2 is native; the audio-visual recipes list data.modalities audio first). A
  stage is `boost_epochs` epochs of boosting (official `--epochs_per_stage` 4), then
  `rectify_epochs` epochs of global rectification (official `--correct_epoch` 4), every stage.
- Ensemble: F_E = b sum_{k in E} z_k, z_k the learner of modality k (its encoder and the fusion
  head's share of it). E holds one learner per modality, the newest: `DynamicNet.add` replaces a
  modality's entry, and that learner is trained in place. From scratch (the official default),
  E starts empty and a modality joins after its first boosting phase; with `--use_pretrain`
  (the README's commands) every modality is in E from stage 0 (`full_ensemble`) and its encoder
  starts from a unimodal checkpoint (`train.py` `init_pretrain` with `--m1ckpt`/`--m2ckpt`):
  `pretrained` names, per modality, the best.pt of a finished mmval `unimodal` run (local
  files; only the encoder is copied, as the official `model.fc = net_ensemble.head` replaces the
  unimodal head by the shared one).
- Boosting, learner m (only encoder m runs with gradients, the others in E without, all in
  training mode; the head is trained through z_m):
    L = mean_b (1/C) (-w1 + w2 softmax(F_{E-m})[y]) log softmax(z_m)[y]
        + alpha MSE(softmax z_m, softmax z_p)   (from stage 1 on),
  F_{E-m} = F over E without m, detached; while that is empty the official softmax runs over one
  constant column, so the weight is -w1 + w2. z_p is the learner of the previous stage's
  modality (`train.py`: the other one; `train_MSA.py`: text <- audio, visual <- text,
  audio <- visual). The official code detaches both sides of the MSE, so the term has no
  gradient and only shows in its log ("GA Loss"; here the figure `consolidation`);
  `consolidation_grad: true` lets the gradient flow through z_m instead [ours].
- Rectification: CE(F_E, y) over E, training E's encoders, the head and b.
- Logged: train_loss is CE(F_E, y) in both phases (during boosting, E with the learner, before
  its step); `boost_loss` and `consolidation` in boosting epochs; `boost_rate` each epoch.

Prediction is the model's fusion head: sum_m z_m (concat, sum) or its mean (late, shared with
fixed equal weights), whose argmax is the official b sum_{k in E} z_k's while b > 0 and every
modality is in E. Defaults: w1 5, w2 1, alpha 0.5, b 1.0, 4 + 4 epochs (train.py's argparse,
the README's CREMA-D command; the README sets w1 4 for AVE and ModelNet40, train_MSA.py w1 1,
w2 0.25).

DDP: nothing is reduced: every loss (boosting, consolidation, CE) is a batch mean of per-sample
terms, so the gradients averaged over the ranks in `StepTools.step` are the global batch's; the
schedule depends on the epoch only, so every rank trains the same learner.

Deviations [ours]:
- a stage is boost_epochs + rectify_epochs engine epochs, and the engine evaluates per epoch;
  the official code tests after each stage: set train.eval_every to the stage length (the
  recipes do). It keeps its best model only from stage 3 on.
- one optimizer: the official code builds a new SGD per phase (momentum reset; boosting over
  the learner's network with the shared head, rectification over E's networks, the head and b,
  `--m_lr` = `--e_lr`), here the engine's optimizer keeps its state across phases. Parameters
  without a gradient are not stepped, so the same ones move, except that the concat head is one
  Linear whose other modalities' columns get a zero gradient (so weight decay and momentum) in a
  boosting step. Its lr schedule (CREMA-D x0.1 every 30 stages, AVE x0.5 at stage 40, none in
  train_MSA.py) is the recipe's scheduler counted in epochs.
- the head: official `common_space` (default on) applies one head, Linear(512, 256)-ReLU-
  Linear(256, C) (`Head`; `MHead` Linear(128, 3) for MSA), to every modality: mmval's `shared`
  fusion with `hidden: 256` and fixed equal weights (the CREMA-D and Kinetics-Sounds recipes;
  the small-feature recipes keep one Linear, as `MHead`); `common_space` off (a linear head per
  modality) is mmval's `sum`.
- with `--use_pretrain`, a modality not yet boosted keeps its unimodal checkpoint's own head
  in the official ensemble (its `fc` is replaced by the shared head only when its first stage
  starts, and `DynamicNet.parameters` leaves `fc` out of rectification); here every modality's
  logits come from the shared head from stage 0.
- without `full_ensemble`, evaluation in the first M - 1 stages also reads the modalities not
  yet in E (their encoders untrained), where the official test reads E only. In training their
  encoders are not run (zero features, logits unused).
- z_p is taken from the ensemble's forward; the official code runs the previous learner a second
  time (one more BatchNorm statistics update).
- `train_MSA.py` as released passes dataset "MSA" to `schedule_model`, which knows "MOSEI" only;
  its three-modality order is read from that branch.

BalanceBenchmark's port differs from the official code in: T_epochs (1) boosting then T_epochs
rectification epochs per modality (`boost_epochs: 1, rectify_epochs: 1`); b init 0.01
(`boost_rate: 0.01`); every modality in the ensemble from the start (`full_ensemble: true`); the
consolidation term from its epoch 1 (stage M) on, with no gradient either way, so only its log
differs (not reproduced); a modulation window (0-80) whose outside branch reads an undefined
`loss`, so it cannot run: left out, as for MLA.

DDP: nothing is reduced: both phases' losses are batch means of per-sample terms, and the step
goes through `StepTools`, so the gradients (b's included) averaged over the ranks are the
global batch's; the phase follows the epoch, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, StepResult, StepTools, TrainContext
from mmval.methods.linear_probe import load_encoder
from mmval.models import ModelConfig
from mmval.models.fusions.shared import SharedFusionConfig
from mmval.settings import ADDED_LATER

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
    from mmval.models.method_modules import BoostRate
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")
    nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class Phase:
    """Where an epoch falls in the schedule."""

    stage: int
    learner: str  # the modality whose learner this stage boosts
    previous: str | None  # the previous stage's modality (consolidation); None in stage 0
    boosting: bool  # else global rectification
    ensemble: tuple[str, ...]  # learners in F: during boosting without `learner`


class ReconBoostConfig(MethodConfig):
    fusion: ClassVar[str] = "shared"
    fusion_settings: ClassVar[dict[str, Any]] = {"inference": "fixed"}  # equal weights
    min_modalities: ClassVar[int] = 2
    name: Literal["reconboost"] = "reconboost"
    source: ClassVar[str] = "huacong/ReconBoost@14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932"
    weight1: float = Field(default=5.0, description="w1, weight of the plain log-likelihood (5)")
    weight2: float = Field(default=1.0, description="w2, weight of the ensemble-weighted term (1)")
    alpha: float = Field(default=0.5, ge=0, description="weight of the consolidation term (0.5)")
    boost_epochs: int = Field(
        default=4, ge=1, description="boosting epochs per stage (official epochs_per_stage 4)"
    )
    rectify_epochs: int = Field(
        default=4, ge=0, description="global rectification epochs per stage (correct_epoch 4)"
    )
    boost_rate: float = Field(
        default=1.0, gt=0, description="initial ensemble scale b, learned (official 1.0)"
    )
    full_ensemble: bool = Field(
        default=False,
        description="every modality in the ensemble from stage 0 (official --use_pretrain, "
        "BalanceBenchmark); off: a modality joins after its first boosting phase",
    )
    pretrained: Annotated[dict[str, Path] | None, ADDED_LATER] = Field(
        default=None,
        description="modality -> checkpoint (.pt) of a finished unimodal run whose encoder "
        "initialises that modality's learner (official --use_pretrain, --m1ckpt/--m2ckpt); "
        "none: from scratch",
    )
    consolidation_grad: bool = Field(
        default=False,
        description="let the consolidation term's gradient reach the learner [ours]; official: "
        "both sides detached, so it is only logged",
    )

    def phase(self, epoch: int, modalities: Sequence[str]) -> Phase:
        """The stage, learner and ensemble of a 0-based epoch."""
        stage, within = divmod(epoch, self.boost_epochs + self.rectify_epochs)
        learner = modalities[stage % len(modalities)]
        boosting = within < self.boost_epochs
        # E once this stage's learner joins: the modalities boosted so far (from scratch)
        joined = modalities if self.full_ensemble else modalities[: stage + 1]
        ensemble = tuple(m for m in joined if not (boosting and m == learner))
        previous = modalities[(stage - 1) % len(modalities)] if stage > 0 else None
        return Phase(stage, learner, previous, boosting, ensemble)

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        fusion = model.fusion
        summed = fusion is None or fusion.additive or fusion.name == "late"
        shared_mean = (
            isinstance(fusion, SharedFusionConfig)
            and fusion.inference == "fixed"
            and (fusion.weights is None or len(set(fusion.weights.values())) == 1)
        )
        if fusion is not None and not (summed or shared_mean):
            found.append(
                (
                    "model.fusion",
                    f"reconboost needs fused logits that sum per-modality learners; {fusion.name} "
                    "fusion does not (use shared with inference fixed and equal weights, "
                    "concat, sum or late)",
                )
            )
        if model.mmtm is not None:
            found.append(
                ("model.mmtm", "reconboost trains one encoder at a time; MMTM couples them")
            )
        given = self.pretrained
        if given is not None and modalities is not None and set(given) != set(modalities):
            found.append(
                (
                    "method.pretrained",
                    f"needs one unimodal checkpoint per modality {modalities}, got {sorted(given)}",
                )
            )
        return found


def boosting_loss(
    z_learner: torch.Tensor,
    others: torch.Tensor | None,
    label: torch.Tensor,
    w1: float,
    w2: float,
) -> torch.Tensor:
    """mean_b (1/C) (-w1 + w2 softmax(others)[y]) log softmax(z_learner)[y]; `others` is the
    (scaled) ensemble without the learner, None while it is empty (weight -w1 + w2)."""
    log_p = z_learner.log_softmax(1).gather(1, label[:, None]).squeeze(1)
    if others is None:
        q = torch.ones_like(log_p)
    else:
        q = others.detach().softmax(1).gather(1, label[:, None]).squeeze(1)
    return ((-w1 + w2 * q) * log_p).mean() / z_learner.shape[1]


def consolidation_loss(
    z_learner: torch.Tensor, z_previous: torch.Tensor, grad: bool
) -> torch.Tensor:
    """MSE(softmax z_learner, softmax z_previous), z_previous detached, and z_learner too unless
    `grad` (as the official code, which detaches both)."""
    z = z_learner if grad else z_learner.detach()
    return F.mse_loss(z.softmax(1), z_previous.detach().softmax(1))


class ReconBoost(Method):
    Config: ClassVar[type[MethodConfig]] = ReconBoostConfig
    config: ReconBoostConfig
    boost: BoostRate

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        """The scale b; with `pretrained`, each encoder loaded from its unimodal checkpoint (a
        resumed run reads the files again, then its checkpoint's weights replace them)."""
        from mmval.models.method_modules import BoostRate

        pretrained = self.config.pretrained
        if pretrained is not None:
            missing = [m for m in model.modalities if m not in pretrained]
            if missing:
                raise UserError(
                    f"method.pretrained: give one unimodal checkpoint (the best.pt of a "
                    f"unimodal run) per modality of the model ({', '.join(model.modalities)}); "
                    f"missing: {', '.join(missing)}."
                )
            for m in model.modalities:
                load_encoder(pretrained[m], m, model.encoders[m], f"method.pretrained.{m}")
        self.boost = BoostRate(self.config.boost_rate)
        return nn.ModuleDict({"boost_rate": self.boost})

    @staticmethod
    def _logits(
        model: MultimodalModel, batch: Batch, trained: Sequence[str], frozen: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Per-modality logits with encoder gradients for `trained` only; the modalities in
        neither list are not run (zero features: the fusion head wants every modality)."""
        feats = {m: model.encoders[m](batch.inputs[m]) for m in trained}
        with torch.no_grad():
            feats |= {m: model.encoders[m](batch.inputs[m]) for m in frozen}
        ref = next(iter(feats.values()))
        for m in model.modalities:
            if m not in feats:
                feats[m] = ref.new_zeros(len(ref), model.feature_dims[m])
        return model.fusion.unimodal_logits(feats)

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        cfg = self.config
        now = cfg.phase(ctx.epoch, model.modalities)
        rate = self.boost.rate
        figures: dict[str, float] = {}
        with tools.autocast():
            if now.boosting:
                logits = self._logits(model, batch, [now.learner], now.ensemble)
                z = logits[now.learner]
                others = (
                    rate.detach() * torch.stack([logits[m] for m in now.ensemble]).sum(0)
                    if now.ensemble
                    else None
                )
                loss = boosting_loss(z, others, batch.label, cfg.weight1, cfg.weight2)
                figures["boost_loss"] = float(loss.detach())
                if now.previous is not None:
                    kept = consolidation_loss(z, logits[now.previous], cfg.consolidation_grad)
                    figures["consolidation"] = float(kept.detach())
                    loss = loss + cfg.alpha * kept
                ensemble = rate.detach() * z.detach() + (0 if others is None else others.detach())
            else:
                logits = self._logits(model, batch, now.ensemble, [])
                ensemble = rate * torch.stack([logits[m] for m in now.ensemble]).sum(0)
                loss = F.cross_entropy(ensemble, batch.label)
            ce = F.cross_entropy(ensemble.detach(), batch.label)
        tools.zero_grad()
        loss.backward()
        tools.step()
        return StepResult(ce, ensemble.detach(), figures)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        return {"boost_rate": float(self.boost.rate.detach())}
