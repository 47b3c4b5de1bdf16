"""Does RetroMAE pre-training give a better retrieval encoder than MLM? The paper's claim, at CPU scale.

From the same initial weights, the same passages in the same order and the same number of
steps, this pre-trains:

  mlm-0.15, mlm-0.30              BertForMaskedLM, whole-word masking at 15% / 30%
  retromae                        RetroMAE with the paper's defaults (encoder 0.30, decoder 0.50)
  retromae-no-enhanced-decoding   ablation: the decoder reads a 50%-masked copy with self-attention
  retromae-decoder-0.15/0.70      ablation: decoder mask ratio 0.15 / 0.70 (0.50 is `retromae`)

then scores each encoder's [CLS] embedding, with no fine-tuning, on an inverse-cloze retrieval
task built from articles held apart from pre-training: a sentence is the query, its paragraph
without that sentence the one relevant document, among every paragraph of those articles.
The figures are nDCG@10, MRR@10 and Recall@100 from `retromae.evaluate`. The corpus is the
Wikipedia excerpt of the demo extra (105 articles).

    python benchmarks/replicate.py                  # the experiment (about 45 minutes on 2 cores)
    python benchmarks/replicate.py --seeds 0 1 2    # more seeds, mean and spread reported
    python benchmarks/replicate.py --quick          # a few steps of each variant (CI smoke)

Writes OUTPUT_DIR/replicate.json (every figure and loss curve), replicate_retrieval.png (bar chart)
and replicate_losses.png (encoder and decoder loss per step).
"""

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertForMaskedLM, get_linear_schedule_with_warmup
from transformers.utils import logging

from retromae import RetroMAECollator, RetroMAEConfig, RetroMAEForMaskedLM, RetroMAEForPreTraining
from retromae.data import Article, demo_articles
from retromae.evaluate import METRICS, RetrievalTask, evaluate
from retromae.pretrain import demo_model_path, hardware
from retromae.sentence_transformer import to_sentence_transformer


VARIANTS = {
    "mlm-0.15": dict(objective="mlm", encoder_mask_ratio=0.15),
    "mlm-0.30": dict(objective="mlm", encoder_mask_ratio=0.30),
    "retromae": dict(objective="retromae"),
    "retromae-no-enhanced-decoding": dict(objective="retromae", enhanced_decoding=False),
    "retromae-decoder-0.15": dict(objective="retromae", decoder_mask_ratio=0.15),
    "retromae-decoder-0.70": dict(objective="retromae", decoder_mask_ratio=0.70),
}
INITIAL = "initial weights"
SMALL_BERT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
MIN_QUERY_WORDS = 5


def split_articles(articles: list[Article], evaluation_share: float, seed: int) -> tuple[list[Article], list[Article]]:
    """(pre-training articles, evaluation articles): whole articles, so no evaluation text is seen in training."""
    shuffled = random.Random(seed).sample(articles, len(articles))
    held_apart = max(1, round(len(articles) * evaluation_share))
    return shuffled[held_apart:], shuffled[:held_apart]


def inverse_cloze_task(articles: list[Article], max_queries: int, seed: int) -> RetrievalTask:
    """Queries: one sentence from a paragraph of 3+ sentences; its document: the paragraph without it."""
    generator = random.Random(seed)
    corpus, queries, relevant = {}, {}, {}
    for article_index, article in enumerate(articles):
        for paragraph_index, paragraph in enumerate(article.paragraphs):
            document = f"{article_index}-{paragraph_index}"
            sentences = SENTENCE_END.split(paragraph)
            candidates = [i for i, sentence in enumerate(sentences) if len(sentence.split()) >= MIN_QUERY_WORDS]
            if len(sentences) >= 3 and candidates:
                chosen = generator.choice(candidates)
                queries[f"q{document}"] = sentences[chosen]
                relevant[f"q{document}"] = {document}
                paragraph = " ".join(sentences[:chosen] + sentences[chosen + 1 :])
            corpus[document] = paragraph
    kept = sorted(generator.sample(sorted(queries), min(max_queries, len(queries))))
    return RetrievalTask(corpus=corpus, queries={q: queries[q] for q in kept}, relevant={q: relevant[q] for q in kept})


def initial_state(args, tokenizer) -> tuple[RetroMAEConfig, dict]:
    """The config and encoder + MLM-head weights every variant starts from (fresh, seeded, or --init)."""
    if args.init:
        bert = BertForMaskedLM.from_pretrained(args.init)
        fields = RetroMAEConfig().to_dict()
        config = RetroMAEConfig(**{k: v for k, v in bert.config.to_dict().items() if k in fields and k != "auto_map"})
        return config, bert.state_dict()
    torch.manual_seed(args.seed)
    config = RetroMAEConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, args.max_length), **SMALL_BERT)
    return config, RetroMAEForMaskedLM(config).state_dict()


