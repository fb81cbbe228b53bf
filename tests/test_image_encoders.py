"""torchvision image encoders from local files (`kind: resnet`, `kind: vit`), written by the
tests themselves (random weights, nothing downloaded), and the model cost in summaries and
reports."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.data.prep import prepare
from mmval.data.shards import ModalitySpec
from mmval.engine.cost import model_cost
from mmval.errors import UserError
from mmval.models import ModelConfig
from mmval.models.encoders import ResNet18Encoder, ResNet18EncoderConfig
from mmval.models.image_encoders import (
    MMBT_MEAN,
    ResNetEncoder,
    ResNetEncoderConfig,
    ViTEncoder,
    ViTEncoderConfig,
)
from mmval.models.multimodal import build_model
from mmval.recipe import parse_recipe
from mmval.report import compare, find_runs, render
from mmval.runner import Trainer
from mmval.tasks import resolve_task


def _random_stats(net: nn.Module) -> nn.Module:
    """BatchNorm running statistics other than a fresh layer's, so that loading them shows."""
    generator = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return net


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def _frames(side: int, k: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, k, side, side, 3), dtype=torch.uint8, generator=generator)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    images = x.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_loads_torchvision_weights(depth: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _random_stats(getattr(torchvision.models, f"resnet{depth}")(weights=None)).eval()
    path = _save(net.state_dict(), tmp_path / f"resnet{depth}.pth")
    encoder = ResNetEncoder([1, 32, 32, 3], ResNetEncoderConfig(depth=depth, pretrained=path))
    encoder.eval()
    assert encoder.out_dim == (512 if depth < 50 else 2048)
    x = _frames(32)
    net.fc = nn.Identity()  # torchvision's own trunk and global average pool
    with torch.no_grad():
        assert torch.allclose(encoder(x), net(_normalised(x)), atol=1e-5)


def test_missing_counters_and_classifier_are_accepted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _random_stats(torchvision.models.resnet18(weights=None)).eval()
    state = net.state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(counters) == 20
    for key in counters:  # as files written before torch 0.4.1 lack them
        del state[key]
    path = _save(state, tmp_path / "old.pth")
    for config in (
        ResNetEncoderConfig(depth=18, pretrained=path),
        ResNet18EncoderConfig(pretrained=path),
    ):
        encoder = ResNetEncoder if isinstance(config, ResNetEncoderConfig) else ResNet18Encoder
        built = encoder([1, 32, 32, 3], config).eval()
        assert built.state_dict()["trunk.1.running_mean"].equal(state["bn1.running_mean"])
        assert int(built.state_dict()["trunk.1.num_batches_tracked"]) == 0
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    trunk_file = _save(trunk, tmp_path / "trunk.pth")
    built = ResNetEncoder([1, 32, 32, 3], ResNetEncoderConfig(depth=18, pretrained=trunk_file))
    assert built.state_dict()["trunk.0.weight"].equal(state["conv1.weight"])


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.convX.weight"] = state.pop("layer1.0.conv1.weight")
    path = _save(state, tmp_path / "renamed.pth")
    with pytest.raises(UserError) as error:
        ResNetEncoder([1, 32, 32, 3], ResNetEncoderConfig(depth=18, pretrained=path))
    assert "missing: layer1.0.conv1.weight" in str(error.value)
    assert "unexpected: layer1.0.convX.weight" in str(error.value)
    with pytest.raises(
        UserError, match=r"of another shape: layer1\.0\.conv1\.weight \[64, 64, 1, 1\]"
    ):  # a resnet-50 file
        resnet50 = torchvision.models.resnet50(weights=None).state_dict()
        ResNetEncoder(
            [1, 32, 32, 3],
            ResNetEncoderConfig(depth=18, pretrained=_save(resnet50, tmp_path / "r50.pth")),
        )
    with pytest.raises(UserError, match="never downloads"):
        ResNetEncoder([1, 32, 32, 3], ResNetEncoderConfig(depth=18, pretrained=tmp_path / "no"))


def test_qmf_embeddings() -> None:
    """64 x 64 images give a 2 x 2 map: 2 embeddings (grid (2, 1)) are its row means, 4 with
    max pooling (grid (2, 2)) are its positions row by row (QMF `image.py` 29-45)."""
    x = _frames(64)
    two = ResNetEncoder([1, 64, 64, 3], ResNetEncoderConfig(depth=18, embeds=2)).eval()
    four = ResNetEncoder(
        [1, 64, 64, 3], ResNetEncoderConfig(depth=18, embeds=4, embed_pool="max")
    ).eval()
    four.load_state_dict(two.state_dict())
    with torch.no_grad():
        grid = two.trunk(two._images(x))  # [1, 512, 2, 2]
        assert grid.shape == (1, 512, 2, 2) and (two.out_dim, four.out_dim) == (1024, 2048)
        rows = torch.cat([grid[:, :, 0].mean(-1), grid[:, :, 1].mean(-1)], dim=1)
        assert torch.allclose(two(x), rows, atol=1e-6)
        positions = torch.cat([grid[:, :, i, j] for i in (0, 1) for j in (0, 1)], dim=1)
        assert torch.allclose(four(x), positions)


def test_frames_are_averaged_and_statistics_chosen() -> None:
    torch.manual_seed(0)
    encoder = ResNetEncoder([2, 32, 32, 3], ResNetEncoderConfig(depth=18, normalize="mmbt"))
    encoder.eval()
    assert torch.allclose(encoder.mean.flatten(), torch.tensor(MMBT_MEAN))
    x = torch.cat([_frames(32, seed=0), _frames(32, seed=1)], dim=1)
    with torch.no_grad():
        each = [encoder(x[:, k : k + 1]) for k in range(2)]
        assert torch.allclose(encoder(x), (each[0] + each[1]) / 2, atol=1e-5)


def test_resnet18_kind_keeps_its_layout(tmp_path: Path) -> None:
    """Recipes and checkpoints of `kind: resnet18` are unaffected: its config and keys are as
    before, and `kind: resnet, depth: 18` has the same keys, so it reads the same weights."""
    assert ResNet18EncoderConfig().model_dump() == {"kind": "resnet18", "pretrained": None}
    old = ResNet18Encoder([1, 32, 32, 3], ResNet18EncoderConfig())
    children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    expected = set()
    for key in torchvision.models.resnet18().state_dict():
        head, _, rest = key.partition(".")
        if head != "fc":
            expected.add(f"trunk.{children.index(head)}.{rest}")
    assert set(old.state_dict()) == expected
    new = ResNetEncoder([1, 32, 32, 3], ResNetEncoderConfig(depth=18))
    new.load_state_dict(old.state_dict())
    x = _frames(32)
    with torch.no_grad():
        assert torch.allclose(old.eval()(x), new.eval()(x), atol=1e-6)


def test_vit_loads_torchvision_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    path = _save(net.state_dict(), tmp_path / "vit.pth")
    encoder = ViTEncoder([1, 32, 32, 3], ViTEncoderConfig(pretrained=path)).eval()
    assert encoder.out_dim == 768
    x = _frames(32)
    net.heads = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(encoder(x), net(_normalised(x)), atol=1e-5)
    made_for_224 = _save(
        {"encoder.pos_embedding": torch.zeros(1, 197, 768)}, tmp_path / "vit224.pth"
    )
    with pytest.raises(UserError, match=r"224 x 224 images.*32 x 32"):
        ViTEncoder([1, 32, 32, 3], ViTEncoderConfig(pretrained=made_for_224))
    with pytest.raises(UserError, match="square RGB frames"):
        ViTEncoder([1, 30, 30, 3], ViTEncoderConfig())


def _task():
    return resolve_task(None, "classification", 4)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 4))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(inputs["x"])


