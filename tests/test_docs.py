"""Words that cannot drift: every ```python and ```bash block of README.md and docs/*.md runs, and the model card says only what the code does.

A block runs as written, in a folder of its page shared by the page's blocks (in order), which holds local
stand-ins under the names the pages use: `corpus.txt`, `corpus.jsonl`, `held_out.jsonl`, `corpus.jsonl.gz`, `corpus/`, `shards/`
(parquet), `saved/` (`save_to_disk`), `pairs.jsonl`, `scifact/` (a BEIR folder) and `retromae-output/model` (a
release of a tiny BERT made by `retromae pretrain`); see docs/design.md. A comment line
right before a block adapts it to a test machine with no GPU and no network, one directive a line:

    <!-- test:
    substitute bert-base-uncased => {bert}
    substitute --max-steps 20000 => --max-steps 2
    -->

- `substitute OLD => NEW` replaces every OLD in the block (OLD must occur). NEW may name a stand-in for a Hub
  checkpoint, a tiny random checkpoint of that family saved with its tokenizer, with the positions of the real
  one: `{bert}` (512), `{xlm-roberta}` (8,192 tokens, as BAAI/bge-m3-retromae), `{modernbert}` (8,192), `{mpnet}` (512, as
  microsoft/mpnet-base: a family outside `ENCODER_FAMILIES`, which docs/families.md registers).
- `slow` runs the block only under `-m slow` (it runs its own processes for minutes: benchmarks, torchrun).
- `not run: REASON` is for the README's install commands only; `.ci/run` runs them, which the test checks.
- `checked by TESTFILE::TEST: REASON` is for launch commands that need several GPUs or nodes, or DeepSpeed (not in
  the test extra): the named test, which must exist and read the page, parses them with the launcher's own parser
  and checks what reaches the engine.

```text and ```bibtex blocks show output and are not run; a block of any other language is refused.
"""

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoModelForMaskedLM

from retromae.cli import main
from retromae.hub import model_card

