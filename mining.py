"""Hard negatives mined before fine-tuning (`retromae finetune --mine-hard-negatives K`).

For every query, sentence-transformers' `mine_hard_negatives` ranks the passages to mine from (the
training data's passages, plus `--corpus` when given) by the mining model's cosine similarity and
keeps the K most similar that pass three guards against false negatives, passages that answer the
query but are not marked as its positives:

- a query's positives are never candidates: all of them, when a query comes with several;
- a relative margin (`--mining-margin`, 0.05): a passage scoring above the query's positive score
  less 5% of it (the weakest positive's, where there are several) is skipped, NV-Retriever's
  TopK-PercPos (95%), the best of the methods it compares;
- a rank window (`--mining-window SKIP DEPTH`, 3 100): of the candidates the margin leaves, the SKIP
  most similar are skipped, where unmarked positives gather, and none below rank DEPTH is taken.

Negatives the training data already has are kept, first; the K mined ones are added after them (a
mined passage that is one of them is passed over). Every example must carry as many negatives as
the others, so an example left with fewer than K after the guards is topped up with random
passages (never its query's positives or its negatives), seeded by `--seed`.

The mined set is written to OUTPUT_DIR/mined_negatives.jsonl in `--train-data`'s format, and how it
was mined to OUTPUT_DIR/mining.json. A run with the same settings reuses it; one with other
settings is refused, naming the difference (`--overwrite` mines again).
"""

import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import sentence_transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives

from .corpus import load_corpus, resolve_corpus, text_batches
from .data import CorpusError
from .errors import UsageError, is_hub_id


MINED_SET = "mined_negatives.jsonl"
MINING_RECORD = "mining.json"
MARGIN = 0.05  # NV-Retriever's TopK-PercPos (95%): a negative scores at most 95% of the positive's score
WINDOW = (3, 100)  # skip the 3 most similar candidates, take none below rank 100
SCORES_AT_ONCE = 2**27  # query-passage scores held at once while ranking (512 MiB of float32)
# The flag that sets each recorded setting, to name a difference.
FLAGS = {
    "negatives": "--mine-hard-negatives",
    "margin": "--mining-margin",
    "window": "--mining-window",
    "model": "--mining-model (or --model)",
    "corpus": "--corpus",
    "text_column": "--text-column",
    "seed": "--seed",
    "train_data_sha256": "--train-data (its content)",
}


@dataclass(frozen=True)
class MiningSettings:
    """
    How hard negatives are mined: what mining.json records, and what a run must match to reuse a mined set.

    Args:
        negatives: K, the negatives mined for each example.
        margin: relative margin; a candidate scoring above (positive score - |positive score| * margin) is skipped.
        window: (SKIP, DEPTH): the SKIP most similar candidates left by the margin are skipped, none below rank DEPTH taken.
        model: the mining model, as given (a local path made absolute).
        corpus: the `--corpus` passages are mined from besides the training data's (a local path made absolute), or `None`.
        text_column: the text column of `corpus`.
        seed: seeds the random passages that top up an example left short of K.
        train_data: the `--train-data` file; recorded by its content's SHA-256.
    """

    negatives: int
    margin: float
    window: tuple[int, int]
    model: str
    corpus: str | None
    text_column: str
    seed: int
    train_data: str

    def record(self) -> dict:
        """The settings as mining.json records them, the training data by content (JSON types: the window a list)."""
        fields = asdict(self)
        fields["train_data_sha256"] = hashlib.sha256(Path(fields.pop("train_data")).read_bytes()).hexdigest()
        return json.loads(json.dumps(fields))


@dataclass
class MinedSet:
    """Every training example with its negatives (`{"query", "positive", "negatives"}`), and what mining found."""

    rows: list[dict]
    queries: int
    hard: int  # hard negatives mined, over all examples
    short_queries: int  # queries with an example left short of K by the guards
    random: int  # random passages that topped those examples up

    def summary(self, negatives: int) -> str:
        """One sentence on what was mined, for the console."""
        examples = len(self.rows)
        return (
            f"Mined {self.hard:,} hard negatives for {examples:,} examples of {self.queries:,} queries ({negatives} each wanted); "
            f"{self.short_queries:,} queries had fewer than {negatives} after the guards: topped up with {self.random:,} random passages."
        )


def source_name(name: str) -> str:
    """How a model or corpus is recorded: a local path made absolute, a Hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_passages(corpus: str, text_column: str) -> list[str]:
    """The texts of `--corpus`, in any form `retromae pretrain --train-data` reads; `UsageError` naming what is wrong."""
    path = Path(corpus).expanduser()
    if not path.exists() and (path.suffix or not is_hub_id(corpus)):
        raise UsageError(f"--corpus {corpus}: no such file or folder.")
    try:
        dataset = load_corpus(resolve_corpus(corpus), text_column)
    except CorpusError as error:
        raise UsageError(f"--corpus {corpus}: {error}") from None
    return [text for batch in text_batches(dataset) for text in batch.to_pylist()]


def candidate_passages(examples: datasets.Dataset, corpus: list[str]) -> list[str]:
    """The passages to mine from, each once: `corpus` and the training data's positives and negatives."""
    passages = list(corpus)
    for column in examples.column_names[1:]:
        passages += examples[column]
    return list(dict.fromkeys(passages))


def positives_by_query(examples: datasets.Dataset) -> dict[str, set[str]]:
    """Every positive of each query, in the order the queries first appear."""
    positives = {}
    for query, positive in zip(examples["anchor"], examples["positive"]):
        positives.setdefault(query, set()).add(positive)
    return positives


