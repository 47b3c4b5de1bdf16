"""Does RetroMAE pre-training give a better retrieval encoder than MLM? The paper's claim, at CPU scale.

From the same initial weights, the same passages in the same order and the same number of
steps, this pre-trains a fresh 2 x 128 BERT with a WordPiece vocabulary of its own:

  mlm-0.15, mlm-0.30              BertForMaskedLM, whole-word masking at 15% / 30%
  retromae                        RetroMAE with the paper's defaults (encoder 0.30, decoder 0.50)
  retromae-no-enhanced-decoding   ablation: the decoder reads a 50%-masked copy with self-attention
  retromae-decoder-0.15/0.70      ablation: decoder mask ratio 0.15 / 0.70 (0.50 is `retromae`)

The regime is one where a small model learns language on 2 cores: the vocabulary (4,096
WordPiece entries) is trained on the pre-training articles only, passages are whole sentences
packed into 64 tokens, and each variant trains for thousands of steps at a learning rate
chosen by a short sweep on the MLM 0.30 baseline alone (lowest held-apart MLM loss).

Each encoder is then measured on articles held apart from pre-training:

  probe       the decoder's loss on held-apart passages with each passage's own sentence
              embedding h_X, and with h_X of another held-apart passage: the gap is what the
              embedding tells the decoder (RetroMAE variants; `retromae pretrain` reports it while
              training, as embedding information, with the same code); the held-apart MLM loss of every
              encoder, against the corpus' unigram entropy (the loss of predicting token frequencies)
  zero-shot   inverse-cloze retrieval with the [CLS] embedding as it is: a sentence is the query,
              the rest of its passage the one relevant document, among all held-apart passages
  fine-tuned  the same task after the same short contrastive fine-tune of every encoder
              (`retromae finetune`: MultipleNegativesRankingLoss on inverse-cloze pairs of the
              pre-training articles, identical steps, data order and seed)

MLM 0.30 and RetroMAE run with every seed of --seeds (mean and spread reported), the initial
weights and the other variants with the first. The corpus is the Wikipedia excerpt of the demo extra (105 articles).

    python benchmarks/replicate.py            # the experiment (55 minutes on 2 cores, measured)
    python benchmarks/replicate.py --quick    # a few steps of each part (CI smoke)

Writes to OUTPUT_DIR: replicate.json (every figure, the sweep and the loss curves),
replicate_retrieval.png (both evaluations, error bars = standard deviation over seeds),
replicate_losses.png (loss curves with the unigram entropy, and the sweep), and the seed-0
encoders in encoders/<variant>/ (release folders: SentenceTransformer(folder) loads them).
"""

import argparse
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from tqdm.auto import tqdm
from transformers import BertForMaskedLM, get_linear_schedule_with_warmup
from transformers.utils import logging

from retromae import RetroMAECollator, RetroMAEConfig, RetroMAEForMaskedLM, RetroMAEForPreTraining
from retromae import finetune
from retromae.data import Article, demo_articles
from retromae.diagnostics import evaluate_held_out
from retromae.run_passages import HeldOutSet, first_passages
from retromae.evaluate import METRICS, RetrievalTask, evaluate
from retromae.model_folder import save_atomically, write_model_files
from retromae.loading import load_tokenizer
from retromae.run_record import hardware
from retromae.sentence_transformer import load_sentence_transformer


VARIANTS = {
    "mlm-0.15": dict(objective="mlm", encoder_mask_ratio=0.15),
    "mlm-0.30": dict(objective="mlm", encoder_mask_ratio=0.30),
    "retromae": dict(objective="retromae"),
    "retromae-no-enhanced-decoding": dict(objective="retromae", enhanced_decoding=False),
    "retromae-decoder-0.15": dict(objective="retromae", decoder_mask_ratio=0.15),
    "retromae-decoder-0.70": dict(objective="retromae", decoder_mask_ratio=0.70),
}
EVERY_SEED = ("mlm-0.30", "retromae")  # the comparison the claim rests on; the rest run with the first seed
INITIAL = "initial weights"
BASELINE = "mlm-0.30"
TINY_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
SWEEP_LEARNING_RATES = (5e-4, 1e-3, 2e-3, 5e-3)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
MIN_QUERY_WORDS = 5
PROBE_PASSAGES = 512


