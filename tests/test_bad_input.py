"""Nothing lost, nothing cryptic: every command meets careless input with one `error:` line and exit 2, before any
work, and leaves the user's files as they were.

The hostile command lines run in one subprocess (tests/cli_cases.py), as a user's shell would run them.
"""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from retromae.cli import main

from conftest import CORPUS, TEXTS
from helpers import evaluation_record, resolved_settings, tiny_pretrain, write_corpus


HERE = Path(__file__).parent
def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) with a digest of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(file.relative_to(path.parent)): hashlib.sha256(file.read_bytes()).hexdigest() for file in files}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run (its release is a real model folder), the user's precious files, and broken inputs."""
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root / "corpus.txt")
    assert main(tiny_pretrain(corpus, root / "run")) == 0
    model = root / "run" / "model"
    keep = root / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("a week of work")
    (root / "file.txt").write_text("not a folder")
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = (model / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(model / "config.json", no_weights)
    bad_config = root / "bad-config"
    shutil.copytree(model, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "bert",')
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(model, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab.txt", "special_tokens_map.json"))
    (root / "not-gzip.txt.gz").write_text("plain text, not gzip")
    (root / "cut.txt.gz").write_bytes(gzip.compress(("\n".join(CORPUS) + "\n").encode())[:200])
    (root / "random.parquet").write_bytes(os.urandom(64))
    pairs = [{"query": q, "positive": p} for q, p in zip(CORPUS[:8], CORPUS[8:16])]
    write_jsonl(root / "pairs.jsonl", pairs)
    write_jsonl(root / "string-negatives.jsonl", [{**pairs[0], "negatives": "abc"}])
    write_jsonl(root / "dict-negatives.jsonl", [{**pairs[0], "negatives": {"a": 1, "b": 2}}])
    write_jsonl(root / "null-query.jsonl", [pairs[0], {"query": None, "positive": "p"}])
    (root / "latin1.jsonl").write_bytes(json.dumps(pairs[0]).encode() + b'\n{"query": "caf\xe9", "positive": "p"}\n')
    only_config = root / "only-tokenizer-config"
    only_config.mkdir()
    shutil.copy(model / "tokenizer_config.json", only_config)
    (root / "emoji.txt").write_text("😀🎉🔥 🚀\n🚀🚀 😀\n" * 20)
    (root / "fsdp-version-string.json").write_text('{"version": "2"}')
    assert main(["convert", "--sparse", str(model), str(root / "sparse")]) == 0  # a RetroMAE run's release has the MLM head SPLADE needs
    (root / "empty").mkdir()
    (root / "evaluated").mkdir()
    write_jsonl(root / "evaluated" / "metrics.jsonl", [evaluation_record(0), evaluation_record(2)])
    (root / "evaluated" / "training_curves.png").write_bytes(b"the user's picture")
    (root / "other-shape").mkdir()
    (root / "other-shape" / "metrics.jsonl").write_text('\n{"loss": 1.5}\n{"step": 4, "passages"\n')
    beir(root / "beir", {})
    beir(root / "null-title", {"d1": {"title": None}})
    beir(root / "duplicate-id", {"d1": {"_id": "d0"}})
    return {"root": root, "corpus": corpus, "model": model, "keep": keep}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def beir(folder: Path, changes: dict) -> None:
    """A three-document BEIR folder; `changes` overrides fields of documents by id."""
    (folder / "qrels").mkdir(parents=True)
    documents = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate(TEXTS[:3])]
    documents = [document | changes.get(document["_id"], {}) for document in documents]
    write_jsonl(folder / "corpus.jsonl", documents)
    write_jsonl(folder / "queries.jsonl", [{"_id": "q0", "text": "masked auto-encoder"}])
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")


def cases(world) -> dict[str, tuple[list[str], str, list[Path]]]:
    """name: (command line, what its one error line must say, the user's paths that must stay as they were)."""
    root, corpus, model, keep = world["root"], world["corpus"], world["model"], world["keep"]
    run = root / "run"
    fresh = root / "fresh"
    pretrain = ["pretrain", "--config", "tiny", "--train-data", str(corpus), "--output-dir", str(fresh)]
    evaluate = ["evaluate", str(model), str(root / "beir"), "--output", str(root / "metrics.json")]
    finetune = ["finetune", "--model", str(model), "--train-data", str(root / "pairs.jsonl"), "--output-dir", str(fresh)]
    numbers = {
        "--warmup -1": "--warmup: must be at least 0",
        "--learning-rate -1": "--learning-rate: must be above 0",
        "--logging-steps 0": "--logging-steps: must be at least 1",
        "--seed -1": "--seed: must lie between 0 and 4294967295",
        "--gradient-accumulation-steps 0": "--gradient-accumulation-steps: must be at least 1",
        "--dataloader-num-workers -1": "--dataloader-num-workers: must be at least 0",
        "--max-steps 0": "--max-steps: must be at least 1 (or -1 to train for --epochs)",
        "--epochs 0": "--epochs: must be above 0",
        "--save-steps 0": "--save-steps: must be at least 1",
        "--batch-size 0": "--batch-size: must be at least 1",
        "--max-length 2": "--max-length: must be at least 3",
        "--weight-decay -0.1": "--weight-decay: must be at least 0",
        "--save-total-limit 0": "--save-total-limit: must be at least 1",
        "--encoder-mask-ratio 1.5": "--encoder-mask-ratio: must lie strictly between 0 and 1, got 1.5",
        "--decoder-mask-ratio 0": "--decoder-mask-ratio: must lie strictly between 0 and 1, got 0.0",
        "--decoder-mask-patterns 0": "--decoder-mask-patterns: must be at least 1, got 0",
    }
    table = {f"pretrain {flag}": ([*pretrain, *flag.split()], message, []) for flag, message in numbers.items()}
    table |= {
        "finetune --batch-size 0": ([*finetune, "--batch-size", "0"], "--batch-size: must be at least 1", []),
        "finetune --cached -4": ([*finetune, "--cached", "-4"], "--cached: must be at least 1", []),
        "evaluate --batch-size 0": ([*evaluate, "--batch-size", "0"], "--batch-size: must be at least 1", []),
        "release --dry-run into a folder holding files": (
            ["release", str(model), "--repo-id", "org/name", "--dry-run", str(keep)], "holds files: pass --overwrite", [keep]),
        "release --dry-run into the model itself": (
            ["release", str(model), "--repo-id", "org/name", "--dry-run", str(model), "--overwrite"], "is the source", [model]),
        "release --dry-run onto a file": (
            ["release", str(model), "--repo-id", "org/name", "--dry-run", str(root / "file.txt")], "is a file", [root / "file.txt"]),
        "convert into a folder holding files": (["convert", str(model), str(keep)], "holds files: pass --overwrite", [keep]),
        "convert onto itself": (["convert", str(model), str(model), "--overwrite"], "is the source", [model]),
        "convert onto a file": (["convert", str(model), str(root / "file.txt")], "is a file", [root / "file.txt"]),
        "convert without a tokenizer": (["convert", str(root / "no-tokenizer"), str(root / "out")], "holds no tokenizer of its own", []),
        "evaluate --output onto a folder": ([*evaluate[:3], "--output", str(keep)], "is a folder; give a file name", [keep]),
        "evaluate --output onto a file": ([*evaluate[:3], "--output", str(root / "file.txt")], "exists: pass --overwrite", [root / "file.txt"]),
        "finetune into a folder holding files": ([*finetune[:-1], str(keep)], "already holds files", [keep]),
        "pretrain truncated safetensors": (
            ["pretrain", "--model", str(root / "truncated"), "--train-data", str(corpus), "--output-dir", str(fresh)],
            "truncated: could not be loaded", [root / "truncated"]),
        "finetune truncated safetensors": ([*finetune[:2], str(root / "truncated"), *finetune[3:]], "truncated: could not be loaded", []),
        "evaluate truncated safetensors": (["evaluate", str(root / "truncated"), *evaluate[2:]], "truncated: could not be loaded", []),
        "release truncated safetensors": (
            ["release", str(root / "truncated"), "--repo-id", "org/name", "--dry-run", str(root / "out")], "truncated: could not be loaded", []),
        "convert truncated safetensors": (["convert", str(root / "truncated"), str(root / "out")], "truncated: could not be loaded", []),
        "pretrain config.json without weights": (
            ["pretrain", "--model", str(root / "no-weights"), "--train-data", str(corpus), "--output-dir", str(fresh)],
            "no-weights: could not be loaded", []),
        "release invalid config.json": (
            ["release", str(root / "bad-config"), "--repo-id", "org/name", "--dry-run", str(root / "out")], "config.json is not valid JSON", []),
        "evaluate a missing model": (["evaluate", str(root / "no" / "such"), *evaluate[2:]], "no such file or folder", []),
        "evaluate a file as the model": (["evaluate", str(corpus), *evaluate[2:]], "corpus.txt: could not be loaded", []),
        "pretrain a missing --model": (["pretrain", "--model", "./models/mine", "--train-data", str(corpus), "--output-dir", str(fresh)],
                                       "--model ./models/mine: no such file or folder", []),
        "pretrain a missing --tokenizer": ([*pretrain, "--tokenizer", str(root / "vocab")], "vocab: no such file or folder", []),
        "pretrain --resume at a model folder": (
            [*tiny_pretrain(corpus, run)[:-2], "--seed", "3", "--resume", str(model)], "is not a training checkpoint", [run]),
        "pretrain --resume at a checkpoint of another size": (
            [*tiny_pretrain(corpus, run, "--resume"), "--config", "mini", "--max-steps", "4"], "holds another model than this run's", [run]),
        "pretrain --resume at a checkpoint of another size, past its steps": (
            [*tiny_pretrain(corpus, run, "--resume"), "--config", "mini", "--max-steps", "1"], "holds another model than this run's", [run]),
        "pretrain --resume with another objective": (
            [*tiny_pretrain(corpus, run, "--resume"), "--max-steps", "4", "--objective", "dupmae"],
            "--objective dupmae: the run being resumed", [run]),
        "pretrain --resume with another --max-length": (
            [*tiny_pretrain(corpus, run, "--resume"), "--max-steps", "4", "--max-length", "64"], "has max_length 32, which defines it", [run]),
        "pretrain --resume with another encoder mask ratio": (
            [*tiny_pretrain(corpus, run, "--resume"), "--max-steps", "4", "--encoder-mask-ratio", "0.15"], "has encoder_mask_ratio 0.3", [run]),
        "pretrain --bow-loss-weight inf": ([*pretrain, "--objective", "dupmae", "--bow-loss-weight", "inf"], "--bow-loss-weight must be a finite number of at least 0, got inf", []),
        "pretrain --learning-rate nan": ([*pretrain, "--learning-rate", "nan"], "--learning-rate: must be a finite number", []),
        "pretrain --eval-steps without held-out passages": ([*pretrain, "--eval-steps", "5"], "--eval-steps needs held-out passages", []),
        "pretrain an FSDP version given as a string": (
            [*pretrain, "--fsdp", str(root / "fsdp-version-string.json")], 'version must be the number 2 (FSDP2), got "2"', []),
        "pretrain --tokenizer with only tokenizer_config.json": (
            ["pretrain", "--model", str(model), "--tokenizer", str(root / "only-tokenizer-config"), "--train-data", str(corpus),
             "--output-dir", str(fresh)], "tokenizer loaded has", []),
        "pretrain --config with a tokenizer of special tokens alone": (
            [*pretrain, "--tokenizer", str(root / "only-tokenizer-config"), "--max-steps", "1"], "The tokenizer cannot spell this corpus", []),
        "pretrain a corpus the tokenizer cannot spell": (
            [*pretrain[:4], str(root / "emoji.txt"), *pretrain[5:], "--max-steps", "1"], "40 of the first 40 passages are nothing but [UNK]", []),
        "pretrain --report-to wandb without wandb": ([*pretrain, "--report-to", "wandb"], "wandb is not installed", []),
        "pretrain a .gz that is not gzip": (
            [*pretrain[:4], str(root / "not-gzip.txt.gz"), *pretrain[5:], "--max-steps", "1"], "not-gzip.txt.gz could not be read as text (gz-compressed)", []),
        "pretrain a truncated gzip": (
            [*pretrain[:4], str(root / "cut.txt.gz"), *pretrain[5:], "--max-steps", "1"], "cut.txt.gz could not be read as text (gz-compressed)", []),
        "pretrain random bytes as parquet": (
            [*pretrain[:4], str(root / "random.parquet"), *pretrain[5:], "--max-steps", "1"], "random.parquet could not be read as parquet", []),
        "finetune negatives that are a string": (
            [*finetune[:4], str(root / "string-negatives.jsonl"), *finetune[5:]], "string-negatives.jsonl:1: 'negatives' must be a list of texts, got str", []),
        "finetune negatives that are a dict": (
            [*finetune[:4], str(root / "dict-negatives.jsonl"), *finetune[5:]], "dict-negatives.jsonl:1: 'negatives' must be a list of texts, got dict", []),
        "finetune a null query": ([*finetune[:4], str(root / "null-query.jsonl"), *finetune[5:]], "null-query.jsonl:2 needs non-empty 'query'", []),
        "finetune JSON lines that are not UTF-8": ([*finetune[:4], str(root / "latin1.jsonl"), *finetune[5:]], "latin1.jsonl:2 is not UTF-8 text", []),
        "plot over a picture that exists": (["plot", str(root / "evaluated")], "training_curves.png exists: pass --overwrite", [root / "evaluated"]),
        "plot --output in a format that is no picture": (
            ["plot", str(root / "evaluated"), "--output", str(root / "curves.txt")], "the name must end in the picture's format", []),
        "plot records of another shape": (
            ["plot", str(root / "other-shape"), "--output", str(root / "curves.png")], "metrics.jsonl:2 is not an evaluation record (it has no number 'step'", []),
        "evaluate --hybrid with a sparse model as the dense one": (
            ["evaluate", "--hybrid", str(root / "sparse"), str(root / "sparse"), *evaluate[2:]], f"DENSE {root / 'sparse'} is not a dense model: it is a sparse", []),
        "evaluate --hybrid with a dense model as the sparse one": (
            ["evaluate", "--hybrid", str(model), str(model), *evaluate[2:]], f"SPARSE {model} is not a sparse (SPLADE) model: it is a dense one", []),
        "convert an empty folder": (["convert", str(root / "empty"), str(root / "out")], "not a model checkpoint (the folder has no config.json)", []),
        "finetune --sparse on a dense model": (
            [*finetune, "--sparse"], "has no MLM head, so convert the one it was fine-tuned from", []),
        "plan --gpu-memory inf": (
            ["plan", "--model", "tiny", "--max-length", "128", "--batch-size", "4", "--gpu-memory", "inf"], "--gpu-memory: must be a finite number", []),
        "plan a length beyond the model's positions": (
            ["plan", "--model", "tiny", "--max-length", "1000000000", "--batch-size", "4", "--gpu-memory", "40"],
            "--max-length 1000000000 exceeds the 512 tokens the model's positions allow", []),
        "evaluate a null title": (["evaluate", str(model), str(root / "null-title"), "--output", str(root / "m.json")], "corpus.jsonl:2: 'title' must be a string", []),
        "evaluate a duplicate _id": (["evaluate", str(model), str(root / "duplicate-id"), "--output", str(root / "m.json")], "corpus.jsonl:2: '_id' 'd0' repeats line 1", []),
    }
    return table


@pytest.fixture(scope="module")
def outcomes(world):
    """Every case's command line run in one subprocess, with the snapshots of the user's paths before and after."""
    table = cases(world)
    before = {name: [snapshot(path) for path in paths] for name, (_, _, paths) in table.items()}
    spec, results = world["root"] / "cases.json", world["root"] / "results.json"
    spec.write_text(json.dumps({name: {"argv": argv} for name, (argv, _, _) in table.items()}))
    subprocess.run([sys.executable, str(HERE / "cli_cases.py"), str(spec), str(results)], check=True, timeout=600)
    ran = json.loads(results.read_text())
    after = {name: [snapshot(path) for path in paths] for name, (_, _, paths) in table.items()}
    return {name: (ran[name], message, before[name], after[name]) for name, (_, message, _) in table.items()}


CASE_NAMES = list(cases({"root": Path("r"), "corpus": Path("c"), "model": Path("m"), "keep": Path("k")}))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_exits_2_with_one_error_line_and_leaves_the_users_files(outcomes, name):
    result, message, before, after = outcomes[name]
    assert result["code"] == 2, result["err"][-2000:]
    assert "Traceback" not in result["err"]
    errors = [line for line in result["err"].splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], result["err"][-2000:]
    assert after == before


def test_fresh_output_dirs_are_not_created_by_refused_commands(outcomes, world):
    assert not (world["root"] / "fresh").exists() and not (world["root"] / "out").exists()


def test_resume_of_a_finished_run_says_so_exits_0_and_changes_nothing(world, capsys):
    run = world["root"] / "run"
    before = snapshot(run)
    assert main(tiny_pretrain(world["corpus"], run, "--resume")) == 0
    assert "already finished at step 2" in capsys.readouterr().out
    assert snapshot(run) == before


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(world, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and writable(path, mode))
    monkeypatch.setattr("retromae.pretraining.build_model_and_tokenizer", lambda settings: pytest.fail("the model was loaded"))
    assert main(tiny_pretrain(world["corpus"], locked / "run")) == 2
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_evaluate_writes_into_a_missing_folder(world, tmp_path):
    output = tmp_path / "reports" / "today" / "metrics.json"
    assert main(["evaluate", str(world["model"]), str(world["root"] / "beir"), "--output", str(output)]) == 0
    assert {"ndcg@10", "mrr@10", "recall@100"} <= set(json.loads(output.read_text()))


def test_debug_shows_the_whole_traceback(world):
    from retromae.errors import UsageError

    with pytest.raises(UsageError, match="no such file or folder"):
        main(["evaluate", str(world["root"] / "no" / "such"), str(world["root"] / "beir"), "--debug"])


def test_finetune_warns_when_fewer_distinct_pairs_than_a_batch(world, tmp_path):
    data = tmp_path / "same.jsonl"
    write_jsonl(data, [{"query": "q", "positive": "p"}] * 4)
    with pytest.warns(UserWarning, match="holds 1 distinct"):
        main(["finetune", "--model", str(world["model"]), "--train-data", str(data), "--output-dir", str(tmp_path / "ft"),
              "--batch-size", "4", "--max-steps", "1"])


def test_leftovers_of_a_killed_save_are_cleaned_and_a_moved_aside_folder_is_put_back(tmp_path):
    from retromae.model_folder import save_atomically

    dead = 2**22 + 17  # above Linux's default pid_max: no such process
    (tmp_path / f".model.tmp-{dead}").mkdir()
    previous = tmp_path / f".model.old-{dead}"
    previous.mkdir()
    (previous / "config.json").write_text("the user's model")
    save_atomically(tmp_path / "other", lambda folder: folder.mkdir())
    assert (tmp_path / f".model.tmp-{dead}").exists()  # another folder's leftovers are its own business
    save_atomically(tmp_path / "model", lambda folder: (folder.mkdir(), (folder / "config.json").write_text("new")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other"]
    assert (tmp_path / "model" / "config.json").read_text() == "new"


def test_ctrl_c_checkpoints_the_steps_done_and_resuming_gives_the_uninterrupted_weights(world, tmp_path):
    corpus, steps = world["corpus"], ["--max-steps", "6", "--save-steps", "100"]
    assert main(tiny_pretrain(corpus, tmp_path / "whole", *steps)) == 0
    stopped = tmp_path / "stopped"
    (stopped / ".staging").mkdir(parents=True)  # a killed run's half-written checkpoint
    command = [sys.executable, "-m", "retromae.cli", *tiny_pretrain(corpus, stopped, *steps, "--overwrite")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("step 2/6"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    checkpoints = [p.name for p in stopped.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and not (stopped / "model").exists() and not (stopped / ".staging").exists()
    assert 2 <= int(checkpoints[0].split("-")[1]) < 6
    assert main(tiny_pretrain(corpus, stopped, *steps, "--resume")) == 0
    expected = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    actual = load_file(stopped / "model" / "model.safetensors")
    for name in expected:
        assert (actual[name] - expected[name]).abs().max() < 1e-5, name


def test_a_resumed_dupmae_run_stays_dupmae_and_a_missing_sparse_model_is_found(world, tmp_path, capsys):
    """--resume without --objective continues the DupMAE run it resumes; a sparse model lost to a killed save is named, with the command that writes it."""
    run = tmp_path / "run"
    assert main(tiny_pretrain(world["corpus"], run, "--objective", "dupmae")) == 0
    assert main([*tiny_pretrain(world["corpus"], run, "--resume"), "--max-steps", "4", "--save-steps", "4"]) == 0
    record = json.loads((run / "model" / "retromae_pretraining.json").read_text())
    assert (record["objective"], record["steps"]) == ("dupmae", 4)
    assert json.loads((run / "sparse" / "retromae_pretraining.json").read_text())["steps"] == 4
    shutil.rmtree(run / "sparse")
    (run / ".sparse.tmp-4194321").mkdir()  # what the killed save left
    capsys.readouterr()
    assert main([*tiny_pretrain(world["corpus"], run, "--resume"), "--max-steps", "4"]) == 2
    error = capsys.readouterr().err
    assert "its sparse model" in error and "is missing" in error
    convert = error.split("`retromae ")[1].split("`")[0].split()
    assert main(convert) == 0
    assert main([*tiny_pretrain(world["corpus"], run, "--resume"), "--max-steps", "4"]) == 0
    assert "already finished at step 4" in capsys.readouterr().out
    assert not (run / ".sparse.tmp-4194321").exists()


def test_a_bag_of_words_weight_that_dwarfs_the_other_losses_is_warned_of(world, tmp_path):
    with pytest.warns(UserWarning, match="--bow-loss-weight 1e\\+30: the bag-of-words loss"):
        resolved_settings([*tiny_pretrain(world["corpus"], tmp_path / "run"), "--objective", "dupmae", "--bow-loss-weight", "1e30"])
