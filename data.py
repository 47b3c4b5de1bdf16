"""The embedded demo corpus (a Wikipedia excerpt), and JSON lines read with their line numbers.

The user's corpora (files, saved datasets, Hub datasets) are read by `corpus.py`.
"""

import bz2
import functools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import datasets

from .errors import UsageError


REFERENCE_SECTIONS = re.compile(
    r"^==+\s*(references|bibliography|see also|external links|further reading|notes|sources|citations)\b", re.I
)
SECTION_HEADING = re.compile(r"^(==+[^=]+==+\s*)+")
MIN_PARAGRAPH_WORDS = 20


class CorpusError(UsageError):
    """A corpus that cannot be read; the message names the file (and line or record) and the problem."""


def json_lines(path: str | os.PathLike, error: type[Exception] = CorpusError) -> Iterator[tuple[int, object]]:
    """(line number, record) for every non-blank line of a JSON-lines file; a bad line raises `error` naming it."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise error(f"{path}:{number} is not UTF-8 text.") from None
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}:{number} is not valid JSON ({decode_error.msg}).") from None


def tsv_rows(path: str | os.PathLike, error: type[Exception] = CorpusError) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for every line of a tab-separated file, quotes taken literally; a line that is not UTF-8 raises `error` naming it."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise error(f"{path}:{number} is not UTF-8 text.") from None
            yield number, text.split("\t") if text else []


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


@functools.cache
def demo_corpus() -> datasets.Dataset:
    """Every paragraph of the demo articles as a `text` dataset (read once: training and its held-out passages both take it)."""
    return datasets.Dataset.from_dict({"text": [p for article in demo_articles() for p in article.paragraphs]})
