"""Tian et al.'s supervised AVE localisation baseline (A+V-att, ECCV 2018), as one model.

The official code is `att_Net` in `models.py` lines 9-82 of YapengTian/AVE-ECCV18 @
93f843fed72fb17394df76330df958b0c2dbde76, built as `att_Net(128, 128, 512, 29)` by
`supervised_main.py` line 59. Per one-second segment t of a clip:

- audio-guided visual attention (lines 46-59): with V the segment's R regions of the visual map
  [R, Dv] (R = 7 x 7, Dv = 512 in the released features) and a its audio embedding [Da],
  v = ReLU(affine_video V) [R, H], g = ReLU(affine_audio a) [H] (H = `hidden_size`),
  content = affine_v v [R, R] + (affine_g g)[:, None], z = affine_h tanh(content) [R],
  alpha = softmax(z) over the regions, attended visual = alpha V [Dv] (the raw map, not v).
  The audio term is added as a column, one value per region (`unsqueeze(2)` at line 54), as the
  code does; the code's 49 in affine_v, affine_g and affine_h is the region count, here taken
  from the data's grid;
- temporal modelling (lines 62-71): a BiLSTM over the segments of the raw audio and one over the
  attended visual features, `hidden_dim` per direction, zero initial states;
- fusion and the per-segment classifier (lines 74-78): concatenated LSTM outputs -> ReLU ->
  Linear(4 hidden_dim -> 64) -> ReLU -> Linear(64 -> classes).
- Init (lines 33-42): Xavier-uniform weights of the seven Linear layers; their biases and the
  LSTMs keep PyTorch's defaults.

Deviations: the logits are returned raw, not softmaxed (line 79): the localisation task's
`official` loss applies the softmax before `MultiLabelSoftMarginLoss`, as `supervised_main.py`
line 104 does on the softmaxed output; argmax, hence the segment accuracy, is the same. The
input sizes (audio 128, visual 512, 10 segments, 49 regions: lines 16-17, 20-21, 46, 69-71) come
from the data's modality specs. `att_Net`'s `embedding_dim` argument is never read by the code,
so it is not a setting here.

The visual stream is attended by the audio before any per-modality feature exists, so the model
is not decomposable: no unimodal logits, no feature masking; valuation masks inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.config import AVAttConfig
from mmval.models.output import ModelOutput


def stream_specs(specs: list[ModalitySpec]) -> tuple[ModalitySpec, ModalitySpec]:
    """(audio, visual): an audio stream [T, D] and a visual map [T, ..., D] with the same T, both
    stored feature tensors (not frames or token ids)."""
    streams = [s for s in specs if s.encoding == "raw" and len(s.shape) == 2]
    maps = [s for s in specs if s.encoding == "raw" and len(s.shape) >= 3]
    if len(specs) != 2 or len(streams) != 1 or len(maps) != 1:
        shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in specs)
        raise UserError(
            "model.ave_att (Tian et al.'s audio-guided attention model) needs two modalities "
            "of stored features: an audio stream [segments, features] and a visual map "
            "[segments, ..., channels] "
            f"(AVE: audio [10, 128], visual [10, 7, 7, 512]); the data gives {shapes}."
        )
    audio, visual = streams[0], maps[0]
    if audio.shape[0] != visual.shape[0]:
        raise UserError(
            f"model.ave_att pairs audio and visual segments: {audio.name} has {audio.shape[0]} "
            f"segments, {visual.name} {visual.shape[0]}."
        )
    return audio, visual


class AVAttModel(nn.Module):
    """`att_Net` sized from the data: per-segment logits [B, T, classes]."""

    def __init__(self, config: AVAttConfig, specs: list[ModalitySpec], num_classes: int) -> None:
        super().__init__()
        audio, visual = stream_specs(specs)
        self.modalities = [s.name for s in specs]
        self.audio_name, self.visual_name = audio.name, visual.name
        audio_dim, channels = audio.shape[-1], visual.shape[-1]
        self.regions = math.prod(visual.shape[1:-1])
        self.lstm_audio = nn.LSTM(
            audio_dim, config.hidden_dim, batch_first=True, bidirectional=True
        )
        self.lstm_video = nn.LSTM(channels, config.hidden_dim, batch_first=True, bidirectional=True)
        self.affine_audio = nn.Linear(audio_dim, config.hidden_size)
        self.affine_video = nn.Linear(channels, config.hidden_size)
        self.affine_v = nn.Linear(config.hidden_size, self.regions, bias=False)
        self.affine_g = nn.Linear(config.hidden_size, self.regions, bias=False)
        self.affine_h = nn.Linear(self.regions, 1, bias=False)
        self.L1 = nn.Linear(4 * config.hidden_dim, config.fusion_hidden)
        self.L2 = nn.Linear(config.fusion_hidden, num_classes)
        for layer in (
            self.affine_v,
            self.affine_g,
            self.affine_h,
            self.L1,
            self.L2,
            self.affine_audio,
            self.affine_video,
        ):
            nn.init.xavier_uniform_(layer.weight)

    def attend(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The audio-guided attended visual features [B, T, channels] (models.py 46-59)."""
        b, t = audio.shape[:2]
        maps = visual.reshape(b * t, self.regions, visual.shape[-1])
        v = torch.relu(self.affine_video(maps))
        g = torch.relu(self.affine_audio(audio.reshape(b * t, -1)))
        content = self.affine_v(v) + self.affine_g(g).unsqueeze(2)
        z = self.affine_h(torch.tanh(content)).squeeze(2)
        alpha = z.softmax(-1).unsqueeze(1)
        return torch.bmm(alpha, maps).view(b, t, -1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        audio = inputs[self.audio_name].float()
        visual = inputs[self.visual_name].float()
        # no initial state given: PyTorch starts from zeros, as lines 62-65 do
        lstm_audio, _ = self.lstm_audio(audio)
        lstm_video, _ = self.lstm_video(self.attend(audio, visual))
        fused = torch.relu(torch.cat((lstm_audio, lstm_video), -1))
        logits = self.L2(torch.relu(self.L1(fused)))
        return ModelOutput(
            logits, {self.audio_name: lstm_audio, self.visual_name: lstm_video}, None
        )
