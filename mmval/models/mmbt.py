"""MMBT (Kiela et al., 2019) as QMF runs it (`--model mmbt`): the image enters BERT as tokens.

Followed line by line from QingyangZhang/QMF fe6c4c6ef7cb23f0a89594ee413d485f1854268b,
text-image-classification/src/models/mmbt.py (`ImageBertEmbeddings`, `MultimodalBertEncoder`,
`MultimodalBertClf`), image.py (`ImageEncoder`) and data/dataset.py:

- image (image.py 15-45): a torchvision ResNet without `avgpool` and `fc`, its last map pooled
  to N embeddings (`num_image_embeds`) on QMF's grid ((N, 1) for N in 1, 2, 3, 5, 7; (2, 2),
  (3, 2), (4, 2), (3, 3) for 4, 6, 8, 9), average or max (`img_embed_pool_type`), read
  row-major into [B, N, C]; QMF uses ResNet-152 with ImageNet weights and its own
  normalisation (helpers.py 24-35);
- embeddings (mmbt.py 17-52): `Linear(C, hidden)` of each image embedding between the word
  embeddings of [CLS] and [SEP], positions 0..N+1, token type 0, sharing BERT's word, position
  and token-type embeddings and LayerNorm; the text (mmbt.py 101) through BERT's embeddings with
  positions from 0 again and token type 1 (dataset.py 34 and 118-121: the text is its bare
  WordPiece ids, no [CLS], no [SEP]);
- encoder (mmbt.py 80-109): attention mask ones over the N + 2 image positions, then the
  text's mask; BERT's encoder over the concatenation; BERT's pooler at position 0 (the image
  part's [CLS]); `MultimodalBertClf` (112-121): `Linear(hidden, classes)` on the pooled vector.

In mmval the text is stored as `[CLS]` + pieces[:L-1] (prep with `text.tokenizer: {kind: hf,
path: <the BERT folder>, sep: false}`, QMF's BERT input, dataset.py 89); the model drops the
stored first id, which leaves QMF's MMBT text exactly (its `[SEP]` + pieces[:L-1], first token
dropped). Prepared with `sep: true` the trailing [SEP] stays in the text: a deviation.

Deviation: the image part and the text part pass one HF `BertEmbeddings` call (inputs_embeds,
explicit position and token-type ids), so the image part's dropout is BERT's
`hidden_dropout_prob` rather than QMF's `--dropout`; both are 0.1 in every QMF shell script and
in bert-base-uncased. The attention mask is HF's (the dtype's minimum) rather than -10000: the
masked positions get weight 0 either way.

Not decomposable: the modalities mix inside BERT, so there are no per-modality features or
logits; it is trained with `concat` (the cross-entropy of QMF's train.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from mmval.data.extract.text import HFTokenizer, HFTokenizerConfig
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.config import MMBTConfig
from mmval.models.encoders import IMAGENET_MEAN, IMAGENET_STD, _load_weights, load_state
from mmval.models.hf import check_vocabulary, load_hf_model
from mmval.models.output import ModelOutput

# QMF's image statistics (MMBT's), helpers.py 30-33
QMF_MEAN = (0.46777044, 0.44531429, 0.40661017)
QMF_STD = (0.12221994, 0.12145835, 0.14380469)
# num_image_embeds -> the pooled grid (rows, columns), image.py 29-38
GRIDS = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2), 7: (7, 1), 8: (4, 2)}
GRIDS[9] = (3, 3)
CHANNELS = {18: 512, 34: 512, 50: 2048, 101: 2048, 152: 2048}


def resnet_trunk(depth: int, pretrained: Path | None) -> nn.Sequential:
    """`torchvision.models.resnet<depth>` up to layer4 (`children()[:-2]`, image.py 20),
    loaded from a local file of the whole network: its `fc` may be absent (a trunk saved by a
    user) and its `num_batches_tracked` buffers too (filled with 0, as torch's BatchNorm does
    for old state dicts); any other missing, unexpected or re-shaped key is a UserError."""
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if pretrained is not None:
        state = dict(_load_weights(pretrained))
        for key, value in net.state_dict().items():
            optional = key.startswith("fc.") or key.endswith("num_batches_tracked")
            if optional and key not in state:
                state[key] = torch.zeros_like(value) if key.endswith("tracked") else value
        load_state(net, state, f"model.mmbt.pretrained {pretrained}")
    return nn.Sequential(*list(net.children())[:-2])


def mmbt_specs(specs: list[ModalitySpec]) -> tuple[ModalitySpec, ModalitySpec]:
    """(image, text): one image per sample [1, H, W, 3] and token ids."""
    images = [s for s in specs if len(s.shape) == 4 and s.shape[0] == 1 and s.shape[-1] == 3]
    texts = [s for s in specs if s.encoding == "tokens"]
    if len(specs) != 2 or len(images) != 1 or len(texts) != 1:
        shapes = ", ".join(f"{s.name} {list(s.shape)} ({s.encoding})" for s in specs)
        raise UserError(
            "model.mmbt needs two modalities: one RGB image per sample [1, H, W, 3] and token "
            f"ids; the data gives {shapes}."
        )
    return images[0], texts[0]


class MMBTModel(nn.Module):
    """`MultimodalBertClf`: logits [B, classes] from an image and a text."""

    def __init__(self, config: MMBTConfig, specs: list[ModalitySpec], num_classes: int) -> None:
        super().__init__()
        if config.embeds not in GRIDS:
            raise UserError(f"model.mmbt.embeds: QMF pools to 1-9 embeddings, not {config.embeds}.")
        image, text = mmbt_specs(specs)
        self.modalities = [s.name for s in specs]
        self.image_name, self.text_name, self.pad_id = image.name, text.name, text.pad_id
        self.bert = load_hf_model(config.bert, "model.mmbt.bert")
        bert_config = self.bert.config
        check_vocabulary(text, bert_config, "model.mmbt.bert")
        if getattr(self.bert, "pooler", None) is None or bert_config.type_vocab_size < 2:
            raise UserError(
                f"model.mmbt.bert: MMBT needs a BERT with a pooler and two token types; "
                f"{config.bert} holds a {type(self.bert).__name__} with "
                f"{bert_config.type_vocab_size} token type(s)."
            )
        if config.embeds + 2 > bert_config.max_position_embeddings:
            raise UserError(
                f"model.mmbt.embeds {config.embeds} + 2 exceeds the model's "
                f"{bert_config.max_position_embeddings} positions."
            )
        vocabulary = HFTokenizer.load(HFTokenizerConfig(path=config.bert)).tokenizer
        ids = {t: vocabulary.token_to_id(t) for t in ("[CLS]", "[SEP]")}
        if None in ids.values():
            raise UserError(f"model.mmbt.bert: the tokenizer at {config.bert} lacks [CLS]/[SEP].")
        self.register_buffer("special_ids", torch.tensor([ids["[CLS]"], ids["[SEP]"]]))
        self.image = resnet_trunk(config.depth, config.pretrained)
        pool = nn.AdaptiveAvgPool2d if config.pool == "avg" else nn.AdaptiveMaxPool2d
        self.pool = pool(GRIDS[config.embeds])
        hidden = int(bert_config.hidden_size)
        self.img_embeddings = nn.Linear(CHANNELS[config.depth], hidden)
        self.clf = nn.Linear(hidden, num_classes)
        mean, std = (
            (QMF_MEAN, QMF_STD) if config.normalize == "qmf" else (IMAGENET_MEAN, IMAGENET_STD)
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.embeds = config.embeds

    def image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W, 3] uint8 -> [B, N, C] (image.py 40-45)."""
        x = frames[:, 0].permute(0, 3, 1, 2).float().div(255.0)
        out = self.pool(self.image((x - self.mean) / self.std))
        return out.flatten(2).transpose(1, 2)

    def joint_inputs(
        self, img: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, position_ids, token_type_ids, attention_mask) of `[CLS] img_1..N
        [SEP] text` (mmbt.py 28-52, 82-103)."""
        b, t, n = img.shape[0], text.shape[1], self.embeds
        words = self.bert.embeddings.word_embeddings
        cls, sep = words(self.special_ids).unsqueeze(0).expand(b, 2, -1).unbind(1)
        embeds = torch.cat([cls[:, None], self.img_embeddings(img), sep[:, None], words(text)], 1)
        arange = torch.arange(max(n + 2, t), device=text.device)
        positions = torch.cat([arange[: n + 2], arange[:t]]).expand(b, -1)
        types = torch.cat([torch.zeros(n + 2), torch.ones(t)]).long().to(text.device).expand(b, -1)
        mask = torch.cat(
            [
                torch.ones(b, n + 2, dtype=torch.long, device=text.device),
                (text != self.pad_id).long(),
            ],
            1,
        )
        return embeds, positions, types, mask

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        text = inputs[self.text_name].long()[:, 1:]  # the stored [CLS] dropped
        img = self.image_embeddings(inputs[self.image_name])
        embeds, positions, types, mask = self.joint_inputs(img, text)
        out = self.bert(
            inputs_embeds=embeds, position_ids=positions, token_type_ids=types, attention_mask=mask
        )
        return ModelOutput(self.clf(out.pooler_output), {}, None)
