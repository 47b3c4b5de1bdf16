"""The sparse (SPLADE) release: SPLADE-max of the MLM head's scores, loaded with no flag and no `retromae`; convert, release, finetune, evaluate."""

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer, SparseEncoder
from transformers import AutoTokenizer, BertForMaskedLM, BertModel

from retromae import RetroMAEForPreTraining
from retromae.cli import main
from retromae.hub import convert, model_card, release
from retromae.sparse_encoder import write_sparse_release

from conftest import TEXTS, place_in_hub_cache
from families import CORPUS, build_checkpoint
from helpers import PAIRS, write_beir


LOAD_SCRIPT = """
import json, sys
from sentence_transformers import SparseEncoder
model = SparseEncoder(FOLDER)
embeddings = model.encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
alone = model.encode(TEXTS[-1:], convert_to_tensor=True, convert_to_sparse_tensor=False)
assert "retromae" not in sys.modules
with open(OUTPUT, "w") as file:
    json.dump({"modules": [type(m).__name__ for m in model], "pooling": model[1].get_config_dict(),
               "task": model[0].transformer_task, "similarity": model.similarity_fn_name,
               "embeddings": embeddings.tolist(), "alone": alone.tolist()}, file)
"""
REPO_ID = "org/tiny-retromae-sparse"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "sparse.md"
DOCS_REPO_ID = "your-org/retromae-base-sparse"  # the page's example id, stood in for by REPO_ID
PROBES = [*TEXTS, "short"]
QUERIES = {"q0": CORPUS[0][:24], "q1": CORPUS[3][:30], "q2": "retrieval of passages", "q3": CORPUS[6][10:40]}
QRELS = [("q0", "d0", 2), ("q0", "d5", 1), ("q1", "d3", 1), ("q2", "d4", 1), ("q2", "d1", 2), ("q3", "d6", 1)]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny BertForMaskedLM and a base-model BERT, the RetroMAE release of the first, its sparse model (by the CLI), a BEIR folder."""
    root = tmp_path_factory.mktemp("sparse")
    folders = {
        "masked_lm": build_checkpoint("bert", root / "masked_lm"),
        "base": build_checkpoint("bert", root / "base", layout="base"),
        "release": root / "release",
        "sparse": root / "sparse",
    }
    convert(str(folders["masked_lm"]), folders["release"])
    assert main(["convert", "--sparse", str(folders["release"]), str(folders["sparse"])]) == 0
    corpus = {f"d{i}": text for i, text in enumerate(CORPUS[:8])}
    folders["beir"] = write_beir(root / "beir", corpus, QUERIES, QRELS)
    return folders


@pytest.fixture(scope="session")
def user_process(built, tmp_path_factory) -> dict:
    """
    The sparse folder's release (dry run) in an offline Hub cache, and one fresh process that never imports
    `retromae`: it runs the card's Python as written and docs/sparse.md's, then loads the sparse folder and embeds PROBES.
    """
    root = tmp_path_factory.mktemp("sparse-release")
    repository = Path(release(built["sparse"], REPO_ID, dry_run=root / "repository"))
    card = ModelCard.load(repository / "README.md", ignore_metadata_errors=False)
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    page = DOCS.read_text().replace(DOCS_REPO_ID, REPO_ID)
    documented = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    place_in_hub_cache(root / "hub-cache", REPO_ID, {"c" * 40: repository}, main="c" * 40)
    settings = f"FOLDER, TEXTS, OUTPUT = {str(built['sparse'])!r}, {PROBES!r}, {str(root / 'loaded.json')!r}\n"
    environment = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    environment |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub-cache"), "HF_HOME": str(root / "home")}
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks + documented) + "\n" + settings + LOAD_SCRIPT],
        env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"repository": repository, "card": card, "blocks": blocks, "documented": documented, "stderr": result.stderr, "loaded": json.loads((root / "loaded.json").read_text())}


@pytest.fixture(scope="session")
def dupmae_run(tmp_path_factory) -> dict:
    """
    A DupMAE run through the CLI from a base-model BERT (no MLM head) that is a sentence-transformers model
    (`max_seq_length` 48), at `--max-length` 32 with held-out passages; its printed lines, and both releases (dry runs).
    """
    root = tmp_path_factory.mktemp("dupmae-run")
    base = build_checkpoint("bert", root / "base", layout="base")
    (base / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    arguments = [
        "pretrain", "--model", str(base), "--train-data", str(corpus), "--output-dir", str(root / "run"), "--objective", "dupmae",
        "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--save-steps", "2", "--seed", "3",
        "--eval-data", str(corpus), "--eval-size", "16", "--eval-steps", "2",
    ]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(arguments) == 0
    releases = {kind: Path(release(root / "run" / folder, f"org/{kind}", dry_run=root / kind)) for kind, folder in (("dense", "model"), ("sparse", "sparse"))}
    return {
        "output": printed.getvalue(),
        "records": {kind: json.loads((folder / "retromae_pretraining.json").read_text()) for kind, folder in releases.items()},
        "cards": {kind: (folder / "README.md").read_text() for kind, folder in releases.items()},
        "releases": releases,
    }


def test_the_sparse_release_of_a_dupmae_run_records_and_shows_its_held_out_evaluation(dupmae_run):
    dense, sparse = dupmae_run["records"]["dense"], dupmae_run["records"]["sparse"]
    assert sparse["training_evaluation"]["passages"] == 16
    assert sparse["training_evaluation"] | {"picture": None} == dense["training_evaluation"] | {"picture": None}  # the picture is the dense folder's
    assert "Evaluated during pre-training on 16 held-out passages" in dupmae_run["cards"]["sparse"]
    assert "Not recorded" not in dupmae_run["cards"]["sparse"]


def test_both_releases_of_a_dupmae_run_cite_dupmae(dupmae_run):
    for kind, card in dupmae_run["cards"].items():
        assert "xiao2022retromae" in card and "liu2023retromae2" in card and "arxiv.org/abs/2211.08769" in card, kind
    assert "formal2021spladev2" in dupmae_run["cards"]["sparse"] and "formal2021spladev2" not in dupmae_run["cards"]["dense"]


def test_both_releases_truncate_at_the_base_models_own_length_when_longer_than_pre_trainings_and_say_so(dupmae_run):
    dense, sparse = dupmae_run["releases"]["dense"], dupmae_run["releases"]["sparse"]
    assert SentenceTransformer(str(dense)).max_seq_length == SparseEncoder(str(sparse)).max_seq_length == 48
    for card in dupmae_run["cards"].values():
        assert "| sentence-transformers max_seq_length (tokens) | 48 |" in card and "truncates inputs at 48 tokens" in card


def test_a_dupmae_run_whose_mlm_head_started_fresh_says_its_sparse_model_is_noise(dupmae_run):
    """The starting checkpoint has no MLM head: the run's last lines, the sparse record and the sparse card say the weights are this run's alone."""
    assert "Its MLM head began at random (the starting point has none) and trained for this run's 2 steps alone" in dupmae_run["output"]
    assert dupmae_run["records"]["sparse"]["fresh_head"] is True
    assert "**Its MLM head was trained by one pre-training run alone** (2 steps)" in dupmae_run["cards"]["sparse"]
    assert "MLM head was trained" not in dupmae_run["cards"]["dense"]  # the dense embedding does not read the head
    with_head = model_card("org/x", dupmae_run["records"]["sparse"] | {"fresh_head": False}, sparse=True)
    assert "MLM head was trained" not in str(with_head)


def splade_by_hand(folder: Path, texts: list[str]) -> torch.Tensor:
    """max over the tokens of log(1 + ReLU(MLM scores)), from the family's own BertForMaskedLM, padding left out."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertForMaskedLM.from_pretrained(folder).eval()
    weights = []
    for text in texts:  # one text at a time: no padding to leave out
        with torch.no_grad():
            scores = model(**tokenizer([text], return_tensors="pt")).logits[0]  # (seq, vocab)
        weights.append(torch.log1p(torch.relu(scores)).max(dim=0).values)
    return torch.stack(weights)


