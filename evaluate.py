"""`retromae evaluate`: dense retrieval on a BEIR-format folder, embedded by sentence-transformers, scored by trec_eval.

A BEIR folder holds `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`)
and `qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`; a header line is allowed). The
scores are relevance grades: the figures are trec_eval's (through `pytrec_eval`), as BEIR and
MTEB report them, so nDCG@10 gains by grade on graded sets such as TREC-COVID or NFCorpus.

A sparse (SPLADE) model is scored the same way, ranking by the dot product of its sparse
embeddings. A hybrid run fuses a dense and a sparse ranking (`fuse`): each retriever's scores of a
query's top `RANKED` documents are min-max normalised to [0, 1], a document it did not retrieve
counts 0, and the fused score is w * dense + (1 - w) * sparse.
"""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytrec_eval
import torch
from sentence_transformers import SentenceTransformer, SparseEncoder
from sentence_transformers.util import load_file_path

from .data import json_lines, tsv_rows
from .errors import UsageError, loading
from .sentence_transformer import load_sentence_transformer
from .sparse_encoder import is_sparse_folder, load_sparse_encoder


METRICS = ("ndcg@10", "mrr@10", "recall@100")
RANKED = 100  # documents retrieved per query: the deepest cut of METRICS
HYBRID_DENSE_WEIGHT = 0.5  # the dense ranking's weight in a fusion: the two count alike
BATCH_SIZE = 32  # texts per encoding batch


class EvaluationError(UsageError):
    """A retrieval task or model that cannot be evaluated; the message names the file and the problem."""


@dataclass
class RetrievalTask:
    """Documents and queries by id; `relevant[query][document]` is a relevance grade, 1 or more."""

    corpus: dict[str, str]
    queries: dict[str, str]
    relevant: dict[str, dict[str, int]]


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
    """The records of a BEIR JSON-lines file; a missing or null field, a title that is not text or a repeated id is refused by line."""
    records, lines = [], {}
    for number, record in json_lines(path, EvaluationError):
        if not isinstance(record, dict) or record.get("_id") is None or not isinstance(record.get("text"), str):
            raise EvaluationError(f"{path}:{number} needs an '_id' and a string 'text' (null is neither).")
        if not isinstance(record.get("title", ""), str):
            raise EvaluationError(f"{path}:{number}: 'title' must be a string (or left out), got {json.dumps(record['title'])}.")
        record["_id"] = str(record["_id"])
        if record["_id"] in lines:
            raise EvaluationError(f"{path}:{number}: '_id' {record['_id']!r} repeats line {lines[record['_id']]}.")
        lines[record["_id"]] = number
        records.append(record)
    return records


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    """The grade of each relevant document (score > 0) per query; ids absent from queries or corpus raise naming the line."""
    relevant: dict[str, dict[str, int]] = {}
    for number, row in tsv_rows(path, EvaluationError):
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
            relevant.setdefault(query, {})[document] = score
    if not relevant:
        raise EvaluationError(f"{path} judges no document relevant.")
    return relevant


def load_model(model_name_or_path: str, what: str = "MODEL") -> SentenceTransformer:
    """The dense model to evaluate (see `load_sentence_transformer`), given as `what`; one that cannot be loaded, or is sparse, raises `UsageError` naming it."""
    with loading(what, model_name_or_path):
        check_kind(what, model_name_or_path, sparse=False)
        return load_sentence_transformer(model_name_or_path)


def load_sparse_model(model_name_or_path: str, what: str = "MODEL") -> SparseEncoder:
    """The sparse model to evaluate (see `load_sparse_encoder`), given as `what`; one that cannot be loaded, or is not sparse, raises `UsageError` naming it."""
    with loading(what, model_name_or_path):
        check_kind(what, model_name_or_path, sparse=True)
        return load_sparse_encoder(model_name_or_path)


def check_kind(what: str, model_name_or_path: str, sparse: bool) -> None:
    """
    Refuse a saved sentence-transformers model of the other kind than `what` takes, before it is loaded: the dense
    loader would take a SPLADE model's encoder without its MLM head, under a pooler made up for it, and report figures of neither.
    """
    modules = load_file_path(model_name_or_path, "modules.json")
    if modules is None or is_sparse_folder(Path(modules).parent) == sparse:
        return
    wanted, found, use = (
        ("sparse (SPLADE)", "a dense one (its modules.json has no SpladePooling)", "without --sparse, or first in --hybrid DENSE SPARSE")
        if sparse
        else ("dense", "a sparse (SPLADE) one (its modules.json ends in SpladePooling)", "with --sparse, or second in --hybrid DENSE SPARSE")
    )
    raise EvaluationError(f"{what} {model_name_or_path} is not a {wanted} model: it is {found}; evaluate it {use}.")


