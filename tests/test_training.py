"""The Trainer plumbing of training.py, and the private parts of transformers it and the package lean on.

transformers offers no public hook that writes a checkpoint somewhere else before it is moved into place
(callbacks' `on_save` runs after the folder is written), so `AtomicCheckpoints` overrides the private
`Trainer._save_checkpoint`, and a run stopped by a bad record calls it. If transformers renames that method,
changes its arguments or stops calling it, checkpoints would silently stop being atomic: these tests fail
first, naming the hook.
"""

import inspect
import os

from transformers import BertConfig, PreTrainedModel, Trainer, TrainingArguments

from retromae import RetroMAECollator, RetroMAEForPreTraining
from retromae.training import STAGING_FOLDER, AtomicCheckpoints

from conftest import TEXTS


def test_trainer_still_has_the_private_save_hook_atomic_checkpoints_overrides():
    parameters = list(inspect.signature(Trainer._save_checkpoint).parameters)
    assert parameters == ["self", "model", "trial"], (
        f"transformers changed Trainer._save_checkpoint to take {parameters}: update training.AtomicCheckpoints "
        "and trainer.stopped_on_bad_record, which call it as (model, trial)."
    )


def test_every_checkpoint_of_a_run_goes_through_the_private_save_hook(tiny_config, tokenizer, tmp_path):
    saved_at = []

    class RecordingTrainer(AtomicCheckpoints, Trainer):
        def _save_checkpoint(self, model, trial):
            saved_at.append(self.state.global_step)
            super()._save_checkpoint(model, trial)

    arguments = TrainingArguments(tmp_path, max_steps=2, save_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to="none")
    collator = RetroMAECollator(tokenizer, max_length=32, seed=0)
    RecordingTrainer(model=RetroMAEForPreTraining(tiny_config), args=arguments, train_dataset=TEXTS[:4], data_collator=collator).train()
    assert saved_at == [1, 2], "transformers no longer saves checkpoints through Trainer._save_checkpoint: AtomicCheckpoints is bypassed."
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"] and STAGING_FOLDER not in os.listdir(tmp_path)


def test_the_private_model_attributes_the_package_reads_still_exist():
    """`_attn_implementation` (the decoder follows the encoder's kernel), `_from_config`, loading rules, SDPA support."""
    assert BertConfig(attn_implementation="eager")._attn_implementation == "eager"
    assert callable(PreTrainedModel._from_config)
    for name in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected", "_supports_sdpa"):
        assert hasattr(PreTrainedModel, name), f"transformers no longer defines PreTrainedModel.{name}, which modeling_retromae sets."
