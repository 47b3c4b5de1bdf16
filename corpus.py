"""Pre-training corpora as users hold them: files of the common formats, saved datasets, Hub datasets.

`--train-data` names one of:
- files, or folders of them, in one format: plain text (a record per line), JSON lines, parquet,
  Arrow, CSV or TSV, each optionally compressed (.gz, .bz2, .xz, .zst);
- a folder written by `datasets.save_to_disk`;
- a Hub dataset id (with `--dataset-config` and `--dataset-split`).

`resolve_corpus` checks the name before anything is read. `load_corpus` then reads the text
column (`--text-column`), in one of two ways, neither with a pass over the corpus before training:
- memory-mapped: `datasets` builds its Arrow cache with its own fast readers and the text column
  is checked with Arrow compute. Only when something is wrong are the files read again, record by
  record, to name the file and the line or record;
- streamed (`--streaming`): records are read lazily and each is checked as it is read.
A bad record (not UTF-8, not JSON, without a string text) raises `CorpusError` naming it, or,
with `skip_bad_records`, is counted (`skipped_records`) and left out.
"""

import bz2
import csv
import gzip
import io
import json
import lzma
import multiprocessing
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .data import CorpusError
from .errors import is_hub_id


FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".tsv": "tsv",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# How `datasets` reads each format: its packaged builder and the builder's options.
BUILDERS = {
    "text": ("text", {}),
    "json": ("json", {}),
    "parquet": ("parquet", {}),
    "arrow": ("arrow", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
ARROW_BATCH = 100_000  # records per Arrow compute call
HUB_NOTE = " (no such local file or folder, so it was read as a Hub dataset id)"


@dataclass
class CorpusSource:
    """
    What `--train-data` names, resolved but not yet read.

    Args:
        name: how the run's record names it: the Hub id, else the file or folder name.
        hub_id: the Hub dataset id, when the corpus comes from the Hub.
        files: the local files, all of `format` (none for saved and Hub datasets).
        saved: a `datasets.save_to_disk` folder.
    """

    name: str
    hub_id: str | None = None
    files: list[Path] = field(default_factory=list)
    format: str | None = None
    saved: Path | None = None
    config: str | None = None
    split: str = "train"


def corpus_format(path: Path) -> str | None:
    """The format of a corpus file by its name (`corpus.jsonl.gz` is JSON lines), or `None`."""
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSIONS else path.suffixes[-1:]
    return FORMATS.get(suffixes[0].lower()) if suffixes else None


def resolve_corpus(train_data: str, config: str | None = None, split: str = "train") -> CorpusSource:
    """The corpus `train_data` names; `CorpusError` naming what is wrong with it."""
    path = Path(train_data).expanduser()
    if path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return CorpusSource(name=path.resolve().name, saved=path, split=split)
    if path.exists():
        return local_files(path)
    if is_hub_id(train_data) and not path.suffix:  # a name with a file suffix is a missing file
        return CorpusSource(name=train_data, hub_id=train_data, config=config, split=split)
    raise CorpusError(f"Training data not found: {path} does not exist (nor is it a Hub dataset id such as org/name).")


def local_files(path: Path) -> CorpusSource:
    """Every corpus file under `path`, which must all be of one format, and none empty."""
    candidates = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    files = [p for p in candidates if corpus_format(p)]
    if not files:
        raise CorpusError(
            f"No corpus files in {path}: expected .txt, .jsonl/.json, .parquet, .arrow, .csv or .tsv files "
            f"(optionally {', '.join(COMPRESSIONS)}), or a folder saved by datasets.save_to_disk."
        )
    formats = sorted({corpus_format(p) for p in files})
    if len(formats) > 1:
        raise CorpusError(f"{path} mixes corpus formats ({', '.join(formats)}); use one format per folder.")
    for file in files:
        if file.stat().st_size == 0:
            raise CorpusError(f"Training data file {file} is empty.")
    return CorpusSource(name=path.resolve().name, files=files, format=formats[0])


class CorpusCounts:
    """
    What a run has read, counted as it goes: records given by a stream (`read`), bad records skipped
    (`skipped`), passages left out for having no text (`empty`) and passages of nothing but [UNK]
    (`unknown`). The run holds one; data-loader workers, forked from its process, share its counters.
    """

    NAMES = ("read", "skipped", "empty", "unknown")

    def __init__(self):
        self.values = {name: multiprocessing.Value("q", 0) for name in self.NAMES}

    def add(self, name: str, count: int) -> None:
        value = self.values[name]
        with value.get_lock():
            value.value += count

    def __getitem__(self, name: str) -> int:
        return self.values[name].value

    def __deepcopy__(self, memo) -> "CorpusCounts":
        return self  # `datasets` copies the arguments of the functions it runs: the counters stay the run's

    def __getstate__(self) -> dict:
        return {"counts": "shared by the processes forked from the run"}  # what `datasets` hashes for its cache

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def load_corpus(
    source: CorpusSource, text_column: str = "text", streaming: bool = False, skip_bad_records: bool = False, counts: CorpusCounts | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """A dataset of non-empty `text` records from `source`; bad records raise `CorpusError` or are skipped and counted in `counts`."""
    counts = CorpusCounts() if counts is None else counts
    if streaming:
        return datasets.IterableDataset.from_generator(
            stream_texts,
            gen_kwargs={"shards": shards(source), "column": text_column, "skip": skip_bad_records, "counts": counts},
        )
    dataset = read_arrow(source, text_column, skip_bad_records, counts)
    dataset = without_blank_texts(check_text_column(dataset, source, text_column, skip_bad_records, counts))
    if len(dataset) == 0:
        raise CorpusError(f"Training data {source.name} holds no text.")
    return dataset


def text_batches(dataset: datasets.Dataset) -> Iterator[pa.ChunkedArray]:
    """The `text` column as Arrow arrays, a batch at a time, in the dataset's order (memory-mapped, no copy)."""
    for table in dataset.with_format("arrow").iter(batch_size=ARROW_BATCH):
        yield table.column("text")


def first_null(dataset: datasets.Dataset) -> int | None:
    """The index of the first record without a text, or `None`."""
    offset = 0
    for texts in text_batches(dataset):
        if texts.null_count:
            return offset + pc.index(pc.is_null(texts), True).as_py()
        offset += len(texts)
    return None


def without_blank_texts(dataset: datasets.Dataset) -> datasets.Dataset:
    """The records whose text is more than white space, found with Arrow compute."""
    kept, offset = [], 0
    for texts in text_batches(dataset):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)
        kept.append(pc.add(pc.indices_nonzero(pc.invert(blank).combine_chunks()), offset).to_numpy())
        offset += len(texts)
    indices = np.concatenate(kept) if kept else np.array([], dtype=np.int64)
    return dataset if len(indices) == len(dataset) else dataset.select(indices)


def read_arrow(source: CorpusSource, column: str, skip: bool, counts: CorpusCounts) -> datasets.Dataset:
    """The corpus through `datasets`' own readers (its Arrow cache); on a failure, the first bad record is named."""
    try:
        if source.saved:
            return saved_split(source.saved, source.split)
        if source.hub_id:
            return datasets.load_dataset(source.hub_id, source.config, split=source.split)
        builder, options = BUILDERS[source.format]
        return datasets.load_dataset(builder, data_files=[str(f) for f in source.files], split="train", **options)
    except CorpusError:
        raise
    except Exception as error:  # datasets wraps its readers' errors in several types: find the record in question
        if source.files and skip:
            return datasets.Dataset.from_generator(stream_texts, gen_kwargs={"shards": shards(source), "column": column, "skip": True, "counts": counts})
        if source.files:
            locate_bad_record(source, column)
        raise CorpusError(f"Training data {source.name} could not be read{HUB_NOTE if source.hub_id else ''}: {error}") from None


def saved_split(folder: Path, split: str) -> datasets.Dataset:
    """A `save_to_disk` folder's dataset, or the split of its `DatasetDict`."""
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise CorpusError(f"{folder} has no split {split!r} (it has {', '.join(saved)}); pass --dataset-split.")
        return saved[split]
    return saved


def check_text_column(dataset: datasets.Dataset, source: CorpusSource, column: str, skip: bool, counts: CorpusCounts) -> datasets.Dataset:
    """The text column alone, named `text`, checked with Arrow compute: present, strings, no nulls."""
    if source.format == "text":
        column = "text"
    if column not in dataset.column_names:
        raise CorpusError(f"Training data {source.name} has no column {column!r} (its columns: {', '.join(dataset.column_names)}); pass --text-column.")
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    feature = dataset.features["text"]
    strings = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    missing = first_null(dataset) if strings else 0
    if missing is None:
        return dataset
    if not skip:
        if source.files:
            locate_bad_record(source, column)
        raise CorpusError(f"Training data {source.name}: record {missing + 1} has no string {column!r}.")
    if source.files:  # mixed types: read again record by record, counting what is skipped
        return datasets.Dataset.from_generator(stream_texts, gen_kwargs={"shards": shards(source), "column": column, "skip": True, "counts": counts})
    kept = dataset.filter(lambda batch: [isinstance(text, str) for text in batch["text"]], batched=True, batch_size=10_000)
    counts.add("skipped", len(dataset) - len(kept))
    return kept


def locate_bad_record(source: CorpusSource, column: str) -> None:
    """Read the corpus files record by record and raise `CorpusError` naming the first bad one (an error path only)."""
    for _ in stream_texts(shards(source), column, skip=False, counts=CorpusCounts()):
        pass


def shards(source: CorpusSource) -> list[dict]:
    """Units a stream is read in (a file each, or the whole dataset), spread over data-loader workers by `datasets`."""
    if source.files:
        # Size and modification time make `datasets`' cache of a re-read corpus follow edits to its files.
        return [{"file": str(f), "format": source.format, "stamp": (f.stat().st_size, f.stat().st_mtime_ns)} for f in source.files]
    return [{"hub_id": source.hub_id, "config": source.config, "split": source.split, "saved": str(source.saved) if source.saved else None}]


def stream_texts(shards: list[dict], column: str, skip: bool, counts: CorpusCounts) -> Iterator[dict]:
    """`{"text": ...}` for every non-empty text of the shards, each record checked as it is read and counted; none at all is an error."""
    given = 0
    for shard in shards:
        records = file_records(Path(shard["file"]), shard["format"], column) if "file" in shard else dataset_records(shard, column)
        for where, value in records:
            if isinstance(value, str) and not isinstance(value, BadRecord):
                if value.strip():
                    given += 1
                    counts.add("read", 1)
                    yield {"text": value}
            elif skip:
                counts.add("skipped", 1)
            else:
                raise CorpusError(f"{where} {value}" if isinstance(value, BadRecord) else f"{where} has no string {column!r}.")
    if given == 0:
        names = ", ".join(Path(shard.get("file") or shard.get("saved") or shard["hub_id"]).name for shard in shards)
        raise CorpusError(f"Training data {names} holds no text.")


class BadRecord(str):
    """What a reader found instead of a record: the message says why (not UTF-8, not JSON)."""


def file_records(file: Path, format: str, column: str) -> Iterator[tuple[str, object]]:
    """(where, text or what stands in its place) for every record of one file: where is `file:line` or `file record N`."""
    readers = {"text": text_records, "json": json_records, "csv": csv_records, "tsv": csv_records, "parquet": parquet_records, "arrow": arrow_records}
    try:
        yield from readers[format](file, column)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, pa.ArrowException) as error:
        if isinstance(error, CorpusError):
            raise
        compressed = f" ({file.suffix[1:]}-compressed)" if file.suffix in COMPRESSIONS else ""
        raise CorpusError(f"{file} could not be read as {format}{compressed}: {error}") from None


def open_binary(file: Path):
    """The file's bytes, decompressed as its suffix says."""
    if file.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True))
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(file.suffix, open)(file, "rb")


