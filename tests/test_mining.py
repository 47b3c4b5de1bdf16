"""`retromae finetune --mine-hard-negatives K`: no judged positive is mined, the mined set is saved and reused, bad input is refused."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
from sentence_transformers import SentenceTransformer

from retromae import mining
from retromae.cli import main
from retromae.mining import MINED_SET, MINING_RECORD, MiningSettings, candidate_passages, load_passages, mine, ranked_negatives

from conftest import MINILM_PATH
from families import build_checkpoint


# Retrieval with known answers: (query, its training positives, passages that also answer it but are no training
# positive, passages on other things). The first query comes with two training positives.
TOPICS = [
    ("what do cats do all day",
     ["Cats spend most of the day asleep, often curled up in a sunny spot.", "A house cat sleeps twelve to sixteen hours every day."],
     ["Domestic cats nap through much of the day and groom themselves when they wake.", "Most pet cats doze all day long and wake up at dusk to play."],
     ["Dogs need a long walk every day to stay fit.", "Lions hunt in groups on the African savanna."]),
    ("how do rivers reach the sea",
     ["Rivers flow downhill under gravity until they empty into the sea."],
     ["Water in a river runs down slopes and finally drains into the ocean.", "A river carries rain from the hills down to its mouth at the coast."],
     ["Lakes can freeze over in very cold winters.", "Glaciers carve deep valleys in mountain ranges."]),
    ("what is the capital of france",
     ["Paris is the capital and largest city of France."],
     ["The French capital is Paris, on the river Seine.", "France is governed from its capital city, Paris."],
     ["Berlin is the capital of Germany.", "Lyon is a large city in the south-east of France."]),
    ("how do plants make food",
     ["Plants make their food by photosynthesis, using sunlight, water and carbon dioxide."],
     ["Through photosynthesis, green plants turn light, water and CO2 into sugar.", "Leaves capture sunlight to produce glucose from water and carbon dioxide."],
     ["Mushrooms are fungi and do not photosynthesise.", "Many animals eat plants to get their energy."]),
    ("who wrote hamlet",
     ["Hamlet is a tragedy written by William Shakespeare."],
     ["William Shakespeare is the author of the play Hamlet.", "The tragedy of Hamlet, Prince of Denmark, was written by Shakespeare around 1600."],
     ["Christopher Marlowe wrote Doctor Faustus.", "Denmark is a country in northern Europe."]),
    ("why is the sky blue",
     ["The sky looks blue because air scatters blue sunlight more than red light."],
     ["Rayleigh scattering of sunlight by air molecules makes the sky appear blue.", "Short blue wavelengths of sunlight are scattered most by the atmosphere, colouring the sky."],
     ["Sunsets are often red and orange.", "Clouds are made of tiny water droplets."]),
    ("how does ice form",
     ["Ice forms when water cools below zero degrees Celsius and freezes."],
     ["Water turns into ice once its temperature drops under its freezing point of 0 C.", "When liquid water gets colder than zero degrees it freezes solid into ice."],
     ["Steam is water in the form of a gas.", "Salt is spread on roads in winter."]),
    ("what do bees make",
     ["Bees make honey from the nectar of flowers."],
     ["Honey bees produce honey by collecting and processing flower nectar.", "Beeswax and honey are both made by honey bees in the hive."],
     ["Wasps can sting more than once.", "Butterflies drink nectar from flowers."]),
]
PAIRS = [(query, positive) for query, positives, _, _ in TOPICS for positive in positives]
CORPUS = [text for _, _, judged, others in TOPICS for text in judged + others]
JUDGED = {query: {*positives, *judged} for query, positives, judged, _ in TOPICS}
K = 2


def write_pairs(path: Path, pairs=PAIRS, negatives=None) -> Path:
    rows = [{"query": q, "positive": p} | ({"negatives": negatives[i]} if negatives else {}) for i, (q, p) in enumerate(pairs)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def finetune(model, data, output_dir, *extra) -> list[str]:
    return ["finetune", "--model", str(model), "--train-data", str(data), "--output-dir", str(output_dir),
            "--batch-size", "4", "--max-steps", "1", "--save-steps", "1", "--learning-rate", "1e-5", *extra]


def run_quietly(argv: list[str]) -> tuple[int, str, str]:
    """`retromae ARGV`: exit status (argparse's refusals included), standard output and standard error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mined_run(tmp_path_factory) -> dict:
    """One fine-tuning of all-MiniLM-L6-v2 with K mined negatives from the pairs and CORPUS: its folder and console."""
    root = tmp_path_factory.mktemp("mined-run")
    data, corpus = write_pairs(root / "pairs.jsonl"), root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in CORPUS))
    argv = finetune(MINILM_PATH, data, root / "run", "--mine-hard-negatives", str(K), "--corpus", str(corpus))
    code, out, err = run_quietly(argv)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in (root / "run" / MINED_SET).read_text().splitlines()]
    return {"root": root, "argv": argv, "out": out, "err": err, "rows": rows, "record": json.loads((root / "run" / MINING_RECORD).read_text())}


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformer:
    return SentenceTransformer(MINILM_PATH)


