"""
What several test files share: tiny pre-training runs (command lines, settings, a simulated kill,
an evaluation record), RetroMAE's losses recomputed by hand, a release loaded by every route in a
fresh process, training with `RetroMAELoss`, and small retrieval data.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import TrainerCallback

from retromae import PretrainingResult, PretrainingSettings, RetroMAELoss, diagnostics, pretrain
from retromae.cli import build_parser
from retromae.settings import check, resolved

import families
from conftest import CORPUS, TEXTS, decoder_mask, place_in_hub_cache


def write_corpus(path: Path) -> Path:
    """`CORPUS` as a text file, a record per line."""
    path.write_text("\n".join(CORPUS) + "\n")
    return path


def tiny_pretrain(corpus, output_dir, *extra) -> list[str]:
    """`retromae pretrain` of a fresh tiny model for two steps of four passages, seeded."""
    return ["pretrain", "--config", "tiny", "--train-data", str(corpus), "--output-dir", str(output_dir), "--max-length", "32",
            "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2", "--seed", "3", *extra]


def tiny_run(corpus, output_dir, *extra) -> list[str]:
    """`retromae pretrain` of a fresh tiny model for four steps of four passages, seeded, logging and saving every two."""
    return [
        "pretrain",
        "--config", "tiny",
        "--train-data", str(corpus),
        "--output-dir", str(output_dir),
        "--max-length", "32",
        "--batch-size", "4",
        "--max-steps", "4",
        "--logging-steps", "2",
        "--save-steps", "2",
        "--seed", "3",
        *extra,
    ]


def parsed_settings(argv: list[str]) -> PretrainingSettings:
    """The settings that `retromae ARGV` (a `pretrain` command line) builds."""
    return PretrainingSettings.from_arguments(build_parser().parse_args(argv))


def resolved_settings(argv: list[str]) -> PretrainingSettings:
    """The settings `retromae ARGV` runs with: checked, filled with the run's defaults, nothing loaded."""
    settings = resolved(parsed_settings(argv).checked())
    check(settings)
    return settings


def run_pretraining(argv: list[str], callbacks=()) -> PretrainingResult:
    """`retromae ARGV` through the Python entry, with extra Trainer callbacks."""
    return pretrain(parsed_settings(argv), callbacks)


class LogRecorder(TrainerCallback):
    """What the Trainer hands its loggers (TensorBoard, W&B): every `on_log` payload, with its step."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


class CrashAfter(TrainerCallback):
    """Simulates a killed run: raises once the given step has been checkpointed."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def evaluation_record(step: int) -> dict:
    """A record of metrics.jsonl as an evaluation at `step` writes it, with made-up figures."""
    return {name: 1.0 / (1 + step) for name in diagnostics.RECORD_FIELDS} | {"step": step, "passages": 16}


def layer_norm(x, module):
    return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)


def linear(x, module):
    return x @ module.weight.T + module.bias


def reference_mlm_loss(model, hidden, labels):
    """The MLM head over every position, cross entropy over the labelled ones (the direct form)."""
    head = model.encoder.cls.predictions
    transformed = layer_norm(F.gelu(linear(hidden, head.transform.dense)), head.transform.LayerNorm)
    logits = transformed @ model.encoder.bert.embeddings.word_embeddings.weight.T + head.bias
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def reference_losses(model, batch):
    """RetroMAE's two losses recomputed step by step from ../shared/docs/retromae.md (DupMAE's query stream for objective="dupmae")."""
    embeddings = model.encoder.bert.embeddings
    encoder_hidden = model.encoder.bert(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
    encoder_loss = reference_mlm_loss(model, encoder_hidden, batch["encoder_labels"])

    ids = batch["decoder_input_ids"]
    batch_size, seq = ids.shape
    h_x = encoder_hidden[:, 0]  # the sentence embedding
    positions = embeddings.position_embeddings.weight[:seq]
    token_type = embeddings.token_type_embeddings.weight[0]
    h2 = layer_norm(embeddings.word_embeddings.weight[ids] + positions + token_type, embeddings.LayerNorm)
    h2 = torch.cat([h_x[:, None], h2[:, 1:]], dim=1)  # content stream
    # the query stream; without enhanced decoding the decoder attends over its own (masked) input
    h1 = h_x[:, None] + positions if model.config.enhanced_decoding else h2
    if model.config.objective == "dupmae":  # h_X through the embeddings module: + p_i + token type 0, LayerNorm
        h1 = layer_norm(h_x[:, None] + positions + token_type, embeddings.LayerNorm)

    layer = model.decoder.layers[0]
    attention = layer.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size

    def split(x):
        return x.view(batch_size, seq, heads, head_size).transpose(1, 2)

    q, k, v = split(linear(h1, attention.query)), split(linear(h2, attention.key)), split(linear(h2, attention.value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_size)
    scores = scores.masked_fill(~decoder_mask(batch)[:, None], float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, seq, heads * head_size)
    attended = layer_norm(linear(context, layer.attention.output.dense) + h1, layer.attention.output.LayerNorm)
    hidden = F.gelu(linear(attended, layer.intermediate.dense))
    decoded = layer_norm(linear(hidden, layer.output.dense) + attended, layer.output.LayerNorm)
    decoder_loss = reference_mlm_loss(model, decoded, batch["decoder_labels"])
    return encoder_loss, decoder_loss


def assert_same_loss_and_gradients(plain, other, batch, atol, other_forward=None):
    """`other`, run through `other_forward` (itself by default), gives `plain`'s loss and every gradient."""
    losses = []
    for forward in (plain, other if other_forward is None else other_forward):
        loss = forward(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=atol)
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(parameter.grad, other.get_parameter(name).grad, atol=atol, rtol=10 * atol)


ROUTES_SCRIPT = Path(__file__).with_name("load_every_route.py")
# transformers' notice on every first download of remote code, whoever wrote it; it names the code files.
REMOTE_CODE_NOTICE = "A new version of the following files was downloaded"
# Words a tiny vocabulary of their own spells whole: corpora whose passages and halves are unlike one another.
WORDS = (
    "river mountain engine violin harbour glacier orchard lantern compiler falcon meadow canyon theorem prism "
    "monsoon cathedral tundra satellite protein lagoon sonnet quarry magnet bamboo volcano archive beacon "
    "cactus nebula parchment tractor saffron turbine walrus yeast zephyr anchor bishop copper dolphin emerald"
).split()
REPO_ID = "org/tiny-retromae"
COMMIT = "c" * 40


def user_environment(cache: Path, tmp_path: Path) -> dict:
    """The environment of a Hub user's fresh process: offline, reading only `cache`, at transformers' default verbosity."""
    environment = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    return environment | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "user-home")}