def build_model(objective: str, config: RetroMAEConfig, weights: dict, seed: int) -> torch.nn.Module:
    """The model a variant trains: BertForMaskedLM, or RetroMAE with a decoder seeded alike across variants."""
    torch.manual_seed(seed)
    if objective == "mlm":
        model = BertForMaskedLM(config.to_bert_config())
        model.load_state_dict(weights)
        return model
    model = RetroMAEForPreTraining(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not key.startswith("decoder.") for key in missing):
        raise RuntimeError(f"Initial weights do not fit the encoder: missing {missing}, unexpected {unexpected}.")
    return model


def step_losses(model: torch.nn.Module, objective: str, batch: dict) -> tuple[torch.Tensor, float, float | None]:
    """(loss to minimise, encoder loss, decoder loss or None) for one batch."""
    if objective == "mlm":
        output = model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"], labels=batch["encoder_labels"])
        return output.loss, output.loss.item(), None
    output = model(**batch)
    return output.loss, output.encoder_loss.item(), output.decoder_loss.item()


def pretrain(name: str, settings: dict, config: RetroMAEConfig, weights: dict, passages: list[str], tokenizer, args, seed: int):
    """Train one variant; return (encoder + MLM head weights, loss curves, seconds)."""
    settings = dict(settings)
    objective = settings.pop("objective")
    variant_config = RetroMAEConfig(**(config.to_dict() | settings))
    model = build_model(objective, variant_config, weights, seed).train()
    collator = RetroMAECollator(
        tokenizer,
        variant_config.encoder_mask_ratio,
        variant_config.decoder_mask_ratio,
        max_length=args.max_length,
        seed=seed,
        enhanced_decoding=variant_config.enhanced_decoding,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * args.steps), args.steps)
    batches = batch_order(passages, args.batch_size, args.steps, seed)
    curves = {"encoder_loss": [], "decoder_loss": []}
    start = time.perf_counter()
    for epoch, texts in tqdm(batches, desc=f"{name} (seed {seed})", file=sys.stdout, mininterval=10):
        collator.set_epoch(epoch)
        loss, encoder_loss, decoder_loss = step_losses(model, objective, collator(texts))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        curves["encoder_loss"].append(encoder_loss)
        curves["decoder_loss"].append(decoder_loss)
    seconds = time.perf_counter() - start
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    return encoder, curves, seconds


def batch_order(passages: list[str], batch_size: int, steps: int, seed: int) -> list[tuple[int, list[str]]]:
    """(epoch, passages) for every step: a fresh seeded shuffle per pass, identical for every variant."""
    batches, epoch = [], 0
    while len(batches) < steps:
        order = random.Random(f"{seed}:{epoch}").sample(passages, len(passages))
        batches += [(epoch, order[i : i + batch_size]) for i in range(0, len(order) - batch_size + 1, batch_size)]
        epoch += 1
    return batches[:steps]


