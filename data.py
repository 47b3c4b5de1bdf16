"""Pre-training text: the user's corpus files, and the embedded demo corpus (a Wikipedia excerpt).

Corpus files are plain text (one passage per line) or JSON lines with a `text` field, given
as files or folders of them; they are read with the `datasets` library, memory-mapped from
disk or streamed, so a corpus larger than memory works.
"""

import bz2
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets


TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
REFERENCE_SECTIONS = re.compile(
    r"^==+\s*(references|bibliography|see also|external links|further reading|notes|sources|citations)\b", re.I
)
SECTION_HEADING = re.compile(r"^(==+[^=]+==+\s*)+")
MIN_PARAGRAPH_WORDS = 20


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and the problem."""


def corpus_files(path: str | os.PathLike) -> tuple[list[str], str]:
    """The files behind `path` (a file or a folder of them) and their format, `text` or `json`."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"Training data not found: {path} does not exist.")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES]
    if not files:
        raise CorpusError(f"No .txt or .jsonl files in {path}.")
    kinds = {"json" if p.suffix in JSONL_SUFFIXES else "text" for p in files}
    if len(kinds) > 1:
        raise CorpusError(f"{path} mixes plain-text and JSON-lines files; use one format per folder.")
    for file in files:
        if file.stat().st_size == 0:
            raise CorpusError(f"Training data file {file} is empty.")
    return [str(p) for p in files], kinds.pop()


def load_corpus(path: str | os.PathLike, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """A dataset of non-empty `text` passages read from `path`; bad JSON and missing fields raise `CorpusError`."""
    files, kind = corpus_files(path)
    if kind == "json":
        for file in files:
            check_json_lines(file)
    dataset = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
    dataset = dataset.select_columns(["text"]).filter(lambda example: bool(example["text"] and example["text"].strip()))
    if not streaming and len(dataset) == 0:
        raise CorpusError(f"Training data {path} holds no text.")
    return dataset


def json_lines(path: str | os.PathLike, error: type[Exception] = CorpusError) -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line of a JSON-lines file; a bad line raises `error` naming it."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}:{number} is not valid JSON ({decode_error.msg}).") from None


def check_json_lines(file: str) -> None:
    """Fail on the first line of `file` that is not a JSON object with a string `text` field."""
    for number, record in json_lines(file):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{file}:{number} has no string 'text' field.")


@dataclass
class Article:
    title: str
    paragraphs: list[str]


def wikipedia_excerpt_path() -> str:
    """The English Wikipedia dump excerpt bundled with gensim's test data (CC BY-SA)."""
    try:
        import gensim
    except ImportError:
        raise CorpusError(
            "The embedded demo corpus comes with the demo extra: pip install 'retromae[demo]' "
            "(or pass --train-data and --model)."
        ) from None
    return os.path.join(
        os.path.dirname(gensim.__file__),
        "test",
        "test_data",
        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    )


def demo_articles() -> list[Article]:
    """The Wikipedia excerpt cleaned to plain paragraphs: 105 articles, about 4,900 paragraphs of 20+ words."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(wikipedia_excerpt_path()) as dump:
        for title, wikitext, _ in extract_pages(dump):
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            paragraphs = [clean_paragraph(p) for p in filter_wiki(wikitext).split("\n\n")]
            paragraphs = [p for p in paragraphs if p and len(p.split()) > MIN_PARAGRAPH_WORDS]
            if paragraphs:
                articles.append(Article(title, paragraphs))
    return articles


def clean_paragraph(paragraph: str) -> str:
    """Plain text of one wikitext paragraph: no section headings, quote markup or lists; '' if nothing is left."""
    paragraph = " ".join(paragraph.split())
    if REFERENCE_SECTIONS.match(paragraph) or paragraph.count(" * ") > 2:
        return ""
    paragraph = SECTION_HEADING.sub("", paragraph)
    return re.sub(r"'{2,}", "", paragraph).strip()


def demo_corpus() -> datasets.Dataset:
    """Every paragraph of the demo articles as a `text` dataset."""
    return datasets.Dataset.from_dict({"text": [p for article in demo_articles() for p in article.paragraphs]})
