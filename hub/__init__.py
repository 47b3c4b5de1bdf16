"""Hub release tooling: assemble, check and publish RetroMAE repositories; convert checkpoints of every supported family both ways."""

from retromae.hub.card import CardError, model_card
from retromae.hub.convert import convert, convert_sparse, export_plain
from retromae.hub.release import ReleaseError, release


__all__ = ["CardError", "ReleaseError", "convert", "convert_sparse", "export_plain", "model_card", "release"]
