"""Time a RetroMAE training step against its baselines, all in one process on one machine.

Variants, with the same weights and the same batch:
  ours       RetroMAEForPreTraining: SDPA, MLM logits only at labelled positions, vectorised masks
  reference  the spec in its most direct form: eager attention, vocabulary logits at every position
  mlm        BertForMaskedLM on the same encoder with encoder masking only (RetroMAE's floor)
  gemm       square matrix multiplies of the same FLOPs as `ours` (the machine's ceiling)
plus collator throughput (ours vs a per-row Python reference, as in the authors' code) and
embedding throughput (RetroMAEModel vs BertModel). Before anything is timed, the losses of
`ours` and `reference` must agree to 1e-4.

    python benchmarks/benchmark_step.py                 # small config, a few minutes on 2 cores
    python benchmarks/benchmark_step.py --size base     # BERT-base (12 x 768)
    python benchmarks/benchmark_step.py --smoke         # tiny config, a few steps (CI)
"""

import argparse
import copy
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from retromae import RetroMAECollator, RetroMAEConfig, RetroMAEForPreTraining, RetroMAEModel
from retromae.pretrain import demo_model_path


SIZES = {
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def synthetic_batch_ids(tokenizer, batch_size: int, seq_length: int, seed: int) -> list[list[int]]:
    """Random word pieces (## continuations included) filling every sequence to `seq_length`."""
    generator = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special and not tokenizer.convert_ids_to_tokens(i).startswith("[")]
    return [[generator.choice(vocabulary) for _ in range(seq_length - 2)] for _ in range(batch_size)]


