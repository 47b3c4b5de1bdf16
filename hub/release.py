"""`retromae release`: from a trained model folder to a complete, checked Hub repository in one commit.

The repository is assembled in a folder first, in the layout every user-facing folder has (a
checkpoint of the encoder's family whose config points the encoder classes at the code files
beside it, tokenizer, sentence-transformers files), with the model card; it is loaded back the way users load it
(`SentenceTransformer` with no flag, `AutoModel` with remote code) and compared with the source,
and only then uploaded with `upload_folder`: one commit, or nothing at all. Folders saved by
earlier versions (model type `retromae`) are re-released in the current layout.

A sparse (SPLADE) folder (`retromae convert --sparse`, OUTPUT_DIR/sparse of a DupMAE run, `retromae
finetune --sparse`) is released as it is saved, a checkpoint of the family with no code files, and
checked by loading it with `SparseEncoder` (no flag) against SPLADE computed from its MLM head's scores.
The dense and the sparse model of one run are two repositories (ORG/NAME and ORG/NAME-sparse, say),
since a repository has one sentence-transformers pipeline: each then loads with no flag and no subfolder.
"""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from sentence_transformers import SentenceTransformer, SparseEncoder
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..diagnostics import CURVES_FILE
from ..errors import UsageError, loading
from ..model_folder import (
    PRETRAINING_FILE,
    encoder_config_dict,
    load_encoder,
    quiet_loading,
    safetensors_shapes,
    save_atomically,
    source_decoder,
    write_model_files,
    write_pretraining_record,
)
from ..modeling_retromae import ENCODER_FAMILIES, RELEASE_PARTS_FILE, RELEASED_ENCODERS
from ..sentence_transformer import load_sentence_transformer
from ..sparse_encoder import is_sparse_folder, splade_embedding
from .card import TEMPLATE, model_card, public_record


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SENTENCE_TRANSFORMERS_CONFIGS = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
PROBE_TEXTS = [
    "RetroMAE compresses a passage into its [CLS] embedding.",
    "Dense retrieval embeds queries and passages in one vector space.",
    "short",
]
TOLERANCE = 1e-5


class ReleaseError(UsageError):
    """A release that cannot be made: the message names the input and the problem."""


def release(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: str | Path | None = None,
    evaluations: list[dict] = (),
    license: str = "apache-2.0",
    language: str = "en",
    template: str | Path = TEMPLATE,
    commit_message: str | None = None,
    api: HfApi | None = None,
    decoder: bool = True,
) -> str:
    """
    Assemble, check and upload `model_dir` as `repo_id`; the commit URL, or the folder with `dry_run`.
    The decoder the folder carries goes with it (so that pre-training can continue from the release) unless `decoder=False`.
    """
    check_repo_id(repo_id)
    source = check_model_folder(Path(model_dir))
    pretraining_file = source / PRETRAINING_FILE
    pretraining = public_record(json.loads(pretraining_file.read_text())) if pretraining_file.is_file() else None
    if pretraining and pretraining.get("training_evaluation") and not (source / CURVES_FILE).is_file():
        pretraining["training_evaluation"] = pretraining["training_evaluation"] | {"picture": None}  # the folder lost its picture
    encoder = encoder_config_dict(json.loads((source / "config.json").read_text()))
    sparse = is_sparse_folder(source)
    with loading("MODEL_DIR", str(source)):
        decoder_weights = source_decoder(source) if decoder and not sparse else {}
    card = model_card(
        repo_id,
        pretraining,
        list(evaluations),
        license,
        language,
        template,
        encoder,
        sparse=sparse,
        decoder=bool(decoder_weights),
        source=source,
        mlm_head=sparse or has_mlm_head(source),
    )
    write = assemble_sparse if sparse else functools.partial(assemble, decoder=decoder_weights)
    check = check_sparse_release if sparse else check_release
    token = None if dry_run or api else login_token()
    if dry_run:
        folder = Path(dry_run)
        with loading("MODEL_DIR", str(source)):
            save_atomically(folder, lambda path: write(source, path, str(card), pretraining))
        check(folder, source)
        return str(folder)
    with tempfile.TemporaryDirectory() as workspace:
        folder = Path(workspace) / "repo"
        with loading("MODEL_DIR", str(source)):
            write(source, folder, str(card), pretraining)
        check(folder, source)
        return upload(folder, repo_id, private, commit_message or f"Release {repo_id} (retromae)", api or HfApi(token=token))


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ReleaseError(f"--repo-id {repo_id!r} is not a valid Hub repo id ('org/name'): {error}") from None


def check_model_folder(folder: Path) -> Path:
    """`folder` if it holds a RetroMAE model with safetensors weights and a tokenizer."""
    if not folder.is_dir():
        raise ReleaseError(f"{folder} is not a folder: give the model folder a run saved (e.g. OUTPUT_DIR/model).")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ReleaseError(f"{folder} is not a model folder: it has no config.json.")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReleaseError(f"{config_file} is not valid JSON ({error}).") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in (*ENCODER_FAMILIES, "retromae"):
        raise ReleaseError(f"{folder} holds a {model_type!r} model, not a RetroMAE one.")
    remote_code = config.get("auto_map", {}).get("AutoModel", "").startswith("modeling_retromae.")
    if model_type != "retromae" and not remote_code and not is_sparse_folder(folder):
        raise ReleaseError(f"{folder} is a plain {model_type} checkpoint: turn it into a RetroMAE release with `retromae convert` first.")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise ReleaseError(f"{folder} has no .safetensors weights{' (only pickled ' + ', '.join(pickled) + ')' if pickled else ''}.")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "spm.model", "sentencepiece.bpe.model")):
        raise ReleaseError(f"{folder} has no tokenizer (tokenizer.json, vocab.txt or a SentencePiece model).")
    return folder


