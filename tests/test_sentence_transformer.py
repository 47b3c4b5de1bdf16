"""A RetroMAE folder as a SentenceTransformer: CLS pooling equal to the model's own sentence embedding."""

import hashlib
import json

import torch
from sentence_transformers import SentenceTransformer
from transformers import BertModel

from retromae import RetroMAEForMaskedLM, RetroMAEModel
from retromae.sentence_transformer import add_sentence_transformers_files, to_sentence_transformer

from conftest import TEXTS


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saved_folder_loads_as_a_sentence_transformer_with_the_models_embedding(tmp_path, tiny_config, tokenizer):
    folder = tmp_path / "release"
    RetroMAEForMaskedLM(tiny_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = digest(folder / "model.safetensors")
    add_sentence_transformers_files(folder, max_seq_length=64)
    assert digest(folder / "model.safetensors") == weights
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "cls"
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["similarity_fn_name"] == "cosine"

    encoded = SentenceTransformer(str(folder), trust_remote_code=True).encode(TEXTS, convert_to_tensor=True)
    encoder = RetroMAEModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = encoder(**tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")).sentence_embedding
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
