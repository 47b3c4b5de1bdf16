"""Sharded pre-training: the --fsdp and --deepspeed settings that reach the Trainer, their checks, the example configs, a two-process FSDP run."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from safetensors.torch import load_file
from torch.distributed.run import get_args_parser as torchrun_parser
from transformers import BertModel

from retromae import PretrainingSettings, RetroMAEConfig, RetroMAEForPreTraining
from retromae.engines import Engine, fsdp_units, read_engine
from retromae.errors import UsageError
from retromae.loading import build_model_and_tokenizer
from retromae.pretraining import check_resumable
from retromae.settings import FSDP_CONFIG_KEYS
from retromae.trainer import trainer_settings, training_arguments
from retromae.diagnostics import read_metrics
from retromae.cli import build_parser, main

from families import FAMILIES, tiny_config, tiny_family
from helpers import resolved_settings, tiny_run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HERE = Path(__file__).resolve().parent
PAGE = ROOT / "docs" / "scaling-engines.md"


def checked(argv: list[str]) -> tuple[PretrainingSettings, Engine]:
    settings = resolved_settings(["pretrain", "--config", "tiny", "--max-length", "32", *argv])
    return settings, read_engine(settings)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model_and_tokenizer(checked([])[0])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_shards_each_layer_of_the_family_and_the_decoder(family):
    model = RetroMAEForPreTraining(RetroMAEConfig(encoder=tiny_config(family, 100)))
    layer, decoder = fsdp_units(model)
    assert (layer, decoder) == (tiny_family(family).layer, "RetroMAEDecoder")
    declared = model.encoder.base_model._no_split_modules
    assert not declared or layer in declared  # the layer transformers itself keeps whole, where the family names one


def test_fsdp_reaches_the_trainer_as_fsdp2_with_those_units(tiny_model):
    arguments = training_arguments(*checked(["--fsdp", "--gradient-checkpointing"]), tiny_model)
    assert arguments.fsdp is True and not arguments.activation_checkpointing  # FSDP recomputes its units itself
    assert arguments.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "BertLayer,RetroMAEDecoder",
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": True,
        "reshard_after_forward": True,
    }


def test_an_fsdp_config_file_overrides_the_defaults(tiny_model, tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": False}))
    plugin = training_arguments(*checked(["--fsdp", str(path)]), tiny_model).fsdp_plugin_args
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["reshard_after_forward"] is False
    assert plugin["transformer_cls_names_to_wrap"] == "BertLayer,RetroMAEDecoder"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_example_deepspeed_configs_reach_the_trainer_with_the_bucket_sizes_of_the_encoders_width(stage, tiny_model):
    path = EXAMPLES / "deepspeed" / f"zero{stage}.json"
    settings = trainer_settings(*checked(["--deepspeed", str(path)]), tiny_model)
    written = json.loads(path.read_text())
    assert settings["deepspeed"].keys() == written.keys() and settings["fsdp"] is False and settings["fsdp_config"] is None
    zero = settings["deepspeed"]["zero_optimization"]
    sizes = {"reduce_bucket_size": 128 * 128, "stage3_prefetch_bucket_size": int(0.9 * 128 * 128), "stage3_param_persistence_threshold": 1280}
    for key, value in written["zero_optimization"].items():
        assert zero[key] == (sizes[key] if value == "auto" else value), key
    assert settings["deepspeed"]["train_micro_batch_size_per_gpu"] == "auto"  # left to transformers, which fills it from the flags


def test_zero3_gathers_the_weights_for_the_release_where_the_config_says_nothing(tmp_path, tiny_model):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    settings = trainer_settings(*checked(["--deepspeed", str(path)]), tiny_model)
    assert settings["deepspeed"]["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}


def test_the_example_fsdp_and_accelerate_configs_load():
    assert set(json.loads((EXAMPLES / "fsdp.json").read_text())) <= set(FSDP_CONFIG_KEYS)
    config = ClusterConfig.from_yaml_file(EXAMPLES / "accelerate" / "multi-node.yaml")
    assert (config.num_machines, config.num_processes, config.distributed_type) == (4, 32, "MULTI_GPU")


def page_commands() -> list[list[str]]:
    """The launch commands of docs/scaling-engines.md, continuation lines joined, comments dropped, variables expanded."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(os.path.expandvars(line), comments=True) for line in lines if line.startswith(("torchrun", "accelerate launch"))]


