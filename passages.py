"""Long documents cut into passages: consecutive whole sentences, each at most `max_length` tokens.

A record longer than the model reads is not truncated (its rest would never be seen) but cut
into consecutive passages. Each passage holds whole sentences; a sentence longer than a passage
is cut between words, and a word longer than a passage between tokens. The cutting is a
`datasets.map` (batched: lazily in the data loader for a run with a step budget or a stream, in
`num_proc` processes before training for a run counted in epochs), so it stays out of the step.
"""

import re

import numpy as np
from transformers import PreTrainedTokenizerBase


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
        """The passages of one record: its sentences packed in order, none over the budget."""
        if len(ids) <= self.budget:
            return [ids] if ids else []
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
