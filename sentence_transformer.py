"""A RetroMAE encoder as a sentence-transformers model: the final first-token state, as in the paper."""

import json
from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from sentence_transformers.util import load_file_path


def to_sentence_transformer(
    model_name_or_path: str,
    max_seq_length: int = 512,
    normalize: bool = False,
    similarity: str = "cosine",
) -> SentenceTransformer:
    """
    A `SentenceTransformer` over a RetroMAE (or plain encoder) checkpoint with first-token (CLS) pooling.

    The embedding is the encoder's final first-token state ([CLS] or <s>) with no pooler layer, the vector RetroMAE
    trains for retrieval; `normalize` adds unit-length normalisation.
    """
    remote_code = {"trust_remote_code": True}
    transformer = Transformer(
        model_name_or_path,
        model_kwargs=remote_code,
        config_kwargs=remote_code,
        processor_kwargs=remote_code,
        max_seq_length=max_seq_length,
    )
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")]
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, similarity_fn_name=similarity)


def load_sentence_transformer(model_name_or_path: str) -> SentenceTransformer:
    """
    A SentenceTransformer as saved (its own pooling), or first-token pooling for a bare encoder or
    RetroMAE release, a folder or a Hub id alike: sentence-transformers would mean-pool a model
    without its files (modules.json), and RetroMAE trains the first token's state.
    """
    if load_file_path(model_name_or_path, "modules.json"):
        return SentenceTransformer(model_name_or_path, trust_remote_code=True)
    config = load_file_path(model_name_or_path, "config.json")
    if config is None:
        raise ValueError(f"{model_name_or_path} is not a model folder or a Hub model id (no config.json).")
    if "encoder" in json.loads(Path(config).read_text()):
        raise ValueError(
            f"{model_name_or_path} is a RetroMAE pre-training checkpoint (encoder and decoder): embed with the released "
            f"encoder (OUTPUT_DIR/model), or write one with `retromae convert {model_name_or_path} DST`."
        )
    return to_sentence_transformer(model_name_or_path)


def release_max_seq_length(base_model: str | None, max_length: int) -> int:
    """
    Where sentence-transformers truncates the release of a pre-training run (docs/publishing.md): the
    longer of the lengths its encoder was trained to embed, the run's `max_length` and the starting
    model's own `max_seq_length` where it is a sentence-transformers model (sentence-transformers keeps a
    model's own when it trains it). A starting model whose files cannot be read counts as having none.
    """
    config = load_file_path(base_model, "sentence_bert_config.json") if base_model else None
    own = json.loads(Path(config).read_text()).get("max_seq_length") if config else None
    return max(max_length, own or 0)
