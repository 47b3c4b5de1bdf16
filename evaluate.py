"""`retromae evaluate`: dense retrieval on a BEIR-format folder, scored by sentence-transformers.

A BEIR folder holds `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`)
and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`; a header line is allowed). The
figures are those of sentence-transformers' `InformationRetrievalEvaluator`.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from .data import json_lines
from .sentence_transformer import load_sentence_transformer



METRICS = ("ndcg@10", "mrr@10", "recall@100")


class EvaluationError(ValueError):
    """A retrieval task or model that cannot be evaluated; the message names the file and the problem."""


@dataclass
class RetrievalTask:
    corpus: dict[str, str]
    queries: dict[str, str]
    relevant: dict[str, set[str]]


def load_beir(folder: str | Path, split: str = "test") -> RetrievalTask:
    """The judged queries of `split`, the corpus and the relevance judgements of a BEIR folder."""
    folder = Path(folder)
    paths = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    for path in paths:
        if not path.is_file():
            raise EvaluationError(f"{path} is missing: a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv.")
    corpus = {record["_id"]: f"{record.get('title', '')} {record['text']}".strip() for record in read_jsonl(paths[0])}
    if not corpus:
        raise EvaluationError(f"{paths[0]} holds no documents.")
    queries = {record["_id"]: record["text"] for record in read_jsonl(paths[1])}
    relevant = read_qrels(paths[2], queries, corpus)
    return RetrievalTask(corpus=corpus, queries={q: queries[q] for q in relevant}, relevant=relevant)


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, record in json_lines(path, EvaluationError):
        if not isinstance(record, dict) or "_id" not in record or not isinstance(record.get("text"), str):
            raise EvaluationError(f"{path}:{number} needs an '_id' and a string 'text'.")
        record["_id"] = str(record["_id"])
        records.append(record)
    return records


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, set[str]]:
    """Relevant documents per query (score > 0); ids absent from queries or corpus raise naming the line."""
    relevant: dict[str, set[str]] = {}
    with open(path, encoding="utf-8", newline="") as lines:
        for number, row in enumerate(csv.reader(lines, delimiter="\t"), start=1):
            if not row or (number == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3 or not row[2].lstrip("-").isdigit():
                raise EvaluationError(f"{path}:{number} is not 'query-id<TAB>corpus-id<TAB>score'.")
            query, document, score = row[0], row[1], int(row[2])
            if query not in queries:
                raise EvaluationError(f"{path}:{number}: query {query!r} is not in queries.jsonl.")
            if document not in corpus:
                raise EvaluationError(f"{path}:{number}: document {document!r} is not in corpus.jsonl.")
            if score > 0:
                relevant.setdefault(query, set()).add(document)
    if not relevant:
        raise EvaluationError(f"{path} judges no document relevant.")
    return relevant


def load_model(model_name_or_path: str) -> SentenceTransformer:
    """The model to evaluate (see `load_sentence_transformer`); a folder that is not a model raises `EvaluationError`."""
    try:
        return load_sentence_transformer(model_name_or_path)
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def evaluate(model: SentenceTransformer, task: RetrievalTask, batch_size: int = 32) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@100 of `model` on `task`, with the model's own similarity."""
    evaluator = InformationRetrievalEvaluator(
        queries=task.queries,
        corpus=task.corpus,
        relevant_docs=task.relevant,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1],
        precision_recall_at_k=[100],
        map_at_k=[100],
        show_progress_bar=True,
        batch_size=batch_size,
        write_csv=False,
        score_functions={"score": model.similarity},
    )
    scores = evaluator(model)
    return {metric: float(scores[f"score_{metric}"]) for metric in METRICS}
