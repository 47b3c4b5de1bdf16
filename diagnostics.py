"""Is pre-training working? Held-out diagnostics for `retromae pretrain`, and stopping a broken run.

The training losses cannot say whether the sentence embedding `h_X` learns anything: the decoder
can lower its loss from the tokens it sees and ignore `h_X` (at small scale this is the common
case). On a fixed set of held-out passages, whose masks are drawn once by the run's own
`RetroMAECollator`, the run's own model measures, at step 0 (the starting checkpoint) and every
`--eval-steps` steps:

- the encoder's MLM loss and its accuracy on the masked tokens;
- the decoder's loss and accuracy (every token, rebuilt from `h_X` and the visible context);
- embedding information: the decoder's loss when every passage is given another passage's `h_X`
  (a fixed derangement of the set) minus its loss with its own `h_X`, in nats per token. It is
  what the embedding tells the decoder, 0 when the decoder ignores it, and what RetroMAE exists
  to raise;
- span retrieval: every passage cut into two halves, the first half's first-token embedding
  finds its second half among all second halves by cosine (MRR@10, recall@10);
- the BoW loss, where the model's output has one (`bow_loss`).

Each evaluation is a line on the console, an `eval_`-prefixed log for the Trainer's integrations
(TensorBoard, W&B) and a record of OUTPUT_DIR/metrics.jsonl; the records become the picture
OUTPUT_DIR/model/training_curves.png and the first and last become a table of the model card.

A loss that is not finite stops the run before its optimiser step (`BrokenRunError`): the
checkpoints on disk are all from finite steps, and no release is written from NaN weights.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .collator import RetroMAECollator
from .corpus import CorpusSource, load_corpus, resolve_corpus
from .data import CorpusError, demo_corpus
from .errors import UsageError, at_least
from .modeling_retromae import IGNORE_INDEX, LOGITS_CHUNK, EnhancedDecodingMask, RetroMAEForPreTraining, RetroMAEForPreTrainingOutput
from .passages import FirstPassage, PassageSplitter


METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
EVAL_SIZE = 512
MIN_PASSAGES = 16
MAX_EVAL_SPLIT = 0.5
RANK_CUTOFF = 10
READ_BATCH = 64  # held-out records cut into passages this many at a time
# What an evaluation reports, in the order of the console line and the model card's table.
LABELS = {
    "encoder_loss": "encoder MLM loss",
    "encoder_accuracy": "encoder accuracy (masked tokens)",
    "decoder_loss": "decoder loss",
    "decoder_accuracy": "decoder accuracy",
    "embedding_information": "embedding information (nats/token)",
    "span_mrr_at_10": "span retrieval MRR@10",
    "span_recall_at_10": "span retrieval recall@10",
    "bow_loss": "BoW loss",
}


class DiagnosticsError(UsageError):
    """A bad evaluation input (flags, held-out corpus, metrics file); the message names it and what is allowed."""


class BrokenRunError(UsageError):
    """A loss or weight that is not finite stopped the run; the message names the step and how to go on."""


# The command line.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation options of `retromae pretrain`."""
    group = parser.add_argument_group("evaluation on held-out passages")
    group.add_argument(
        "--eval-data",
        help="Held-out corpus to evaluate on, in any form --train-data takes (its first --eval-size passages are used).",
    )
    group.add_argument(
        "--eval-split",
        type=float,
        help="Hold this share (0 to 0.5) of the training records out of training and evaluate on their passages. "
        "Default: none (0.02 on the demo corpus).",
    )
    group.add_argument(
        "--eval-steps", type=at_least(1), help="Evaluate every N steps (and at step 0 and the last step). Default: --save-steps."
    )
    group.add_argument(
        "--eval-size",
        type=at_least(MIN_PASSAGES),
        help=f"Held-out passages evaluated at most. Default: {EVAL_SIZE} (the demo: fewer, to keep it cheap).",
    )


