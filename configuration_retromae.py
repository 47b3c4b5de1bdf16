"""RetroMAE configuration: the encoder's own configuration plus the pre-training settings of RetroMAE.

This file is Hub remote code: it imports only transformers (and huggingface_hub, which
transformers itself depends on), so it runs unchanged when downloaded with a model.
"""

import math
from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, BertConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# A pre-training checkpoint (encoder, MLM head and decoder) is a model type of its own.
# `AutoModel` and `AutoModelForMaskedLM` give its encoder, without and with the MLM head.
AUTO_MAP = {
    "AutoConfig": "configuration_retromae.RetroMAEConfig",
    "AutoModel": "modeling_retromae.RetroMAECheckpointEncoder",
    "AutoModelForMaskedLM": "modeling_retromae.RetroMAECheckpointMaskedLM",
    "AutoModelForPreTraining": "modeling_retromae.RetroMAEForPreTraining",
}
RETROMAE_FIELDS = ("encoder_mask_ratio", "decoder_mask_ratio", "num_decoder_layers", "enhanced_decoding", "decoder_mask_patterns", "objective", "bow_loss_weight")
# `retromae` is the paper's objective; `dupmae` adds RetroMAE v2's bag-of-words objective (Xiao et al., ACL 2023).
OBJECTIVES = ("retromae", "dupmae")
# What each numeric setting allows, in words and as a test; the config, the collator and the CLI all check with it.
SETTING_RULES = {
    "encoder_mask_ratio": ("must lie strictly between 0 and 1", lambda value: 0.0 < value < 1.0),
    "decoder_mask_ratio": ("must lie strictly between 0 and 1", lambda value: 0.0 < value < 1.0),
    "num_decoder_layers": ("must be at least 1", lambda value: value >= 1),
    "decoder_mask_patterns": ("must be at least 1", lambda value: value >= 1),
}


def setting_problem(name: str, value) -> str | None:
    """What is wrong with `value` for RetroMAE's setting `name` ("must ..., got ..."), or `None` where it is allowed."""
    rule, allowed = SETTING_RULES[name]
    return None if allowed(value) else f"{rule}, got {value!r}"


def check_settings(**settings) -> None:
    """Raise `ValueError` naming the first of RetroMAE's `settings` whose value is not allowed."""
    for name, value in settings.items():
        problem = setting_problem(name, value)
        if problem:
            raise ValueError(f"{name} {problem}.")