def first_token_by_hand(folder: Path, texts: list[str]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]


def figures_by_hand(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 (grades as gains), MRR@10 and Recall@100 of documents ranked by `scores`, averaged over QRELS' queries."""
    ndcg, mrr, recall = [], [], []
    for query in QUERIES:
        grades = {d: g for q, d, g in QRELS if q == query}
        ranking = sorted(scores[query], key=scores[query].get, reverse=True)
        dcg = sum(grades.get(d, 0) / math.log2(rank + 2) for rank, d in enumerate(ranking[:10]))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(grades.values(), reverse=True)))
        ndcg.append(dcg / ideal)
        mrr.append(next((1 / (rank + 1) for rank, d in enumerate(ranking[:10]) if d in grades), 0.0))
        recall.append(len(set(ranking[:100]) & set(grades)) / len(grades))
    return {"ndcg@10": sum(ndcg) / 4, "mrr@10": sum(mrr) / 4, "recall@100": sum(recall) / 4}


def score_table(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, dict[str, float]]:
    return {q: {f"d{j}": float(s) for j, s in enumerate(row)} for q, row in zip(QUERIES, (queries @ documents.T).tolist())}


def min_max(scores: dict[str, float]) -> dict[str, float]:
    low, high = min(scores.values()), max(scores.values())
    return {d: (s - low) / (high - low) for d, s in scores.items()}


