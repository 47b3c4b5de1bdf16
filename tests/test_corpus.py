"""Corpora as users hold them: every file format and compression, saved and Hub datasets, bad records, long records."""

import bz2
import csv
import gzip
import json
import lzma
import os
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from retromae import corpus as corpus_module
from retromae.cli import main
from retromae.corpus import CorpusCounts, load_corpus, resolve_corpus
from retromae.data import CorpusError
from retromae.collator import special_token_ids
from retromae.passages import PassageSplitter
from retromae.run_passages import training_passages

from conftest import TEXTS, UNKNOWN_TEXTS
from helpers import resolved_settings


RECORDS = [f"{text} Record {i}." for i in range(4) for text in TEXTS]


def write_lines(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return path


def write_jsonl(path, column="text", opener=open):
    return write_lines(path, [json.dumps({column: text, "id": i}) for i, text in enumerate(RECORDS)], opener)


def write_parquet(path, column="text"):
    pq.write_table(pa.table({column: RECORDS, "id": list(range(len(RECORDS)))}), path)
    return path


def write_csv(path, delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(["id", "text"])
        writer.writerows([i, text] for i, text in enumerate(RECORDS))
    return path


def write_zst(path):
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(json.dumps({"text": t}) for t in RECORDS) + "\n").encode()))
    return path


def write_arrow(path):
    table = pa.table({"text": RECORDS})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_parquet_shards(folder):
    folder.mkdir()
    for part in range(3):
        pq.write_table(pa.table({"text": RECORDS[part::3]}), folder / f"train-{part:05d}-of-00003.parquet")
    return folder


def write_saved_dataset(folder):
    datasets.Dataset.from_dict({"text": RECORDS}).save_to_disk(str(folder))
    return folder


def write_saved_dataset_dict(folder):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": RECORDS})}).save_to_disk(str(folder))
    return folder


