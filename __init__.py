"""RetroMAE: retrieval-oriented pre-training of BERT-like encoders, native to Hugging Face.

The imports are absolute: this file is the package's `__init__` once installed, and the
repository's top level, where test runners may import it on its own.
"""

from retromae.collator import RetroMAECollator
from retromae.configuration_retromae import RetroMAEConfig
from retromae.modeling_retromae import (
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
