"""What a valuation computes: method, masking, benefit (shared by `mmval value` and recipes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmval.errors import UserError
from mmval.validation import problems_of

MethodName = Literal["shapley", "shapley-mc", "cmob"]
MaskName = Literal["feature", "input", "mean"]
BenefitName = Literal["correct", "prob"]
ConfidenceName = Literal["subsets", "treatment"]
DEFAULT_PERMUTATIONS = 100


class ValuationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: MethodName = Field(
        default="shapley",
        description="shapley: exact over all 2^M subsets (M <= 10); shapley-mc: permutation "
        "sampling; cmob: CMoB causal contribution (ITE + own value)",
    )
    mask: MaskName = Field(
        default="feature",
        description="how a modality is removed: feature (zero its encoder output), input (zero "
        "its raw input), mean (replace its input by the training-split mean)",
    )
    benefit: BenefitName = Field(
        default="correct",
        description="correct: |S| if the prediction from S is right, else 0; prob: probability "
        "of the true class",
    )
    confidence: ConfidenceName = Field(
        default="subsets",
        description="cmob only: subsets: B(T) needs T at least as confident as every evaluated "
        "proper subset of T; treatment: in ITE_j, B(S) needs S at least as confident as S "
        "minus j only, and the smaller sets are unconditioned (both [ours])",
    )
    permutations: int | None = Field(
        default=None, ge=2, description=f"shapley-mc only (default {DEFAULT_PERMUTATIONS})"
    )
    seed: int | None = Field(default=None, description="shapley-mc only (default 0)")

    @model_validator(mode="after")
    def _sampling_options(self) -> ValuationConfig:
        if self.method != "shapley-mc":
            for name in ("permutations", "seed"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to method shapley-mc only")
        if self.method != "cmob" and self.confidence != "subsets":
            raise ValueError("confidence applies to method cmob only")
        return self

    @property
    def n_permutations(self) -> int:
        return self.permutations if self.permutations is not None else DEFAULT_PERMUTATIONS

    @property
    def rng_seed(self) -> int:
        return self.seed if self.seed is not None else 0


class TrainValuationConfig(ValuationConfig):
    """The recipe's `valuation:` section: contributions written every few epochs, so the
    dynamics of modality contribution can be plotted after training."""

    every: int = Field(ge=1, description="epochs between valuations (epochs k, 2k, ...)")
    subset: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="share of the split valued; the same samples every time (drawn from the "
        "run seed)",
    )
    split: Literal["train", "val", "test"] = Field(
        default="train", description="which of data.splits to value (Wei et al. value train)"
    )


def valuation_config(**options: Any) -> ValuationConfig:
    """Validate command-line options, naming the offending --flag in one paragraph."""
    try:
        return ValuationConfig.model_validate(options)
    except ValidationError as exc:
        problems = problems_of(exc, options)
        text = "; ".join(
            f"--{path.replace('_', '-')}: {message}" if path != "(top level)" else message
            for path, message in problems
        )
        raise UserError(f"invalid valuation options: {text}.") from None
