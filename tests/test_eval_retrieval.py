"""`retromae pretrain --eval-retrieval DIR`: retrieval on the user's BEIR folder at every evaluation, as `retromae evaluate` scores it."""

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertTokenizerFast

from retromae import RetroMAEForMaskedLM, diagnostics
from retromae.cli import main
from retromae.configuration_retromae import RETROMAE_FIELDS
from retromae.eval_retrieval import read_retrieval_data, subsampled
from retromae.evaluate import RetrievalTask, evaluate, evaluate_hybrid, load_beir, load_model, load_sparse_model
from retromae.hub import model_card

from conftest import tiny_retromae_config
from helpers import WORDS, LogRecorder, resolved_settings, run_pretraining, write_beir


HERE = Path(__file__).resolve().parent
# 40 passages of 10-17 words, the training corpus and the retrieval corpus; query i is the first four words of passage i.
PASSAGES = [" ".join(random.Random(i).choice(WORDS) for _ in range(10 + i % 8)) + "." for i in range(40)]
QUERIES = {f"q{i}": " ".join(PASSAGES[i].split()[:4]) for i in range(12)}
QRELS = [(f"q{i}", f"d{i}", 1) for i in range(12)] + [("q0", "d20", 2), ("q1", "d21", 0)]
DENSE = ("dense_ndcg_at_10", "dense_mrr_at_10", "dense_recall_at_100")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The corpus, its BEIR folder and a tiny starting model (a release of a 2-layer BERT over the corpus's words)."""
    root = tmp_path_factory.mktemp("eval-retrieval")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(str(root / "vocab.txt"))
    RetroMAEForMaskedLM(tiny_retromae_config(len(tokenizer)).encoder).save_pretrained(root / "start")
    tokenizer.save_pretrained(root / "start")
    (root / "corpus.txt").write_text("\n".join(PASSAGES) + "\n")
    beir = write_beir(root / "beir", {f"d{i}": text for i, text in enumerate(PASSAGES)}, QUERIES, QRELS)
    return {"root": root, "corpus": root / "corpus.txt", "beir": beir, "start": root / "start"}


def pretraining(world, output_dir: Path, *extra: str) -> list[str]:
    """`retromae pretrain` from the tiny starting model for two steps of four passages, seeded, evaluating at steps 0 and 2."""
    return [
        "pretrain", "--model", str(world["start"]), "--train-data", str(world["corpus"]), "--output-dir", str(output_dir),
        "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2",
        "--seed", "3", "--eval-retrieval", str(world["beir"]), *extra,
    ]  # fmt: skip


def run(world, name: str, *extra: str) -> dict:
    """A run of `pretraining`: its folder, records, console and logs."""
    output_dir, recorder = world["root"] / name, LogRecorder()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run_pretraining(pretraining(world, output_dir, *extra), callbacks=[recorder])
    records = diagnostics.MetricsFile(output_dir).records()
    return {"output_dir": output_dir, "records": records, "printed": printed.getvalue(), "logs": [logs for _, logs in recorder.logs]}


@pytest.fixture(scope="module")
def retromae_run(world) -> dict:
    """A RetroMAE run evaluated on the retrieval task alone (no held-out passages)."""
    return run(world, "retromae")


@pytest.fixture(scope="module")
def dupmae_run(world) -> dict:
    """A DupMAE run evaluated on held-out passages and on the retrieval task."""
    return run(world, "dupmae", "--objective", "dupmae", "--eval-data", str(world["corpus"]), "--eval-size", "16")


def test_the_retrieval_task_alone_evaluates_the_run_at_step_0_and_every_eval_steps(retromae_run):
    assert [record["step"] for record in retromae_run["records"]] == [0, 2]
    assert not any("passages" in record or "sparse_ndcg_at_10" in record for record in retromae_run["records"])
    settings = json.loads((retromae_run["output_dir"] / "retromae_run.json").read_text())
    assert (Path(settings["eval_retrieval"]).name, settings["eval_retrieval_corpus_size"], settings["eval_steps"]) == ("beir", 10_000, 2)


def test_building_the_retrievers_leaves_the_checkpoints_as_a_run_without_them_writes_them(retromae_run):
    encoder = json.loads((retromae_run["output_dir"] / "checkpoint-2" / "config.json").read_text())["encoder"]
    assert not set(RETROMAE_FIELDS) & set(encoder)  # a release's config holds them, a checkpoint's encoder does not


@pytest.mark.parametrize("name", ["retromae_run", "dupmae_run"])
def test_the_step_0_figures_are_those_of_retromae_evaluate_on_the_starting_model(world, name, request):
    first = request.getfixturevalue(name)["records"][0]
    figures = evaluate(load_model(str(world["start"])), load_beir(world["beir"]))
    assert [first[figure] for figure in DENSE] == [figures["ndcg@10"], figures["mrr@10"], figures["recall@100"]]
    assert (first["retrieval_queries"], first["retrieval_documents"]) == (12, 40)


@pytest.mark.parametrize("name", ["retromae_run", "dupmae_run"])
def test_the_last_figures_are_those_of_retromae_evaluate_on_the_release(world, name, request):
    last, release = request.getfixturevalue(name)["records"][-1], request.getfixturevalue(name)["output_dir"] / "model"
    task = load_beir(world["beir"])
    assert [last[figure] for figure in DENSE] == list(evaluate(load_model(str(release)), task).values())


def test_a_dupmae_run_records_the_sparse_and_hybrid_figures_of_retromae_evaluate_on_its_releases(world, dupmae_run):
    last, output_dir, task = dupmae_run["records"][-1], dupmae_run["output_dir"], load_beir(world["beir"])
    sparse = evaluate(load_sparse_model(str(output_dir / "sparse")), task)
    hybrid = evaluate_hybrid(load_model(str(output_dir / "model")), load_sparse_model(str(output_dir / "sparse")), task, 0.5)
    assert [last[f"sparse_{name}"] for name in ("ndcg_at_10", "mrr_at_10", "recall_at_100")] == list(sparse.values())
    assert [last[f"hybrid_{name}"] for name in ("ndcg_at_10", "mrr_at_10", "recall_at_100")] == list(hybrid.values())
    assert {"encoder_loss", "embedding_information", "bow_loss", "passages"} <= set(last)  # beside the held-out figures


def test_the_figures_reach_the_console_the_loggers_and_metrics_jsonl(retromae_run, dupmae_run):
    first = retromae_run["records"][0]
    assert {"step", "seconds", "retrieval_seconds", *DENSE} <= set(first)
    assert (
        f"eval step 0 (12 queries over 40 passages, {first['seconds']:.1f} s): "
        f"dense nDCG@10 {first['dense_ndcg_at_10']:.3f} R@100 {first['dense_recall_at_100']:.3f}\n"
    ) in retromae_run["printed"]
    both = dupmae_run["records"][0]
    line = next(line for line in dupmae_run["printed"].splitlines() if line.lstrip().startswith("eval step 0 "))
    assert line.lstrip().startswith("eval step 0 (16 held-out passages; 12 queries over 40 passages, ")
    assert f"  sparse nDCG@10 {both['sparse_ndcg_at_10']:.3f}" in line and f"  hybrid nDCG@10 {both['hybrid_ndcg_at_10']:.3f}" in line
    logged = [entry for entry in dupmae_run["logs"] if "eval_dense_ndcg_at_10" in entry]
    assert [entry["eval_hybrid_recall_at_100"] for entry in logged] == [record["hybrid_recall_at_100"] for record in dupmae_run["records"]]


def test_the_picture_and_the_card_show_the_retrieval_figures(retromae_run):
    release = retromae_run["output_dir"] / "model"
    assert (release / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((release / "retromae_pretraining.json").read_text())
    assert record["training_evaluation"]["retrieval"] == {"data": "beir", "queries": 12, "documents": 40, "corpus": 40}
    card = str(model_card("org/tiny", record))
    first, last = retromae_run["records"][0], retromae_run["records"][-1]
    assert f"| dense retrieval nDCG@10 | {first['dense_ndcg_at_10']:.4f} | {last['dense_ndcg_at_10']:.4f} |" in card
    assert "The retrieval figures rank 40 passages of beir for its 12 judged queries" in card


def test_subsampling_keeps_every_judged_passage_and_draws_the_others_from_the_seed():
    corpus = {f"d{i}": f"passage {i}" for i in range(100)}
    relevant = {"q1": {"d3": 1, "d97": 2}, "q2": {"d50": 1}}
    task = RetrievalTask(corpus=corpus, queries={"q1": "a", "q2": "b"}, relevant=relevant)
    kept = subsampled(task, 20, seed=3)
    assert len(kept.corpus) == 20 and {"d3", "d97", "d50"} <= set(kept.corpus)
    assert list(kept.corpus) == [document for document in corpus if document in kept.corpus]  # in the corpus's order
    assert kept.corpus == subsampled(task, 20, seed=3).corpus and kept.corpus != subsampled(task, 20, seed=4).corpus
    assert (kept.queries, kept.relevant) == (task.queries, task.relevant)
    assert subsampled(task, 100, seed=3) is task
    assert set(subsampled(task, 2, seed=3).corpus) == {"d3", "d97", "d50"}  # judged passages are kept beyond the size


def test_a_subsampled_corpus_is_said_once(world, capsys):
    settings = resolved_settings(pretraining(world, world["root"] / "unused", "--eval-retrieval-corpus-size", "20"))
    data = read_retrieval_data(settings)
    assert {document for _, document, grade in QRELS if grade > 0} <= set(data.task.corpus) and len(data.task.corpus) == 20
    assert data.description() == {"data": "beir", "queries": 12, "documents": 20, "corpus": 40}
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"--eval-retrieval {world['beir']}: 20 of its 40 passages are searched, the 13 judged relevant and 7 drawn at random "
        "(seed 3); the figures of a part of a corpus are higher than those of the whole (docs/diagnostics.md)."
    ]


def broken(world, tmp_path, what: str) -> Path:
    """A copy of the BEIR folder broken as `what` says."""
    folder = write_beir(tmp_path / "broken", {f"d{i}": text for i, text in enumerate(PASSAGES)}, QUERIES, QRELS)
    if what in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (folder / what).unlink()
    elif what == "unknown document":
        (folder / "qrels" / "test.tsv").write_text("q0\td99\t1\n")
    elif what == "unknown query":
        (folder / "qrels" / "test.tsv").write_text("q99\td0\t1\n")
    elif what == "nothing judged relevant":
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t0\n")
    return folder


@pytest.mark.parametrize(
    "what, message",
    [
        ("missing", "--eval-retrieval MISSING: no such folder (give a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv)."),
        ("a file", "--eval-retrieval MISSING: not a folder (give a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv)."),
        ("corpus.jsonl", "--eval-retrieval BROKEN: BROKEN/corpus.jsonl is missing: a BEIR folder holds"),
        ("queries.jsonl", "BROKEN/queries.jsonl is missing"),
        ("qrels/test.tsv", "BROKEN/qrels/test.tsv is missing"),
        ("unknown document", "qrels/test.tsv:1: document 'd99' is not in corpus.jsonl."),
        ("unknown query", "qrels/test.tsv:1: query 'q99' is not in queries.jsonl."),
        ("nothing judged relevant", "BROKEN/qrels/test.tsv judges no document relevant."),
        ("size without the task", "--eval-retrieval-corpus-size bounds the corpus of --eval-retrieval DIR: give --eval-retrieval too."),
    ],
)
def test_a_bad_retrieval_task_exits_2_with_one_line_before_the_model_loads(world, tmp_path, capsys, monkeypatch, what, message):
    monkeypatch.setattr("retromae.pretraining.build_model_and_tokenizer", lambda settings: pytest.fail("the model was loaded"))
    folder = tmp_path / "missing" if what in ("missing", "a file") else broken(world, tmp_path, what)
    if what == "a file":
        folder.write_text("query\tpassage\n")
    arguments = pretraining(world, tmp_path / "run", "--eval-retrieval", str(folder))
    if what == "size without the task":
        arguments = [*arguments[: arguments.index("--eval-retrieval")], "--eval-retrieval-corpus-size", "20"]
    assert main(arguments) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and message.replace("MISSING", str(folder)).replace("BROKEN", str(folder)) in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_corpus_size_below_1_is_refused_when_the_command_is_read(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(pretraining(world, tmp_path / "run", "--eval-retrieval-corpus-size", "0"))
    assert exit.value.code == 2 and "argument --eval-retrieval-corpus-size: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_under_fsdp_the_figures_are_those_of_retromae_evaluate_on_the_runs_releases(world, tmp_path):
    """Two CPU processes under FSDP2 (tests/fsdp_on_cpu.py), DupMAE, the retrieval task alone: the last figures are the releases'."""
    output_dir = tmp_path / "fsdp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547", str(HERE / "fsdp_on_cpu.py"),
        *pretraining(world, output_dir, "--fsdp", "--objective", "dupmae", "--max-steps", "4"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records, task = diagnostics.MetricsFile(output_dir).records(), load_beir(world["beir"])
    assert [record["step"] for record in records] == [0, 2, 4]
    dense, sparse = load_model(str(output_dir / "model")), load_sparse_model(str(output_dir / "sparse"))
    assert [records[-1][figure] for figure in DENSE] == list(evaluate(dense, task).values())
    assert records[-1]["sparse_ndcg_at_10"] == evaluate(sparse, task)["ndcg@10"]
    assert records[-1]["hybrid_ndcg_at_10"] == evaluate_hybrid(dense, sparse, task, 0.5)["ndcg@10"]
