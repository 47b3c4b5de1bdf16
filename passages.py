"""Long documents cut into passages: consecutive whole sentences, each at most `max_length` tokens.

A record longer than the model reads is not truncated (its rest would never be seen) but cut
into consecutive passages. Each passage holds whole sentences; a sentence longer than a passage
is cut between words, and a word longer than a passage between tokens. The cutting is a
`datasets.map` (batched: lazily in the data loader for a run with a step budget or a stream, in
`num_proc` processes before training for a run counted in epochs), so it stays out of the step.
With `--passages truncate` a record gives its first passage only (`FirstPassage`).

A passage with no text left after tokenization (nothing but special tokens: a line of zero-width
or control characters, a line "[SEP]") has nothing to rebuild: `TrainedPassages` leaves it out
and counts it. A passage of nothing but [UNK] (an emoji-only line, a URL or a 200-character
"word" the vocabulary cannot spell) is text: it is trained, as in the authors' code, and counted,
so that a run says how much of its corpus the vocabulary could not spell.
"""

import re

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from .collator import special_token_ids, vocabulary_flags
from .corpus import ARROW_BATCH, CorpusCounts


# A sentence ends at . ! ? (and their CJK forms), after any closing quotes or brackets, before white space.
SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*\s+")
SPECIAL_TOKENS_PER_PASSAGE = 2  # the collator adds the first token ([CLS] / <s>) and the separator


class PassageSplitter:
    """
    `datasets.map` function (batched): `text` records in, `input_ids` passages out (special tokens not included).

    Args:
        tokenizer: the encoder's fast tokenizer (it reports each token's characters).
        max_length: tokens per passage, the two special tokens included, as `--max-length`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer = tokenizer
        self.budget = max_length - SPECIAL_TOKENS_PER_PASSAGE

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        encoded = self.tokenizer(batch["text"], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        passages = []
        for text, ids, offsets in zip(batch["text"], encoded["input_ids"], encoded["offset_mapping"]):
            passages.extend(self.split(text, ids, offsets))
        return {"input_ids": passages}

    def split(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[list[int]]:
        """The passages of one record: its sentences packed in order, none over the budget (one empty passage for no tokens)."""
        if len(ids) <= self.budget:
            return [ids]
        starts = np.array([start for start, _ in offsets])
        units = []
        for first, last in spans(sentence_of_each_token(text, starts)):
            units += [(first, last)] if last - first <= self.budget else self.cut_sentence(text, starts, first, last)
        return [ids[first:last] for first, last in pack(units, self.budget)]

    def cut_sentence(self, text: str, starts: np.ndarray, first: int, last: int) -> list[tuple[int, int]]:
        """A sentence longer than a passage, as runs of whole words (a word longer than a passage cut between tokens)."""
        begins_word = np.array([start == 0 or text[start - 1].isspace() for start in starts[first:last]])
        words = spans(np.cumsum(begins_word))
        pieces = []
        for word_first, word_last in words:
            pieces += [(first + a, first + min(a + self.budget, word_last)) for a in range(word_first, word_last, self.budget)]
        return pieces


class FirstPassage(PassageSplitter):
    """`datasets.map` function (batched) for `--passages truncate`: each record's first `max_length` tokens, special tokens included."""

    def split(self, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[list[int]]:
        return [ids[: self.budget]]


class TrainedPassages:
    """
    The passages with text to rebuild; those without are left out and counted (`counts["empty"]`).

    A passage has text when it holds a token other than the special ones ([UNK] is text, see
    `special_token_ids`). Passages of nothing but [UNK] are kept and counted (`counts["unknown"]`).
    Called on a batch of a stream (a batched `datasets.map` function, in the data-loader workers);
    `select` does the same for a dataset cut before training, with Arrow, every time (a cached cut
    is counted too).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, counts: CorpusCounts):
        self.is_special = vocabulary_flags(special_token_ids(tokenizer), len(tokenizer)).numpy()
        self.unknown_id = -1 if tokenizer.unk_token_id is None else tokenizer.unk_token_id
        self.counts = counts

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        lengths = [len(ids) for ids in batch["input_ids"]]
        tokens = np.fromiter((i for ids in batch["input_ids"] for i in ids), dtype=np.int64, count=sum(lengths))
        kept = self.kept(tokens, np.repeat(np.arange(len(lengths)), lengths), len(lengths))
        return {name: [value for value, keep in zip(values, kept) if keep] for name, values in batch.items()}

    def select(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """The passages of a dataset with text, read as memory-mapped Arrow arrays a batch at a time."""
        kept, offset = [], 0
        for table in dataset.with_format("arrow").iter(batch_size=ARROW_BATCH):
            passages = table.column("input_ids").combine_chunks()
            keep = self.kept(passages.flatten().to_numpy(), pc.list_parent_indices(passages).to_numpy(), len(passages))
            kept.append(np.flatnonzero(keep) + offset)
            offset += len(passages)
        indices = np.concatenate(kept) if kept else np.array([], dtype=np.int64)
        return dataset if len(indices) == len(dataset) else dataset.select(indices)

    def kept(self, tokens: np.ndarray, passage_of_token: np.ndarray, count: int) -> np.ndarray:
        """(count,) True for the passages with text; counts those without and those of nothing but [UNK]."""
        text = np.bincount(passage_of_token[~self.is_special[tokens]], minlength=count)
        unknown = np.bincount(passage_of_token[tokens == self.unknown_id], minlength=count)
        self.counts.add("empty", int((text == 0).sum()))
        self.counts.add("unknown", int(((text > 0) & (unknown == text)).sum()))
        return text > 0


def sentence_of_each_token(text: str, token_starts: np.ndarray) -> np.ndarray:
    """(tokens,) index of the sentence each token starts in."""
    sentence_starts = np.array([match.end() for match in SENTENCE_END.finditer(text)], dtype=np.int64)
    return np.searchsorted(sentence_starts, token_starts, side="right")


def spans(labels: np.ndarray) -> list[tuple[int, int]]:
    """(first, last + 1) of each run of equal consecutive labels."""
    if len(labels) == 0:
        return []
    breaks = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    bounds = [0, *breaks.tolist(), len(labels)]
    return list(zip(bounds[:-1], bounds[1:]))


def pack(units: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Consecutive units (token spans, each within the budget) joined greedily into passages within the budget."""
    passages = []
    for first, last in units:
        if passages and last - passages[-1][0] <= budget:
            passages[-1] = (passages[-1][0], last)
        else:
            passages.append((first, last))
    return passages
