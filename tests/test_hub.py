"""Hub releases: dry-run assembly, the card, an upload to a local Hub endpoint, Hub-cache loading, conversion."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytrec_eval
import torch
from huggingface_hub import ModelCard
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

from retromae import RetroMAEForPreTraining
from retromae import evaluate as evaluate_module
from retromae.cli import main
from retromae.corpus import resolve_corpus
from retromae.hub import CardError, ReleaseError, convert, export_plain, model_card, release
from retromae.errors import is_hub_id
from retromae.model_folder import public_name
from retromae.run_record import release_encoder

from conftest import MINILM_PATH, TEXTS, place_in_hub_cache


EXPECTED_FILES = {
    "README.md",
    "config.json",
    "configuration_retromae.py",
    "modeling_retromae.py",
    "model.safetensors",
    "retromae_parts.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "retromae_pretraining.json",
}
PRETRAINING = {"base_model": "org/base-bert", "encoder_mask_ratio": 0.3, "decoder_mask_ratio": 0.5, "steps": 7, "hardware": "CPU"}


@pytest.fixture
def model_dir(tmp_path, tiny_config, tokenizer):
    """A trained model folder as `retromae pretrain` leaves it (OUTPUT_DIR/model)."""
    torch.manual_seed(0)
    folder = tmp_path / "run" / "model"
    release_encoder(RetroMAEForPreTraining(tiny_config), tokenizer, folder, PRETRAINING)
    return folder


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def cls_embeddings(model, tokenizer):
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).last_hidden_state[:, 0]


def test_dry_run_assembles_a_complete_checked_repository(model_dir, tmp_path, tokenizer):
    evaluation = {"data": "/data/scifact", "split": "test", "queries": 300, "documents": 5183, "ndcg@10": 0.61, "mrr@10": 0.57, "recall@100": 0.9}
    folder = Path(release(model_dir, "org/tiny-retromae", dry_run=tmp_path / "repo", evaluations=[evaluation]))
    assert files_in(folder) == EXPECTED_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["auto_map"]["AutoModel"] == "modeling_retromae.RetroMAEModel"

    card = ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
    metadata = card.data.to_dict()
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert set(metadata["tags"]) == {"retromae", "sentence-transformers", "feature-extraction"}
    assert metadata["base_model"] == "org/base-bert" and metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "sentence-transformers" and metadata["language"] == "en"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"ndcg_at_10": 0.61, "mrr_at_10": 0.57, "recall_at_100": 0.9}
    for text in ("| encoder mask ratio | 0.3 |", "| optimiser steps | 7 |", "scifact", "xiao2022retromae", 'AutoModel.from_pretrained("org/tiny-retromae"', "BertModel", "retromae_parts.safetensors", "`retromae pretrain --model org/tiny-retromae` continues"):
        assert text in card.text

    source = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
    expected = cls_embeddings(source, tokenizer)
    by_auto_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(by_auto_model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).sentence_embedding, expected, atol=1e-5)
    by_sentence_transformers = SentenceTransformer(str(folder), trust_remote_code=True).encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(by_sentence_transformers, expected, atol=1e-5)


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub API routes `create_repo` and `upload_folder` call, recording what they receive."""

    requests: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.path, self.headers.get("Authorization"), body))
        endpoint = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            self.reply({"url": f"{endpoint}/{payload['organization']}/{payload['name']}"})
        elif self.path == "/api/validate-yaml":
            self.reply({"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self.reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self.reply({"commitUrl": f"{endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        else:
            self.send_error(404)

    def reply(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.requests
    server.shutdown()


def run_release(model_dir, repo_id, endpoint, tmp_path, token="hf_test_token", *options):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "retromae.cli", "release", str(model_dir), "--repo-id", repo_id, "--commit-message", "First release", *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_release_uploads_every_file_in_one_commit(model_dir, tmp_path, fake_hub):
    endpoint, requests = fake_hub
    result = run_release(model_dir, "org/tiny-retromae", endpoint, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{endpoint}/org/tiny-retromae/commit/{'a' * 40}" in result.stdout

    paths = [path for path, _, _ in requests]
    assert paths[0] == "/api/repos/create"
    created = json.loads(requests[0][2])
    assert (created["name"], created["organization"], created.get("visibility")) == ("tiny-retromae", "org", "public")
    assert all(authorization == "Bearer hf_test_token" for _, authorization, _ in requests)
    commits = [body for path, _, body in requests if path == "/api/models/org/tiny-retromae/commit/main"]
    assert len(commits) == 1
    lines = [json.loads(line) for line in commits[0].splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "First release", "description": ""}}
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    dry_run = tmp_path / "repo"  # in the same environment: a saved tokenizer records how it was loaded (offline or not)
    assert run_release(model_dir, "org/tiny-retromae", endpoint, tmp_path, "hf_test_token", "--dry-run", str(dry_run)).returncode == 0
    assert set(sent) == files_in(dry_run) == EXPECTED_FILES
    for path, content in sent.items():
        assert content == (dry_run / path).read_bytes(), path


def test_release_without_a_token_says_how_to_log_in_and_sends_nothing(model_dir, tmp_path, fake_hub):
    endpoint, requests = fake_hub
    result = run_release(model_dir, "org/tiny-retromae", endpoint, tmp_path, token=None)
    assert result.returncode == 2
    assert "hf auth login" in result.stderr and "Traceback" not in result.stderr
    assert requests == []


class RecordingApi:
    """An HfApi stand-in that records the calls a release makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", repo_id, files_in(Path(folder_path)), commit_message))
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/{'b' * 40}"})()


def test_private_release_creates_a_private_repo_then_commits_once(model_dir):
    api = RecordingApi()
    url = release(model_dir, "org/tiny-retromae", private=True, api=api)
    assert url == f"https://hub.test/org/tiny-retromae/commit/{'b' * 40}"
    assert api.calls == [
        ("create_repo", "org/tiny-retromae", True, True),
        ("upload_folder", "org/tiny-retromae", EXPECTED_FILES, "Release org/tiny-retromae (retromae)"),
    ]


class NoUploads:
    """An HfApi stand-in that fails the test if anything is sent."""

    def __getattr__(self, name):
        raise AssertionError(f"HfApi.{name} was called")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda d, t: dict(model_dir=t / "empty"), ReleaseError, "has no config.json"),
        (lambda d, t: dict(model_dir=t / "missing"), ReleaseError, "is not a folder"),
        (lambda d, t: dict(repo_id="org/bad name!"), ReleaseError, "not a valid Hub repo id"),
        (lambda d, t: dict(template=write(t / "card.md", "---\n{{ card_data }}\n---\n{{ training_budget }}\n")), CardError, "uses training_budget"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written_or_sent(model_dir, tmp_path, change, error, message):
    (tmp_path / "empty").mkdir()
    arguments = dict(model_dir=model_dir, repo_id="org/tiny", api=NoUploads()) | change(model_dir, tmp_path)
    with pytest.raises(error, match=message):
        release(**arguments)
    with pytest.raises(error, match=message):
        release(**(arguments | {"dry_run": tmp_path / "repo"}))
    assert not (tmp_path / "repo").exists()


def test_a_bert_folder_is_sent_to_convert_and_pickles_are_refused(tmp_path, tiny_config, tokenizer):
    bert = tmp_path / "bert"
    BertModel(tiny_config.encoder).save_pretrained(bert)
    with pytest.raises(ReleaseError, match="retromae convert"):
        release(bert, "org/x", dry_run=tmp_path / "repo")
    pickled = tmp_path / "pickled"
    shutil.copytree(bert, pickled)
    config = json.loads((pickled / "config.json").read_text()) | {"model_type": "retromae"}
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ReleaseError, match="no .safetensors weights \\(only pickled pytorch_model.bin\\)"):
        release(pickled, "org/x", dry_run=tmp_path / "repo")


def test_a_releases_config_json_names_no_local_folder_as_a_plain_save_pretrained_does(model_dir, tmp_path, tiny_config):
    """`_name_or_path` is where a model was loaded from; transformers' own `save_pretrained` leaves it out, and so does a release."""
    folder = Path(release(model_dir, "org/tiny-retromae", dry_run=tmp_path / "repo"))  # loaded from run/model to be released
    BertForMaskedLM(tiny_config.encoder).save_pretrained(tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    for written in (model_dir, folder):
        config = json.loads((written / "config.json").read_text())
        assert "_name_or_path" not in config and set(plain) <= set(config), written


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_released_repository_loads_by_repo_id_and_revision_from_an_offline_hub_cache(model_dir, tmp_path, tiny_config, tokenizer):
    first = Path(release(model_dir, "org/tiny-retromae", dry_run=tmp_path / "first"))
    torch.manual_seed(1)
    release_encoder(RetroMAEForPreTraining(tiny_config), tokenizer, tmp_path / "second-model", PRETRAINING)
    second = Path(release(tmp_path / "second-model", "org/tiny-retromae", dry_run=tmp_path / "second"))
    old, new = "1" * 40, "2" * 40
    cache = tmp_path / "hub-cache"
    place_in_hub_cache(cache, "org/tiny-retromae", {old: first, new: second}, main=new)

    expected = {
        None: cls_embeddings(BertModel.from_pretrained(second, add_pooling_layer=False), tokenizer),
        old: cls_embeddings(BertModel.from_pretrained(first, add_pooling_layer=False), tokenizer),
    }
    assert not torch.allclose(expected[None], expected[old])
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    for revision, embeddings in expected.items():
        model = AutoModel.from_pretrained("org/tiny-retromae", trust_remote_code=True, cache_dir=cache, revision=revision)
        with torch.no_grad():
            assert torch.allclose(model.eval()(**inputs).sentence_embedding, embeddings, atol=1e-5)
        encoder = SentenceTransformer("org/tiny-retromae", trust_remote_code=True, cache_folder=str(cache), revision=revision)
        assert torch.allclose(encoder.encode(TEXTS, convert_to_tensor=True), embeddings, atol=1e-5)


def test_convert_keeps_a_bert_for_masked_lm_and_exports_back_to_plain_bert(tmp_path, tiny_config, tokenizer):
    torch.manual_seed(0)
    bert = BertForMaskedLM(tiny_config.encoder)
    bert.save_pretrained(tmp_path / "authors")
    tokenizer.save_pretrained(tmp_path / "authors")
    assert convert(str(tmp_path / "authors"), tmp_path / "converted") is True

    converted = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True)
    assert type(converted).__name__ == "RetroMAEModel"
    expected = cls_embeddings(bert.bert, tokenizer)
    assert torch.equal(cls_embeddings(converted, tokenizer), expected)
    head = AutoModelForMaskedLM.from_pretrained(tmp_path / "converted", trust_remote_code=True).cls.predictions.transform.dense.weight
    assert torch.equal(head, bert.cls.predictions.transform.dense.weight)
    assert files_in(Path(release(tmp_path / "converted", "org/converted", dry_run=tmp_path / "repo"))) == EXPECTED_FILES

    export_plain(str(tmp_path / "converted"), tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "bert" and "auto_map" not in config
    assert not list((tmp_path / "plain").glob("*.py"))
    assert torch.equal(cls_embeddings(BertModel.from_pretrained(tmp_path / "plain", add_pooling_layer=False), tokenizer), expected)
    plain_head = BertForMaskedLM.from_pretrained(tmp_path / "plain").cls.predictions.transform.dense.weight  # the head, with no remote code
    assert torch.equal(plain_head, bert.cls.predictions.transform.dense.weight)


def test_convert_real_minilm_weights_gives_identical_encoder_outputs(tmp_path, tokenizer):
    assert convert(MINILM_PATH, tmp_path / "converted") is False  # a bare BertModel: no MLM head to keep
    expected = BertModel.from_pretrained(MINILM_PATH, add_pooling_layer=False).eval()
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = expected(**inputs).last_hidden_state
        converted = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True).eval()(**inputs).last_hidden_state
    assert torch.allclose(converted, reference, atol=1e-6)
    export_plain(str(tmp_path / "converted"), tmp_path / "plain")
    with torch.no_grad():
        plain = BertModel.from_pretrained(tmp_path / "plain", add_pooling_layer=False).eval()(**inputs).last_hidden_state
    assert torch.allclose(plain, reference, atol=1e-6)


@pytest.mark.parametrize(
    "source, message",
    [("missing-folder", "missing-folder: no such file or folder"), ("gpt2", "holds a 'gpt2' model; expected one of bert, roberta")],
)
def test_convert_refuses_what_is_not_a_supported_encoder(tmp_path, source, message):
    if source == "gpt2":
        (tmp_path / source).mkdir()
        (tmp_path / source / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ReleaseError, match=message):
        convert(str(tmp_path / source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Tools a reader could take the card to promise; the card may name only those the card's own blocks run
# (`test_every_python_block_of_the_card_runs_as_written`): transformers' AutoModel and sentence-transformers.
UNTESTED_TOOLS = ("text-embeddings-inference", "TEI", "vLLM", "Infinity", "ONNX", "OpenVINO", "Optimum", "TensorRT", "llama.cpp", "Ollama")


def test_the_card_says_where_its_figures_come_from_and_names_only_tested_tools(monkeypatch, capsys):
    evaluation = {"data": "scifact", "split": "test", "ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 0.5}
    card = model_card("org/tiny-retromae", evaluations=[evaluation]).text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = capsys.readouterr().out
    for text in (card, help_text):
        assert "pytrec_eval" in text and "InformationRetrievalEvaluator" not in text
    assert not [tool for tool in UNTESTED_TOOLS if re.search(rf"\b{re.escape(tool)}\b", card, flags=re.I)]
    assert {"AutoModel", "sentence-transformers"} <= set(re.findall(r"AutoModel|sentence-transformers", card))

    scored = []

    class Spy(pytrec_eval.RelevanceEvaluator):
        def evaluate(self, run):
            scored.append(run)
            return super().evaluate(run)

    monkeypatch.setattr(evaluate_module.pytrec_eval, "RelevanceEvaluator", Spy)
    ranking = {"q1": {"d1": 0.9, "d2": 0.1}, "q2": {"d1": 0.8, "d2": 0.7}}
    monkeypatch.setattr(evaluate_module, "rank", lambda model, task, batch_size: ranking)
    task = evaluate_module.RetrievalTask(corpus={"d1": "a", "d2": "b"}, queries={"q1": "x", "q2": "y"}, relevant={"q1": {"d1": 1}, "q2": {"d2": 2}})
    figures = evaluate_module.evaluate(None, task)
    assert scored and figures["mrr@10"] == pytest.approx((1 + 1 / 2) / 2) and figures["recall@100"] == 1.0


def test_one_test_says_what_is_a_hub_id_for_models_corpora_and_the_card(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert is_hub_id("org/name") and is_hub_id("bert-base-uncased")
    assert not any(is_hub_id(name) for name in ("fresh tiny BERT", "a/b/c", "./x", str(tmp_path / "org" / "local")))
    assert [public_name(name) for name in ("org/name", str(tmp_path / "org" / "local"))] == ["org/name", "local"]
    assert resolve_corpus("wikimedia/wikipedia").hub_id == "wikimedia/wikipedia"
    assert model_card("org/x", {"base_model": str(tmp_path / "org" / "local")}).data.base_model is None
    assert model_card("org/x", {"base_model": "org/base"}).data.base_model == "org/base"
