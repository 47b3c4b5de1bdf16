"""Time a RetroMAE training step against its baselines, all in one process on one machine.

Variants, with the same weights and the same batch, for an encoder of one family (--family):
  ours       RetroMAEForPreTraining: SDPA, MLM logits only at labelled positions, vectorised masks
  reference  the spec in its most direct form: eager attention, vocabulary logits at every position
  mlm        the family's own ...ForMaskedLM (BertForMaskedLM, XLMRobertaForMaskedLM, ModernBertForMaskedLM)
             on the same encoder with encoder masking only (RetroMAE's floor)
  gemm       square matrix multiplies of the same FLOPs as `ours` (the machine's ceiling)
  compiled   `ours` under torch.compile (with --compile)
With --objective dupmae, instead: DupMAE (RetroMAE v2) against RetroMAE on the same weights and batch, timed
round-robin: FLOPs of both, the step-time ratio against the FLOP ratio, the bytes kept for backward and the peak
memory of a step. DupMAE's bag-of-words loss is first checked against its dense form (full logits) to 1e-4.
Otherwise: plus collator throughput on one core (ours vs a per-row Python reference, as in the authors' code) and
embedding throughput (the RetroMAE encoder class vs the family's base model). Before anything is timed, the losses of
`ours` and `reference` must agree to 1e-4 (in float32, whatever --dtype times).

Memory: the bytes each step keeps for its backward pass (activations), and the peak of memory
held by tensors during one step (the allocator's peak on a GPU, the profiler's memory timeline on CPU).

    python benchmarks/benchmark_step.py                 # small config, a few minutes on 2 cores
    python benchmarks/benchmark_step.py --size base     # BERT-base (12 x 768)
    python benchmarks/benchmark_step.py --size base --device cuda --dtype bfloat16 --compile
    python benchmarks/benchmark_step.py --family modernbert  # or xlm-roberta
    python benchmarks/benchmark_step.py --smoke         # tiny config, a few steps (CI)
    python benchmarks/benchmark_step.py --size smoke --batch-size 2 --repeats 2 --warmup 1 \
        --lengths 512 1024 2048 4096 8192 --output long.json   # memory and time against L, and long.png
    python benchmarks/benchmark_step.py --objective dupmae --size base --seq-lengths 128 512   # DupMAE / RetroMAE
    python benchmarks/benchmark_step.py --objective dupmae --family xlm-roberta --vocab-size 250002 \
        --seq-lengths 8192 --batch-size 2   # XLM-R's vocabulary at long L
"""

import argparse
import copy
import dataclasses
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from retromae import EnhancedDecodingMask, RetroMAECollator, RetroMAEConfig, RetroMAEForPreTraining
from retromae.modeling_retromae import bag_of_words_target, encoder_family, max_tokens
from retromae.plan import parameter_counts, step_memory
from retromae.settings import demo_model_path
from retromae.run_record import hardware


FAMILIES = ("bert", "xlm-roberta", "modernbert")


