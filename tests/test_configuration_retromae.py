"""RetroMAEConfig: the authors' defaults, validation at the boundary, round trips."""

import pytest
from transformers import AutoConfig, BertConfig

from retromae import RetroMAEConfig


def test_defaults_are_the_authors():
    config = RetroMAEConfig()
    assert config.model_type == "retromae"
    assert (config.encoder_mask_ratio, config.decoder_mask_ratio, config.num_decoder_layers) == (0.30, 0.50, 1)
    assert config.max_position_embeddings == 512
    assert config.to_dict()["hidden_size"] == BertConfig().hidden_size


def test_auto_map_points_every_auto_class_at_the_remote_code():
    assert RetroMAEConfig().auto_map == {
        "AutoConfig": "configuration_retromae.RetroMAEConfig",
        "AutoModel": "modeling_retromae.RetroMAEModel",
        "AutoModelForMaskedLM": "modeling_retromae.RetroMAEForMaskedLM",
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
        ({"hidden_size": 100, "num_attention_heads": 3}, r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"),
    ],
)
def test_invalid_values_raise_value_error_naming_field_and_value(fields, message):
    with pytest.raises(ValueError, match=message):
        RetroMAEConfig(**fields)


def test_save_and_load_round_trip(tmp_path):
    config = RetroMAEConfig(num_hidden_layers=3, encoder_mask_ratio=0.15, decoder_mask_ratio=0.7)
    config.save_pretrained(tmp_path)
    loaded = RetroMAEConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert (tmp_path / "configuration_retromae.py").exists()
    remote = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(remote).__name__ == "RetroMAEConfig"
    assert remote.decoder_mask_ratio == 0.7


def test_saved_config_reads_as_a_bert_config(tmp_path):
    RetroMAEConfig(num_hidden_layers=3, hidden_size=96, num_attention_heads=4).save_pretrained(tmp_path)
    bert = BertConfig.from_pretrained(tmp_path)
    assert (bert.num_hidden_layers, bert.hidden_size) == (3, 96)
