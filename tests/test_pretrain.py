"""`retromae pretrain` end to end on a tiny model: output, resume, multi-process, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from tokenizers import BertWordPieceTokenizer
from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from retromae import loading
from retromae.cli import build_parser, main

from conftest import CORPUS
from helpers import CrashAfter, resolved_settings, run_pretraining, tiny_run


def test_pretrain_releases_an_encoder_that_loads_and_embeds(corpus, tmp_path, tokenizer, capsys):
    output_dir = tmp_path / "run"
    assert main(tiny_run(corpus, output_dir)) == 0
    release = output_dir / "model"
    assert f"saved to {release}" in capsys.readouterr().out
    names = set(os.listdir(release))
    assert {"model.safetensors", "config.json", "configuration_retromae.py", "modeling_retromae.py", "tokenizer.json"} <= names
    assert not any(key.startswith("decoder.") for key in load_file(release / "model.safetensors"))
    assert any(key.startswith("decoder.") for key in load_file(output_dir / "checkpoint-4" / "model.safetensors"))
    inputs = tokenizer(["a query about retrieval"], return_tensors="pt")
    with torch.no_grad():
        remote = AutoModel.from_pretrained(release, trust_remote_code=True).eval()
        embedding = remote(**inputs).sentence_embedding
        bert = BertModel.from_pretrained(release).eval()
        torch.testing.assert_close(bert(**inputs).last_hidden_state[:, 0], embedding)
    assert embedding.shape == (1, 128) and torch.isfinite(embedding).all()
    encoded = SentenceTransformer(str(release), trust_remote_code=True).encode(["a query about retrieval"], convert_to_tensor=True)
    torch.testing.assert_close(encoded, embedding, atol=1e-5, rtol=0)
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "encoder_loss" in entry]
    assert logged and all({"decoder_loss", "tokens_per_second"} <= set(entry) for entry in logged)
    summary = json.loads((release / "retromae_pretraining.json").read_text())
    assert summary["steps"] == 4 and summary["encoder_mask_ratio"] == 0.30 and summary["enhanced_decoding"] is True
    assert summary["corpus"] == corpus.name and summary["records"] == len(CORPUS) and summary["processes"] == 1
    assert summary["passages_trained"] == 16 and summary["passages_from_long_records"] == "split"


def train_wordpiece(folder, save):
    """A 120-entry WordPiece vocabulary trained on the corpus, saved the way the `tokenizers` library saves it."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(CORPUS, vocab_size=120, min_frequency=1)
    folder.mkdir()
    if save == "vocab.txt":
        wordpiece.save_model(str(folder))
    else:
        wordpiece.save(str(folder / "tokenizer.json"))
    return wordpiece