SIZES = {
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
# Dense bf16 peak TFLOP/s by device name (vendor datasheets, without sparsity); the first name the device's contains wins.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def synthetic_batch_ids(tokenizer, batch_size: int, seq_length: int, seed: int) -> list[list[int]]:
    """Random word pieces (## continuations included) filling every sequence to `seq_length`."""
    generator = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = [i for i in range(len(tokenizer)) if i not in special and not tokenizer.convert_ids_to_tokens(i).startswith("[")]
    return [[generator.choice(vocabulary) for _ in range(seq_length - 2)] for _ in range(batch_size)]


def reference_loss(model: RetroMAEForPreTraining, batch: dict) -> torch.Tensor:
    """The RetroMAE loss with vocabulary logits at every position (model in eager attention)."""
    vocab = model.config.encoder.vocab_size

    def dense_mlm_loss(hidden, labels):
        return F.cross_entropy(model.mlm_head(hidden).view(-1, vocab), labels.view(-1), ignore_index=-100)

    encoder_states = model.encoder.base_model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
    h_x = encoder_states[:, 0]
    query = model.query_stream(h_x, batch["decoder_input_ids"].shape[1])
    content = model.content_stream(h_x, batch["decoder_input_ids"])
    decoded = model.decoder(query, content, EnhancedDecodingMask.from_batch(batch))
    return dense_mlm_loss(encoder_states, batch["encoder_labels"]) + dense_mlm_loss(decoded, batch["decoder_labels"])


def encoder_config(family: str, size: str, tokenizer, seq_length: int, attention_dropout: float | None = None, vocab_size: int | None = None):
    """
    A random encoder of `family` at `size`, reading the tokenizer's special ids, with positions for
    `seq_length` tokens; its attention dropout the family's default unless given; its vocabulary the
    tokenizer's, or `vocab_size` entries (e.g. XLM-R's 250,002) of which the batches use the tokenizer's.
    """
    first, separator = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": first, "bos_token_id": first, "sep_token_id": separator, "eos_token_id": separator}
    config_fields = {field.name for field in dataclasses.fields(CONFIG_MAPPING[family])}
    config = AutoConfig.for_model(
        family, vocab_size=vocab_size or len(tokenizer), **SIZES[size], **{name: value for name, value in ids.items() if name in config_fields}
    )
    config.max_position_embeddings = max(512, seq_length)
    config.max_position_embeddings += max(512, seq_length) - max_tokens(config)  # room for the family's position offset
    if attention_dropout is not None:
        setattr(config, encoder_family(family).config_names.get("attention_probs_dropout_prob", "attention_probs_dropout_prob"), attention_dropout)
    return config


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


def median_seconds(step, repeats: int, warmup: int, synchronize=lambda: None) -> float:
    for _ in range(warmup):
        step()
    synchronize()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def interleaved_medians(steps: dict, repeats: int, warmup: int, synchronize=lambda: None) -> dict[str, float]:
    """Median seconds of each step, timed round-robin so that drift on a shared machine hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize()
    timings = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def training_step(model, optimizer, compute_loss):
    def step():
        optimizer.zero_grad(set_to_none=True)
        compute_loss().backward()
        optimizer.step()

    return step


def flops_by_part(model, compute_loss) -> dict[str, int]:
    """
    FLOPs of one forward and backward pass: in all, and in each part of the model (the base
    encoder, the MLM head, the decoder; the parts of a family's model held as RetroMAE's encoder).
    """
    with FlopCounterMode(display=False) as counter:
        compute_loss().backward()
    parts = []
    for name, child in model.named_children():
        nested = isinstance(child, PreTrainedModel) and child is not model.base_model
        parts += [f"{name}.{part}" for part, _ in child.named_children()] if nested else [name]
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    return {"total": counter.get_total_flops(), **{part: sum(counts.get(prefix + part, {}).values()) for part in parts}}


def saved_for_backward_mib(compute_loss, model: torch.nn.Module | None = None) -> float:
    """MiB of tensors the forward pass keeps for backward (each storage counted once; `model`'s parameters, which exist anyway, left out)."""
    storages = {}
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()} if model is not None else set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss()
    del loss
    return sum(storages.values()) / 2**20


def peak_step_mib(step, device: torch.device) -> float:
    """
    MiB held by tensors at the peak of one training step: on a GPU the allocator's peak
    (`torch.cuda.max_memory_allocated`, every resident tensor counted); on CPU, which keeps no such
    count, the PyTorch profiler's memory timeline of the step: the tensors the step touches that
    existed before it (weights, gradients, optimiser state) plus what it allocates, as allocations
    and frees come. Either is the memory `retromae plan` models; the CPU process's resident set
    adds the allocator's retained pages and the libraries' scratch buffers, which no tensor holds.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler._memory_profiler import Action  # the timeline's public exporter is deprecated; its source is not

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as profiler:
        step()
    live = peak = 0
    for _, action, _, size in profiler._memory_profile().timeline:
        live += size if action in (Action.PREEXISTING, Action.CREATE) else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak / 2**20


def gemm_seconds(flops: int, repeats: int, device: torch.device, dtype: torch.dtype, synchronize) -> tuple[float, float]:
    """Seconds for `flops` of square matrix multiplies in `dtype`, and the FLOP/s achieved."""
    n = 1024 if device.type == "cpu" else 4096
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    per_matmul = 2 * n**3
    count = max(1, round(flops / per_matmul))
    seconds = median_seconds(lambda: [a @ b for _ in range(count)], repeats, 1, synchronize)
    return seconds, count * per_matmul / seconds


def collator_seconds_on_one_core(collator: RetroMAECollator, ids: list[list[int]], repeats: int) -> tuple[float, float]:
    """
    Seconds per batch of our collator and of the per-row Python reference, both on one thread (a data loader worker).

    Ours includes making the whole enhanced-decoding mask from the batch's description (which
    training does on the model's device, a block of rows at a time), as the reference makes it.
    """
    tokenizer, reference_random, threads = collator.tokenizer, random.Random(0), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = median_seconds(lambda: EnhancedDecodingMask.from_batch(collator(ids)).dense(), repeats, 1)
        reference = median_seconds(
            lambda: [reference_decoder_mask(collator, [tokenizer.cls_token_id, *row, tokenizer.sep_token_id], reference_random) for row in ids],
            max(1, repeats // 2),
            0,
        )
    finally:
        torch.set_num_threads(threads)
    return ours, reference


def benchmark_length(args, tokenizer, seq_length: int) -> dict:
    device, autocast_dtype = torch.device(args.device), getattr(torch, args.dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)

    torch.manual_seed(0)
    config = RetroMAEConfig(encoder=encoder_config(args.family, args.size, tokenizer, seq_length))
    # `_from_config` sets the attention implementation on the config it is given: one copy each.
    ours = RetroMAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(device)
    reference = RetroMAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="eager").to(device)
    reference.load_state_dict(ours.state_dict())
    mlm = copy.deepcopy(ours.encoder)  # the family's own ...ForMaskedLM, same weights

    collator = RetroMAECollator(tokenizer, max_length=seq_length, seed=0)
    ids = synthetic_batch_ids(tokenizer, args.batch_size, seq_length, seed=0)
    batch = {name: tensor.to(device) for name, tensor in collator(ids).items()}

    with torch.no_grad():
        ours.eval(), reference.eval()
        ours_loss, reference_value = ours(**batch).loss.item(), reference_loss(reference, batch).item()
    if abs(ours_loss - reference_value) > 1e-4:
        raise AssertionError(f"L={seq_length}: ours {ours_loss:.6f} != reference {reference_value:.6f}")
    ours.train(), reference.train(), mlm.train()

    def timed(forward):
        def compute_loss():
            with autocast():
                return forward()

        return compute_loss

    def mlm_forward():
        return mlm(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"], labels=batch["encoder_labels"]).loss

    variants = {
        "ours": (ours, timed(lambda: ours(**batch).loss)),
        "reference": (reference, timed(lambda: reference_loss(reference, batch))),
        "mlm": (mlm, timed(mlm_forward)),
    }
    if args.compile:
        compiled = copy.deepcopy(ours)
        compiled_forward = torch.compile(compiled)
        variants["compiled"] = (compiled, timed(lambda: compiled_forward(**batch).loss))
    steps = {
        name: training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), loss)
        for name, (model, loss) in variants.items()
    }
    seconds = interleaved_medians(steps, args.repeats, args.warmup, synchronize)
    saved_mib = {name: saved_for_backward_mib(loss) for name, (_, loss) in variants.items()}
    peak_mib = {name: peak_step_mib(step, device) for name, step in steps.items()}
    flops = {name: flops_by_part(variants[name][0], variants[name][1]) for name in ("ours", "mlm")}
    gemm_time, gemm_flops_per_second = gemm_seconds(flops["ours"]["total"], args.repeats, device, autocast_dtype, synchronize)

    collator_seconds, reference_collator_seconds = collator_seconds_on_one_core(collator, ids, args.repeats)

    encoder = ours.released_encoder(with_mlm_head=False).to(device)
    family_model = copy.deepcopy(ours.encoder.base_model).eval()
    inputs = dict(input_ids=batch["decoder_input_ids"], attention_mask=batch["encoder_attention_mask"])
    with torch.no_grad(), autocast():
        embed_seconds = interleaved_medians(
            {"retromae": lambda: encoder(**inputs), "family": lambda: family_model(**inputs)}, args.repeats, args.warmup, synchronize
        )

    return {
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "loss_ours": ours_loss,
        "loss_reference": reference_value,
        "step_seconds": seconds,
        "ours_over_reference": seconds["ours"] / seconds["reference"],
        "ours_over_mlm": seconds["ours"] / seconds["mlm"],
        "compiled_over_mlm": seconds["compiled"] / seconds["mlm"] if args.compile else None,
        "step_flops": flops,
        "ours_over_mlm_flops": flops["ours"]["total"] / flops["mlm"]["total"],
        "achieved_over_gemm_flops": (flops["ours"]["total"] / seconds["ours"]) / gemm_flops_per_second,
        "mlm_achieved_over_gemm_flops": (flops["mlm"]["total"] / seconds["mlm"]) / gemm_flops_per_second,
        "gemm_seconds_same_flops": gemm_time,
        "gemm_flops_per_second": gemm_flops_per_second,
        "collator_examples_per_second": args.batch_size / collator_seconds,
        "reference_collator_examples_per_second": args.batch_size / reference_collator_seconds,
        "collator_speedup": reference_collator_seconds / collator_seconds,
        "embedding_sentences_per_second": {name: args.batch_size / s for name, s in embed_seconds.items()},
        "retromae_over_family_embedding_throughput": embed_seconds["family"] / embed_seconds["retromae"],
        "saved_for_backward_mib": saved_mib,
        "peak_step_mib": peak_mib,
    }


def reference_bow_loss(model: RetroMAEForPreTraining, batch: dict) -> torch.Tensor:
    """DupMAE's bag-of-words loss in its dense form: MLM scores at every position, -1000 at padding, max, log-softmax."""
    states = model.encoder.base_model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"]).last_hidden_state
    padding = (1 - batch["encoder_attention_mask"][:, 1:, None].float()) * -1000
    scores = (model.mlm_head(states)[:, 1:].float() + padding).max(dim=1).values  # (batch, vocab)
    target = bag_of_words_target(batch["decoder_labels"], scores.shape[-1])
    return -(target * scores.log_softmax(-1)).sum(-1).mean()


def dupmae_against_retromae(args, tokenizer, seq_length: int) -> dict:
    """DupMAE and RetroMAE steps on the same weights and batch: seconds, FLOPs, memory kept for backward, GPU peak."""
    device, autocast_dtype = torch.device(args.device), getattr(torch, args.dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    config = RetroMAEConfig(encoder=encoder_config(args.family, args.size, tokenizer, seq_length, vocab_size=args.vocab_size))
    retromae = RetroMAEForPreTraining._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(device)
    dupmae = RetroMAEForPreTraining._from_config(RetroMAEConfig(**(config.to_dict() | {"objective": "dupmae"})), attn_implementation="sdpa").to(device)
    dupmae.load_state_dict(retromae.state_dict())
    collator = RetroMAECollator(tokenizer, max_length=seq_length, seed=0)
    ids = synthetic_batch_ids(tokenizer, args.batch_size, seq_length, seed=0)
    ids[-1] = ids[-1][: max(1, seq_length // 2)]  # one passage half as long: the maximum must leave out padding
    batch = {name: tensor.to(device) for name, tensor in collator(ids).items()}

    if not args.skip_check:
        with torch.no_grad():
            bow_loss, reference = dupmae.eval()(**batch).bow_loss.item(), reference_bow_loss(dupmae, batch).item()
        if abs(bow_loss - reference) > 1e-4:
            raise AssertionError(f"L={seq_length}: DupMAE's bag-of-words loss {bow_loss:.6f} != its dense form {reference:.6f}")
    retromae.train(), dupmae.train()

    def compute_loss(model):
        def forward():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                return model(**batch).loss

        return forward

    variants = {"retromae": retromae, "dupmae": dupmae}
    steps = {name: training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), compute_loss(model)) for name, model in variants.items()}
    seconds = interleaved_medians(steps, args.repeats, args.warmup, synchronize)
    flops = {name: flops_by_part(model, compute_loss(model)) for name, model in variants.items()}
    saved_mib = {name: saved_for_backward_mib(compute_loss(model), model) for name, model in variants.items()}
    peak_mib = {name: peak_step_mib(step, device) for name, step in steps.items()}
    time_ratio, flop_ratio = seconds["dupmae"] / seconds["retromae"], flops["dupmae"]["total"] / flops["retromae"]["total"]
    return {
        "seq_length": seq_length,
        "batch_size": args.batch_size,
        "vocab_size": config.encoder.vocab_size,
        "bow_loss_checked_against_dense": not args.skip_check,
        "step_seconds": seconds,
        "step_flops": flops,
        "dupmae_over_retromae_seconds": time_ratio,
        "dupmae_over_retromae_flops": flop_ratio,
        "time_ratio_over_flop_ratio": time_ratio / flop_ratio,
        "saved_for_backward_mib": saved_mib,
        "dupmae_over_retromae_saved_for_backward": saved_mib["dupmae"] / saved_mib["retromae"],
        "peak_step_mib": peak_mib,
        "dupmae_over_retromae_peak": peak_mib["dupmae"] / peak_mib["retromae"],
    }


def print_dupmae_table(report: dict) -> None:
    print(f"{report['family']} {report['size']}, batch {report['batch_size']}, {report['dtype']}, {report['machine']}")
    print("L      vocab    RetroMAE s  DupMAE s  time x  FLOP x  time/FLOP  saved MiB (R/D)  peak MiB (R/D)")
    for r in report["results"]:
        s, saved, peak = r["step_seconds"], r["saved_for_backward_mib"], r["peak_step_mib"]
        print(
            f"{r['seq_length']:<6} {r['vocab_size']:<8} {s['retromae']:<11.3f} {s['dupmae']:<9.3f} {r['dupmae_over_retromae_seconds']:<7.3f} "
            f"{r['dupmae_over_retromae_flops']:<7.3f} {r['time_ratio_over_flop_ratio']:<10.3f} "
            f"{saved['retromae']:.0f}/{saved['dupmae']:.0f}{'':<8} {peak['retromae']:.0f}/{peak['dupmae']:.0f}"
        )


def one_process_step(args, tokenizer) -> dict:
    """
    One variant at one length in this process: median step seconds (collation included), tokens/s,
    the peak memory of the process (resident set on CPU, allocated on a GPU) with its memory before
    the model was built (the baseline: the libraries and the tokenizer), and the peak held by tensors
    in one step (`peak_step_mib`). For `ours`, `retromae plan`'s figure for the step (one process, no engine)
    comes with them, in the step's precision. With a peak FLOP/s (`--peak-tflops`), the step's
    FLOPs and its model FLOPs utilisation as well: FLOPs counted on one example with gradient
    checkpointing off (its recomputation is not model work), times the batch.
    """
    variant, seq_length = args.one_process[0], int(args.one_process[1])
    device, autocast_dtype = torch.device(args.device), getattr(torch, args.dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    config = encoder_config(args.family, args.size, tokenizer, seq_length, args.attention_dropout)
    config.vocab_size = args.vocab_size or config.vocab_size
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    planned = None
    if variant == "ours":
        precision = "fp32" if args.dtype == "float32" else "bf16"
        memory = step_memory(config, parameter_counts(config), args.batch_size, seq_length, "DDP", 1, precision, args.gradient_checkpointing)
        planned = memory.peak / 2**30
    if variant == "ours":
        model = RetroMAEForPreTraining(RetroMAEConfig(encoder=config, attn_implementation="sdpa")).to(device)
        collator = RetroMAECollator(tokenizer, max_length=seq_length, seed=0)
    else:
        model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa").to(device)
        collator = RetroMAECollator(tokenizer, max_length=seq_length, seed=0, enhanced_decoding=False)
    ids = synthetic_batch_ids(tokenizer, args.batch_size, seq_length, seed=0)

    def loss_of(examples):
        batch = {name: tensor.to(device) for name, tensor in collator(examples).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            if variant == "ours":
                return model(**batch).loss
            return model(batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"], labels=batch["encoder_labels"]).loss

    model.train()
    flops = None
    if args.peak_tflops:
        with FlopCounterMode(display=False) as counter:
            loss_of(ids[:1]).backward()
        flops = counter.get_total_flops() * args.batch_size
        model.zero_grad(set_to_none=True)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    step = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), lambda: loss_of(ids))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, args.repeats, args.warmup, synchronize)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
    tensor_peak_gib = peak_step_mib(step, device) / 2**10
    return {
        "variant": variant,
        "seq_length": seq_length,
        "step_seconds": seconds,
        "tokens_per_second": args.batch_size * seq_length / seconds,
        "step_flops": flops,
        "mfu": flops / seconds / (args.peak_tflops * 1e12) if flops else None,
        "peak_gib": peak / 2**30,
        "baseline_gib": baseline / 2**30,
        "tensor_peak_gib": tensor_peak_gib,
        "reserved_gib": reserved / 2**30 if reserved is not None else None,
        "planned_gib": planned,
    }


def memory_against_length(args) -> dict:
    """Ours and the family's MLM at every length, each in a process of its own (its peak memory is its own)."""
    results = []
    for seq_length in args.lengths:
        for variant in ("ours", "mlm"):
            command = [sys.executable, __file__, "--one-process", variant, str(seq_length), "--family", args.family, "--size", args.size]
            command += ["--dtype", args.dtype] + (["--attention-dropout", str(args.attention_dropout)] if args.attention_dropout is not None else [])
            command += (["--gradient-checkpointing"] if args.gradient_checkpointing else []) + (["--vocab-size", str(args.vocab_size)] if args.vocab_size else [])
            command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
            command += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device]
            command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            finished = subprocess.run(command, check=True, capture_output=True, text=True)
            results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
            print(f"L={seq_length} {variant}: {results[-1]['step_seconds']:.2f} s/step, peak {results[-1]['peak_gib']:.2f} GiB", flush=True)
    by_length = {}
    for result in results:
        by_length.setdefault(result["seq_length"], {})[result["variant"]] = result
    return {
        "family": args.family,
        "size": args.size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_tflops": args.peak_tflops,
        "memory": "peak allocated (GPU)" if args.device.startswith("cuda") else "peak resident set size of the process (CPU)",
        "machine": f"{hardware(torch.device(args.device))}, torch {torch.__version__}",
        "results": [
            {
                "seq_length": seq_length,
                "ours": pair["ours"],
                "mlm": pair["mlm"],
                "memory_ours_over_mlm": pair["ours"]["peak_gib"] / pair["mlm"]["peak_gib"],
                "time_ours_over_mlm": pair["ours"]["step_seconds"] / pair["mlm"]["step_seconds"],
            }
            for seq_length, pair in sorted(by_length.items())
        ],
    }


def device_peak_tflops(name: str) -> float:
    """The dense bf16 peak of a CUDA device by its name; a device not in `PEAK_BF16_TFLOPS` needs --peak-tflops."""
    for known, tflops in PEAK_BF16_TFLOPS.items():
        if known in name:
            return tflops
    raise SystemExit(f"No bf16 peak known for {name!r} (known: {', '.join(PEAK_BF16_TFLOPS)}); pass --peak-tflops.")


def write_markdown_table(paths: list[str], output: str) -> None:
    """
    One row per report and variant: step time, tokens/s, MFU, the peak held by tensors, the CUDA
    allocator's peak reserve (what the process takes from the GPU), and the plan's figure for ours.
    """
    lines = [
        "| model | L | batch | checkpointing | step | s/step | tokens/s | MFU | tensors GiB | reserved GiB | planned GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    machines = []
    for path in paths:
        with open(path) as file:
            report = json.load(file)
        machines.append(report["machine"])
        for result in report["results"]:
            for variant, name in (("ours", "RetroMAE"), ("mlm", "family MLM")):
                row = result[variant]
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
                planned, reserved = (f"{row[key]:.2f}" if row[key] is not None else "-" for key in ("planned_gib", "reserved_gib"))
                lines.append(
                    f"| {report['family']} {report['size']} | {result['seq_length']} | {report['batch_size']} | "
                    f"{'on' if report['gradient_checkpointing'] else 'off'} | {name} | {row['step_seconds']:.3f} | "
                    f"{row['tokens_per_second']:,.0f} | {mfu} | {row['tensor_peak_gib']:.2f} | {reserved} | {planned} |"
                )
    lines.append(f"\n{'; '.join(sorted(set(machines)))}; {report['dtype']} autocast, MFU against {report['peak_tflops']} TFLOP/s.")
    with open(output, "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_against_length(report: dict, path: str) -> None:
    """Peak memory and step time against L, ours and MLM (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lengths = [r["seq_length"] for r in report["results"]]
    figure, axes = pyplot.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((axes[0], "peak_gib", "peak memory (GiB)"), (axes[1], "step_seconds", "seconds per step")):
        for variant, name in (("ours", "RetroMAE (ours)"), ("mlm", "masked LM")):
            axis.plot(lengths, [r[variant][key] for r in report["results"]], marker="o", label=name)
        axis.set_xscale("log", base=2), axis.set_yscale("log")
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.set_xlabel("tokens per sequence (L)"), axis.set_ylabel(label), axis.legend(), axis.grid(alpha=0.3)
    figure.suptitle(f"{report['family']} {report['size']}, batch {report['batch_size']}: {report['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_length_table(report: dict) -> None:
    print(f"{report['family']} {report['size']}, batch {report['batch_size']}, {report['memory']}, {report['machine']}")
    print("L      ours GiB  mlm GiB  ours/mlm  ours s   mlm s    ours/mlm")
    for r in report["results"]:
        print(
            f"{r['seq_length']:<6} {r['ours']['peak_gib']:<9.2f} {r['mlm']['peak_gib']:<8.2f} {r['memory_ours_over_mlm']:<9.2f} "
            f"{r['ours']['step_seconds']:<8.2f} {r['mlm']['step_seconds']:<8.2f} {r['time_ours_over_mlm']:.2f}"
        )
    print("\nretromae plan against the measured step (ours): the peak held by tensors, and the process's peak minus its memory before the model was built:")
    print("| L | tensors MiB | process MiB | planned MiB | error (tensors) | error (process) |")
    print("|---|---|---|---|---|---|")
    for r in report["results"]:
        ours = r["ours"]
        tensors, process, planned = (2**10 * gib for gib in (ours["tensor_peak_gib"], ours["peak_gib"] - ours["baseline_gib"], ours["planned_gib"]))
        print(f"| {r['seq_length']} | {tensors:,.0f} | {process:,.0f} | {planned:,.0f} | {100 * (planned / tensors - 1):+.0f}% | {100 * (planned / process - 1):+.0f}% |")


def print_table(report: dict) -> None:
    print(f"{report['family']} {report['size']}, batch {report['batch_size']}, {report['dtype']}, {report['machine']}")
    print("L     ours s  ref s   mlm s   ours/ref ours/mlm comp/mlm FLOP/GEMM collator x  embed  saved MiB ours/mlm")
    for r in report["results"]:
        s, saved = r["step_seconds"], r["saved_for_backward_mib"]
        compiled = f"{r['compiled_over_mlm']:.2f}" if r["compiled_over_mlm"] is not None else "-"
        print(
            f"{r['seq_length']:<5} {s['ours']:<7.3f} {s['reference']:<7.3f} {s['mlm']:<7.3f} {r['ours_over_reference']:<8.2f} "
            f"{r['ours_over_mlm']:<8.2f} {compiled:<8} {r['achieved_over_gemm_flops']:<9.2f} {r['collator_speedup']:<11.1f} "
            f"{r['retromae_over_family_embedding_throughput']:<6.3f} {saved['ours']:.0f}/{saved['mlm']:.0f}"
        )
        for name, parts in r["step_flops"].items():
            print(f"      {name} GFLOP " + ", ".join(f"{part} {flops / 1e9:.1f}" for part, flops in parts.items()))
        print(f"      FLOPs ours/mlm {r['ours_over_mlm_flops']:.2f}; mlm FLOP/GEMM {r['mlm_achieved_over_gemm_flops']:.2f}")
        print("      peak MiB " + ", ".join(f"{name} {mib:.0f}" for name, mib in r["peak_step_mib"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="bert", help="Encoder family (a random encoder of it). Default: bert.")
    parser.add_argument("--size", choices=list(SIZES), default="small", help="Model size. Default: small (4 x 256); smoke is 2 x 64.")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[128, 512], help="Sequence lengths. Default: 128 512.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per step. Default: 8.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per variant (the median is reported). Default: 5.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first. Default: 2.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where to run. Default: cuda when there is one, else cpu.")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="Autocast dtype of the timed steps (weights stay float32). Default: float32."
    )
    parser.add_argument("--compile", action="store_true", help="Also time `ours` under torch.compile (compilation happens in the warm-up).")
    parser.add_argument("--tokenizer", help="Tokenizer folder (bert-base-uncased vocabulary). Default: the demo model's, from retromae[demo].")
    parser.add_argument(
        "--objective",
        choices=["retromae", "dupmae"],
        default="retromae",
        help="dupmae: time DupMAE against RetroMAE (FLOPs, time, memory) instead of RetroMAE against its baselines. Default: retromae.",
    )
    parser.add_argument("--skip-check", action="store_true", help="With --objective dupmae: skip the dense check (its full logits are large at long L).")
    parser.add_argument("--smoke", action="store_true", help="Tiny config, short sequences, one timed step: checks the pipeline (CI).")
    parser.add_argument("--output", default="benchmark_step.json", help="Where the JSON goes. Default: benchmark_step.json.")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="Instead of the comparison above: peak memory and step time of ours and of the family's MLM against L, "
        "each in a process of its own, with a plot next to --output (e.g. --size smoke --batch-size 2 --lengths 512 1024 2048 4096 8192).",
    )
    parser.add_argument(
        "--attention-dropout",
        type=float,
        help="The encoder's attention dropout. Default: the family's. 0 lets SDPA on CPU take its fused kernel, as a GPU's "
        "kernels do with dropout; with dropout CPU SDPA falls back to the math kernel, which keeps (seq, seq) scores.",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="With --lengths: recompute activations in backward (both variants).")
    parser.add_argument("--vocab-size", type=int, help="With --lengths or --objective dupmae: the model's vocabulary (e.g. 250002 for XLM-R; ids come from --tokenizer). Default: the tokenizer's.")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="With --lengths: the device's peak bf16 TFLOP/s, for MFU. Default on CUDA: from the device's name (PEAK_BF16_TFLOPS).",
    )
    parser.add_argument("--markdown-table", nargs="+", metavar="JSON", help="Instead: the table of gpu.sh from --lengths reports, written to --output.")
    parser.add_argument("--one-process", nargs=2, metavar=("VARIANT", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown_table:
        write_markdown_table(args.markdown_table, args.output)
        return
    if args.one_process or args.lengths:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or demo_model_path())
        if args.one_process:
            print(json.dumps(one_process_step(args, tokenizer)))
            return
        if args.peak_tflops is None and args.device.startswith("cuda"):
            args.peak_tflops = device_peak_tflops(torch.cuda.get_device_name(args.device))
        report = memory_against_length(args)
        with open(args.output, "w") as file:
            json.dump(report, file, indent=2)
        plot_against_length(report, args.output.removesuffix(".json") + ".png")
        print_length_table(report)
        return
    if args.smoke:
        args.size, args.seq_lengths, args.batch_size, args.repeats, args.warmup = "smoke", [32], 2, 1, 0
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or demo_model_path())
    compare = dupmae_against_retromae if args.objective == "dupmae" else benchmark_length
    results = [compare(args, tokenizer, length) for length in args.seq_lengths]
    report = {
        "family": args.family,
        "size": args.size,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "machine": f"{hardware(torch.device(args.device))}, torch {torch.__version__}",
        "objective": args.objective,
        "command": " ".join(sys.argv),
        "results": results,
    }
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    if args.objective == "dupmae":
        print_dupmae_table(report)
        print(f"figures in {args.output}")
        return
    print_table(report)
    print(f"losses agree (ours vs reference, 1e-4); figures in {args.output}")


if __name__ == "__main__":
    main()
