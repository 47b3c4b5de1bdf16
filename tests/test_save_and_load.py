"""Round trips: save_pretrained, the Auto classes through remote code, a Hub cache, real BERT weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    BertForMaskedLM,
    BertModel,
)

from retromae import RetroMAEConfig, RetroMAEForPreTraining, RetroMAEModel

from conftest import place_in_hub_cache


@pytest.fixture
def saved(tmp_path, tiny_config):
    """A RetroMAEForPreTraining saved with save_pretrained, and the model itself."""
    model = RetroMAEForPreTraining(tiny_config).eval()
    model.save_pretrained(tmp_path / "retromae")
    return tmp_path / "retromae", model


def test_saved_folder_holds_safetensors_config_with_auto_map_and_both_code_files(saved):
    folder, _ = saved
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "configuration_retromae.py",
        "model.safetensors",
        "modeling_retromae.py",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "retromae"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForPreTraining"}


def test_every_auto_class_resolves_through_remote_code(saved):
    folder, _ = saved
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "RetroMAEConfig"
    for auto_class, expected in (
        (AutoModel, "RetroMAEModel"),
        (AutoModelForMaskedLM, "RetroMAEForMaskedLM"),
        (AutoModelForPreTraining, "RetroMAEForPreTraining"),
    ):
        loaded = auto_class.from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__name__ == expected
        assert type(loaded).__module__.startswith("transformers_modules.")


def test_auto_models_from_the_folder_give_identical_outputs(saved, batch):
    folder, model = saved
    with torch.no_grad():
        reloaded = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
        assert torch.equal(reloaded(**batch).loss, model(**batch).loss)
        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        ids, mask = batch["decoder_input_ids"], batch["encoder_attention_mask"]
        assert torch.equal(encoder(ids, attention_mask=mask).sentence_embedding, model.encoder.bert(ids, attention_mask=mask).last_hidden_state[:, 0])
        masked_lm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
        expected = model.encoder.cls(model.encoder.bert(ids, attention_mask=mask).last_hidden_state)
        assert torch.equal(masked_lm(ids, attention_mask=mask).logits, expected)


def test_embedding_model_loads_a_checkpoint_or_release_quietly(saved, tmp_path, no_transformers_warnings):
    folder, model = saved
    model.save_pretrained(tmp_path / "release", state_dict={k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")})
    for source in (folder, tmp_path / "release"):  # with and without the decoder; both with the MLM head
        assert type(AutoModel.from_pretrained(source, trust_remote_code=True)).__name__ == "RetroMAEModel"


def test_no_pickle_is_written(saved):
    folder, _ = saved
    assert not [name for name in os.listdir(folder) if name.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_loads_by_repo_id_from_an_offline_hub_cache(saved, tmp_path, batch):
    folder, model = saved
    cache = tmp_path / "hub"
    place_in_hub_cache(cache, "org/retromae", {"0" * 40: folder}, main="0" * 40)
    ids = batch["decoder_input_ids"][:2]
    expected = model.encoder.bert(ids).last_hidden_state[:, 0]
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForPreTraining
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        AutoModelForPreTraining.from_pretrained("org/retromae", trust_remote_code=True)
        model = AutoModel.from_pretrained("org/retromae", trust_remote_code=True).eval()
        print(type(model).__name__)
        torch.save(model(ids).sentence_embedding.detach(), {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RetroMAEModel" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected.detach())


def test_real_bert_checkpoint_gives_the_same_hidden_states(minilm_path, tokenizer, tmp_path):
    bert = BertModel.from_pretrained(minilm_path).eval()
    retromae = RetroMAEModel.from_pretrained(minilm_path).eval()
    inputs = tokenizer(["RetroMAE reuses BERT.", "A second, longer sentence about dense retrieval."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(**inputs).last_hidden_state
        torch.testing.assert_close(retromae(**inputs).last_hidden_state, expected, atol=1e-5, rtol=0)
        retromae.save_pretrained(tmp_path / "converted")
        assert type(AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True)).__name__ == "RetroMAEModel"
        reloaded = BertModel.from_pretrained(tmp_path / "converted").eval()
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_pretraining_starts_from_a_bert_for_masked_lm_checkpoint(tmp_path, tiny_config):
    bert_config = tiny_config.encoder
    source = BertForMaskedLM(bert_config)
    source.save_pretrained(tmp_path / "bert")
    model = RetroMAEForPreTraining.from_pretrained(tmp_path / "bert")
    assert isinstance(model.config, RetroMAEConfig)
    source_state = source.state_dict()
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, source_state[name]), name
    decoder_query = model.decoder.layers[0].attention.self.query.weight
    assert decoder_query.std().item() == pytest.approx(bert_config.initializer_range, rel=0.3)
    assert torch.equal(model.decoder.layers[0].output.LayerNorm.weight, torch.ones(bert_config.hidden_size))


def test_pretraining_starts_from_a_plain_bert_checkpoint(minilm_path):
    model = RetroMAEForPreTraining.from_pretrained(minilm_path)
    encoder_state = model.encoder.bert.state_dict()
    for name, tensor in BertModel.from_pretrained(minilm_path).state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(encoder_state[name], tensor), name
    assert model.encoder.cls.predictions.decoder.weight is model.encoder.bert.embeddings.word_embeddings.weight


def test_tokenizer_of_a_saved_folder_loads_without_asking_to_trust_code(saved, tokenizer, tmp_path):
    folder, _ = saved
    tokenizer.save_pretrained(folder)
    script = f"import retromae\nfrom transformers import AutoTokenizer\nprint(type(AutoTokenizer.from_pretrained({str(folder)!r})).__name__)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "BertTokenizer" in result.stdout
    assert "custom code" not in result.stdout + result.stderr
