"""`retromae pretrain --eval-retrieval DIR`: retrieval on the user's own BEIR folder at every evaluation of a run.

At step 0 and every `--eval-steps`, the run's encoder ranks the folder's corpus for its judged
queries as `retromae evaluate` ranks it with the run's release at that step: the release's
sentence-transformers model (first-token embedding, cosine similarity, inputs cut at the release's
`max_seq_length`), ranked by `evaluate.rank` and scored by `evaluate.score_run` (trec_eval's
nDCG@10, MRR@10 and Recall@100). A DupMAE run ranks with its sparse release too (SPLADE-max from
the MLM head, `sparse_encoder.splade_model`), as `retromae evaluate --sparse` does, and fuses the
two rankings as `--hybrid` does.

The retrievers are built once, before training, from the starting weights, written and loaded
as the releases are; every evaluation runs them on the training model's own modules (`reading`),
with no copy of the weights, so that under FSDP or DeepSpeed they read the whole weights that
`engines.whole` gives.

A corpus of more than `--eval-retrieval-corpus-size` passages is searched in part: every passage
judged relevant and others drawn at random from the run's seed (`subsampled`).
"""

import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer, SparseEncoder
from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import DiagnosticsError
from .evaluate import BATCH_SIZE, HYBRID_DENSE_WEIGHT, EvaluationError, RetrievalTask, fuse, load_beir, load_model, rank, score_run
from .model_folder import public_name, write_model_files
from .modeling_retromae import RetroMAEForPreTraining
from .settings import PretrainingSettings
from .sparse_encoder import splade_model


FLAG = "--eval-retrieval"


@dataclass(frozen=True)
class RetrievalData:
    """The `--eval-retrieval` folder as the run searches it: its judged queries, the passages searched, the size of its corpus."""

    folder: str
    task: RetrievalTask
    corpus_size: int

    def description(self) -> dict:
        """What the run's record (and so the model card) says of the task: the folder's name, queries, passages searched and in all."""
        return {"data": public_name(self.folder), "queries": len(self.task.queries), "documents": len(self.task.corpus), "corpus": self.corpus_size}


def read_retrieval_data(settings: PretrainingSettings) -> RetrievalData | None:
    """
    The `--eval-retrieval` folder, read and checked before any model is loaded, cut down to
    `--eval-retrieval-corpus-size` passages (said once on the console); `None` without the flag.
    A folder that is not one `retromae evaluate` reads is a `DiagnosticsError` naming the file and the problem.
    """
    if settings.eval_retrieval is None:
        return None
    folder = settings.eval_retrieval
    if not Path(folder).expanduser().is_dir():
        state = "not a folder" if Path(folder).expanduser().exists() else "no such folder"
        raise DiagnosticsError(f"{FLAG} {folder}: {state} (give a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv).")
    try:
        task = load_beir(Path(folder).expanduser())
    except EvaluationError as error:
        raise DiagnosticsError(f"{FLAG} {folder}: {error}") from None
    searched = subsampled(task, settings.eval_retrieval_corpus_size, settings.seed)
    if len(searched.corpus) < len(task.corpus) and os.environ.get("RANK", "0") == "0":
        judged = len({document for documents in task.relevant.values() for document in documents})
        print(
            f"{FLAG} {folder}: {len(searched.corpus):,} of its {len(task.corpus):,} passages are searched, the {judged:,} judged "
            f"relevant and {len(searched.corpus) - judged:,} drawn at random (seed {settings.seed}); the figures of a part of "
            "a corpus are higher than those of the whole (docs/diagnostics.md)."
        )
    return RetrievalData(folder, searched, len(task.corpus))


def subsampled(task: RetrievalTask, size: int, seed: int) -> RetrievalTask:
    """
    `task` with at most `size` passages, in the corpus's order: every passage judged relevant to a
    query (all of them, should they be more than `size`) and as many others as fit, drawn with `seed`.
    """
    if len(task.corpus) <= size:
        return task
    judged = {document for documents in task.relevant.values() for document in documents}
    others = [document for document in task.corpus if document not in judged]
    kept = judged | set(random.Random(seed).sample(others, max(0, size - len(judged))))
    return RetrievalTask(corpus={d: text for d, text in task.corpus.items() if d in kept}, queries=task.queries, relevant=task.relevant)


