"""RetroMAELoss inside SentenceTransformerTrainer: the same loss as RetroMAEForPreTraining, checkpoints, resume, the example of docs/sentence-transformers.md."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

from retromae import RetroMAECollator, RetroMAEForPreTraining, RetroMAELoss
from retromae.losses import LOSS_FOLDER

from families import CORPUS, FAMILIES, build_checkpoint
from helpers import cls_model, train_with_retromae_loss

EXAMPLE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "sentence-transformers.md"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of every family (their ...ForMaskedLM layout, MLM head included), each with its tokenizer."""
    root = tmp_path_factory.mktemp("loss-checkpoints")
    for family in FAMILIES:
        build_checkpoint(family, root / family)
    return root


def without_dropout(module):
    for submodule in module.modules():
        if isinstance(submodule, torch.nn.Dropout):
            submodule.p = 0.0
    return module


@pytest.mark.parametrize("objective", ["retromae", "dupmae"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_retromae_for_pretraining_on_the_same_weights_and_masks(family, objective, checkpoints):
    torch.manual_seed(0)
    model = cls_model(checkpoints / family)
    settings = {"objective": objective, "bow_loss_weight": 0.2}
    loss = without_dropout(RetroMAELoss(model, seed=3, **settings))
    reference = without_dropout(RetroMAEForPreTraining.from_pretrained(str(checkpoints / family), **settings))
    reference.decoder.load_state_dict(loss.retromae.decoder.state_dict())
    missing, _ = reference.encoder.load_state_dict(loss.retromae.encoder.state_dict(), strict=False)
    assert not missing
    features = model.preprocess(CORPUS[:4])
    losses = loss([features])
    ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
    batch = RetroMAECollator(model.tokenizer, max_length=64, seed=3)(ids)
    expected = reference(**batch)
    assert losses["encoder_loss"].item() == pytest.approx(expected.encoder_loss.item(), abs=1e-5)
    assert losses["decoder_loss"].item() == pytest.approx(expected.decoder_loss.item(), abs=1e-5)
    if objective == "dupmae":
        assert losses["bow_loss"].item() == pytest.approx(0.2 * expected.bow_loss.item(), abs=1e-5)
    else:
        assert "bow_loss" not in losses and expected.bow_loss is None


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_the_encoder_is_the_models_own_and_the_head_is_the_checkpoints(family, checkpoints):
    model = cls_model(checkpoints / family)
    loss = RetroMAELoss(model)
    backbone = model[0].auto_model
    assert loss.retromae.encoder.base_model is backbone
    assert loss.retromae.get_output_embeddings().weight is backbone.get_input_embeddings().weight  # tied as the family ties
    saved = load_file(checkpoints / family / "model.safetensors")
    head = {name: tensor for name, tensor in saved.items() if not name.startswith(loss.retromae.encoder.base_model_prefix + ".")}
    own = loss.retromae.encoder.state_dict()
    for name, tensor in head.items():
        torch.testing.assert_close(own[name], tensor, atol=0, rtol=0)
    names = set(loss.own_parameters())
    assert names and all(name.startswith("decoder.") or name in {f"encoder.{key}" for key in head} for name in names)


@pytest.mark.parametrize(
    "modules, found",
    [
        (lambda transformer, dim: [transformer, Pooling(dim, pooling_mode="mean")], "Pooling(mean)"),
        (lambda transformer, dim: [transformer, Pooling(dim, pooling_mode="cls"), Normalize()], "Normalize"),
        (lambda transformer, dim: [transformer], "no pooling"),
    ],
)
def test_a_model_whose_embedding_is_not_the_first_token_is_refused(checkpoints, modules, found):
    transformer = Transformer(str(checkpoints / "bert"))
    model = SentenceTransformer(modules=modules(transformer, transformer.get_embedding_dimension()))
    with pytest.raises(ValueError, match=rf"first token's final state.*{re.escape(found)}"):
        RetroMAELoss(model)


def test_trainer_trains_decoder_and_encoder_and_a_killed_run_resumes_to_the_same_weights(checkpoints, tmp_path):
    folder = checkpoints / "bert"
    whole = train_with_retromae_loss(folder, tmp_path / "whole", max_steps=4)
    assert (tmp_path / "whole" / "checkpoint-2" / LOSS_FOLDER / "model.safetensors").is_file()
    start = RetroMAELoss(cls_model(folder))
    moved = {name: (parameter - start.retromae.get_parameter(name)).abs().max().item() for name, parameter in whole.retromae.named_parameters()}
    assert moved["decoder.layers.0.attention.self.query.weight"] > 0 and moved["encoder.bert.encoder.layer.0.attention.self.query.weight"] > 0

    train_with_retromae_loss(folder, tmp_path / "killed", max_steps=4, crash_at=2)
    resumed = train_with_retromae_loss(folder, tmp_path / "killed", max_steps=4, resume=True)
    for name, parameter in whole.retromae.named_parameters():
        torch.testing.assert_close(resumed.retromae.get_parameter(name), parameter, atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_two_processes_end_with_the_same_weights_decoder_included_and_after_a_resume(checkpoints, tmp_path):
    worker = Path(__file__).resolve().parent / "two_process_loss.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537", str(worker), str(checkpoints / "bert"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    whole = [load_file(tmp_path / f"whole-{rank}.safetensors") for rank in (0, 1)]
    resumed = [load_file(tmp_path / f"resumed-{rank}.safetensors") for rank in (0, 1)]
    start = RetroMAELoss(cls_model(checkpoints / "bert")).retromae
    decoder = "decoder.layers.0.attention.self.query.weight"
    assert not torch.equal(whole[0][decoder], start.get_parameter(decoder))  # the decoder trained
    assert any(name.startswith("encoder.cls.") for name in whole[0])  # the head's own weights are compared too
    for name in whole[0]:
        torch.testing.assert_close(whole[1][name], whole[0][name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(resumed[0][name], whole[0][name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(resumed[1][name], whole[0][name], atol=0, rtol=0, msg=name)


def test_the_callback_clips_the_losss_own_gradients(checkpoints):
    loss = RetroMAELoss(cls_model(checkpoints / "bert"))
    for parameter in loss.own_parameters().values():
        parameter.grad = torch.full_like(parameter, 10.0)
    args = SentenceTransformerTrainingArguments(output_dir="unused", max_grad_norm=1.0, report_to="none")
    loss.checkpoints.on_pre_optimizer_step(args, None, None)
    norm = torch.stack([parameter.grad.norm() for parameter in loss.own_parameters().values()]).norm()
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


def test_resuming_from_a_checkpoint_without_the_decoder_is_an_error(checkpoints, tmp_path):
    train_with_retromae_loss(checkpoints / "bert", tmp_path / "run", max_steps=4, crash_at=2)
    (tmp_path / "run" / "checkpoint-2" / LOSS_FOLDER / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no RetroMAELoss weights"):
        train_with_retromae_loss(checkpoints / "bert", tmp_path / "run", max_steps=4, resume=True)


def loss_example() -> str:
    """The docs' Python block that trains with `RetroMAELoss`."""
    blocks = re.findall(r"```python\n(.*?)```", EXAMPLE_PAGE.read_text(), re.DOTALL)
    return next(block for block in blocks if "RetroMAELoss(model" in block)


@pytest.mark.slow
def test_the_docs_example_runs_as_written_against_a_local_model(checkpoints, tmp_path):
    """The docs' example, with its Hub checkpoint replaced by a local one; the saved model loads with no flag, CLS-pooled."""
    code = loss_example()
    hub_id = re.search(r'checkpoint = "([^"]+)"', code).group(1)
    code = code.replace(f'"{hub_id}"', repr(str(checkpoints / "bert"))).replace("max_steps=1000", "max_steps=3").replace("save_steps=500", "save_steps=2")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=600)
    loaded = subprocess.run(
        [sys.executable, "-c", "from sentence_transformers import SentenceTransformer as S; m = S('retromae-st/model'); "
         "print(type(m[0].auto_model).__name__, m[1].pooling_mode, m.encode(['a b']).shape)"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )
    assert loaded.stdout.split()[:2] == ["BertModel", "cls"], loaded.stdout
    assert (tmp_path / "retromae-st" / "checkpoint-2" / LOSS_FOLDER / "model.safetensors").is_file()