def reference_loss(model: RetroMAEForPreTraining, batch: dict) -> torch.Tensor:
    """The RetroMAE loss with vocabulary logits at every position (model in eager attention)."""
    vocab = model.config.vocab_size

    def dense_mlm_loss(hidden, labels):
        return F.cross_entropy(model.cls(hidden).view(-1, vocab), labels.view(-1), ignore_index=-100)

    encoder = model.bert(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"])
    h_x = encoder.sentence_embedding
    query = model.query_stream(h_x, batch["decoder_input_ids"].shape[1])
    content = model.content_stream(h_x, batch["decoder_input_ids"])
    decoded = model.decoder(query, content, model.attention_bias(batch["decoder_attention_mask"]))
    return dense_mlm_loss(encoder.last_hidden_state, batch["encoder_labels"]) + dense_mlm_loss(decoded, batch["decoder_labels"])


def reference_decoder_mask(collator: RetroMAECollator, ids: list[int], generator: random.Random) -> torch.Tensor:
    """The enhanced-decoding mask of one example built row by row in Python, as the authors' code does."""
    tokens = collator.tokenizer.convert_ids_to_tokens(ids)
    words = []
    for position, token in enumerate(tokens):
        if position in (0, len(tokens) - 1):
            continue
        if token.startswith("##") and words:
            words[-1].append(position)
        else:
            words.append([position])
    budget = max(1, round((len(tokens) - 2) * collator.decoder_mask_ratio))

    def pattern():
        hidden = [0] * len(tokens)
        chosen = 0
        for word in generator.sample(words, len(words)):
            if chosen + len(word) > budget:
                continue
            for position in word:
                hidden[position] = 1
            chosen += len(word)
        return hidden

    patterns = [pattern() for _ in range(min(len(tokens), 256))]
    rows = []
    for row in range(len(tokens)):
        hidden = copy.deepcopy(patterns[generator.randrange(len(patterns))])
        hidden[row] = 1
        rows.append(hidden)
    return 1 - torch.tensor(rows)


def median_seconds(step, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def interleaved_medians(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of each step, timed round-robin so that drift on a shared machine hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    timings = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def training_step(model, optimizer, compute_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        compute_loss().backward()
        optimizer.step()

    return step


def count_flops(compute_loss) -> int:
    with FlopCounterMode(display=False) as counter:
        compute_loss().backward()
    return counter.get_total_flops()


def gemm_seconds(flops: int, repeats: int) -> tuple[float, float]:
    """Seconds for `flops` of square float32 matrix multiplies, and the FLOP/s achieved."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    per_matmul = 2 * n**3
    count = max(1, round(flops / per_matmul))
    seconds = median_seconds(lambda: [a @ b for _ in range(count)], repeats, warmup=1)
    return seconds, count * per_matmul / seconds


def benchmark_length(args, tokenizer, seq_length: int) -> dict:
    torch.manual_seed(0)
    config = RetroMAEConfig(vocab_size=len(tokenizer), max_position_embeddings=max(512, seq_length), **SIZES[args.size])
    # `_from_config` sets the attention implementation on the config it is given: one copy each.
    ours = RetroMAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    reference = RetroMAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="eager")
    reference.load_state_dict(ours.state_dict())
    mlm = BertForMaskedLM(BertConfig(**{k: v for k, v in config.to_dict().items() if k in BertConfig().to_dict()}))
    mlm.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")})

    collator = RetroMAECollator(tokenizer, max_length=seq_length, seed=0)
    ids = synthetic_batch_ids(tokenizer, args.batch_size, seq_length, seed=0)
    batch = collator(ids)

    with torch.no_grad():
        ours.eval(), reference.eval()
        ours_loss, reference_value = ours(**batch).loss.item(), reference_loss(reference, batch).item()
    if abs(ours_loss - reference_value) > 1e-4:
        raise AssertionError(f"L={seq_length}: ours {ours_loss:.6f} != reference {reference_value:.6f}")
    ours.train(), reference.train(), mlm.train()

    def mlm_loss():
        return mlm(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"], labels=batch["encoder_labels"]).loss

    variants = {
        "ours": (ours, lambda: ours(**batch).loss),
        "reference": (reference, lambda: reference_loss(reference, batch)),
        "mlm": (mlm, mlm_loss),
    }
    steps = {
        name: training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), loss)
        for name, (model, loss) in variants.items()
    }
    seconds = interleaved_medians(steps, args.repeats, args.warmup)
    flops = count_flops(variants["ours"][1])
    gemm_time, gemm_flops_per_second = gemm_seconds(flops, args.repeats)

    reference_random = random.Random(0)
    collator_seconds = median_seconds(lambda: collator(ids), args.repeats, 1)
    reference_collator_seconds = median_seconds(
        lambda: [reference_decoder_mask(collator, [tokenizer.cls_token_id, *row, tokenizer.sep_token_id], reference_random) for row in ids],
        max(1, args.repeats // 2),
        0,
    )

    encoder = RetroMAEModel(copy.deepcopy(config)).eval()
    encoder.load_state_dict(ours.bert.state_dict())
    bert = BertModel(BertConfig(**{k: v for k, v in config.to_dict().items() if k in BertConfig().to_dict()}), add_pooling_layer=False).eval()
    bert.load_state_dict(ours.bert.state_dict())
    inputs = dict(input_ids=batch["decoder_input_ids"], attention_mask=batch["encoder_attention_mask"])
    with torch.no_grad():
        embed_seconds = interleaved_medians(
            {"retromae": lambda: encoder(**inputs), "bert": lambda: bert(**inputs)}, args.repeats, args.warmup
        )

    return {
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "loss_ours": ours_loss,
        "loss_reference": reference_value,
        "step_seconds": seconds,
        "ours_over_reference": seconds["ours"] / seconds["reference"],
        "ours_over_mlm": seconds["ours"] / seconds["mlm"],
        "step_flops": flops,
        "achieved_over_gemm_flops": (flops / seconds["ours"]) / gemm_flops_per_second,
        "gemm_seconds_same_flops": gemm_time,
        "collator_examples_per_second": args.batch_size / collator_seconds,
        "reference_collator_examples_per_second": args.batch_size / reference_collator_seconds,
        "collator_speedup": reference_collator_seconds / collator_seconds,
        "embedding_sentences_per_second": {name: args.batch_size / s for name, s in embed_seconds.items()},
        "retromae_over_bert_embedding_throughput": embed_seconds["bert"] / embed_seconds["retromae"],
        "peak_memory": "not measured on CPU",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "base"], default="small", help="Model size. Default: small (4 x 256).")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[128, 512], help="Sequence lengths. Default: 128 512.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per step. Default: 8.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per variant (the median is reported). Default: 5.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first. Default: 2.")
    parser.add_argument("--smoke", action="store_true", help="Tiny config, short sequences, one timed step: checks the pipeline (CI).")
    parser.add_argument("--output", default="benchmark_step.json", help="Where the JSON goes. Default: benchmark_step.json.")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.seq_lengths, args.batch_size, args.repeats, args.warmup = "smoke", [32], 2, 1, 0

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    results = [benchmark_length(args, tokenizer, length) for length in args.seq_lengths]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    with open(args.output, "w") as file:
        json.dump({"size": args.size, "machine": machine, "results": results}, file, indent=2)

    print(f"size {args.size}, batch {args.batch_size}, {machine}")
    print("L     ours s  ref s   mlm s   ours/ref ours/mlm FLOP/GEMM collator x  embed ratio")
    for r in results:
        s = r["step_seconds"]
        print(
            f"{r['seq_length']:<5} {s['ours']:<7.3f} {s['reference']:<7.3f} {s['mlm']:<7.3f} {r['ours_over_reference']:<8.2f} "
            f"{r['ours_over_mlm']:<8.2f} {r['achieved_over_gemm_flops']:<9.2f} {r['collator_speedup']:<11.1f} "
            f"{r['retromae_over_bert_embedding_throughput']:.3f}"
        )
    print(f"losses agree (ours vs reference, 1e-4); figures in {args.output}")


if __name__ == "__main__":
    main()
