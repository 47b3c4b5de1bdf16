"""What a Hub user meets: a release in an offline Hub cache, loaded by every route in a fresh process.

The process never imports `retromae` (importing it registers our types and would hide what a
Hub user sees), runs with standard input closed (a trust prompt fails instead of waiting) and
reads only the Hub cache the test builds.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, RepoUrl
from sentence_transformers import SentenceTransformer

from transformers import AutoConfig

from retromae import RetroMAEConfig, RetroMAEForMaskedLM, RetroMAEForPreTraining, RetroMAEModel
from retromae.hub import release
from retromae.model_folder import load_encoder
from retromae.run_record import release_encoder

from conftest import TEXTS, place_in_hub_cache, write_legacy_checkpoint
from helpers import COMMIT, REMOTE_CODE_NOTICE, REPO_ID, load_every_route, user_environment


EXPECTED_CLASSES = {
    "AutoTokenizer": "BertTokenizer",
    "SentenceTransformer": "BertModel",
    "AutoModel": "BertModel",
    "AutoModel(add_pooling_layer=False)": "BertModel",
    "BertModel": "BertModel",
    "BertForMaskedLM": "BertForMaskedLM",
    "AutoModel(trust_remote_code=True)": "RetroMAEModel",
    "AutoModelForMaskedLM(trust_remote_code=True)": "RetroMAEForMaskedLM",
}
# A release keeps in model.safetensors what BertModel holds (its pooler too), so the embedding routes
# load it without a load report. The two routes that build something else report the difference:
# BertModel without its pooler, and a plain BertForMaskedLM, whose MLM head a release keeps beside the
# weights, where RetroMAE's own classes (trust_remote_code=True) read it.
POOLER_UNUSED = ("pooler.dense.", "UNEXPECTED")
MLM_HEAD_NEW = ("cls.predictions.", "MISSING")
HEADLESS_NOTICE = "This checkpoint seem corrupted"  # transformers' words for a checkpoint without the head it ties
REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(?:\x1b\[[0-9;]*m)*([A-Z]+)")


@pytest.fixture
def model_dir(tmp_path, tiny_config, tokenizer):
    """A trained model folder as `retromae pretrain` leaves it (OUTPUT_DIR/model)."""
    torch.manual_seed(0)
    folder = tmp_path / "run" / "model"
    release_encoder(RetroMAEForPreTraining(tiny_config), tokenizer, folder, {"base_model": "org/base-bert", "steps": 3})
    return folder


def expected_embedding(model_dir, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return RetroMAEModel.from_pretrained(model_dir).eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).sentence_embedding


def reported_rows(warnings: list[str]) -> set[tuple[str, str]]:
    """(key prefix, status) of every row of transformers' load reports among `warnings`."""
    rows = set()
    for warning in warnings:
        assert "LOAD REPORT" in warning, warning
        for line in warning.splitlines():
            if match := REPORT_ROW.match(line):
                key, status = match.groups()
                if key != "Key":
                    rows.add((next(p for p in ("cls.predictions.", "pooler.dense.", key) if key.startswith(p)), status))
    return rows


def assert_every_route_gives_the_embedding(routes: dict, expected: torch.Tensor, has_mlm_head: bool = True) -> None:
    assert {route: result["class"] for route, result in routes.items()} == EXPECTED_CLASSES
    assert routes["AutoTokenizer"]["warnings"] == []
    for route, result in routes.items():
        assert not any("to instantiate a model of type" in warning for warning in result["warnings"]), (route, result["warnings"])
        if route == "AutoTokenizer":
            continue
        if "trust_remote_code" in route:
            result["warnings"] = [w for w in result["warnings"] if not w.startswith(REMOTE_CODE_NOTICE)]
        torch.testing.assert_close(torch.tensor(result["embedding"]), expected, atol=1e-5, rtol=0, msg=route)
        allowed = allowed_reports(route, has_mlm_head)
        if MLM_HEAD_NEW in allowed:
            result["warnings"] = [w for w in result["warnings"] if not w.startswith(HEADLESS_NOTICE)]
        assert reported_rows(result["warnings"]) <= allowed, (route, result["warnings"])
        if not allowed:
            assert result["warnings"] == [], (route, result["warnings"])


def allowed_reports(route: str, has_mlm_head: bool) -> set[tuple[str, str]]:
    """The load-report rows a route may print for a release (`has_mlm_head`: one that keeps its head)."""
    if route == "AutoModel(add_pooling_layer=False)":
        return {POOLER_UNUSED}
    if route == "BertForMaskedLM":
        return {POOLER_UNUSED, MLM_HEAD_NEW}
    if route == "AutoModelForMaskedLM(trust_remote_code=True)" and not has_mlm_head:
        return {MLM_HEAD_NEW}
    return set()


