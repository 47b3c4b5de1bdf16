"""The `retromae` command: argument parsing and dispatch to the subcommands' modules."""

import argparse
import sys

from . import pretrain
from .data import CorpusError


USER_ERRORS = (pretrain.UsageError, CorpusError)


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
    return parser


def run_pretrain(args: argparse.Namespace) -> None:
    release = pretrain.run(args)
    if release is not None:
        print(f"RetroMAE encoder saved to {release}")
        print(f"Load it with AutoModel.from_pretrained({str(release)!r}, trust_remote_code=True)")


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
