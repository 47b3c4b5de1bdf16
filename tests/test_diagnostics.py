"""Held-out diagnostics of `retromae pretrain`: the figures, where they go, a resumed run, a broken run, bad input."""

import json
import os
import random
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, BertModel, BertTokenizerFast

from retromae import PretrainingSettings, RetroMAECollator, RetroMAEForPreTraining, diagnostics, run_passages
from retromae.cli import main
from retromae.diagnostics import evaluate_held_out, span_retrieval
from retromae.run_passages import HeldOutSet
from retromae.hub import release

from conftest import tiny_retromae_config
from helpers import WORDS, CrashAfter, LogRecorder, evaluation_record, resolved_settings, run_pretraining, tiny_run


def sentence(generator: random.Random, words: int) -> str:
    return " ".join(generator.choice(WORDS) for _ in range(words)).capitalize() + "."


# 40 distinct records of 10-17 words: each is one passage of a 32-token run, with halves unlike other passages'.
CORPUS = [sentence(random.Random(i), 10 + i % 8) for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


@pytest.fixture(scope="module")
def resumed_run(corpus, tmp_path_factory):
    """
    A run evaluated every step and checkpointed every 2, killed at the start of step 4 (after the
    evaluation of step 3), then resumed from checkpoint-2 to step 4: (output dir, the records
    before the resume, what the loggers were handed on resuming).
    """
    output_dir = tmp_path_factory.mktemp("resumed") / "run"
    arguments = tiny_run(corpus, output_dir, "--eval-data", str(corpus), "--eval-size", "16", "--eval-steps", "1", "--save-steps", "2", "--max-steps", "4")
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(arguments, callbacks=[CrashAfter(3)])
    before = diagnostics.MetricsFile(output_dir).records()
    recorder = LogRecorder()
    run_pretraining([*arguments, "--resume"], callbacks=[recorder])
    return output_dir, before, recorder.logs


def test_metrics_hold_every_evaluation_once_across_a_resume(resumed_run):
    output_dir, before, _ = resumed_run
    assert [record["step"] for record in before] == [0, 1, 2, 3]
    records = diagnostics.MetricsFile(output_dir).records()
    assert [record["step"] for record in records] == [0, 1, 2, 3, 4]
    assert records[:3] == before[:3]  # kept as they were; step 3 was trained again and evaluated again
    assert set(diagnostics.LABELS) - {"bow_loss"} <= set(records[-1])
    assert all(record["passages"] == 16 for record in records)


def test_evaluations_reach_the_trainer_loggers_with_an_eval_prefix(resumed_run):
    _, _, logs = resumed_run
    evaluated = [step for step, payload in logs if "eval_embedding_information" in payload]
    assert evaluated == [3, 4]  # step 2 (the checkpoint) was recorded before the run was killed
    payload = next(payload for step, payload in logs if "eval_span_mrr_at_10" in payload)
    assert {"eval_encoder_loss", "eval_decoder_accuracy", "eval_seconds"} <= set(payload)


def test_the_picture_and_the_card_show_every_evaluation(resumed_run, tmp_path, capsys):
    output_dir, _, _ = resumed_run
    release_folder = output_dir / "model"
    assert (release_folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((release_folder / "retromae_pretraining.json").read_text())["training_evaluation"]
    assert record["evaluations"] == 5 and record["first"]["step"] == 0 and record["last"]["step"] == 4
    repo = release(release_folder, "org/tiny", dry_run=tmp_path / "repo")
    assert (tmp_path / "repo" / "training_curves.png").is_file()
    card = ModelCard.load(f"{repo}/README.md").text
    assert "![Held-out evaluation during pre-training](training_curves.png)" in card
    assert f"| embedding information (nats/token) | {record['first']['embedding_information']:.4f} | {record['last']['embedding_information']:.4f} |" in card

    assert main(["plot", str(output_dir)]) == 0
    assert "Drew 5 evaluations (steps 0 to 4)" in capsys.readouterr().out
    assert (output_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_span_retrieval_of_the_last_evaluation_matches_the_released_encoder(resumed_run, corpus):
    """MRR@10 and recall@10 computed here, passage by passage with the released encoder, without the package's code."""
    output_dir, _, _ = resumed_run
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    encoder = BertModel.from_pretrained(output_dir / "model", add_pooling_layer=False).eval()

    def embed(ids):
        with torch.no_grad():
            return encoder(torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]])).last_hidden_state[0, 0]

    passages = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in CORPUS[:16]]  # --eval-size 16
    queries = [embed(ids[: len(ids) // 2]) for ids in passages]
    documents = [embed(ids[len(ids) // 2 :]) for ids in passages]
    reciprocal, found = [], []
    for i, query in enumerate(queries):
        scores = [F.cosine_similarity(query, document, dim=0).item() for document in documents]
        rank = sorted(range(len(scores)), key=lambda j: -scores[j]).index(i) + 1
        reciprocal.append(1 / rank if rank <= 10 else 0.0)
        found.append(rank <= 10)
    last = diagnostics.MetricsFile(output_dir).records()[-1]
    assert last["span_mrr_at_10"] == pytest.approx(sum(reciprocal) / len(reciprocal), abs=1e-6)
    assert last["span_recall_at_10"] == pytest.approx(sum(found) / len(found), abs=1e-6)


def test_span_retrieval_counts_ties_against_the_right_document():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    documents = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    # query 0: its document ties with document 1 (rank 2); query 1: ties with 0, below 2 (rank 3); query 2: rank 1
    mrr, recall = span_retrieval(queries, documents, cutoff=2)
    assert mrr == pytest.approx((1 / 2 + 0 + 1) / 3) and recall == pytest.approx(2 / 3)


# The figures, on a tiny model in process.


@pytest.fixture(scope="module")
def words_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer whose vocabulary is the corpus's words: a tiny MLM head, so a model learns in a few steps."""
    folder = tmp_path_factory.mktemp("words")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    return BertTokenizerFast(str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def words_config(words_tokenizer):
    return tiny_retromae_config(len(words_tokenizer))


@pytest.fixture(scope="module")
def held_out(words_tokenizer):
    """16 passages in one batch: the batch a model is trained on again and again below."""
    collator = RetroMAECollator(words_tokenizer, max_length=32, seed=0)
    passages = [words_tokenizer(text, add_special_tokens=False)["input_ids"] for text in CORPUS[:16]]
    return HeldOutSet.from_passages(passages, collator, batch_size=16, seed=0)


class BlindDecoder(RetroMAEForPreTraining):
    """A RetroMAE model whose decoder is given a zero vector instead of h_X: it has no access to the embedding."""

    def decode(self, sentence_embedding, decoder_input_ids, mask):
        return super().decode(torch.zeros_like(sentence_embedding), decoder_input_ids, mask)


def test_embedding_information_is_zero_for_a_decoder_without_access_to_the_embedding(words_config, held_out):
    model = BlindDecoder(words_config)
    train_on_the_held_out_batch(model, held_out, steps=40)
    figures = evaluate_held_out(model, held_out)
    assert figures["embedding_information"] == 0.0
    assert figures["decoder_loss"] > 0


def test_embedding_information_rises_when_the_decoder_learns_from_the_embedding(words_config, held_out):
    model = RetroMAEForPreTraining(words_config)
    before = evaluate_held_out(model, held_out)
    train_on_the_held_out_batch(model, held_out, steps=40)
    after = evaluate_held_out(model, held_out)
    assert abs(before["embedding_information"]) < 0.01 and after["embedding_information"] > 0.2
    assert after["decoder_loss"] < before["decoder_loss"] and after["decoder_accuracy"] > before["decoder_accuracy"]


def train_on_the_held_out_batch(model, held_out, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(**held_out.batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_held_out_losses_are_the_models_own(words_config, held_out):
    model = RetroMAEForPreTraining(words_config).eval()
    figures = evaluate_held_out(model, held_out)  # one batch: the token-weighted loss is the batch's
    with torch.no_grad():
        output = model(**held_out.batches[0])
    assert figures["encoder_loss"] == pytest.approx(output.encoder_loss.item(), rel=1e-5)
    assert figures["decoder_loss"] == pytest.approx(output.decoder_loss.item(), rel=1e-5)
    assert model.training is False


def test_a_dupmae_model_reports_its_held_out_bag_of_words_loss_and_retromae_none(words_config, held_out):
    dupmae = RetroMAEForPreTraining(type(words_config)(**{**words_config.to_dict(), "objective": "dupmae"})).eval()
    figures = evaluate_held_out(dupmae, held_out)  # one batch: the held-out BoW loss is the batch's
    with torch.no_grad():
        output = dupmae(**held_out.batches[0])
    assert figures["bow_loss"] == pytest.approx(output.bow_loss.item(), rel=1e-5)
    assert "bow_loss" not in evaluate_held_out(RetroMAEForPreTraining(words_config).eval(), held_out)


def test_the_derangement_never_gives_a_passage_its_own_embedding(held_out):
    assert sorted(held_out.derangement.tolist()) == list(range(len(held_out)))
    assert all(other != own for own, other in enumerate(held_out.derangement.tolist()))


def test_eval_split_holds_records_out_of_training(tokenizer):
    settings = PretrainingSettings(eval_split=0.3, seed=5)
    dataset = datasets.Dataset.from_dict({"text": CORPUS})
    trained = set(run_passages.without_held_out(dataset, settings)["text"])
    held = {text for text in CORPUS if run_passages.is_held_out(text, 0.3, 5)}
    assert trained.isdisjoint(held) and trained | held == set(CORPUS)
    assert 0.1 < len(held) / len(CORPUS) < 0.5
    stream = run_passages.without_held_out(dataset.to_iterable_dataset(), settings)
    assert {record["text"] for record in stream} == trained


@pytest.mark.parametrize("passages", ["split", "truncate"])
def test_held_out_records_are_cut_into_passages_as_training_cuts_them(tmp_path, words_tokenizer, passages):
    record = " ".join(CORPUS)  # one long record: 40 sentences
    path = tmp_path / "held_out.txt"
    path.write_text(record + "\n")
    settings = resolved_settings(["pretrain", "--config", "tiny", "--train-data", str(path), "--eval-data", str(path), "--passages", passages, "--max-length", "32"])
    collator = RetroMAECollator(words_tokenizer, max_length=32, seed=0)
    if passages == "truncate":  # the record's first 30 tokens: one passage
        with pytest.raises(diagnostics.DiagnosticsError, match="gives 1 held-out passages; evaluation needs at least 16"):
            run_passages.held_out_set(settings, None, words_tokenizer, collator)
        return
    held_out = run_passages.held_out_set(settings, None, words_tokenizer, collator)
    lengths = [int(mask.sum()) - 2 for batch in held_out.batches for mask in batch["encoder_attention_mask"]]
    assert max(lengths) <= 30 and sum(lengths) == len(words_tokenizer(record, add_special_tokens=False)["input_ids"])


# A broken run.


def test_a_nan_at_step_5_stops_the_run_keeps_checkpoint_4_and_releases_nothing(corpus, tmp_path, capsys, monkeypatch):
    forward = RetroMAEForPreTraining.forward
    steps = []

    def breaks_at_step_5(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        steps.append(self.training)
        if sum(steps) == 5:
            output.decoder_loss = output.decoder_loss * float("nan")
        return output

    monkeypatch.setattr(RetroMAEForPreTraining, "forward", breaks_at_step_5)
    output_dir = tmp_path / "run"
    arguments = tiny_run(corpus, output_dir, "--max-steps", "6", "--save-steps", "2", "--warmup", "0", "--logging-steps", "1")
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "Step 5: the decoder loss is nan" in error and "Traceback" not in error
    assert f"{output_dir / 'checkpoint-4'} is the last good checkpoint" in error
    assert "--resume --learning-rate 5e-05" in error
    assert sorted(path.name for path in output_dir.iterdir()) == ["checkpoint-2", "checkpoint-4", "retromae_run.json"]

    monkeypatch.setattr(RetroMAEForPreTraining, "forward", forward)
    assert main([*arguments, "--resume", "--learning-rate", "5e-05"]) == 0
    assert "Resumed at the peak learning rate 5e-05 (the checkpoint's: 0.0001)" in capsys.readouterr().out
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert rates[4] == pytest.approx(1e-4 * (6 - 3) / 6)  # the linear decay from the peak: step s trains at peak x (6 - s + 1) / 6
    assert rates[5] == pytest.approx(5e-5 * (6 - 4) / 6)
    assert (output_dir / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_evaluate_once_and_stay_in_step(corpus, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "-m", "retromae.cli",
        *tiny_run(corpus, output_dir, "--eval-data", str(corpus), "--eval-size", "16", "--eval-steps", "2", "--save-steps", "2", "--max-steps", "4"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["step"] for record in diagnostics.MetricsFile(output_dir).records()] == [0, 2, 4]
    assert result.stdout.count("eval step 0 ") == 1 and result.stdout.count("eval step 4 ") == 1
    assert (output_dir / "model" / "training_curves.png").is_file()


# Bad input.


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-split", "0.5"], "--eval-split must lie strictly between 0 and 0.5, got 0.5"),
        (["--eval-split", "0"], "--eval-split must lie strictly between 0 and 0.5, got 0.0"),
        (["--eval-split", "0.1", "--eval-data", "CORPUS"], "Give --eval-data or --eval-split, not both"),
        (["--eval-data", "SMALL"], "gives 5 held-out passages; evaluation needs at least 16"),
        (["--eval-split", "0.01"], "held-out passages; evaluation needs at least 16: hold out a larger share"),
        (["--eval-data", "MISSING"], "missing.txt does not exist"),
    ],
)
def test_bad_evaluation_input_fails_with_a_clear_message_and_writes_nothing(corpus, tmp_path, capsys, extra, message):
    small = tmp_path / "small.txt"
    small.write_text("\n".join(CORPUS[:5]) + "\n")
    names = {"CORPUS": str(corpus), "SMALL": str(small), "MISSING": str(tmp_path / "missing.txt")}
    output_dir = tmp_path / "run"
    assert main(tiny_run(corpus, output_dir, "--max-steps", "2", *[names.get(value, value) for value in extra])) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not output_dir.exists()


@pytest.mark.parametrize("contents", [None, ""])
def test_plot_without_evaluations_says_so(tmp_path, capsys, contents):
    if contents is not None:
        (tmp_path / "metrics.jsonl").write_text(contents)
    assert main(["plot", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'} {'does not exist' if contents is None else 'is empty'}" in error
    assert "--eval-data or --eval-split" in error


def test_plot_draws_the_valid_records_and_warns_of_each_bad_line(tmp_path, capsys):
    lines = [json.dumps(evaluation_record(step)) for step in (0, 2, 4, 6)]
    lines[1], lines[2] = lines[1][:40], json.dumps({"step": 4})  # a line cut short, and one of another shape
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as warned:
        assert main(["plot", str(tmp_path)]) == 0
    assert [str(warning.message).split(" (")[0] for warning in warned] == [
        f"{tmp_path / 'metrics.jsonl'}:2 is not valid JSON", f"{tmp_path / 'metrics.jsonl'}:3 is not an evaluation record"
    ]
    assert "Drew 2 evaluations (steps 0 to 6)" in capsys.readouterr().out
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_replaces_a_picture_only_with_overwrite_and_writes_its_extension_s_format_into_a_missing_folder(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(evaluation_record(0)) + "\n")
    picture = tmp_path / "training_curves.png"
    picture.write_bytes(b"the user's picture")
    assert main(["plot", str(tmp_path)]) == 2
    assert "training_curves.png exists: pass --overwrite" in capsys.readouterr().err and picture.read_bytes() == b"the user's picture"
    assert main(["plot", str(tmp_path), "--overwrite"]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "new" / "curves.svg")]) == 0
    assert b"<svg" in (tmp_path / "new" / "curves.svg").read_bytes()[:1000]
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["curves.svg", "metrics.jsonl", "new", "training_curves.png"]


@pytest.mark.parametrize("flag, value, message", [("--eval-size", "8", "must be at least 16, got 8"), ("--eval-steps", "0", "must be at least 1, got 0")])
def test_evaluation_numbers_out_of_range_are_refused_when_the_command_is_read(corpus, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit:
        main(tiny_run(corpus, tmp_path / "run", "--eval-split", "0.2", flag, value))
    assert exit.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