@dataclass
class RetrievalEvaluation:
    """
    The task and the retrievers of the run's releases: `dense` as `retromae evaluate` loads
    OUTPUT_DIR/model, `sparse` as it loads a DupMAE run's OUTPUT_DIR/sparse (`None` for RetroMAE).
    Between evaluations they hold no weights (`reading` lends them the training model's).
    """

    data: RetrievalData
    dense: SentenceTransformer
    sparse: SparseEncoder | None

    @classmethod
    def build(
        cls, data: RetrievalData, model: RetroMAEForPreTraining, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
    ) -> "RetrievalEvaluation":
        """The retrievers of `model`'s releases, whose inputs are cut at `max_seq_length` tokens (`release_max_seq_length`)."""
        with tempfile.TemporaryDirectory() as folder:
            write_model_files(Path(folder), model.released_encoder(with_mlm_head=False), tokenizer, {"max_seq_length": max_seq_length})
            dense = load_model(folder, FLAG)  # the release's files, loaded by the loader of `retromae evaluate`
            sparse = splade_model(model.released_encoder(), tokenizer, max_seq_length) if model.config.objective == "dupmae" else None
        for retriever in (dense, sparse):
            if retriever is not None:
                retriever[0].model = None  # the starting weights' copy: each evaluation lends the training model's
        return cls(data, dense, sparse)

    def first_texts(self, count: int) -> list[str]:
        """The first `count` passages of the corpus that hold text."""
        return [text for text in self.data.task.corpus.values() if text.strip()][:count]


@contextlib.contextmanager
def reading(retriever: SentenceTransformer | SparseEncoder, weights: nn.Module) -> Iterator[SentenceTransformer | SparseEncoder]:
    """`retriever` running `weights`, the training model's module that does its transformer's work (the base model, or the encoder with its MLM head)."""
    retriever[0].model = weights
    try:
        yield retriever
    finally:
        retriever[0].model = None


@torch.no_grad()
def evaluate_retrieval(model: RetroMAEForPreTraining, evaluation: RetrievalEvaluation) -> dict[str, float]:
    """
    The figures of `model` on the task, with dropout off (the model's mode is restored): `dense_`
    (nDCG@10, MRR@10, Recall@100 of the first-token embedding, named `dense_ndcg_at_10`, ...) and,
    for DupMAE, `sparse_` and `hybrid_` (the fusion, the dense ranking weighing `HYBRID_DENSE_WEIGHT`);
    the queries, the passages searched, and the seconds it took.
    """
    task, started, training = evaluation.data.task, time.perf_counter(), model.training
    model.eval()
    try:
        with reading(evaluation.dense, model.encoder.base_model) as dense:
            dense_run = rank(dense, task, BATCH_SIZE, progress=False)
        figures = named("dense", score_run(dense_run, task.relevant))
        if evaluation.sparse is not None:
            with reading(evaluation.sparse, model.encoder) as sparse:
                sparse_run = rank(sparse, task, BATCH_SIZE, progress=False)
            figures |= named("sparse", score_run(sparse_run, task.relevant))
            figures |= named("hybrid", score_run(fuse(dense_run, sparse_run, HYBRID_DENSE_WEIGHT), task.relevant))
    finally:
        model.train(training)
    sizes = {"retrieval_queries": len(task.queries), "retrieval_documents": len(task.corpus)}
    return sizes | figures | {"retrieval_seconds": round(time.perf_counter() - started, 2)}


def named(retriever: str, figures: dict[str, float]) -> dict[str, float]:
    """`retromae evaluate`'s figures (`ndcg@10`, ...) under the names an evaluation record gives them (`dense_ndcg_at_10`, ...)."""
    return {f"{retriever}_{metric.replace('@', '_at_')}": value for metric, value in figures.items()}
