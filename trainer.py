"""The transformers `Trainer` of a pre-training run, and what is said while it trains.

`RetroMAETrainer` logs the encoder, decoder (and DupMAE's bag-of-words) losses and tokens/s,
evaluates on the held-out passages and the user's retrieval task (`HeldOutEvaluation`), stops on a loss that is not finite and
writes checkpoints atomically; its settings come from the run's (`training_arguments`). The
callbacks draw new masks every epoch, keep the learning rate asked for on resume, and print one
readable line per logging step.
"""

import importlib.util
import math
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .collator import RetroMAECollator
from .data import CorpusError
from .diagnostics import BrokenRunError, MetricsFile, console_line, evaluate_run
from .engines import Engine, deepspeed_config, fsdp_config, local, whole
from .errors import UsageError
from .modeling_retromae import RetroMAEForPreTraining, RetroMAEForPreTrainingOutput
from .settings import PretrainingSettings, evaluates
from .training import AtomicCheckpoints


def stopped_on_bad_record(trainer: Trainer, error: CorpusError) -> CorpusError:
    """Checkpoint the steps done before a bad record stopped the run, and say how to carry on."""
    message = str(error).strip().splitlines()[-1].removeprefix(f"{CorpusError.__module__}.CorpusError: ")
    step = trainer.state.global_step
    if step == 0:
        return CorpusError(message)
    trainer._save_checkpoint(trainer.model, trial=None)
    return CorpusError(
        f"{message} The run stopped at step {step}, saved in {Path(trainer.args.output_dir) / f'checkpoint-{step}'}: "
        "fix the data (or pass --skip-bad-records) and continue with --resume."
    )


def training_arguments(settings: PretrainingSettings, engine: Engine, model: RetroMAEForPreTraining) -> TrainingArguments:
    """The Trainer's settings from the run's; a DeepSpeed config that contradicts them, or a bad `training_arguments` value, is a `UsageError`."""
    if settings.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs DeepSpeed, which is not installed: pip install 'retromae[deepspeed]'.")
    try:
        arguments = TrainingArguments(**trainer_settings(settings, engine, model))
    except ValueError as error:
        if settings.deepspeed:
            raise UsageError(f"--deepspeed {settings.deepspeed}: {error}") from None
        if settings.training_arguments:
            raise UsageError(f"training_arguments: {error}") from None
        raise
    mismatches = arguments.hf_deepspeed_config.mismatches if settings.deepspeed else []
    if mismatches:  # transformers itself would only raise them when training starts
        raise UsageError(
            f"--deepspeed {settings.deepspeed}: values that contradict the flags ({'; '.join(item.removeprefix('- ') for item in mismatches)}); "
            'set them to "auto" or change the flags.'
        )
    return arguments


def trainer_settings(settings: PretrainingSettings, engine: Engine, model: RetroMAEForPreTraining) -> dict:
    """The keyword arguments of `TrainingArguments`: the run's, the engine's (DeepSpeed's config, or FSDP's), and `training_arguments`."""
    fsdp = fsdp_config(engine.fsdp_overrides, model, settings.gradient_checkpointing) if engine.fsdp else None
    return dict(
        output_dir=settings.output_dir,
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.max_steps,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        bf16=settings.bf16,
        activation_checkpointing=settings.gradient_checkpointing and fsdp is None,  # FSDP recomputes its own units
        torch_compile=settings.torch_compile,
        dataloader_num_workers=settings.dataloader_num_workers,
        dataloader_pin_memory=torch.accelerator.is_available(),
        use_cpu=not torch.accelerator.is_available(),
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        report_to=settings.report_to,
        remove_unused_columns=False,
        # Each process draws its own batches: passages cut as they are read make batches of different lengths,
        # which accelerate's default for iterable data (batches fetched by the main process and concatenated) refuses.
        accelerator_config={"dispatch_batches": False},
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        length_column_name="length",
        deepspeed=deepspeed_config(engine.deepspeed_config, model) if engine.deepspeed_config else None,
        fsdp=fsdp is not None,
        fsdp_config=fsdp,
        **evaluation_schedule(settings),
        **settings.training_arguments,
    )


