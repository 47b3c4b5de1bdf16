"""`retromae convert`: BERT checkpoints (the authors' RetroMAE releases among them) to our layout, and back.

The authors publish their encoders (`Shitao/RetroMAE`, `Shitao/RetroMAE_MSMARCO`, ...) as plain
`BertForMaskedLM` folders. Converting one gives a folder `retromae release` takes: the same
weights in our release layout (a BERT config that points the encoder classes at our code, the
sentence-transformers files). Exporting goes the other way, to a BERT folder with no remote code
at all.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForMaskedLM, BertModel
from transformers.configuration_utils import PreTrainedConfig

from ..model_folder import public_name, quiet_loading, save_atomically, write_model_files
from ..modeling_retromae import RetroMAEForMaskedLM, write_sentence_transformers_files
from .release import PROBE_TEXTS, TOLERANCE, ReleaseError


def convert(source: str, destination: str | Path) -> bool:
    """
    Turn a BERT / BertForMaskedLM checkpoint (folder or Hub id) into a RetroMAE release folder.

    Returns whether the source had an MLM head; without one (a bare `BertModel`), the encoder is
    converted as is and the head is freshly initialised.
    """
    check_model_type(source, {"bert", "retromae"})
    model, missing = load(RetroMAEForMaskedLM, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_same_encoder(source, model.bert, tokenizer)
    record = {"converted_from": public_name(source), "base_model": public_name(source)}
    save_atomically(Path(destination), lambda folder: write_model_files(folder, model, tokenizer, record))
    return not any(key.startswith("cls.") for key in missing)


def export_bert(source: str, destination: str | Path) -> Path:
    """Write a RetroMAE model as a `BertForMaskedLM` folder with no remote code at all (no `auto_map`, no .py), same weights."""
    check_model_type(source, {"bert", "retromae"})
    retromae, _ = load(RetroMAEForMaskedLM, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    bert = BertForMaskedLM(retromae.config.to_bert_config())
    bert.load_state_dict(retromae.state_dict())
    bert.config.architectures = ["BertForMaskedLM"]

    def write(folder: Path) -> None:
        bert.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_sentence_transformers_files(folder, bert.config)

    save_atomically(Path(destination), write)
    check_same_encoder(str(destination), retromae.bert, tokenizer)
    return Path(destination)


def check_model_type(source: str, accepted: set[str]) -> None:
    try:
        config, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as error:
        raise ReleaseError(f"{source} is not a model folder or a Hub model id ({error}).") from None
    if config.get("model_type") not in accepted:
        raise ReleaseError(f"{source} holds a {config.get('model_type')!r} model; expected {' or '.join(sorted(accepted))}.")


def load(model_class, source: str) -> tuple[torch.nn.Module, list[str]]:
    """The model and the names of the weights the checkpoint did not hold."""
    try:
        with quiet_loading():  # what was missing is returned, and said by the caller
            model, info = model_class.from_pretrained(source, output_loading_info=True)
        return model.eval(), info["missing_keys"]
    except (OSError, ValueError) as error:
        raise ReleaseError(f"{source} could not be loaded as {model_class.__name__} ({error}).") from None


def check_same_encoder(bert_source: str, encoder: torch.nn.Module, tokenizer) -> None:
    """The encoder's final hidden states equal those of `BertModel` loaded from `bert_source`."""
    inputs = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    bert = BertModel.from_pretrained(bert_source, add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = bert(**inputs).last_hidden_state
        actual = encoder(**inputs).last_hidden_state
    if not torch.allclose(actual, expected, atol=TOLERANCE):
        raise ReleaseError(f"The converted encoder does not reproduce {bert_source}'s hidden states.")