def login_token() -> str:
    token = get_token()
    if not token:
        raise ReleaseError(
            "No Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) and run again, "
            "or pass --dry-run DIR to assemble the repository without uploading."
        )
    return token


def assemble(source: Path, folder: Path, card: str, pretraining: dict | None, decoder: dict | None = None) -> None:
    """Write the repository: the source's encoder in the release layout (with `decoder`), its tokenizer, record and pipeline, the card."""
    encoder = load_encoder(source, with_mlm_head=has_mlm_head(source))
    write_model_files(folder, encoder, AutoTokenizer.from_pretrained(source), pretraining, decoder)
    if (source / "modules.json").is_file():
        copy_sentence_transformers_pipeline(source, folder)
    if (source / CURVES_FILE).is_file():
        shutil.copyfile(source / CURVES_FILE, folder / CURVES_FILE)
    (folder / "README.md").write_text(card)


def has_mlm_head(source: Path) -> bool:
    """Whether the folder holds an MLM head: a release keeps it beside the encoder, a `...ForMaskedLM` checkpoint and a pre-training one in their weights."""
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") == "retromae" or (source / RELEASE_PARTS_FILE).is_file():
        return True
    prefix = RELEASED_ENCODERS[config["model_type"]][0].base_model_prefix + "."
    keys = safetensors_shapes(source)
    return any(key.startswith(prefix) for key in keys) and any(not key.startswith(prefix) for key in keys)


def copy_sentence_transformers_pipeline(source: Path, folder: Path) -> None:
    """Keep the source's own sentence-transformers modules (a fine-tuned model's pooling, normalisation)."""
    for name in SENTENCE_TRANSFORMERS_CONFIGS:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    for module in json.loads((source / "modules.json").read_text()):
        if module.get("path"):
            shutil.copytree(source / module["path"], folder / module["path"], dirs_exist_ok=True)


def check_release(folder: Path, source: Path) -> None:
    """Load the assembled repository the ways users will, and compare its embeddings with the source's."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), quiet_loading():  # a source in an earlier layout is reported on as it loads
        released = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()(**inputs).sentence_embedding
        original = load_encoder(source, with_mlm_head=False)(**inputs).sentence_embedding
        compare("AutoModel", released, original)
        embedded = SentenceTransformer(str(folder)).encode(PROBE_TEXTS, convert_to_tensor=True)
        if (source / "modules.json").is_file():  # the source's own pipeline (a fine-tuned model's pooling, normalisation)
            original = load_sentence_transformer(str(source)).encode(PROBE_TEXTS, convert_to_tensor=True)
        compare("SentenceTransformer", embedded, original)


def assemble_sparse(source: Path, folder: Path, card: str, pretraining: dict | None) -> None:
    """Write the repository: the sparse model as sentence-transformers saves it (a checkpoint of the family, no code files), record, card."""
    SparseEncoder(str(source)).save(str(folder), create_model_card=False)
    write_pretraining_record(folder, pretraining)
    (folder / "README.md").write_text(card)


def check_sparse_release(folder: Path, source: Path) -> None:
    """Load the assembled repository as users will (`SparseEncoder`, no flag) and compare it with the source's MLM head."""
    with quiet_loading():
        masked_lm = AutoModelForMaskedLM.from_pretrained(source).eval()
    check_sparse_model(folder, masked_lm, AutoTokenizer.from_pretrained(source))


def check_sparse_model(folder: Path, masked_lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """`SparseEncoder(folder)`'s embeddings must be SPLADE-max computed straight from `masked_lm`'s scores."""
    expected = splade_embedding(masked_lm, tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))
    embedded = SparseEncoder(str(folder)).encode(PROBE_TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
    compare("SparseEncoder", embedded, expected)


def compare(route: str, released: torch.Tensor, original: torch.Tensor) -> None:
    if released.shape != original.shape or not torch.allclose(released, original, atol=TOLERANCE):
        raise ReleaseError(f"The assembled repository loaded with {route} does not reproduce the source's embeddings.")


def upload(folder: Path, repo_id: str, private: bool, commit_message: str, api: HfApi) -> str:
    """Create the repo if needed and push `folder` as one commit; the commit URL."""
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo.repo_id, commit_message=commit_message)
    except Exception as error:  # offline, refused, no rights: huggingface_hub and its HTTP client raise several types
        if not isinstance(error, OSError) and type(error).__module__.split(".")[0] not in ("huggingface_hub", "httpx", "requests"):
            raise
        raise ReleaseError(f"Could not upload {repo_id} to the Hub (nothing was sent): {str(error).strip().splitlines()[0]}") from None
    return commit.commit_url
