"""What a valuation computes: method, masking, benefit (shared by `mmval value` and recipes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmval.errors import UserError

if TYPE_CHECKING:  # the report reads valuation configs without importing torch
    from mmval.tasks import Task
from mmval.validation import problems_of

MethodName = Literal["shapley", "shapley-mc", "cmob"]
MaskName = Literal["feature", "input", "mean"]
BenefitName = Literal["correct", "prob", "abs_error", "acc2", "dice"]
ConfidenceName = Literal["subsets", "treatment"]
ConfidenceScore = Literal["max_softmax", "true_class"]
DEFAULT_PERMUTATIONS = 100
# cmob: a reading that does not degenerate at M > 2 (mmval/valuation/cmob.py), and the poster's
# Conf(F(x)), the classifier's confidence
DEFAULT_CONFIDENCE: ConfidenceName = "treatment"
DEFAULT_CONFIDENCE_SCORE: ConfidenceScore = "max_softmax"


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
    benefit: BenefitName | None = Field(
        default=None,
        description="what v(S) is; unset, the task's first. Classification and localisation "
        "(per segment, averaged): correct (|S| if the prediction from S is right, else 0) or "
        "prob (probability of the true class); regression: abs_error (minus the absolute "
        "error) or acc2 (|S| if the sign is right); segmentation: dice (mean Dice of WT, TC, "
        "ET)",
    )
    confidence: ConfidenceName | None = Field(
        default=None,
        description=f"cmob only (default {DEFAULT_CONFIDENCE}): which subsets the confidence "
        "condition of B compares; subsets: B(T) needs T at least as confident as every "
        "evaluated proper subset of T; treatment: in ITE_j, B(S) needs S at least as confident "
        "as S minus j only, and the smaller sets are unconditioned (both [ours])",
    )
    confidence_score: ConfidenceScore | None = Field(
        default=None,
        description=f"cmob only (default {DEFAULT_CONFIDENCE_SCORE}): what Conf(F(x)) is; "
        "max_softmax: the largest softmax probability (the classifier's confidence); "
        "true_class: the probability of the label",
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
        if self.method != "cmob":
            for name in ("confidence", "confidence_score"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to method cmob only")
        return self

    @model_validator(mode="before")
    @classmethod
    def _stored_confidence(cls, data: Any) -> Any:
        """Recipes stored before `confidence` became optional hold `confidence: subsets` (the
        old default) whatever the method: read it as unset for methods other than cmob."""
        if (
            isinstance(data, dict)
            and data.get("method", "shapley") != "cmob"
            and data.get("confidence") == "subsets"
        ):
            return {k: v for k, v in data.items() if k != "confidence"}
        return data

    def for_task(self, task: Task) -> ValuationConfig:
        """This config with the benefit resolved for `task` (refused when undefined there)."""
        if self.method == "cmob" and task.kind != "classification":
            raise UserError(
                f"cmob's benefit is conditioned on the classifier's confidence; the {task.kind} "
                "task has none: use --method shapley or shapley-mc."
            )
        if self.benefit is None:
            return self.model_copy(update={"benefit": task.default_benefit()})
        task.check_benefit(self.benefit)
        return self

    @property
    def resolved_benefit(self) -> str:
        """The benefit of a config passed through `for_task`."""
        assert self.benefit is not None, "call for_task first"
        return self.benefit

    @property
    def n_permutations(self) -> int:
        return self.permutations if self.permutations is not None else DEFAULT_PERMUTATIONS

    @property
    def rng_seed(self) -> int:
        return self.seed if self.seed is not None else 0

    @property
    def cmob_confidence(self) -> ConfidenceName:
        return self.confidence if self.confidence is not None else DEFAULT_CONFIDENCE

    @property
    def cmob_confidence_score(self) -> ConfidenceScore:
        score = self.confidence_score
        return score if score is not None else DEFAULT_CONFIDENCE_SCORE


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
