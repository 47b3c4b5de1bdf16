"""The `retromae` command: argument parsing and dispatch to the subcommands' modules."""

import argparse
import json
import sys
from pathlib import Path

from . import finetune, pretrain
from .data import CorpusError
from .evaluate import EvaluationError, evaluate, load_beir, load_model


USER_ERRORS = (pretrain.UsageError, CorpusError, EvaluationError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retromae",
        description="RetroMAE: retrieval-oriented pre-training of BERT-like encoders (Xiao et al., EMNLP 2022).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pretraining = commands.add_parser(
        "pretrain",
        help="pre-train or domain-adapt an encoder with RetroMAE",
        description="Pre-train a BERT encoder with RetroMAE on the transformers Trainer, then release the encoder "
        "(without the decoder) as a Hub-ready folder in OUTPUT_DIR/model. With no --train-data and no --model it "
        "runs the embedded demo: all-MiniLM-L6-v2 on an English Wikipedia excerpt, a few minutes on 2 CPU cores. "
        "For several GPUs or nodes, launch the same command with torchrun or accelerate launch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pretrain.add_arguments(pretraining)
    pretraining.set_defaults(handler=run_pretrain)

    finetuning = commands.add_parser(
        "finetune",
        help="contrastive fine-tuning for retrieval (in-batch and hard negatives)",
        description="Fine-tune an encoder for retrieval with MultipleNegativesRankingLoss (or its cached variant) on "
        "the sentence-transformers Trainer, as in the paper's fine-tuning. The result, OUTPUT_DIR/model, loads with "
        "SentenceTransformer and AutoModel (trust_remote_code=True) and keeps the remote code files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    finetune.add_arguments(finetuning)
    finetuning.set_defaults(handler=run_finetune)

    evaluation = commands.add_parser(
        "evaluate",
        help="dense retrieval on a BEIR-format folder: nDCG@10, MRR@10, Recall@100",
        description="Embed a BEIR-format folder's corpus and queries with a model and report nDCG@10, MRR@10 and "
        "Recall@100 (sentence-transformers' InformationRetrievalEvaluator), printed and written as JSON. Any "
        "SentenceTransformer-loadable model works, so a RetroMAE model and a baseline compare with the same command; "
        "a bare BERT or RetroMAE folder is embedded by its [CLS] state.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluation.add_argument("model", help="Model folder or Hub id.")
    evaluation.add_argument("data", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    evaluation.add_argument("--split", default="test", help="Which qrels/<split>.tsv to score.")
    evaluation.add_argument("--batch-size", type=int, default=32, help="Texts per encoding batch.")
    evaluation.add_argument("--output", default="retrieval_metrics.json", help="Where the figures are written as JSON.")
    evaluation.set_defaults(handler=run_evaluate)
    return parser


def run_pretrain(args: argparse.Namespace) -> None:
    release = pretrain.run(args)
    if release is not None:
        print(f"RetroMAE encoder saved to {release}")
        print(f"Load it with AutoModel.from_pretrained({str(release)!r}, trust_remote_code=True)")


def run_finetune(args: argparse.Namespace) -> None:
    print(f"Fine-tuned model saved to {finetune.run(args)}")


def run_evaluate(args: argparse.Namespace) -> None:
    task = load_beir(args.data, args.split)
    figures = evaluate(load_model(args.model), task, args.batch_size)
    report = {"model": args.model, "data": args.data, "split": args.split, "queries": len(task.queries), "documents": len(task.corpus), **figures}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except USER_ERRORS as error:
        print(f"retromae {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
