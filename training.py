"""Trainer plumbing shared by `retromae pretrain` and `retromae finetune`: where a run writes, how it resumes, how it stops.

- `check_output_dir`: an --output-dir holding anything is only reused with --resume or --overwrite, and must be
  writable before any model is loaded;
- `resume_checkpoint` / `finished_step`: --resume takes a training checkpoint, never a plain model folder, and a
  finished run is left as it is;
- `AtomicCheckpoints`: no run ever leaves a half-written `checkpoint-N`;
- `StopOnInterrupt`: Ctrl-C ends the step in progress, checkpoints it and stops, so that --resume carries on.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import get_available_reporting_integrations
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .errors import Interrupted, UsageError, check_writable


STAGING_FOLDER = ".staging"
TRAINER_STATE = "trainer_state.json"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume and --overwrite, the same for every training command."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="Continue from the last checkpoint in --output-dir, or from the checkpoint folder given. A finished run is left as it is.",
    )
    parser.add_argument(
        "--overwrite", "--overwrite-output-dir", dest="overwrite", action="store_true", help="Allow an --output-dir that already holds files."
    )


def check_output_dir(args: argparse.Namespace) -> None:
    """An --output-dir holding another run or model is only reused with --resume or --overwrite; it must be writable."""
    output_dir = Path(args.output_dir)
    if output_dir.is_file():
        raise UsageError(f"--output-dir {output_dir} is a file; give a folder.")
    if args.resume:
        resume_checkpoint(args)
    elif not args.overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        raise UsageError(
            f"--output-dir {output_dir} already holds files (another model or run). Pass --resume to continue "
            "that run, --overwrite to write over it, or choose another folder."
        )
    check_writable("--output-dir", output_dir)


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The training checkpoint --resume names (the last one in --output-dir by default), checked to be one."""
    if not args.resume:
        return None
    if args.resume is True:
        output_dir = Path(args.output_dir)
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint-N folder in {output_dir} to continue from.")
        return checkpoint
    if not Path(args.resume).is_dir():
        raise UsageError(f"--resume {args.resume}: no such checkpoint folder.")
    if not (Path(args.resume) / TRAINER_STATE).is_file():
        raise UsageError(
            f"--resume {args.resume} is not a training checkpoint (it has no {TRAINER_STATE}): give a checkpoint-N "
            "folder of a run, or start from a model with --model."
        )
    return args.resume


def finished_step(checkpoint: str, max_steps: int) -> int | None:
    """The step a checkpoint ended its run at (`max_steps`, or the run's own when counted in epochs), or `None` if it has steps to go."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    target = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return state["global_step"] if target and state["global_step"] >= target else None


def check_report_to(report_to: str) -> None:
    """Every integration --report-to names is installed (else the Trainer fails only once the model is loaded)."""
    wanted = {name.strip() for name in report_to.split(",")} - {"none", "all", ""}
    missing = sorted(wanted - set(get_available_reporting_integrations()))
    if missing:
        raise UsageError(f"--report-to {report_to}: {', '.join(missing)} is not installed (pip install {' '.join(missing)}).")


class AtomicCheckpoints:
    """Mixin for a transformers `Trainer` (or subclass): checkpoints are written atomically.

    Used by both pre-training and fine-tuning, so no run ever leaves a half-written `checkpoint-N`.
    """

    def _save_checkpoint(self, model, trial):
        """Write `checkpoint-N` under a staging folder, then rename it into place: never a half-written checkpoint."""
        output_dir = self.args.output_dir
        staging = os.path.join(output_dir, STAGING_FOLDER)
        if self.args.should_save:  # what a killed run left half-written
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=output_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class StopOnInterrupt(TrainerCallback):
    """
    Ctrl-C (SIGINT) ends the step in progress, which is then checkpointed and the run stopped; a second
    Ctrl-C stops at once. Every process stops at the same step: the request is shared at each step's end.
    """

    def __init__(self):
        self.requested = False
        self.previous = signal.default_int_handler

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.anywhere(args):
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        signal.signal(signal.SIGINT, self.previous)

    def anywhere(self, args) -> bool:
        """Whether any process was interrupted."""
        if args.world_size == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def stopped(self, argv: list[str], step: int, output_dir: str | os.PathLike) -> Interrupted:
        """What to tell the user after an interrupted run (`argv`: its command line): what was kept and how to carry on."""
        again = ["retromae", *argv] + ([] if "--resume" in argv else ["--resume"])
        return Interrupted(
            f"interrupted: stopped after step {step}, saved in {Path(output_dir) / f'checkpoint-{step}'}. "
            f"Carry on with: {shlex.join(again)}"
        )