def resolve_defaults(args: argparse.Namespace, demo: dict) -> None:
    """Fill the evaluation settings left unset; `demo` holds the demo corpus's (`eval_split`, `eval_size`), empty otherwise."""
    if args.eval_data is None and args.eval_split is None:
        args.eval_split = demo.get("eval_split")
    if args.eval_size is None:
        args.eval_size = demo.get("eval_size", EVAL_SIZE)
    if args.eval_steps is None and (args.eval_data is not None or args.eval_split is not None):
        args.eval_steps = args.save_steps


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad evaluation flags before anything is read."""
    if args.eval_data is not None and args.eval_split is not None:
        raise DiagnosticsError("Give --eval-data or --eval-split, not both: the held-out passages come from one of them.")
    if args.eval_split is not None and not 0.0 < args.eval_split < MAX_EVAL_SPLIT:
        raise DiagnosticsError(f"--eval-split must lie strictly between 0 and {MAX_EVAL_SPLIT}, got {args.eval_split}.")
    if args.eval_steps is not None and args.eval_data is None and args.eval_split is None:
        raise DiagnosticsError("--eval-steps needs held-out passages to evaluate: give --eval-split or --eval-data too.")


def evaluation_schedule(args: argparse.Namespace) -> dict:
    """The Trainer's settings for evaluation: at step 0, every `--eval-steps`, and at the last step (with held-out passages)."""
    if args.eval_data is None and args.eval_split is None:
        return {"eval_strategy": "no"}
    return {"eval_strategy": "steps", "eval_steps": args.eval_steps, "eval_on_start": True}


# The held-out passages.