def evaluate(model: SentenceTransformer | SparseEncoder, task: RetrievalTask, batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """nDCG@10 (graded), MRR@10 and Recall@100 of `model` on `task`, ranking by the model's own similarity."""
    return score_run(rank(model, task, batch_size), task.relevant)


def score_run(run: dict[str, dict[str, float]], relevant: dict[str, dict[str, int]]) -> dict[str, float]:
    """trec_eval's nDCG@10 (graded), MRR@10 and Recall@100 of a run (documents best first), averaged over the judged queries."""
    top_ten = {query: dict(list(ranked.items())[:10]) for query, ranked in run.items()}
    trec_eval = pytrec_eval.RelevanceEvaluator(relevant, {"ndcg_cut.10", "recall.100"})
    per_query = trec_eval.evaluate(run)
    reciprocal_ranks = pytrec_eval.RelevanceEvaluator(relevant, {"recip_rank"}).evaluate(top_ten)
    return {
        "ndcg@10": statistics.fmean(figures["ndcg_cut_10"] for figures in per_query.values()),
        "mrr@10": statistics.fmean(figures["recip_rank"] for figures in reciprocal_ranks.values()),
        "recall@100": statistics.fmean(figures["recall_100"] for figures in per_query.values()),
    }


def evaluate_hybrid(
    dense: SentenceTransformer, sparse: SparseEncoder, task: RetrievalTask, dense_weight: float, batch_size: int = BATCH_SIZE
) -> dict[str, float]:
    """The figures of `fuse`'s ranking of `task` by the dense and the sparse model, the dense one weighing `dense_weight`."""
    return score_run(fuse(rank(dense, task, batch_size), rank(sparse, task, batch_size), dense_weight), task.relevant)


def fuse(dense: dict[str, dict[str, float]], sparse: dict[str, dict[str, float]], dense_weight: float) -> dict[str, dict[str, float]]:
    """
    The hybrid run: per query, w * n_dense(d) + (1 - w) * n_sparse(d) over the documents either retrieved, best first, cut at `RANKED`.

    n is min-max normalisation over the retriever's own ranked list, (s - min) / (max - min), 1 where
    all its scores are equal; a document the retriever did not retrieve gets 0 from it.
    """
    fused = {}
    for query in dense:
        normalised_dense, normalised_sparse = min_max(dense[query]), min_max(sparse[query])
        scores = {
            document: dense_weight * normalised_dense.get(document, 0.0) + (1 - dense_weight) * normalised_sparse.get(document, 0.0)
            for document in normalised_dense | normalised_sparse
        }
        fused[query] = dict(sorted(scores.items(), key=lambda item: item[1], reverse=True)[:RANKED])
    return fused


def min_max(scores: dict[str, float]) -> dict[str, float]:
    low, high = min(scores.values()), max(scores.values())
    return {document: (value - low) / (high - low) if high > low else 1.0 for document, value in scores.items()}


def rank(model: SentenceTransformer | SparseEncoder, task: RetrievalTask, batch_size: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """The `RANKED` most similar documents of every query, best first, with their similarity: a trec_eval run (with a progress bar unless not `progress`)."""
    document_ids, query_ids = list(task.corpus), list(task.queries)
    encode = dict(batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
    documents = model.encode_document([task.corpus[d] for d in document_ids], **encode)
    queries = model.encode_query([task.queries[q] for q in query_ids], **encode)
    run = {}
    for start in range(0, len(query_ids), 256):
        block = torch.arange(start, min(start + 256, len(query_ids)), device=queries.device)
        similarity = model.similarity(queries.index_select(0, block), documents)  # (queries, documents); sparse rows do not slice
        scores, indices = similarity.topk(min(RANKED, len(document_ids)), dim=1)
        for query, row_scores, row_indices in zip(query_ids[start : start + 256], scores.tolist(), indices.tolist()):
            run[query] = {document_ids[i]: score for i, score in zip(row_indices, row_scores)}
    return run