# The data: articles split whole, a vocabulary of the pre-training articles, sentence-packed passages.


def split_articles(articles: list[Article], evaluation_share: float, seed: int) -> tuple[list[Article], list[Article]]:
    """(pre-training articles, evaluation articles): whole articles, so no evaluation text is seen in training."""
    shuffled = random.Random(seed).sample(articles, len(articles))
    held_apart = max(1, round(len(articles) * evaluation_share))
    return shuffled[held_apart:], shuffled[:held_apart]


def train_vocabulary(articles: list[Article], size: int, folder: Path):
    """
    A lower-cased WordPiece vocabulary of the pre-training articles, as `retromae pretrain
    --tokenizer` takes it (a folder holding vocab.txt). The trainer numbers the entries in an
    order that varies from run to run; they are renumbered (special tokens first, then sorted)
    so that the same text always gives the same ids, and so the same initial weights.
    """
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator((p for article in articles for p in article.paragraphs), vocab_size=size, min_frequency=2, show_progress=False)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    entries = special + sorted(set(wordpiece.get_vocab()) - set(special))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    return load_tokenizer(str(folder))


def into_passages(article: Article, tokenizer, max_length: int) -> Article:
    """The article as passages of whole consecutive sentences that fit in `max_length` tokens with [CLS] and [SEP]."""
    budget = max_length - 2
    passages = []
    for paragraph in article.paragraphs:
        passage, used = [], 0
        for sentence in SENTENCE_END.split(paragraph):
            length = len(tokenizer.tokenize(sentence))
            if passage and used + length > budget:
                passages.append(" ".join(passage))
                passage, used = [], 0
            passage.append(sentence)
            used += length
        passages.append(" ".join(passage))
    return Article(article.title, passages)