from families import CORPUS, build_tokenizer, tiny_config


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- test:(?P<directives>.*?)-->\n)?```(?P<language>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
RUN = {"python", "bash"}
SHOWN = {"text", "bibtex"}
# Tools that load a checkpoint of a family without transformers. The card and the docs name one only once a test runs it.
UNTESTED_TOOLS = ("text-embeddings-inference", "TEI", "vLLM", "Infinity", "ONNX", "OpenVINO", "optimum", "TensorRT", "llama.cpp")
# The stand-ins for Hub checkpoints: a tiny random checkpoint of the family with its tokenizer, and its positions.
STAND_INS = {"bert": 512, "xlm-roberta": 8194, "modernbert": 8192, "mpnet": 514}


def blocks(page: Path) -> list[dict]:
    """The fenced blocks of a page: language, code, the line the code starts on, and the directives before it."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        directives = [line.strip() for line in (match["directives"] or "").splitlines() if line.strip()]
        found.append({
            "language": match["language"],
            "code": match["code"],
            "line": text.count("\n", 0, match.start("code")) + 1,
            "directives": directives,
        })
    return found


def adapted(block: dict, stand_ins: dict[str, Path], name: str) -> str:
    """The block's code after its `substitute` directives; every OLD must occur."""
    code = block["code"]
    for directive in block["directives"]:
        if directive.startswith("substitute "):
            old, new = (part.strip() for part in directive.removeprefix("substitute ").split("=>"))
            assert old in code, f"{name}: 'substitute {old}' finds nothing to replace"
            code = code.replace(old, new.format(**{family: str(path) for family, path in stand_ins.items()}))
    return code


def slow(block: dict) -> bool:
    return "slow" in block["directives"]


def not_run(block: dict) -> bool:
    return any(directive.startswith(("not run:", "checked by ")) for directive in block["directives"])


def checked_by(block: dict) -> list[str]:
    return [directive.removeprefix("checked by ").split(":", 2)[:3] for directive in block["directives"] if directive.startswith("checked by ")]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """The stand-ins every page's folder holds, and the tiny checkpoints that replace Hub ids."""
    world = tmp_path_factory.mktemp("docs-world")
    for family, positions in STAND_INS.items():
        folder = world / "hub" / family
        tokenizer = build_tokenizer(family, folder)
        tokenizer.model_max_length = positions
        tokenizer.save_pretrained(folder)
        AutoModelForMaskedLM.from_config(tiny_config(family, len(tokenizer), max_position_embeddings=positions)).save_pretrained(folder)
    files = world / "files"
    (files / "corpus").mkdir(parents=True)
    (files / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    (files / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS))
    for part in range(2):
        (files / "corpus" / f"part-{part}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS[part::2]))
    (files / "held_out.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS[::2]))
    (files / "corpus.jsonl.gz").write_bytes(gzip.compress((files / "corpus.jsonl").read_bytes()))
    (files / "shards").mkdir()
    for part in range(2):
        Dataset.from_dict({"content": CORPUS[part::2]}).to_parquet(files / "shards" / f"part-{part}.parquet")
    DatasetDict({"train": Dataset.from_dict({"text": CORPUS})}).save_to_disk(files / "saved")
    (files / "pairs.jsonl").write_text(
        "".join(json.dumps({"query": f"about {text.split()[1]}", "positive": text, "negative": CORPUS[i - 1]}) + "\n" for i, text in enumerate(CORPUS))
    )
    beir = files / "scifact"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n" for i, text in enumerate(CORPUS)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": CORPUS[i][:30]}) + "\n" for i in range(5)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    code = main([
        "pretrain", "--model", str(world / "hub" / "bert"), "--train-data", str(files / "corpus.txt"),
        "--output-dir", str(files / "retromae-output"), "--max-steps", "2", "--batch-size", "4",
    ])
    assert code == 0
    return world


def run_pages(world: Path, folder: Path, chosen) -> dict[str, tuple[list[dict], list[dict]]]:
    """Run the chosen blocks of every page, each page in a folder of its own holding the stand-ins: (blocks, results) by page."""
    stand_ins = {family: world / "hub" / family for family in STAND_INS}
    plan = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        runnable = [block for block in blocks(page) if block["language"] in RUN and not not_run(block) and chosen(block)]
        if not runnable:
            continue
        page_folder = folder / name.replace("/", "-")
        shutil.copytree(world / "files", page_folder, symlinks=True)
        shutil.copytree(ROOT / "benchmarks", page_folder / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
        plan.append({
            "page": name,
            "folder": str(page_folder),
            "blocks": [{"line": b["line"], "language": b["language"], "code": adapted(b, stand_ins, f"{name}:{b['line']}")} for b in runnable],
        })
    (folder / "plan.json").write_text(json.dumps({"pages": plan}))
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "doc_blocks.py"), str(folder / "plan.json"), str(folder / "results.json")],
        check=True, timeout=1800,
    )
    results = json.loads((folder / "results.json").read_text())
    return {page["page"]: (page["blocks"], results[page["page"]]) for page in plan}


@pytest.fixture(scope="session")
def quick_pages(world, tmp_path_factory) -> dict:
    return run_pages(world, tmp_path_factory.mktemp("docs-quick"), lambda block: not slow(block))


def assert_every_block_ran(run: dict, page: str) -> None:
    planned, results = run[page]
    failed = [result for result in results if result["error"]]
    assert not failed, f"{page}:{failed[0]['line']}: {failed[0]['error']}"
    assert [result["line"] for result in results] == [block["line"] for block in planned]


@pytest.mark.parametrize("page", [str(page.relative_to(ROOT)) for page in PAGES if any(
    block["language"] in RUN and not not_run(block) and not slow(block) for block in blocks(page))])
def test_every_code_block_of_the_page_runs(quick_pages, page):
    assert_every_block_ran(quick_pages, page)


@pytest.mark.slow
def test_every_slow_code_block_runs(world, tmp_path):
    run = run_pages(world, tmp_path, slow)
    for page in run:
        assert_every_block_ran(run, page)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_block_is_run_or_shows_output(page):
    """No code escapes the test: fenced blocks are python or bash (run), or text or bibtex (output); none is indented."""
    for block in blocks(page):
        assert block["language"] in RUN | SHOWN, f"{page.name}:{block['line']}: a ```{block['language']} block is neither run nor output"
        for directive in block["directives"]:
            assert directive == "slow" or directive.startswith(("substitute ", "not run:", "checked by ")), f"{page.name}:{block['line']}: unknown directive {directive!r}"
    outside_fences = BLOCK.sub("", page.read_text())
    assert not re.search(r"\n\n {4,}\S", outside_fences), f"{page.name}: an indented code block is not run; fence it"


