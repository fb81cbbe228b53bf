"""mmval: balanced multimodal learning and per-sample modality valuation."""

__version__ = "0.1.0"
