"""RetroMAE: retrieval-oriented pre-training of masked-LM encoders, native to Hugging Face.

The imports are absolute: this file is the package's `__init__` once installed, and the
repository's top level, where test runners may import it on its own.
"""

import importlib

from transformers import AutoConfig

from retromae.collator import RetroMAECollator
from retromae.configuration_retromae import RetroMAEConfig
from retromae.modeling_retromae import (
    ENCODER_FAMILIES,
    EncoderFamily,
    EnhancedDecodingMask,
    RetroMAEForMaskedLM,
    RetroMAEForPreTraining,
    RetroMAEForPreTrainingOutput,
    RetroMAEModel,
    RetroMAEModelOutput,
    register_family,
)


# With the package installed, transformers reads a RetroMAE config.json without remote code, so
# AutoTokenizer (which loads the config first) does not stop to ask whether to trust it. The
# models still come from a folder's own code under `trust_remote_code=True`.
AutoConfig.register(RetroMAEConfig.model_type, RetroMAEConfig)

__version__ = "0.1.0"


# Imported on first use: `RetroMAELoss` brings in sentence-transformers, which pre-training does not need,
# and the pre-training run the transformers Trainer, which the model does not need.
LAZY = {
    "RetroMAELoss": "retromae.losses",
    "pretrain": "retromae.pretraining",
    "PretrainingSettings": "retromae.settings",
    "PretrainingResult": "retromae.run_record",
}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'retromae' has no attribute {name!r}")

__all__ = [
    "ENCODER_FAMILIES",
    "EncoderFamily",
    "EnhancedDecodingMask",
    "RetroMAECollator",
    "RetroMAEConfig",
    "RetroMAEForMaskedLM",
    "RetroMAEForPreTraining",
    "RetroMAEForPreTrainingOutput",
    "RetroMAEModel",
    "RetroMAELoss",
    "RetroMAEModelOutput",
    "PretrainingResult",
    "PretrainingSettings",
    "pretrain",
    "register_family",
]
