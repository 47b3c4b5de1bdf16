"""What `retromae pretrain --eval-retrieval DIR` costs at the demo's settings, and how figures on a part of a corpus compare with the whole.

Writes a BEIR folder made from the demo corpus, an inverse cloze task (Lee et al., ACL 2019):
--passages runs of three consecutive sentences of its Wikipedia paragraphs; for --queries of them,
drawn at random, the middle sentence is taken out and is the query, the rest of the run its one
relevant passage. Then:

- the cost: runs the demo (`retromae.pretrain` with no model or corpus: all-MiniLM-L6-v2 on the
  Wikipedia excerpt, 16 passages of 128 tokens a step) for --steps steps with `--eval-retrieval`
  on that folder, evaluating every --eval-steps, and compares the seconds of each retrieval
  evaluation (`retrieval_seconds` in metrics.jsonl) with those of each training step (a callback
  times every step, evaluations left out);
- with --subsample SIZE..., the figures of `retromae evaluate` on the whole corpus and on
  `eval_retrieval.subsampled` parts of it of each SIZE (one per --seeds), for all-MiniLM-L6-v2 with
  its own mean pooling and with the first token (what the demo's step 0 evaluates). The texts are
  embedded once and every part is ranked and scored by `evaluate.evaluate`.

    python benchmarks/benchmark_eval_retrieval.py --queries 200 --passages 2000 --steps 6 --eval-steps 3 --output benchmarks/results/eval_retrieval_cpu.json
    python benchmarks/benchmark_eval_retrieval.py --queries 200 --passages 4800 --steps 0 --subsample 500 1000 2000 --output benchmarks/results/eval_retrieval_subsampling.json
"""

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from retromae import PretrainingSettings, pretrain
from retromae.data import demo_corpus
from retromae.diagnostics import MetricsFile
from retromae.eval_retrieval import subsampled
from retromae.evaluate import RetrievalTask, evaluate, load_beir
from retromae.run_record import hardware
from retromae.sentence_transformer import release_max_seq_length, to_sentence_transformer
from retromae.settings import DEMO_RUN, demo_model_path


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def inverse_cloze_folder(folder: Path, passages: int, queries: int, seed: int) -> Path:
    """The BEIR folder of the module docstring: `passages` runs of three sentences, `queries` of them with their middle sentence as the query."""
    runs = []
    for paragraph in demo_corpus()["text"]:
        sentences = SENTENCE_END.split(paragraph)
        runs += [sentences[i : i + 3] for i in range(0, len(sentences) - 2, 3)]
    if len(runs) < passages:
        raise SystemExit(f"The demo corpus gives {len(runs)} runs of three sentences, fewer than --passages {passages}.")
    asked = sorted(random.Random(seed).sample(range(passages), queries))
    corpus = [{"_id": f"p{i}", "title": "", "text": " ".join([run[0], run[2]] if i in asked else run)} for i, run in enumerate(runs[:passages])]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(record) + "\n" for record in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": runs[i][1]}) + "\n" for i in asked))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tp{i}\t1\n" for i in asked))
    return folder


class StepTimes(TrainerCallback):
    """The seconds of every training step, from its start to its end (the evaluations after it left out)."""

    def __init__(self):
        self.seconds, self.started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def cost(folder: Path, steps: int, eval_steps: int) -> dict:
    """Seconds per training step and per retrieval evaluation of the demo run with `--eval-retrieval folder`, and their ratio."""
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        pretrain(PretrainingSettings(output_dir=output_dir, max_steps=steps, eval_steps=eval_steps, eval_retrieval=str(folder)), callbacks=[timer])
        records = MetricsFile(output_dir).records()
    evaluation, step = statistics.median(r["retrieval_seconds"] for r in records), statistics.median(timer.seconds)
    return {
        "batch_size": DEMO_RUN["batch_size"],
        "max_length": DEMO_RUN["max_length"],
        "steps": steps,
        "step_seconds": [round(s, 2) for s in timer.seconds],
        "retrieval_seconds": [r["retrieval_seconds"] for r in records],
        "median_step_seconds": round(step, 2),
        "median_retrieval_seconds": evaluation,
        "evaluation_per_step": round(evaluation / step, 2),
        "first_figures": {name: round(value, 4) for name, value in records[0].items() if name.startswith("dense_")},
    }


class CachedEmbeddings:
    """A model's embeddings of a task's texts, made once, standing in for the model in `evaluate` on any part of the task."""

    def __init__(self, model: SentenceTransformer, task: RetrievalTask):
        documents, queries = list(task.corpus.values()), list(task.queries.values())
        encode = dict(convert_to_tensor=True, batch_size=32, show_progress_bar=True)
        self.documents = dict(zip(documents, model.encode_document(documents, **encode)))
        self.queries = dict(zip(queries, model.encode_query(queries, **encode)))
        self.similarity = model.similarity

    def encode_document(self, texts: list[str], **kwargs) -> torch.Tensor:
        return torch.stack([self.documents[text] for text in texts])

    def encode_query(self, texts: list[str], **kwargs) -> torch.Tensor:
        return torch.stack([self.queries[text] for text in texts])


def subsampling(folder: Path, sizes: list[int], seeds: int) -> dict:
    """`retromae evaluate`'s figures on the whole corpus and on its parts of each size, for both poolings of all-MiniLM-L6-v2."""
    task = load_beir(folder)
    models = {
        "all-MiniLM-L6-v2 (mean pooling)": SentenceTransformer(demo_model_path()),
        "all-MiniLM-L6-v2 (first token, the demo's step 0)": to_sentence_transformer(
            demo_model_path(), max_seq_length=release_max_seq_length(demo_model_path(), DEMO_RUN["max_length"])
        ),
    }
    report = {}
    for name, model in models.items():
        cached = CachedEmbeddings(model, task)
        report[name] = {"whole": {"documents": len(task.corpus), **evaluate(cached, task)}}
        for size in sizes:
            parts = [evaluate(cached, subsampled(task, size, seed)) for seed in range(seeds)]
            report[name][str(size)] = {metric: round(statistics.fmean(part[metric] for part in parts), 4) for metric in parts[0]}
            report[name][str(size)] |= {f"{metric} range": [round(f(part[metric] for part in parts), 4) for f in (min, max)] for metric in parts[0]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200, help="Judged queries. Default: 200.")
    parser.add_argument("--passages", type=int, default=2000, help="Passages of the corpus. Default: 2000.")
    parser.add_argument("--steps", type=int, default=6, help="Training steps of the demo run; 0 skips the run. Default: 6.")
    parser.add_argument("--eval-steps", type=int, default=3, help="The run's --eval-steps. Default: 3.")
    parser.add_argument("--subsample", type=int, nargs="*", default=[], metavar="SIZE", help="Sizes of the parts compared with the whole corpus.")
    parser.add_argument("--seeds", type=int, default=3, help="Parts drawn per size (seeds 0, 1, ...). Default: 3.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the choice of queries. Default: 0.")
    parser.add_argument("--output", help="Where the JSON report is written.")
    args = parser.parse_args()

    report = {"machine": hardware(torch.device("cpu")), "queries": args.queries, "passages": args.passages}
    with tempfile.TemporaryDirectory() as folder:
        beir = inverse_cloze_folder(Path(folder) / "beir", args.passages, args.queries, args.seed)
        if args.steps:
            report["cost"] = cost(beir, args.steps, args.eval_steps)
        if args.subsample:
            report["subsampling"] = subsampling(beir, args.subsample, args.seeds)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
