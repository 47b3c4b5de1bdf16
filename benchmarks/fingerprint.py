"""Fixed-seed pre-training runs of every family and both objectives, written down to compare a redesign against.

`python benchmarks/fingerprint.py OUT.json` runs `retromae pretrain` for three steps on each family's tiny checkpoint
(tests/families.py), with each objective, once straight and once stopped at step 2 and resumed, and records every
logged loss, a digest of every released tensor (dense and sparse) and the release's config; and `RetroMAELoss`'s
losses and gradients on a fixed batch. `--compare BEFORE.json` then says what differs: a change that moves code
must leave all of it bit-identical.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tiny checkpoints of every family

from safetensors.torch import load_file  # noqa: E402

from families import CORPUS, FAMILIES, build_checkpoint  # noqa: E402

OBJECTIVES = ("retromae", "dupmae")
RUN = ["--max-length", "32", "--batch-size", "4", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "3", "--seed", "5"]


def tensor_digests(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256(tensor.contiguous().view(-1).view(dtype=tensor.dtype).numpy().tobytes()).hexdigest()[:16]
            for name, tensor in sorted(load_file(path).items())}


def pretrain(argv: list[str]) -> None:
    from retromae.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0, argv


def run_record(output: Path, objective: str) -> dict:
    """The logged losses of a finished run, digests of its released tensors, and its release's config (less the local path)."""
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    losses = [{k: v for k, v in entry.items() if k.endswith("loss")} for entry in state["log_history"] if "encoder_loss" in entry]
    config = json.loads((output / "model" / "config.json").read_text())
    config.pop("_name_or_path", None)
    record = {"losses": losses, "weights": tensor_digests(output / "model" / "model.safetensors"), "config": config}
    if objective == "dupmae":
        record["sparse_weights"] = tensor_digests(output / "sparse" / "model.safetensors")
    return record


def loss_record(checkpoint: Path, objective: str) -> dict:
    """`RetroMAELoss` on a fixed batch: its losses and a digest of every gradient."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    from retromae import RetroMAELoss

    torch.manual_seed(0)
    transformer = Transformer(str(checkpoint), max_seq_length=32)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")])
    loss = RetroMAELoss(model, seed=3, objective=objective)
    losses = loss([model.preprocess(CORPUS[:4])])
    sum(losses.values()).backward()
    gradients = {name: hashlib.sha256(p.grad.numpy().tobytes()).hexdigest()[:16] for name, p in loss.named_parameters() if p.grad is not None}
    return {"losses": {name: value.item() for name, value in losses.items()}, "gradients": gradients}


def fingerprint(family: str, objective: str, root: Path) -> dict:
    checkpoint = build_checkpoint(family, root / family)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    straight, resumed = root / f"{family}-{objective}", root / f"{family}-{objective}-resumed"
    command = ["pretrain", "--model", str(checkpoint), "--train-data", str(corpus), "--objective", objective, *RUN]
    pretrain([*command, "--output-dir", str(straight)])
    pretrain([*command, "--output-dir", str(resumed), "--max-steps", "2", "--save-steps", "2"])
    pretrain([*command, "--output-dir", str(resumed), "--resume"])
    return {"run": run_record(straight, objective), "resumed": run_record(resumed, objective), "loss": loss_record(checkpoint, objective)}


def compare(before: dict, after: dict) -> list[str]:
    differences = []
    for run in sorted(before.keys() | after.keys()):
        for part in sorted(before.get(run, {}).keys() | after.get(run, {}).keys()):
            if before.get(run, {}).get(part) != after.get(run, {}).get(part):
                differences.append(f"{run}: {part} differs")
    return differences


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="Where the fingerprint JSON goes.")
    parser.add_argument("--compare", metavar="BEFORE", help="A fingerprint to compare with.")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = {f"{family}/{objective}": fingerprint(family, objective, Path(folder)) for family in args.families for objective in OBJECTIVES}
    Path(args.output).write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    if args.compare:
        differences = compare(json.loads(Path(args.compare).read_text()), runs)
        print("\n".join(differences) or f"identical: {len(runs)} runs, losses, weights and configs")
        sys.exit(1 if differences else 0)
    print(f"{len(runs)} runs written to {args.output}")
