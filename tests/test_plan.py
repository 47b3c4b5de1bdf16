"""`retromae plan`: the memory formula's parts against hand counts and a measured step, and its command line."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import BertConfig

from retromae import RetroMAECollator, RetroMAEConfig, RetroMAEForPreTraining
from retromae.cli import main
from retromae.plan import GIB, MAX_BATCH, Parameters, activation_bytes, engine_memory, largest_batch, make_plan, parameter_counts, step_memory

# The benchmarks' own measurements, so that the tests and the benchmarks report the same figures.
from benchmarks.benchmark_step import peak_step_mib, saved_for_backward_mib, training_step
from conftest import TEXTS


H, LAYERS, INNER, VOCAB, POSITIONS = 32, 2, 64, 100, 128


@pytest.fixture(scope="module")
def bert() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=INNER,
        max_position_embeddings=POSITIONS, attention_probs_dropout_prob=0.0,
    )


def test_parameters_of_a_tiny_bert_match_a_hand_count(bert):
    layer = 4 * (H * H + H) + 2 * H + (H * INNER + INNER) + (INNER * H + H) + 2 * H  # attention, LayerNorm, feed-forward, LayerNorm
    counts = parameter_counts(bert)
    assert counts.embeddings == (VOCAB + POSITIONS + 2) * H + 2 * H  # word (tied to the head's projection), position, type; LayerNorm
    assert counts.encoder_layers == LAYERS * layer and counts.largest_layer == layer
    assert counts.head == H * H + H + 2 * H + VOCAB  # transform, LayerNorm, the projection's bias
    assert counts.decoder == layer  # one layer of BERT's shape: cross-attention at the encoder's width
    model = RetroMAEForPreTraining(RetroMAEConfig(encoder=bert))
    assert counts.total == sum(parameter.numel() for parameter in model.parameters())


def test_checkpointing_keeps_only_each_encoder_layers_input(bert):
    tokens, per_value = 2 * 64, 4
    kept = activation_bytes(bert, 2, 64, per_value, checkpointing=False)
    checkpointed = activation_bytes(bert, 2, 64, per_value, checkpointing=True)
    per_layer = tokens * ((9 * H + 2 * INNER) * per_value + 2 * H)
    assert kept["encoder"] - checkpointed["encoder"] == LAYERS * (per_layer - tokens * H * per_value)
    assert checkpointed["recompute"] >= per_layer


@pytest.fixture(scope="module")
def measured_config(bert, tokenizer) -> BertConfig:
    """The tiny BERT with the real tokenizer's vocabulary and room for 256 tokens: the configuration whose steps are measured."""
    return BertConfig(**(bert.to_dict() | {"vocab_size": len(tokenizer), "max_position_embeddings": 512}))


@pytest.fixture(scope="module")
def measured_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two passages of 256 tokens."""
    return RetroMAECollator(tokenizer, max_length=256, seed=0)([" ".join(TEXTS * 4)] * 2)


def test_planned_activations_match_what_a_step_keeps_for_backward(measured_config, measured_batch):
    """The formula's stored activations against the bytes autograd actually keeps for one float32 step, within 15%."""
    model = RetroMAEForPreTraining(RetroMAEConfig(encoder=measured_config)).train()
    kept = saved_for_backward_mib(lambda: model(**measured_batch)) * 2**20
    planned = activation_bytes(measured_config, 2, measured_batch["encoder_input_ids"].shape[1], 4, checkpointing=False)
    assert sum(planned[part] for part in ("encoder", "decoder", "head")) == pytest.approx(kept, rel=0.15)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "checkpointed"])
def test_the_planned_peak_is_what_a_step_allocates(measured_config, measured_batch, checkpointing):
    """The plan's peak (one process, float32) against the most memory tensors held during a measured step, within 10%."""
    torch.manual_seed(0)
    model = RetroMAEForPreTraining(RetroMAEConfig(encoder=measured_config)).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    step = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), lambda: model(**measured_batch).loss)
    step()  # the optimiser's state exists from the first step on, as in every later one
    measured = peak_step_mib(step, torch.device("cpu")) * 2**20
    seq_length = measured_batch["encoder_input_ids"].shape[1]
    planned = step_memory(measured_config, parameter_counts(measured_config), 2, seq_length, "DDP", 1, "fp32", checkpointing)
    assert planned.peak == pytest.approx(measured, rel=0.10)


