"""Continuing pre-training from a release: its MLM head and decoder travel with it, and the decoder starts afresh on request."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from retromae import RetroMAECollator, RetroMAEForPreTraining, loading
from retromae.cli import main
from retromae.hub import release

from conftest import TEXTS
from helpers import REPO_ID, tiny_pretrain, write_corpus

PARTS = "retromae_parts.safetensors"


@pytest.fixture(scope="module", params=["retromae", "dupmae"])
def finished_run(request, tmp_path_factory) -> Path:
    """A tiny run of each objective, two steps, its last checkpoint and its release (OUTPUT_DIR/model) beside each other."""
    folder = tmp_path_factory.mktemp(request.param)
    output_dir = folder / "run"
    assert main(tiny_pretrain(write_corpus(folder / "corpus.txt"), output_dir, "--objective", request.param)) == 0
    return output_dir


def next_step_losses(model: RetroMAEForPreTraining, collator: RetroMAECollator) -> list[float]:
    """The loss on a fixed batch, then again after one AdamW step on it: what continuing pre-training does next."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = collator(TEXTS)
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def test_a_release_continues_as_the_last_checkpoint_does(finished_run, tokenizer):
    from_release = RetroMAEForPreTraining.from_pretrained(finished_run / "model")
    from_checkpoint = RetroMAEForPreTraining.from_pretrained(finished_run / "checkpoint-2")
    assert from_release.config.objective == from_checkpoint.config.objective  # the release's own settings are its defaults
    release_weights, checkpoint_weights = from_release.state_dict(), from_checkpoint.state_dict()
    assert release_weights.keys() == checkpoint_weights.keys()
    for name, tensor in checkpoint_weights.items():
        torch.testing.assert_close(release_weights[name], tensor, atol=0, rtol=0, msg=name)
    collator = RetroMAECollator.from_config(from_checkpoint.config, tokenizer, max_length=32, seed=0)
    assert next_step_losses(from_release, collator) == next_step_losses(from_checkpoint, collator)


def test_pretrain_says_where_the_decoder_comes_from(finished_run, capsys):
    release_folder = str(finished_run / "model")
    continued = loading.load_base_model(release_folder, "sdpa", {})
    assert "decoder from the checkpoint, continued" in capsys.readouterr().out
    saved = load_file(finished_run / "model" / PARTS)
    for name, tensor in continued.decoder.state_dict().items():
        torch.testing.assert_close(tensor, saved[f"decoder.{name}"], atol=0, rtol=0)

    torch.manual_seed(0)
    fresh = loading.load_base_model(release_folder, "sdpa", {}, fresh_decoder=True)
    assert "decoder initialised afresh (--fresh-decoder)" in capsys.readouterr().out
    assert not torch.equal(fresh.decoder.layers[0].output.dense.weight, continued.decoder.layers[0].output.dense.weight)
    torch.testing.assert_close(fresh.encoder.state_dict(), continued.encoder.state_dict(), atol=0, rtol=0)


def test_a_release_without_its_decoder_says_so_and_continues_with_a_fresh_one(finished_run, tmp_path, capsys):
    folder = Path(release(finished_run / "model", REPO_ID, dry_run=tmp_path / "release", decoder=False))
    kept = load_file(folder / PARTS)
    assert kept and not any(name.startswith("decoder.") for name in kept)  # the MLM head stays
    assert "but not the decoder" in (folder / "README.md").read_text()
    loading.load_base_model(str(folder), "sdpa", {})
    assert "the decoder (new in RetroMAE) initialised afresh" in capsys.readouterr().out


def test_the_pretrain_command_continues_a_release(finished_run, tmp_path, capsys):
    argv = tiny_pretrain(write_corpus(tmp_path / "corpus.txt"), tmp_path / "continued")
    argv[argv.index("--config") : argv.index("--config") + 2] = ["--model", str(finished_run / "model")]
    assert main([*argv, "--max-steps", "1"]) == 0
    said = capsys.readouterr().out
    assert "decoder from the checkpoint, continued" in said
    assert (tmp_path / "continued" / "model" / PARTS).is_file()
    started, continued = (json.loads((folder / "model" / "retromae_pretraining.json").read_text()) for folder in (finished_run, tmp_path / "continued"))
    assert continued["objective"] == started["objective"]  # the release's settings are the continuation's defaults
    assert (tmp_path / "continued" / "sparse").is_dir() == (started["objective"] == "dupmae")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fresh-decoder"], "--fresh-decoder needs --model: the checkpoint whose decoder it starts anew."),
        (["--fresh-decoder", "--config", "tiny"], "--fresh-decoder needs --model, the checkpoint whose decoder it starts anew; --config starts"),
    ],
)
def test_fresh_decoder_without_a_model_is_refused(tmp_path, capsys, flags, message):
    argv = ["pretrain", "--train-data", str(write_corpus(tmp_path / "corpus.txt")), "--output-dir", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_decoder_that_does_not_fit_the_encoder_is_refused(finished_run, tmp_path, capsys):
    folder = Path(release(finished_run / "model", REPO_ID, dry_run=tmp_path / "release"))
    parts = load_file(folder / PARTS)
    name = next(key for key in parts if key.startswith("decoder.") and key.endswith("dense.weight"))
    parts[name] = torch.zeros(3, 5)
    save_file(parts, folder / PARTS)
    argv = tiny_pretrain(write_corpus(tmp_path / "corpus.txt"), tmp_path / "run")
    argv[argv.index("--config") : argv.index("--config") + 2] = ["--model", str(folder)]
    capsys.readouterr()
    assert main(argv) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' bar of the encoder's loading
    assert f"({PARTS}) does not fit this encoder's: its {name.removeprefix('decoder.')} is (3, 5)" in said and "--fresh-decoder" in said, said
