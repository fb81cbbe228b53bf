"""The fusion heads (torch modules), apart from their configs so that reading a recipe does not
import torch: each fusion's file in this package holds its config, whose `source` names the
official code the head follows, and whose `build` imports its head from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmval.errors import UserError

if TYPE_CHECKING:
    from mmval.models.fusions.shared import InferenceName


class SumFusion(nn.Module):
    """z = sum_m (W_m h_m + b_m), one linear head per modality."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: head(feats[m]) for m, head in self.heads.items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).sum(0)


class ConcatFusion(nn.Module):
    """z = W[h_1; ...; h_M] + b; modality m's share is W[:, slice_m] h_m + b / M (OGM-GE code)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.names = list(dims)
        self.dims = [dims[m] for m in self.names]
        self.fc = nn.Linear(sum(self.dims), num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([feats[m] for m in self.names], dim=1))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.split(self.fc.weight, self.dims, dim=1)
        bias = self.fc.bias / len(self.names)
        return {m: feats[m] @ w.T + bias for m, w in zip(self.names, weights, strict=True)}


class LateFusion(SumFusion):
    """Decision fusion: one head per modality, z = (1/M) sum_m z_m (the logit average of
    late fusion / UME-style ensembles)."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).mean(0)


class WeightedFusion(SumFusion):
    """z = sum_m softmax(w)_m (W_m h_m + b_m) with learnable w (init 0). Our own definition:
    neither the official code nor BalanceBenchmark defines a 'weighted' fusion."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.mix = nn.Parameter(torch.zeros(len(dims)))

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.softmax(self.mix, 0)
        return {
            m: w * head(feats[m]) for w, (m, head) in zip(weights, self.heads.items(), strict=True)
        }


class QMFFusion(SumFusion):
    """QMF (Zhang et al., ICML 2023; QingyangZhang/QMF `src/models/late_fusion.py`, `df=True`):
    one head per modality, z = sum_m sg(w_m) z_m with the energy confidence
    w_m = logsumexp(z_m) / T, T = 10 as hard-coded there (sg: no gradient through w_m)."""

    temperature = 10.0

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """w [B] of one modality's logits [B, C] (with gradient; the rank loss trains it)."""
        return torch.logsumexp(logits, dim=1) / self.temperature

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.unimodal_logits(feats).values()
        return torch.stack([self.confidence(z).detach()[:, None] * z for z in logits]).sum(0)


class FiLMFusion(nn.Module):
    """FiLM (Perez et al. 2018): the first modality conditions the second,
    [gamma; beta] = Linear(h_x), z = Linear(gamma * h_y + beta)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.x_name, self.y_name = list(dims)
        self.film = nn.Linear(dims[self.x_name], 2 * dims[self.y_name])
        self.fc = nn.Linear(dims[self.y_name], num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(feats[self.x_name]).chunk(2, dim=1)
        return self.fc(gamma * feats[self.y_name] + beta)


class GatedFusion(nn.Module):
    """Gated fusion (Kiela et al. 2018): z = Linear(sigmoid(Linear(h_x)) * Linear(h_y))."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int) -> None:
        super().__init__()
        self.x_name, self.y_name = list(dims)
        self.gate = nn.Linear(dims[self.x_name], hidden)
        self.value = nn.Linear(dims[self.y_name], hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(feats[self.x_name]))
        return self.fc(gate * self.value(feats[self.y_name]))


class CosineFusion(nn.Module):
    """MMCosine (Xu et al., ICASSP 2023; GeWu-Lab/MMCosine_ICASSP23 `main_CD.py`): each
    modality's logits are s * cos(h_m, w_{m,c}) against its slice of a bias-free concat head,
    z = sum_m z_m; features and weights are L2-normalised so no modality wins by norm."""

    def __init__(self, dims: dict[str, int], num_classes: int, scale: float) -> None:
        super().__init__()
        self.names = list(dims)
        self.dims = [dims[m] for m in self.names]
        self.fc = nn.Linear(sum(self.dims), num_classes, bias=False)
        self.scale = scale

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = torch.split(self.fc.weight, self.dims, dim=1)
        return {
            m: self.scale * F.normalize(feats[m], dim=1) @ F.normalize(w, dim=1).T
            for m, w in zip(self.names, weights, strict=True)
        }

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).sum(0)


