"""RetroMAEConfig: the authors' defaults, any encoder family, validation at the boundary, round trips."""

import inspect
import json

import pytest
from transformers import AutoConfig, BertConfig, ElectraConfig, ModernBertConfig, RobertaConfig

from retromae import PretrainingSettings, RetroMAECollator, RetroMAEConfig, RetroMAELoss
from retromae.settings import resolved
from retromae.configuration_retromae import SETTING_RULES


def test_defaults_are_the_authors():
    config = RetroMAEConfig()
    assert config.model_type == "retromae"
    assert (config.encoder_mask_ratio, config.decoder_mask_ratio, config.num_decoder_layers) == (0.30, 0.50, 1)
    assert isinstance(config.encoder, BertConfig)
    assert config.encoder.to_dict() == BertConfig().to_dict()


def test_the_objective_is_retromae_unless_dupmae_is_asked_for_with_the_authors_weight():
    assert RetroMAEConfig().objective == "retromae"
    config = RetroMAEConfig(objective="dupmae")
    assert (config.objective, config.bow_loss_weight) == ("dupmae", 0.1)
    assert RetroMAEConfig.from_dict(config.to_dict()).objective == "dupmae"


def test_dupmae_refuses_factorised_embeddings_that_cannot_take_the_sentence_embedding():
    with pytest.raises(ValueError, match="embedding_size 128: factorised embeddings are not supported"):
        RetroMAEConfig(encoder=ElectraConfig(embedding_size=128, hidden_size=256), objective="dupmae")


def test_auto_map_points_every_auto_class_at_the_remote_code():
    assert RetroMAEConfig().auto_map == {
        "AutoConfig": "configuration_retromae.RetroMAEConfig",
        "AutoModel": "modeling_retromae.RetroMAECheckpointEncoder",
        "AutoModelForMaskedLM": "modeling_retromae.RetroMAECheckpointMaskedLM",
        "AutoModelForPreTraining": "modeling_retromae.RetroMAEForPreTraining",
    }


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"encoder_mask_ratio": 1.5}, "encoder_mask_ratio must lie strictly between 0 and 1, got 1.5"),
        ({"encoder_mask_ratio": 0.0}, "encoder_mask_ratio must lie strictly between 0 and 1, got 0.0"),
        ({"decoder_mask_ratio": 1.0}, "decoder_mask_ratio must lie strictly between 0 and 1, got 1.0"),
        ({"decoder_mask_ratio": -0.5}, "decoder_mask_ratio must lie strictly between 0 and 1, got -0.5"),
        ({"num_decoder_layers": 0}, "num_decoder_layers must be at least 1, got 0"),
        ({"decoder_mask_patterns": 0}, "decoder_mask_patterns must be at least 1, got 0"),
        ({"hidden_size": 100, "num_attention_heads": 3}, r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"),
        ({"objective": "retromae3"}, "objective must be one of retromae, dupmae, got 'retromae3'"),
        ({"objective": "dupmae", "bow_loss_weight": -0.1}, "bow_loss_weight must be a finite number of at least 0, got -0.1"),
        ({"objective": "dupmae", "enhanced_decoding": False}, "objective='dupmae' needs enhanced_decoding=True"),
    ],
)
def test_invalid_values_raise_value_error_naming_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        RetroMAEConfig(**fields)


@pytest.mark.parametrize("encoder", [BertConfig(num_hidden_layers=3), RobertaConfig(num_hidden_layers=3), ModernBertConfig(num_hidden_layers=3)])
def test_save_and_load_round_trip_for_any_encoder(tmp_path, encoder):
    config = RetroMAEConfig(encoder=encoder, encoder_mask_ratio=0.15, decoder_mask_ratio=0.7)
    config.save_pretrained(tmp_path)
    loaded = RetroMAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.encoder) is type(encoder) and loaded.encoder.num_hidden_layers == 3
    assert (tmp_path / "configuration_retromae.py").exists()
    remote = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "RetroMAEConfig"
    assert remote.decoder_mask_ratio == 0.7


def test_a_config_of_an_earlier_version_reads_as_a_bert_encoder(tmp_path):
    """Earlier versions saved BERT's fields at the top level of a `retromae` config.json."""
    flat = BertConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=4).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(flat | {"model_type": "retromae", "decoder_mask_ratio": 0.6}))
    config = RetroMAEConfig.from_pretrained(tmp_path)
    assert isinstance(config.encoder, BertConfig)
    assert (config.encoder.num_hidden_layers, config.encoder.hidden_size, config.decoder_mask_ratio) == (3, 96, 0.6)


@pytest.mark.parametrize("encoder", [BertConfig(vocab_size=321), RobertaConfig(vocab_size=321)])
def test_text_config_is_the_encoders(encoder):
    """transformers reads the vocabulary (`vocab_size` when resizing, `tie_word_embeddings`) through `get_text_config()`."""
    config = RetroMAEConfig(encoder=encoder)
    assert config.get_text_config() is config.encoder
    assert config.get_text_config(decoder=True).vocab_size == 321


def test_the_collator_the_loss_and_the_cli_take_their_defaults_from_the_config():
    """One home for RetroMAE's settings: a default changed in RetroMAEConfig changes everywhere (a run fills its settings from it)."""
    config = RetroMAEConfig()
    for callable_ in (RetroMAECollator.__init__, RetroMAELoss.__init__):
        defaults = {name: parameter.default for name, parameter in inspect.signature(callable_).parameters.items() if name in SETTING_RULES or name == "enhanced_decoding"}
        assert defaults and defaults == {name: getattr(config, name) for name in defaults}
    settings = resolved(PretrainingSettings())
    assert {name: getattr(settings, name) for name in ("encoder_mask_ratio", "decoder_mask_ratio", "decoder_mask_patterns", "enhanced_decoding")} == {
        name: getattr(config, name) for name in ("encoder_mask_ratio", "decoder_mask_ratio", "decoder_mask_patterns", "enhanced_decoding")
    }