@pytest.mark.parametrize("save", ["vocab.txt", "tokenizer.json"])
def test_pretrain_takes_a_vocabulary_trained_with_the_tokenizers_library(corpus, tmp_path, save):
    wordpiece = train_wordpiece(tmp_path / "wordpiece", save)
    assert main(tiny_run(corpus, tmp_path / "run", "--tokenizer", str(tmp_path / "wordpiece"))) == 0
    release = tmp_path / "run" / "model"
    assert json.loads((release / "config.json").read_text())["vocab_size"] == wordpiece.get_vocab_size()
    tokenizer = AutoTokenizer.from_pretrained(release)
    assert tokenizer.tokenize("Dense retrieval") == wordpiece.encode("Dense retrieval", add_special_tokens=False).tokens
    assert tokenizer.mask_token == "[MASK]" and tokenizer.cls_token_id == wordpiece.token_to_id("[CLS]")
    embedding = SentenceTransformer(str(release)).encode(["Dense retrieval"])
    assert embedding.shape == (1, 128)


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda folder: None, "holds no tokenizer_config.json, vocab.txt or tokenizer.json"),
        (
            lambda folder: PreTrainedTokenizerFast(tokenizer_object=train_wordpiece(folder / "raw", "vocab.txt")._tokenizer).save_pretrained(folder),
            "has no cls_token, sep_token, mask_token, pad_token",
        ),
    ],
)
def test_a_folder_that_is_not_a_bert_tokenizer_is_refused(corpus, tmp_path, capsys, write, message):
    (tmp_path / "tokenizer").mkdir()
    write(tmp_path / "tokenizer")
    assert main(tiny_run(corpus, tmp_path / "run", "--tokenizer", str(tmp_path / "tokenizer"))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_loading_a_bert_says_in_one_line_what_is_new(tiny_config, tmp_path, capfd, no_transformers_warnings):
    BertModel(tiny_config.encoder).save_pretrained(tmp_path / "bert")
    model = loading.load_base_model(str(tmp_path / "bert"), "sdpa", {"encoder_mask_ratio": 0.2})
    assert transformers_logging.get_verbosity() == transformers_logging.WARNING
    assert model.config.encoder_mask_ratio == 0.2
    captured = capfd.readouterr()
    said = captured.out + captured.err
    assert "decoder (new in RetroMAE) initialised afresh" in said and "MLM head (the checkpoint has none)" in said
    assert "Warning" not in said


def test_the_fresh_decoder_of_a_checkpoint_follows_the_seed(tiny_config, tokenizer, tmp_path):
    BertModel(tiny_config.encoder).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    decoders = []
    for seed in ("3", "3", "4"):
        model, _ = loading.build_model_and_tokenizer(resolved_settings(["pretrain", "--model", str(tmp_path / "bert"), "--seed", seed, "--max-length", "32"]))
        decoders.append(model.decoder.layers[0].attention.self.query.weight)
    assert torch.equal(decoders[0], decoders[1]) and not torch.equal(decoders[0], decoders[2])


def test_no_enhanced_decoding_builds_the_ablation(tmp_path):
    model, _ = loading.build_model_and_tokenizer(resolved_settings(["pretrain", "--config", "tiny", "--no-enhanced-decoding", "--max-length", "32"]))
    assert model.config.enhanced_decoding is False


def test_jsonl_files_and_folders_are_read(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for part in range(2):
        lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(CORPUS[part::2])]
        (folder / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    assert main(tiny_run(folder, tmp_path / "run", "--max-steps", "2")) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_killed_run_resumes_to_the_same_weights(corpus, tmp_path):
    run_pretraining(tiny_run(corpus, tmp_path / "whole", "--max-steps", "6", "--save-steps", "3"))

    with pytest.raises(KeyboardInterrupt):
        run_pretraining(tiny_run(corpus, tmp_path / "killed", "--max-steps", "6", "--save-steps", "3"), callbacks=[CrashAfter(4)])
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-3", "retromae_run.json"]
    run_pretraining(tiny_run(corpus, tmp_path / "killed", "--max-steps", "6", "--save-steps", "3", "--resume"))

    expected = load_file(tmp_path / "whole" / "checkpoint-6" / "model.safetensors")
    actual = load_file(tmp_path / "killed" / "checkpoint-6" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_two_process_data_parallel_run_on_cpu(corpus, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "retromae.cli", *tiny_run(corpus, output_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("RetroMAE encoder saved to") == 1
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(output_dir / "checkpoint-4"))
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert state["train_batch_size"] == 4
    released = AutoModel.from_pretrained(output_dir / "model", trust_remote_code=True)
    trained = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    assert type(released).__name__ == "RetroMAEModel"
    for name, tensor in released.state_dict().items():  # the release is the encoder rank 0 trained and saved
        torch.testing.assert_close(tensor, trained[f"encoder.bert.{name}"], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "release", "convert", "plan"])
def test_help_documents_every_option(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser = build_parser()
    subcommand = parser._subparsers._group_actions[0].choices[command]
    for action in subcommand._actions:
        assert action.help, action.dest
        for flag in action.option_strings:
            assert flag in text


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda tmp, args: args + ["--train-data", str(tmp / "missing.txt")], "missing.txt does not exist"),
        (lambda tmp, args: args + ["--train-data", str(write(tmp / "empty.txt", ""))], "empty.txt is empty"),
        (lambda tmp, args: args + ["--train-data", str(write(tmp / "bad.jsonl", '{"text": "ok"}\nnot json\n'))], "bad.jsonl:2 is not valid JSON"),
        (lambda tmp, args: args + ["--train-data", str(write(tmp / "field.jsonl", '{"body": "x"}\n'))], "field.jsonl has no column 'text' (its columns: body)"),
        (lambda tmp, args: args + ["--train-data", str(write(tmp / "c.txt", "text\n")), "--model", str(tmp)], "Give --model or --config, not both"),
        (lambda tmp, args: args + ["--objective", "dupmae", "--bow-loss-weight", "-0.5"], "--bow-loss-weight must be a finite number of at least 0, got -0.5"),
        (lambda tmp, args: args + ["--bow-loss-weight", "0.2"], "--bow-loss-weight applies to --objective dupmae only"),
        (lambda tmp, args: args + ["--objective", "retromae", "--bow-loss-weight", "0"], "--bow-loss-weight applies to --objective dupmae only"),
        (lambda tmp, args: args + ["--objective", "dupmae", "--no-enhanced-decoding"], "--objective dupmae needs enhanced decoding"),
    ],
)
def test_bad_input_fails_with_a_clear_message_and_writes_nothing(tmp_path, capsys, change, message):
    output_dir = tmp_path / "out"
    args = change(tmp_path, ["pretrain", "--config", "tiny", "--output-dir", str(output_dir)])
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention"])
def test_an_attention_kernel_the_family_lacks_is_refused(tmp_path, corpus, capsys, kernel):
    deberta = tmp_path / "deberta"
    write_config(deberta, {"model_type": "deberta-v2"})
    args = ["pretrain", "--model", str(deberta), "--train-data", str(corpus), "--output-dir", str(tmp_path / "o"), "--attn-implementation", kernel]
    assert main(args) == 2
    assert f"--attn-implementation {kernel}: the deberta-v2 family's transformers model takes only eager." in capsys.readouterr().err


@pytest.mark.parametrize(
    "kernel, cuda, package, message",
    [
        ("flash_attention_2", False, "flash_attn", "--attn-implementation flash_attention_2 needs a CUDA device, and this machine has none"),
        ("flash_attention_2", True, None, "--attn-implementation flash_attention_2 needs the flash-attn package"),
        ("flex_attention", False, None, "--attn-implementation flex_attention needs a CUDA device, and this machine has none"),
        ("flex_attention", True, None, "flex attention has no dropout, and the encoder's attention_probs_dropout_prob is 0.1"),
    ],
)
def test_a_kernel_this_machine_cannot_run_is_refused_before_training(corpus, tmp_path, capsys, monkeypatch, kernel, cuda, package, message):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: cuda)
    find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *rest: package if name == "flash_attn" else find_spec(name, *rest))
    assert main(tiny_run(corpus, tmp_path / "o", "--attn-implementation", kernel)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_flash_and_flex_attention_leave_the_decoder_on_sdpa(monkeypatch):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *rest: name if name == "flash_attn" else find_spec(name, *rest))
    encoder = {"model_type": "modernbert", "attention_dropout": 0.0}
    for kernel in ("flash_attention_2", "flex_attention"):
        assert loading.attention_implementations(kernel, encoder) == {"": "sdpa", "encoder": kernel}
    assert loading.attention_implementations("eager", encoder) == {"": "eager", "encoder": "eager"}
    assert loading.attention_implementations("sdpa", {"model_type": "deberta-v2"}) == {"": "eager", "encoder": "eager"}


