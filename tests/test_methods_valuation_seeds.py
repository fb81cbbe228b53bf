"""Wei et al.'s sample- and modality-level re-sampling and CMoB: tagged sampler entries, the
copy counts and probabilities against hand tables and the official formulas, the CMoB weak
modalities and masks on hand-made tensors, recipe errors, resume, and short training runs on
uci-mfeat (6 modalities) and synthetic audio-visual clips (ResNet-18)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from mmval.data.dataset import (
    Batch,
    BlockShuffleSampler,
    FrameAugment,
    ParquetSamples,
    TaggedPositions,
    decode_entries,
)
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import TrainContext
from mmval.methods.cmob import (
    CMoB,
    CMoBConfig,
    dims_mask,
    mask_input,
    square_mask,
    time_mask,
    token_mask,
)
from mmval.methods.cooperation import copy_entries, drop_entries, kept_modalities
from mmval.methods.mmcooperation_fixed import MMCooperationFixed, MMCooperationFixedConfig
from mmval.methods.mmcooperation_modality import resample_probability
from mmval.methods.mmcooperation_sample import (
    MMCooperationSample,
    MMCooperationSampleConfig,
    copy_counts,
)
from mmval.models import ModelConfig, build_model
from mmval.recipe import load_recipe, parse_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after

# ---------------------------------------------------------------- tagged entries


def _tagged(n_rows: int = 75) -> TaggedPositions:
    rng = np.random.default_rng(3)
    positions = np.concatenate([np.arange(n_rows), rng.integers(0, n_rows, 40)])
    tags = np.concatenate([np.zeros(n_rows, np.int64), rng.integers(1, 7, 40)])
    return TaggedPositions(positions, tags)


def test_sampler_shuffles_positions_and_tags_together_on_the_same_blocks():
    blocks = np.repeat(np.arange(10), 8)[:75]
    entries = _tagged()
    tagged = BlockShuffleSampler(blocks, seed=5, window=2)
    tagged.set_epoch(2)
    tagged.set_positions(entries)
    codes = np.array(list(tagged))
    positions, tags = decode_entries(codes, len(blocks))
    pairs = Counter(zip(entries.positions.tolist(), entries.tags.tolist(), strict=True))
    assert Counter(zip(positions.tolist(), tags.tolist(), strict=True)) == pairs
    assert positions.tolist() != entries.positions.tolist()
    # the same order of positions as the same positions untagged: blocks and windows unchanged
    plain = BlockShuffleSampler(blocks, seed=5, window=2)
    plain.set_epoch(2)
    plain.set_positions(entries.positions)
    assert positions.tolist() == list(plain)
    assert len(tagged) == len(entries.positions)
    # one block per window: each block's entries, copies included, come in one run
    single = BlockShuffleSampler(blocks, seed=5, window=1)
    single.set_positions(entries)
    order = blocks[decode_entries(np.array(list(single)), len(blocks))[0]]
    runs = [b for i, b in enumerate(order.tolist()) if i == 0 or b != order[i - 1]]
    assert sorted(runs) == list(range(10))


def test_tagged_sampler_resumes_mid_epoch_with_the_same_remaining_order():
    blocks = np.repeat(np.arange(10), 8)[:75]
    sampler = BlockShuffleSampler(blocks, seed=1)
    sampler.set_epoch(4)
    sampler.set_positions(_tagged())
    full = list(sampler)
    sampler.advance(33)
    resumed = BlockShuffleSampler(blocks, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    resumed.set_epoch(4)  # the engine's order at an epoch start: epoch, then positions
    resumed.set_positions(_tagged())
    assert list(resumed) == full[33:] and len(resumed) == len(full) - 33


def test_tagged_positions_reject_bad_shapes_and_negative_tags():
    with pytest.raises(ValueError, match="same length"):
        TaggedPositions(np.arange(3), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        TaggedPositions(np.arange(2), np.array([0, -1]))


def test_dataset_decodes_entries_into_index_and_tag(uci_dir):
    data = ParquetSamples(uci_dir, "train", ["pix", "mor"])
    n = len(data)
    positions, tags = np.array([5, 5, 0, 17]), np.array([0, 3, 2, 1])
    batch = data.__getitems__(TaggedPositions(positions, tags).codes(n).tolist())
    plain = data.__getitems__(positions.tolist())
    assert batch.index.tolist() == positions.tolist() and batch.tag.tolist() == tags.tolist()
    assert plain.tag.tolist() == [0, 0, 0, 0]
    for m in ("pix", "mor"):
        assert torch.equal(batch.inputs[m], plain.inputs[m])
    assert torch.equal(batch.label, plain.label)
    moved = batch.to(torch.device("cpu"))
    assert moved.tag.tolist() == tags.tolist()
    untagged = Batch({"a": torch.zeros(2, 1)}, torch.tensor([1, 0]), torch.tensor([4, 2]))
    assert untagged.tag.tolist() == [0, 0]


def test_copies_of_a_sample_draw_their_own_frames(synthetic_av_dir):
    data = ParquetSamples(synthetic_av_dir, "train", ["visual"], train=True, augment=FrameAugment())
    n = len(data)
    first = data.__getitems__([2, 2 + n, 2 + 3 * n]).inputs["visual"]
    repeat = data.__getitems__([2]).inputs["visual"]
    assert torch.equal(first[0], repeat[0])  # an entry's draw is reproducible
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_copy_entries_number_repeated_copies_and_decode_to_the_kept_modality():
    entries = copy_entries(4, np.array([1, 1, 3, 1]), np.array([0, 0, 1, 1]), m=2)
    assert entries.positions.tolist() == [0, 1, 2, 3, 1, 1, 3, 1]
    assert entries.tags.tolist() == [0, 0, 0, 0, 1, 3, 2, 2]
    keep = kept_modalities(torch.from_numpy(entries.tags), 2)
    want = [[1, 1]] * 4 + [[1, 0], [1, 0], [0, 1], [0, 1]]
    assert keep.int().tolist() == want


def test_drop_entries_pick_one_entry_per_sample():
    pos, mod = np.array([0, 0, 2]), np.array([1, 0, 1])  # sample 0: 2 copies, sample 2: 1
    got = drop_entries(3, pos, mod, np.array([0.5, 0.9, 0.7]))
    # sample 0: floor(0.5 * 3) = 1, its first copy (modality 1); sample 1: no copies;
    # sample 2: floor(0.7 * 2) = 1, its copy (modality 1)
    assert got.positions.tolist() == [0, 1, 2] and got.tags.tolist() == [2, 0, 2]
    got = drop_entries(3, pos, mod, np.array([0.9, 0.1, 0.2]))
    assert got.tags.tolist() == [1, 0, 0]  # floor(2.7) = 2: the second copy, modality 0


# ---------------------------------------------------------------- copy counts, probability


def _official_copies(phi: float) -> int:
    """AV_KS_Dataset_sample_level's thresholds (GeWu-Lab code, dataloader.py)."""
    if 0.4 < phi < 1:
        return 1
    if -0.1 < phi < 0.4:
        return 2
    if phi < -0.1:
        return 3
    return 0