FORMS = {
    "txt": lambda tmp: write_lines(tmp / "corpus.txt", RECORDS),
    "txt.gz": lambda tmp: write_lines(tmp / "corpus.txt.gz", RECORDS, gzip.open),
    "jsonl": lambda tmp: write_jsonl(tmp / "corpus.jsonl"),
    "jsonl.gz": lambda tmp: write_jsonl(tmp / "corpus.jsonl.gz", opener=gzip.open),
    "json.bz2": lambda tmp: write_jsonl(tmp / "corpus.json.bz2", opener=bz2.open),
    "jsonl.xz": lambda tmp: write_jsonl(tmp / "corpus.jsonl.xz", opener=lzma.open),
    "jsonl.zst": lambda tmp: write_zst(tmp / "corpus.jsonl.zst"),
    "parquet": lambda tmp: write_parquet(tmp / "corpus.parquet"),
    "parquet shards": lambda tmp: write_parquet_shards(tmp / "shards"),
    "arrow": lambda tmp: write_arrow(tmp / "corpus.arrow"),
    "csv": lambda tmp: write_csv(tmp / "corpus.csv"),
    "tsv": lambda tmp: write_csv(tmp / "corpus.tsv", delimiter="\t"),
    "save_to_disk": lambda tmp: write_saved_dataset(tmp / "saved"),
    "save_to_disk dict": lambda tmp: write_saved_dataset_dict(tmp / "saved-dict"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_same_records(tmp_path, form, streaming):
    source = resolve_corpus(str(FORMS[form](tmp_path)))
    dataset = load_corpus(source, streaming=streaming)
    assert sorted(record["text"] for record in dataset) == sorted(RECORDS)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_text_column_names_the_field(tmp_path, streaming):
    source = resolve_corpus(str(write_parquet(tmp_path / "corpus.parquet", column="content")))
    assert sorted(r["text"] for r in load_corpus(source, text_column="content", streaming=streaming)) == sorted(RECORDS)
    with pytest.raises(CorpusError, match="has no column 'text' .*content.*pass --text-column"):
        list(load_corpus(source, streaming=streaming))


def test_a_folder_mixing_formats_is_refused_naming_them(tmp_path):
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl")
    write_parquet(tmp_path / "mixed" / "b.parquet")
    with pytest.raises(CorpusError, match=r"mixes corpus formats \(json, parquet\)"):
        resolve_corpus(str(tmp_path / "mixed"))


BAD = {
    "non-utf8 txt": ("bad.txt", b"fine line\nanother fine line\nbad \xff\xfe bytes\n", "bad.txt:3 is not UTF-8 text"),
    "bad json line": ("bad.jsonl", b'{"text": "ok"}\nnot json\n{"text": "ok"}\n', "bad.jsonl:2 is not valid JSON"),
    "non-string text": ("field.jsonl", b'{"text": "ok"}\n{"text": 5}\n', "field.jsonl:2 has no string 'text'"),
    "missing field": ("missing.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "missing.jsonl:2 has no string 'text'"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
@pytest.mark.parametrize("case", BAD)
def test_a_bad_record_is_named_by_file_and_line(tmp_path, case, streaming):
    name, content, message = BAD[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(load_corpus(resolve_corpus(str(tmp_path / name)), streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
@pytest.mark.parametrize("case", BAD)
def test_skip_bad_records_counts_and_skips_them(tmp_path, case, streaming):
    name, content, _ = BAD[case]
    (tmp_path / name).write_bytes(content)
    counts = CorpusCounts()
    texts = [record["text"] for record in load_corpus(resolve_corpus(str(tmp_path / name)), streaming=streaming, skip_bad_records=True, counts=counts)]
    assert counts["skipped"] == 1
    assert len(texts) == content.count(b"\n") - 1 and all(text in ("fine line", "another fine line", "ok") for text in texts)


def test_a_null_in_a_parquet_column_is_named_by_record(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, "ok"]}), tmp_path / "nulls.parquet")
    with pytest.raises(CorpusError, match="nulls.parquet record 2 has no string 'text'"):
        load_corpus(resolve_corpus(str(tmp_path / "nulls.parquet")))


def tiny_run(train_data, output_dir, *extra):
    return [
        "pretrain", "--config", "tiny", "--train-data", str(train_data), "--output-dir", str(output_dir),
        "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1", "--seed", "3", *extra,
    ]


@pytest.mark.parametrize("streaming", [False, True], ids=["memory-mapped", "streamed"])
def test_a_hub_dataset_id_is_loaded_with_its_config_and_split_and_named_in_the_record(tmp_path, monkeypatch, streaming):
    asked = []

    def load_dataset(path, name=None, split=None, streaming=False):
        asked.append((path, name, split, streaming))
        dataset = datasets.Dataset.from_dict({"text": RECORDS})
        return dataset.to_iterable_dataset() if streaming else dataset

    monkeypatch.setattr(corpus_module.datasets, "load_dataset", load_dataset)
    run = tiny_run("wikimedia/wikipedia", tmp_path / "run", "--dataset-config", "20231101.en", "--dataset-split", "train")
    assert main(run + (["--streaming"] if streaming else [])) == 0
    assert set(asked) == {("wikimedia/wikipedia", "20231101.en", "train", streaming)}
    record = json.loads((tmp_path / "run" / "model" / "retromae_pretraining.json").read_text())
    assert record["corpus"] == "wikimedia/wikipedia" and record["datasets"] == ["wikimedia/wikipedia"]
    assert record["records"] == len(RECORDS)


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["memory-mapped", "streamed"])
def test_bad_records_stop_the_cli_with_exit_2_and_no_traceback(tmp_path, capsys, streaming):
    (tmp_path / "bad.jsonl").write_bytes(BAD["bad json line"][1])
    assert main(tiny_run(tmp_path / "bad.jsonl", tmp_path / "run", *streaming)) == 2
    error = capsys.readouterr().err
    assert "bad.jsonl:2 is not valid JSON" in error and "Traceback" not in error


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["memory-mapped", "streamed"])
@pytest.mark.parametrize("suffix, separator", [(".csv", b","), (".tsv", b"\t")])
def test_a_row_wider_than_the_header_stops_the_cli_naming_file_and_line(tmp_path, capsys, streaming, suffix, separator):
    rows = [b"id", b"text", b"1", b"ok", b"2", b"ok", b"3", b"ok", b"extra", b"4", b"ok"]
    lines = [rows[0:2], rows[2:4], rows[4:6], rows[6:9], rows[9:11]]
    (tmp_path / f"wide{suffix}").write_bytes(b"\n".join(separator.join(line) for line in lines) + b"\n")
    assert main(tiny_run(tmp_path / f"wide{suffix}", tmp_path / "run", *streaming)) == 2
    error = capsys.readouterr().err
    assert f"wide{suffix}:4 has 3 fields; the header has 2." in error and "Traceback" not in error


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["memory-mapped", "streamed"])
def test_an_empty_corpus_is_refused(tmp_path, capsys, streaming):
    write_lines(tmp_path / "blank.txt", ["", "   "])
    assert main(tiny_run(tmp_path / "blank.txt", tmp_path / "run", *streaming)) == 2
    error = capsys.readouterr().err
    assert "blank.txt holds no text" in error and "Traceback" not in error


def test_skipped_records_are_reported_in_the_run_record(tmp_path, capsys):
    lines = [json.dumps({"text": text}) for text in RECORDS]
    (tmp_path / "some-bad.jsonl").write_text("\n".join(lines[:5] + ["{oops", '{"text": null}'] + lines[5:]) + "\n")
    assert main(tiny_run(tmp_path / "some-bad.jsonl", tmp_path / "run", "--skip-bad-records")) == 0
    assert "(2 bad records skipped)" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "model" / "retromae_pretraining.json").read_text())
    assert record["skipped_records"] == 2 and record["records"] == len(RECORDS)