def test_only_the_readme_install_commands_are_not_run_and_ci_runs_them():
    """The README's two commands install from scratch; `.ci/run` runs them, the test command included, in a fresh virtual environment."""
    unrun = [(page, block) for page in PAGES for block in blocks(page) if not_run(block) and not checked_by(block)]
    assert [page for page, _ in unrun] == [ROOT / "README.md"]
    lines = unrun[0][1]["code"].splitlines()
    assert lines[1] == 'pip install torch==2.13.0 && pip install -e ".[demo]" && retromae pretrain'
    assert lines[2] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for step in " && ".join([lines[0], lines[2]]).split(" && "):
        pip = re.fullmatch(r"pip install (.*)", step)
        expected = re.compile(rf"python -m pip install (--quiet )?{re.escape(pip[1])}" if pip else re.escape(step))
        assert any(expected.fullmatch(line) for line in ci), f".ci/run does not run the README's `{step}`"


def test_the_readme_names_the_torch_version_pyproject_requires():
    floor = re.search(r'"torch(>=[0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert f"`torch{floor}` is required" in (ROOT / "README.md").read_text()


def release_card() -> str:
    report = {"data": "scifact", "split": "test", "queries": 5, "documents": 50, "ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 1.0}
    return str(model_card("org/name", pretraining={"base_model": "bert-base-uncased"}, evaluations=[report]))


def test_the_card_names_the_metrics_source_the_code_uses():
    """`retromae evaluate` ranks with the package's own code and scores with pytrec_eval; the card says so, not another evaluator."""
    from retromae import evaluate

    source = Path(evaluate.__file__).read_text()
    assert "import pytrec_eval" in source and "InformationRetrievalEvaluator" not in source
    card = release_card()
    assert "trec_eval" in card
    assert "InformationRetrievalEvaluator" not in card


@pytest.mark.parametrize("words", ["card", "template", *[str(page.relative_to(ROOT)) for page in PAGES]])
def test_no_tool_is_named_that_no_test_runs(words):
    text = {"card": release_card, "template": lambda: (ROOT / "hub" / "model_card_template.md").read_text()}.get(words, lambda: (ROOT / words).read_text())()
    named = [tool for tool in UNTESTED_TOOLS if re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", text)]
    assert not named, f"{words} names {named}, which no test runs"


def test_blocks_checked_by_another_test_name_a_test_that_reads_their_page():
    """A launch command that cannot run on this machine is parsed and checked by a named test of the page."""
    checked = [(page, block, target) for page in PAGES for block in blocks(page) for target in checked_by(block)]
    assert checked
    for page, block, (path, _, name) in checked:
        source = (ROOT / path).read_text()
        assert f"def {name.split(':')[0]}(" in source, f"{page.name}:{block['line']}: no test {name} in {path}"
        assert page.name in source, f"{page.name}:{block['line']}: {path} does not read {page.name}"


def test_every_slow_test_is_listed_in_the_design_page():
    """docs/design.md names each slow end-to-end test, so a reader knows what `-m slow` runs."""
    design = (ROOT / "docs" / "design.md").read_text()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in re.findall(r"@pytest\.mark\.slow\n(?:@.*\n)*def (\w+)", path.read_text()):
            assert f"tests/{path.name}::{name}" in design, f"docs/design.md does not list tests/{path.name}::{name}"


def test_every_module_of_the_package_is_in_the_design_pages_table():
    """docs/design.md says what each module owns: a new module is added to its table."""
    table = (ROOT / "docs" / "design.md").read_text().split("## The tests")[0]
    listed = set(re.findall(r"`([\w/.]+)`", table))
    modules = [path.name for path in sorted(ROOT.glob("*.py"))]
    assert "hub/" in listed and [name for name in modules if name not in listed] == []