def test_step_counts_are_the_official_thresholds_for_two_modalities():
    # every (phi_a, phi_v) pair of the 2-modality game: v(a), v(v) in {0, 1}, v(N) in {0, 2}
    rows = []
    for va in (0, 1):
        for vv in (0, 1):
            for vn in (0, 2):
                rows.append([(va + vn - vv) / 2, (vv + vn - va) / 2])
    phi = np.array(rows)
    want = [[_official_copies(a), _official_copies(v)] for a, v in rows]
    assert copy_counts(phi, "step", 3).tolist() == want
    assert copy_counts(phi, "linear", 3, np.full(phi.shape, 0.5)).tolist() == want


def test_counts_for_three_modalities_from_a_hand_table():
    third, sixth = 1 / 3, 1 / 6
    phi = np.array([[0.9, 0.45, -0.2], [1.0, 1.2, third + sixth]])  # the last one: 0.5 in floats
    assert copy_counts(phi, "step", 3).tolist() == [[1, 2, 3], [0, 0, 1]]
    assert copy_counts(phi, "step", 2).tolist() == [[1, 2, 2], [0, 0, 1]]


@pytest.mark.parametrize(("shape", "g"), [("tanh", math.tanh), ("power", lambda u: u**1.5)])
def test_smooth_counts_round_the_expected_number_of_copies(shape, g):
    phi = np.array([[0.0, 1.5]])  # M = 2: u = 1 / 1.5 for phi 0; none for phi >= 1
    expected = 3 * g(1 / 1.5)
    low = copy_counts(phi, shape, 3, np.full((1, 2), 0.999))
    high = copy_counts(phi, shape, 3, np.zeros((1, 2)))
    assert low.tolist() == [[math.floor(expected), 0]]
    assert high.tolist() == [[math.floor(expected) + 1, 0]]