def test_a_bad_record_met_mid_stream_checkpoints_first_and_resume_carries_on(tmp_path, capsys):
    """With a 16-passage shuffle buffer and the cutting 64 records at a time, the bad line comes some steps in."""
    good = [json.dumps({"text": f"passage number {i} of the stream"}) for i in range(120)]
    corpus = tmp_path / "stream.jsonl"
    corpus.write_text("\n".join(good + ["not json"] + good * 2) + "\n")
    run = tiny_run(corpus, tmp_path / "run", "--streaming", "--shuffle-buffer", "16", "--max-steps", "40", "--save-steps", "1000")
    assert main(run) == 2
    error = capsys.readouterr().err
    assert f"stream.jsonl:{len(good) + 1} is not valid JSON" in error and "continue with --resume" in error
    checkpoints = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and int(checkpoints[0].split("-")[1]) > 0
    corpus.write_text("\n".join(good * 3) + "\n")
    assert main(run + ["--resume"]) == 0
    assert json.loads((tmp_path / "run" / "model" / "retromae_pretraining.json").read_text())["steps"] == 40


LONG_RECORD = " ".join(
    f"Sentence number {i} talks about dense retrieval, masked auto-encoders and pre-training at some length." for i in range(12)
)


def test_long_records_are_cut_into_passages_of_whole_sentences(tokenizer):
    splitter = PassageSplitter(tokenizer, max_length=48)
    passages = splitter({"text": [LONG_RECORD, "A short one."]})["input_ids"]
    whole = tokenizer(LONG_RECORD, add_special_tokens=False)["input_ids"]
    assert sum(passages[:-1], []) == whole  # consecutive, nothing lost
    assert len(passages) > 3 and all(len(p) <= 46 for p in passages)
    for passage in passages[:-1]:
        text = tokenizer.decode(passage)
        assert text.startswith("sentence number") and text.endswith("length.")
    assert passages[-1] == tokenizer("A short one.", add_special_tokens=False)["input_ids"]


def test_a_sentence_longer_than_a_passage_is_cut_between_words(tokenizer):
    sentence = " ".join(["unbelievably"] * 40) + "."
    passages = PassageSplitter(tokenizer, max_length=16)({"text": [sentence]})["input_ids"]
    assert sum(passages, []) == tokenizer(sentence, add_special_tokens=False)["input_ids"]
    word = tokenizer("unbelievably", add_special_tokens=False)["input_ids"]
    for passage in passages:
        assert len(passage) <= 14 and passage[: len(word)] == word


