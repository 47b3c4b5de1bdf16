"""`retromae pretrain` and `retromae.pretrain`: RetroMAE pre-training on the transformers `Trainer`, from settings to release.

The Trainer brings DDP / FSDP / DeepSpeed, bf16, gradient accumulation, logging integrations and
checkpointing; a run wires the RetroMAE model, collator and corpus into it, in this order:

1. the settings, resolved and checked (`settings.py`), and the sharding engine (`engines.py`);
2. the model and tokenizer (`loading.py`), checked against the checkpoint a resumed run continues;
3. the held-out passages, the user's retrieval task (`eval_retrieval.py`, read before the model
   is loaded) and the training passages (`run_passages.py`);
4. the Trainer and its callbacks (`trainer.py`), and training;
5. the run's record and releases (`run_record.py`): the encoder without the decoder, as in the
   paper, and for DupMAE the sparse retriever beside it.
"""

import os
import time
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils.constants import FSDP_MODEL_NAME
from torch.distributed.checkpoint import FileSystemReader
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.training_args import ParallelMode

from .collator import RetroMAECollator
from .corpus import CorpusCounts, resolve_corpus
from .data import CorpusError
from .diagnostics import MetricsFile, RunEvaluation, training_evaluation
from .engines import FSDP_NOT_SHARDED, gathered_weights, read_engine
from .errors import UsageError, loading
from .eval_retrieval import RetrievalEvaluation, read_retrieval_data
from .loading import build_model_and_tokenizer
from .model_folder import safetensors_shapes
from .modeling_retromae import RetroMAEForPreTraining
from .run_passages import held_out_set, training_passages
from .run_record import RELEASE_FOLDER, SPARSE_FOLDER, PretrainingResult, release_run, run_summary
from .sentence_transformer import release_max_seq_length
from .settings import PretrainingSettings, RUN_FILE, check, resolved, resumed_settings, write_run_file
from .trainer import EpochCallback, LearningRateOnResume, LossLineProgressCallback, RetroMAETrainer, stopped_on_bad_record, training_arguments
from .training import StopOnInterrupt, check_output_dir, check_report_to, finished_step, resume_checkpoint


def pretrain(settings: PretrainingSettings, callbacks: Sequence[TrainerCallback] = (), command: list[str] | None = None) -> PretrainingResult:
    """
    Pre-train as `settings` say, exactly as `retromae pretrain` does, and return what the run did.

    `callbacks` are added to the Trainer's; `command` is the command line the run came from, which
    an interrupted run repeats with --resume (from Python: `--settings OUTPUT_DIR/retromae_run.json`).
    """
    settings.checked()
    checkpoint = resume_checkpoint(settings)
    settings = resolved(settings, resumed_settings(checkpoint) if checkpoint else None)
    check(settings)
    check_report_to(settings.report_to)
    engine = read_engine(settings)
    check_output_dir(settings)
    retrieval_data = read_retrieval_data(settings)
    source = resolve_corpus(settings.train_data, settings.dataset_config, settings.dataset_split) if settings.train_data else None
    model, tokenizer = build_model_and_tokenizer(settings)
    if checkpoint:
        check_resumable(checkpoint, model)  # before the finished-run test: a run of another model is not this one
        step = finished(settings, checkpoint)
        if step is not None:
            return PretrainingResult(settings, Path(settings.output_dir), Path(settings.output_dir) / RELEASE_FOLDER, None, step, already_finished=True)
    collator = RetroMAECollator.from_config(model.config, tokenizer, max_length=settings.max_length, seed=settings.seed)
    held_out = held_out_set(settings, source, tokenizer, collator)  # before the training corpus is read: its masks are drawn at epoch 0
    max_seq_length = release_max_seq_length(settings.model, settings.max_length)  # where the release cuts inputs
    retrieval = RetrievalEvaluation.build(retrieval_data, model, tokenizer, max_seq_length) if retrieval_data else None
    evaluation = RunEvaluation.of(held_out, retrieval, collator)
    counts = CorpusCounts()
    dataset, records = training_passages(settings, source, tokenizer, counts)
    interrupt = StopOnInterrupt()
    arguments = training_arguments(settings, engine, model)
    if engine.fsdp and arguments.parallel_mode != ParallelMode.DISTRIBUTED:
        raise UsageError(FSDP_NOT_SHARDED)
    trainer = RetroMAETrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        eval_dataset=evaluation,
        data_collator=collator,
        callbacks=[EpochCallback(collator), interrupt, LearningRateOnResume(), *callbacks],
    )
    if engine.fsdp and not trainer.is_fsdp_enabled:
        raise UsageError(FSDP_NOT_SHARDED)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossLineProgressCallback)
    if trainer.is_world_process_zero():
        write_run_file(settings)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except CorpusError as error:
        raise stopped_on_bad_record(trainer, error) from None
    if interrupt.requested:
        again = command or ["pretrain", "--settings", str(Path(settings.output_dir) / RUN_FILE)]
        raise interrupt.stopped(again, trainer.state.global_step, settings.output_dir)
    weights = gathered_weights(trainer)
    result = PretrainingResult(settings, Path(settings.output_dir), model=None, sparse=None, steps=trainer.state.global_step)
    if trainer.is_world_process_zero():
        evaluations = MetricsFile(settings.output_dir).records() if evaluation is not None else []
        summary = run_summary(settings, trainer, source, records, counts, dataset, time.perf_counter() - started)
        described = training_evaluation(evaluations, retrieval_data.description() if retrieval_data else None)
        result = release_run(settings, trainer, tokenizer, summary | {"training_evaluation": described}, weights, evaluations)
    trainer.accelerator.wait_for_everyone()
    return result


def finished(settings: PretrainingSettings, checkpoint: str) -> int | None:
    """The step at which the run --resume continues ended, if it did: the run is then left as it is, and said so."""
    step = finished_step(checkpoint, settings.max_steps)
    if step is None:
        return None
    release, sparse = Path(settings.output_dir) / RELEASE_FOLDER, Path(settings.output_dir) / SPARSE_FOLDER
    if not release.is_dir():
        raise UsageError(
            f"--resume: the run in {settings.output_dir} finished at step {step}, but {release} is missing: write it with "
            f"`retromae convert {checkpoint} {release}`."
        )
    if settings.objective == "dupmae" and not sparse.is_dir():
        raise UsageError(
            f"--resume: the DupMAE run in {settings.output_dir} finished at step {step}, but its sparse model {sparse} is "
            f"missing: write it with `retromae convert --sparse {release} {sparse}`."
        )
    if os.environ.get("RANK", "0") == "0":
        print(f"The run in {settings.output_dir} already finished at step {step} ({checkpoint}); its model is {release}. Nothing was changed.")
    return step


def check_resumable(checkpoint: str, model: RetroMAEForPreTraining) -> None:
    """The checkpoint --resume continues from holds this run's model: of its family, its tensors of the same shapes."""
    family, resumed_family = model.config.encoder.model_type, resumed_settings(checkpoint).get("family")
    if resumed_family and family != resumed_family:
        raise UsageError(f"--resume {checkpoint}: the run being resumed pre-trains a {resumed_family} encoder, and this run's model is a {family}.")
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