@pytest.mark.parametrize("function", ["linear", "tanh", "power"])
def test_modality_probability_matches_the_official_formula_for_two(function):
    cona, conv, alpha = 0.8, 0.2, 0.7
    norm = abs((1 - cona) - (1 - conv)) / 3 * 2  # modality_level.py / AV_KS_..._modality_level
    want = {
        "linear": norm * alpha,
        "tanh": math.tanh(norm * alpha),
        "power": norm**1.5 * alpha,
    }[function]
    p, weakest = resample_probability(np.array([cona, conv]), function, alpha)
    assert p == pytest.approx(want) and weakest == 1


def test_modality_probability_for_three_modalities():
    p, weakest = resample_probability(np.array([1.2, 0.9, 0.3]), "linear", 1.0)
    # d = ((1.2 - 0.3) + (0.9 - 0.3)) / 2 = 0.75, Norm = 0.75 / 2
    assert weakest == 2 and p == pytest.approx(0.375)


# ---------------------------------------------------------------- forward of tagged copies


def _model(names, num_classes=3, seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    encoder = {"hidden": [5], "out_dim": 4, "dropout": 0.0}
    return build_model(ModelConfig(encoder=encoder, fusion="concat"), specs, num_classes)


def _batch(names, n=6, seed=1, tag=None):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % 3,
        index=torch.arange(n),
        tag=tag,
    )


def test_a_copy_keeps_only_its_modality_in_the_fused_head():
    model = _model("ab").eval()
    batch = _batch("ab", n=3, tag=torch.tensor([0, 1, 2]))
    method = MMCooperationSample(MMCooperationSampleConfig(), 3)
    ctx = TrainContext(epoch=0, epochs=1, step=0)
    out = method.forward(model, batch, ctx)
    weight, bias = model.fusion.fc.weight, model.fusion.fc.bias
    ha = model.encoders["a"](batch.inputs["a"])
    hv = model.encoders["b"](batch.inputs["b"])
    want = torch.stack(
        [
            torch.cat([ha[0], hv[0]]) @ weight.T + bias,
            ha[1] @ weight[:, :4].T + bias,
            hv[2] @ weight[:, 4:].T + bias,
        ]
    )
    assert torch.allclose(out.logits, want, atol=1e-6)
    dropped = MMCooperationSample(MMCooperationSampleConfig(enhancement="drop"), 3)
    assert torch.equal(dropped.forward(model, batch, ctx).logits, out.logits)
    blank = {"a": batch.inputs["a"].clone(), "b": batch.inputs["b"].clone()}
    blank["b"][1], blank["a"][2] = 0, 0
    for enhancement in ("mask", "resample_mask"):  # the inputs blanked, not the features
        masked = MMCooperationSample(MMCooperationSampleConfig(enhancement=enhancement), 3)
        out = masked.forward(model, batch, ctx)
        assert torch.allclose(out.logits, model(blank).logits, atol=1e-6)


