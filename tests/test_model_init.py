"""`model.init`: the official OGM-GE / PMR / MLA / AGM `weight_init` on request, PyTorch's by
default, and recipes without the field keep their settings hash."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.models import ModelConfig, build_model
from mmval.models.encoders import EmbeddingBagEncoder, EmbeddingBagEncoderConfig
from mmval.recipe import Recipe, load_recipe
from mmval.settings import SETTING, identity


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_xavier_gives_zero_biases_and_the_xavier_normal_std():
    spec = ModalitySpec(name="x", dtype="float32", shape=[400])
    config = {"encoder": {"hidden": [300], "out_dim": 200}, "fusion": "concat"}
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(**config, init="xavier"), [spec, spec.model_copy(update={"name": "y"})], 5
    )
    for linear in _linears(model):
        assert torch.count_nonzero(linear.bias) == 0
    first = model.encoders["x"].net[1]  # Linear(400, 300): 120000 weights
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (400 + 300)), rel=0.02)
    assert first.weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    torch.manual_seed(0)
    default = build_model(ModelConfig(**config), [spec, spec.model_copy(update={"name": "y"})], 5)
    assert torch.count_nonzero(default.encoders["x"].net[1].bias) > 0  # PyTorch's own


def test_xavier_draws_convs_kaiming_normal_fan_out():
    spec = ModalitySpec(name="audio", dtype="float32", shape=[32, 32])
    config = {"encoder": {"kind": "resnet18"}, "fusion": "concat"}
    torch.manual_seed(0)
    model = build_model(ModelConfig(**config, init="xavier"), [spec], 3)
    trunk = model.encoders["audio"].trunk
    for conv in (trunk[0], trunk[4][0].conv1):  # the 1-channel stem, a 3x3 conv of layer1
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.count_nonzero(model.fusion.fc.bias) == 0


def test_xavier_leaves_pretrained_encoders_as_loaded(tmp_path):
    spec = ModalitySpec(name="t", dtype="int32", shape=[6], encoding="tokens", vocab_size=20)
    torch.manual_seed(1)
    saved = EmbeddingBagEncoder(spec, EmbeddingBagEncoderConfig(dim=8, out_dim=4)).state_dict()
    torch.save(saved, tmp_path / "bag.pt")
    encoder = {"kind": "embedding_bag", "dim": 8, "out_dim": 4, "pretrained": tmp_path / "bag.pt"}
    other = ModalitySpec(name="x", dtype="float32", shape=[3])
    config = ModelConfig(
        encoders={"t": encoder, "x": {"hidden": [5], "out_dim": 4}}, fusion="concat", init="xavier"
    )
    model = build_model(config, [spec, other], 2)
    for key, value in model.encoders["t"].state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert torch.count_nonzero(model.encoders["x"].net[1].bias) == 0


def test_init_default_keeps_the_settings_hash(recipe_file):
    recipe = load_recipe(recipe_file())
    dump = recipe.model_dump(mode="json")
    assert dump["model"]["init"] == "default"
    assert "init" not in identity(recipe, SETTING)["model"]
    dump["model"]["init"] = "xavier"
    xavier = Recipe.model_validate(dump)
    assert xavier.settings_hash() != recipe.settings_hash()
    dump["model"]["init"] = "default"
    assert Recipe.model_validate(dump).settings_hash() == recipe.settings_hash()
