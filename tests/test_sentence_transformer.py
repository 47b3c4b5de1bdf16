"""A RetroMAE folder as a SentenceTransformer: CLS pooling equal to the model's own sentence embedding."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertModel

from retromae import RetroMAEForMaskedLM, RetroMAEModel
from retromae.sentence_transformer import to_sentence_transformer

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