def _planning_ctx(batch: Batch) -> TrainContext:
    n = len(batch.label)
    return TrainContext(
        epoch=0, epochs=4, step=0, batches=lambda role, positions=None: iter([batch]), train_size=n
    )


@pytest.mark.parametrize(
    ("enhancement", "extra"),
    [("resample", True), ("resample_mask", True), ("drop", False), ("mask", False)],
)
def test_drop_and_mask_enhance_in_place_without_extra_copies(enhancement, extra):
    """Table 7's modality drop and data mask replace re-sampling: the next epoch holds each
    sample once, a sample with planned copies as one of them; resample adds the copies."""
    model = _model("ab")
    batch = _batch("ab", n=24, seed=4)
    method = MMCooperationSample(MMCooperationSampleConfig(warmup=1, enhancement=enhancement), 3)
    method.build_modules(model)
    torch.manual_seed(0)
    figures = method.on_epoch_end(model, _planning_ctx(batch))
    entries = method.entries
    assert entries is not None and figures["copies"] > 0
    if extra:
        assert len(entries.positions) == 24 + figures["copies"] == figures["entries"]
        assert (entries.tags[24:] > 0).all()
    else:
        assert entries.positions.tolist() == list(range(24)) and figures["entries"] == 24
        enhanced = entries.tags > 0
        assert 0 < enhanced.sum() <= figures["copies"]
        # only samples with planned copies are enhanced, each with a modality it was planned for
        resampled = MMCooperationSample(MMCooperationSampleConfig(warmup=1), 3)
        resampled.build_modules(model)
        resampled.on_epoch_end(model, _planning_ctx(batch))
        assert resampled.entries is not None
        copies = resampled.entries.positions[24:], (resampled.entries.tags[24:] - 1) % 2
        planned = set(zip(*(c.tolist() for c in copies), strict=True))
        for i in np.flatnonzero(enhanced):
            assert (i, (entries.tags[i] - 1) % 2) in planned


# ---------------------------------------------------------------- fixed-rate re-sampling


def test_fixed_rate_plans_rate_n_copies_without_valuing():
    model = _model("abc")
    n = 40

    def no_reading(role, positions=None):
        raise AssertionError("the fixed-rate baseline reads no split")

    ctx = TrainContext(epoch=1, epochs=4, step=0, batches=no_reading, train_size=n)
    method = MMCooperationFixed(MMCooperationFixedConfig(warmup=1, rate=0.25), 3)
    method.build_modules(model)
    torch.manual_seed(1)
    figures = method.on_epoch_end(model, ctx)
    entries = method.entries
    assert entries is not None and "valuation_seconds" not in figures
    assert figures["copies"] == 10 and len(entries.positions) == n + 10 == figures["entries"]
    assert entries.positions[:n].tolist() == list(range(n)) and (entries.tags[:n] == 0).all()
    kept = ((entries.tags[n:] - 1) % 3).tolist()
    assert [figures[f"copies_{m}"] for m in "abc"] == [kept.count(j) for j in range(3)]
    assert len(set(kept)) > 1  # drawn per copy

    named = MMCooperationFixed(MMCooperationFixedConfig(warmup=1, rate=0.25, modality="b"), 3)
    named.build_modules(model)
    named.on_epoch_end(model, ctx)
    assert named.entries is not None
    assert (kept_modalities(torch.from_numpy(named.entries.tags[n:]), 3)[:, 1]).all()
    in_place = MMCooperationFixedConfig(warmup=1, rate=0.25, enhancement="drop")
    dropped = MMCooperationFixed(in_place, 3)
    dropped.build_modules(model)
    dropped.on_epoch_end(model, ctx)
    assert dropped.entries is not None and len(dropped.entries.positions) == n
    assert 0 < (dropped.entries.tags > 0).sum() <= 10


# ---------------------------------------------------------------- CMoB