def test_the_pages_launch_commands_parse_and_their_configs_pass_the_checks(monkeypatch):
    """Every launch command of the page parses (the launcher's flags with the launcher's own parser) and its engine config is valid; GPUs are not needed."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MAIN_HOST", "node0")
    monkeypatch.setenv("NODE_RANK", "1")
    commands = page_commands()
    assert len(commands) >= 7
    for command in commands:
        launcher = torchrun_parser() if command[0] == "torchrun" else launch_command_parser()
        launched = launcher.parse_args(command[1:] if command[0] == "torchrun" else command[2:])
        if command[0] == "accelerate":
            ClusterConfig.from_yaml_file(launched.config_file)
        if launched.training_script != "retromae.cli":
            continue
        assert launched.module
        args = build_parser().parse_args(launched.training_script_args)
        assert args.command == "pretrain"
        read_engine(PretrainingSettings.from_arguments(args))


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


@pytest.mark.parametrize(
    "flags, message",
    [
        (lambda tmp: ["--deepspeed", str(tmp / "missing.json")], "--deepspeed {tmp}/missing.json: cannot be read"),
        (lambda tmp: ["--deepspeed", write(tmp, "bad.json", "{stage: 2")], "--deepspeed {tmp}/bad.json: not valid JSON"),
        (lambda tmp: ["--deepspeed", write(tmp, "list.json", "[]")], "must hold a JSON object, got list"),
        (lambda tmp: ["--deepspeed", write(tmp, "zero0.json", '{"zero_optimization": {"stage": 0}}')], "zero_optimization.stage must be 1, 2 or 3, got 0"),
        (lambda tmp: ["--deepspeed", write(tmp, "none.json", "{}")], "zero_optimization.stage must be 1, 2 or 3, got None"),
        (
            lambda tmp: ["--deepspeed", write(tmp, "z3.json", '{"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": false}}')],
            "set zero_optimization.stage3_gather_16bit_weights_on_model_save to true",
        ),
        (lambda tmp: ["--fsdp", write(tmp, "f.json", '{"sharding_strategy": "FULL_SHARD"}')], "unknown keys sharding_strategy; allowed: version,"),
        (lambda tmp: ["--fsdp", write(tmp, "v1.json", '{"fsdp_version": 1}')], "version must be the number 2 (FSDP2), got 1"),
        (lambda tmp: ["--fsdp", write(tmp, "s.json", '{"state_dict_type": "LOCAL"}')], "state_dict_type must be one of SHARDED_STATE_DICT, FULL_STATE_DICT"),
        (lambda tmp: ["--fsdp", "--deepspeed", str(EXAMPLES / "deepspeed" / "zero1.json")], "Give --deepspeed or --fsdp, not both"),
    ],
)
def test_a_bad_engine_config_fails_with_a_clear_message_and_writes_nothing(tmp_path, capsys, flags, message):
    output_dir = tmp_path / "out"
    assert main(["pretrain", "--config", "tiny", "--output-dir", str(output_dir), *flags(tmp_path)]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not output_dir.exists()


def test_deepspeed_without_deepspeed_installed_says_how_to_install_it(corpus, tmp_path, capsys):
    assert main(tiny_run(corpus, tmp_path / "run", "--deepspeed", str(EXAMPLES / "deepspeed" / "zero2.json"))) == 2
    assert "pip install 'retromae[deepspeed]'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a sharded save written by one process here
def test_resume_reads_the_shapes_of_a_checkpoint_fsdp_saved_sharded(tiny_model, tmp_path):
    """FSDP's sharded checkpoint has no safetensors file: --resume checks the model against the shards' metadata."""
    torch.distributed.checkpoint.save({"model": tiny_model.state_dict()}, checkpoint_id=tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0", no_dist=True)
    check_resumable(str(tmp_path / "checkpoint-2"), tiny_model)
    other = RetroMAEForPreTraining(RetroMAEConfig(vocab_size=tiny_model.config.encoder.vocab_size, hidden_size=64, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UsageError, match="holds another model than this run's"):
        check_resumable(str(tmp_path / "checkpoint-2"), other)


def test_fsdp_in_one_cpu_process_is_refused_rather_than_run_unsharded(corpus, tmp_path, capsys):
    assert main(tiny_run(corpus, tmp_path / "run", "--fsdp")) == 2
    assert "so this run would not be sharded" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint-2").exists()


def two_process_run(corpus, output_dir: Path, *flags: str) -> None:
    """`retromae pretrain` in two CPU processes (gloo), through tests/fsdp_on_cpu.py, which opens accelerate's FSDP path to CPU."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
        str(HERE / "fsdp_on_cpu.py"), *tiny_run(corpus, output_dir, "--gradient-checkpointing", *flags),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def fsdp_run(corpus, output_dir: Path, *flags: str) -> None:
    two_process_run(corpus, output_dir, "--fsdp", *flags)


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_resumes_to_the_same_weights_and_releases_the_whole_encoder(corpus, tmp_path):
    fsdp_run(corpus, tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(os.listdir(checkpoint)) and not (checkpoint / "model.safetensors").exists()
    fsdp_run(corpus, tmp_path / "resumed", "--resume", str(checkpoint))

    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    release = BertModel.from_pretrained(tmp_path / "whole" / "model")  # the family's own checkpoint, whole
    assert release.embeddings.word_embeddings.weight.shape == (release.config.vocab_size, 128)
    assert not any(name.startswith("decoder.") for name in whole)
    parts = load_file(tmp_path / "whole" / "model" / "retromae_parts.safetensors")  # the MLM head and the decoder, gathered whole too
    assert parts["decoder.layers.0.output.dense.weight"].shape == (128, release.config.intermediate_size)


@pytest.mark.slow
def test_held_out_diagnostics_under_fsdp_are_those_of_ddp(corpus, tmp_path):
    """
    The held-out passes call the model's parts directly, which FSDP2 does not gather on its own:
    under --fsdp every evaluation (step 0 before any training step, then every 2 steps) gives the
    figures the same run gives under plain data parallelism. The two engines sum gradients in another
    order, so the weights part at float32 rounding after the first step; the embedding information,
    a difference of two decoder losses of about 10, is compared to 1e-5 of them.
    """
    evaluation = ("--eval-data", str(corpus), "--eval-size", "16", "--eval-steps", "2")
    fsdp_run(corpus, tmp_path / "fsdp", *evaluation)
    two_process_run(corpus, tmp_path / "ddp", *evaluation)
    fsdp, ddp = (read_metrics(tmp_path / name) for name in ("fsdp", "ddp"))
    assert [record["step"] for record in fsdp] == [record["step"] for record in ddp] == [0, 2, 4]
    for sharded, plain in zip(fsdp, ddp):
        for name in ("encoder_loss", "decoder_loss", "embedding_information", "span_mrr_at_10", "span_recall_at_10"):
            assert sharded[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-5 * plain["decoder_loss"]), (sharded["step"], name)