class SharedFusion(nn.Module):
    """MLA (Zhang et al., CVPR 2024): one linear head H shared by all modalities, z_m = H(h_m),
    so every encoder must give features of the same size. Prediction z = sum_m lambda_m z_m with
    - `fixed`: fixed lambda (official `--av_alpha`; 1/M by default);
    - `dynamic`: per-sample weights lambda_m = softmax_m(-entropy(softmax(z_m))), the official
      exp(max_k e_k - e_m) / sum_j exp(max_k e_k - e_j) computed per sample, as
      BalanceBenchmark's `MLA_trainer.py` does;
    - `dynamic_batch`: the official weights as released (`--dynamic`; main.py
      `calculate_entropy` and `calculate_gating_weights(3)`, Cecile-hi/Multimodal-Learning-with-
      Alternating-Unimodal-Adaptation at ab6c184579f9ff390e9c9b8216c9900c2a43545b): one weight
      per modality for the whole batch, from e_m = -sum_{i,c} p_ic log p_ic where p is the
      softmax of the batch's logits [B, C] over the batch axis (`F.softmax(output, dim=0)`),
      not the mean of the per-sample weights. A prediction then depends on the other samples of
      its evaluation batch (`train.eval_batch_size`; official: the training batch size, in test
      order), and under DDP on each rank's share; in valuation the pooled weights mix the
      evaluated coalitions, so `dynamic` is the one to value.

    H is one Linear (MLA), or with `hidden` Linear(d, hidden)-ReLU-Linear(hidden, C), the head
    ReconBoost's official code shares between its modalities (huacong/ReconBoost, commit
    14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932, `models/dynamic_net.py` `Head`: hidden 256)."""

    def __init__(
        self,
        dims: dict[str, int],
        num_classes: int,
        weights: dict[str, float] | None,
        inference: InferenceName,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.names = list(dims)
        if len(set(dims.values())) != 1:
            sizes = ", ".join(f"{m} {d}" for m, d in dims.items())
            raise UserError(
                f"model.fusion: shared fusion applies one head to every modality, so all "
                f"encoders need the same out_dim; they give {sizes} (set model.encoder.out_dim "
                "or the out_dim of each model.encoders entry)."
            )
        if weights is not None and (inference != "fixed" or set(weights) != set(self.names)):
            raise UserError(
                "model.fusion.weights: give one weight per modality "
                f"({', '.join(self.names)}), with model.fusion.inference: fixed."
            )
        self.inference = inference
        fixed = weights or dict.fromkeys(self.names, 1 / len(self.names))
        self.weights = [fixed[m] for m in self.names]
        width = dims[self.names[0]]
        self.fc = (
            nn.Linear(width, num_classes)
            if hidden is None
            else nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        )

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.fc(feats[m]) for m in self.names}

    def lambdas(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fusion weights [M, B]."""
        z = torch.stack([logits[m] for m in self.names])
        if self.inference == "fixed":
            weights = torch.tensor(self.weights, dtype=z.dtype, device=z.device)
            return weights[:, None].expand(z.shape[:2])
        if self.inference == "dynamic":
            p, logp = z.softmax(-1), z.log_softmax(-1)
            return torch.softmax((p * logp).sum(-1), dim=0)  # softmax of minus the entropy
        # official: softmax over the batch axis, entropy summed over samples and classes
        p, logp = z.softmax(1), z.log_softmax(1)
        return torch.softmax((p * logp).sum((1, 2)), dim=0)[:, None].expand(z.shape[:2])

    def combine(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        z = torch.stack([logits[m] for m in self.names])
        return (self.lambdas(logits)[..., None] * z).sum(0)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.combine(self.unimodal_logits(feats))


def combine_evidence(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Dempster-Shafer combination of two subjective opinions, in evidence form. With
    b_m = e_m / S_m, u_m = C / S_m, TMC's b = (b1 b2 + b1 u2 + b2 u1) / (1 - K),
    u = u1 u2 / (1 - K), e = b C / u reduce exactly to e = e1 + e2 + e1 e2 / C: the
    conflict 1 - K cancels, so nothing is divided by it."""
    return e1 + e2 + e1 * e2 / e1.shape[-1]


class TMCFusion(nn.Module):
    """TMC (Han et al., ICLR 2021; hanmenghan/TMC `TMC ICLR/model.py`): per-modality evidential
    heads e_m = softplus(W_m h_m + b_m), Dirichlet alpha_m = e_m + 1, the opinions folded by
    Dempster-Shafer combination ((1 + 2) + 3) + ... The logits returned, fused and per modality,
    are log(alpha): their argmax is the argmax of the evidence (TMC's prediction) and their
    softmax is alpha / S, the Dirichlet's expected class probabilities."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def evidence(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: F.softplus(head(feats[m]).float()) for m, head in self.heads.items()}

    @staticmethod
    def combine(evidence: list[torch.Tensor]) -> torch.Tensor:
        fused = evidence[0]
        for e in evidence[1:]:
            fused = combine_evidence(fused, e)
        return fused

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: torch.log1p(e) for m, e in self.evidence(feats).items()}

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.log1p(self.combine(list(self.evidence(feats).values())))
