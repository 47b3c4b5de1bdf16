"""`retromae convert`: checkpoints of any supported family (the authors' RetroMAE releases among them) to our layout, and back.

The authors publish their encoders (`Shitao/RetroMAE`, `Shitao/RetroMAE_MSMARCO`, ...) as plain
`BertForMaskedLM` folders; BGE-M3's RetroMAE stage is a plain XLM-RoBERTa. Converting one gives a
folder `retromae release` takes: the same weights in our release layout (the family's config
pointing the encoder classes at our code, the sentence-transformers files). Exporting goes the
other way, to the family's own checkpoint with no remote code at all. A sparse conversion writes
the SPLADE model of a checkpoint with an MLM head (see `retromae.sparse_encoder`).
"""

import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import check_exists, loading
from ..model_folder import (
    PRETRAINING_FILE,
    folder_model_type,
    load_encoder,
    plain_masked_lm,
    public_name,
    quiet_loading,
    save_atomically,
    source_decoder,
    write_model_files,
)
from ..modeling_retromae import ENCODER_FAMILIES, RELEASED_ENCODERS, write_sentence_transformers_files
from ..sparse_encoder import write_sparse_release
from .release import PROBE_TEXTS, TOLERANCE, ReleaseError, check_sparse_model


ACCEPTED = (*ENCODER_FAMILIES, "retromae")


def convert(source: str, destination: str | Path) -> bool:
    """
    Turn a checkpoint of a supported family (folder or Hub id) into a RetroMAE release folder.

    Returns whether the source had an MLM head; without one (a base-model checkpoint), the
    encoder is converted as is and the head is freshly initialised.
    """
    model, tokenizer, has_mlm_head = load_masked_lm(source)
    record = conversion_record(source)
    with loading("SRC", source):
        decoder = source_decoder(source)  # a pre-training checkpoint's, or a release's: pre-training can continue from the folder
    save_atomically(Path(destination), lambda folder: write_model_files(folder, model, tokenizer, record, decoder))
    check_same_encoder(str(destination), model.base_model, tokenizer)
    return has_mlm_head


def convert_sparse(source: str, destination: str | Path) -> Path:
    """
    Write the sparse (SPLADE-max) model of a checkpoint with an MLM head (folder or Hub id): a RetroMAE or
    DupMAE release, a pre-training checkpoint, or a family's own `...ForMaskedLM`. The folder is loaded
    back with `SparseEncoder` and checked against SPLADE computed from the head's scores.
    """
    model, tokenizer, has_mlm_head = load_masked_lm(source)
    if not has_mlm_head:
        raise ReleaseError(
            f"{source} has no MLM head (it holds the base model only): a sparse (SPLADE) model weighs the vocabulary "
            "with the MLM head's scores, so it is made from a checkpoint with one, such as a RetroMAE or DupMAE release."
        )
    record_file = Path(source) / PRETRAINING_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else conversion_record(source)
    write_sparse_release(destination, model, tokenizer, record)
    check_sparse_model(Path(destination), model, tokenizer)
    return Path(destination)


def load_masked_lm(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, bool]:
    """The source's encoder as a RetroMAE `...ForMaskedLM`, its tokenizer, and whether the checkpoint held the MLM head (else it is new)."""
    model_type = check_model_type(source)
    with loading("SRC", source):
        if model_type == "retromae":
            model, missing = load_encoder(source), []
        else:
            model, missing = load(RELEASED_ENCODERS[model_type][1], source)
        tokenizer = model_tokenizer(source, model.config.vocab_size)
    return model, tokenizer, not any(not key.startswith(model.base_model_prefix + ".") for key in missing)


def conversion_record(source: str) -> dict:
    """The record a converted folder carries: where it came from, which its card names as the base model."""
    return {"converted_from": public_name(source), "base_model": public_name(source)}


def export_plain(source: str, destination: str | Path) -> Path:
    """Write a RetroMAE model as its family's own `...ForMaskedLM` folder with no remote code at all (no `auto_map`, no .py), same weights."""
    check_model_type(source)
    with loading("SRC", source):
        retromae = load_encoder(source)
        tokenizer = model_tokenizer(source, retromae.config.vocab_size)
    plain = plain_masked_lm(retromae)

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
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ReleaseError(f"SRC {source}: not a model checkpoint (the folder has no config.json).")
    try:
        model_type = folder_model_type(source)
    except (OSError, ValueError) as error:
        raise ReleaseError(f"{source} is not a model folder or a Hub model id ({error}).") from None
    if not model_type:
        raise ReleaseError(f"SRC {source}: not a model checkpoint (its config.json names no model_type).")
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
