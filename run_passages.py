"""The passages of a pre-training run: those it trains on, and those it holds out to evaluate on.

Records become passages of at most `--max-length` tokens (`PassageSplitter` or `FirstPassage`);
the training passages are read as the run goes or cut before it (`training_passages`); the
held-out passages come from `--eval-data` or the records `--eval-split` takes out of training,
with their masks drawn once (`held_out_set`, `HeldOutSet`).
"""

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from .collator import RetroMAECollator, special_token_ids
from .corpus import CorpusCounts, CorpusSource, load_corpus, resolve_corpus
from .data import CorpusError, demo_corpus
from .errors import DiagnosticsError
from .passages import FirstPassage, PassageSplitter, TrainedPassages
from .settings import MIN_PASSAGES, PretrainingSettings


STREAM_BATCH = 64


# Records read before training to check that the tokenizer can spell the corpus, and the share of all-[UNK] passages refused.
SPELLING_SAMPLE = 256
UNSPELLABLE_SHARE = 0.9
LENGTH_GROUP_BATCHES = 64


def training_passages(settings: PretrainingSettings, source: CorpusSource | None, tokenizer, counts: CorpusCounts) -> tuple:
    """
    The passages to train on and the number of records they came from (`None` for a stream,
    whose records are counted as they are read, in `counts["read"]`).

    Records are tokenized into passages: with `--passages split` long records are cut into
    consecutive passages (`PassageSplitter`), with `truncate` each gives its first (`FirstPassage`).
    Passages with no text are left out and counted (`TrainedPassages`). A run with a step budget
    (`--max-steps`, always the case for a stream) cuts lazily in the data loader, 64 records at a
    time, from a shuffled order of the records, so that training starts at once. A run counted in
    epochs needs the number of passages first, so it cuts the whole corpus before training, in
    `--dataloader-num-workers` processes (cached by `datasets`: a resumed run does not cut again).
    """
    dataset = load_corpus(source, settings.text_column, settings.streaming, settings.skip_bad_records, counts) if source else demo_corpus()
    sample = load_corpus(source, settings.text_column, True, settings.skip_bad_records) if settings.streaming else dataset  # a stream of its own: the run's counts its records
    check_spelling(sample, tokenizer, settings.max_length)
    dataset = without_held_out(dataset, settings)
    records = None if settings.streaming else len(dataset)
    cut = passage_cutter(settings, tokenizer)
    trained = TrainedPassages(tokenizer, counts)
    if settings.streaming or settings.max_steps > 0:
        if not settings.streaming:
            dataset = dataset.shuffle(seed=settings.seed).to_iterable_dataset(num_shards=max(1, settings.dataloader_num_workers))
        dataset = dataset.map(cut, batched=True, batch_size=STREAM_BATCH, remove_columns=["text"]).map(trained, batched=True, batch_size=STREAM_BATCH)
        dataset = dataset.shuffle(seed=settings.seed, buffer_size=settings.shuffle_buffer)
    else:
        workers = settings.dataloader_num_workers if settings.dataloader_num_workers > 1 else None
        dataset = trained.select(
            dataset.map(cut, batched=True, remove_columns=["text"], num_proc=workers, desc="Cutting records into passages")
        )
    if settings.group_by_length:
        dataset = grouped_by_length(dataset, settings)
    return dataset, records