@strict
class RetroMAEConfig(PreTrainedConfig):
    r"""
    Configuration of a RetroMAE model (Xiao et al., EMNLP 2022, arXiv 2205.12035).

    `encoder` is the configuration of the masked-LM encoder, of any family of `ENCODER_FAMILIES`
    (modeling_retromae.py); the decoder takes its width from it. The fields below describe RetroMAE pre-training; their defaults are the authors'.

    Args:
        encoder (`PreTrainedConfig` or `dict`, *optional*):
            The encoder's configuration. Left out, the keyword arguments that are `BertConfig`
            fields describe a BERT encoder (the paper's), which is also how checkpoints written by
            earlier versions of this package, whose config.json held BERT's fields, are read.
        encoder_mask_ratio (`float`, *optional*, defaults to 0.30):
            Share of the (non-special) tokens the encoder sees masked, chosen as whole words and
            replaced BERT-style (80% mask token, 10% random, 10% unchanged). Paper range 0.15-0.30.
        decoder_mask_ratio (`float`, *optional*, defaults to 0.50):
            Share of the tokens hidden from each row of the enhanced-decoding attention mask (whole
            words; each row has a pattern of its own up to `decoder_mask_patterns` tokens, and beyond
            them rows share a pool of that many patterns per example). Paper range 0.50-0.70.
        num_decoder_layers (`int`, *optional*, defaults to 1):
            Transformer layers in the decoder. The paper uses one: a weak decoder forces the
            sentence embedding to carry the information.
        enhanced_decoding (`bool`, *optional*, defaults to `True`):
            Decode with two streams and the position-specific attention mask (paper §3.3). `False`
            is the paper's ablation: the decoder reads its aggressively masked copy of the input,
            the first token replaced by the sentence embedding, with ordinary self-attention, and
            predicts the masked tokens only. The collator must be built with the same setting
            (`RetroMAECollator.from_config`).
        decoder_mask_patterns (`int`, *optional*, defaults to 256):
            Whole-word patterns the collator draws per example for the enhanced-decoding mask: every
            row has its own up to this many tokens; in longer sequences each row takes one of them
            at random, as the authors' code does (with 256).
        objective (`str`, *optional*, defaults to `"retromae"`):
            `"retromae"`, the paper's loss `L_enc + L_dec`; or `"dupmae"`, RetroMAE v2 (DupMAE, Xiao et al.,
            ACL 2023, the authors' `modeling_duplex.py`): `L_enc + L_dec + bow_loss_weight x L_bow`, where
            `L_bow` trains the maximum over positions of the encoder's MLM scores to predict the passage's bag
            of words, and the decoder's query stream is `h_X` sent through the encoder's embeddings module.
            DupMAE needs enhanced decoding, and an encoder whose embeddings are as wide as its hidden states
            (the query stream feeds `h_X` to the embeddings module).
        bow_loss_weight (`float`, *optional*, defaults to 0.1):
            The weight of DupMAE's bag-of-words loss (the authors' default); at least 0. Read only by `"dupmae"`.

    Example:

    ```python
    >>> from transformers import RobertaConfig
    >>> from retromae import RetroMAEConfig, RetroMAEForPreTraining
    >>> config = RetroMAEConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)
    >>> model = RetroMAEForPreTraining(config)  # a BERT encoder
    >>> config = RetroMAEConfig(encoder=RobertaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2))
    ```
    """

    model_type = "retromae"
    sub_configs_defaults = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder: PreTrainedConfig | dict | None = None
    encoder_mask_ratio: float = 0.30
    decoder_mask_ratio: float = 0.50
    num_decoder_layers: int = 1
    enhanced_decoding: bool = True
    decoder_mask_patterns: int = 256
    objective: str = "retromae"
    bow_loss_weight: float = 0.1

    def __post_init__(self, **kwargs):
        if self.encoder is None:
            bert_fields = {field.name for field in fields(BertConfig)} - {field.name for field in fields(PreTrainedConfig)}
            self.encoder = {"model_type": "bert"} | {name: kwargs.pop(name) for name in list(kwargs) if name in bert_fields}
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)
        self._check_retromae_fields()

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The encoder's config: it holds the vocabulary and embeddings that transformers reads through this (`vocab_size` when resizing)."""
        return self.encoder.get_text_config(decoder=decoder, encoder=encoder)

    def _check_retromae_fields(self):
        """Raise `ValueError` naming the field when a setting cannot describe a RetroMAE model."""
        check_settings(**{name: getattr(self, name) for name in SETTING_RULES})
        width, heads = self.encoder.hidden_size, self.encoder.num_attention_heads
        if width % heads != 0:
            raise ValueError(f"hidden_size ({width}) must be divisible by num_attention_heads ({heads}).")
        self._check_objective()

    def _check_objective(self):
        """Raise `ValueError` naming the field when the objective cannot be trained as configured."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        if not 0.0 <= self.bow_loss_weight < math.inf:
            raise ValueError(f"bow_loss_weight must be a finite number of at least 0, got {self.bow_loss_weight!r}.")
        if self.objective != "dupmae":
            return
        if not self.enhanced_decoding:
            raise ValueError("objective='dupmae' needs enhanced_decoding=True: DupMAE's query stream is enhanced decoding's.")
        embedding_size = getattr(self.encoder, "embedding_size", None) or self.encoder.hidden_size
        if embedding_size != self.encoder.hidden_size:
            raise ValueError(
                f"objective='dupmae' sends h_X (hidden_size {self.encoder.hidden_size}) through the encoder's embeddings, "
                f"which take embedding_size {embedding_size}: factorised embeddings are not supported."
            )


def release_config_dict(config: PreTrainedConfig, architecture: str, auto_map: dict | None) -> dict:
    """
    The config.json of a released encoder: the family's own config first, RetroMAE's code as an opt-in.

    Without `trust_remote_code` every loader sees a checkpoint of the encoder's family (a `bert`,
    `roberta`, `modernbert`, ... config naming the family's own `architecture`); with it,
    `AutoModel` and `AutoModelForMaskedLM` resolve to the RetroMAE classes in `auto_map` (none for
    a family added by `register_family`, whose classes no file holds). RetroMAE's settings, where
    the config carries them, stay as keys of their own. The fields are those `save_pretrained`
    writes (`to_diff_dict`): no `_name_or_path`, the folder it was loaded from.
    """
    remote_code = {} if auto_map is None else {"auto_map": dict(auto_map)}
    return config.to_diff_dict() | {"architectures": [architecture]} | remote_code


RetroMAEConfig.register_for_auto_class()

__all__ = ["OBJECTIVES", "RETROMAE_FIELDS", "RetroMAEConfig", "check_settings", "release_config_dict", "setting_problem"]
