"""How long `retromae finetune --mine-hard-negatives K` takes to mine, before training starts.

Builds --passages passages from the demo corpus (Wikipedia paragraphs cut into runs of two
sentences) and --queries queries, each the opening words of a passage drawn at random (seeded),
that passage being its positive; writes them as the pairs.jsonl and corpus.jsonl a run would read,
then times `retromae.mining.mine` as `retromae finetune` calls it, with the demo model
(all-MiniLM-L6-v2) already loaded: embedding the passages and the queries, ranking, the guards.

    python benchmarks/benchmark_mining.py --queries 1000 --passages 10000 --output benchmarks/results/mining_cpu.json
"""

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer

from retromae.data import demo_corpus
from retromae.finetune import load_examples
from retromae.mining import MARGIN, WINDOW, MiningSettings, candidate_passages, mine
from retromae.run_record import hardware
from retromae.settings import demo_model_path


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SENTENCES_PER_PASSAGE = 2
QUERY_WORDS = 8


def passages_of_the_demo_corpus(count: int) -> list[str]:
    """The first `count` distinct runs of two consecutive sentences of the demo corpus's paragraphs."""
    passages = []
    for paragraph in demo_corpus()["text"]:
        sentences = SENTENCE_END.split(paragraph)
        passages += [" ".join(sentences[i : i + SENTENCES_PER_PASSAGE]) for i in range(0, len(sentences), SENTENCES_PER_PASSAGE)]
    passages = list(dict.fromkeys(passages))
    if len(passages) < count:
        raise SystemExit(f"The demo corpus gives {len(passages)} passages, fewer than --passages {count}.")
    return passages[:count]


def write_run_files(folder: Path, passages: list[str], queries: int, seed: int) -> tuple[Path, Path]:
    """pairs.jsonl (a query for each of `queries` passages drawn at random) and corpus.jsonl (every passage)."""
    chosen = random.Random(seed).sample(passages, queries)
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": " ".join(p.split()[:QUERY_WORDS]), "positive": p}) + "\n" for p in chosen))
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return pairs, corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000, help="Queries to mine for. Default: 1000.")
    parser.add_argument("--passages", type=int, default=10000, help="Passages to mine from, the queries' positives among them. Default: 10000.")
    parser.add_argument("--negatives", type=int, default=3, help="K, negatives per query. Default: 3.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the choice of queries. Default: 0.")
    parser.add_argument("--output", default="benchmark_mining.json", help="Where the JSON goes. Default: benchmark_mining.json.")
    args = parser.parse_args()

    passages = passages_of_the_demo_corpus(args.passages)
    model = SentenceTransformer(demo_model_path())
    with tempfile.TemporaryDirectory() as folder:
        pairs, corpus = write_run_files(Path(folder), passages, args.queries, args.seed)
        examples = load_examples(pairs)
        settings = MiningSettings(args.negatives, MARGIN, WINDOW, demo_model_path(), str(corpus), "text", args.seed, str(pairs))
        candidates = candidate_passages(examples, passages)
        start = time.perf_counter()
        mined = mine(examples, model, settings, candidates)
        seconds = time.perf_counter() - start
    report = {
        "machine": hardware(model.device),
        "model": "all-MiniLM-L6-v2",
        "queries": args.queries,
        "passages": len(candidates),
        "negatives": args.negatives,
        "margin": MARGIN,
        "window": list(WINDOW),
        "seconds": round(seconds, 1),
        "summary": mined.summary(args.negatives),
    }
    print(json.dumps(report, indent=2))
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