def test_engines_split_the_state_as_zero_and_fsdp_do():
    parameters = Parameters(embeddings=400, encoder_layers=1200, head=50, decoder=350, largest_layer=100)
    none = {"encoder": 0, "decoder": 0, "head": 0, "transient": 0, "recompute": 0}
    psi, n = parameters.total, 8

    def memory(engine):
        return engine_memory(engine, parameters, none, n, "bf16", parameters.largest_layer)

    assert (memory("DDP").weights, memory("DDP").gradients, memory("DDP").optimizer) == (6 * psi, 8 * psi, 8 * psi)
    assert (memory("ZeRO-1").weights, memory("ZeRO-1").gradients, memory("ZeRO-1").optimizer) == (2 * psi, 2 * psi, 12 * psi // n)
    assert (memory("ZeRO-2").gradients, memory("ZeRO-2").optimizer) == (2 * psi // n, 12 * psi // n)
    assert memory("ZeRO-3").weights == 2 * psi // n + 2 * (psi - 1200)  # the shards and the gathered root unit
    assert (memory("FSDP").weights, memory("FSDP").optimizer) == (4 * psi // n + 2 * (psi - 1200 + 200), 8 * psi // n)


def test_the_largest_batch_fits_and_one_more_does_not(bert):
    parameters = parameter_counts(bert)

    def memory(batch):
        return step_memory(bert, parameters, batch, 128, "ZeRO-2", 4, "bf16", True)

    capacity = memory(37).peak + 1
    assert largest_batch(memory, capacity) == 37
    assert largest_batch(memory, memory(1).peak - 1) == 0


def test_the_search_for_the_largest_batch_ends_on_a_memory_too_large_for_a_float(bert):
    parameters = parameter_counts(bert)
    assert largest_batch(lambda batch: step_memory(bert, parameters, batch, 128, "DDP", 1, "bf16", False), 1e308 * GIB) == MAX_BATCH


def test_plan_prints_every_engine_with_and_without_checkpointing(capsys):
    assert main(["plan", "--model", "tiny", "--max-length", "512", "--batch-size", "8", "--gpus", "4", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "tiny: " in out and "bf16 mixed precision" in out
    for engine in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP"):
        assert f"| {engine} | off |" in out and f"| {engine} | on |" in out


def test_bge_m3_at_8192_tokens_is_planned_offline():
    plan = make_plan("BAAI/bge-m3", 8192, 1, 32, 40)
    assert 550e6 < plan.parameters.total < 600e6  # XLM-R large with 8,194 positions, and a decoder layer
    checkpointed = {engine: batch for engine, checkpointing, _, batch in plan.rows if checkpointing}
    assert checkpointed["ZeRO-1"] >= checkpointed["DDP"] >= 1
    assert all(memory.peak < 40 * GIB for _, checkpointing, memory, _ in plan.rows if checkpointing)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--max-length", "2"], "--max-length: must be at least 3, got 2"),
        (["--gpus", "0"], "--gpus: must be at least 1, got 0"),
        (["--gpu-memory", "0"], "--gpu-memory: must be above 0, got 0"),
        (["--model", "no-such-model"], "--model no-such-model: neither a size name or known model"),
        (["--max-length", "513"], "--max-length 513 exceeds the 512 tokens the model's positions allow"),
        (["--model", "xlm-roberta-large", "--max-length", "8192"], "--max-length 8192 exceeds the 512 tokens the model's positions allow"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(capsys, change, message):
    args = {"--model": "tiny", "--max-length": "128", "--batch-size": "4", "--gpus": "1", "--gpu-memory": "40"}
    args.update(dict(zip(change[::2], change[1::2])))
    try:
        status = main(["plan", *[item for pair in args.items() for item in pair]])
    except SystemExit as exit:  # a number argparse refuses as the command is read
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_a_family_retromae_does_not_pretrain_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["plan", "--model", str(tmp_path), "--max-length", "128", "--batch-size", "4", "--gpu-memory", "40"]) == 2
    assert "a 'gpt2' model is not one of them" in capsys.readouterr().err


def test_the_plan_in_docs_scaling_is_what_the_command_prints(capsys):
    """docs/scaling.md shows BGE-M3's plan: its command, run here, prints the page's table."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    section = page[page.index("### BGE-M3's setting") :]
    command = re.search(r"```bash\n(retromae plan [^\n]+)\n```", section).group(1)
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.split("\n\n")[1] in section and printed.split("\n\n")[0] in section