def test_sparse_folder_loads_without_retromae_or_flag_and_gives_splade_of_the_mlm_scores(built, user_process):
    config = json.loads((built["sparse"] / "config.json").read_text())
    assert (config["model_type"], config["architectures"], "auto_map" in config) == ("bert", ["BertForMaskedLM"], False)
    assert not list(built["sparse"].glob("*.py"))
    assert "LOAD REPORT" not in user_process["stderr"]
    loaded = user_process["loaded"]
    assert loaded["modules"] == ["Transformer", "SpladePooling"]
    assert (loaded["task"], loaded["similarity"]) == ("fill-mask", "dot")
    assert (loaded["pooling"]["pooling_strategy"], loaded["pooling"]["activation_function"]) == ("max", "relu")
    expected = splade_by_hand(built["masked_lm"], PROBES)  # the weights the release was converted from
    torch.testing.assert_close(torch.tensor(loaded["embeddings"]), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(loaded["alone"]), expected[-1:], atol=1e-5, rtol=0)  # padding left out
    assert 0 < (expected > 0).sum(dim=1).min() and (expected > 0).float().mean() < 1


def test_write_sparse_release_takes_a_pretraining_models_released_encoder(tmp_path, tiny_config, tokenizer):
    model = RetroMAEForPreTraining(tiny_config)
    record = {"base_model": "org/base-bert", "steps": 3}
    folder = write_sparse_release(tmp_path / "run" / "sparse", model.released_encoder(), tokenizer, record)
    assert json.loads((folder / "retromae_pretraining.json").read_text()) == record
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model.released_encoder()(**inputs).logits  # (batch, seq, vocab)
    padding = ~inputs["attention_mask"].bool().unsqueeze(-1)
    expected = torch.log1p(torch.relu(scores)).masked_fill(padding, 0).amax(dim=1)
    embedded = SparseEncoder(str(folder)).encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
    torch.testing.assert_close(embedded, expected, atol=1e-5, rtol=0)


def test_convert_sparse_refuses_a_checkpoint_without_mlm_head(built, tmp_path, capsys):
    assert main(["convert", "--sparse", str(built["base"]), str(tmp_path / "sparse")]) == 2
    error = capsys.readouterr().err
    assert "has no MLM head" in error and "SPLADE" in error and "scores" in error
    assert not (tmp_path / "sparse").exists()
    assert main(["convert", "--sparse", "--plain", str(built["masked_lm"]), str(tmp_path / "sparse")]) == 2
    assert "--plain and --sparse" in capsys.readouterr().err
    assert not (tmp_path / "sparse").exists()


def test_release_dry_run_of_a_sparse_folder_checks_it_and_its_card_runs_as_written(user_process):
    repository = user_process["repository"]
    files = {str(p.relative_to(repository)) for p in repository.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "modules.json", "1_SpladePooling/config.json"} <= files
    assert not any(name.endswith(".py") for name in files)
    card = user_process["card"]
    assert {"sparse-encoder", "splade"} <= set(card.data.tags)
    assert f'SparseEncoder("{REPO_ID}")' in card.text and "trust_remote_code" not in card.text
    assert len(user_process["blocks"]) == 1  # run, as written, by the fixture's process


def test_every_python_block_of_the_docs_page_runs_against_a_sparse_release(user_process):
    assert len(user_process["documented"]) == 1  # run, its Hub id standing for the release, by the fixture's process


