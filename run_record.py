"""What a finished pre-training run leaves: its record (the model card's facts), its releases, and its result."""

import platform
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase, Trainer

from .corpus import CorpusCounts, CorpusSource
from .diagnostics import CURVES_FILE, check_finite_weights, draw_training_curves
from .engines import unpartitioned_loading
from .model_folder import public_name, save_atomically, write_model_files
from .modeling_retromae import RetroMAEForPreTraining
from .sentence_transformer import release_max_seq_length
from .settings import PretrainingSettings
from .sparse_encoder import write_sparse_release


RELEASE_FOLDER = "model"
SPARSE_FOLDER = "sparse"
DEMO_CORPUS = "English Wikipedia excerpt (gensim test data, CC BY-SA), cleaned to paragraphs"
DEMO_DATASET = "wikimedia/wikipedia"


def run_summary(
    settings: PretrainingSettings, trainer: Trainer, source: CorpusSource | None, records: int | None, counts: CorpusCounts, dataset, seconds: float
) -> dict:
    """What the model card reports of this run: data, RetroMAE settings, steps, hardware, time, final losses."""
    losses = [entry for entry in trainer.state.log_history if "encoder_loss" in entry]
    processes, steps = trainer.args.world_size, trainer.state.global_step
    return {
        "base_model": public_name(settings.model) if settings.model else f"fresh {settings.config} BERT",
        "corpus": source.name if source else DEMO_CORPUS,
        "datasets": [source.hub_id] if source and source.hub_id else [] if source else [DEMO_DATASET],
        "records": counts["read"] if records is None else records,
        "passages": len(dataset) if isinstance(dataset, datasets.Dataset) else None,  # unknown when cut as it is read
        "passages_trained": steps * settings.batch_size * settings.gradient_accumulation_steps * processes,
        "passages_from_long_records": settings.passages,
        "skipped_records": counts["skipped"],
        "empty_passages": counts["empty"],  # no text after tokenization: left out (in a stream, of those read)
        "unknown_passages": counts["unknown"],  # nothing but [UNK]: trained (in a stream, of those read)
        "encoder_mask_ratio": settings.encoder_mask_ratio,
        "decoder_mask_ratio": settings.decoder_mask_ratio,
        "enhanced_decoding": settings.enhanced_decoding,
        "objective": settings.objective,
        "bow_loss_weight": settings.bow_loss_weight,
        "max_length": settings.max_length,
        "max_seq_length": release_max_seq_length(settings.model, settings.max_length),
        "fresh_head": settings.config is not None or "head" in trainer.model.fresh_parts,  # the MLM head, and so the sparse model, learnt by this run alone
        "decoder_mask_patterns": settings.decoder_mask_patterns,
        "group_by_length": settings.group_by_length,
        "steps": steps,
        "batch_size": settings.batch_size,
        "processes": processes,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "learning_rate": settings.learning_rate,
        "seed": settings.seed,
        "hardware": hardware(trainer.args.device),
        "train_seconds": round(seconds, 1),
        "final_loss": final_loss(losses[-1], settings.bow_loss_weight) if losses else None,
    }


def final_loss(logs: dict, bow_loss_weight: float | None) -> str:
    """The last logged losses as the objective sums them: `encoder + decoder`, and `+ weight x bow` for DupMAE."""
    terms = f"{logs['encoder_loss']:.4f} + {logs['decoder_loss']:.4f}"
    return terms + (f" + {bow_loss_weight:g} x {logs['bow_loss']:.4f}" if "bow_loss" in logs else "")


def hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def release_encoder(
    model: RetroMAEForPreTraining,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    summary: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    evaluations: list[dict] = (),
) -> None:
    """
    Save the encoder, its MLM head and the decoder (kept beside the encoder, so that pre-training can
    continue from the release) as the user-facing model folder; from `weights` (the whole model's,
    gathered from the shards) where given; with the picture of the held-out evaluations where there
    are any. Weights that are not finite are refused.
    """
    encoder = model.released_encoder(weights=weights)
    check_finite_weights(encoder)
    decoder = model.decoder_weights(weights)

    def write(path: Path) -> None:
        write_model_files(path, encoder, tokenizer, summary, decoder)
        if evaluations:
            draw_training_curves(evaluations, path / CURVES_FILE)

    save_atomically(folder, write)


@dataclass
class PretrainingResult:
    """
    What a pre-training run did: its settings, resolved, the folders it wrote (the release, `model`, and for DupMAE the sparse
    one), its steps, the records and passages it read and trained on, and its last logged losses.
    `model` is `None` on every process but the first, and the counts are those the run's record gives.
    """

    settings: PretrainingSettings
    output_dir: Path
    model: Path | None
    sparse: Path | None
    steps: int
    records: int | None = None
    passages: int | None = None
    passages_trained: int | None = None
    skipped_records: int = 0
    empty_passages: int = 0
    unknown_passages: int = 0
    final_losses: dict[str, float] = field(default_factory=dict)
    fresh_head: bool = False
    already_finished: bool = False


def release_run(
    settings: PretrainingSettings, trainer: Trainer, tokenizer: PreTrainedTokenizerBase, summary: dict, weights: dict | None, evaluations: list[dict]
) -> PretrainingResult:
    """
    Write the run's releases (on process 0): the encoder in OUTPUT_DIR/model and, for DupMAE, the
    sparse retriever beside it in OUTPUT_DIR/sparse (docs/sparse.md); and say what was done.
    """
    output_dir = Path(settings.output_dir)
    model, sparse = output_dir / RELEASE_FOLDER, output_dir / SPARSE_FOLDER if settings.objective == "dupmae" else None
    with unpartitioned_loading(trainer):
        release_encoder(trainer.model, tokenizer, model, summary, weights, evaluations)
        if sparse:
            write_sparse_release(sparse, trainer.model.released_encoder(weights=weights), tokenizer, summary)
    losses = [entry for entry in trainer.state.log_history if "encoder_loss" in entry]
    counts = ("records", "passages", "passages_trained", "skipped_records", "empty_passages", "unknown_passages", "fresh_head")
    return PretrainingResult(
        settings=settings,
        output_dir=output_dir,
        model=model,
        sparse=sparse,
        steps=summary["steps"],
        final_losses={name: value for name, value in losses[-1].items() if name.endswith("_loss")} if losses else {},
        **{name: summary[name] for name in counts},
    )
