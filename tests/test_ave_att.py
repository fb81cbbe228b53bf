"""Tian et al.'s supervised AVE baseline (model.ave_att): its shapes and parameter count against
the official att_Net, its forward against the official formulas, its wiring, and a training,
selection and valuation run on fake AVE features."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.nn import functional as F

from mmval.artifacts.layout import BEST, PREDICTIONS, SUMMARY
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models import ModelConfig, build_model
from mmval.models.ave_att import AVAttConfig, AVAttModel
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from mmval.valuation.config import ValuationConfig
from mmval.valuation.run import value_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

AVE_SPECS = [
    ModalitySpec(name="audio", dtype="float32", shape=[10, 128]),
    ModalitySpec(name="visual", dtype="float16", shape=[10, 7, 7, 512]),
]
SMALL_SPECS = [
    ModalitySpec(name="audio", dtype="float32", shape=[10, 16]),
    ModalitySpec(name="visual", dtype="float16", shape=[10, 2, 2, 16]),
]


def _lstm(inputs: int, hidden: int) -> int:
    """A one-layer bidirectional LSTM: per direction 4 gates of W_ih, W_hh, b_ih and b_hh."""
    return 2 * 4 * hidden * (inputs + hidden + 2)


def test_official_size_has_att_nets_parameter_count():
    model = AVAttModel(AVAttConfig(), AVE_SPECS, 29)
    assert model.modalities == ["audio", "visual"]
    # att_Net(128, 128, 512, 29), models.py 16-27, layer by layer
    expected = (
        _lstm(128, 128)  # lstm_audio: 264192
        + _lstm(512, 128)  # lstm_video: 657408
        + (128 * 512 + 512)  # affine_audio
        + (512 * 512 + 512)  # affine_video
        + 512 * 49  # affine_v, no bias
        + 512 * 49  # affine_g, no bias
        + 49  # affine_h, no bias
        + (4 * 128 * 64 + 64)  # L1: hidden_dim * 4 = two BiLSTM outputs of 2 x 128
        + (64 * 29 + 29)  # L2
    )
    assert expected == 1_335_246
    assert sum(p.numel() for p in model.parameters()) == expected
    out = model({"audio": torch.randn(2, 10, 128), "visual": torch.randn(2, 10, 7, 7, 512).half()})
    assert out.logits.shape == (2, 10, 29)
    assert out.features["audio"].shape == out.features["visual"].shape == (2, 10, 256)
    assert out.unimodal_logits is None


def test_forward_follows_att_net():
    """The model's output recomputed with att_Net's formulas (models.py 46-79, without the final
    softmax) from its own weights; the audio term of the attention is one value per region."""
    torch.manual_seed(0)
    model = AVAttModel(AVAttConfig(hidden_dim=8, hidden_size=12, fusion_hidden=6), SMALL_SPECS, 5)
    model.eval()
    audio, visual = torch.randn(3, 10, 16), torch.randn(3, 10, 2, 2, 16)
    out = model({"audio": audio, "visual": visual.half()})

    maps = visual.half().float().view(30, 4, 16)
    v = torch.relu(maps @ model.affine_video.weight.T + model.affine_video.bias)
    g = torch.relu(audio.view(30, 16) @ model.affine_audio.weight.T + model.affine_audio.bias)
    content = v @ model.affine_v.weight.T + (g @ model.affine_g.weight.T)[:, :, None]
    z = (torch.tanh(content) @ model.affine_h.weight.T)[:, :, 0]
    alpha = F.softmax(z, dim=-1)
    attended = (alpha[:, :, None] * maps).sum(1).view(3, 10, 16)
    zeros = (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    lstm_audio, _ = model.lstm_audio(audio, zeros)
    lstm_video, _ = model.lstm_video(attended, zeros)
    fused = torch.relu(torch.cat((lstm_audio, lstm_video), -1))
    hidden = torch.relu(fused @ model.L1.weight.T + model.L1.bias)
    logits = hidden @ model.L2.weight.T + model.L2.bias
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.features["visual"], lstm_video, rtol=1e-5, atol=1e-6)


def test_wiring_refuses_other_tasks_and_shapes():
    config = ModelConfig(ave_att=AVAttConfig(hidden_dim=4, hidden_size=8, fusion_hidden=4))
    assert isinstance(build_model(config, SMALL_SPECS, 5, task="localisation"), AVAttModel)
    with pytest.raises(UserError, match="localisation model"):
        build_model(config, SMALL_SPECS, 5, task="classification")
    pooled = [SMALL_SPECS[0], ModalitySpec(name="visual", dtype="float32", shape=[10, 16])]
    with pytest.raises(UserError, match="audio stream"):
        build_model(config, pooled, 5, task="localisation")
    with pytest.raises(UserError, match="audio stream"):
        build_model(config, SMALL_SPECS[:1], 5, task="localisation")
    shorter = [SMALL_SPECS[0], ModalitySpec(name="visual", dtype="float16", shape=[8, 2, 2, 16])]
    with pytest.raises(UserError, match="10 segments"):
        build_model(config, shorter, 5, task="localisation")


def test_trains_with_the_official_loss_and_is_valued_by_input_masking(ave_data, tmp_path):
    recipe = tmp_path / "ave_att.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "ave_att",
                "seeds": [0],
                "data": {"path": str(ave_data)},
                "task": {"name": "localisation", "loss": "official"},
                "model": {"ave_att": {"hidden_dim": 16, "hidden_size": 32, "fusion_hidden": 16}},
                "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                "train": {"epochs": 8, "batch_size": 8, "eval_every": 2},
                "output": str(tmp_path / "runs"),
            }
        )
    )
    run = Trainer(load_recipe(recipe), 0).run().run_dir
    summary = json.loads((run / SUMMARY).read_text())
    preds = pd.read_parquet(run / PREDICTIONS)
    target = np.stack(preds["target"].to_list())
    background = (target == target.max()).mean()
    assert summary["test_seg_acc"] > max(background, 0.6) + 0.15
    assert summary["best_epoch"] % 2 == 0

    valued = value_checkpoint(run / BEST, config=ValuationConfig(mask="input"))
    wide = valued.table.pivot(index="sample_id", columns="modality", values="contribution")
    assert list(wide.columns) == ["audio", "visual"]
    assert np.all(np.isfinite(wide.to_numpy()))
    first = valued.table.groupby("sample_id").first()
    assert np.allclose(first["pred"] * 2, first["v_full"])
    with pytest.raises(UserError, match="attended by the audio"):
        value_checkpoint(run / BEST, config=ValuationConfig(mask="feature"))