@pytest.mark.parametrize("passages, expected", [("split", "more"), ("truncate", "same")])
def test_the_run_record_counts_records_and_passages(tmp_path, passages, expected):
    write_lines(tmp_path / "long.txt", [LONG_RECORD] * 3 + RECORDS)
    assert main(tiny_run(tmp_path / "long.txt", tmp_path / "run", "--passages", passages, "--max-steps", "-1")) == 0  # an epoch
    record = json.loads((tmp_path / "run" / "model" / "retromae_pretraining.json").read_text())
    assert record["records"] == len(RECORDS) + 3
    assert (record["passages"] > record["records"]) == (expected == "more")
    assert record["passages_from_long_records"] == passages


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["memory-mapped", "streamed"])
def test_a_name_that_is_neither_a_path_nor_a_reachable_hub_dataset_is_refused_clearly(tmp_path, capsys, streaming):
    assert main(tiny_run("no-such-corpus", tmp_path / "run", *streaming)) == 2  # the tests run with HF_HUB_OFFLINE=1
    error = capsys.readouterr().err
    assert "no-such-corpus could not be read (no such local file or folder, so it was read as a Hub dataset id)" in error
    assert "Traceback" not in error


# Lines with no text left after tokenization: zero-width spaces, a byte-order mark, a special token written out.
NO_TEXT = ["\u200b\u200b", "\ufeff", "[SEP]"]
# One line in 8 is emoji only (all [UNK]); the lines with no text come in between.
WEB_LINES = [UNKNOWN_TEXTS[0] if i % 8 == 7 else RECORDS[i] for i in range(16)]
WEB_LINES[2:2], WEB_LINES[9:9], WEB_LINES[13:13] = [NO_TEXT[0]], [NO_TEXT[1]], [NO_TEXT[2]]


@pytest.mark.parametrize("passages", ["split", "truncate"])
@pytest.mark.parametrize(
    "path", [["--max-steps", "-1"], [], ["--streaming"]], ids=["cut before training", "cut as read", "streamed"]
)
def test_passages_with_no_text_are_left_out_and_all_unknown_ones_kept_and_counted(tmp_path, tokenizer, path, passages):
    settings = resolved_settings(tiny_run(write_lines(tmp_path / "web.txt", WEB_LINES), tmp_path / "run", "--passages", passages, *path))
    counts = CorpusCounts()
    dataset, _ = training_passages(settings, resolve_corpus(settings.train_data), tokenizer, counts)
    trained = [example["input_ids"] for example in dataset]  # one pass
    special = set(special_token_ids(tokenizer))
    assert len(trained) == len(WEB_LINES) - len(NO_TEXT)
    assert all(any(i not in special for i in ids) for ids in trained)
    assert sum(set(ids) == {tokenizer.unk_token_id} for ids in trained) == len(WEB_LINES) // 8
    assert counts["empty"] == len(NO_TEXT) and counts["unknown"] == len(WEB_LINES) // 8


def test_a_corpus_with_emoji_lines_trains_to_the_end_and_reports_them(tmp_path):
    """
    One line in 8 all [UNK], three with no text: an epoch trains through all of them, and says so.
    In a subprocess, as a user runs it (about 5 s of CPU, most of it importing).
    """
    output_dir = tmp_path / "run"
    command = [sys.executable, "-m", "retromae.cli", *tiny_run(write_lines(tmp_path / "web.txt", WEB_LINES), output_dir, "--max-steps", "-1")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    unknown = len(WEB_LINES) // 8
    assert f"Of the passages read, {len(NO_TEXT)} had no text after tokenization (left out) and {unknown} nothing but [UNK]" in result.stdout
    record = json.loads((output_dir / "model" / "retromae_pretraining.json").read_text())
    assert record["empty_passages"] == len(NO_TEXT) and record["unknown_passages"] == unknown
    assert record["records"] == len(WEB_LINES) and record["passages"] == len(WEB_LINES) - len(NO_TEXT)
    assert record["steps"] == record["passages"] // 4 and record["final_loss"] is not None
