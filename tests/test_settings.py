"""A run is a typed object: `PretrainingSettings`, from flags, a settings file or Python, and `retromae.pretrain`."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from retromae import PretrainingResult, PretrainingSettings, pretrain
from retromae.cli import main
from retromae.errors import UsageError
from retromae.settings import resolved

from conftest import MINILM_PATH
from helpers import tiny_pretrain, write_corpus


def test_a_settings_file_sets_the_run_and_the_flags_given_win(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({
        "config": "tiny", "train_data": str(corpus), "max_length": 32, "batch_size": 4, "max_steps": 3, "seed": 3,
        "logging_steps": 1, "warmup": 0, "training_arguments": {"lr_scheduler_type": "constant", "max_grad_norm": 0.5, "adam_beta2": 0.98},
    }))
    assert main(["pretrain", "--settings", str(settings), "--max-steps", "2", "--output-dir", str(tmp_path / "run")]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    rates = {entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert state["global_step"] == 2 and rates == {1e-4}  # constant: the default schedule decays linearly
    record = json.loads((tmp_path / "run" / "retromae_run.json").read_text())
    assert record["max_steps"] == 2 and record["training_arguments"]["max_grad_norm"] == 0.5


def test_a_finished_runs_record_repeats_the_run(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert main(tiny_pretrain(corpus, tmp_path / "first")) == 0
    assert main(["pretrain", "--settings", str(tmp_path / "first" / "retromae_run.json"), "--output-dir", str(tmp_path / "again")]) == 0
    first, again = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("first", "again"))
    assert first.keys() == again.keys() and all((first[name] == again[name]).all() for name in first)


def test_the_python_entry_runs_what_the_command_runs_and_returns_the_result(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    settings = PretrainingSettings(config="tiny", train_data=str(corpus), output_dir=str(tmp_path / "run"), max_length=32,
                                   batch_size=4, max_steps=2, seed=3, objective="dupmae")
    result = pretrain(settings)
    assert isinstance(result, PretrainingResult)
    assert (result.model, result.sparse) == (tmp_path / "run" / "model", tmp_path / "run" / "sparse")
    assert result.steps == 2 and result.passages_trained == 8 and result.records == len(corpus.read_text().splitlines())
    assert set(result.final_losses) == {"encoder_loss", "decoder_loss", "bow_loss"}
    assert main(tiny_pretrain(corpus, tmp_path / "command", "--objective", "dupmae")) == 0
    by_command = load_file(tmp_path / "command" / "model" / "model.safetensors")
    by_python = load_file(result.model / "model.safetensors")
    assert all((by_command[name] == by_python[name]).all() for name in by_command)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
        ({"learning_rate": "fast"}, "--learning-rate fast"),
        ({"passages": "paragraphs"}, "--passages 'paragraphs': must be one of split, truncate"),
        ({"lr_scheduler_type": "cosine"}, "unknown setting 'lr_scheduler_type' (a TrainingArguments field: put it under training_arguments)"),
        ({"batchsize": 4}, "unknown setting 'batchsize'"),
        ({"training_arguments": {"lr_sheduler_type": "cosine"}}, "'lr_sheduler_type' is not a field of transformers' TrainingArguments"),
        ({"training_arguments": {"max_grad_norm": "high"}}, "training_arguments: max_grad_norm must be of type"),
        ({"training_arguments": {"fp16": "yes"}}, "training_arguments: fp16 must be of type"),
        ({"training_arguments": {"learning_rate": 0.1}}, "'learning_rate' is set by the run from its own settings"),
        ({"training_arguments": {"lr_scheduler_type": "sideways"}}, "training_arguments: lr_scheduler_type must be one of linear, cosine"),
        ([1, 2], "must hold a mapping of settings, got list"),
        ({"streaming": "yes"}, "--streaming 'yes': must be true or false"),
        ({"training_arguments": [1]}, "training_arguments must be a mapping of TrainingArguments fields, got list"),
        (None, "the file is empty"),
    ],
)
def test_a_bad_settings_file_exits_2_naming_the_setting(tmp_path, capsys, content, message):
    settings = tmp_path / "run.json"
    settings.write_text("" if content is None else json.dumps(content))
    corpus = write_corpus(tmp_path / "corpus.txt")
    assert main(["pretrain", "--config", "tiny", "--train-data", str(corpus), "--settings", str(settings), "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_a_settings_file_that_is_not_yaml_is_named(tmp_path, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("max_steps: [2\n")
    assert main(["pretrain", "--settings", str(settings)]) == 2
    assert f"--settings {settings}: could not be loaded" in capsys.readouterr().err


def test_settings_left_unset_take_the_runs_defaults():
    demo = resolved(PretrainingSettings())
    assert (demo.max_length, demo.batch_size, demo.max_steps, demo.eval_split, demo.objective) == (128, 16, 100, 0.02, "retromae")
    assert demo.model == MINILM_PATH and demo.config is None  # the README's first command: the demo extra's all-MiniLM-L6-v2
    full = resolved(PretrainingSettings(train_data="corpus.txt", objective="dupmae"))
    assert (full.max_length, full.batch_size, full.max_steps, full.eval_split, full.bow_loss_weight) == (512, 32, -1, None, 0.1)


def test_python_settings_are_checked_by_the_flags_rules(tmp_path):
    with pytest.raises(UsageError, match="--encoder-mask-ratio 1.5: must lie strictly between 0 and 1"):
        pretrain(PretrainingSettings(config="tiny", encoder_mask_ratio=1.5, output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
