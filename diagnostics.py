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
- DupMAE's BoW loss (`bow_loss`), for a DupMAE model.

With `--eval-retrieval DIR` an evaluation also ranks the user's own BEIR folder as `retromae
evaluate` would rank it with the run's release at that step (`eval_retrieval.py`): nDCG@10 and
Recall@100 of the first-token embedding, and for DupMAE of the sparse model and the fusion. Either
kind of evaluation, or both, makes the run evaluate itself (`RunEvaluation`).

Each evaluation is a line on the console, an `eval_`-prefixed log for the Trainer's integrations
(TensorBoard, W&B) and a record of OUTPUT_DIR/metrics.jsonl; the records become the picture
OUTPUT_DIR/model/training_curves.png and the first and last become a table of the model card.

A loss that is not finite stops the run before its optimiser step (`BrokenRunError`): the
checkpoints on disk are all from finite steps, and no release is written from NaN weights.
"""

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .collator import RetroMAECollator
from .errors import DiagnosticsError, UsageError
from .eval_retrieval import RetrievalEvaluation, evaluate_retrieval
from .modeling_retromae import IGNORE_INDEX, LOGITS_CHUNK, RetroMAEForPreTraining
from .run_passages import HeldOutSet


METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
PICTURE_FORMATS = ("png", "jpg", "jpeg", "webp", "svg", "pdf", "eps")  # a picture's format is its name's extension
RANK_CUTOFF = 10
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
# What an evaluation on --eval-retrieval reports (sparse and hybrid for DupMAE), in the same order.
RETRIEVAL_LABELS = {
    f"{retriever}_{metric}": f"{retriever} retrieval {name}"
    for retriever in ("dense", "sparse", "hybrid")
    for metric, name in (("ndcg_at_10", "nDCG@10"), ("recall_at_100", "Recall@100"))
}
# What every held-out evaluation record holds (the BoW loss only where the objective has one).
RECORD_FIELDS = ("step", "passages", "seconds", *[name for name in LABELS if name != "bow_loss"])
# What a record of an evaluation on --eval-retrieval alone holds (the sparse and hybrid figures only for DupMAE).
RETRIEVAL_RECORD_FIELDS = ("step", "seconds", "retrieval_queries", "retrieval_documents", "dense_ndcg_at_10", "dense_recall_at_100")


class BrokenRunError(UsageError):
    """A loss or weight that is not finite stopped the run; the message names the step and how to go on."""


# The measurements.


@dataclass
class RunEvaluation:
    """
    What a run evaluates itself on, the Trainer's `eval_dataset`: its held-out passages, the user's
    retrieval task, or both; `batch` is one the model's forward takes, which FSDP runs before the
    evaluation's passes (`engines.whole`).
    """

    held_out: HeldOutSet | None
    retrieval: RetrievalEvaluation | None
    batch: dict[str, torch.Tensor]

    @classmethod
    def of(cls, held_out: HeldOutSet | None, retrieval: RetrievalEvaluation | None, collator: RetroMAECollator) -> "RunEvaluation | None":
        """The run's evaluation, `None` where it has neither kind; `batch` is the held-out set's first, or one of the task's first passage."""
        if held_out is None and retrieval is None:
            return None
        return cls(held_out, retrieval, held_out.batches[0] if held_out is not None else collator(retrieval.first_texts(1)))


def evaluate_run(model: RetroMAEForPreTraining, evaluation: RunEvaluation) -> dict[str, float]:
    """The figures of every evaluation the run makes (`evaluate_held_out` with the passages counted, `evaluate_retrieval`)."""
    figures = {}
    if evaluation.held_out is not None:
        figures |= evaluate_held_out(model, evaluation.held_out) | {"passages": len(evaluation.held_out)}
    if evaluation.retrieval is not None:
        figures |= evaluate_retrieval(model, evaluation.retrieval)
    return figures


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

    Each held-out batch, with its masks, goes once through the encoder and the model's objective
    (`pretraining_losses`), which gives the decoder's states with the passages' own `h_X` and, for
    DupMAE, the BoW loss; the losses and accuracies are the shared MLM head's on those states
    (`head_statistics`). Only the deranged `h_X` is decoded again.
    """
    device = model.device
    batches = [{name: tensor.to(device) for name, tensor in batch.items()} for batch in held_out.batches]
    encoder, own, embeddings, bow = torch.zeros(3, device=device), torch.zeros(3, device=device), [], []
    for batch in batches:
        states = model.encoder.base_model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
        losses = model.pretraining_losses(states, batch)
        embeddings.append(states[:, 0])  # (batch, hidden) h_X
        encoder += head_statistics(model, states, batch["encoder_labels"])
        own += head_statistics(model, losses.decoder_states, batch["decoder_labels"])
        if losses.bow_loss is not None:
            bow.append((losses.bow_loss.float() * len(states), len(states)))
    others = torch.cat(embeddings)[held_out.derangement.to(device)]
    other, start = torch.zeros(3, device=device), 0
    for batch in batches:
        rows = slice(start, start + len(batch["decoder_input_ids"]))
        start = rows.stop
        decoded = model.decode(others[rows], batch["decoder_input_ids"], model.enhanced_decoding_mask(batch))
        other += head_statistics(model, decoded, batch["decoder_labels"])
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
        """The evaluation records; a line that is not one (cut short by a killed run, edited by hand) is skipped with a warning naming it."""
        records, bad_lines = self.read()
        self.warn_of(bad_lines)
        return records

    def read(self) -> tuple[list[dict], list[tuple[int, str]]]:
        """The evaluation records, and (line number, what is wrong) for every other line that is not blank."""
        if not self.path.is_file():
            return [], []
        records, bad_lines = [], []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if line.strip():
                try:
                    records.append(evaluation_record(line))
                except ValueError as error:
                    bad_lines.append((number, str(error)))
        return records, bad_lines

    def warn_of(self, bad_lines: list[tuple[int, str]]) -> None:
        for number, problem in bad_lines:
            warnings.warn(f"{self.path}:{number} {problem}: skipped.", stacklevel=3)

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


def evaluation_record(line: bytes) -> dict:
    """One line of metrics.jsonl as the record of an evaluation; `ValueError` saying what else the line is."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"is not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"is not an evaluation record (a JSON {type(record).__name__}, not an object)")
    fields = RETRIEVAL_RECORD_FIELDS if "retrieval_queries" in record and "passages" not in record else RECORD_FIELDS
    missing = [name for name in fields if not isinstance(record.get(name), (int, float))]
    if missing:
        raise ValueError(f"is not an evaluation record (it has no number {', '.join(map(repr, missing))})")
    return record


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluation records of a run folder, each bad line warned of; `DiagnosticsError` when it has none."""
    metrics = MetricsFile(run_dir)
    try:
        records, bad_lines = metrics.read()
    except OSError as error:
        raise DiagnosticsError(f"{metrics.path} cannot be read ({error.strerror}).") from None
    if bad_lines and not records:
        number, problem = bad_lines[0]
        raise DiagnosticsError(f"{metrics.path}:{number} {problem}; no line of the file is an evaluation record, so there is nothing to draw.")
    metrics.warn_of(bad_lines)
    if not records:
        state = "is empty" if metrics.path.is_file() else "does not exist"
        raise DiagnosticsError(
            f"{metrics.path} {state}: the run has no evaluation to draw (pretrain with --eval-data or --eval-split, or --eval-retrieval, writes one)."
        )
    return records


def console_line(step: int, logs: dict) -> str:
    """One readable line of an evaluation's `eval_` logs: the held-out figures, the retrieval figures, or both."""
    record = {name.removeprefix("eval_"): value for name, value in logs.items()}
    parts = []
    if "passages" in record:
        parts.append(
            f"encoder {record['encoder_loss']:.4f} acc {record['encoder_accuracy']:.3f}  "
            f"decoder {record['decoder_loss']:.4f} acc {record['decoder_accuracy']:.3f}  "
            f"embedding information {record['embedding_information']:.4f} nats/token  "
            f"span MRR@10 {record['span_mrr_at_10']:.3f} recall@10 {record['span_recall_at_10']:.3f}"
            + (f"  BoW {record['bow_loss']:.4f}" if "bow_loss" in record else "")
        )
    parts += [
        f"{retriever} nDCG@10 {record[f'{retriever}_ndcg_at_10']:.3f} R@100 {record[f'{retriever}_recall_at_100']:.3f}"
        for retriever in ("dense", "sparse", "hybrid")
        if f"{retriever}_ndcg_at_10" in record
    ]
    return f"eval step {step} ({evaluated_on(record)}, {record['seconds']:.1f} s): " + "  ".join(parts)


def evaluated_on(record: dict) -> str:
    """What an evaluation record's figures were measured on: held-out passages, the retrieval task, or both."""
    sizes = [f"{record['passages']} held-out passages"] if "passages" in record else []
    if "retrieval_queries" in record:
        sizes.append(f"{record['retrieval_queries']:,} queries over {record['retrieval_documents']:,} passages")
    return "; ".join(sizes)


def training_evaluation(records: list[dict], retrieval: dict | None = None) -> dict | None:
    """
    What the release's record (and so the model card) keeps of the evaluations: the first and the last, the picture's name,
    the cost, the held-out passages, and `retrieval`, the description of the --eval-retrieval task, where there is one.
    """
    if not records:
        return None
    return {
        "passages": records[-1].get("passages"),
        "evaluations": len(records),
        "seconds": round(sum(record["seconds"] for record in records), 1),
        "first": records[0],
        "last": records[-1],
        "picture": CURVES_FILE,
    } | ({"retrieval": retrieval} if retrieval else {})


def check_picture_name(what: str, path: str | os.PathLike) -> None:
    """A picture's file name (given as `what`) must end in one of `PICTURE_FORMATS`, which says the format it is written in."""
    extension = Path(path).suffix.lower()
    if extension.removeprefix(".") not in PICTURE_FORMATS:
        raise DiagnosticsError(
            f"{what} {path}: the name must end in the picture's format, one of {', '.join('.' + name for name in PICTURE_FORMATS)}; "
            f"got {repr(extension) if extension else 'no extension'}."
        )


def draw_training_curves(records: list[dict], path: str | os.PathLike) -> None:
    """
    The evaluations against steps, a panel for each kind of figure the records hold (losses, accuracies,
    embedding information, span retrieval; retrieval on the --eval-retrieval task); each curve's first
    evaluation (step 0: the starting checkpoint) is drawn across as a dotted baseline.
    The picture is written whole or not at all, in the format of its name's extension, with the folders above it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, last = [record["step"] for record in records], records[-1]
    baseline = "starting checkpoint" if steps[0] == 0 else f"first evaluation (step {steps[0]})"
    panels = [
        ("held-out losses (nats/token)", ["encoder_loss", "decoder_loss", "bow_loss"]),
        ("held-out accuracy", ["encoder_accuracy", "decoder_accuracy"]),
        ("embedding information (nats/token)", ["embedding_information"]),
        ("span retrieval (first half finds second)", ["span_mrr_at_10", "span_recall_at_10"]),
        ("retrieval on your data (--eval-retrieval)", list(RETRIEVAL_LABELS)),
    ]
    panels = [(title, names) for title, names in panels if any(name in last for name in names)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels):
        for name in (name for name in names if name in last):
            values = [record.get(name, math.nan) for record in records]
            (line,) = axis.plot(steps, values, marker="o", markersize=3, label=(LABELS | RETRIEVAL_LABELS)[name].split(" (")[0])
            axis.axhline(values[0], color=line.get_color(), linestyle=":", linewidth=1)
        if names == ["embedding_information"]:
            axis.axhline(0, color="black", linewidth=0.6)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    figure.suptitle(f"{evaluated_on(last)}; dotted: {baseline}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(temporary, dpi=110, format=path.suffix.removeprefix(".").lower())
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)


# The weights a checkpoint or release may hold.


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse to release weights that are not finite."""
    broken = [name for name, parameter in model.named_parameters() if not parameter.detach().isfinite().all()]
    if broken:
        raise BrokenRunError(f"The trained weights hold NaN or inf ({', '.join(broken[:3])}, ...): nothing was released.")


