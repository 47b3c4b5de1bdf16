"""`retromae evaluate` on BEIR-format folders built here: figures against hand-computed ones, bad input."""

import json
import math

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding
from tokenizers import Tokenizer, models, pre_tokenizers

from retromae import RetroMAEForMaskedLM
from retromae.cli import main
from retromae.evaluate import evaluate, load_beir

from helpers import write_beir


def angle_model(num_documents):
    """A SentenceTransformer whose ranking is known: token d_i sits at angle 0.25 (i + 1) from the query token."""
    vocabulary = {"[UNK]": 0, "q": 1, **{f"d{i}": i + 2 for i in range(num_documents)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    weights = torch.zeros(len(vocabulary), 2)
    weights[0, 1] = 1.0
    weights[1, 0] = 1.0
    for i in range(num_documents):
        angle = 0.25 * (i + 1)
        weights[i + 2] = torch.tensor([math.cos(angle), math.sin(angle)])
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_weights=weights)], similarity_fn_name="cosine")


def test_figures_match_a_hand_computed_perfect_and_reversed_ranking(tmp_path):
    corpus = {f"doc{i}": f"d{i}" for i in range(5)}
    queries = {"perfect": "q", "reversed": "q"}
    folder = write_beir(tmp_path / "beir", corpus, queries, [("perfect", "doc0", 1), ("reversed", "doc4", 1), ("reversed", "doc1", 0)])
    figures = evaluate(angle_model(5), load_beir(folder))
    assert figures["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6)) / 2)
    assert figures["mrr@10"] == pytest.approx((1 + 1 / 5) / 2)
    assert figures["recall@100"] == pytest.approx(1.0)


def test_graded_judgements_give_trec_evals_ndcg_computed_by_hand(tmp_path):
    """Grades are gains (BEIR / MTEB's nDCG): with them counted as plainly relevant the figure would be 0.885."""
    corpus = {f"doc{i}": f"d{i}" for i in range(5)}  # ranked doc0, doc1, ..., doc4 for the query
    grades = [("graded", "doc0", 1), ("graded", "doc1", 0), ("graded", "doc2", 2), ("graded", "doc4", 3)]
    task = load_beir(write_beir(tmp_path / "beir", corpus, {"graded": "q"}, grades))
    assert task.relevant == {"graded": {"doc0": 1, "doc2": 2, "doc4": 3}}
    figures = evaluate(angle_model(5), task)
    gains_in_rank_order = 1 / math.log2(2) + 2 / math.log2(4) + 3 / math.log2(6)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert figures["ndcg@10"] == pytest.approx(gains_in_rank_order / ideal)  # 0.6637
    assert figures["mrr@10"] == pytest.approx(1.0)
    assert figures["recall@100"] == pytest.approx(1.0)


def test_a_relevant_document_below_rank_ten_counts_for_recall_but_not_mrr(tmp_path):
    corpus = {f"doc{i}": f"d{i}" for i in range(12)}
    task = load_beir(write_beir(tmp_path / "beir", corpus, {"deep": "q"}, [("deep", "doc11", 2)]))
    figures = evaluate(angle_model(12), task)
    assert figures == pytest.approx({"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 1.0})


def test_cli_scores_a_retromae_folder_and_writes_json(tmp_path, tiny_config, tokenizer, capsys):
    model_folder = tmp_path / "retromae"
    RetroMAEForMaskedLM(tiny_config.encoder).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    corpus = {f"doc{i}": text for i, text in enumerate(["cats purr softly", "dogs bark loudly", "rivers flow to the sea"])}
    data = write_beir(tmp_path / "beir", corpus, {"q1": "which animal purrs", "q2": "where do rivers go"}, [("q1", "doc0", 1), ("q2", "doc2", 1)])
    output = tmp_path / "figures.json"
    assert main(["evaluate", str(model_folder), str(data), "--output", str(output)]) == 0
    figures = json.loads(output.read_text())
    assert (figures["queries"], figures["documents"]) == (2, 3)
    for metric in ("ndcg@10", "mrr@10", "recall@100"):
        assert 0.0 <= figures[metric] <= 1.0
    assert figures["recall@100"] == 1.0
    assert '"ndcg@10"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda folder: (folder / "qrels" / "test.tsv").unlink(), "test.tsv is missing"),
        (lambda folder: (folder / "qrels" / "test.tsv").write_text("q9\tdoc0\t1\n"), "query 'q9' is not in queries.jsonl"),
        (lambda folder: (folder / "qrels" / "test.tsv").write_text("q1\tdoc9\t1\n"), "document 'doc9' is not in corpus.jsonl"),
        (lambda folder: (folder / "corpus.jsonl").write_text(""), "corpus.jsonl holds no documents"),
        (lambda folder: (folder / "queries.jsonl").write_text("{not json\n"), "queries.jsonl:1 is not valid JSON"),
    ],
)
def test_bad_beir_folders_fail_with_a_clear_message(tmp_path, capsys, break_it, message):
    folder = write_beir(tmp_path / "beir", {"doc0": "d0"}, {"q1": "q"}, [("q1", "doc0", 1)])
    break_it(folder)
    assert main(["evaluate", str(tmp_path), str(folder), "--output", str(tmp_path / "f.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    folder = write_beir(tmp_path / "beir", {"doc0": "d0"}, {"q1": "q"}, [("q1", "doc0", 1)])
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), str(folder), "--output", str(tmp_path / "f.json")]) == 2
    assert "is not a model folder" in capsys.readouterr().err