def test_cost_counts_parameters_and_macs() -> None:
    model = _Model().train()
    model.net[2].weight.requires_grad_(False)
    state = torch.get_rng_state()
    cost = model_cost(model, _task(), {"x": torch.zeros(1, 10)})
    assert cost == {
        "parameters": sum(p.numel() for p in model.parameters()),  # 10*7+7 + 7*4+4 = 109
        "trainable_parameters": 109 - 28,
        "macs_per_sample": 10 * 7 + 7 * 4,  # the two matrix products
    }
    assert model.training and torch.equal(torch.get_rng_state(), state)


def test_cost_of_resnet18_is_torchvisions_figure() -> None:
    """torchvision's own count for ResNet-18 at 224 x 224 (weights meta `_ops`: 1.814 GFLOPS,
    which it counts one per multiply-accumulate)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = ResNetEncoder([1, 224, 224, 3], ResNetEncoderConfig(depth=18))
            self.head = nn.Linear(512, 1000)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.head(self.encoder(inputs["image"]))

    cost = model_cost(Model(), _task(), {"image": _frames(224)})
    published = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]
    assert cost["macs_per_sample"] / 1e9 == pytest.approx(published, abs=0.0005)
    assert cost["parameters"] == 11_689_512  # torchvision's resnet18 (fc of 1000 classes)


def test_training_with_a_pretrained_resnet_records_the_cost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare(
        "synthetic",
        data,
        overrides=[
            "modalities=[image,vec]",
            "kinds=[image,vector]",
            "dims=[16,8]",
            "per_class={train: 8, val: 4, test: 4}",
        ],
    )
    weights = _save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    recipe = parse_recipe(
        {
            "name": "it",
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {
                "encoders": {
                    "image": {"kind": "resnet", "depth": 18, "pretrained": str(weights)},
                    "vec": {"kind": "mlp", "hidden": [8], "out_dim": 8},
                },
                "fusion": "concat",
            },
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 2, "batch_size": 16},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    result = Trainer(recipe, 0).run()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    weights = load_checkpoint(result.run_dir / "best.pt").model
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    parameters = sum(v.numel() for k, v in weights.items() if not k.endswith(buffers))
    assert summary["parameters"] == summary["trainable_parameters"] == parameters
    assert summary["macs_per_sample"] > 0

    comparison = compare(find_runs(tmp_path / "runs"))
    table = pd.read_csv(io.StringIO(render(comparison, "csv")))
    assert table.loc[0, "parameters"] == parameters
    assert table.loc[0, "macs_per_sample"] == summary["macs_per_sample"]
    html = render(comparison, "html")
    assert '<th rowspan="2">Cost</th>' in html and "M params" in html


def test_resnets_run_in_stages_for_mmtm() -> None:
    frames = ModalitySpec(name="rgb", dtype="uint8", shape=[1, 32, 32, 3], encoding="jpeg")
    specs = [frames, frames.model_copy(update={"name": "depth"})]
    config = ModelConfig(
        encoders={"rgb": {"kind": "resnet", "depth": 18}, "depth": {"kind": "resnet", "depth": 50}},
        mmtm={"stages": [2, 3, 4]},
        fusion="concat",
    )
    model = build_model(config, specs, 3).eval()
    blocks = model.mid_fusion.blocks
    assert [b.squeeze.in_features for b in blocks.values()] == [128 + 512, 256 + 1024, 512 + 2048]
    out = model({"rgb": _frames(32), "depth": _frames(32, seed=1)})
    assert out.logits.shape == (1, 3)
