"""CMoB causal contribution (Wang et al., NeurIPS 2025) (`--method cmob`).

For sample i and modality j, with S the full set of modalities:
    ITE_j = B(S) - B(S minus j),   Phi_j = ITE_j + B({j}),
where B is the confidence-conditioned benefit: B(T) = |T| if the prediction from T is correct
and no evaluated proper subset of T is more confident, else 0. A sample costs 2M + 1 subset
evaluations (the full set, the M leave-one-out sets, the M singletons). Without the condition,
Phi is twice the Shapley value for M = 2. Modality j is weak for sample i when Phi_j <= 1.

Ambiguities of the poster and how this reads them (see docs/methods.md#cmob):
- Conf is the softmax probability of the true class (for a correct prediction, the maximum).
- "Conf(C) <= Conf(T) for subsets C of T" is checked against the proper, non-empty subsets of T
  that are evaluated for the sample anyway: for the full set, every leave-one-out set and every
  singleton; for a leave-one-out set, the singletons inside it; for a singleton it is vacuous.
  Ties pass (the poster's <=). With many modalities this reading rarely grants the full set its
  benefit (some leave-one-out set is almost always more confident: on six views nearly every
  modality of every sample comes out weak), so `confidence: treatment` offers a second reading:
  in ITE_j the condition compares S with S minus j only (adding j must not lower the
  confidence, Proposition 1 applied to the treatment itself), and B(S minus j), B({j}) are
  unconditioned. At M = 2 the two readings differ only in which singleton S is compared with.
- Removing a modality follows `--mask` (feature zeroing by default, as the Shapley method that
  CMoB compares with does).
- `--benefit prob` replaces |T| by the probability of the true class and keeps the confidence
  condition, so Phi stays "ITE + own value" of one benefit; with M = 1 the leave-one-out set is
  empty and B(empty) is 0 under `correct` and the probability with everything removed under
  `prob`, as in the Shapley methods.
- The contributions do not sum to v_full (= B(S)): CMoB is not an efficient allocation.
"""

from __future__ import annotations

import torch

from mmval.valuation.base import BatchValues, Game, ValuationMethod
from mmval.valuation.config import ValuationConfig


class CMoB(ValuationMethod):
    name = "cmob"

    def __init__(self, config: ValuationConfig, modalities: list[str]) -> None:
        super().__init__(config, modalities)
        eye = torch.eye(self.m, dtype=torch.bool)
        full = torch.ones(1, self.m, dtype=torch.bool)
        self.masks = torch.cat([full, ~eye, eye])  # [2M + 1, M]: S, S minus j, {j}
        inner = (self.masks[:, None, :] <= self.masks[None, :, :]).all(-1)  # c subset of t
        # below[c, t]: evaluated subset c is a proper, non-empty subset of subset t
        self.below = inner & ~inner.T & self.masks.any(-1)[:, None]

    def value(self, game: Game) -> BatchValues:
        out = game.play(self.masks)
        below = self.below.to(out.confidence.device)
        floor = torch.where(below[:, :, None], out.confidence[:, None, :], -torch.inf)
        confident = out.confidence >= floor.amax(0)  # [2M + 1, B]
        benefit = torch.where(confident, out.benefit, 0.0)
        if self.config.confidence == "treatment":
            plain = out.benefit
            gain = out.confidence[0][None] >= out.confidence[1 : self.m + 1]  # [M, B]
            full = torch.where(gain, plain[0][None], 0.0)
            without, alone = plain[1 : self.m + 1], plain[self.m + 1 :]
            phi = (full - without + alone).T
            return BatchValues(contribution=phi, v_full=plain[0], pred=out.pred[0])
        full, without, alone = benefit[0], benefit[1 : self.m + 1], benefit[self.m + 1 :]
        phi = (full[None] - without + alone).T
        return BatchValues(contribution=phi, v_full=full, pred=out.pred[0])