def load_every_route(folder: Path, tmp_path: Path) -> dict:
    """Place `folder` in an offline Hub cache as REPO_ID and load it by every route in a fresh process."""
    return load_every_route_of({REPO_ID: folder}, tmp_path)[REPO_ID]


def load_every_route_of(folders: dict[str, Path], tmp_path: Path) -> dict[str, dict]:
    """Place each folder in one offline Hub cache under its repo id and load them all by every route in one fresh process."""
    cache = tmp_path / f"hub-cache-{'-'.join(folder.name for folder in folders.values())}"
    for repo_id, folder in folders.items():
        place_in_hub_cache(cache, repo_id, {COMMIT: folder}, main=COMMIT)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    output = tmp_path / f"routes-{cache.name}.json"
    command = [sys.executable, str(ROUTES_SCRIPT), str(tmp_path / "texts.json"), str(output), *folders]
    result = subprocess.run(
        command, env=user_environment(cache, tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom code" not in result.stdout + result.stderr
    return json.loads(output.read_text())


def cls_model(folder: Path, max_seq_length: int = 64) -> SentenceTransformer:
    """A SentenceTransformer of the checkpoint in `folder` whose embedding is the first token's final state."""
    transformer = Transformer(str(folder), max_seq_length=max_seq_length)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")])


def train_with_retromae_loss(folder: Path, output_dir: Path, max_steps: int, resume: bool = False, crash_at: int | None = None) -> RetroMAELoss:
    """`SentenceTransformerTrainer` with `RetroMAELoss` on the families' corpus, seeded; killed after step `crash_at` if given."""
    torch.manual_seed(0)
    model = cls_model(folder)
    loss = RetroMAELoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3, save_steps=2,
        logging_steps=1, seed=7, report_to="none", use_cpu=True, dataloader_drop_last=True,
    )
    callbacks = [loss.checkpoints] + ([CrashAfter(crash_at)] if crash_at else [])
    train_dataset = Dataset.from_dict({"text": families.CORPUS * 2})
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss, callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except KeyboardInterrupt:
        pass
    return loss


def write_beir(folder, corpus, queries, qrels, split="test"):
    """A BEIR folder: corpus.jsonl and queries.jsonl from {id: text}, qrels/SPLIT.tsv from (query, document, grade) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items()))
    (folder / "qrels").mkdir(exist_ok=True)
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


# Query and passage pairs for fine-tuning.
PAIRS = [
    ("what do cats do", "cats purr and sleep in the sun"),
    ("what do dogs do", "dogs bark at strangers"),
    ("where do rivers go", "rivers flow into the sea"),
    ("what is the capital of france", "paris is the capital of france"),
    ("how do plants grow", "plants grow with light and water"),
    ("who wrote hamlet", "hamlet was written by shakespeare"),
    ("what is ice", "ice is frozen water"),
    ("why is the sky blue", "the sky looks blue because of scattering"),
]
