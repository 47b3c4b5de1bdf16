"""The sharding engines of a run: DeepSpeed ZeRO and FSDP2, their configs, and whole weights from their shards.

- `read_engine`: the --deepspeed or --fsdp config, read and checked once (`Engine`);
- `deepspeed_config`, `fsdp_config`, `fsdp_units`: what the transformers Trainer is given for each;
- `gathered_weights`, `unpartitioned_loading`: the whole model for the release, written by process 0;
- `whole`, `local`: the weights whole (or this process's shard) for the held-out diagnostics.
"""

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

from .errors import UsageError, read_json_object
from .modeling_retromae import RetroMAEForPreTraining
from .settings import FSDP_CONFIG_KEYS, PretrainingSettings


# The two checkpoint formats of FSDP2 in the Trainer.
STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
FSDP_NOT_SHARDED = (
    "--fsdp: accelerate shards a model across several processes on GPUs (or other accelerators) only, "
    "so this run would not be sharded. Launch it with torchrun or accelerate launch on several GPUs."
)


@dataclass(frozen=True)
class Engine:
    """The sharding engine of a run: DeepSpeed's config, or the user's `fsdp_config` keys for FSDP2; neither for DDP or one process."""

    deepspeed_config: dict | None = None
    fsdp_overrides: dict | None = None

    @property
    def fsdp(self) -> bool:
        return self.fsdp_overrides is not None


def read_engine(settings: PretrainingSettings) -> Engine:
    """
    The engine --deepspeed or --fsdp names, its config read and checked.

    A ZeRO-3 config gathers the whole model when it is saved (`stage3_gather_16bit_weights_on_model_save`,
    set where the config leaves it out): the release is the consolidated encoder.
    """
    if settings.deepspeed and settings.fsdp:
        raise UsageError("Give --deepspeed or --fsdp, not both.")
    if settings.deepspeed:
        return Engine(deepspeed_config=read_deepspeed_config(settings.deepspeed))
    if isinstance(settings.fsdp, str):
        return Engine(fsdp_overrides=read_fsdp_config(settings.fsdp))
    return Engine(fsdp_overrides={} if settings.fsdp else None)


def read_deepspeed_config(path: str) -> dict:
    """A DeepSpeed config of ZeRO stage 1, 2 or 3 that gathers the weights when it saves."""
    config = read_json_object("--deepspeed", path)
    zero = config.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        raise UsageError(f"--deepspeed {path}: zero_optimization.stage must be 1, 2 or 3, got {stage}.")
    if stage == 3 and zero.setdefault("stage3_gather_16bit_weights_on_model_save", True) is not True:
        raise UsageError(
            f"--deepspeed {path}: ZeRO-3 must gather the weights to release the encoder: "
            "set zero_optimization.stage3_gather_16bit_weights_on_model_save to true."
        )
    return config


def read_fsdp_config(path: str) -> dict:
    """The user's `fsdp_config` keys (an `fsdp_` prefix allowed), of FSDP2 and a checkpoint format it has."""
    config = {key.removeprefix("fsdp_"): value for key, value in read_json_object("--fsdp", path).items()}
    unknown = sorted(set(config) - set(FSDP_CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--fsdp {path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(FSDP_CONFIG_KEYS)}.")
    if config.get("version", 2) != 2:
        raise UsageError(f"--fsdp {path}: version must be the number 2 (FSDP2), got {json.dumps(config['version'])}.")
    if config.get("state_dict_type", STATE_DICT_TYPES[0]) not in STATE_DICT_TYPES:
        raise UsageError(f"--fsdp {path}: state_dict_type must be one of {', '.join(STATE_DICT_TYPES)}, got {config['state_dict_type']}.")
    return config


@contextlib.contextmanager
def unpartitioned_loading(trainer: Trainer) -> Iterator[None]:
    """
    While a DeepSpeed ZeRO-3 config is set, transformers builds every model it loads partitioned
    across the processes (`deepspeed.zero.Init`), which waits for all of them; the releases are
    written by process 0 alone, and the sparse one loads a model, so the config is set aside.
    """
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(trainer.args.hf_deepspeed_config)


def deepspeed_config(config: dict, model: RetroMAEForPreTraining) -> dict:
    """
    DeepSpeed's config with the `"auto"` ZeRO bucket sizes filled from the encoder's width, by
    transformers' own rules: transformers reads `config.hidden_size`, which a RetroMAE config keeps
    under `encoder`. The other `"auto"` values are left to transformers, which fills them from the flags.
    """
    hidden = model.config.encoder.hidden_size
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = config["zero_optimization"]
    return config | {"zero_optimization": zero | {key: sizes[key] for key in sizes if zero.get(key) == "auto"}}


def fsdp_config(overrides: dict, model: RetroMAEForPreTraining, gradient_checkpointing: bool) -> dict:
    """
    The Trainer's `fsdp_config` for `--fsdp`: FSDP2, the family's layer class and the decoder as the
    sharded units (`fsdp_units`), checkpoints saved sharded, each unit recomputed in backward under
    --gradient-checkpointing; keys of the user's --fsdp CONFIG win.
    """
    defaults = {
        "version": 2,
        "transformer_layer_cls_to_wrap": fsdp_units(model),
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing,
    }
    return defaults | overrides


def fsdp_units(model: RetroMAEForPreTraining) -> list[str]:
    """
    The classes FSDP shards one by one: the encoder family's transformer layer, and RetroMAE's decoder.

    The family's layer is the block its base model repeats once per layer (`BertLayer`,
    `XLMRobertaLayer`, `ModernBertEncoderLayer`, `DebertaV2Layer`, DistilBERT's `TransformerBlock`),
    the layer that transformers names in the family's `_no_split_modules` where it has one. The
    embeddings listed there too are left to the root unit: RetroMAE reads the position table and the
    tied MLM weights outside their forward. The decoder is one unit rather than a layer each, because
    it computes all its layers' keys and values before decoding the rows; it has one layer in the paper.
    """
    depth = model.config.encoder.num_hidden_layers
    layers = next(
        module for module in model.encoder.base_model.modules() if isinstance(module, nn.ModuleList) and len(module) == depth
    )
    return [type(layers[0]).__name__, type(model.decoder).__name__]


def gathered_weights(trainer: Trainer) -> dict[str, torch.Tensor] | None:
    """
    The whole model's weights on process 0 under FSDP or DeepSpeed, which shard them (ZeRO-3) or may;
    `None` where every process holds them whole. Every process must call it: the shards are gathered.
    """
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


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