def decoded_lines(file: Path) -> Iterator[tuple[int, str | BadRecord]]:
    with open_binary(file) as lines:
        for number, line in enumerate(lines, start=1):
            try:
                yield number, line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield number, BadRecord("is not UTF-8 text.")


def text_records(file: Path, column: str) -> Iterator[tuple[str, object]]:
    for number, line in decoded_lines(file):
        yield f"{file}:{number}", line


def json_records(file: Path, column: str) -> Iterator[tuple[str, object]]:
    for number, line in decoded_lines(file):
        if isinstance(line, BadRecord) or not line.strip():
            if isinstance(line, BadRecord):
                yield f"{file}:{number}", line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield f"{file}:{number}", BadRecord(f"is not valid JSON ({error.msg}).")
            continue
        yield f"{file}:{number}", record.get(column) if isinstance(record, dict) else None


def csv_records(file: Path, column: str) -> Iterator[tuple[str, object]]:
    with open_binary(file) as binary:
        rows = csv.DictReader(io.TextIOWrapper(binary, encoding="utf-8", newline=""), delimiter="\t" if ".tsv" in file.suffixes else ",")
        try:
            if column not in (rows.fieldnames or []):
                raise CorpusError(f"{file} has no column {column!r} (its columns: {', '.join(rows.fieldnames or [])}); pass --text-column.")
            for row in rows:
                if None in row:  # more fields than the header names: `datasets`' reader stops at them
                    yield f"{file}:{rows.line_num}", BadRecord(f"has {len(rows.fieldnames) + len(row[None])} fields; the header has {len(rows.fieldnames)}.")
                else:
                    yield f"{file}:{rows.line_num}", row[column] or None
        except UnicodeDecodeError:
            yield f"{file}:{rows.line_num + 1}", BadRecord("is not UTF-8 text.")