def test_a_release_loads_by_every_route_with_one_embedding(model_dir, tmp_path, tokenizer):
    folder = Path(release(model_dir, REPO_ID, dry_run=tmp_path / "release"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert config["encoder_mask_ratio"] == 0.3 and config["decoder_mask_ratio"] == 0.5
    assert_every_route_gives_the_embedding(load_every_route(folder, tmp_path), expected_embedding(model_dir, tokenizer))


def test_a_release_of_the_previous_layout_still_loads_and_is_re_released_in_the_new_one(model_dir, tmp_path, tokenizer):
    legacy = tmp_path / "legacy"
    pretrained = RetroMAEForPreTraining(RetroMAEConfig(encoder=AutoConfig.from_pretrained(model_dir)))
    pretrained.encoder.load_state_dict(load_encoder(model_dir).state_dict())
    write_legacy_checkpoint(pretrained, legacy, with_decoder=False)  # a config of type retromae, as releases were
    tokenizer.save_pretrained(legacy)
    expected = expected_embedding(model_dir, tokenizer)
    with torch.no_grad():
        from_legacy = load_encoder(legacy, with_mlm_head=False)(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    torch.testing.assert_close(from_legacy.sentence_embedding, expected)

    folder = Path(release(legacy, REPO_ID, dry_run=tmp_path / "re-release"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert_every_route_gives_the_embedding(load_every_route(folder, tmp_path), expected)


class CapturedHub:
    """Stands in for the Hub at its write calls (and the card check before an upload): each commit's files go under a folder per repository."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.commits = []

    def create_repo(self, api, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, commit_message, **kwargs):
        self.commits.append((repo_id, commit_message))
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd), operation
            target = self.folder / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as content:
                target.write_bytes(content.read())
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message=commit_message,
            commit_description="",
            oid=COMMIT,
        )


@pytest.fixture
def captured_hub(tmp_path, monkeypatch):
    hub = CapturedHub(tmp_path / "pushed")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: hub.create_repo(api, repo_id, **kwargs))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, commit_message="", **kwargs: hub.create_commit(api, repo_id, operations, commit_message, **kwargs))
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kwargs: None)
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)  # upload_folder then ends in create_commit
    return hub


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("encoder_class", [RetroMAEForMaskedLM, RetroMAEModel])
def test_push_to_hub_from_python_gives_the_release_layout(model_dir, tmp_path, tokenizer, captured_hub, encoder_class):
    encoder_class.from_pretrained(model_dir).push_to_hub("org/pushed")
    tokenizer.push_to_hub("org/pushed")
    pushed = captured_hub.folder / "org" / "pushed"
    released = Path(release(model_dir, REPO_ID, dry_run=tmp_path / "release"))
    headless = {"retromae_parts.safetensors"} if encoder_class is RetroMAEModel else set()  # the base model has no head, nor the decoder to keep
    assert files_in(pushed) == files_in(released) - {"retromae_pretraining.json"} - headless
    routes = load_every_route(pushed, tmp_path)
    assert_every_route_gives_the_embedding(routes, expected_embedding(model_dir, tokenizer), has_mlm_head=encoder_class is RetroMAEForMaskedLM)


def test_sentence_transformer_push_to_hub_of_a_loaded_release_keeps_the_layout(model_dir, tmp_path, tokenizer, captured_hub):
    released = Path(release(model_dir, REPO_ID, dry_run=tmp_path / "release"))
    cache = tmp_path / "user-cache"
    place_in_hub_cache(cache, REPO_ID, {COMMIT: released}, main=COMMIT)
    model = SentenceTransformer(REPO_ID, trust_remote_code=True, cache_folder=str(cache))
    model.push_to_hub("org/pushed-st")
    pushed = captured_hub.folder / "org" / "pushed-st"
    assert {"configuration_retromae.py", "modeling_retromae.py", "modules.json", "1_Pooling/config.json"} <= files_in(pushed)
    assert json.loads((pushed / "config.json").read_text())["model_type"] == "bert"
    routes = load_every_route(pushed, tmp_path)
    assert_every_route_gives_the_embedding(routes, expected_embedding(model_dir, tokenizer), has_mlm_head=False)


def test_every_python_block_of_the_card_runs_as_written(model_dir, tmp_path):
    folder = Path(release(model_dir, REPO_ID, dry_run=tmp_path / "release"))
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 3
    cache = tmp_path / "card-cache"
    place_in_hub_cache(cache, REPO_ID, {COMMIT: folder}, main=COMMIT)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    # One process runs the blocks in turn, each in a namespace of its own, as a reader pastes them.
    script = (
        "import json, sys\n"
        f"for number, block in enumerate(json.load(open({str(tmp_path / 'blocks.json')!r}))):\n"
        "    exec(compile(block, f'card block {number}', 'exec'), {'__name__': '__main__'})\n"
        "    assert 'retromae' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=user_environment(cache, tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_save_pretrained_with_push_to_hub_uploads_the_release_layout(model_dir, tmp_path, captured_hub):
    RetroMAEForMaskedLM.from_pretrained(model_dir).save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/saved")
    pushed = captured_hub.folder / "org" / "saved"
    assert files_in(pushed) - {"README.md"} == files_in(tmp_path / "saved")
    assert json.loads((pushed / "config.json").read_text())["model_type"] == "bert"