def _cmob_phi_by_hand(model, batch, confidence, score):
    """Poster Eq. 1 for M = 2 from separate forwards: B(T) = |T| if T's prediction is right and
    T is at least as confident as the subsets the reading compares (`subsets`: both
    singletons; `treatment`, in ITE_j: the other singleton S minus j); Conf is the largest
    softmax probability or the label's."""
    h = model.encode(batch.inputs)
    zero = {m: torch.zeros_like(x) for m, x in h.items()}
    prob = {
        "ab": model.fuse(h).softmax(1),
        "a": model.fuse({"a": h["a"], "b": zero["b"]}).softmax(1),
        "b": model.fuse({"a": zero["a"], "b": h["b"]}).softmax(1),
    }
    phi, correct = [], []
    for i, y in enumerate(batch.label.tolist()):
        right = {k: int(p[i].argmax()) == y for k, p in prob.items()}
        conf = {
            k: float(p[i].max() if score == "max_softmax" else p[i, y]) for k, p in prob.items()
        }
        b_a, b_b = float(right["a"]), float(right["b"])
        if confidence == "subsets":
            full_a = full_b = 2.0 * (right["ab"] and conf["ab"] >= max(conf["a"], conf["b"]))
        else:  # ITE_a compares S with S minus a = {b}
            full_a = 2.0 * (right["ab"] and conf["ab"] >= conf["b"])
            full_b = 2.0 * (right["ab"] and conf["ab"] >= conf["a"])
        phi.append([full_a - b_b + b_a, full_b - b_a + b_b])
        correct.append(right["ab"])
    return torch.tensor(phi), torch.tensor(correct)


@pytest.mark.parametrize("confidence", ["subsets", "treatment"])
@pytest.mark.parametrize("score", ["max_softmax", "true_class"])
def test_cmob_values_each_sample_and_logs_misclassified_apart(confidence, score):
    model = _model("ab")
    batch = _batch("ab", n=24, seed=4)
    config = CMoBConfig(warmup=1, confidence=confidence, confidence_score=score)
    method = CMoB(config, 3)
    method.build_modules(model)
    ctx = TrainContext(
        epoch=0,
        epochs=4,
        step=0,
        batches=lambda role, positions=None: iter([batch]),
        train_size=24,
    )
    figures = method.on_epoch_end(model, ctx)
    with torch.no_grad():
        phi, correct = _cmob_phi_by_hand(model.eval(), batch, confidence, score)
    assert method.phi is not None and torch.equal(method.phi, phi.float())
    assert method.correct is not None and torch.equal(method.correct, correct)
    assert 0 < int(correct.sum()) < 24  # the hand-made model gets some right, some wrong
    weak = phi[correct] <= 1
    assert (phi[~correct] <= 1).all()  # misclassified: every modality weak by construction
    assert figures["misclassified"] == pytest.approx(float((~correct).double().mean()))
    assert figures["weak_a"] == pytest.approx(float(weak[:, 0].double().mean()))
    assert figures["weak"] == pytest.approx(float(weak.double().mean()))
    assert figures["all_weak"] == pytest.approx(float(weak.all(1).double().mean()))
    assert figures["masked"] == pytest.approx(float(weak.any(1).double().mean()))
    assert figures["phi_b"] == pytest.approx(float(phi[correct, 1].mean()))
    steps = (2 - phi).clamp(max=3)
    strength = torch.where(phi <= 1, 0.3 * steps / 3, 0.0)
    assert figures["strength_b"] == pytest.approx(float(strength[correct, 1].mean()))
    assert figures["misclassified_strength"] == pytest.approx(float(strength[~correct].mean()))


