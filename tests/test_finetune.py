"""`retromae finetune`: contrastive fine-tuning lowers the loss, saves a model both routes load, refuses bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, BertForMaskedLM

from retromae import RetroMAEForMaskedLM
from retromae.cli import main
from retromae.losses import describe
from retromae.sentence_transformer import load_sentence_transformer

from conftest import place_in_hub_cache
from helpers import PAIRS


@pytest.fixture
def base_model(tmp_path, tiny_config, tokenizer):
    folder = tmp_path / "base"
    RetroMAEForMaskedLM(tiny_config.encoder).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def contrastive_loss(model, temperature=0.05):
    """In-batch-negatives cross entropy of all PAIRS at once (the quantity fine-tuning minimises)."""
    queries = model.encode([q for q, _ in PAIRS], convert_to_tensor=True)
    passages = model.encode([p for _, p in PAIRS], convert_to_tensor=True)
    scores = F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T / temperature
    return F.cross_entropy(scores, torch.arange(len(PAIRS))).item()


def finetune_args(model, data, output_dir, *extra):
    return ["finetune", "--model", str(model), "--train-data", str(data), "--output-dir", str(output_dir),
            "--batch-size", "4", "--max-steps", "8", "--learning-rate", "1e-3", "--logging-steps", "4", *extra]


def test_finetuning_lowers_the_loss_and_saves_a_model_both_routes_load(tmp_path, base_model, tokenizer):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    before = contrastive_loss(load_sentence_transformer(str(base_model)))
    assert main(finetune_args(base_model, data, tmp_path / "run", "--save-steps", "4")) == 0
    assert {"checkpoint-4", "checkpoint-8", "model"} <= set(os.listdir(tmp_path / "run"))
    assert ".staging" not in os.listdir(tmp_path / "run")
    final = tmp_path / "run" / "model"
    assert {"configuration_retromae.py", "modeling_retromae.py", "modules.json", "model.safetensors"} <= set(os.listdir(final))
    assert json.loads((final / "config.json").read_text())["model_type"] == "bert"  # a BERT first, like every release
    tuned = SentenceTransformer(str(final))
    assert contrastive_loss(tuned) < before
    encoder = AutoModel.from_pretrained(final, trust_remote_code=True).eval()
    inputs = tokenizer([PAIRS[0][0]], return_tensors="pt")
    with torch.no_grad():
        expected = encoder(**inputs).sentence_embedding
    torch.testing.assert_close(tuned.encode([PAIRS[0][0]], convert_to_tensor=True), expected, atol=1e-5, rtol=0)


def test_tsv_with_hard_negatives_and_the_cached_loss(tmp_path, base_model):
    data = tmp_path / "triples.tsv"
    data.write_text("".join(f"{q}\t{p}\t{PAIRS[(i + 1) % len(PAIRS)][1]}\n" for i, (q, p) in enumerate(PAIRS)))
    assert main(finetune_args(base_model, data, tmp_path / "run", "--max-steps", "2", "--cached", "2")) == 0
    assert (tmp_path / "run" / "model" / "modules.json").exists()


def test_a_plain_encoder_by_hub_id_is_fine_tuned_and_saved_with_first_token_pooling(tmp_path, tiny_config, tokenizer):
    """A Hub model without sentence-transformers files is pooled as RetroMAE trains it, as a local folder is, not mean-pooled."""
    BertForMaskedLM(tiny_config.encoder).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    place_in_hub_cache(tmp_path / "hub", "org/plain-bert", {"0" * 40: tmp_path / "plain"}, main="0" * 40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    command = [sys.executable, "-m", "retromae.cli", *finetune_args("org/plain-bert", data, tmp_path / "run", "--max-steps", "1")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [describe(module) for module in SentenceTransformer(str(tmp_path / "run" / "model"))] == ["Transformer", "Pooling(cls)"]


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "does not exist"),
        ('{"query": "q", "positive": "p"}\n{"query": "q2"}\n', [], "pairs.jsonl:2 needs non-empty 'query' and 'positive'"),
        ('{"query": "q", "positive": "p"}\n{"query": "q2", "positive": "p2", "negative": "n"}\n', [], "same number of negatives"),
        ("not json\n", [], "pairs.jsonl:1 is not valid JSON"),
        ('{"query": "q", "positive": "p"}\n', ["--temperature", "0"], "argument --temperature: must be above 0"),
    ],
)
def test_bad_input_fails_with_a_clear_message(tmp_path, base_model, capsys, content, extra, message):
    data = tmp_path / "pairs.jsonl"
    if content is not None:
        data.write_text(content)
    try:
        code = main(finetune_args(base_model, data, tmp_path / "run", *extra))
    except SystemExit as refused:  # argparse's refusal of a bad number
        code = refused.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
