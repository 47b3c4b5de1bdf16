"""A RetroMAE or DupMAE encoder as a sparse (SPLADE) retriever: sentence-transformers' `SparseEncoder`, no remote code.

SPLADE-max (Formal et al., SIGIR 2022, arXiv 2109.10086) scores every vocabulary entry j at every
position i of a text with the MLM head, s_ij, and represents the text by

    w_j = max_i log(1 + ReLU(s_ij))        (i over the text's tokens, padding excluded)

a vocabulary-sized vector, mostly zeros, ranked by dot product. DupMAE (RetroMAE v2) trains these
very scores with its bag-of-words objective; its authors released only that objective and answer
"how do I use the token side?" with SPLADE. Writing the SPLADE model is this package's extension.

The folder is the family's own `...ForMaskedLM` checkpoint (`plain_masked_lm`: no `auto_map`, no
code files) under sentence-transformers' fill-mask `Transformer` and `SpladePooling` (max pooling,
ReLU then log1p), so `SparseEncoder(folder)` loads it with no flag and without this package.
"""

import json
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SparseEncoder
from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import UsageError
from .model_folder import plain_masked_lm, quiet_loading, save_atomically, write_pretraining_record
from .modeling_retromae import max_tokens


def splade_model(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_seq_length: int | None = None) -> SparseEncoder:
    """
    The SPLADE-max model of an encoder with its MLM head (a release's `...ForMaskedLM`, RetroMAE's
    or the family's own class): fill-mask `Transformer` over the family's own class, then `SpladePooling`.
    Inputs are truncated at `max_seq_length` tokens, or as the positions allow where it is not given.
    """
    plain = plain_masked_lm(encoder)
    with tempfile.TemporaryDirectory() as folder:  # the Transformer module loads its model and tokenizer from a folder
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with quiet_loading():
            transformer = Transformer(folder, transformer_task="fill-mask", max_seq_length=max_seq_length or max_tokens(plain.config))
    pooling = SpladePooling(pooling_strategy="max", activation_function="relu", embedding_dimension=plain.config.vocab_size)
    return SparseEncoder(modules=[transformer, pooling], similarity_fn_name="dot")


def write_sparse_model_files(
    folder: Path, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pretraining: dict | None = None
) -> None:
    """The sparse folder's files: `splade_model`'s, and, where there is one, the record of the pre-training (and its `max_seq_length`)."""
    splade_model(encoder, tokenizer, (pretraining or {}).get("max_seq_length")).save(str(folder), create_model_card=False)
    write_pretraining_record(folder, pretraining)


def write_sparse_release(
    folder: str | Path, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pretraining: dict | None = None
) -> Path:
    """
    Write the sparse release of `encoder` (with its MLM head, as `released_encoder()` gives it) to
    `folder`, atomically: what a DupMAE run leaves in OUTPUT_DIR/sparse and `retromae convert --sparse` writes.
    """
    save_atomically(Path(folder), lambda path: write_sparse_model_files(path, encoder, tokenizer, pretraining))
    return Path(folder)


def splade_embedding(masked_lm: PreTrainedModel, inputs: dict) -> torch.Tensor:
    """(batch, vocab) SPLADE-max weights computed straight from the MLM head's scores, to check a sparse folder against."""
    with torch.no_grad():
        scores = masked_lm(**inputs).logits  # (batch, seq, vocab)
    weights = torch.log1p(torch.relu(scores)) * inputs["attention_mask"].unsqueeze(-1)
    return weights.amax(dim=1)


def is_sparse_folder(folder: Path) -> bool:
    """Whether `folder` is a saved SPLADE model: its sentence-transformers modules end in `SpladePooling`."""
    modules = Path(folder) / "modules.json"
    return modules.is_file() and any(m.get("type", "").endswith(".SpladePooling") for m in json.loads(modules.read_text()))


def load_sparse_encoder(model_name_or_path: str) -> SparseEncoder:
    """
    The SPLADE model to fine-tune or evaluate: a sparse folder or Hub repository as saved, or a family's
    plain `...ForMaskedLM` checkpoint (sentence-transformers makes it SPLADE-max). `UsageError` for any
    other model, saying how to make a sparse one; what the loader raises, for what is no model.
    """
    not_sparse = UsageError(
        f"{model_name_or_path} is not a sparse (SPLADE) model: `retromae convert --sparse SRC DST` makes one from a checkpoint "
        "with an MLM head, such as a pretrain run's OUTPUT_DIR/model (a DupMAE run writes OUTPUT_DIR/sparse itself); a model "
        "fine-tuned with `retromae finetune` has no MLM head, so convert the one it was fine-tuned from."
    )
    if (Path(model_name_or_path) / "modules.json").is_file() and not is_sparse_folder(Path(model_name_or_path)):
        raise not_sparse  # a dense sentence-transformers folder: refused before it is loaded
    model = SparseEncoder(model_name_or_path)
    if not any(isinstance(module, SpladePooling) for module in model):
        raise not_sparse
    return model