def evaluation_schedule(settings: PretrainingSettings) -> dict:
    """The Trainer's settings for evaluation: at step 0, every `--eval-steps`, and at the last step (with held-out passages or a retrieval task)."""
    if not evaluates(settings):
        return {"eval_strategy": "no"}
    return {"eval_strategy": "steps", "eval_steps": settings.eval_steps, "eval_on_start": True}


class HeldOutEvaluation:
    """
    Mixin for the pre-training `Trainer`: `evaluate` runs the held-out diagnostics and the retrieval
    evaluation (`eval_dataset` is the `RunEvaluation`), and a loss or checkpoint that is not finite stops the run.

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
        evaluation = self.eval_dataset if eval_dataset is None else eval_dataset
        logs = {}
        if (self.is_world_process_zero() or self.is_fsdp_enabled or self.is_deepspeed_enabled) and not recorded:
            started = time.perf_counter()
            with self.autocast_smart_context_manager(), whole(self.model, evaluation.batch) as model:
                figures = evaluate_run(model, evaluation)
            figures |= {"seconds": round(time.perf_counter() - started, 2)}
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


class RetroMAETrainer(HeldOutEvaluation, AtomicCheckpoints, Trainer):
    """
    `Trainer` that logs encoder, decoder (and DupMAE's bag-of-words) losses and tokens/s, evaluates on held-out passages,
    stops on a loss that is not finite, and writes checkpoints atomically.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._since_log = torch.zeros(5)  # encoder loss sum, decoder loss sum, bag-of-words loss sum, batches, tokens
        self._last_log_time = time.perf_counter()

    def _prepare_for_training(self, *args, **kwargs):
        """
        Under FSDP, the embeddings and the MLM head stay in the root unit, which holds them whole for the whole step.

        accelerate gives a model's input and output embeddings a unit of their own; RetroMAE uses
        them outside their forward (the decoder's query stream reads the position table, both losses
        project through the head's tied weights), and BERT's head shares its bias with its output layer,
        which torch refuses to split between two units. So the model names no embeddings while accelerate
        shards it.
        """
        if not self.is_fsdp_enabled:
            return super()._prepare_for_training(*args, **kwargs)
        self.model.get_input_embeddings = self.model.get_output_embeddings = lambda: None
        try:
            return super()._prepare_for_training(*args, **kwargs)
        finally:
            del self.model.get_input_embeddings, self.model.get_output_embeddings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self.stop_on_non_finite(outputs)
        losses = (outputs.encoder_loss, outputs.decoder_loss, outputs.bow_loss)
        step = [0.0 if loss is None else loss.detach().float().cpu() for loss in losses] + [1.0]
        self._since_log += torch.tensor([*step, inputs["encoder_attention_mask"].sum().item()])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._since_log[3] > 0:
            totals = self.accelerator.reduce(self._since_log.to(self.args.device), reduction="sum").cpu()
            encoder, decoder, bow, batches, tokens = totals.tolist()
            now = time.perf_counter()
            logs["encoder_loss"] = round(encoder / batches, 4)
            logs["decoder_loss"] = round(decoder / batches, 4)
            if self.model.config.objective == "dupmae":
                logs["bow_loss"] = round(bow / batches, 4)
            logs["tokens_per_second"] = round(tokens / (now - self._last_log_time), 1)
            self._since_log.zero_()
            self._last_log_time = now
        super().log(logs, *args, **kwargs)


class EpochCallback(TrainerCallback):
    """Tells the collator which epoch it is, so that every pass over the data draws new masks."""

    def __init__(self, collator: RetroMAECollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class LossLineProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with one readable line per logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "eval_seconds" in logs:
            return self.training_bar.write(console_line(state.global_step, logs))
        if not (state.is_world_process_zero and self.training_bar is not None and "encoder_loss" in logs):
            return super().on_log(args, state, control, logs=logs, **kwargs)
        self.training_bar.write(
            f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
            f"encoder {logs['encoder_loss']:.4f}  decoder {logs['decoder_loss']:.4f}  "
            + (f"bow {logs['bow_loss']:.4f}  " if "bow_loss" in logs else "")
            + f"lr {logs.get('learning_rate', 0):.2e}  {logs['tokens_per_second']:,.0f} tokens/s"
        )


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