def unigram_entropy(passages: list[str], tokenizer, max_length: int) -> float:
    """Entropy in nats of the token distribution the models are trained on: the MLM loss of predicting token frequencies."""
    counts = Counter(token for text in passages for token in tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"])
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


def cloze_splits(passage: str) -> list[tuple[str, str]]:
    """(sentence, the passage without it) for every sentence of 5+ words of a passage of 2+ sentences."""
    sentences = SENTENCE_END.split(passage)
    if len(sentences) < 2:
        return []
    return [
        (sentence, " ".join(sentences[:i] + sentences[i + 1 :]))
        for i, sentence in enumerate(sentences)
        if len(sentence.split()) >= MIN_QUERY_WORDS
    ]


def inverse_cloze_task(articles: list[Article], max_queries: int, seed: int) -> RetrievalTask:
    """
    Every held-apart passage is a document. From each passage of 2+ sentences, one sentence of
    5+ words is a query, and its document is the passage without it; queries are sampled down to `max_queries`.
    """
    generator = random.Random(seed)
    corpus, queries, relevant = {}, {}, {}
    for article_index, article in enumerate(articles):
        for passage_index, passage in enumerate(article.paragraphs):
            document = f"{article_index}-{passage_index}"
            splits = cloze_splits(passage)
            if splits:
                queries[f"q{document}"], passage = generator.choice(splits)
                relevant[f"q{document}"] = {document: 1}
            corpus[document] = passage
    kept = sorted(random.Random(seed).sample(sorted(queries), min(max_queries, len(queries))))
    return RetrievalTask(corpus=corpus, queries={q: queries[q] for q in kept}, relevant={q: relevant[q] for q in kept})


def write_fine_tuning_pairs(articles: list[Article], path: Path) -> int:
    """
    Inverse-cloze pairs of the pre-training articles as `retromae finetune` reads them: every
    sentence of 5+ words of a passage of 2+ sentences, with the rest of its passage. Returns their number.
    """
    pairs = [{"query": query, "positive": rest} for article in articles for passage in article.paragraphs for query, rest in cloze_splits(passage)]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return len(pairs)


# Pre-training: every variant from the same weights, passages, order and number of steps.


def initial_weights(config: RetroMAEConfig, seed: int) -> dict:
    """The encoder + MLM-head weights every variant of a seed starts from."""
    torch.manual_seed(seed)
    return RetroMAEForMaskedLM(config.encoder).state_dict()


def build_model(objective: str, config: RetroMAEConfig, weights: dict, seed: int) -> torch.nn.Module:
    """The model a variant trains: BertForMaskedLM, or RetroMAE with a decoder seeded alike across variants."""
    torch.manual_seed(seed)
    if objective == "mlm":
        model = BertForMaskedLM(config.encoder)
        model.load_state_dict(weights)
        return model
    model = RetroMAEForPreTraining(config)
    model.encoder.load_state_dict(weights)
    return model


def variant_setup(settings: dict, config: RetroMAEConfig, tokenizer, max_length: int, seed: int):
    """(objective, the variant's config, its collator) for one variant's settings."""
    settings = dict(settings)
    objective = settings.pop("objective")
    variant_config = RetroMAEConfig(**(config.to_dict() | settings))
    collator = RetroMAECollator.from_config(variant_config, tokenizer, max_length=max_length, seed=seed)
    return objective, variant_config, collator


def step_losses(model: torch.nn.Module, objective: str, batch: dict) -> tuple[torch.Tensor, float, float | None]:
    """(loss to minimise, encoder loss, decoder loss or None) for one batch."""
    if objective == "mlm":
        output = model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"], labels=batch["encoder_labels"])
        return output.loss, output.loss.item(), None
    output = model(**batch)
    return output.loss, output.encoder_loss.item(), output.decoder_loss.item()


def pretrain(name: str, settings: dict, config: RetroMAEConfig, weights: dict, passages: list[str], tokenizer, args, seed: int, steps: int, learning_rate: float):
    """Train one variant; return (the trained model, its setup, loss curves, seconds)."""
    objective, variant_config, collator = variant_setup(settings, config, tokenizer, args.max_length, seed)
    model = build_model(objective, variant_config, weights, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * steps), steps)
    curves = {"encoder_loss": [], "decoder_loss": []}
    start = time.perf_counter()
    for epoch, texts in tqdm(batch_order(passages, args.batch_size, steps, seed), desc=f"{name} (seed {seed})", file=sys.stdout, mininterval=30):
        collator.set_epoch(epoch)
        loss, encoder_loss, decoder_loss = step_losses(model, objective, collator(texts))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        curves["encoder_loss"].append(round(encoder_loss, 4))
        curves["decoder_loss"].append(None if decoder_loss is None else round(decoder_loss, 4))
    return model.eval(), (objective, variant_config), curves, time.perf_counter() - start


def batch_order(passages: list[str], batch_size: int, steps: int, seed: int) -> list[tuple[int, list[str]]]:
    """(epoch, passages) for every step: a fresh seeded shuffle per pass, identical for every variant."""
    batches, epoch = [], 0
    while len(batches) < steps:
        order = random.Random(f"{seed}:{epoch}").sample(passages, len(passages))
        batches += [(epoch, order[i : i + batch_size]) for i in range(0, len(order) - batch_size + 1, batch_size)]
        epoch += 1
    return batches[:steps]


def encoder_weights(model: torch.nn.Module) -> dict:
    """The encoder and its MLM head (BertForMaskedLM's weights), without RetroMAE's decoder."""
    return (model.encoder if isinstance(model, RetroMAEForPreTraining) else model).state_dict()


def sweep_learning_rate(config, tokenizer, passages, probe_passages, args) -> dict:
    """Short runs of the MLM baseline alone at each learning rate; the best is the one of lowest held-apart MLM loss."""
    weights = initial_weights(config, args.seeds[0])
    losses = {}
    for learning_rate in SWEEP_LEARNING_RATES:
        model, setup, _, _ = pretrain(f"sweep {learning_rate:g}", VARIANTS[BASELINE], config, weights, passages, tokenizer, args, args.seeds[0], args.sweep_steps, learning_rate)
        losses[f"{learning_rate:g}"] = probe(model, setup, tokenizer, probe_passages, args)["encoder_loss"]
        print(f"sweep: learning rate {learning_rate:g}, held-apart MLM loss {losses[f'{learning_rate:g}']:.4f}")
    return {"steps": args.sweep_steps, "held_apart_mlm_loss": losses, "chosen": float(min(losses, key=losses.get))}