def test_cmob_default_reading_and_the_valuation_it_builds():
    config = CMoBConfig()
    assert (config.confidence, config.confidence_score) == ("treatment", "max_softmax")
    stored = {"name": "cmob", "warmup": 5, "alpha": 0.2, "other_scale": 0.5, "second_phase": 0.5}
    old = CMoBConfig.model_validate({**stored, "threshold": 1.0, "confidence": "subsets"})
    assert old.confidence == "subsets"  # a run recipe stored by an earlier version keeps it
    method = CMoB(CMoBConfig(confidence="subsets", confidence_score="true_class"), 3)
    method.build_modules(_model("ab"))
    valuation = method.valuation.config
    assert (valuation.cmob_confidence, valuation.cmob_confidence_score) == (
        "subsets",
        "true_class",
    )


def test_cmob_mask_strength_grows_with_the_deficit_and_phase_two_masks_the_others():
    method = CMoB(CMoBConfig(alpha=0.3, deficit_cap=3, other_scale=0.5), 3)
    assert method.mask_ratios(torch.arange(2), 0, 10) is None  # no valuation yet
    # Phi of a 2-modality sample lies in -1..3; weak iff Phi <= 1
    method.phi = torch.tensor([[1.0, 3.0], [0.0, 2.0], [-1.0, 1.0], [2.0, 3.0]])
    method.correct = torch.tensor([True, True, True, True])
    index = torch.tensor([0, 1, 2, 3])
    first = method.mask_ratios(index, 4, 10)
    want = torch.tensor([[0.1, 0.0], [0.2, 0.0], [0.3, 0.1], [0.0, 0.0]])
    assert torch.allclose(first, want)
    second = method.mask_ratios(index, 5, 10)  # the others: half the lightest weak mask
    want = torch.tensor([[0.1, 0.05], [0.2, 0.05], [0.3, 0.1], [0.05, 0.05]])
    assert torch.allclose(second, want)
    method.phi[3, 0] = -4.0  # a six-modality Phi: capped at alpha
    assert float(method.mask_ratios(index, 4, 10)[3, 0]) == pytest.approx(0.3)
    fixed = CMoB(CMoBConfig(alpha=0.2, deficit_cap=1), 3)  # cap 1: alpha for every weak one
    fixed.phi, fixed.correct = method.phi, method.correct
    assert torch.allclose(fixed.mask_ratios(index, 4, 10)[:, 0], torch.tensor([0.2] * 4))


def test_cmob_masks_two_samples_with_different_deficits_differently():
    """Through the training forward: 20-dimensional vectors, the first sample's modality a one
    step below the weak threshold (Phi 1), the second's three (Phi -1): 2 and 6 dimensions."""

    class Seen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.modalities = ["a", "b"]
            self.encoders = torch.nn.ModuleDict({m: torch.nn.Identity() for m in "ab"})

        def forward(self, inputs):
            self.inputs = inputs
            return inputs

    method = CMoB(CMoBConfig(alpha=0.3, deficit_cap=3), 3)
    method.phi = torch.tensor([[1.0, 3.0], [-1.0, 3.0]])
    method.correct = torch.tensor([True, True])
    batch = Batch(
        inputs={"a": torch.ones(2, 20), "b": torch.ones(2, 20)},
        label=torch.zeros(2, dtype=torch.long),
        index=torch.tensor([0, 1]),
    )
    model = Seen()
    method.forward(model, batch, TrainContext(epoch=2, epochs=10, step=0))
    assert (model.inputs["a"] == 0).sum(1).tolist() == [2, 6]
    assert (model.inputs["b"] == 0).sum().item() == 0


def test_cmob_misclassified_samples_masked_by_the_rule_or_skipped():
    phi = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])
    correct = torch.tensor([True, False])
    index = torch.tensor([0, 1])
    for misclassified, want in (("mask", [0.3, 0.3]), ("skip", [0.3, 0.0])):
        method = CMoB(CMoBConfig(misclassified=misclassified), 3)
        method.phi, method.correct = phi, correct
        assert method.mask_ratios(index, 9, 10)[:, 0].tolist() == pytest.approx(want)