@pytest.fixture
def no_mining(monkeypatch):
    """Mining made impossible: a run that mines fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("mined again")
    monkeypatch.setattr(mining, "mine_hard_negatives", refuse)


def examples(pairs=PAIRS) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})


def settings(**changes) -> MiningSettings:
    fields = dict(negatives=K, margin=mining.MARGIN, window=mining.WINDOW, model=MINILM_PATH, corpus=None, text_column="text", seed=0, train_data=__file__)
    return MiningSettings(**fields | changes)


def test_no_mined_negative_is_a_judged_positive_of_its_query(mined_run):
    assert [(row["query"], row["positive"]) for row in mined_run["rows"]] == PAIRS
    for row in mined_run["rows"]:
        assert len(row["negatives"]) == len(set(row["negatives"])) == K
        assert not JUDGED[row["query"]] & set(row["negatives"]), row


def test_without_the_guards_the_same_model_would_mine_judged_positives(minilm):
    """The fixture has false negatives to catch: with no margin and no skipped ranks, they are mined."""
    passages = candidate_passages(examples(), CORPUS)
    ranked = ranked_negatives(examples(), minilm, settings(margin=None, window=(0, 100)), passages, wanted=K)
    assert sum(negative in JUDGED[query] for query, negatives in ranked.items() for negative in negatives) > len(TOPICS)


def test_the_run_says_what_it_mined_shows_progress_and_records_how(mined_run):
    assert f"Mined {len(PAIRS) * K} hard negatives for {len(PAIRS)} examples of {len(TOPICS)} queries ({K} each wanted); 0 queries had fewer" in mined_run["out"]
    assert "Computing similarity scores" in mined_run["err"]  # sentence-transformers' progress bar
    record = mined_run["record"]
    assert record["mined_with"] | {"train_data_sha256": None} == {
        "negatives": K, "margin": 0.05, "window": [3, 100], "model": str(Path(MINILM_PATH).resolve()),
        "corpus": str((mined_run["root"] / "corpus.jsonl").resolve()), "text_column": "text", "seed": 42, "train_data_sha256": None,
    }
    assert (record["examples"], record["queries"], record["hard_negatives"], record["random_negatives"]) == (len(PAIRS), len(TOPICS), len(PAIRS) * K, 0)


def test_a_second_run_with_the_same_settings_reuses_the_mined_set(mined_run, tmp_path, no_mining):
    shutil.copytree(mined_run["root"] / "run", tmp_path / "run")
    argv = [*mined_run["argv"], "--resume", "--max-steps", "2"]
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "run")
    code, out, err = run_quietly(argv)
    assert code == 0, err[-2000:]
    assert "Reusing the hard negatives mined before with the same settings" in out
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_a_run_stopped_before_its_first_checkpoint_takes_up_its_mined_set_again(mined_run, tmp_path, no_mining):
    (tmp_path / "run").mkdir()
    for name in (MINED_SET, MINING_RECORD):
        shutil.copy(mined_run["root"] / "run" / name, tmp_path / "run" / name)
    argv = list(mined_run["argv"])
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "run")
    code, out, err = run_quietly(argv)
    assert code == 0, err[-2000:]
    assert "Reusing" in out and (tmp_path / "run" / "model").is_dir()


def test_other_settings_are_refused_naming_the_difference(mined_run, tmp_path):
    shutil.copytree(mined_run["root"] / "run", tmp_path / "run")
    argv = [*mined_run["argv"], "--resume", "--mining-margin", "0.1"]
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "run")
    code, _, err = run_quietly(argv)
    assert code == 2
    assert "--mining-margin was 0.05, now 0.1" in err and "pass --overwrite to mine again" in err


def test_the_mined_set_as_train_data_trains_on_it_without_mining(mined_run, tmp_path, no_mining):
    code, out, err = run_quietly(finetune(MINILM_PATH, mined_run["root"] / "run" / MINED_SET, tmp_path / "run"))
    assert code == 0, err[-2000:]
    assert "Mined" not in out and (tmp_path / "run" / "model").is_dir()


def test_given_negatives_are_kept_first_and_short_examples_are_topped_up_with_random_passages(minilm):
    """A margin that skips every candidate leaves each example short: random passages fill in, never a positive or a given negative."""
    given = [(q, p, CORPUS[i]) for i, (q, p) in enumerate(PAIRS)]
    data = datasets.Dataset.from_dict({"anchor": [g[0] for g in given], "positive": [g[1] for g in given], "negative_1": [g[2] for g in given]})
    passages = candidate_passages(data, CORPUS)
    mined = mine(data, minilm, settings(margin=10.0), passages)
    assert (mined.hard, mined.short_queries, mined.random) == (0, len(TOPICS), len(PAIRS) * K)
    for (query, positive, negative), row in zip(given, mined.rows):
        assert row["negatives"][0] == negative and len(set(row["negatives"])) == K + 1
        assert not {query, *(p for q, p in PAIRS if q == query)} & set(row["negatives"][1:])
    assert mine(data, minilm, settings(margin=10.0), passages).rows == mined.rows  # seeded


def test_sparse_fine_tuning_mines_with_the_first_token_state_of_its_encoder(tmp_path):
    build_checkpoint("bert", tmp_path / "masked_lm")
    assert main(["convert", str(tmp_path / "masked_lm"), str(tmp_path / "release")]) == 0
    assert main(["convert", "--sparse", str(tmp_path / "release"), str(tmp_path / "sparse")]) == 0
    code, out, err = run_quietly(finetune(tmp_path / "sparse", write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "run", "--sparse", "--mine-hard-negatives", "1"))
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / MINED_SET).read_text().splitlines()]
    assert all(len(row["negatives"]) == 1 and (row["query"], row["negatives"][0]) not in PAIRS for row in rows)
    assert (tmp_path / "run" / "model" / "1_SpladePooling").is_dir()


def test_a_corpus_is_read_in_any_form_the_package_reads_and_a_bad_one_named(tmp_path):
    (tmp_path / "folder").mkdir()
    for part in range(2):
        (tmp_path / "folder" / f"part-{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[part::2]))
    datasets.Dataset.from_dict({"content": CORPUS}).to_parquet(tmp_path / "corpus.parquet")
    assert sorted(load_passages(str(tmp_path / "folder"), "text")) == sorted(load_passages(str(tmp_path / "corpus.parquet"), "content")) == sorted(CORPUS)
    with pytest.raises(mining.UsageError, match=r"--corpus .*corpus.parquet: .*has no column 'text'.*pass --text-column"):
        load_passages(str(tmp_path / "corpus.parquet"), "text")


def test_help_lists_the_mining_options_with_their_defaults():
    code, out, _ = run_quietly(["finetune", "--help"])
    assert code == 0
    assert "--mining-window SKIP DEPTH" in out and "0.05" in out and "3 100 when not given" in out


@pytest.mark.filterwarnings("ignore:--train-data .* holds 1 distinct")
@pytest.mark.parametrize(
    "pairs, extra, message",
    [
        (PAIRS, ["--mine-hard-negatives", "0"], "argument --mine-hard-negatives: must be at least 1, got 0"),
        (PAIRS, ["--mine-hard-negatives", "-1"], "argument --mine-hard-negatives: must be at least 1, got -1"),
        (PAIRS, ["--corpus", "corpus.jsonl"], "--corpus is an option of hard-negative mining: give it with --mine-hard-negatives K."),
        (PAIRS, ["--mining-margin", "0.1"], "--mining-margin is an option of hard-negative mining"),
        (PAIRS, ["--mine-hard-negatives", "2", "--corpus", "missing.jsonl"], "--corpus missing.jsonl: no such file or folder."),
        (PAIRS[:1], ["--mine-hard-negatives", "1"], "the training data (no --corpus) hold only 0 passages besides the positives"),
        (PAIRS, ["--mine-hard-negatives", "3", "--mining-window", "3", "5"], "does not fit in --mining-window 3 5, which takes 2 ranks"),
        (PAIRS, ["--mine-hard-negatives", "2", "--text-column", "body"], "--text-column names the text column of --corpus"),
    ],
)
def test_bad_mining_input_fails_with_one_line(tmp_path, pairs, extra, message):
    folder = tmp_path / "not-loaded"  # refused before the model is read
    code, out, err = run_quietly(finetune(folder, write_pairs(tmp_path / "pairs.jsonl", pairs), tmp_path / "run", *extra))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
