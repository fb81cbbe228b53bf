"""QMF: quality-aware multimodal fusion with energy confidences trained by a ranking loss.

Paper: Zhang, Wu, Zhang, Zhu, Hu, Zhou, Peng, "Provable Dynamic Fusion for Low-Quality
Multimodal Data", ICML 2023. Follows the official code (QingyangZhang/QMF, commit
fe6c4c6ef7cb23f0a89594ee413d485f1854268b, `text-image-classification/train_qmf.py`:
`model_forward`, `rank_loss`; `History` of `src/utils/utils.py`; `src/models/late_fusion.py`
with `df=True`); spec: docs/methods.md#qmf.

What it changes: the head and the loss. The `qmf` fusion (mmval/models/fusions/qmf.py) gives each
modality its own head z_m and predicts z = sum_m sg(w_m) z_m, w_m = logsumexp(z_m) / 10. The
loss is CE(z) + sum_m CE(z_m) + rank_weight * sum_m L_rank,m. The weight is 1 in
`train_qmf.py` (an unweighted sum; the config default) and in `RGBD-scene-recognition/
train_QMF_sun.py` (`--lamb 1`), 0.1 in `train_QMF_nyud2.py` (`--lamb 0.1`) and in the
audio-visual CREMA-D run of QMF that MLA's official code ships (Cecile-hi/Multimodal-Learning-
with-Alternating-Unimodal-Adaptation, commit ab6c184579f9ff390e9c9b8216c9900c2a43545b, README's
QMF command, `main.py` `train_epoch`: `cml_loss + clf_loss + 0.1 * crl_loss`), which the
CREMA-D and Kinetics-Sounds recipes follow. Each modality keeps a history
H_m[i] of the summed per-sample cross-entropy of training sample i (position in the train split,
`batch.index`), updated before the rank loss on every visit. L_rank pairs sample i with the next
one in the batch (j = roll(i, -1)); with H normalised over the whole split to [0, 1],
t = sign(H_i - H_j) and delta = |H_i - H_j|, it is MarginRankingLoss(0)(w_i, w_j + delta / t',
-t), t' = t with zeros read as 1: a sample with the larger past loss must not have the larger
confidence by more than delta.

Deviations: the history grows to the largest position seen instead of being sized from the
dataset up front; the official zero-initialised array has minimum 0 until every sample has been
visited once, so the minimum is taken as 0 until the first epoch ends (on its very last batch
the official minimum is already the smallest loss). Where the history is constant (max = min)
the normalised values are 0 instead of the official 0/0. The confidence history the official
`History` also stores is never read there, and is not kept.

M > 2: native (one head, confidence, history and rank loss per modality).

DDP: every rank records the whole global batch (its positions and per-sample losses are
gathered from all ranks), so the histories, and their normalisation, are the same everywhere.
The confidences are gathered with their gradients (`gather_rows_with_grad`): each rank takes
the ranking terms of its own samples, paired with their successors in the global batch, so the
averaged gradient is the one-process gradient of the global batch's ranking loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.distributed import gather_rows, gather_rows_with_grad
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class QMFConfig(MethodConfig):
    fusion: ClassVar[str] = "qmf"
    fusions: ClassVar[tuple[str, ...] | None] = ("qmf",)
    min_modalities: ClassVar[int] = 2
    name: Literal["qmf"] = "qmf"
    source: ClassVar[str] = "QingyangZhang/QMF@fe6c4c6ef7cb23f0a89594ee413d485f1854268b"
    rank_weight: float = Field(
        default=1.0, ge=0, description="weight of the ranking loss (official 1, unweighted sum)"
    )


def normalise_history(values: torch.Tensor, history: torch.Tensor, complete: bool) -> torch.Tensor:
    """(values - min) / (max - min) over the whole history; min is 0 while unvisited samples
    remain (the official zero-initialised array)."""
    low = history.min() if complete else history.new_zeros(())
    span = history.max() - low
    if span <= 0:
        return torch.zeros_like(values)
    return (values - low) / span


def rank_loss(
    confidence: torch.Tensor,
    past: torch.Tensor,
    past_next: torch.Tensor,
    rows: slice = slice(None),
) -> torch.Tensor:
    """QMF's ranking loss for confidences [B] paired with roll(-1), given the normalised
    histories of the samples and of their partners; the mean over `rows` (a rank's samples)."""
    target = torch.sign(past - past_next).to(confidence.dtype)
    margin = (past - past_next).abs().to(confidence.dtype)
    nonzero = torch.where(target == 0, torch.ones_like(target), target)
    partner = torch.roll(confidence, -1) + margin / nonzero
    return F.margin_ranking_loss(confidence[rows], partner[rows], -target[rows], margin=0.0)


class QMF(Method):
    Config: ClassVar[type[MethodConfig]] = QMFConfig
    config: QMFConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.history = torch.zeros(0, 0, dtype=torch.float64)  # [M, N], on the CPU
        self.complete = False  # every training sample has been visited

    def record(self, index: torch.Tensor, losses: torch.Tensor) -> None:
        """Add per-sample losses [M, B] (detached) to the history at positions `index` [B]."""
        size = int(index.max()) + 1
        if size > self.history.shape[1] or self.history.shape[0] != losses.shape[0]:
            grown = torch.zeros(losses.shape[0], size, dtype=torch.float64)
            grown[: self.history.shape[0], : self.history.shape[1]] = self.history
            self.history = grown
        self.history.index_put_(
            (torch.arange(losses.shape[0])[:, None], index[None, :]),
            losses.to(torch.float64),
            accumulate=True,
        )

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        fusion = model.fusion
        from mmval.models.fusions.heads import QMFFusion

        assert isinstance(fusion, QMFFusion) and out.unimodal_logits is not None
        logits = [out.unimodal_logits[m] for m in model.modalities]
        unimodal = torch.stack([F.cross_entropy(z, batch.label, reduction="none") for z in logits])
        index = gather_rows(batch.index.cpu())  # DDP: the global batch, in rank order
        self.record(index, gather_rows(unimodal.detach().float().cpu().T).T)
        total = F.cross_entropy(out.logits, batch.label) + unimodal.mean(1).sum()
        for m, z in enumerate(logits):
            past = normalise_history(self.history[m, index], self.history[m], self.complete)
            past = past.to(z.device)
            confidence, offset = gather_rows_with_grad(fusion.confidence(z))
            total = total + self.config.rank_weight * rank_loss(
                confidence, past, torch.roll(past, -1), slice(offset, offset + len(batch))
            )
        return total

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        self.complete = True
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "complete": self.complete}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"].clone()
        self.complete = bool(state["complete"])
