"""`retromae convert`: checkpoints of any supported family (the authors' RetroMAE releases among them) to our layout, and back.

The authors publish their encoders (`Shitao/RetroMAE`, `Shitao/RetroMAE_MSMARCO`, ...) as plain
`BertForMaskedLM` folders; BGE-M3's RetroMAE stage is a plain XLM-RoBERTa. Converting one gives a
folder `retromae release` takes: the same weights in our release layout (the family's config
pointing the encoder classes at our code, the sentence-transformers files). Exporting goes the
other way, to the family's own checkpoint with no remote code at all.
"""

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from ..configuration_retromae import RETROMAE_FIELDS
from ..errors import check_exists, loading
from ..model_folder import folder_model_type, load_encoder, public_name, quiet_loading, save_atomically, write_model_files
from ..modeling_retromae import ENCODER_FAMILIES, RELEASED_ENCODERS, write_sentence_transformers_files
from .release import PROBE_TEXTS, TOLERANCE, ReleaseError


ACCEPTED = (*ENCODER_FAMILIES, "retromae")


def convert(source: str, destination: str | Path) -> bool:
    """
    Turn a checkpoint of a supported family (folder or Hub id) into a RetroMAE release folder.

    Returns whether the source had an MLM head; without one (a base-model checkpoint), the
    encoder is converted as is and the head is freshly initialised.
    """
    model_type = check_model_type(source)
    with loading("SRC", source):
        if model_type == "retromae":
            model, missing = load_encoder(source), []
        else:
            model, missing = load(RELEASED_ENCODERS[model_type][1], source)
        tokenizer = model_tokenizer(source, model.config.vocab_size)
    record = {"converted_from": public_name(source), "base_model": public_name(source)}
    save_atomically(Path(destination), lambda folder: write_model_files(folder, model, tokenizer, record))
    check_same_encoder(str(destination), model.base_model, tokenizer)
    return not any(not key.startswith(model.base_model_prefix + ".") for key in missing)


def export_plain(source: str, destination: str | Path) -> Path:
    """Write a RetroMAE model as its family's own `...ForMaskedLM` folder with no remote code at all (no `auto_map`, no .py), same weights."""
    check_model_type(source)
    with loading("SRC", source):
        retromae = load_encoder(source)
        tokenizer = model_tokenizer(source, retromae.config.vocab_size)
    settings = {k: v for k, v in retromae.config.to_dict().items() if k not in ("auto_map", *RETROMAE_FIELDS)}
    config = CONFIG_MAPPING[retromae.config.model_type](**settings)
    plain = MODEL_FOR_MASKED_LM_MAPPING[type(config)](config)
    plain.load_state_dict(retromae.state_dict())
    plain.config.architectures = [type(plain).__name__]

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, plain.config)

    save_atomically(Path(destination), write)
    check_same_encoder(str(destination), retromae.base_model, tokenizer)
    return Path(destination)


def model_tokenizer(source: str, vocab_size: int):
    """The source's own tokenizer; a folder without one (transformers then makes a tokenizer of a few special tokens) is refused."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if len(tokenizer) < vocab_size // 2:
        raise ReleaseError(
            f"{source} holds no tokenizer of its own (the one loaded has {len(tokenizer)} tokens for a vocabulary of "
            f"{vocab_size}): save the model's tokenizer into it first (tokenizer.save_pretrained)."
        )
    return tokenizer


def check_model_type(source: str) -> str:
    """The source's model type, if it is a supported family or a RetroMAE checkpoint."""
    check_exists("SRC", source, ReleaseError)
    try:
        model_type = folder_model_type(source)
    except (OSError, ValueError) as error:
        raise ReleaseError(f"{source} is not a model folder or a Hub model id ({error}).") from None
    if model_type not in ACCEPTED:
        raise ReleaseError(f"{source} holds a {model_type!r} model; expected one of {', '.join(ACCEPTED)}.")
    return model_type


def load(model_class, source: str) -> tuple[PreTrainedModel, list[str]]:
    """The model and the names of the weights the checkpoint did not hold."""
    try:
        with quiet_loading():  # what was missing is returned, and said by the caller
            model, info = model_class.from_pretrained(source, output_loading_info=True)
        return model.eval(), info["missing_keys"]
    except (OSError, ValueError) as error:
        raise ReleaseError(f"{source} could not be loaded as {model_class.__name__} ({error}).") from None


def check_same_encoder(folder: str, encoder: torch.nn.Module, tokenizer) -> None:
    """The written folder, loaded by its family's own `AutoModel` with no remote code, gives the encoder's final hidden states."""
    inputs = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with quiet_loading():  # the family's base model reports the MLM head as unused
        written = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = encoder(**inputs).last_hidden_state
        actual = written(**inputs).last_hidden_state
    if not torch.allclose(actual, expected, atol=TOLERANCE):
        raise ReleaseError(f"The folder written to {folder} does not reproduce the encoder's hidden states.")
