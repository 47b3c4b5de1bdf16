"""A RetroMAE folder as a SentenceTransformer: CLS pooling equal to the model's own sentence embedding."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertModel

from retromae import RetroMAEForMaskedLM, RetroMAEModel
from retromae.sentence_transformer import release_max_seq_length, to_sentence_transformer

from conftest import TEXTS


@pytest.mark.parametrize("encoder_class", [RetroMAEModel, RetroMAEForMaskedLM])
def test_save_pretrained_alone_gives_a_sentence_transformer_with_the_models_embedding(tmp_path, tiny_config, tokenizer, encoder_class):
    folder = tmp_path / "saved"
    encoder = encoder_class(tiny_config.encoder).eval()
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"

    model = SentenceTransformer(str(folder))
    assert type(model[0].auto_model).__name__ == "BertModel"  # no remote code needed
    encoded = model.encode(TEXTS, convert_to_tensor=True)
    bert = encoder if encoder_class is RetroMAEModel else encoder.bert
    with torch.no_grad():
        expected = bert(**tokenizer(TEXTS, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=0)


def test_normalised_embeddings_have_unit_length(minilm_path):
    model = to_sentence_transformer(minilm_path, normalize=True)
    norms = model.encode(TEXTS, convert_to_tensor=True).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_plain_bert_checkpoint_gives_its_cls_state(minilm_path, tokenizer):
    encoded = to_sentence_transformer(minilm_path).encode(TEXTS[:2], convert_to_tensor=True)
    bert = BertModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        expected = bert(**tokenizer(TEXTS[:2], padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=0)


def test_save_pretrained_writes_the_model_config_sentence_transformers_itself_writes(tmp_path, tiny_config, tokenizer):
    """`model_type`, `__version__`, prompts and similarity: what `SentenceTransformer.save` writes for the same model."""
    RetroMAEModel(tiny_config.encoder).save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    SentenceTransformer(str(tmp_path / "saved")).save(str(tmp_path / "resaved"), create_model_card=False)
    ours, theirs = (json.loads((tmp_path / name / "config_sentence_transformers.json").read_text()) for name in ("saved", "resaved"))
    assert ours == theirs and ours["model_type"] == "SentenceTransformer"


@pytest.mark.parametrize(
    "own, max_length, expected",
    [(256, 64, 256), (256, 512, 512), (None, 64, 64)],
    ids=["the-models-own-when-longer", "max-length-when-longer", "max-length-without-sentence-transformers-files"],
)
def test_a_release_truncates_at_the_longest_length_its_encoder_was_trained_to_embed(tmp_path, own, max_length, expected):
    if own is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": own, "do_lower_case": False}))
    assert release_max_seq_length(str(tmp_path), max_length) == expected
    assert release_max_seq_length(None, max_length) == max_length  # --config: a model that starts from nothing