def test_evaluate_sparse_gives_the_figures_of_a_hand_ranking_by_splade_dot_products(built, tmp_path):
    output = tmp_path / "sparse.json"
    assert main(["evaluate", "--sparse", str(built["sparse"]), str(built["beir"]), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    queries = splade_by_hand(built["masked_lm"], list(QUERIES.values()))
    documents = splade_by_hand(built["masked_lm"], CORPUS[:8])
    assert report["retriever"] == "sparse"
    assert {m: report[m] for m in ("ndcg@10", "mrr@10", "recall@100")} == pytest.approx(figures_by_hand(score_table(queries, documents)))


def test_evaluate_hybrid_gives_the_figures_of_a_hand_fused_ranking(built, tmp_path):
    output = tmp_path / "hybrid.json"
    command = ["evaluate", "--hybrid", str(built["release"]), str(built["sparse"]), str(built["beir"]), "--dense-weight", "0.3"]
    assert main([*command, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    dense = score_table(F.normalize(first_token_by_hand(built["masked_lm"], list(QUERIES.values())), dim=-1),
                        F.normalize(first_token_by_hand(built["masked_lm"], CORPUS[:8]), dim=-1))
    sparse = score_table(splade_by_hand(built["masked_lm"], list(QUERIES.values())), splade_by_hand(built["masked_lm"], CORPUS[:8]))
    fused = {}
    for query in QUERIES:
        normalised_dense, normalised_sparse = min_max(dense[query]), min_max(sparse[query])
        fused[query] = {d: 0.3 * normalised_dense[d] + 0.7 * normalised_sparse[d] for d in dense[query]}
    assert (report["retriever"], report["fusion"], report["dense_weight"]) == ("hybrid", "min-max", 0.3)
    assert {m: report[m] for m in ("ndcg@10", "mrr@10", "recall@100")} == pytest.approx(figures_by_hand(fused))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--hybrid", "{release}", "{beir}"], "--hybrid takes two models"),
        (["{release}", "{sparse}", "{beir}"], "two only with --hybrid"),
        (["{release}", "{beir}", "--dense-weight", "0.5"], "give it with --hybrid"),
        (["--hybrid", "{release}", "{sparse}", "{beir}", "--dense-weight", "1.5"], "--dense-weight must be between 0 and 1"),
        (["--sparse", "{release}", "{beir}"], "is not a sparse (SPLADE) model"),
    ],
)
def test_evaluate_refuses_bad_sparse_and_hybrid_arguments(built, tmp_path, capsys, arguments, message):
    filled = [argument.format(**built) for argument in arguments]
    assert main(["evaluate", *filled, "--output", str(tmp_path / "f.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_finetune_sparse_trains_the_splade_model_and_saves_one_sparse_encoder_loads(built, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in PAIRS))
    command = ["finetune", "--sparse", "--model", str(built["sparse"]), "--train-data", str(data), "--output-dir", str(tmp_path / "run"),
               "--batch-size", "4", "--max-steps", "2", "--learning-rate", "1e-3", "--query-regularizer-weight", "1e-4"]
    assert main(command) == 0
    tuned = SparseEncoder(str(tmp_path / "run" / "model"))
    assert [type(m).__name__ for m in tuned] == ["Transformer", "SpladePooling"]
    before = SparseEncoder(str(built["sparse"])).encode(PAIRS[0][0], convert_to_tensor=True, convert_to_sparse_tensor=False)
    after = tuned.encode(PAIRS[0][0], convert_to_tensor=True, convert_to_sparse_tensor=False)
    assert before.shape == after.shape and not torch.allclose(before, after)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--query-regularizer-weight", "1e-4"], "give it with --sparse"),
        (["--sparse", "--document-regularizer-weight", "-1"], "argument --document-regularizer-weight: must be at least 0"),
        (["--sparse", "--temperature", "0"], "argument --temperature: must be above 0"),
    ],
)
def test_finetune_refuses_bad_sparse_arguments(built, tmp_path, capsys, extra, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    command = ["finetune", "--model", str(built["sparse"]), "--train-data", str(data), "--output-dir", str(tmp_path / "run"), *extra]
    assert exit_status(command) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def exit_status(argv: list[str]) -> int:
    """`retromae ARGV`'s exit status, whether the command returned it or argparse exited while reading the command."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_finetune_sparse_refuses_a_dense_model(built, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    command = ["finetune", "--sparse", "--model", str(built["release"]), "--train-data", str(data), "--output-dir", str(tmp_path / "run")]
    assert main(command) == 2
    assert "convert --sparse" in capsys.readouterr().err
