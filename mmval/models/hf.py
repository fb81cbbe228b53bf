"""Text encoders from a local Hugging Face folder (`model.encoder: {kind: hf, path: ...}`).

The folder is what `save_pretrained` writes (or `huggingface-cli download <model> --local-dir`
fetches, run by the user): `config.json` and `model.safetensors` (preferred) or
`pytorch_model.bin`, with the tokenizer (`tokenizer.json` or `vocab.txt`) the data must be
prepared with. mmval never downloads: `from_pretrained(path, local_files_only=True)`.
`transformers` is the optional extra `mmval[hf]`, imported only when such a model is built.

Pooling: `pooler` is BERT's pooled output tanh(dense(h_[CLS])), what QMF's text branch returns
(`BertEncoder.forward`, the second output of `BertModel`, QingyangZhang/QMF
fe6c4c6ef7cb23f0a89594ee413d485f1854268b, text-image-classification/src/models/bert.py
lines 20-27; HF's `BertPooler` is the same layer); `cls` the last hidden state at position 0;
`mean` the mean of the last hidden states over the non-padding positions. As in QMF the
attention mask is `ids != pad` and the token types are all 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.config import HFEncoderConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def load_hf_model(path: Path, where: str) -> Any:
    """`AutoModel.from_pretrained(path, local_files_only=True)` in float32, or a UserError:
    transformers absent, the folder or its files missing, weights that leave parameters of the
    model uninitialised (named). Unexpected weights (the pre-training heads `cls.*` of a
    BertForMaskedLM checkpoint) are dropped, as `from_pretrained` does."""
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError(
            f"{where} is a Hugging Face model, and transformers is not installed: "
            "pip install 'mmval[hf]'."
        ) from None
    path = path.expanduser()
    if not path.is_dir():
        raise UserError(
            f"{where}: {path} is not a folder (a Hugging Face model folder holds config.json "
            "and model.safetensors; mmval never downloads models)."
        )
    found = sorted(p.name for p in path.iterdir())
    lacking = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        lacking.append(" or ".join(WEIGHT_FILES[::2]))
    if lacking:
        raise UserError(
            f"{where}: the folder {path} has no {' and no '.join(lacking)} (it holds: "
            f"{', '.join(found[:12]) or 'nothing'}). Fetch the model yourself, e.g. "
            f"huggingface-cli download bert-base-uncased --local-dir {path}."
        )
    try:
        model, info = AutoModel.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:  # transformers raises OSError, ValueError, RuntimeError, ...
        raise UserError(f"{where}: cannot load the Hugging Face model at {path}: {exc}") from None
    problems = [
        f"{label}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing", list(info.get("missing_keys") or [])),
            ("of another shape", [str(k) for k in info.get("mismatched_keys") or []]),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"{where}: the weights in {path} do not fit the {type(model).__name__} its "
            f"config.json describes ({'; '.join(problems)})."
        )
    return model


def check_vocabulary(spec: ModalitySpec, config: Any, where: str) -> None:
    """The data's token ids must be the model's: same vocabulary size, texts no longer than
    its position embeddings."""
    if spec.encoding != "tokens" or spec.vocab_size is None:
        raise UserError(
            f"{where} reads token ids; modality {spec.name!r} holds {spec.encoding} data of "
            f"shape {spec.shape}."
        )
    if spec.vocab_size != config.vocab_size:
        raise UserError(
            f"{where}: modality {spec.name!r} was tokenized with a vocabulary of "
            f"{spec.vocab_size} ids, the model has {config.vocab_size}: prepare the data with "
            "the model folder's tokenizer (mmval prep ... --set "
            "'text.tokenizer={kind: hf, path: <the folder>, max_length: 512}')."
        )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and spec.shape[0] > limit:
        raise UserError(
            f"{where}: modality {spec.name!r} stores {spec.shape[0]} tokens per text, the model "
            f"has {limit} positions: prepare it with text.tokenizer.max_length <= {limit}."
        )


class HFTextEncoder(nn.Module):
    """A Hugging Face model over token ids, pooled to one vector per text."""

    def __init__(self, spec: ModalitySpec, config: HFEncoderConfig) -> None:
        super().__init__()
        where = f"model.encoder (kind: hf) for {spec.name!r}"
        self.model = load_hf_model(config.path, where)
        check_vocabulary(spec, self.model.config, where)
        if config.pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise UserError(
                f"{where}: {type(self.model).__name__} has no pooler layer; use pooling: cls or "
                "mean."
            )
        self.pooling, self.pad_id = config.pooling, spec.pad_id
        self.out_dim = int(self.model.config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        keep = ids != self.pad_id
        out = self.model(
            input_ids=ids, attention_mask=keep.long(), token_type_ids=torch.zeros_like(ids)
        )
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
