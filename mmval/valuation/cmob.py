"""CMoB causal contribution (Wang et al., NeurIPS 2025) (`--method cmob`).

For sample i and modality j, with S the full set of modalities (the poster: the control is
S(x_i), the treatment removes x_i^j):
    ITE_j = B(S) - B(S minus j),   Phi_j = ITE_j + B({j}),
where B is the poster's confidence-conditioned benefit (its Eq. 1): B(T) = |T| if the prediction
from T is correct and Conf(F(x^C)) <= Conf(F(x^T)) for the subsets C of T (Proposition 1:
adding modalities must not lower the confidence), else 0. A sample costs 2M + 1 subset
evaluations (the full set, the M leave-one-out sets, the M singletons). Without the condition,
Phi is twice the Shapley value for M = 2. Modality j is weak for sample i when Phi_j <= 1 [3rd].
Phi takes the values -(M - 1) .. M + 1 under `benefit: correct`.

Ambiguities of the poster and how this reads them (see docs/methods.md#cmob):
- Conf (`confidence_score`): `max_softmax` (default) is the classifier's confidence, the
  largest softmax probability, as the poster writes Conf(F(x)); `true_class` [ours, the earlier
  default] is the probability of the label. They differ only for a wrong subset C: a confidently
  wrong C blocks T under max_softmax and not under true_class. For T itself the condition
  matters only when T is right, where both are the same number.
- Which subsets C (`confidence`) [ours, both]. `subsets` (the literal reading): the proper,
  non-empty subsets of T that are evaluated for the sample anyway: for the full set every
  leave-one-out set and every singleton, for a leave-one-out set the singletons inside it, for
  a singleton none. Ties pass (the poster's <=). `treatment` (default): in ITE_j the condition
  compares S with S minus j only (adding j must not lower the confidence: Proposition 1 applied
  to the treatment itself), and B(S minus j), B({j}) are unconditioned. At M = 2 the two differ
  only in which singleton S is compared with. The literal reading degenerates as M grows: S
  must be at least as confident as all 2M smaller sets, and when it is not, B(S) = 0 and
  Phi_j = B({j}) - B(S minus j) <= 1 for every j: all the sample's modalities are weak. Measured
  (`python bench/cmob_weak.py`, bench/results/cmob_weak.json: concat trained 5 epochs, CMoB's
  first valuation, on the first M views of uci-mfeat, seed 0; share of weak modalities per
  correctly classified training sample, and in brackets the share of those samples with every
  modality weak, i.e. uniform masks), both with max_softmax:
      M = 2: subsets 0.34 (0.16), treatment 0.27 (0.01)
      M = 3: subsets 0.46 (0.25), treatment 0.33 (0.00)
      M = 4: subsets 0.54 (0.36), treatment 0.33 (0.00)
      M = 6: subsets 0.67 (0.49), treatment 0.41 (0.00)
  After 20 epochs M = 6 reads 0.66 (0.45) and 0.44 (0.00); seed 1 is within 0.07. On the
  imbalanced synthetic pair of the README (M = 2, fast/slow; 21 % of the training samples
  misclassified at epoch 5): subsets 0.53 (0.31), treatment 0.41 (0.08); with true_class
  0.46 (0.23) and 0.34 (0.00). On uci-mfeat the two scores agree to 0.01 (the views are right
  or unsure, rarely confidently wrong).
- Removing a modality follows `--mask` (feature zeroing by default, as the Shapley method that
  CMoB compares with does).
- `--benefit prob` replaces |T| by the probability of the true class and keeps the confidence
  condition, so Phi stays "ITE + own value" of one benefit; with M = 1 the leave-one-out set is
  empty and B(empty) is 0 under `correct` and the probability with everything removed under
  `prob`, as in the Shapley methods.
- A sample whose full-set prediction is wrong has B(S) = 0, so Phi_j = B({j}) - B(S minus j)
  <= 1: every modality is weak. The deficit still tells them apart: a modality whose removal
  makes the prediction right gets Phi <= 2 - M.
- The contributions do not sum to v_full (= B(S)): CMoB is not an efficient allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmval.lazy import lazy_module
from mmval.valuation.base import BatchValues, Game, ValuationMethod
from mmval.valuation.config import ValuationConfig

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


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
        out = game.play(self.masks, confidences=True)
        conf = out.top if self.config.cmob_confidence_score == "max_softmax" else out.confidence
        if self.config.cmob_confidence == "treatment":
            plain = out.benefit
            gain = conf[0][None] >= conf[1 : self.m + 1]  # [M, B]
            full = torch.where(gain, plain[0][None], 0.0)
            without, alone = plain[1 : self.m + 1], plain[self.m + 1 :]
            phi = (full - without + alone).T
            return BatchValues(contribution=phi, v_full=plain[0], pred=out.pred[0])
        below = self.below.to(conf.device)
        floor = torch.where(below[:, :, None], conf[:, None, :], -torch.inf)  # [c, t, B]
        benefit = torch.where(conf >= floor.amax(0), out.benefit, 0.0)
        full, without, alone = benefit[0], benefit[1 : self.m + 1], benefit[self.m + 1 :]
        phi = (full[None] - without + alone).T
        return BatchValues(contribution=phi, v_full=full, pred=out.pred[0])