def is_held_out(text: str, share: float, seed: int) -> bool:
    """Whether `--eval-split` holds this record out: a seeded hash of its text, so a record is on one side in any order, stream or process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < share * 2**64


def without_held_out(dataset, args: argparse.Namespace):
    """The training corpus without the records `--eval-split` holds out (the corpus as it is without the flag)."""
    if args.eval_split is None:
        return dataset
    share, seed = args.eval_split, args.seed
    return dataset.filter(lambda batch: [not is_held_out(text, share, seed) for text in batch["text"]], batched=True)


def held_out_set(args: argparse.Namespace, source: CorpusSource | None, tokenizer: PreTrainedTokenizerBase, collator: RetroMAECollator):
    """
    The `HeldOutSet` of `--eval-data` or `--eval-split`, or `None` without either.

    The records are read as a stream, only as far as `--eval-size` passages need, and cut into
    passages as training cuts them (`--passages`); `--eval-split` takes the training corpus's
    held-out records (`is_held_out`), which training leaves out (`without_held_out`).
    """
    if args.eval_data is not None:
        where = f"--eval-data {args.eval_data}"
        try:
            records = load_corpus(resolve_corpus(args.eval_data, args.dataset_config, args.dataset_split), args.text_column, True, args.skip_bad_records)
            texts = (record["text"] for record in records)
            passages = first_passages(texts, passage_cutter(args, tokenizer), args.eval_size, collator)
        except CorpusError as error:
            raise DiagnosticsError(f"{where}: {error}") from None
    elif args.eval_split is not None:
        where = f"--eval-split {args.eval_split}"
        records = load_corpus(source, args.text_column, True, args.skip_bad_records) if source else demo_corpus()
        texts = (record["text"] for record in records if is_held_out(record["text"], args.eval_split, args.seed))
        passages = first_passages(texts, passage_cutter(args, tokenizer), args.eval_size, collator)
    else:
        return None
    if len(passages) < MIN_PASSAGES:
        raise DiagnosticsError(
            f"{where} gives {len(passages)} held-out passages; evaluation needs at least {MIN_PASSAGES}"
            + (": hold out a larger share." if args.eval_data is None else ".")
        )
    return HeldOutSet.from_passages(passages, collator, args.batch_size, args.seed)


def passage_cutter(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase):
    """Records to passages (token ids without special tokens) as `--passages` cuts the training records."""
    return (PassageSplitter if args.passages == "split" else FirstPassage)(tokenizer, args.max_length)


def first_passages(texts: Iterable[str], cut, size: int, collator: RetroMAECollator) -> list[list[int]]:
    """The first `size` passages of `texts` whose two halves each hold a token that is not special."""
    passages = []
    for chunk in chunked(texts, READ_BATCH):
        passages += [ids for ids in cut({"text": chunk})["input_ids"] if halves_have_content(ids, collator)]
        if len(passages) >= size:
            break
    return passages[:size]


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def halves(ids: list[int]) -> tuple[list[int], list[int]]:
    """A passage's token ids cut in two: the first half (the shorter, for an odd length) and the second."""
    return ids[: len(ids) // 2], ids[len(ids) // 2 :]


def halves_have_content(ids: list[int], collator: RetroMAECollator) -> bool:
    return all(not collator.is_special[torch.tensor(half, dtype=torch.long)].all() for half in halves(ids))


@dataclass
class HeldOutSet:
    """
    The held-out passages, made into batches once: every evaluation reads the same masks.

    Args:
        batches: the passages as `RetroMAECollator` batches (masks drawn by the run's collator, from its seed).
        derangement: (passages,) whose `h_X` each passage's decoder is given in the embedding-information
            probe: a single cycle over the set, so never a passage's own.
        first_halves, second_halves: `(input_ids, attention_mask)` batches of the passages' halves, with special tokens.
    """

    batches: list[dict[str, torch.Tensor]]
    derangement: torch.LongTensor
    first_halves: list[tuple[torch.LongTensor, torch.Tensor]]
    second_halves: list[tuple[torch.LongTensor, torch.Tensor]]

    @classmethod
    def from_passages(cls, passages: list[list[int]], collator: RetroMAECollator, batch_size: int, seed: int) -> "HeldOutSet":
        """Batch `passages` (sorted by length, so that little is padding) and draw their masks and the derangement."""
        passages = sorted(passages, key=len)
        groups = [passages[start : start + batch_size] for start in range(0, len(passages), batch_size)]
        order = torch.randperm(len(passages), generator=torch.Generator().manual_seed(seed))
        derangement = torch.empty_like(order)
        derangement[order] = order.roll(-1)  # each passage takes the next one's h_X in a random cycle
        return cls(
            batches=[collator(group) for group in groups],
            derangement=derangement,
            first_halves=[padded(collator, [halves(ids)[0] for ids in group]) for group in groups],
            second_halves=[padded(collator, [halves(ids)[1] for ids in group]) for group in groups],
        )

    def __len__(self) -> int:
        return len(self.derangement)


def padded(collator: RetroMAECollator, sequences: list[list[int]]) -> tuple[torch.LongTensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id sequences, with the first token and separator added as the collator adds them."""
    input_ids, attention_mask = collator.pad(collator.tokenize(sequences))
    return input_ids, attention_mask.long()


# The measurements.


@torch.no_grad()
def evaluate_held_out(model: RetroMAEForPreTraining, held_out: HeldOutSet) -> dict[str, float]:
    """Every figure of the module docstring for `model` on `held_out`, with dropout off; the model's mode is restored."""
    training = model.training
    model.eval()
    try:
        figures = reconstruction(model, held_out)
        figures["span_mrr_at_10"], figures["span_recall_at_10"] = span_retrieval(
            first_token_embeddings(model, held_out.first_halves), first_token_embeddings(model, held_out.second_halves)
        )
    finally:
        model.train(training)
    return figures


def reconstruction(model: RetroMAEForPreTraining, held_out: HeldOutSet) -> dict[str, float]:
    """
    The encoder's and decoder's losses and accuracies, token-weighted over the set, and the
    embedding information: the decoder's loss with the deranged `h_X` minus with its own.

    The steps are the model's own (`encoder.base_model`, `decode`, `mlm_head`), with the masks of
    the held-out batches; the BoW loss, where the model has one, comes from its forward.
    """
    device = model.device
    batches = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in held_out.batches]
    encoder, embeddings, bow = torch.zeros(3, device=device), [], []
    for batch in batches:
        states = model.encoder.base_model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
        embeddings.append(states[:, 0])  # (batch, hidden) h_X
        encoder += head_statistics(model, states, batch["encoder_labels"])
        if has_bow_loss() and (output := model(**batch)).bow_loss is not None:
            bow.append((output.bow_loss.float() * len(states), len(states)))
    sentence_embeddings = torch.cat(embeddings)
    others = sentence_embeddings[held_out.derangement.to(device)]
    own, other, start = torch.zeros(3, device=device), torch.zeros(3, device=device), 0
    for batch in batches:
        rows = slice(start, start + len(batch["decoder_input_ids"]))
        start = rows.stop
        mask = EnhancedDecodingMask.from_batch(batch)
        for totals, embedding in ((own, sentence_embeddings[rows]), (other, others[rows])):
            totals += head_statistics(model, model.decode(embedding, batch["decoder_input_ids"], mask), batch["decoder_labels"])
    figures = {
        "encoder_loss": encoder[0] / encoder[2],
        "encoder_accuracy": encoder[1] / encoder[2],
        "decoder_loss": own[0] / own[2],
        "decoder_accuracy": own[1] / own[2],
        "embedding_information": (other[0] - own[0]) / own[2],
    }
    if bow:
        figures["bow_loss"] = sum(total for total, _ in bow) / sum(count for _, count in bow)
    return {name: float(value) for name, value in figures.items()}


def has_bow_loss() -> bool:
    """Whether the model's output can carry a BoW loss (DupMAE); its forward then says whether this model has one."""
    return "bow_loss" in RetroMAEForPreTrainingOutput.__dataclass_fields__


def head_statistics(model: RetroMAEForPreTraining, states: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """
    (summed cross entropy, correct predictions, labelled tokens) of the shared MLM head at the
    labelled positions: the loss is the model's `masked_lm_loss` times the count. The logits are
    made `LOGITS_CHUNK` elements at a time, as the model makes them.
    """
    labelled = labels != IGNORE_INDEX
    rows, targets = states[labelled], labels[labelled]
    totals = torch.zeros(3, device=states.device)
    chunk = max(1, LOGITS_CHUNK // model.config.encoder.vocab_size)
    for start in range(0, len(targets), chunk):
        logits = model.mlm_head(rows[start : start + chunk]).float()  # (chunk, vocab)
        expected = targets[start : start + chunk]
        totals[0] += F.cross_entropy(logits, expected, reduction="sum")
        totals[1] += (logits.argmax(-1) == expected).sum()
    totals[2] = len(targets)
    return totals


def first_token_embeddings(model: RetroMAEForPreTraining, batches: list[tuple[torch.LongTensor, torch.Tensor]]) -> torch.Tensor:
    """(texts, hidden) the encoder's final first-token state of unmasked inputs: the sentence embedding a release gives."""
    states = [
        model.encoder.base_model(input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).last_hidden_state[:, 0]
        for input_ids, attention_mask in batches
    ]
    return torch.cat(states).float()


def span_retrieval(queries: torch.Tensor, documents: torch.Tensor, cutoff: int = RANK_CUTOFF) -> tuple[float, float]:
    """
    (MRR@cutoff, recall@cutoff) of finding document i for query i among all documents by cosine
    similarity. A document that ties with the right one counts as ranked above it.
    """
    scores = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T  # (queries, documents)
    right = scores.diagonal()[:, None]
    ranks = (scores >= right).sum(1)  # 1 + documents scored at least as high as the right one, itself counted once
    found = ranks <= cutoff
    return float((found / ranks).mean()), float(found.float().mean())


# The records.


class MetricsFile:
    """OUTPUT_DIR/metrics.jsonl: one JSON record per evaluation, in step order."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / METRICS_FILE

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def start(self, step: int) -> None:
        """
        Begin this process's part of the run at `step`: a run from step 0 starts the file afresh; a
        resumed run keeps the records up to its checkpoint's step and drops later ones, which came
        from steps the resumed run trains again, so that every step has at most one record.
        """
        kept = [record for record in self.records() if record["step"] <= step] if step > 0 else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(temporary, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluation records of a run folder; `DiagnosticsError` when it has none."""
    metrics = MetricsFile(run_dir)
    try:
        records = metrics.records()
    except (OSError, json.JSONDecodeError) as error:
        raise DiagnosticsError(f"{metrics.path} cannot be read as JSON lines ({error}).") from None
    if not records:
        state = "is empty" if metrics.path.is_file() else "does not exist"
        raise DiagnosticsError(
            f"{metrics.path} {state}: the run has no evaluation to draw (pretrain with --eval-data or --eval-split writes one)."
        )
    return records


def console_line(step: int, logs: dict) -> str:
    """One readable line of an evaluation's `eval_` logs."""
    figure = lambda name: logs[f"eval_{name}"]  # noqa: E731
    line = (
        f"eval step {step} ({logs['eval_passages']} held-out passages, {logs['eval_seconds']:.1f} s): "
        f"encoder {figure('encoder_loss'):.4f} acc {figure('encoder_accuracy'):.3f}  "
        f"decoder {figure('decoder_loss'):.4f} acc {figure('decoder_accuracy'):.3f}  "
        f"embedding information {figure('embedding_information'):.4f} nats/token  "
        f"span MRR@10 {figure('span_mrr_at_10'):.3f} recall@10 {figure('span_recall_at_10'):.3f}"
    )
    return line + (f"  BoW {figure('bow_loss'):.4f}" if "eval_bow_loss" in logs else "")


def training_evaluation(records: list[dict]) -> dict | None:
    """What the release's record (and so the model card) keeps of the evaluations: the first and the last, the picture's name, the cost."""
    if not records:
        return None
    return {
        "passages": records[-1]["passages"],
        "evaluations": len(records),
        "seconds": round(sum(record["seconds"] for record in records), 1),
        "first": records[0],
        "last": records[-1],
        "picture": CURVES_FILE,
    }


def draw_training_curves(records: list[dict], path: str | os.PathLike) -> None:
    """
    The evaluations against steps, in four panels (losses, accuracies, embedding information, span
    retrieval); each curve's first evaluation (step 0: the starting checkpoint) is drawn across as a dotted baseline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in records]
    baseline = "starting checkpoint" if steps[0] == 0 else f"first evaluation (step {steps[0]})"
    panels = [
        ("held-out losses (nats/token)", ["encoder_loss", "decoder_loss", "bow_loss"]),
        ("held-out accuracy", ["encoder_accuracy", "decoder_accuracy"]),
        ("embedding information (nats/token)", ["embedding_information"]),
        ("span retrieval (first half finds second)", ["span_mrr_at_10", "span_recall_at_10"]),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for axis, (title, names) in zip(axes, panels):
        for name in (name for name in names if name in records[-1]):
            values = [record.get(name, math.nan) for record in records]
            (line,) = axis.plot(steps, values, marker="o", markersize=3, label=LABELS[name].split(" (")[0])
            axis.axhline(values[0], color=line.get_color(), linestyle=":", linewidth=1)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    axes[2].axhline(0, color="black", linewidth=0.6)
    figure.suptitle(f"{records[-1]['passages']} held-out passages; dotted: {baseline}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# The Trainer's part.


class HeldOutEvaluation:
    """
    Mixin for the pre-training `Trainer`: `evaluate` runs the held-out diagnostics (`eval_dataset`
    is the `HeldOutSet`), and a loss or checkpoint that is not finite stops the run.

    The Trainer calls `evaluate` on every process at step 0 (`eval_on_start`), every `eval_steps`
    and at the last step. One process computes it and the others wait at a barrier, so they stay
    in step; with sharded weights (FSDP, DeepSpeed) every process takes part in the forward passes,
    which need all of them, and the first one records.
    """

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        step, metrics = self.state.global_step, MetricsFile(self.args.output_dir)
        first = not getattr(self, "_metrics_started", False)
        if first and self.is_world_process_zero():
            metrics.start(step)
        self._metrics_started = True
        recorded = self.is_world_process_zero() and any(record["step"] == step for record in metrics.records())
        held_out = self.eval_dataset if eval_dataset is None else eval_dataset
        logs = {}
        if (self.is_world_process_zero() or self.is_fsdp_enabled or self.is_deepspeed_enabled) and not recorded:
            started = time.perf_counter()
            with self.autocast_smart_context_manager(), whole(self.model, held_out.batches[0]) as model:
                figures = evaluate_held_out(model, held_out)
            figures |= {"passages": len(held_out), "seconds": round(time.perf_counter() - started, 2)}
            if self.is_world_process_zero():
                metrics.append({"step": step, **figures})
                logs = {f"{metric_key_prefix}_{name}": value for name, value in figures.items()}
                self.log(dict(logs))
        self.accelerator.wait_for_everyone()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=logs)
        return logs

    def stop_on_non_finite(self, outputs: RetroMAEForPreTrainingOutput) -> None:
        """Stop before the optimiser step when a loss of this step is not finite on any process (`BrokenRunError`)."""
        names = [name for name in ("encoder_loss", "decoder_loss", "bow_loss") if getattr(outputs, name, None) is not None]
        values = torch.stack([getattr(outputs, name).detach().float() for name in names])
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        if torch.isfinite(values).all():
            return
        broken = ", ".join(f"the {name.replace('_', ' ')} is {value:g}" for name, value in zip(names, values.tolist()) if not math.isfinite(value))
        raise BrokenRunError(broken_run_message(self, f"{broken}"))

    def _save_checkpoint(self, model, trial):
        """Refuse to checkpoint weights that are not finite (a step whose losses were finite can still overflow them)."""
        broken = (~torch.stack([local(parameter).detach().isfinite().all() for parameter in self.model.parameters()]).all()).float()
        if self.args.world_size > 1:
            broken = self.accelerator.reduce(broken, reduction="max")
        if broken:
            raise BrokenRunError(broken_run_message(self, "the weights are not finite after its optimiser step"))
        super()._save_checkpoint(model, trial)


@contextlib.contextmanager
def whole(model: RetroMAEForPreTraining, batch: dict[str, torch.Tensor]) -> Iterator[RetroMAEForPreTraining]:
    """
    The model with its weights whole on this process, for the held-out passes, which call its parts
    directly (`encoder.base_model`, `decode`, `mlm_head`) where the sharding engines gather weights
    only around a module's own forward:

    - under FSDP2 every unit is unsharded for the passes, after a forward of the whole model on
      `batch`, since FSDP2 takes the first unit to run as its root (the step-0 evaluation runs
      before any training step);
    - under DeepSpeed ZeRO-3 the passes run on a copy outside the engine (`gathered_copy`): the
      head's projection is the word embeddings' weight, which ZeRO-3 frees again after the
      embeddings' forward.

    Without a sharding engine this is the model itself.
    """
    if any(hasattr(parameter, "ds_status") for parameter in model.parameters()):
        yield gathered_copy(model)
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if units:  # without dropout or a graph: the training's random draws and memory stay as they were
        training = model.training
        with torch.no_grad():
            model.eval()(**{name: tensor.to(model.device) for name, tensor in batch.items()})
        model.train(training)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def gathered_copy(model: RetroMAEForPreTraining) -> RetroMAEForPreTraining:
    """A copy of a model whose weights DeepSpeed ZeRO-3 partitions, outside the engine, with every weight gathered into it."""
    import deepspeed

    with torch.device("meta"):  # the classes themselves: `from_config` would build under ZeRO-3's partitioning
        copy = type(model)(model.config, encoder=type(model.encoder)(model.config.encoder))
    copy.to_empty(device=model.device)
    sources = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for name, parameter in copy.named_parameters(remove_duplicate=False):
            parameter.data.copy_(sources[name].data)
    buffers = dict(model.named_buffers())
    for name, buffer in copy.named_buffers():
        buffer.copy_(buffers[name])
    return copy.train(model.training)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a weight FSDP (a DTensor) or DeepSpeed ZeRO-3 (its `ds_tensor`) shards, or the tensor itself."""
    if hasattr(tensor, "ds_tensor"):  # ZeRO-3 leaves the weight itself empty outside a forward
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def broken_run_message(trainer, what: str) -> str:
    """Which step broke and how, the checkpoint that is kept, and how to go on with a lower learning rate."""
    step, output_dir = trainer.state.global_step + 1, trainer.args.output_dir
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    lower = f"{trainer.args.learning_rate / 2:g}"
    cause = " (with --bf16 this is often an overflow: try it without)" if trainer.args.bf16 else ""
    if last is None:
        return (
            f"Step {step}: {what}{cause}. The run stopped before writing any checkpoint and released nothing; "
            f"start it again with a lower learning rate, e.g. --learning-rate {lower} (half of {trainer.args.learning_rate:g})."
        )
    return (
        f"Step {step}: {what}{cause}. The run stopped and released nothing; {last} is the last good checkpoint. "
        f"Continue from it with a lower learning rate: the same command with --resume --learning-rate {lower} "
        f"(half of {trainer.args.learning_rate:g})."
    )


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse to release weights that are not finite."""
    broken = [name for name, parameter in model.named_parameters() if not parameter.detach().isfinite().all()]
    if broken:
        raise BrokenRunError(f"The trained weights hold NaN or inf ({', '.join(broken[:3])}, ...): nothing was released.")


class LearningRateOnResume(TrainerCallback):
    """
    A resumed run trains at the `--learning-rate` it is given, not at the checkpoint's.

    The Trainer restores the checkpoint's scheduler, whose peak learning rate is the one the run
    started with; resuming a broken run with a lower `--learning-rate` then would change nothing.
    The schedule's shape (warm-up, decay) and position are kept, scaled to the new peak.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        peaks = getattr(lr_scheduler, "base_lrs", [args.learning_rate])
        if all(peak == args.learning_rate for peak in peaks):
            return
        if state.is_world_process_zero:
            print(f"Resumed at the peak learning rate {args.learning_rate:g} (the checkpoint's: {max(peaks):g}).")
        for index, group in enumerate(optimizer.param_groups):
            group["lr"] *= args.learning_rate / peaks[index]
            group["initial_lr"] = lr_scheduler.base_lrs[index] = args.learning_rate
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