def parquet_records(file: Path, column: str) -> Iterator[tuple[str, object]]:
    table = pq.ParquetFile(file)
    yield from batch_records(file, table.schema_arrow, table.iter_batches(columns=[column] if column in table.schema_arrow.names else None), column)


def arrow_records(file: Path, column: str) -> Iterator[tuple[str, object]]:
    with pa.memory_map(str(file)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            yield from batch_records(file, reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches)), column)
            return
        yield from batch_records(file, reader.schema, reader, column)


def batch_records(file: Path, schema: pa.Schema, batches, column: str) -> Iterator[tuple[str, object]]:
    if column not in schema.names:
        raise CorpusError(f"{file} has no column {column!r} (its columns: {', '.join(schema.names)}); pass --text-column.")
    number = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(column)).to_pylist():
            number += 1
            yield f"{file} record {number}", value


def dataset_records(shard: dict, column: str) -> Iterator[tuple[str, object]]:
    """Records of a saved or Hub dataset, streamed."""
    if shard["saved"]:
        dataset, name = saved_split(Path(shard["saved"]), shard["split"]).to_iterable_dataset(), shard["saved"]
    else:
        name = shard["hub_id"]
        try:
            dataset = datasets.load_dataset(name, shard["config"], split=shard["split"], streaming=True)
        except Exception as error:  # not found, offline, gated, no such config or split: datasets raises several types
            raise CorpusError(f"Training data {name} could not be read{HUB_NOTE}: {error}") from None
    for number, record in enumerate(dataset, start=1):
        if number == 1 and column not in record:
            raise CorpusError(f"Training data {name} has no column {column!r} (its columns: {', '.join(record)}); pass --text-column.")
        yield f"{name} record {number}", record.get(column)
