"""How long `retromae pretrain` takes to start on a large corpus, and how fast long records are cut.

Writes a JSON-lines corpus and a parquet corpus of about --megabytes each (records of several
Wikipedia paragraphs from the demo corpus, repeated), then times whole `retromae pretrain` runs
of one step of a tiny model on each: memory-mapped (`--passages truncate`, `split` with a step
budget, cut lazily, and `split` counted in epochs, cut before training) and streamed. The same run on a 100-record corpus, timed in the same session, is the fixed cost
(start-up, model, release); what a corpus adds is the difference. Also times `PassageSplitter`
on one core (a data-loader worker) at --max-length.

    python benchmarks/benchmark_corpus.py --megabytes 1024 --output benchmarks/results/corpus.json
    python benchmarks/benchmark_corpus.py --smoke
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retromae.data import demo_articles
from retromae.passages import PassageSplitter
from retromae.settings import demo_model_path
from retromae.run_record import hardware


PARAGRAPHS_PER_RECORD = 8


def long_records() -> list[str]:
    """Records of several consecutive paragraphs of one demo article: documents longer than a passage."""
    records = []
    for article in demo_articles():
        for start in range(0, len(article.paragraphs), PARAGRAPHS_PER_RECORD):
            records.append("\n".join(article.paragraphs[start : start + PARAGRAPHS_PER_RECORD]))
    return records


def write_corpora(folder: Path, records: list[str], megabytes: float) -> dict[str, Path]:
    """A .jsonl and a .parquet file of about `megabytes` each, the records repeated; and a 100-record baseline."""
    lines = [json.dumps({"text": record}) + "\n" for record in records]
    repeats = max(1, round(megabytes * 2**20 / sum(len(line.encode()) for line in lines)))
    jsonl = folder / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as file:
        for _ in range(repeats):
            file.writelines(lines)
    parquet = folder / "corpus.parquet"
    with pq.ParquetWriter(parquet, pa.schema([("text", pa.string())])) as writer:
        for _ in range(repeats):
            writer.write_table(pa.table({"text": records}))
    baseline = folder / "baseline.jsonl"
    baseline.write_text("".join(lines[:100]))
    return {"baseline": baseline, "jsonl": jsonl, "parquet": parquet}


def run_seconds(corpus: Path, output_dir: Path, extra: list[str]) -> float:
    """Wall seconds of a one-step `retromae pretrain` of a tiny model on `corpus`, in a fresh process."""
    output_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "retromae.cli", "pretrain", "--overwrite-output-dir", "--config", "tiny", "--train-data", str(corpus),
        "--output-dir", str(output_dir), "--max-steps", "1", "--batch-size", "8", "--save-steps", "1000", *extra,
    ]
    environment = os.environ | {"HF_DATASETS_CACHE": str(output_dir / "datasets-cache")}  # each run builds its own cache
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return time.perf_counter() - started


def splitter_passages_per_second(records: list[str], max_length: int) -> float:
    """Passages per second of `PassageSplitter` on one thread, batches of 64 records (a stream's)."""
    from transformers import AutoTokenizer

    splitter = PassageSplitter(AutoTokenizer.from_pretrained(demo_model_path()), max_length)
    os.environ["RAYON_NUM_THREADS"] = "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, passages = time.perf_counter(), 0
    for start in range(0, len(records), 64):
        passages += len(splitter({"text": records[start : start + 64]})["input_ids"])
    torch.set_num_threads(threads)
    return passages / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=1024, help="Size of each corpus. Default: 1024.")
    parser.add_argument("--max-length", type=int, default=512, help="Passage length for the splitter's figure. Default: 512.")
    parser.add_argument("--smoke", action="store_true", help="A 2 MB corpus: checks the pipeline (CI).")
    parser.add_argument("--output", default="benchmark_corpus.json", help="Where the JSON goes. Default: benchmark_corpus.json.")
    args = parser.parse_args()
    if args.smoke:
        args.megabytes = 2
    records = long_records()
    report = {"megabytes": args.megabytes, "machine": hardware(torch.device("cpu")), "max_length": args.max_length}
    report["splitter_passages_per_second_one_core"] = splitter_passages_per_second(records, args.max_length)
    with tempfile.TemporaryDirectory() as workspace:
        corpora = write_corpora(Path(workspace), records, args.megabytes)
        report["bytes"] = {name: path.stat().st_size for name, path in corpora.items()}
        upfront = ["--passages", "split", "--max-steps", "-1", "--epochs", "1e-9", "--dataloader-num-workers", "2"]
        cases = {
            "baseline": ("baseline", ["--passages", "truncate"]),
            "jsonl truncate": ("jsonl", ["--passages", "truncate"]),
            "jsonl split": ("jsonl", ["--passages", "split"]),
            "jsonl streaming": ("jsonl", ["--streaming"]),
            "jsonl split, epochs": ("jsonl", upfront),
            "parquet truncate": ("parquet", ["--passages", "truncate"]),
            "parquet split": ("parquet", ["--passages", "split"]),
            "parquet streaming": ("parquet", ["--streaming"]),
            "parquet split, epochs": ("parquet", upfront),
        }
        seconds = {}
        for name, (corpus, extra) in cases.items():
            seconds[name] = run_seconds(corpora[corpus], Path(workspace) / name.replace(" ", "-"), extra)
            print(f"{name:<22} {seconds[name]:7.1f} s  (corpus adds {seconds[name] - seconds['baseline']:6.1f} s)", flush=True)
        report["run_seconds"] = seconds
        report["corpus_adds_seconds"] = {name: value - seconds["baseline"] for name, value in seconds.items()}
    print(f"PassageSplitter, one core, L={args.max_length}: {report['splitter_passages_per_second_one_core']:,.0f} passages/s")
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
