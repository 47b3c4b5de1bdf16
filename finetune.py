"""`retromae finetune`: contrastive fine-tuning for retrieval on the sentence-transformers Trainer.

As in the paper's fine-tuning: each query is pulled towards its positive passage and away from
the other passages of the batch (in-batch negatives) and from its mined hard negatives, with
MultipleNegativesRankingLoss, or its cached variant (GradCache) for batches larger than memory.

With `--sparse` the model is a SPLADE one (`retromae convert --sparse`, a DupMAE run's OUTPUT_DIR/sparse)
and the loss sentence-transformers' SpladeLoss: the same in-batch and hard negatives ranked by dot
product (SparseMultipleNegativesRankingLoss), plus FLOPS regularisers on the query and document
embeddings, lambda_q * FLOPS(queries) + lambda_d * FLOPS(documents), FLOPS being the sum over the
vocabulary of each term's squared mean weight in the batch (Paria et al. 2020), which keeps the
vectors sparse.
"""

import argparse
import warnings
from pathlib import Path

import datasets
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SparseEncoder, SparseEncoderTrainer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import BatchSamplers
from sentence_transformers.sparse_encoder.losses import CachedSpladeLoss, SparseMultipleNegativesRankingLoss, SpladeLoss
from torch import nn

from .data import json_lines, tsv_rows
from .errors import UsageError, at_least, loading, positive, seed, steps
from .model_folder import save_atomically
from .sentence_transformer import load_sentence_transformer
from .sparse_encoder import load_sparse_encoder
from .training import AtomicCheckpoints, StopOnInterrupt, add_run_arguments, check_output_dir, check_report_to, resume_checkpoint


TEMPERATURE = 0.05  # of the cosine similarity of dense embeddings, as in the paper's fine-tuning
SPARSE_TEMPERATURE = 1.0  # of the dot product of sparse embeddings, as in SPLADE
QUERY_REGULARIZER_WEIGHT = 5e-5  # lambda_q and lambda_d of sentence-transformers' SPLADE training examples
DOCUMENT_REGULARIZER_WEIGHT = 3e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `retromae finetune`."""
    parser.add_argument("--model", required=True, help="RetroMAE release or encoder checkpoint of a supported family (folder or Hub id), or any SentenceTransformer.")
    parser.add_argument(
        "--train-data",
        required=True,
        help="Training examples: .jsonl with 'query', 'positive' and optionally 'negative' or 'negatives' (a list), "
        "or .tsv with query<TAB>positive[<TAB>negative...].",
    )
    parser.add_argument("--output-dir", required=True, help="Where checkpoints and the final model (OUTPUT_DIR/model) go.")
    parser.add_argument(
        "--temperature", type=positive,
        help=f"Softmax temperature of the contrastive loss; when not given, {TEMPERATURE} (cosine), or {SPARSE_TEMPERATURE} with --sparse (dot product).",
    )
    parser.add_argument("--cached", type=at_least(1), metavar="MINI_BATCH", help="Use the cached (GradCache) loss with this mini-batch size.")
    parser.add_argument(
        "--sparse", action="store_true",
        help="Fine-tune a sparse (SPLADE) model (from `retromae convert --sparse`) with SpladeLoss; OUTPUT_DIR/model loads with SparseEncoder.",
    )
    parser.add_argument(
        "--query-regularizer-weight", type=at_least(0, float), metavar="LAMBDA_Q",
        help=f"With --sparse: weight of the FLOPS regulariser on query embeddings (higher: sparser queries); {QUERY_REGULARIZER_WEIGHT} when not given.",
    )
    parser.add_argument(
        "--document-regularizer-weight", type=at_least(0, float), metavar="LAMBDA_D",
        help=f"With --sparse: weight of the FLOPS regulariser on positive and negative passages; {DOCUMENT_REGULARIZER_WEIGHT} when not given.",
    )
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="Queries per batch (each brings its positive and negatives). Default: 32.")
    parser.add_argument("--epochs", type=positive, default=1.0, help="Passes over the data. Default: 1.")
    parser.add_argument("--max-steps", type=steps, default=-1, help="Optimiser steps; -1 trains for --epochs. Default: -1.")
    parser.add_argument("--learning-rate", type=positive, default=2e-5, help="Peak AdamW learning rate. Default: 2e-5.")
    parser.add_argument("--warmup", type=at_least(0, float), default=0.1, help="Warm-up: a share of the steps (< 1) or a number of steps. Default: 0.1.")
    parser.add_argument("--seed", type=seed, default=42, help="Seeds weights and data order. Default: 42.")
    parser.add_argument("--bf16", action="store_true", help="Train in bfloat16 mixed precision.")
    parser.add_argument("--logging-steps", type=at_least(1), default=10, help="Log the loss every N steps. Default: 10.")
    parser.add_argument("--save-steps", type=at_least(1), default=500, help="Checkpoint every N steps. Default: 500.")
    parser.add_argument("--report-to", default="none", help="Trainer integrations (tensorboard, wandb, ...). Default: none.")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    """Fine-tune as `args` say; return the folder of the final model."""
    check_sparse_arguments(args)
    check_report_to(args.report_to)
    check_output_dir(args)
    dataset = load_examples(args.train_data)
    warn_if_few_pairs(dataset, args.batch_size, args.train_data)
    model, loss, trainer_class = sparse_training(args) if args.sparse else dense_training(args)
    interrupt = StopOnInterrupt()
    trainer = trainer_class(model=model, args=training_arguments(args, trainer_class), train_dataset=dataset, loss=loss, callbacks=[interrupt])
    trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    if interrupt.requested:
        raise interrupt.stopped(args.argv, trainer.state.global_step, args.output_dir)
    final = Path(args.output_dir) / "model"
    save_atomically(final, lambda path: model.save(str(path)))
    return final


def check_sparse_arguments(args: argparse.Namespace) -> None:
    """Regulariser weights only with --sparse; the defaults of the temperature and the weights filled in."""
    for flag, weight in (("--query-regularizer-weight", args.query_regularizer_weight), ("--document-regularizer-weight", args.document_regularizer_weight)):
        if weight is not None and not args.sparse:
            raise UsageError(f"{flag} weighs a FLOPS regulariser of sparse fine-tuning: give it with --sparse.")
    if args.temperature is None:
        args.temperature = SPARSE_TEMPERATURE if args.sparse else TEMPERATURE
    if args.sparse:
        args.query_regularizer_weight = QUERY_REGULARIZER_WEIGHT if args.query_regularizer_weight is None else args.query_regularizer_weight
        args.document_regularizer_weight = DOCUMENT_REGULARIZER_WEIGHT if args.document_regularizer_weight is None else args.document_regularizer_weight


def dense_training(args: argparse.Namespace) -> tuple[SentenceTransformer, nn.Module, type]:
    """The dense model, MultipleNegativesRankingLoss (cached with --cached) and its trainer."""
    with loading("--model", args.model):
        model = load_sentence_transformer(args.model)
    scale = 1.0 / args.temperature
    loss = (
        CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=args.cached)
        if args.cached
        else MultipleNegativesRankingLoss(model, scale=scale)
    )
    return model, loss, ContrastiveTrainer


def sparse_training(args: argparse.Namespace) -> tuple[SparseEncoder, nn.Module, type]:
    """The SPLADE model, SpladeLoss (cached with --cached) around SparseMultipleNegativesRankingLoss, and its trainer."""
    with loading("--model", args.model):
        model = load_sparse_encoder(args.model)
    ranking = SparseMultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    weights = {"query_regularizer_weight": args.query_regularizer_weight, "document_regularizer_weight": args.document_regularizer_weight}
    loss = CachedSpladeLoss(model, ranking, mini_batch_size=args.cached, **weights) if args.cached else SpladeLoss(model, ranking, **weights)
    return model, loss, SparseContrastiveTrainer


class ContrastiveTrainer(AtomicCheckpoints, SentenceTransformerTrainer):
    """`SentenceTransformerTrainer` with checkpoints written atomically."""


class SparseContrastiveTrainer(AtomicCheckpoints, SparseEncoderTrainer):
    """`SparseEncoderTrainer` with checkpoints written atomically."""


def training_arguments(args: argparse.Namespace, trainer_class: type):
    """The run's settings, as the arguments class that `trainer_class` takes."""
    return trainer_class.training_args_class(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup,
        seed=args.seed,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        report_to=args.report_to,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        dataloader_pin_memory=torch.accelerator.is_available(),
    )


