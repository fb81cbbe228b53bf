"""AGM against the official code (lihong2303/AGM_ICCV2023): the backward hooks keep the last
coefficients after the window, the head's per-modality slices are scaled, an absent modality is
the input the network reads as zeros, and the default window is the official 20 epochs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.methods import agm
from mmval.methods.agm import AGM, AGMConfig
from mmval.methods.base import TrainContext
from mmval.models import ModelConfig, MultimodalModel, build_model
from mmval.models.encoders import IMAGENET_MEAN, IMAGENET_STD


def _model(names: list[str], fusion: str = "concat") -> MultimodalModel:
    torch.manual_seed(0)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    config = ModelConfig(encoder={"hidden": [5], "out_dim": 4, "dropout": 0.0}, fusion=fusion)
    return build_model(config, specs, 3)


def _batch(names: list[str], seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(6, 3, generator=g) for m in names},
        label=torch.arange(6) % 3,
        index=torch.arange(6),
    )


def _step(method: AGM, model: MultimodalModel, epoch: int, step: int, seed: int):
    """One backward and `after_backward`: the gradients before it, the figures."""
    batch = _batch(model.modalities, seed)
    model.zero_grad()
    out = model(batch.inputs)
    F.cross_entropy(out.logits, batch.label).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    ctx = TrainContext(epoch=epoch, epochs=40, step=step)
    return before, method.after_backward(model, out, batch, ctx)


def _ratio(model: MultimodalModel, before: dict[str, torch.Tensor], name: str) -> float:
    """The factor the gradient of parameter `name` was multiplied by (checked to be one)."""
    grad = dict(model.named_parameters())[name].grad
    factor = float((grad.flatten() @ before[name].flatten()) / before[name].square().sum())
    assert torch.allclose(grad, before[name] * factor, atol=1e-7)
    return factor


def test_agm_keeps_the_last_coefficients_after_the_window():
    names = ["a", "v"]
    model = _model(names)
    config = AGMConfig(alpha=0.5, modulation_starts=1, modulation_ends=2, clip_threshold=1e9)
    method = AGM(config, 3)
    enc = {m: f"encoders.{m}.net.1.weight" for m in names}
    before, figures = _step(method, model, epoch=0, step=0, seed=1)  # before the window: 1
    assert [_ratio(model, before, enc[m]) for m in names] == pytest.approx([1.0, 1.0])
    _step(method, model, epoch=1, step=1, seed=2)
    before, figures = _step(method, model, epoch=2, step=2, seed=3)  # last step of the window
    last = [figures[f"coef_{m}"] for m in names]
    assert [_ratio(model, before, enc[m]) for m in names] == pytest.approx(last, rel=1e-5)
    state = method.state_dict()
    for epoch, seed in ((3, 4), (9, 5)):  # after it: the same coefficients, not this step's
        before, figures = _step(method, model, epoch=epoch, step=epoch, seed=seed)
        now = [figures[f"coef_{m}"] for m in names]
        assert now != pytest.approx(last, rel=1e-3)
        assert [_ratio(model, before, enc[m]) for m in names] == pytest.approx(last, rel=1e-5)
        assert [figures[f"scale_{m}"] for m in names] == pytest.approx(last)
    resumed = AGM(config, 3)  # a resumed run keeps scaling by them
    resumed.load_state_dict(state)
    before, _ = _step(resumed, model, epoch=4, step=4, seed=6)
    assert [_ratio(model, before, enc[m]) for m in names] == pytest.approx(last, rel=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_agm_scales_each_modality_share_of_the_head(fusion):
    names = ["a", "v", "t"]
    model = _model(names, fusion)
    method = AGM(AGMConfig(alpha=0.5, clip_threshold=1e9), 3)
    method.running = torch.tensor([0.4, 1.1, 0.7], dtype=torch.float64)
    before, figures = _step(method, model, epoch=0, step=2, seed=1)
    k = [figures[f"coef_{m}"] for m in names]
    assert max(k) / min(k) > 1.01
    if fusion == "concat":  # W[:, slice_m] by k_m (out_dim 4 each), the shared bias by mean k
        grad, was = model.fusion.fc.weight.grad, before["fusion.fc.weight"]
        for j, coeff in enumerate(k):
            assert torch.allclose(grad[:, 4 * j : 4 * j + 4], was[:, 4 * j : 4 * j + 4] * coeff)
        assert _ratio(model, before, "fusion.fc.bias") == pytest.approx(sum(k) / 3, rel=1e-5)
    else:  # one head per modality: all of it by k_m
        for m, coeff in zip(names, k, strict=True):
            for part in ("weight", "bias"):
                name = f"fusion.heads.{m}.{part}"
                assert _ratio(model, before, name) == pytest.approx(coeff, rel=1e-5)


def test_agm_absent_modality_is_what_the_network_reads_as_zeros():
    specs = [
        ModalitySpec(name="audio", dtype="float32", shape=[16, 16]),
        ModalitySpec(name="visual", dtype="uint8", shape=[2, 16, 16, 3]),
    ]
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder={"kind": "resnet18"}, fusion="concat"), specs, 3)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "audio": torch.randn(2, 16, 16, generator=g),
        "visual": torch.randint(0, 256, (2, 2, 16, 16, 3), generator=g, dtype=torch.uint8),
    }
    model.train()(inputs)  # running statistics of the batch norms: encodings of zeros are not 0
    got = AGM(AGMConfig(), 3).subset_logits(model, inputs, torch.zeros(2, 3))
    model.eval()
    with torch.no_grad():
        audio, visual = model.encoders["audio"], model.encoders["visual"]
        present = {"audio": audio(inputs["audio"]), "visual": visual(inputs["visual"])}
        # the official zeros_like on normalised inputs: the trunks read zeros
        absent = {
            "audio": audio.pool(audio.trunk(torch.zeros(1, 1, 16, 16)), 1).expand(2, -1),
            "visual": visual.pool(visual.trunk(torch.zeros(2, 3, 16, 16)), 1).expand(2, -1),
        }
        only_audio = model.fusion({"audio": present["audio"], "visual": absent["visual"]})
        only_visual = model.fusion({"audio": absent["audio"], "visual": present["visual"]})
    assert torch.allclose(got[1], only_audio, atol=1e-5)  # row 1: audio present
    assert torch.allclose(got[2], only_visual, atol=1e-5)  # row 2: visual present
    # the stand-in frame is the mean colour, exactly 0 once normalised
    frame = agm.absent_input(visual, inputs["visual"][0])
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose((frame / 255.0 - mean) / std, torch.zeros(()), atol=1e-6)


def test_agm_absent_text_is_padding_and_vectors_are_zero():
    specs = [
        ModalitySpec(name="a", dtype="float32", shape=[3]),
        ModalitySpec(name="t", dtype="int32", shape=[5], encoding="tokens", vocab_size=9, pad_id=3),
    ]
    torch.manual_seed(0)
    config = ModelConfig(
        encoders={"a": {"hidden": [5], "out_dim": 4}, "t": {"kind": "embedding_bag", "dim": 6}},
        fusion="concat",
    )
    model = build_model(config, specs, 2)
    inputs = {"a": torch.randn(2, 3), "t": torch.tensor([[4, 5, 3, 3, 3], [0, 1, 2, 6, 3]])}
    got = AGM(AGMConfig(), 2).subset_logits(model, inputs, torch.zeros(2, 2))
    model.eval()
    with torch.no_grad():
        empty_text = model({"a": inputs["a"], "t": torch.full((2, 5), 3)}).logits
        zero_vector = model({"a": torch.zeros(2, 3), "t": inputs["t"]}).logits
    assert torch.allclose(got[1], empty_text, atol=1e-6)  # row 1: only a present
    assert torch.allclose(got[2], zero_vector, atol=1e-6)  # row 2: only t present


def test_agm_default_window_is_the_official_first_20_epochs():
    names = ["a", "v"]
    model = _model(names)
    method = AGM(AGMConfig(clip_threshold=1e9), 3)
    fresh = []  # the epochs whose step was scaled by its own coefficients
    for epoch in range(23):
        before, figures = _step(method, model, epoch=epoch, step=epoch, seed=epoch)
        ratio = _ratio(model, before, "encoders.a.net.1.weight")
        if ratio == pytest.approx(figures["coef_a"], rel=1e-6):
            fresh.append(epoch)
    assert fresh == list(range(20))  # official epochs 1-20 (counted from 1)