def check_spelling(dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """
    Refuse a corpus the tokenizer cannot spell: if nearly every passage of its first records is
    nothing but [UNK] (a tokenizer of another script, or of special tokens alone), the run would
    learn to rebuild [UNK] and release an encoder that embeds nothing.
    """
    texts = first_texts(dataset, SPELLING_SAMPLE)
    if tokenizer.unk_token_id is None or not texts:  # no record read: training names what is wrong with the corpus
        return
    special = set(special_token_ids(tokenizer))
    passages = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    with_text = [(text, ids) for text, ids in zip(texts, passages) if any(i not in special for i in ids)]
    unknown = [text for text, ids in with_text if all(i == tokenizer.unk_token_id or i in special for i in ids)]
    if with_text and len(unknown) >= UNSPELLABLE_SHARE * len(with_text):
        raise CorpusError(
            f"The tokenizer cannot spell this corpus: {len(unknown)} of the first {len(with_text)} passages are nothing "
            f"but [UNK] (for example {unknown[0][:80]!r}). Give the tokenizer of the model's language (--tokenizer)."
        )


def first_texts(dataset, count: int) -> list[str]:
    """The texts of a corpus's first `count` records, or of those before a bad one, which training itself meets and reports."""
    texts = []
    try:
        for record in itertools.islice(dataset, count):
            texts.append(record["text"])
    except CorpusError:
        pass
    return texts


def grouped_by_length(dataset, settings: PretrainingSettings):
    """
    Passages of similar length batched together (`--group-by-length`).

    A dataset read in full gets a `length` column (tokens) for the Trainer's length-grouped
    sampler. A stream or lazily cut corpus is grouped as it is read: each window of
    `LENGTH_GROUP_BATCHES` batches is sorted by length, cut into batches, and the batches are put
    in a random order.
    """
    if isinstance(dataset, datasets.Dataset):
        return dataset.map(lambda batch: {"length": [len(ids) for ids in batch["input_ids"]]}, batched=True, desc="Measuring passages")
    window = settings.batch_size * LENGTH_GROUP_BATCHES
    return dataset.map(LengthGroups("input_ids", settings.batch_size, settings.seed), batched=True, batch_size=window)


class LengthGroups:
    """`datasets.map` function (batched): a window of passages reordered into batches of similar length, in a random order."""

    def __init__(self, column: str, batch_size: int, seed: int):
        self.column, self.batch_size, self.seed = column, batch_size, seed

    def __call__(self, window: dict[str, list]) -> dict[str, list]:
        lengths = [len(item) for item in window[self.column]]
        by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches = [by_length[start : start + self.batch_size] for start in range(0, len(by_length), self.batch_size)]
        random.Random(f"{self.seed}:{lengths}").shuffle(batches)
        order = [index for batch in batches for index in batch]
        return {name: [values[index] for index in order] for name, values in window.items()}


READ_BATCH = 64  # held-out records cut into passages this many at a time


def is_held_out(text: str, share: float, seed: int) -> bool:
    """Whether `--eval-split` holds this record out: a seeded hash of its text, so a record is on one side in any order, stream or process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < share * 2**64


def without_held_out(dataset, settings: PretrainingSettings):
    """The training corpus without the records `--eval-split` holds out (the corpus as it is without the flag)."""
    if settings.eval_split is None:
        return dataset
    share, seed = settings.eval_split, settings.seed
    return dataset.filter(lambda batch: [not is_held_out(text, share, seed) for text in batch["text"]], batched=True)


def held_out_set(settings: PretrainingSettings, source: CorpusSource | None, tokenizer: PreTrainedTokenizerBase, collator: RetroMAECollator):
    """
    The `HeldOutSet` of `--eval-data` or `--eval-split`, or `None` without either.

    The records are read as a stream, only as far as `--eval-size` passages need, and cut into
    passages as training cuts them (`--passages`); `--eval-split` takes the training corpus's
    held-out records (`is_held_out`), which training leaves out (`without_held_out`).
    """
    if settings.eval_data is not None:
        where = f"--eval-data {settings.eval_data}"
        try:
            records = load_corpus(resolve_corpus(settings.eval_data, settings.dataset_config, settings.dataset_split), settings.text_column, True, settings.skip_bad_records)
            texts = (record["text"] for record in records)
            passages = first_passages(texts, passage_cutter(settings, tokenizer), settings.eval_size, collator)
        except CorpusError as error:
            raise DiagnosticsError(f"{where}: {error}") from None
    elif settings.eval_split is not None:
        where = f"--eval-split {settings.eval_split}"
        records = load_corpus(source, settings.text_column, True, settings.skip_bad_records) if source else demo_corpus()
        texts = (record["text"] for record in records if is_held_out(record["text"], settings.eval_split, settings.seed))
        passages = first_passages(texts, passage_cutter(settings, tokenizer), settings.eval_size, collator)
    else:
        return None
    if len(passages) < MIN_PASSAGES:
        raise DiagnosticsError(
            f"{where} gives {len(passages)} held-out passages; evaluation needs at least {MIN_PASSAGES}"
            + (": hold out a larger share." if settings.eval_data is None else ".")
        )
    return HeldOutSet.from_passages(passages, collator, settings.batch_size, settings.seed)


def passage_cutter(settings: PretrainingSettings, tokenizer: PreTrainedTokenizerBase):
    """Records to passages (token ids without special tokens) as `--passages` cuts the training records."""
    return (PassageSplitter if settings.passages == "split" else FirstPassage)(tokenizer, settings.max_length)


def first_passages(texts: Iterable[str], cut, size: int, collator: RetroMAECollator) -> list[list[int]]:
    """The first `size` passages of `texts` whose two halves each hold a token that is not special."""
    passages = []
    for chunk in chunked(texts, READ_BATCH):
        passages += [ids for ids in cut({"text": chunk})["input_ids"] if halves_have_content(ids, collator)]
        if len(passages) >= size:
            break
    return passages[:size]


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def halves(ids: list[int]) -> tuple[list[int], list[int]]:
    """A passage's token ids cut in two: the first half (the shorter, for an odd length) and the second."""
    return ids[: len(ids) // 2], ids[len(ids) // 2 :]


def halves_have_content(ids: list[int], collator: RetroMAECollator) -> bool:
    return all(not collator.is_special[torch.tensor(half, dtype=torch.long)].all() for half in halves(ids))


@dataclass
class HeldOutSet:
    """
    The held-out passages, made into batches once: every evaluation reads the same masks.

    Args:
        batches: the passages as `RetroMAECollator` batches (masks drawn by the run's collator, from its seed).
        derangement: (passages,) whose `h_X` each passage's decoder is given in the embedding-information
            probe: a single cycle over the set, so never a passage's own.
        first_halves, second_halves: `(input_ids, attention_mask)` batches of the passages' halves, with special tokens.
    """

    batches: list[dict[str, torch.Tensor]]
    derangement: torch.LongTensor
    first_halves: list[tuple[torch.LongTensor, torch.Tensor]]
    second_halves: list[tuple[torch.LongTensor, torch.Tensor]]

    @classmethod
    def from_passages(cls, passages: list[list[int]], collator: RetroMAECollator, batch_size: int, seed: int) -> "HeldOutSet":
        """Batch `passages` (sorted by length, so that little is padding) and draw their masks and the derangement."""
        passages = sorted(passages, key=len)
        groups = [passages[start : start + batch_size] for start in range(0, len(passages), batch_size)]
        order = torch.randperm(len(passages), generator=torch.Generator().manual_seed(seed))
        derangement = torch.empty_like(order)
        derangement[order] = order.roll(-1)  # each passage takes the next one's h_X in a random cycle
        return cls(
            batches=[collator(group) for group in groups],
            derangement=derangement,
            first_halves=[padded(collator, [halves(ids)[0] for ids in group]) for group in groups],
            second_halves=[padded(collator, [halves(ids)[1] for ids in group]) for group in groups],
        )

    def __len__(self) -> int:
        return len(self.derangement)


def padded(collator: RetroMAECollator, sequences: list[list[int]]) -> tuple[torch.LongTensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id sequences, with the first token and separator added as the collator adds them."""
    input_ids, attention_mask = collator.pad(collator.tokenize(sequences))
    return input_ids, attention_mask.long()