def load_examples(path: str | Path) -> datasets.Dataset:
    """(anchor, positive, negative_1, ...) columns from a .jsonl or .tsv file; every row must have as many negatives."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--train-data {path} does not exist.")
    rows = read_jsonl_examples(path) if path.suffix in (".jsonl", ".json") else read_tsv_examples(path)
    if not rows:
        raise UsageError(f"--train-data {path} holds no examples.")
    counts = {len(row) for row in rows}
    if len(counts) > 1:
        raise UsageError(f"--train-data {path}: every example needs the same number of negatives, found {sorted(c - 2 for c in counts)}.")
    names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, counts.pop() - 1)]
    return datasets.Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(names)})


def warn_if_few_pairs(dataset: datasets.Dataset, batch_size: int, path: str) -> None:
    """In-batch negatives need other pairs in the batch: with fewer distinct pairs than a batch the loss says little."""
    pairs = len(set(zip(dataset["anchor"], dataset["positive"])))
    if pairs < batch_size:
        warnings.warn(
            f"--train-data {path} holds {pairs} distinct (query, positive) pairs, fewer than --batch-size {batch_size}: "
            "batches have few in-batch negatives, and a single or repeated pair gives a loss of 0 and no training.",
            stacklevel=2,
        )


def read_jsonl_examples(path: Path) -> list[list[str]]:
    rows = []
    for number, record in json_lines(path, UsageError):
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number} is not a JSON object with 'query' and 'positive'.")
        negatives = record.get("negatives", [record["negative"]] if "negative" in record else [])
        if not isinstance(negatives, list):
            raise UsageError(f"{path}:{number}: 'negatives' must be a list of texts, got {type(negatives).__name__}.")
        row = [record.get("query"), record.get("positive"), *negatives]
        if not all(isinstance(text, str) and text.strip() for text in row):
            raise UsageError(f"{path}:{number} needs non-empty 'query' and 'positive' texts (and text negatives; null is not a text).")
        rows.append(row)
    return rows


def read_tsv_examples(path: Path) -> list[list[str]]:
    rows = []
    for number, row in tsv_rows(path, UsageError):
        if not row:
            continue
        if len(row) < 2 or not all(text.strip() for text in row):
            raise UsageError(f"{path}:{number} is not query<TAB>positive[<TAB>negative...].")
        rows.append(row)
    return rows
