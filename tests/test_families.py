"""Every supported encoder family, from tiny random checkpoints saved by the family's own classes.

Per family: pre-training through the CLI, the checkpoint's weights carried over (not re-drawn),
a release of the family that loads by every route with no flag, an identical resume, a falling
loss, whole-word masking for its tokenizer kind, and the decoder's position rules.
"""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer, SparseEncoder
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING

from retromae import ENCODER_FAMILIES, EncoderFamily, RetroMAECollator, RetroMAEConfig, RetroMAEForPreTraining, loading, register_family
from retromae.cli import build_parser, main
from retromae.hub import convert, convert_sparse, release
from retromae.model_folder import load_encoder
from retromae.modeling_retromae import RELEASED_ENCODERS, EnhancedDecodingMask, row_problem

from conftest import TEXTS, decoder_mask, write_legacy_checkpoint
from families import CORPUS, FAMILIES, build_checkpoint, build_tokenizer, tiny_config, tiny_family
from helpers import REMOTE_CODE_NOTICE, CrashAfter, load_every_route_of, run_pretraining


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Every family's tiny checkpoint in its `...ForMaskedLM` layout (`<family>`) and its base-model layout (`<family>-base`)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    for family in FAMILIES:
        build_checkpoint(family, folder / family)
        build_checkpoint(family, folder / f"{family}-base", layout="base")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


def family_run(checkpoint, corpus, output_dir, *extra) -> list[str]:
    return [
        "pretrain", "--model", str(checkpoint), "--train-data", str(corpus), "--output-dir", str(output_dir),
        "--max-length", "32", "--batch-size", "4", "--max-steps", "4", "--logging-steps", "2", "--save-steps", "2",
        "--seed", "3", *extra,
    ]


def family_classes(family: str) -> tuple[str, str]:
    config_class = type(AutoConfig.for_model(family))
    return MODEL_MAPPING[config_class].__name__, MODEL_FOR_MASKED_LM_MAPPING[config_class].__name__


