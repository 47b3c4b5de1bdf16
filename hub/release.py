"""`retromae release`: from a trained model folder to a complete, checked Hub repository in one commit.

The repository is assembled in a folder first (weights, config with `auto_map`, both code
files, tokenizer, sentence-transformers files, model card), loaded back by both user routes
(`AutoModel` and `SentenceTransformer`) and compared with the source, and only then uploaded
with `upload_folder`: one commit, or nothing at all.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from ..configuration_retromae import AUTO_MAP
from ..modeling_retromae import RetroMAEModel
from ..pretrain import PRETRAINING_FILE, quiet_loading, save_atomically
from ..sentence_transformer import add_sentence_transformers_files, load_sentence_transformer
from .card import TEMPLATE, model_card


PACKAGE = Path(__file__).resolve().parent.parent
CODE_FILES = ("configuration_retromae.py", "modeling_retromae.py")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
LEFT_BEHIND = ("README.md", ".cache")
PROBE_TEXTS = [
    "RetroMAE compresses a passage into its [CLS] embedding.",
    "Dense retrieval embeds queries and passages in one vector space.",
    "short",
]
TOLERANCE = 1e-5


class ReleaseError(ValueError):
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
) -> str:
    """Assemble, check and upload `model_dir` as `repo_id`; the commit URL, or the folder with `dry_run`."""
    check_repo_id(repo_id)
    source = check_model_folder(Path(model_dir))
    pretraining_file = source / PRETRAINING_FILE
    pretraining = json.loads(pretraining_file.read_text()) if pretraining_file.is_file() else None
    card = model_card(repo_id, pretraining, list(evaluations), license, language, template)
    token = None if dry_run or api else login_token()
    if dry_run:
        folder = Path(dry_run)
        save_atomically(folder, lambda path: assemble(source, path, str(card)))
        check_release(folder, source)
        return str(folder)
    with tempfile.TemporaryDirectory() as workspace:
        folder = Path(workspace) / "repo"
        assemble(source, folder, str(card))
        check_release(folder, source)
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
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "bert":
        raise ReleaseError(f"{folder} is a BERT checkpoint: turn it into a RetroMAE release with `retromae convert` first.")
    if model_type != "retromae":
        raise ReleaseError(f"{folder} holds a {model_type!r} model, not a RetroMAE one.")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise ReleaseError(f"{folder} has no .safetensors weights{' (only pickled ' + ', '.join(pickled) + ')' if pickled else ''}.")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise ReleaseError(f"{folder} has no tokenizer (tokenizer.json or vocab.txt).")
    return folder


def login_token() -> str:
    token = get_token()
    if not token:
        raise ReleaseError(
            "No Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) and run again, "
            "or pass --dry-run DIR to assemble the repository without uploading."
        )
    return token


def assemble(source: Path, folder: Path, card: str) -> None:
    """Write the repository: the source's files (pickles left out), current code, `auto_map`, card, ST files."""
    shutil.copytree(
        source,
        folder,
        ignore=lambda _, names: [n for n in names if n in LEFT_BEHIND or n.endswith(PICKLE_SUFFIXES) or n.startswith("checkpoint-")],
    )
    for name in CODE_FILES:
        shutil.copyfile(PACKAGE / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = dict(AUTO_MAP)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (folder / "modules.json").is_file():
        add_sentence_transformers_files(folder)
    (folder / "README.md").write_text(card)


def check_release(folder: Path, source: Path) -> None:
    """Load the assembled repository both ways users will, and compare its embeddings with the source's."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), quiet_loading():  # a source saved with older code may report its MLM head as unused
        released = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()(**inputs).sentence_embedding
        original = RetroMAEModel.from_pretrained(source).eval()(**inputs).sentence_embedding
        compare("AutoModel", released, original)
        released = SentenceTransformer(str(folder), trust_remote_code=True).encode(PROBE_TEXTS, convert_to_tensor=True)
        original = load_sentence_transformer(str(source)).encode(PROBE_TEXTS, convert_to_tensor=True)
        compare("SentenceTransformer", released, original)


def compare(route: str, released: torch.Tensor, original: torch.Tensor) -> None:
    if released.shape != original.shape or not torch.allclose(released, original, atol=TOLERANCE):
        raise ReleaseError(f"The assembled repository loaded with {route} does not reproduce the source's embeddings.")


def upload(folder: Path, repo_id: str, private: bool, commit_message: str, api: HfApi) -> str:
    """Create the repo if needed and push `folder` as one commit; the commit URL."""
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo.repo_id, commit_message=commit_message)
    return commit.commit_url
