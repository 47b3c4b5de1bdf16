"""`retromae finetune`: contrastive fine-tuning for retrieval on the sentence-transformers Trainer.

As in the paper's fine-tuning: each query is pulled towards its positive passage and away from
the other passages of the batch (in-batch negatives) and from its mined hard negatives, with
MultipleNegativesRankingLoss, or its cached variant (GradCache) for batches larger than memory.

With `--mine-hard-negatives K`, K hard negatives per example are mined with the model before it trains
(`mining.py`: the guards against false negatives, the mined set kept in OUTPUT_DIR and reused).

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
from .errors import UsageError, at_least, check_writable, loading, positive, seed, steps
from .mining import (
    MARGIN,
    MINED_SET,
    MINING_RECORD,
    WINDOW,
    MiningSettings,
    candidate_passages,
    check_enough_passages,
    holds_only_a_mined_set,
    load_passages,
    mine,
    reusable_mined_set,
    source_name,
    write_mined_set,
)
from .model_folder import save_atomically
from .modeling_retromae import quiet_loading
from .sentence_transformer import load_sentence_transformer, to_sentence_transformer
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
    add_mining_arguments(parser)


def add_mining_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of hard-negative mining (docs/evaluation.md#hard-negatives)."""
    mining = parser.add_argument_group(
        "hard negatives",
        f"Mine negatives with the model before it trains. The mined set is saved as OUTPUT_DIR/{MINED_SET} (a --train-data file) "
        f"with OUTPUT_DIR/{MINING_RECORD}, and reused by a run with the same settings.",
    )
    mining.add_argument(
        "--mine-hard-negatives", type=at_least(1), metavar="K",
        help="Add K hard negatives to every example, mined with the model being fine-tuned (with --sparse: the first-token state of its "
        "encoder) from the training data's passages and --corpus. Negatives the data already has are kept, before them.",
    )
    mining.add_argument(
        "--corpus", metavar="PATH",
        help="With --mine-hard-negatives: more passages to mine from, in any form `retromae pretrain --train-data` reads "
        "(text, JSON lines, parquet, CSV/TSV files or folders of them, a saved or Hub dataset).",
    )
    mining.add_argument("--text-column", help="With --corpus: the column that holds its texts; text when not given.")
    mining.add_argument(
        "--mining-margin", type=at_least(0, float), metavar="MARGIN",
        help=f"With --mine-hard-negatives: skip a candidate scoring above the positive's score less MARGIN times it; {MARGIN} "
        f"(at most {1 - MARGIN:.0%}% of the positive's score) when not given.",
    )
    mining.add_argument(
        "--mining-window", type=at_least(0), nargs=2, metavar=("SKIP", "DEPTH"),
        help=f"With --mine-hard-negatives: skip the SKIP most similar candidates the margin leaves and take none ranked below DEPTH; "
        f"{WINDOW[0]} {WINDOW[1]} when not given.",
    )
    mining.add_argument(
        "--mining-model", metavar="MODEL",
        help="With --mine-hard-negatives: mine with this SentenceTransformer-loadable model (folder or Hub id) instead.",
    )


def run(args: argparse.Namespace) -> Path:
    """Fine-tune as `args` say; return the folder of the final model."""
    check_sparse_arguments(args)
    mining = mining_settings(args)
    check_report_to(args.report_to)
    check_output_folder(args, mining)
    dataset = load_examples(args.train_data)
    warn_if_few_pairs(dataset, args.batch_size, args.train_data)
    mined_set = reusable_mined_set(Path(args.output_dir), mining) if mining and not args.overwrite else None
    passages = passages_to_mine(dataset, mining) if mining and not mined_set else None
    model, loss, trainer_class = sparse_training(args) if args.sparse else dense_training(args)
    if mined_set:
        print(f"Reusing the hard negatives mined before with the same settings, {mined_set}: not mining again.")
    elif mining:
        mined_set = mine_into_output_dir(args, mining, dataset, passages, model)
    if mined_set:
        dataset = load_examples(mined_set)
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


def mining_settings(args: argparse.Namespace) -> MiningSettings | None:
    """How to mine hard negatives, checked, the defaults filled in; `None` without --mine-hard-negatives, whose options are then refused."""
    options = {
        "--corpus": args.corpus,
        "--text-column": args.text_column,
        "--mining-margin": args.mining_margin,
        "--mining-window": args.mining_window,
        "--mining-model": args.mining_model,
    }
    given = [flag for flag, value in options.items() if value is not None]
    if args.mine_hard_negatives is None:
        if given:
            raise UsageError(f"{given[0]} is an option of hard-negative mining: give it with --mine-hard-negatives K.")
        return None
    if args.text_column is not None and args.corpus is None:
        raise UsageError("--text-column names the text column of --corpus: give it with --corpus PATH.")
    skip, depth = args.mining_window or WINDOW
    if args.mine_hard_negatives > depth - skip:
        raise UsageError(
            f"--mine-hard-negatives {args.mine_hard_negatives} does not fit in --mining-window {skip} {depth}, which takes "
            f"{max(depth - skip, 0)} ranks: widen the window (DEPTH - SKIP at least K) or ask for fewer."
        )
    return MiningSettings(
        negatives=args.mine_hard_negatives,
        margin=MARGIN if args.mining_margin is None else args.mining_margin,
        window=(skip, depth),
        model=source_name(args.mining_model or args.model),
        corpus=None if args.corpus is None else source_name(args.corpus),
        text_column=args.text_column or "text",
        seed=args.seed,
        train_data=args.train_data,
    )


def check_output_folder(args: argparse.Namespace, mining: MiningSettings | None) -> None:
    """
    `check_output_dir`'s rules, except that when mining, an --output-dir holding nothing but a mined set (a run
    stopped after mining and before its first checkpoint, say by running out of memory) is taken up again.
    """
    if mining and not args.resume and holds_only_a_mined_set(Path(args.output_dir)):
        check_writable("--output-dir", Path(args.output_dir))
    else:
        check_output_dir(args)


def passages_to_mine(examples: datasets.Dataset, mining: MiningSettings) -> list[str]:
    """The passages to mine from (--corpus read first), checked to leave every example K candidates."""
    corpus = load_passages(mining.corpus, mining.text_column) if mining.corpus else []
    passages = candidate_passages(examples, corpus)
    check_enough_passages(examples, passages, mining.negatives, mining.corpus)
    return passages


def mine_into_output_dir(args: argparse.Namespace, mining: MiningSettings, examples: datasets.Dataset, passages: list[str], model) -> Path:
    """Mine with the mining model, say what was found, and write the mined set to --output-dir; its path."""
    print(f"Mining {mining.negatives} hard negatives for each of {len(examples):,} examples among {len(passages):,} passages with {mining.model}")
    mined = mine(examples, mining_model(args, model), mining, passages)
    print(mined.summary(mining.negatives))
    return write_mined_set(Path(args.output_dir), mined, mining)


def mining_model(args: argparse.Namespace, model) -> SentenceTransformer:
    """
    The model that mines: --mining-model, else the model being fine-tuned, or for a sparse one its encoder's
    first-token state (sentence-transformers' `mine_hard_negatives` takes dense models only).
    """
    if args.mining_model:
        with loading("--mining-model", args.mining_model):
            return load_sentence_transformer(args.mining_model)
    if args.sparse:
        with loading("--model", args.model), quiet_loading():
            return to_sentence_transformer(args.model, max_seq_length=model.max_seq_length)
    return model


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