@pytest.fixture(scope="module")
def family_releases(checkpoints, corpus, tmp_path_factory) -> dict[str, dict]:
    """Every family pre-trained for 4 steps and released, then loaded by every route in one fresh process: what each run said, its folder, its routes."""
    folder = tmp_path_factory.mktemp("family-releases")
    runs, releases = {}, {}
    for family in FAMILIES:
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            assert main(family_run(checkpoints / family, corpus, folder / family)) == 0
        runs[family] = {"said": said.getvalue(), "model_dir": folder / family / "model"}
        releases[f"org/tiny-{family}"] = Path(release(folder / family / "model", f"org/tiny-{family}", dry_run=folder / f"{family}-release"))
    routes = load_every_route_of(releases, folder)
    return {family: run | {"routes": routes[f"org/tiny-{family}"]} for family, run in runs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pretraining_releases_a_checkpoint_of_the_family_that_loads_by_every_route(family, family_releases):
    said, model_dir, routes = (family_releases[family][key] for key in ("said", "model_dir", "routes"))
    assert f"({family}): encoder from the checkpoint; the decoder (new in RetroMAE) initialised afresh." in said
    base, masked_lm = family_classes(family)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [base]

    remote_model, remote_masked_lm = (f"RetroMAE{name}" for name in (base, masked_lm))
    if family == "bert":
        remote_model, remote_masked_lm = "RetroMAEModel", "RetroMAEForMaskedLM"
    expected_classes = {
        "SentenceTransformer": base, "AutoModel": base, base: base, masked_lm: masked_lm,
        "AutoModel(trust_remote_code=True)": remote_model, "AutoModelForMaskedLM(trust_remote_code=True)": remote_masked_lm,
    }
    assert {route: routes[route]["class"] for route in expected_classes} == expected_classes
    tokenizer, encoder = AutoTokenizer.from_pretrained(model_dir), load_encoder(model_dir, with_mlm_head=False)
    max_seq_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]  # where sentence-transformers truncates
    with torch.no_grad():
        expected = encoder(**tokenizer(TEXTS, padding=True, return_tensors="pt")).sentence_embedding
        truncated = encoder(**tokenizer(TEXTS, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")).sentence_embedding
    for route, result in routes.items():
        if route != "AutoTokenizer":
            torch.testing.assert_close(torch.tensor(result["embedding"]), truncated if route == "SentenceTransformer" else expected, atol=1e-5, rtol=0, msg=route)
        assert not any("to instantiate a model of type" in warning for warning in result["warnings"]), (route, result["warnings"])
    for route in ("SentenceTransformer", "AutoModel", base, "AutoModel(trust_remote_code=True)", "AutoModelForMaskedLM(trust_remote_code=True)"):
        said = [warning for warning in routes[route]["warnings"] if not warning.startswith(REMOTE_CODE_NOTICE)]
        assert said == [], (route, said)  # no load report: the release holds what each of them builds


@pytest.mark.parametrize("layout", ["masked_lm", "base"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_checkpoint_weights_are_carried_over_and_only_the_new_parts_start_fresh(family, layout, checkpoints, capsys):
    checkpoint = checkpoints / (family if layout == "masked_lm" else f"{family}-base")
    model = loading.load_base_model(str(checkpoint), "sdpa", {"encoder_mask_ratio": 0.2})
    said = capsys.readouterr().out
    assert model.config.encoder_mask_ratio == 0.2 and model.config.encoder.model_type == family
    source = AutoModelForMaskedLM.from_pretrained(checkpoint)
    loaded = model.encoder.state_dict()
    for name, tensor in source.state_dict().items():
        if name.startswith(source.base_model_prefix + ".") or layout == "masked_lm":
            torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0, msg=name)
    assert ("the MLM head (the checkpoint has none) initialised afresh" in said) == (layout == "base")
    assert "the decoder (new in RetroMAE) initialised afresh" in said


def test_a_checkpoint_whose_encoder_tensors_do_not_load_is_an_error(checkpoints, corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    build_checkpoint("roberta", broken)
    weights = load_file(broken / "model.safetensors")
    del weights["roberta.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert main(family_run(broken, corpus, tmp_path / "run")) == 2
    assert "lacks 1 encoder tensors of its roberta model (roberta.encoder.layer.1.output.dense.weight" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_decoder_only_model_is_refused_naming_the_families(corpus, tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    assert main(family_run(tmp_path / "gpt2", corpus, tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert f"{', '.join(ENCODER_FAMILIES)}; a 'gpt2' model is not one of them" in error
    assert "Traceback" not in error and not (tmp_path / "run").exists()


def table_rows(page: str, header: str) -> dict[str, list[str]]:
    """The families (`model_type`s in backquotes) that name the rows of the page's table under `header`, with the rows' other cells."""
    text = (ROOT / page).read_text()
    rows = {}
    for line in text[text.index(header) :].split("\n\n")[0].splitlines()[2:]:
        first, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        rows |= {family: cells for family in re.findall(r"`([\w-]+)`", first)}
    return rows


def test_the_tests_the_command_line_and_the_pages_list_the_families_of_encoder_families():
    """One list of families: every other list is read from `ENCODER_FAMILIES`, or held equal to it here."""
    assert FAMILIES == tuple(ENCODER_FAMILIES) == tuple(RELEASED_ENCODERS)
    assert f"({', '.join(ENCODER_FAMILIES)})" in " ".join(build_parser().format_help().split())
    readme = table_rows("README.md", "| `model_type` |")
    assert list(readme) == list(ENCODER_FAMILIES)
    assert all(readme[family][-1].startswith(f"`{RELEASED_ENCODERS[family][0].__name__}`") for family in FAMILIES)
    units = table_rows("docs/scaling-engines.md", "| family (`model_type`) | unit |")
    assert units == {family: [f"`{tiny_family(family).layer}`"] for family in FAMILIES}
    kernels = {family: kernel_cells(loading.supported_attention(family)) for family in FAMILIES}
    assert table_rows("docs/scaling.md", "| family (`model_type`) | sdpa |") == kernels


def kernel_cells(supported: list[str]) -> list[str]:
    """docs/scaling.md's cells for a family whose transformers model takes the `supported` attention kernels: sdpa, eager, flash, flex."""
    flash_and_flex = ["yes" if kernel in supported else "refused" for kernel in ("flash_attention_2", "flex_attention")]
    return ["yes" if "sdpa" in supported else "falls back to eager", "yes", *flash_and_flex]


# MPNet, a masked-LM family outside the table, reads as RoBERTa does: its MLM head and its positions (from padding_idx + 1).
MPNET = ENCODER_FAMILIES["roberta"]


@pytest.fixture
def mpnet_registered():
    register_family("mpnet", MPNET)
    yield
    del ENCODER_FAMILIES["mpnet"], RELEASED_ENCODERS["mpnet"]


def test_a_registered_family_releases_a_checkpoint_of_its_own_without_remote_code(mpnet_registered, tmp_path):
    """The whole round, pre-training included, is docs/families.md's example, which tests/test_docs.py runs."""
    model = RetroMAEForPreTraining(RetroMAEConfig(encoder=tiny_config("mpnet", 100)))
    model.released_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mpnet" and config["architectures"] == ["MPNetModel"] and "auto_map" not in config
    assert not list(tmp_path.glob("*.py"))
    assert type(load_encoder(tmp_path, with_mlm_head=False)).__name__ == "RetroMAEMPNetModel"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_of_the_table_passes_the_check_that_registration_makes(family):
    with torch.device("meta"):
        masked_lm = AutoModelForMaskedLM.from_config(AutoConfig.for_model(family))
    assert row_problem(masked_lm, ENCODER_FAMILIES[family]) is None


WRONG_HEAD = EncoderFamily(head_transform=MPNET.head_transform, head_output=lambda mlm: (mlm.lm_head.dense.weight, None), position_offset=MPNET.position_offset)
MISSING_HEAD = EncoderFamily(head_transform=lambda mlm, states: mlm.cls(states), head_output=MPNET.head_output, position_offset=MPNET.position_offset)


@pytest.mark.parametrize(
    "model_type, row, missing",
    [
        ("gpt2", MPNET, "gpt2 is a decoder-only model, with no masked-LM class (AutoModelForMaskedLM)"),
        ("bart", MPNET, "a bart model is an encoder-decoder"),
        ("xlm", MPNET, "its base model has no embeddings module taking input_ids and inputs_embeds"),
        ("roformer", MPNET, "its embeddings have no position table (position_embeddings) for position_offset"),
        ("mpnet", WRONG_HEAD, "head_transform and head_output give scores of shape (2, 768) for 2 rows, not (2, vocab_size 30527)"),
        ("mpnet", MISSING_HEAD, "its functions fail on a MPNetForMaskedLM (AttributeError: 'MPNetForMaskedLM' object has no attribute 'cls'"),
        ("bert", MPNET, "'bert' is already a family of ENCODER_FAMILIES"),
        ("a-model-type", MPNET, "transformers has no model type 'a-model-type'"),
    ],
)
def test_a_bad_row_is_refused_naming_what_is_missing(model_type, row, missing):
    families = dict(ENCODER_FAMILIES)
    with pytest.raises(ValueError, match=re.escape(f"register_family({model_type!r}): {missing}")):
        register_family(model_type, row)
    assert ENCODER_FAMILIES == families


@pytest.mark.parametrize("family", FAMILIES)
def test_a_killed_run_of_every_family_resumes_to_the_same_weights(family, checkpoints, corpus, tmp_path):
    assert_killed_run_resumes_to_the_same_weights(checkpoints / family, corpus, tmp_path)


# An absolute-position and a rotary family in the quick suite; the others (each ~8 s of CPU) with the slow tests.
DUPMAE_RESUME_FAMILIES = [family if family in ("bert", "deberta-v2") else pytest.param(family, marks=pytest.mark.slow) for family in FAMILIES]


@pytest.mark.parametrize("family", DUPMAE_RESUME_FAMILIES)
def test_a_killed_dupmae_run_of_every_family_resumes_to_the_same_weights(family, checkpoints, corpus, tmp_path, capsys):
    assert_killed_run_resumes_to_the_same_weights(checkpoints / family, corpus, tmp_path, "--objective", "dupmae")
    assert "  bow " in capsys.readouterr().out
    assert json.loads((tmp_path / "killed" / "checkpoint-4" / "config.json").read_text())["objective"] == "dupmae"


def assert_killed_run_resumes_to_the_same_weights(checkpoint: Path, corpus: Path, tmp_path: Path, *extra: str) -> None:
    """A run killed after step 3 and resumed from its checkpoint-2 ends with the weights of the run that was never killed."""
    run_pretraining(family_run(checkpoint, corpus, tmp_path / "whole", "--max-steps", "4", *extra))
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(family_run(checkpoint, corpus, tmp_path / "killed", "--max-steps", "4", *extra), callbacks=[CrashAfter(3)])
    run_pretraining(family_run(checkpoint, corpus, tmp_path / "killed", "--max-steps", "4", "--resume", *extra))
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint-4", tmp_path / "killed" / "checkpoint-4")


def assert_same_checkpoint(expected_folder: Path, actual_folder: Path) -> None:
    expected, actual = load_file(expected_folder / "model.safetensors"), load_file(actual_folder / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_checkpoint_of_an_earlier_version_resumes_to_the_same_weights(tiny_config, tokenizer, corpus, tmp_path):
    """Earlier versions wrote BERT at the top level of checkpoint-N (`bert.`/`cls.` keys, flat config): resuming reads it."""
    run = ["pretrain", "--config", "tiny", "--train-data", str(corpus), "--max-length", "32", "--batch-size", "4",
           "--max-steps", "4", "--save-steps", "2", "--seed", "3"]
    run_pretraining(run + ["--output-dir", str(tmp_path / "whole")])
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(run + ["--output-dir", str(tmp_path / "old")], callbacks=[CrashAfter(3)])
    checkpoint = tmp_path / "old" / "checkpoint-2"
    model = RetroMAEForPreTraining.from_pretrained(checkpoint)
    os.remove(checkpoint / "model.safetensors")
    write_legacy_checkpoint(model, checkpoint)
    assert "bert.embeddings.word_embeddings.weight" in load_file(checkpoint / "model.safetensors")
    run_pretraining(run + ["--output-dir", str(tmp_path / "old"), "--resume"])
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint-4", tmp_path / "old" / "checkpoint-4")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_falls_over_a_few_steps_on_a_repeated_batch(family, checkpoints):
    model = loading.load_base_model(str(checkpoints / family), "sdpa", {}).train()
    batch = RetroMAECollator(build_tokenizer(family, checkpoints / "tokenizer" / family), max_length=32, seed=0)(CORPUS[:8])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((output.encoder_loss.item(), output.decoder_loss.item()))
    assert losses[-1][0] < losses[0][0] and losses[-1][1] < losses[0][1], losses


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_query_stream_numbers_positions_from_padding_idx_plus_one(family, checkpoints):
    model = loading.load_base_model(str(checkpoints / family), "sdpa", {}).eval()
    h_x = torch.randn(2, model.config.encoder.hidden_size)
    first = model.config.encoder.pad_token_id + 1
    table = model.encoder.base_model.embeddings.position_embeddings.weight
    torch.testing.assert_close(model.query_stream(h_x, 10) - h_x[:, None], table[first : first + 10].expand(2, -1, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_row_never_sees_its_own_token(family, checkpoints):
    """Changing token i changes what other rows rebuild, never row i itself (rotary decoders included)."""
    model = loading.load_base_model(str(checkpoints / family), "sdpa" if "sdpa" in loading.supported_attention(family) else "eager", {}).eval()
    assert model.family.rotary == tiny_family(family).rotary
    batch = RetroMAECollator(build_tokenizer(family, checkpoints / "tokenizer" / family), max_length=32, seed=0)(CORPUS[:2])
    h_x = torch.randn(2, model.config.encoder.hidden_size)
    ids, mask = batch["decoder_input_ids"], EnhancedDecodingMask.from_batch(batch)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 7) % model.config.encoder.vocab_size
    with torch.no_grad():
        before, after = model.decode(h_x, ids, mask), model.decode(h_x, changed, mask)
    torch.testing.assert_close(after[:, 5], before[:, 5], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 6:], before[:, 6:], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_spans_are_whole_words_for_every_tokenizer_kind(family, tmp_path):
    """The tokenizer's own words are never split; with word-start markers (BPE, SentencePiece) neither are words between spaces."""
    tokenizer = build_tokenizer(family, tmp_path / family)
    collator = RetroMAECollator(tokenizer, max_length=64, seed=0)
    encoded = tokenizer(CORPUS, truncation=True, max_length=64, return_offsets_mapping=True)
    multi_token_words = 0
    for epoch in range(3):
        collator.set_epoch(epoch)
        batch = collator(CORPUS)
        for row in range(len(CORPUS)):
            chosen = (batch["encoder_labels"][row] != -100).tolist()
            hidden = ~decoder_mask(batch)[row]  # (seq, seq)
            for span in word_spans(encoded, row, CORPUS[row], between_spaces=tiny_family(family).word_pieces == "word starts"):
                multi_token_words += len(span) > 1
                assert len({chosen[i] for i in span}) == 1, (family, row, span)
                others = [query for query in range(hidden.shape[0]) if query not in span]
                assert (hidden[others][:, span] == hidden[others][:, span[:1]]).all(), (family, row, span)
    assert multi_token_words > 0


def word_spans(encoded, row: int, text: str, between_spaces: bool) -> list[list[int]]:
    """Token positions of each word: the fast tokenizer's words, or the runs of text between spaces."""
    word_ids, offsets = encoded.word_ids(row), encoded["offset_mapping"][row]
    spans = {}
    for position, (word, (start, end)) in enumerate(zip(word_ids, offsets)):
        if word is None:
            continue
        words_so_far = len(text[:end].split()) + (not text[start:end].strip())  # a bare space token opens the next word
        key = words_so_far if between_spaces else word
        spans.setdefault(key, []).append(position)
    return list(spans.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_evaluate_and_convert_take_every_family(family, checkpoints, tmp_path, capsys):
    assert convert(str(checkpoints / family), tmp_path / "converted") is True
    pairs = [{"query": CORPUS[i][:30], "positive": CORPUS[i]} for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(pair) for pair in pairs) + "\n")
    finetune = ["finetune", "--model", str(tmp_path / "converted"), "--train-data", str(tmp_path / "pairs.jsonl"),
                "--output-dir", str(tmp_path / "tuned"), "--max-steps", "2", "--batch-size", "4"]
    assert main(finetune) == 0
    tuned = tmp_path / "tuned" / "model"
    assert json.loads((tuned / "config.json").read_text())["model_type"] == family
    assert SentenceTransformer(str(tuned)).encode(["a query"]).shape == (1, 32)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(CORPUS[:8])) + "\n")
    (beir / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": CORPUS[i][:30]}) for i in range(4)) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    assert main(["evaluate", str(tuned), str(beir), "--output", str(tmp_path / "scores.json")]) == 0
    assert 0.0 <= json.loads((tmp_path / "scores.json").read_text())["ndcg@10"] <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_conversion_takes_every_family(family, checkpoints, tmp_path):
    """`retromae convert --sparse` of each family's checkpoint: SparseEncoder gives SPLADE-max of the family's own MLM scores."""
    folder = convert_sparse(str(checkpoints / family), tmp_path / "sparse")
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / family)
    masked_lm = AutoModelForMaskedLM.from_pretrained(checkpoints / family).eval()
    with torch.no_grad():  # one text at a time: no padding to leave out
        expected = torch.stack([torch.log1p(masked_lm(**tokenizer([text], return_tensors="pt")).logits[0].relu()).amax(0) for text in TEXTS])
    embedded = SparseEncoder(str(folder)).encode(TEXTS, convert_to_tensor=True, convert_to_sparse_tensor=False)
    torch.testing.assert_close(embedded, expected, atol=1e-5, rtol=0)
