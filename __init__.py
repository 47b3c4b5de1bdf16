"""RetroMAE: retrieval-oriented pre-training of BERT-like encoders, native to Hugging Face."""

from .collator import RetroMAECollator
from .configuration_retromae import RetroMAEConfig
from .modeling_retromae import (
    RetroMAEForMaskedLM,
    RetroMAEForPreTraining,
    RetroMAEForPreTrainingOutput,
    RetroMAEModel,
    RetroMAEModelOutput,
)


__version__ = "0.1.0"

__all__ = [
    "RetroMAECollator",
    "RetroMAEConfig",
    "RetroMAEForMaskedLM",
    "RetroMAEForPreTraining",
    "RetroMAEForPreTrainingOutput",
    "RetroMAEModel",
    "RetroMAEModelOutput",
]