def test_cmob_refuses_to_resume_the_weak_table_of_earlier_versions():
    method = CMoB(CMoBConfig(), 3)
    with pytest.raises(UserError, match="older mmval"):
        method.load_state_dict({"weak": torch.zeros(4, 2, dtype=torch.bool)})
    method.load_state_dict({})
    assert method.phi is None and method.state_dict() == {}
    saved = {"phi": torch.tensor([[1.0, 2.0]]), "correct": torch.tensor([True])}
    method.load_state_dict(saved)
    assert method.state_dict() == saved


def test_time_mask_zeroes_one_block_of_time_steps():
    x = torch.ones(3, 8, 5)
    out = time_mask(x, torch.tensor([0.25, 0.0, 0.5]), axis=0, fill=0.0)
    for row, width in zip(out, (2, 0, 4), strict=True):
        hit = (row == 0).all(1)
        assert ((row == 0) == hit[:, None]).all()  # whole time steps
        steps = hit.nonzero().flatten().tolist()
        assert len(steps) == width and steps == list(
            range(min(steps, default=0), max(steps, default=-1) + 1)
        )
    out = time_mask(torch.ones(2, 5, 8), torch.tensor([0.25, 0.25]), axis=1, fill=-1.0)
    assert ((out == -1).sum((1, 2)) == 2 * 5).all() and ((out == -1).all(1).sum(1) == 2).all()


def test_square_mask_is_one_square_at_the_same_place_in_every_frame():
    x = torch.full((4, 3, 8, 8, 2), 7, dtype=torch.uint8)
    out = square_mask(x, torch.tensor([0.25, 0.25, 0.0, 1.0]), fill=128)
    for row, side in zip(out, (4, 4, 0, 8), strict=True):
        hit = row == 128
        assert (hit == hit[:1]).all() and (hit == hit[..., :1]).all()  # frames and channels
        plane = hit[0, :, :, 0]
        assert int(plane.sum()) == side * side
        if side:
            rows, cols = plane.any(1).nonzero().flatten(), plane.any(0).nonzero().flatten()
            assert len(rows) == side == len(cols) and int(rows[-1] - rows[0]) == side - 1


def test_token_and_dimension_masks():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 9, 0, 0, 0, 0]])
    out = token_mask(ids, torch.tensor([0.5, 0.0]), pad=0)
    assert int((out[0, :4] == 0).sum()) == 2 and out[0, 4:].tolist() == [0, 0]
    assert out[1].tolist() == ids[1].tolist()
    kept = out[0][out[0] != 0].tolist()
    assert all(t in (5, 6, 7, 8) for t in kept) and kept == sorted(kept)
    vec = torch.ones(3, 8)
    out = dims_mask(vec, torch.tensor([0.25, 0.5, 0.0]), fill=0.0)
    assert (out == 0).sum(1).tolist() == [2, 4, 0]


def test_mask_input_picks_the_mask_and_fill_by_shape():
    class Text(torch.nn.Module):
        pad_id = 1

    frames = torch.zeros(2, 2, 4, 4, 3, dtype=torch.uint8)
    out = mask_input("visual", frames, torch.tensor([1.0, 0.0]), torch.nn.Identity(), 0)
    assert (out[0] == 128).all() and (out[1] == 0).all()
    ids = torch.full((1, 4), 7)
    assert mask_input("text", ids, torch.tensor([1.0]), Text(), 0).tolist() == [[1, 1, 1, 1]]
    with pytest.raises(UserError, match="shape"):
        mask_input("odd", torch.zeros(1, 2, 2, 2), torch.tensor([0.5]), torch.nn.Identity(), 0)


# ---------------------------------------------------------------- recipes, resume, training


@pytest.mark.parametrize(
    ("method", "changes", "field"),
    [
        ({"name": "mmcooperation_sample"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "mmcooperation_sample", "warmup": 0}, {}, "warmup"),
        ({"name": "mmcooperation_modality", "part_ratio": 0}, {}, "part_ratio"),
        ({"name": "mmcooperation_modality"}, {"data__modalities": ["b"]}, "data.modalities"),
        (
            {"name": "mmcooperation_fixed", "modality": "z"},
            {"data__modalities": ["a", "b"]},
            "method.modality",
        ),
        ({"name": "mmcooperation_fixed", "rate": 0}, {}, "rate"),
        ({"name": "cmob", "time_axis": {"x": 1}}, {"data__modalities": ["a", "b"]}, "time_axis"),
        ({"name": "cmob", "alpha": 1.5}, {}, "alpha"),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method=method, **changes))


