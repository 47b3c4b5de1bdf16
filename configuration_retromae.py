"""RetroMAE configuration: a BERT encoder's settings plus the pre-training settings of RetroMAE.

This file is Hub remote code: it imports only transformers (and huggingface_hub, which
transformers itself depends on), so it runs unchanged when downloaded with a model.
"""

from huggingface_hub.dataclasses import strict
from transformers import BertConfig


# A pre-training checkpoint (encoder, MLM head and decoder) is a model type of its own.
AUTO_MAP = {
    "AutoConfig": "configuration_retromae.RetroMAEConfig",
    "AutoModel": "modeling_retromae.RetroMAEModel",
    "AutoModelForMaskedLM": "modeling_retromae.RetroMAEForMaskedLM",
    "AutoModelForPreTraining": "modeling_retromae.RetroMAEForPreTraining",
}
# A released encoder is a BERT checkpoint first: its config.json says `bert`, so every BERT tool
# takes it, and only the encoder classes point at this code, as an opt-in (trust_remote_code).
RELEASE_AUTO_MAP = {
    "AutoModel": "modeling_retromae.RetroMAEModel",
    "AutoModelForMaskedLM": "modeling_retromae.RetroMAEForMaskedLM",
}


@strict
class RetroMAEConfig(BertConfig):
    r"""
    Configuration of a RetroMAE model (Xiao et al., EMNLP 2022, arXiv 2205.12035).

    Every field of [`BertConfig`] describes the encoder, which is a full BERT of any size.
    The fields below describe RetroMAE pre-training; their defaults are the authors'.

    Args:
        encoder_mask_ratio (`float`, *optional*, defaults to 0.30):
            Share of the (non-special) tokens the encoder sees masked, chosen as whole words and
            replaced BERT-style (80% [MASK], 10% random, 10% unchanged). Paper range 0.15-0.30.
        decoder_mask_ratio (`float`, *optional*, defaults to 0.50):
            Share of the tokens hidden from each row of the enhanced-decoding attention mask
            (whole words, drawn afresh for every row). Paper range 0.50-0.70.
        num_decoder_layers (`int`, *optional*, defaults to 1):
            Transformer layers in the decoder. The paper uses one: a weak decoder forces the
            sentence embedding to carry the information.
        enhanced_decoding (`bool`, *optional*, defaults to `True`):
            Decode with two streams and the position-specific attention mask (paper §3.3). `False`
            is the paper's ablation: the decoder reads its aggressively masked copy of the input,
            [CLS] replaced by the sentence embedding, with ordinary self-attention, and predicts
            the masked tokens only. The collator must be built with the same setting.
        auto_map (`dict`, *optional*):
            Maps the Auto classes to this remote code; filled in so that `AutoConfig`,
            `AutoModel`, `AutoModelForMaskedLM` and `AutoModelForPreTraining` all resolve from a
            saved pre-training checkpoint with `trust_remote_code=True`. A released encoder is
            saved with a BERT config instead (see `release_config_dict`).

    Example:

    ```python
    >>> from retromae import RetroMAEConfig, RetroMAEForPreTraining
    >>> config = RetroMAEConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    >>> model = RetroMAEForPreTraining(config)
    ```
    """

    model_type = "retromae"

    encoder_mask_ratio: float = 0.30
    decoder_mask_ratio: float = 0.50
    num_decoder_layers: int = 1
    enhanced_decoding: bool = True

    def __post_init__(self, **kwargs):
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self._check_retromae_fields()
        super().__post_init__(**kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """
        The config dict of a checkpoint, a BERT one read as RetroMAE's.

        A BERT config.json (a RetroMAE release, or any BERT to start pre-training from) describes
        the encoder; RetroMAE's own fields, where the release kept them, are read too.
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "bert":
            encoder_only = ("model_type", "auto_map", "architectures")
            config_dict = {k: v for k, v in config_dict.items() if k not in encoder_only} | {"model_type": cls.model_type}
        return config_dict, kwargs

    def to_bert_config(self) -> BertConfig:
        """The encoder's settings alone, as a plain `BertConfig`: a BERT with the same weights loads under it."""
        bert_fields = BertConfig().to_dict()
        return BertConfig(**{k: v for k, v in self.to_dict().items() if k in bert_fields})

    def _check_retromae_fields(self):
        """Raise `ValueError` naming the field when a setting cannot describe a RetroMAE model."""
        for field in ("encoder_mask_ratio", "decoder_mask_ratio"):
            value = getattr(self, field)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{field} must lie strictly between 0 and 1, got {value!r}.")
        if self.num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be at least 1, got {self.num_decoder_layers!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )


def release_config_dict(config: BertConfig, architecture: str) -> dict:
    """
    The config.json of a released encoder: a `bert` config first, RetroMAE's code as an opt-in.

    Without `trust_remote_code` every loader sees a BERT (`BertModel`, `BertForMaskedLM`,
    sentence-transformers, BERT-only serving stacks); with it, `AutoModel` and
    `AutoModelForMaskedLM` resolve to the RetroMAE classes. RetroMAE's settings stay as keys
    of their own.
    """
    return config.to_dict() | {"model_type": "bert", "architectures": [architecture], "auto_map": dict(RELEASE_AUTO_MAP)}


RetroMAEConfig.register_for_auto_class()

__all__ = ["RetroMAEConfig", "release_config_dict"]
