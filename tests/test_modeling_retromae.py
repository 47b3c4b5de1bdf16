"""The model against the spec: a hand-computed reference loss, training, attention backends."""

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import datasets
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, BertModel, RobertaConfig, Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from retromae import RetroMAECollator, RetroMAEConfig, RetroMAEForMaskedLM, RetroMAEForPreTraining, RetroMAEModel, modeling_retromae
from retromae.configuration_retromae import RETROMAE_FIELDS
from retromae.model_folder import load_encoder
from retromae.modeling_retromae import RELEASED_ENCODERS

from conftest import MINILM_PATH, TEXTS, UNKNOWN_TEXTS
from families import FAMILIES, VOCAB_SIZE, tiny_config as family_config
from helpers import assert_same_loss_and_gradients, layer_norm, linear, reference_losses


# Releases written before the release classes were declared (see the test that reads them).
OLD_RELEASES = Path(__file__).parent / "old_releases"


def reference_bow_loss(model, batch, special_ids):
    """
    DupMAE's bag-of-words loss as the authors write it: full MLM logits of the encoder, -1000 at padding,
    the maximum over positions 1..L-1, log-softmax, and a target built token by token as their collator does.
    """
    hidden = model.encoder.bert(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
    head = model.encoder.cls.predictions
    transformed = layer_norm(F.gelu(linear(hidden, head.transform.dense)), head.transform.LayerNorm)
    logits = transformed @ model.encoder.bert.embeddings.word_embeddings.weight.T + head.bias  # (batch, seq, vocab)
    padding = (1 - batch["encoder_attention_mask"][:, 1:, None].float()) * -1000
    scores = (logits[:, 1:] + padding).max(dim=1).values  # (batch, vocab)
    target = torch.zeros_like(scores)
    for row, (ids, mask) in enumerate(zip(batch["decoder_input_ids"].tolist(), batch["encoder_attention_mask"].tolist())):
        passage = [token for token, real in zip(ids, mask) if real and token not in special_ids]
        for token in passage:
            target[row, token] = 1 / len(passage)
    return torch.mean(-torch.sum(target * F.log_softmax(scores, dim=-1), dim=1))


@pytest.fixture
def dupmae_config(tiny_config):
    tiny_config.objective = "dupmae"
    tiny_config.bow_loss_weight = 0.1
    return tiny_config


def test_dupmae_losses_and_gradients_match_a_hand_computed_reference(dupmae_config, tokenizer, batch):
    assert (batch["encoder_attention_mask"] == 0).any(), "the batch must hold padding"
    model = RetroMAEForPreTraining(dupmae_config).eval()
    output = model(**batch)
    output.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    encoder_loss, decoder_loss = reference_losses(model, batch)
    bow_loss = reference_bow_loss(model, batch, set(tokenizer.all_special_ids))
    (encoder_loss + decoder_loss + 0.1 * bow_loss).backward()
    assert output.bow_loss.item() == pytest.approx(bow_loss.item(), abs=1e-5)
    assert output.decoder_loss.item() == pytest.approx(decoder_loss.item(), abs=1e-5)
    assert output.loss.item() == pytest.approx((encoder_loss + decoder_loss + 0.1 * bow_loss).item(), abs=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bow_loss_is_absent_from_retromae_and_grows_the_dupmae_loss_by_its_weight(tiny_config, dupmae_config, batch):
    torch.manual_seed(0)
    dupmae = RetroMAEForPreTraining(dupmae_config).eval()
    retromae = RetroMAEForPreTraining(RetroMAEConfig(**(dupmae_config.to_dict() | {"objective": "retromae"}))).eval()
    retromae.load_state_dict(dupmae.state_dict())
    with torch.no_grad():
        plain, dup = retromae(**batch), dupmae(**batch)
    assert plain.bow_loss is None
    assert torch.equal(plain.encoder_loss, dup.encoder_loss)
    assert torch.equal(dup.loss, dup.encoder_loss + dup.decoder_loss + 0.1 * dup.bow_loss)


def test_bow_maximum_in_chunks_gives_the_whole_maximum_loss_and_gradients(dupmae_config, batch, monkeypatch):
    model = RetroMAEForPreTraining(dupmae_config).eval()
    whole = model(**batch).bow_loss
    whole.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.zero_grad()
    batch_size, vocab = batch["encoder_input_ids"].shape[0], dupmae_config.encoder.vocab_size
    monkeypatch.setattr(modeling_retromae, "LOGITS_CHUNK", batch_size * vocab * 3)  # 3 positions a chunk
    chunked = model(**batch).bow_loss
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)
    for name, gradient in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_the_dupmae_page_example_runs_as_written(capsys):
    page = (Path(__file__).resolve().parent.parent / "docs" / "dupmae.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(block.replace('"bert-base-uncased"', repr(MINILM_PATH)), {})
    assert "tensor(" in capsys.readouterr().out


def test_bag_of_words_target_weighs_distinct_tokens_by_one_over_the_passage_length():
    labels = torch.tensor([[-100, 5, 7, 5, 2, -100, -100], [-100, 3, -100, -100, -100, -100, -100]])
    target = modeling_retromae.bag_of_words_target(labels, 9)
    expected = torch.zeros(2, 9)
    expected[0, [5, 7, 2]] = 0.25
    expected[1, 3] = 1.0
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("texts", [TEXTS, UNKNOWN_TEXTS + TEXTS[:2]], ids=["text", "with-unknown-tokens"])
@pytest.mark.parametrize("enhanced_decoding", [True, False], ids=["enhanced-decoding", "ablation"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_losses_match_a_hand_computed_reference(tokenizer, tiny_config, attn_implementation, enhanced_decoding, texts):
    tiny_config.enhanced_decoding = enhanced_decoding
    batch = RetroMAECollator(tokenizer, max_length=64, seed=0, enhanced_decoding=enhanced_decoding)(texts)
    model = RetroMAEForPreTraining._from_config(tiny_config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        output = model(**batch)
        encoder_loss, decoder_loss = reference_losses(model, batch)
    assert output.encoder_loss.item() == pytest.approx(encoder_loss.item(), abs=1e-5)
    assert output.decoder_loss.item() == pytest.approx(decoder_loss.item(), abs=1e-5)
    assert output.loss.item() == pytest.approx((encoder_loss + decoder_loss).item(), abs=1e-5)


def test_a_batch_of_nothing_but_unknown_tokens_trains_the_decoder(tiny_config, tokenizer):
    """Emoji-only lines and over-long "words" are all [UNK]: the encoder has nothing to rebuild (loss 0), the decoder every [UNK]."""
    batch = RetroMAECollator(tokenizer, max_length=64, seed=0)([UNKNOWN_TEXTS[0], UNKNOWN_TEXTS[3]])
    assert (batch["encoder_labels"] == -100).all() and (batch["decoder_labels"] == tokenizer.unk_token_id).sum() == 3
    model = RetroMAEForPreTraining(tiny_config).train()
    output = model(**batch)
    assert output.encoder_loss.item() == 0.0
    assert output.decoder_loss.item() == pytest.approx(math.log(tiny_config.encoder.vocab_size), rel=0.05)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for name in ("decoder.layers.0.attention.self.query.weight", "encoder.bert.encoder.layer.1.output.dense.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_untrained_losses_are_near_log_vocabulary(tiny_config, batch):
    output = RetroMAEForPreTraining(tiny_config).eval()(**batch)
    expected = math.log(tiny_config.encoder.vocab_size)
    assert output.encoder_loss.item() == pytest.approx(expected, rel=0.05)
    assert output.decoder_loss.item() == pytest.approx(expected, rel=0.05)


def test_logits_are_returned_only_when_asked(tiny_config, batch):
    model = RetroMAEForPreTraining(tiny_config).eval()
    plain = model(**batch)
    assert plain.encoder_logits is None and plain.decoder_logits is None
    asked = model(**batch, return_logits=True)
    batch_size, seq = batch["decoder_input_ids"].shape
    assert asked.decoder_logits.shape == (batch_size, seq, tiny_config.encoder.vocab_size)
    full_loss = F.cross_entropy(asked.decoder_logits.flatten(0, 1), batch["decoder_labels"].flatten(), ignore_index=-100)
    assert asked.decoder_loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
    assert torch.equal(asked.loss, plain.loss)


def test_word_embeddings_and_mlm_decoder_are_tied(tiny_config):
    model = RetroMAEForPreTraining(tiny_config)
    assert model.encoder.cls.predictions.decoder.weight is model.encoder.bert.embeddings.word_embeddings.weight
    assert model.get_output_embeddings() is model.encoder.cls.predictions.decoder


def test_one_optimizer_step_lowers_the_loss_and_reaches_encoder_and_decoder(tiny_config, batch):
    model = RetroMAEForPreTraining(tiny_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model(**batch)
    before.loss.backward()
    for name in (
        "encoder.bert.embeddings.word_embeddings.weight",
        "encoder.bert.embeddings.position_embeddings.weight",
        "encoder.bert.encoder.layer.0.attention.self.query.weight",
        "encoder.bert.encoder.layer.1.output.dense.weight",
        "decoder.layers.0.attention.self.query.weight",
        "decoder.layers.0.attention.self.key.weight",
        "decoder.layers.0.output.dense.weight",
        "encoder.cls.predictions.transform.dense.weight",
    ):
        gradient = model.get_parameter(name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    optimizer.step()
    after = model(**batch)
    assert after.encoder_loss < before.encoder_loss
    assert after.decoder_loss < before.decoder_loss


def test_decoder_loss_flows_into_the_sentence_embedding(tiny_config, batch):
    """The decoder only sees the encoder through h_X: its loss must train the last encoder layer's [CLS]."""
    model = RetroMAEForPreTraining(tiny_config)
    model(**batch).decoder_loss.backward()
    assert model.encoder.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0


def test_sdpa_and_eager_give_the_same_losses(tiny_config, batch):
    sdpa = RetroMAEForPreTraining._from_config(tiny_config, attn_implementation="sdpa").eval()
    eager = RetroMAEForPreTraining._from_config(tiny_config, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa(**batch).loss.item() == pytest.approx(eager(**batch).loss.item(), abs=1e-5)


def test_flash_attention_is_refused_with_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="(?i)flash"):
        RetroMAEForPreTraining._from_config(tiny_config, attn_implementation="flash_attention_2")


def test_the_encoder_takes_flex_attention_and_the_decoder_stays_on_sdpa(tiny_config, tokenizer):
    """The dict form gives the encoder its family's kernel; on CPU flex attention runs forward only (torch has no backward there).

    The batch has no padding: torch 2.13's CPU flex kernel returns NaN, at random from call to
    call, for rows that end in padding (a plain `BertModel` shows it too); pretrain refuses flex
    attention without CUDA, so only this test meets it.
    """
    batch = RetroMAECollator(tokenizer, max_length=16, seed=0)(TEXTS[:4])
    assert batch["encoder_attention_mask"].all()
    sdpa = RetroMAEForPreTraining._from_config(tiny_config, attn_implementation="sdpa").eval()
    flex = RetroMAEForPreTraining._from_config(tiny_config, attn_implementation={"": "sdpa", "encoder": "flex_attention"}).eval()
    flex.load_state_dict(sdpa.state_dict())
    assert (flex.encoder.config._attn_implementation, flex.decoder.config._attn_implementation) == ("flex_attention", "sdpa")
    with torch.no_grad():
        torch.testing.assert_close(flex(**batch).loss, sdpa(**batch).loss, atol=1e-5, rtol=1e-5)  # two float32 kernels: they agree to about 2e-6 of the loss


def test_a_checkpoint_loads_with_one_kernel_for_the_encoder_and_another_for_the_decoder(tiny_config, tmp_path):
    RetroMAEForPreTraining(tiny_config).encoder.save_pretrained(tmp_path)
    model = RetroMAEForPreTraining.from_pretrained(tmp_path, attn_implementation={"": "sdpa", "encoder": "eager"})
    assert (model.encoder.config._attn_implementation, model.decoder.config._attn_implementation) == ("eager", "sdpa")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, batch):
    plain = RetroMAEForPreTraining(tiny_config).train()
    checkpointed = RetroMAEForPreTraining(tiny_config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.decoder.gradient_checkpointing
    assert_same_loss_and_gradients(plain, checkpointed, batch, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss_and_gradients(tiny_config, batch):
    eager = RetroMAEForPreTraining(tiny_config).train()
    compiled = RetroMAEForPreTraining(tiny_config).train()
    compiled.load_state_dict(eager.state_dict())
    assert_same_loss_and_gradients(eager, compiled, batch, atol=1e-5, other_forward=torch.compile(compiled))


def test_more_decoder_layers_are_built_and_trained(tiny_config, batch):
    tiny_config.num_decoder_layers = 2
    model = RetroMAEForPreTraining(tiny_config)
    assert len(model.decoder.layers) == 2
    model(**batch).loss.backward()
    assert model.decoder.layers[0].attention.self.query.weight.grad.abs().sum() > 0


def test_sentence_embedding_is_the_final_cls_state(tiny_config, batch):
    model = RetroMAEModel(tiny_config.encoder).eval()
    output = model(batch["decoder_input_ids"], attention_mask=batch["encoder_attention_mask"])
    assert torch.equal(output.sentence_embedding, output.last_hidden_state[:, 0])
    pretraining = RetroMAEForPreTraining(tiny_config).eval()
    pretraining.encoder.bert.load_state_dict(model.state_dict())
    assert torch.allclose(pretraining(**batch).sentence_embedding, model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).sentence_embedding)


def test_encoder_is_bert_with_the_same_weights(tiny_config, batch):
    model = RetroMAEModel(tiny_config.encoder).eval()
    bert = BertModel(tiny_config.encoder, add_pooling_layer=False).eval()
    missing, unexpected = bert.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    ids, mask = batch["decoder_input_ids"], batch["encoder_attention_mask"]
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, bert(ids, attention_mask=mask).last_hidden_state)


def test_hidden_states_and_tuples_are_returned_as_transformers_users_expect(tiny_config, batch):
    model = RetroMAEModel(tiny_config.encoder).eval()
    ids = batch["decoder_input_ids"]
    output = model(ids, output_hidden_states=True)
    assert len(output.hidden_states) == tiny_config.encoder.num_hidden_layers + 1
    as_tuple = model(ids, return_dict=False)
    assert torch.equal(as_tuple[0], output.last_hidden_state)


def test_collated_text_of_different_lengths_trains_in_bf16(tiny_config, tokenizer):
    model = RetroMAEForPreTraining(tiny_config).to(torch.bfloat16)
    batch = RetroMAECollator(tokenizer, seed=1)(TEXTS[:3])
    output = model(**batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()


def test_a_bf16_autocast_step_gives_the_float32_losses_and_gradients(tiny_config, batch, tokenizer, monkeypatch):
    """
    bf16 keeps 8 bits of mantissa (2**-9 relative rounding per operation); with the head's
    logits and gradient sums and the decoder's shared keys and values in float32, a step's losses
    agree with float32's to 1e-3 relative and every gradient to 5% of its norm. Key biases are
    left out: their true gradient is zero (softmax ignores a constant added to a row's scores).
    """
    monkeypatch.setattr(modeling_retromae, "DECODER_BLOCK_SCORES", 4 * 4 * 64 * 8)  # 8 rows a block
    monkeypatch.setattr(modeling_retromae, "LOGITS_CHUNK", 16 * len(tokenizer))  # 16 labelled rows a chunk
    model = RetroMAEForPreTraining(tiny_config).train()
    float32 = model(**batch)
    float32.loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if not name.endswith("key.bias")}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(**batch)
        key, value = model.decoder.layers[0].attention.self.keys_values(torch.randn(2, 5, tiny_config.encoder.hidden_size))
    bf16.loss.backward()
    assert key.dtype == value.dtype == torch.float32
    for name in ("encoder_loss", "decoder_loss"):
        assert getattr(bf16, name).item() == pytest.approx(getattr(float32, name).item(), rel=1e-3)
    for name, parameter in model.named_parameters():
        if name in expected:
            error = (parameter.grad - expected[name]).norm() / expected[name].norm()
            assert error < 0.05, f"{name}: bf16 gradient off by {error:.3f} of its norm"


def test_trainer_counts_the_flops_and_tokens_of_a_pretraining_batch(tiny_config, batch, tmp_path, no_transformers_warnings):
    model = RetroMAEForPreTraining(tiny_config)
    assert model.main_input_name == "encoder_input_ids"
    arguments = TrainingArguments(tmp_path, use_cpu=True, report_to="none", include_num_input_tokens_seen="all")
    trainer = Trainer(model=model, args=arguments)
    tokens = batch["encoder_input_ids"].numel()
    assert trainer.floating_point_ops(batch) == 6 * tokens * model.num_parameters(exclude_embeddings=True)
    trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == tokens


def test_encoder_forward_takes_transformers_typed_keyword_arguments(tiny_config, batch):
    assert inspect.signature(RetroMAEModel.forward).parameters["kwargs"].annotation == Unpack[TransformersKwargs]
    model = RetroMAEModel(tiny_config.encoder).eval()
    model.set_attn_implementation("eager")
    output = model(batch["decoder_input_ids"], output_attentions=True, output_hidden_states=True)
    assert len(output.attentions) == len(output.hidden_states) - 1 == tiny_config.encoder.num_hidden_layers


def test_encoder_classes_are_built_from_a_retromae_config_as_in_earlier_versions(tiny_config, batch):
    """`RetroMAEModel(RetroMAEConfig(vocab_size=...))` builds the BERT encoder the config describes, with RetroMAE's settings."""
    ids = batch["decoder_input_ids"]
    for encoder_class, width in ((RetroMAEModel, tiny_config.encoder.hidden_size), (RetroMAEForMaskedLM, tiny_config.encoder.vocab_size)):
        model = encoder_class(tiny_config).eval()
        assert model.config.to_dict() | {"architectures": None} == tiny_config.encoder.to_dict() | {"architectures": None} | {
            name: getattr(tiny_config, name) for name in RETROMAE_FIELDS
        }
        states = model(ids)[0]  # the final hidden states, or the MLM head's logits
        assert states.shape == (*ids.shape, width) and torch.isfinite(states).all()


def test_an_encoder_class_refuses_a_retromae_config_of_another_family():
    config = RetroMAEConfig(encoder=RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="'bert' encoder; the RetroMAEConfig describes a 'roberta' one"):
        RetroMAEModel(config)


def test_resizing_the_vocabulary_keeps_the_mlm_head_tied_to_the_embeddings(tiny_config, batch):
    """Domain tokens added before pre-training: `resize_token_embeddings` grows the encoder, and the shared head reads the new rows."""
    model = RetroMAEForPreTraining(tiny_config)
    new_token = len(model.get_input_embeddings().weight)
    embeddings = model.resize_token_embeddings(new_token + 2)
    weight, bias = model.family.head_output(model.encoder)
    assert weight is embeddings.weight and weight.shape[0] == len(bias) == model.config.encoder.vocab_size == new_token + 2
    batch = batch | {"decoder_input_ids": batch["decoder_input_ids"].clone(), "decoder_labels": batch["decoder_labels"].clone()}
    batch["decoder_input_ids"][0, 1] = batch["decoder_labels"][0, 1] = new_token
    model(**batch).loss.backward()
    assert embeddings.weight.grad[new_token].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_forward_has_the_familys_signature_which_transformers_reads(family, tmp_path):
    """`main_input_name` checks, `inputs_embeds` and the Trainer's `remove_unused_columns` read `forward`'s signature."""
    config = family_config(family, VOCAB_SIZE)
    model = RELEASED_ENCODERS[family][0](config).eval()
    family_forward = inspect.signature(MODEL_MAPPING[type(config)].forward)
    assert list(inspect.signature(model.forward).parameters)[0] == model.main_input_name == "input_ids"
    assert inspect.signature(type(model).forward).parameters == family_forward.parameters

    ids = torch.tensor([[2, 7, 8, 9, 3]])
    with torch.no_grad():
        from_embeddings = model(inputs_embeds=model.get_input_embeddings()(ids)).sentence_embedding
        torch.testing.assert_close(from_embeddings, model(ids).sentence_embedding)

    rows = datasets.Dataset.from_dict({"input_ids": ids.tolist() * 2, "attention_mask": [[1] * 5] * 2, "text": ["a", "b"]})
    arguments = TrainingArguments(tmp_path, use_cpu=True, report_to="none", per_device_train_batch_size=2)
    loaded = next(iter(Trainer(model=model, args=arguments, train_dataset=rows).get_train_dataloader()))
    assert set(loaded) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("family", list(modeling_retromae.ENCODER_FAMILIES))
def test_every_family_has_both_release_classes_declared_and_its_releases_name_them(family, tmp_path):
    """Each family's two classes are `class` statements of the file (for readers, IDEs and `grep`), exported, and in `auto_map`."""
    source = Path(modeling_retromae.__file__).read_text()
    classes = RELEASED_ENCODERS[family]
    for release_class, family_class in zip(classes, modeling_retromae.family_classes(family)):
        assert f"\nclass {release_class.__name__}(" in source and release_class.__name__ in modeling_retromae.__all__
        assert getattr(modeling_retromae, release_class.__name__) is release_class and release_class.__bases__[-1] is family_class
    RetroMAEForPreTraining(RetroMAEConfig(encoder=family_config(family, VOCAB_SIZE))).released_encoder().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoModel": f"modeling_retromae.{classes[0].__name__}", "AutoModelForMaskedLM": f"modeling_retromae.{classes[1].__name__}"}


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_a_release_written_before_the_classes_were_declared_loads_and_saves_as_it_was(family, tmp_path):
    """
    tests/old_releases holds tiny releases (config.json and weights) that `released_encoder().save_pretrained` wrote
    when the release classes were made by a factory: the classes their `auto_map` names exist, the declared classes
    load them and embed as the family's own class does, and save them again with the same weights and RetroMAE keys.
    """
    folder = OLD_RELEASES / family
    written = json.loads((folder / "config.json").read_text())
    assert all(name.removeprefix("modeling_retromae.") in modeling_retromae.__all__ for name in written["auto_map"].values())
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 9, 10, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        embedding = load_encoder(folder, with_mlm_head=False)(ids, attention_mask=mask).sentence_embedding
        own = AutoModel.from_pretrained(folder)(ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(embedding, own, atol=0, rtol=0)
    load_encoder(folder).save_pretrained(tmp_path)  # in today's layout: the base model, the MLM head beside it
    saved = json.loads((tmp_path / "config.json").read_text())
    kept = ["model_type", "auto_map", *RETROMAE_FIELDS]
    assert {key: saved[key] for key in kept} == {key: written[key] for key in kept}
    assert saved["architectures"] == [type(AutoModel.from_config(AutoConfig.from_pretrained(folder))).__name__]
    before = load_file(folder / "model.safetensors")
    after = load_file(tmp_path / "model.safetensors") | load_file(tmp_path / "retromae_parts.safetensors")
    prefix = "roberta." if family == "xlm-roberta" else f"{family}."
    renamed = {name.removeprefix(prefix) if name.startswith(prefix) else f"encoder.{name}": tensor for name, tensor in before.items()}
    assert all(torch.equal(renamed[name], after[name]) for name in renamed if name in after)
    tied = {name for name in renamed if name not in after}
    assert all("decoder.weight" in name for name in tied), tied  # the output projection: the word embeddings themselves


@pytest.mark.parametrize("family", [family for family in FAMILIES if not modeling_retromae.ENCODER_FAMILIES[family].rotary])
def test_inputs_embeds_give_the_states_the_familys_own_class_gives(family):
    """
    transformers' `test_inputs_embeds_matches_input_ids` on every family with a position table, and padding besides:
    given `input_ids` or their `inputs_embeds`, the release class numbers positions as the family's own class does
    (RoBERTa's from `input_ids` skip padding, from `inputs_embeds` they cannot), so its states are that class's, bit for bit.
    """
    config = family_config(family, VOCAB_SIZE)
    release = RELEASED_ENCODERS[family][0](config).eval()
    own = MODEL_MAPPING[type(config)](config, **({"add_pooling_layer": False} if modeling_retromae.builds_pooler(family) else {})).eval()
    own.load_state_dict(release.state_dict())
    torch.manual_seed(0)
    ids = torch.randint(config.pad_token_id + 1, VOCAB_SIZE, (13, 7))
    padded = ids.clone()
    padded[0, 3], padded[1, 5:] = config.pad_token_id, config.pad_token_id  # padding inside a row and at its end
    with torch.no_grad():
        for inputs in (ids, padded):
            mask = (inputs != config.pad_token_id).long()
            for route in ({"input_ids": inputs}, {"inputs_embeds": own.get_input_embeddings()(inputs)}):
                expected = own(**route, attention_mask=mask).last_hidden_state
                torch.testing.assert_close(release(**route, attention_mask=mask).last_hidden_state, expected, rtol=0, atol=0)
        from_embeddings = release(inputs_embeds=release.get_input_embeddings()(ids)).last_hidden_state
        torch.testing.assert_close(from_embeddings, release(ids).last_hidden_state)


@pytest.mark.parametrize("model_enhanced, collator_enhanced", [(False, True), (True, False)])
def test_a_batch_and_a_config_that_disagree_on_enhanced_decoding_are_refused(tiny_config, tokenizer, model_enhanced, collator_enhanced):
    """An ablation model fed enhanced-decoding batches would learn to copy its unmasked input, in silence."""
    tiny_config.enhanced_decoding = model_enhanced
    batch = RetroMAECollator(tokenizer, max_length=32, seed=0, enhanced_decoding=collator_enhanced)(TEXTS[:2])
    with pytest.raises(ValueError, match=rf"config has enhanced_decoding={model_enhanced}: build the collator with RetroMAECollator.from_config"):
        RetroMAEForPreTraining(tiny_config)(**batch)


@pytest.mark.parametrize("enhanced_decoding", [True, False], ids=["enhanced-decoding", "ablation"])
def test_a_collator_from_the_config_makes_the_batches_its_model_reads(tiny_config, tokenizer, enhanced_decoding):
    tiny_config.enhanced_decoding, tiny_config.encoder_mask_ratio, tiny_config.decoder_mask_ratio = enhanced_decoding, 0.2, 0.6
    collator = RetroMAECollator.from_config(tiny_config, tokenizer, max_length=32, seed=0)
    assert (collator.encoder_mask_ratio, collator.decoder_mask_ratio, collator.enhanced_decoding) == (0.2, 0.6, enhanced_decoding)
    assert torch.isfinite(RetroMAEForPreTraining(tiny_config)(**collator(TEXTS[:2])).loss)