def test_an_unknown_objective_exits_2_naming_the_flag_and_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", "tiny", "--output-dir", str(tmp_path / "out"), "--objective", "retromae3"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --objective: invalid choice: 'retromae3'" in error and "'dupmae'" in error and "Traceback" not in error


def test_a_dupmae_run_logs_the_bag_of_words_loss_and_records_the_objective(corpus, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(tiny_run(corpus, output_dir, "--objective", "dupmae", "--bow-loss-weight", "0.3")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines and all("  bow " in line for line in lines), lines
    summary = json.loads((output_dir / "model" / "retromae_pretraining.json").read_text())
    assert summary["objective"] == "dupmae" and summary["bow_loss_weight"] == 0.3
    assert " + 0.3 x " in summary["final_loss"]
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert all("bow_loss" in entry for entry in state["log_history"] if "encoder_loss" in entry)
    config = json.loads((output_dir / "checkpoint-4" / "config.json").read_text())
    assert config["objective"] == "dupmae" and config["bow_loss_weight"] == 0.3


def test_a_dupmae_run_writes_the_sparse_retriever_of_its_released_encoder(corpus, tmp_path, capsys):
    from sentence_transformers import SparseEncoder
    from transformers import AutoModelForMaskedLM

    from retromae.sparse_encoder import splade_embedding

    output_dir = tmp_path / "run"
    assert main(tiny_run(corpus, output_dir, "--objective", "dupmae", "--max-steps", "2")) == 0
    assert f"Sparse (SPLADE) model saved to {output_dir / 'sparse'}" in capsys.readouterr().out
    texts = ["a query about retrieval", "the bag of words of a passage"]
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "model")
    with torch.no_grad():
        expected = splade_embedding(AutoModelForMaskedLM.from_pretrained(output_dir / "model", trust_remote_code=True).eval(), tokenizer(texts, padding=True, return_tensors="pt"))
        sparse = SparseEncoder(str(output_dir / "sparse")).encode(texts, convert_to_tensor=True).to_dense()
    torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "v1").exists()
    assert main(tiny_run(corpus, tmp_path / "v1", "--max-steps", "1")) == 0
    assert not (tmp_path / "v1" / "sparse").exists()


def test_model_that_is_not_a_checkpoint_is_refused(tmp_path, corpus, capsys):
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    assert main(["pretrain", "--model", str(not_a_model), "--train-data", str(corpus), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


def test_output_dir_holding_another_model_is_not_overwritten(tmp_path, corpus, capsys):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "config.json").write_text('{"model_type": "bert"}')
    assert main(tiny_run(corpus, output_dir)) == 2
    assert "already holds files" in capsys.readouterr().err
    assert os.listdir(output_dir) == ["config.json"]
    assert (output_dir / "config.json").read_text() == '{"model_type": "bert"}'


def write(path, text):
    path.write_text(text)
    return path


def write_config(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