def retrieval_scores(config: RetroMAEConfig, weights: dict, tokenizer, task: RetrievalTask, args) -> dict[str, float]:
    """The task's figures for the [CLS] embedding of an encoder, loaded the way users load it."""
    with tempfile.TemporaryDirectory() as folder:
        encoder = RetroMAEForMaskedLM(config)
        encoder.load_state_dict(weights)
        encoder.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = to_sentence_transformer(folder, max_seq_length=args.max_length)
        return evaluate(model, task, batch_size=64)


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (with 2+ seeds) standard deviation of each figure over seeds."""
    summary = {}
    for metric in METRICS:
        values = [scores[metric] for scores in per_seed.values()]
        summary[metric] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def plot(report: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["retrieval"])
    figure, axis = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(METRICS)
    for offset, metric in enumerate(METRICS):
        means = [report["retrieval"][name]["summary"][metric]["mean"] for name in names]
        spreads = [report["retrieval"][name]["summary"][metric]["std"] for name in names]
        positions = [i + (offset - (len(METRICS) - 1) / 2) * width for i in range(len(names))]
        bars = axis.bar(positions, means, width, yerr=spreads, label=metric)
        axis.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    axis.set_xticks(range(len(names)), [name.replace("retromae-", "retromae-\n") for name in names], fontsize=8)
    axis.set_ylabel("score ([CLS] embedding, no fine-tuning)")
    axis.set_title(f"Inverse-cloze retrieval on held-apart Wikipedia articles ({report['task']['queries']} queries, {report['task']['documents']} documents)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "replicate_retrieval.png", dpi=120)

    figure, (encoder_axis, decoder_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, per_seed in report["loss_curves"].items():
        curves = next(iter(per_seed.values()))
        encoder_axis.plot(smooth(curves["encoder_loss"]), label=name)
        if curves["decoder_loss"][0] is not None:
            decoder_axis.plot(smooth(curves["decoder_loss"]), label=name)
    for axis, title in ((encoder_axis, "encoder (MLM) loss"), (decoder_axis, "decoder loss")):
        axis.set_title(f"{title}, first seed, 10-step mean")
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "replicate_losses.png", dpi=120)


def smooth(values: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Optimiser steps per variant, the same for all. Default: 200.")
    parser.add_argument("--batch-size", type=int, default=32, help="Passages per step. Default: 32.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per passage in training and evaluation. Default: 128.")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="Peak AdamW learning rate (10%% warm-up, linear decay). Default: 5e-4.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (weights, data order, masks); figures are averaged. Default: 0.")
    parser.add_argument(
        "--init",
        help="Start every variant from this BERT / BertForMaskedLM checkpoint instead of a fresh 4 x 256 BERT "
        "with the bert-base-uncased vocabulary.",
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="Variants to run. Default: all.")
    parser.add_argument("--evaluation-share", type=float, default=0.25, help="Share of the articles held apart for evaluation. Default: 0.25.")
    parser.add_argument("--max-queries", type=int, default=1000, help="Queries of the retrieval task at most. Default: 1000.")
    parser.add_argument("--output-dir", default="benchmarks/results", help="Where the JSON and figures go. Default: benchmarks/results.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 3 steps of each variant, 3 evaluation articles (checks the pipeline, not the outcome).")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.max_queries, args.max_length, args.evaluation_share = 3, 4, 40, 64, 0.03
    return args


def main() -> None:
    args = parse_arguments()
    logging.set_verbosity_error()  # the heads that sentence-transformers leaves unused are expected
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.init or demo_model_path())
    training_articles, evaluation_articles = split_articles(demo_articles(), args.evaluation_share, seed=0)
    passages = [paragraph for article in training_articles for paragraph in article.paragraphs]
    task = inverse_cloze_task(evaluation_articles, args.max_queries, seed=0)
    print(f"{len(passages)} pre-training passages; task: {len(task.queries)} queries over {len(task.corpus)} held-apart paragraphs")

    retrieval = {INITIAL: {"per_seed": {}}} | {name: {"per_seed": {}, "train_seconds": {}} for name in args.variants}
    loss_curves = {name: {} for name in args.variants}
    for seed in args.seeds:
        args.seed = seed
        config, weights = initial_state(args, tokenizer)
        retrieval[INITIAL]["per_seed"][seed] = retrieval_scores(config, weights, tokenizer, task, args)
        for name in args.variants:
            encoder, curves, seconds = pretrain(name, VARIANTS[name], config, weights, passages, tokenizer, args, seed)
            retrieval[name]["per_seed"][seed] = retrieval_scores(config, encoder, tokenizer, task, args)
            retrieval[name]["train_seconds"][seed] = seconds
            loss_curves[name][seed] = curves
            print(f"{name} (seed {seed}): " + ", ".join(f"{m} {retrieval[name]['per_seed'][seed][m]:.4f}" for m in METRICS))
    for scores in retrieval.values():
        scores["summary"] = summarise(scores["per_seed"])

    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{hardware(torch.device('cpu'))}, torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("seed", "output_dir")},
        "model": "fresh 4 x 256 BERT" if not args.init else args.init,
        "corpus": {"pretraining_passages": len(passages), "pretraining_articles": len(training_articles), "evaluation_articles": len(evaluation_articles)},
        "task": {"queries": len(task.queries), "documents": len(task.corpus)},
        "variants": {name: VARIANTS[name] for name in args.variants},
        "retrieval": retrieval,
        "loss_curves": loss_curves,
        "wall_seconds": time.perf_counter() - started,
    }
    with open(output_dir / "replicate.json", "w") as file:
        json.dump(report, file, indent=1)
    plot(report, output_dir)
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, {report['settings']['steps']} steps x {report['settings']['batch_size']} passages, seeds {report['settings']['seeds']}")
    print(f"{'variant':<31} " + " ".join(f"{metric:>10}" for metric in METRICS))
    for name, scores in report["retrieval"].items():
        print(f"{name:<31} " + " ".join(f"{scores['summary'][m]['mean']:>10.4f}" for m in METRICS))
    print(f"wall time {report['wall_seconds'] / 60:.1f} min; {report['machine']}")


if __name__ == "__main__":
    main()
