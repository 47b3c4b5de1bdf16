"""The `retromae` command: argument parsing and dispatch to the subcommands' modules."""

import argparse
import json
import os
import sys
from pathlib import Path

from . import finetune, plan
from .pretraining import pretrain
from .settings import PretrainingSettings, add_arguments as add_pretraining_arguments
from .diagnostics import CURVES_FILE, PICTURE_FORMATS, check_picture_name, draw_training_curves, read_metrics
from .errors import Destination, Interrupted, UsageError, at_least, read_json_object
from .evaluate import BATCH_SIZE, HYBRID_DENSE_WEIGHT, METRICS, evaluate, evaluate_hybrid, load_beir, load_model, load_sparse_model
from .hub import ReleaseError, convert, convert_sparse, export_plain, release
from .hub.card import TEMPLATE
from .modeling_retromae import ENCODER_FAMILIES


def add_command(commands, handler, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand run by `handler(args)`, with its defaults shown in --help, and --debug."""
    command = commands.add_parser(name, help=help, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    command.add_argument("--debug", action="store_true", help="On an error, show the full traceback instead of one line.")
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    families = ", ".join(ENCODER_FAMILIES)  # by model type, as the refusals name them
    parser = argparse.ArgumentParser(
        prog="retromae",
        description=f"RetroMAE: retrieval-oriented pre-training of masked-LM encoders ({families}) (Xiao et al., EMNLP 2022).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pretraining = add_command(
        commands,
        run_pretrain,
        "pretrain",
        help="pre-train or domain-adapt an encoder with RetroMAE",
        description=f"Pre-train a masked-LM encoder ({families}) with RetroMAE on the transformers Trainer, then release the encoder "
        "(without the decoder) as a Hub-ready folder in OUTPUT_DIR/model. With no --train-data and no --model it "
        "runs the embedded demo: all-MiniLM-L6-v2 on an English Wikipedia excerpt, a few minutes on 2 CPU cores. "
        "For several GPUs or nodes, launch the same command with torchrun or accelerate launch.",
    )
    pretraining.argument_default = argparse.SUPPRESS  # the settings' defaults are PretrainingSettings'; a settings file's values yield to the flags given
    add_pretraining_arguments(pretraining)

    finetuning = add_command(
        commands,
        run_finetune,
        "finetune",
        help="contrastive fine-tuning for retrieval (in-batch and hard negatives)",
        description="Fine-tune an encoder for retrieval with MultipleNegativesRankingLoss (or its cached variant) on "
        "the sentence-transformers Trainer, as in the paper's fine-tuning. The result, OUTPUT_DIR/model, is a checkpoint "
        "of the encoder's family that SentenceTransformer and AutoModel load as they are, with RetroMAE's code as an opt-in "
        "(trust_remote_code=True).",
    )
    finetune.add_arguments(finetuning)

    evaluation = add_command(
        commands,
        run_evaluate,
        "evaluate",
        help="dense retrieval on a BEIR-format folder: nDCG@10, MRR@10, Recall@100",
        description="Embed a BEIR-format folder's corpus and queries with a model, rank the documents by the model's "
        "similarity and report nDCG@10, MRR@10 and Recall@100 (trec_eval's, through pytrec_eval), printed and written as JSON. Any "
        "SentenceTransformer-loadable model works, so a RetroMAE model and a baseline compare with the same command; "
        "a bare encoder or RetroMAE folder is embedded by its first-token state.",
    )
    evaluation.add_argument("model", nargs="+", metavar="MODEL", help="Model folder or Hub id; with --hybrid, the dense model then the sparse one.")
    evaluation.add_argument("data", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    retrievers = evaluation.add_mutually_exclusive_group()
    retrievers.add_argument(
        "--sparse", action="store_true",
        help="MODEL is a sparse (SPLADE) model (`retromae convert --sparse`, `retromae finetune --sparse`): rank by the dot product of its sparse embeddings.",
    )
    retrievers.add_argument(
        "--hybrid", action="store_true",
        help="Give two models, DENSE SPARSE, and fuse their rankings: per query, each one's top-100 scores min-max "
        "normalised to [0, 1] (0 where it did not retrieve the document), fused score = w * dense + (1 - w) * sparse.",
    )
    evaluation.add_argument("--dense-weight", type=float, metavar="W", help="With --hybrid: the dense ranking's weight w in [0, 1]; 0.5 when not given.")
    evaluation.add_argument("--split", default="test", help="Which qrels/<split>.tsv to score.")
    evaluation.add_argument("--batch-size", type=at_least(1), default=BATCH_SIZE, help="Texts per encoding batch.")
    evaluation.add_argument("--output", default="retrieval_metrics.json", help="Where the figures are written as JSON (checked before scoring).")
    evaluation.add_argument("--overwrite", action="store_true", help="Replace an --output file that exists.")

    releasing = add_command(
        commands,
        run_release,
        "release",
        help="publish a trained model as a complete Hub repository (one commit)",
        description="Assemble a Hub repository from a RetroMAE model folder (weights, config with auto_map, both code "
        "files, tokenizer, sentence-transformers files and a model card with the run's settings and any evaluation), "
        "load it back with AutoModel and SentenceTransformer and compare it with the source, then upload it in one "
        "commit and print the commit URL. Needs a token (`hf auth login` or HF_TOKEN) unless --dry-run is given.",
    )
    releasing.add_argument("model_dir", metavar="MODEL_DIR", help="The model folder (e.g. OUTPUT_DIR/model of a pretrain or finetune run).")
    releasing.add_argument("--repo-id", required=True, help="Hub repository, 'org/name'; created when it does not exist.")
    releasing.add_argument("--private", action="store_true", help="Create the repository private.")
    releasing.add_argument(
        "--no-decoder",
        action="store_true",
        help="Leave the trained decoder out (the MLM head stays); the card says so. By default the release keeps it, "
        "so that `retromae pretrain --model REPO_ID` continues pre-training with it.",
    )
    releasing.add_argument("--dry-run", metavar="DIR", help="Write and check the repository in DIR (new or empty); upload nothing.")
    releasing.add_argument("--overwrite", action="store_true", help="Replace a --dry-run DIR that holds files.")
    releasing.add_argument(
        "--evaluation", action="append", default=[], metavar="JSON", help="A `retromae evaluate` report for the card (repeatable)."
    )
    releasing.add_argument("--license", default="apache-2.0", help="License id for the card's metadata.")
    releasing.add_argument("--language", default="en", help="Language code for the card's metadata.")
    releasing.add_argument("--card-template", default=str(TEMPLATE), help="Jinja template of the model card.")
    releasing.add_argument("--commit-message", help="Commit message. Default: 'Release REPO_ID (retromae)'.")

    converting = add_command(
        commands,
        run_convert,
        "convert",
        help="turn a checkpoint (e.g. the authors' RetroMAE) into a release folder, or back (--plain)",
        description="Convert a checkpoint of a supported family, ...ForMaskedLM or base-model layout (a folder or Hub "
        "id, such as the authors' Shitao/RetroMAE, Shitao/RetroMAE_MSMARCO or BAAI/bge-m3-retromae), or a RetroMAE "
        "pre-training checkpoint, into a RetroMAE folder that `retromae release` publishes: same weights, the "
        "family's config pointing the encoder classes at RetroMAE's code, sentence-transformers files. With --plain, "
        "write the family's own ...ForMaskedLM folder with no remote code at all. Either way the written folder, "
        "loaded with the family's own AutoModel, is checked to give the encoder's hidden states.",
    )
    converting.add_argument("source", metavar="SRC", help="Checkpoint folder or Hub id.")
    converting.add_argument("destination", metavar="DST", help="Folder to write (new or empty; written atomically).")
    converting.add_argument("--overwrite", action="store_true", help="Replace a DST that holds files.")
    converting.add_argument(
        "--plain", "--to-bert", dest="plain", action="store_true",
        help="Export a RetroMAE model as its family's own checkpoint (BertForMaskedLM for a BERT) with no remote code.",
    )
    converting.add_argument(
        "--sparse", action="store_true",
        help="Write the sparse (SPLADE) model of a checkpoint with an MLM head (a RetroMAE or DupMAE release): the family's "
        "...ForMaskedLM with max pooling of log(1 + ReLU(MLM scores)), loaded by SparseEncoder(DST) with no flag.",
    )

    planning = add_command(
        commands,
        run_plan,
        "plan",
        help="peak memory per GPU of a pre-training job under DDP, ZeRO-1/2/3 and FSDP, and the largest batch that fits",
        description="Count, by formula, the peak memory per GPU of RetroMAE pre-training (weights, gradients, optimiser "
        "state, activations of the encoder, the decoder's blocks and the chunked MLM head) under DDP, DeepSpeed ZeRO-1/2/3 "
        "and FSDP2, with and without gradient checkpointing, and the largest batch per GPU that fits. Nothing is downloaded.",
    )
    plan.add_arguments(planning)

    plotting = add_command(
        commands,
        run_plot,
        "plot",
        help="draw a pre-training run's held-out evaluations (from OUTPUT_DIR/metrics.jsonl)",
        description="Draw the training curves of a `retromae pretrain` run from its metrics.jsonl: held-out losses, "
        "accuracies, embedding information and span retrieval against steps, the first evaluation as a baseline. "
        "For a run cut short, or one still going; a finished run has the picture in OUTPUT_DIR/model.",
    )
    plotting.add_argument("run_dir", metavar="RUN_DIR", help="The run's --output-dir (it holds metrics.jsonl).")
    plotting.add_argument(
        "--output",
        help=f"Where the picture is written, in the format its extension names ({', '.join(PICTURE_FORMATS)}). Default: RUN_DIR/{CURVES_FILE}.",
    )
    plotting.add_argument("--overwrite", action="store_true", help="Replace an --output file that exists (the default one too).")
    return parser


def run_pretrain(args: argparse.Namespace) -> None:
    result = pretrain(PretrainingSettings.from_arguments(args), command=args.argv)
    if result.model is None or result.already_finished:
        return
    skipped = f" ({result.skipped_records:,} bad records skipped)" if result.skipped_records else ""
    passages = f" in {result.passages:,} passages" if result.passages is not None else ""
    print(f"Read {result.records:,} records{passages}{skipped}; trained on {result.passages_trained:,} passages ({result.settings.passages} long records).")
    if result.empty_passages or result.unknown_passages:
        print(
            f"Of the passages read, {result.empty_passages:,} had no text after tokenization (left out) and "
            f"{result.unknown_passages:,} nothing but [UNK] (trained: text the vocabulary cannot spell)."
        )
    print(f"RetroMAE encoder saved to {result.model}")
    print(f"Load it with SentenceTransformer({str(result.model)!r}) or AutoModel.from_pretrained({str(result.model)!r})")
    print("(a checkpoint of the encoder's family; trust_remote_code=True gives RetroMAE's class and its sentence_embedding)")
    if result.sparse:
        print(f"Sparse (SPLADE) model saved to {result.sparse}: load it with SparseEncoder({str(result.sparse)!r}), no flag (docs/sparse.md)")
        if result.fresh_head:
            print(f"Its MLM head began at random (the starting point has none) and trained for this run's {result.steps} steps alone: after a short run the sparse weights are noise.")


def run_finetune(args: argparse.Namespace) -> None:
    print(f"Fine-tuned model saved to {finetune.run(args)}")


def run_evaluate(args: argparse.Namespace) -> None:
    check_evaluation_arguments(args)
    output = Destination("--output", args.output, args.overwrite, folder=False).check()
    task = load_beir(args.data, args.split)
    if args.hybrid:
        dense, sparse = args.model
        weight = HYBRID_DENSE_WEIGHT if args.dense_weight is None else args.dense_weight
        figures = evaluate_hybrid(load_model(dense, "DENSE"), load_sparse_model(sparse, "SPARSE"), task, weight, args.batch_size)
        described = {"model": dense, "sparse_model": sparse, "retriever": "hybrid", "fusion": "min-max", "dense_weight": weight}
    else:
        model = (load_sparse_model if args.sparse else load_model)(args.model[0])
        figures = evaluate(model, task, args.batch_size)
        described = {"model": args.model[0], "retriever": "sparse" if args.sparse else "dense"}
    report = {**described, "data": args.data, "split": args.split, "queries": len(task.queries), "documents": len(task.corpus), **figures}
    text = json.dumps(report, indent=2)
    write_file_atomically(output, text + "\n")
    print(text)


def write_file_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place, creating the folders above."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    """One MODEL, or DENSE SPARSE with --hybrid; --dense-weight only with --hybrid, within [0, 1]."""
    if args.hybrid and len(args.model) != 2:
        raise UsageError(f"--hybrid takes two models, DENSE then SPARSE, before DATA; got {len(args.model)}.")
    if not args.hybrid and len(args.model) != 1:
        raise UsageError(f"evaluate takes one MODEL before DATA (two only with --hybrid DENSE SPARSE); got {len(args.model)}.")
    if args.dense_weight is not None and not args.hybrid:
        raise UsageError("--dense-weight weighs the dense ranking of a fusion: give it with --hybrid DENSE SPARSE.")
    if args.dense_weight is not None and not 0 <= args.dense_weight <= 1:
        raise UsageError(f"--dense-weight must be between 0 and 1, got {args.dense_weight}.")


def run_release(args: argparse.Namespace) -> None:
    if args.dry_run:
        Destination("--dry-run", args.dry_run, args.overwrite).check(source=args.model_dir)
    evaluations = [read_report(path) for path in args.evaluation]
    result = release(
        args.model_dir,
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        evaluations=evaluations,
        license=args.license,
        language=args.language,
        template=args.card_template,
        commit_message=args.commit_message,
        decoder=not args.no_decoder,
    )
    if args.dry_run:
        print(f"Repository assembled and checked in {result} (nothing uploaded):")
        for path in sorted(Path(result).rglob("*")):
            if path.is_file():
                print(f"  {path.relative_to(result)}  {path.stat().st_size:,} bytes")
    else:
        print(f"Released {args.repo_id}: {result}")


def read_report(path: str) -> dict:
    report = read_json_object("--evaluation", path)
    if not {"data", *METRICS} <= set(report):
        raise ReleaseError(f"--evaluation {path}: not a `retromae evaluate` report (needs data, ndcg@10, mrr@10, recall@100).")
    return report


def run_convert(args: argparse.Namespace) -> None:
    if args.plain and args.sparse:
        raise UsageError("--plain and --sparse write different folders: give one of them.")
    Destination("DST", args.destination, args.overwrite).check(source=args.source)
    if args.sparse:
        convert_sparse(args.source, args.destination)
        print(f"Sparse (SPLADE) model written to {args.destination}: SparseEncoder({str(args.destination)!r}) loads it, no flag.")
        print(f"Publish it with: retromae release {args.destination} --repo-id ORG/NAME-sparse")
        return
    if args.plain:
        export_plain(args.source, args.destination)
        print(f"Plain checkpoint written to {args.destination}: loads with its family's own classes, no remote code.")
        return
    if not convert(args.source, args.destination):
        print(f"Note: {args.source} has no MLM head; the encoder is converted as is and the head is freshly initialised.")
    print(f"RetroMAE folder written to {args.destination}; publish it with: retromae release {args.destination} --repo-id ORG/NAME")


def run_plan(args: argparse.Namespace) -> None:
    print(plan.run(args))


def run_plot(args: argparse.Namespace) -> None:
    output = Destination("--output", args.output or Path(args.run_dir) / CURVES_FILE, args.overwrite, folder=False).check()
    check_picture_name("--output", output)
    records = read_metrics(args.run_dir)
    draw_training_curves(records, output)
    print(f"Drew {len(records)} evaluations (steps {records[0]['step']} to {records[-1]['step']}) in {output}")


def main(argv: list[str] | None = None) -> int:
    """Run a command: 0 when it worked, 2 on bad input (one `error:` line), 130 when interrupted, 1 on a bug."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.handler(args)
    except Interrupted as stop:
        print(f"retromae {args.command}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"retromae {args.command}: interrupted.", file=sys.stderr)
        return 130
    except UsageError as error:
        if args.debug:
            raise
        print(f"retromae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug:
            raise
        message = (str(error).strip().splitlines() or [""])[0]
        print(f"retromae {args.command}: error: unexpected {type(error).__name__}: {message} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
