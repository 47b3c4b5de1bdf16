"""`benchmarks/gpu.sh`: the GPU table's pipeline on CPU (--dry-run), and its refusal without a GPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.sh"


def gpu_sh(*args, **environment):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=os.environ | environment)


def test_without_a_gpu_it_stops_with_a_message():
    finished = gpu_sh(CUDA_VISIBLE_DEVICES="")
    assert finished.returncode != 0
    assert "gpu.sh: no CUDA device here" in finished.stderr


def test_an_unknown_argument_is_refused():
    finished = gpu_sh("--fast")
    assert finished.returncode == 2 and "unknown argument '--fast'" in finished.stderr


@pytest.mark.slow
def test_dry_run_makes_the_table_and_its_json_on_cpu(tmp_path):
    """A minute or more on 2 cores: four training processes (two rows, RetroMAE and the family's MLM)."""
    finished = gpu_sh("--dry-run", "--output-dir", str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-2000:]
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| RetroMAE |") == 2 and table.count("| family MLM |") == 2
    report = json.loads((tmp_path / "xlm-roberta-smoke-L128.json").read_text())
    assert report["gradient_checkpointing"] is True and report["dtype"] == "bfloat16"
    for variant in ("ours", "mlm"):
        row = report["results"][0][variant]
        assert row["tokens_per_second"] > 0 and row["step_flops"] > 0 and 0 < row["mfu"] and row["peak_gib"] > 0
