"""Multimodal classifiers: one encoder per modality, a fusion head, per-modality logits."""

from mmval.models.multimodal import ModelConfig, ModelOutput, MultimodalModel, build_model

__all__ = ["ModelConfig", "ModelOutput", "MultimodalModel", "build_model"]