def excluded_passages(row: tuple, positives: dict[str, set[str]]) -> set[str]:
    """What may never be an example's mined negative: its query's positives, the query itself, its own negatives."""
    query, _, *given = row
    return positives[query] | {query, *given}


def check_enough_passages(examples: datasets.Dataset, passages: list[str], negatives: int, corpus: str | None) -> None:
    """Every example has at least K passages to take negatives from besides those excluded; else `UsageError`."""
    known = set(passages)
    positives = positives_by_query(examples)
    for row in zip(*(examples[column] for column in examples.column_names)):
        available = len(passages) - len(excluded_passages(row, positives) & known)
        if available < negatives:
            where = f"--corpus {corpus} and the training data" if corpus else "the training data (no --corpus)"
            raise UsageError(
                f"--mine-hard-negatives {negatives}: {where} hold only {available} passages besides the positives and negatives "
                f"of the query {row[0]!r}; give a --corpus with more passages to mine from, or a smaller K."
            )


def mine(examples: datasets.Dataset, model: SentenceTransformer, settings: MiningSettings, passages: list[str]) -> MinedSet:
    """
    Every example of (anchor, positive, negative_1, ...) with its negatives and K more: the hardest `model`
    ranks within the guards, then random passages where the guards left fewer than K.
    """
    given = len(examples.column_names) - 2
    ranked = ranked_negatives(examples, model, settings, passages, wanted=min(settings.negatives + given, settings.window[1] - settings.window[0]))
    positives = positives_by_query(examples)
    draw = random.Random(settings.seed)
    rows, short, hard = [], set(), 0
    for row in zip(*(examples[column] for column in examples.column_names)):
        excluded = excluded_passages(row, positives)
        found = [passage for passage in ranked.get(row[0], []) if passage not in excluded][: settings.negatives]
        if len(found) < settings.negatives:
            short.add(row[0])
        hard += len(found)
        extra = random_passages(passages, excluded | set(found), settings.negatives - len(found), draw)
        rows.append({"query": row[0], "positive": row[1], "negatives": [*row[2:], *found, *extra]})
    return MinedSet(rows, len(positives), hard, len(short), len(rows) * settings.negatives - hard)


def ranked_negatives(examples: datasets.Dataset, model: SentenceTransformer, settings: MiningSettings, passages: list[str], wanted: int) -> dict[str, list[str]]:
    """Each query's hard negatives within the guards, most similar first (with sentence-transformers' progress bars)."""
    skip, depth = settings.window
    found = mine_hard_negatives(
        examples.select_columns(["anchor", "positive"]),
        model,
        corpus=passages,
        num_negatives=wanted,
        relative_margin=settings.margin,
        range_min=skip,
        range_max=depth,
        sampling_strategy="top",
        output_format="triplet",
        faiss_batch_size=max(1, min(16384, SCORES_AT_ONCE // len(passages))),  # queries ranked at once, without faiss too
        verbose=False,
    )
    ranked = {}
    for query, negative in zip(found["anchor"], found["negative"]):
        ranked.setdefault(query, {})[negative] = None  # a query's negatives come once for each of its positives
    return {query: list(negatives) for query, negatives in ranked.items()}


def random_passages(passages: list[str], excluded: set[str], count: int, draw: random.Random) -> list[str]:
    """`count` distinct passages drawn at random, none of them `excluded` (`check_enough_passages` made sure there are enough)."""
    chosen = []
    while len(chosen) < count:
        passage = passages[draw.randrange(len(passages))]
        if passage not in excluded and passage not in chosen:
            chosen.append(passage)
    return chosen


def reusable_mined_set(folder: Path, settings: MiningSettings) -> Path | None:
    """The mined set in `folder` when it was mined as `settings` say, `None` where there is none; `UsageError` naming a difference."""
    mined, record = folder / MINED_SET, folder / MINING_RECORD
    if not mined.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())["mined_with"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{mined} has no readable {MINING_RECORD} beside it to say how it was mined: pass --overwrite to mine again, "
            f"or train on it as it is with --train-data {mined} and no --mine-hard-negatives."
        ) from None
    wanted = settings.record()
    differences = [f"{FLAGS[name]} was {recorded.get(name)!r}, now {value!r}" for name, value in wanted.items() if recorded.get(name) != value]
    if differences:
        raise UsageError(
            f"{mined} was mined with other settings ({'; '.join(differences)}): pass --overwrite to mine again, "
            "or repeat the settings it was mined with to reuse it."
        )
    return mined


def holds_only_a_mined_set(folder: Path) -> bool:
    """Whether `folder` holds a mined set and nothing else: a run stopped after mining and before its first checkpoint."""
    names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    return MINED_SET in names and names <= {MINED_SET, MINING_RECORD}


def write_mined_set(folder: Path, mined: MinedSet, settings: MiningSettings) -> Path:
    """
    Write the mined set and mining.json to `folder`, each under a temporary name then renamed; the record first
    and any earlier set removed before, so that a set on disk always has its own record beside it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MINED_SET
    path.unlink(missing_ok=True)
    record = {
        "mined_with": settings.record(),
        "train_data": source_name(settings.train_data),
        "examples": len(mined.rows),
        "queries": mined.queries,
        "hard_negatives": mined.hard,
        "short_queries": mined.short_queries,
        "random_negatives": mined.random,
        "sentence_transformers": sentence_transformers.__version__,
    }
    write_atomically(folder / MINING_RECORD, [json.dumps(record, indent=2) + "\n"])
    write_atomically(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in mined.rows))
    return path


def write_atomically(path: Path, lines: Iterable[str]) -> None:
    """Write `lines` to a temporary file beside `path`, then rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(lines)
    os.replace(temporary, path)