# The measurements.


@torch.no_grad()
def probe(model: torch.nn.Module, setup: tuple, tokenizer, passages: list[str], args) -> dict[str, float]:
    """
    Held-apart figures, token-weighted: the encoder's MLM loss and, for RetroMAE, the decoder's
    loss with each passage's own sentence embedding and with another passage's, and their gap
    (the package's held-out diagnostics, `retromae.diagnostics`: its "embedding information").
    """
    objective, variant_config = setup
    _, _, collator = variant_setup({"objective": objective}, variant_config, tokenizer, args.max_length, seed=0)
    cut = lambda batch: tokenizer(batch["text"], add_special_tokens=False, truncation=True, max_length=args.max_length - 2)  # noqa: E731
    held_out = HeldOutSet.from_passages(first_passages(passages, cut, len(passages), collator), collator, args.batch_size, seed=0)
    if objective == "mlm":
        return {"encoder_loss": mlm_loss(model, held_out)}
    figures = evaluate_held_out(model, held_out)
    return {
        "encoder_loss": figures["encoder_loss"],
        "decoder_loss_own_embedding": figures["decoder_loss"],
        "decoder_loss_other_embedding": figures["decoder_loss"] + figures["embedding_information"],
        "embedding_gap": figures["embedding_information"],
    }


def mlm_loss(model: torch.nn.Module, held_out: HeldOutSet) -> float:
    """A BertForMaskedLM's loss on the held-apart batches, weighted by their masked tokens as the RetroMAE encoder's is."""
    total = count = 0
    for batch in held_out.batches:
        masked = int((batch["encoder_labels"] != -100).sum())
        total += step_losses(model, "mlm", batch)[1] * masked
        count += masked
    return total / count


def save_encoder(folder: Path, config: RetroMAEConfig, weights: dict, tokenizer, record: dict) -> Path:
    """A release-layout folder of the encoder, as `retromae pretrain` writes OUTPUT_DIR/model."""
    encoder = RetroMAEForMaskedLM(config.encoder)
    encoder.load_state_dict(weights)
    save_atomically(folder, lambda path: write_model_files(path, encoder, tokenizer, record))
    return folder