def _recipe(tmp_path, data, encoder, method, epochs, batch_size, lr, name=None):
    return parse_recipe(
        {
            "name": name or method["name"],
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {"encoder": encoder, "fusion": "concat"},
            "method": method,
            "optim": {"name": "adam", "lr": lr},
            "train": {"epochs": epochs, "batch_size": batch_size},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )


UCI_ENCODER = {"kind": "mlp", "hidden": [32], "out_dim": 16, "dropout": 0.1}
METHODS = [
    {"name": "mmcooperation_sample", "warmup": 2},
    {"name": "mmcooperation_modality", "warmup": 2},
    {"name": "cmob", "warmup": 2},
]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_trains_on_uci_mfeat(tmp_path, uci_dir, method):
    result = Trainer(_recipe(tmp_path, uci_dir, UCI_ENCODER, method, 4, 128, 3e-3), 0).run()
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    assert result.summary["finished"] and len(metrics) == 4
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert result.summary["test_acc"] > 0.5  # ten classes
    valued = metrics["method_valuation_seconds"]
    assert valued.iloc[:1].isna().all() and (valued.iloc[1:] > 0).all()  # from epoch warmup-1
    if method["name"] == "cmob":
        assert (metrics["method_masked"].iloc[1:] > 0).all()
    else:  # the epochs after a valuation hold the samples and the planned copies
        assert (metrics["method_copies"].iloc[1:] > 0).all()
        planned = metrics[["method_entries", "method_copies"]].iloc[1:].to_numpy()
        assert (planned[:, 0] == 1400 + planned[:, 1]).all()


@pytest.mark.parametrize("enhancement", ["drop", "mask"])
def test_in_place_enhancement_keeps_the_epoch_size_on_uci_mfeat(tmp_path, uci_dir, enhancement):
    method = {"name": "mmcooperation_sample", "warmup": 1, "enhancement": enhancement}
    result = Trainer(_recipe(tmp_path, uci_dir, UCI_ENCODER, method, 2, 128, 3e-3), 0).run()
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    assert result.summary["finished"] and (metrics["method_copies"] > 0).all()
    assert (metrics["method_entries"] == 1400).all()


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_trains_on_synthetic_av(tmp_path, synthetic_av_dir, method):
    method = {**method, "warmup": 1}
    recipe = _recipe(tmp_path, synthetic_av_dir, {"kind": "resnet18"}, method, 2, 4, 1e-3)
    result = Trainer(recipe, 0).run()
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    assert result.summary["finished"] and len(metrics) == 2
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert (metrics["method_valuation_seconds"] > 0).all()


def test_sample_level_resume_matches_an_uninterrupted_run(tmp_path, uci_dir):
    method = {"name": "mmcooperation_sample", "warmup": 2, "frequency": "tanh"}
    straight = _recipe(tmp_path, uci_dir, UCI_ENCODER, method, 4, 128, 3e-3, name="straight")
    broken = straight.model_copy(update={"name": "broken"})
    Trainer(straight, 0).run()
    with pytest.raises(Crash):  # killed after epoch 2, before the first re-sampling acts
        Trainer(broken, 0, callbacks=crash_after(2)).run()
    Trainer(broken, 0, resume=True).run()
    runs = tmp_path / "runs"
    a, b = (
        pd.read_parquet(runs / f"{name}/seed0/metrics.parquet").filter(regex=r"^(?!.*seconds)")
        for name in ("straight", "broken")
    )
    assert "method_copies" in a.columns
    pd.testing.assert_frame_equal(a, b)