def fine_tune(folder: Path, pairs: Path, output_dir: Path, args, seed: int) -> tuple[Path, dict]:
    """
    `retromae finetune` of one encoder (identical pairs, steps, learning rate and seed for every
    variant); returns the fine-tuned model and its contrastive loss (first, last and mean of those logged).
    """
    arguments = argparse.ArgumentParser()
    finetune.add_arguments(arguments)
    options = arguments.parse_args([
        "--model", str(folder),
        "--train-data", str(pairs),
        "--output-dir", str(output_dir),
        "--batch-size", str(args.fine_tune_batch_size),
        "--max-steps", str(args.fine_tune_steps),
        "--learning-rate", str(args.fine_tune_learning_rate),
        "--seed", str(seed),
        "--save-steps", str(args.fine_tune_steps),
        "--logging-steps", str(max(1, args.fine_tune_steps // 10)),
    ])  # fmt: skip
    model = finetune.run(options)
    state = json.loads((output_dir / f"checkpoint-{args.fine_tune_steps}" / "trainer_state.json").read_text())
    logged = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return model, {"first_logged": logged[0], "last_logged": logged[-1], "mean_logged": statistics.fmean(logged)}


def measure(name: str, seed: int, config, weights, tokenizer, task, pairs, workspace: Path, args, record: dict) -> dict:
    """Both retrieval evaluations of one encoder; its folder is kept in OUTPUT_DIR/encoders for the first seed."""
    kept = seed == args.seeds[0]
    folder_name = name.replace(" ", "-")
    folder = (Path(args.output_dir) / "encoders" if kept else workspace) / folder_name
    save_encoder(folder, config, weights, tokenizer, record | {"variant": name, "seed": seed})
    zero_shot = evaluate(load_sentence_transformer(str(folder)), task, batch_size=128)
    fine_tuned_folder, fine_tune_loss = fine_tune(folder, pairs, workspace / f"{folder_name}-{seed}-fine-tuned", args, seed)
    fine_tuned = evaluate(load_sentence_transformer(str(fine_tuned_folder)), task, batch_size=128)
    print(f"{name} (seed {seed}): zero-shot nDCG@10 {zero_shot['ndcg@10']:.4f}, fine-tuned nDCG@10 {fine_tuned['ndcg@10']:.4f}")
    return {"zero_shot": zero_shot, "fine_tuned": fine_tuned, "fine_tune_loss": fine_tune_loss}


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean and (with 2+ seeds) standard deviation over seeds of every figure of `per_seed`."""
    first = next(iter(per_seed.values()))
    summary = {}
    for part in (part for part, figures in first.items() if isinstance(figures, dict)):
        summary[part] = {}
        for figure in first[part]:
            values = [scores[part][figure] for scores in per_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[part][figure] = {"mean": statistics.fmean(values), "std": spread, "seeds": len(values)}
    return summary


# The report.


def plot(report: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    figure, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    width = 0.8 / len(METRICS)
    for axis, (part, title) in zip(axes, (("zero_shot", "zero-shot [CLS]"), ("fine_tuned", "after the same contrastive fine-tune"))):
        for offset, metric in enumerate(METRICS):
            summaries = [report["results"][name]["summary"][part][metric] for name in names]
            positions = [i + (offset - (len(METRICS) - 1) / 2) * width for i in range(len(names))]
            bars = axis.bar(positions, [s["mean"] for s in summaries], width, yerr=[s["std"] for s in summaries], capsize=2, label=metric)
            axis.bar_label(bars, fmt="%.3f", fontsize=6, padding=2)
        seeds = [report["results"][name]["summary"][part][METRICS[0]]["seeds"] for name in names]
        labels = [f"{name}\n({count} seed{'s' if count > 1 else ''})" for name, count in zip(names, seeds)]
        axis.set_xticks(range(len(names)), [label.replace("retromae-", "retromae-\n") for label in labels], fontsize=7)
        axis.set_title(f"{title}: {report['task']['queries']} queries, {report['task']['documents']} passages", fontsize=9)
    axes[0].set_ylabel("inverse-cloze retrieval, held-apart articles")
    axes[0].legend(fontsize=8)
    figure.suptitle("Mean over seeds; error bars: standard deviation over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(output_dir / "replicate_retrieval.png", dpi=120)

    entropy = report["corpus"]["unigram_entropy"]
    figure, (encoder_axis, decoder_axis, sweep_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, curves in report["loss_curves"].items():
        encoder_axis.plot(smooth(curves["encoder_loss"]), label=name, linewidth=1)
        if curves["decoder_loss"][0] is not None:
            decoder_axis.plot(smooth(curves["decoder_loss"]), label=name, linewidth=1)
    for axis, title in ((encoder_axis, "encoder (MLM) loss"), (decoder_axis, "decoder loss")):
        axis.axhline(entropy, color="black", linestyle="--", linewidth=1, label=f"unigram entropy {entropy:.2f}")
        axis.set_title(f"{title}, seed {report['settings']['seeds'][0]}, 50-step mean", fontsize=9)
        axis.set_xlabel("step")
        axis.legend(fontsize=6)
    sweep = report["learning_rate_sweep"]
    if sweep:
        rates = sorted(sweep["held_apart_mlm_loss"], key=float)
        sweep_axis.plot([float(rate) for rate in rates], [sweep["held_apart_mlm_loss"][rate] for rate in rates], marker="o")
        sweep_axis.set_xscale("log")
        sweep_axis.set_xticks([float(rate) for rate in rates], rates)
        sweep_axis.minorticks_off()
        sweep_axis.set_title(f"{BASELINE} learning-rate sweep ({sweep['steps']} steps): held-apart MLM loss", fontsize=9)
        sweep_axis.set_xlabel("peak learning rate")
    figure.tight_layout()
    figure.savefig(output_dir / "replicate_losses.png", dpi=120)


def smooth(values: list[float], window: int = 50) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def print_table(report: dict) -> None:
    settings = report["settings"]
    print(f"\n{report['model']}, {settings['steps']} steps x {settings['batch_size']} passages, learning rate {report['learning_rate']:g}, seeds {settings['seeds']}")
    print(f"unigram entropy of the pre-training tokens: {report['corpus']['unigram_entropy']:.3f} nats")
    print(f"{'variant':<31} {'seeds':>5} {'zero-shot nDCG@10':>20} {'fine-tuned nDCG@10':>20} {'MLM loss':>9} {'embedding gap':>14} {'last fine-tune loss':>20}")
    for name, result in report["results"].items():
        summary = result["summary"]
        cells = [f"{summary[part]['ndcg@10']['mean']:.4f} ± {summary[part]['ndcg@10']['std']:.4f}" for part in ("zero_shot", "fine_tuned")]
        probe_figures = summary.get("probe", {})
        mlm = f"{probe_figures['encoder_loss']['mean']:.3f}" if "encoder_loss" in probe_figures else "-"
        gap = f"{probe_figures['embedding_gap']['mean']:.3f}" if "embedding_gap" in probe_figures else "-"
        last = summary["fine_tune_loss"]["last_logged"]
        print(f"{name:<31} {summary['zero_shot']['ndcg@10']['seeds']:>5} {cells[0]:>20} {cells[1]:>20} {mlm:>9} {gap:>14} {last['mean']:>11.3f} ± {last['std']:.3f}")
    print(f"wall time {report['wall_seconds'] / 60:.1f} min; {report['machine']}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="Pre-training steps per variant, the same for all. Default: 1500.")
    parser.add_argument("--batch-size", type=int, default=32, help="Passages per pre-training step. Default: 32.")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per passage in pre-training and evaluation. Default: 64.")
    parser.add_argument("--vocabulary-size", type=int, default=4096, help="WordPiece entries trained on the pre-training articles. Default: 4096.")
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"Peak pre-training learning rate (10%% warm-up, linear decay). Default: the best of a sweep over {SWEEP_LEARNING_RATES} on {BASELINE}.",
    )
    parser.add_argument("--sweep-steps", type=int, default=400, help="Steps of each sweep run. Default: 400.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help=f"Seeds of {' and '.join(EVERY_SEED)} (the rest run with the first). Default: 0 1 2.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="Variants to run. Default: all.")
    parser.add_argument("--fine-tune-steps", type=int, default=300, help="Contrastive fine-tuning steps, the same for every encoder. Default: 300.")
    parser.add_argument("--fine-tune-batch-size", type=int, default=64, help="Pairs per fine-tuning step (in-batch negatives). Default: 64.")
    parser.add_argument("--fine-tune-learning-rate", type=float, default=1e-3, help="Peak fine-tuning learning rate. Default: 1e-3.")
    parser.add_argument("--evaluation-share", type=float, default=0.25, help="Share of the articles held apart from pre-training. Default: 0.25.")
    parser.add_argument("--max-queries", type=int, default=1000, help="Queries of the retrieval task at most. Default: 1000.")
    parser.add_argument("--output-dir", default="benchmarks/results", help="Where the JSON, figures, vocabulary and encoders go (git ignores the last two). Default: benchmarks/results.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: a few steps of each part on 3 evaluation articles (checks the pipeline, not the outcome).")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.sweep_steps, args.batch_size, args.fine_tune_steps, args.fine_tune_batch_size = 3, 2, 4, 2, 4
        args.max_queries, args.evaluation_share, args.vocabulary_size = 40, 0.03, 1000
    return args


def main() -> None:
    args = parse_arguments()
    logging.set_verbosity_error()  # the heads that sentence-transformers leaves unused are expected
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training_articles, evaluation_articles = split_articles(demo_articles(), args.evaluation_share, seed=0)
    tokenizer = train_vocabulary(training_articles, args.vocabulary_size, output_dir / "vocabulary")
    training_articles = [into_passages(article, tokenizer, args.max_length) for article in training_articles]
    evaluation_articles = [into_passages(article, tokenizer, args.max_length) for article in evaluation_articles]
    passages = [passage for article in training_articles for passage in article.paragraphs]
    held_apart = [passage for article in evaluation_articles for passage in article.paragraphs]
    probe_passages = random.Random(0).sample(held_apart, min(PROBE_PASSAGES, len(held_apart)))
    task = inverse_cloze_task(evaluation_articles, args.max_queries, seed=0)
    entropy = unigram_entropy(passages, tokenizer, args.max_length)
    print(f"{len(passages)} pre-training passages, vocabulary {len(tokenizer)}, unigram entropy {entropy:.3f} nats; task: {len(task.queries)} queries over {len(task.corpus)} held-apart passages")

    config = RetroMAEConfig(vocab_size=len(tokenizer), max_position_embeddings=args.max_length, **TINY_BERT)
    sweep = sweep_learning_rate(config, tokenizer, passages, probe_passages, args) if args.learning_rate is None else None
    learning_rate = args.learning_rate or sweep["chosen"]
    record = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": learning_rate, "max_length": args.max_length, "corpus": "demo Wikipedia excerpt, pre-training articles"}

    results = {name: {"per_seed": {}} for name in [INITIAL, *args.variants]}
    loss_curves = {}
    with tempfile.TemporaryDirectory() as workspace:
        pairs = Path(workspace) / "fine_tuning_pairs.jsonl"
        fine_tuning_pairs = write_fine_tuning_pairs(training_articles, pairs)
        for seed in args.seeds:
            weights = initial_weights(config, seed)
            if seed == args.seeds[0]:
                results[INITIAL]["per_seed"][seed] = measure(INITIAL, seed, config, weights, tokenizer, task, pairs, Path(workspace), args, record | {"steps": 0})
            for name in args.variants:
                if seed != args.seeds[0] and name not in EVERY_SEED:
                    continue
                model, setup, curves, seconds = pretrain(name, VARIANTS[name], config, weights, passages, tokenizer, args, seed, args.steps, learning_rate)
                scores = {"probe": probe(model, setup, tokenizer, probe_passages, args), "train_seconds": seconds}
                scores["final_training_loss"] = {key: statistics.fmean(values[-100:]) for key, values in curves.items() if values[-1] is not None}
                scores |= measure(name, seed, config, encoder_weights(model), tokenizer, task, pairs, Path(workspace), args, record | VARIANTS[name])
                results[name]["per_seed"][seed] = scores
                loss_curves.setdefault(name, curves)
                print(f"{name} (seed {seed}): probe " + ", ".join(f"{key} {value:.4f}" for key, value in scores["probe"].items()))
    for result in results.values():
        result["summary"] = summarise(result["per_seed"])

    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{hardware(torch.device('cpu'))}, torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "model": "fresh " + " x ".join(str(TINY_BERT[k]) for k in ("num_hidden_layers", "hidden_size")) + " BERT",
        "learning_rate": learning_rate,
        "learning_rate_sweep": sweep,
        "corpus": {
            "pretraining_articles": len(training_articles),
            "pretraining_passages": len(passages),
            "evaluation_articles": len(evaluation_articles),
            "vocabulary": len(tokenizer),
            "unigram_entropy": entropy,
            "fine_tuning_pairs": fine_tuning_pairs,
            "probe_passages": len(probe_passages),
        },
        "task": {"queries": len(task.queries), "documents": len(task.corpus)},
        "variants": {name: VARIANTS[name] for name in args.variants},
        "results": results,
        "loss_curves": loss_curves,
        "wall_seconds": time.perf_counter() - started,
    }
    with open(output_dir / "replicate.json", "w") as file:
        json.dump(report, file, indent=1)
    plot(report, output_dir)
    print_table(report)


if __name__ == "__main__":
    main()
