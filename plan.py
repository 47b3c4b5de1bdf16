"""`retromae plan`: the peak memory per GPU of RetroMAE pre-training, on paper, before a job is queued.

The peak is counted by formula, part by part, for one training step of `RetroMAEForPreTraining`
as this package runs it:

- parameters: the encoder (embeddings, layers), its MLM head (the vocabulary projection tied to
  the word embeddings where the family ties it) and the decoder, counted exactly from the
  model built on the meta device (no memory, no download);
- optimiser state and gradients, as each engine keeps them (`ENGINES`). Under bf16 mixed
  precision AdamW keeps a float32 master copy of the weights and two float32 moments (12 bytes
  a parameter); DDP's autocast keeps float32 weights (they are the master) and bf16 copies of them
  for the step. Under float32 (the CPU check) there is no master copy;
- activations (`activation_bytes`): what the forward pass keeps for backward, from the encoder's
  layers (all of them, or their inputs and one layer's recompute with gradient checkpointing),
  the decoder's streams, keys and values and its blocks of query rows (recomputed in backward
  when the rows come in several blocks, as the model does), and the chunked MLM head
  (`LinearCrossEntropy` keeps the gradients of its states, weight and bias from forward), plus
  the largest short-lived buffer (one chunk of logits).

The step's peak is the static memory (weights, optimiser state, engine buffers) plus the larger
of the end of forward (activations and the head's chunk) and the end of backward (gradients and
one recomputed block). SDPA-style attention is assumed (flash or memory-efficient kernels: no
(seq, seq) scores kept); communication buckets of DeepSpeed and the CUDA allocator's slack are
left out. See docs/scaling.md for how far this is from measured peaks.
"""

import argparse
import math
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_retromae import RetroMAEConfig
from .modeling_retromae import DECODER_BLOCK_SCORES, LOGITS_CHUNK, RetroMAEForPreTraining, decoder_config, encoder_family, max_tokens
from .errors import UsageError, at_least, positive
from .settings import SIZES


GIB = 2**30
# Configurations of well-known checkpoints, built offline from transformers' config classes.
KNOWN_MODELS = {
    "bert-base-uncased": ("bert", dict(vocab_size=30522, **SIZES["base"])),
    "bert-large-uncased": ("bert", dict(vocab_size=30522, **SIZES["large"])),
    "xlm-roberta-base": ("xlm-roberta", dict(vocab_size=250002, max_position_embeddings=514, pad_token_id=1, **SIZES["base"])),
    "xlm-roberta-large": ("xlm-roberta", dict(vocab_size=250002, max_position_embeddings=514, pad_token_id=1, **SIZES["large"])),
    "BAAI/bge-m3": ("xlm-roberta", dict(vocab_size=250002, max_position_embeddings=8194, pad_token_id=1, **SIZES["large"])),
}
BERT_VOCABULARY = 30522  # the vocabulary of a size name (pretrain --config), bert-base-uncased's
PRECISIONS = ("bf16", "fp32")
ENGINE_NAMES = ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP")
MAX_BATCH = 2**40  # where the search for the largest batch stops: more passages than any GPU holds


class PlanError(UsageError):
    """A bad input to `retromae plan`; the message names the flag and what is allowed."""


@dataclass(frozen=True)
class Parameters:
    """Parameters of the pre-training model by part; each tensor counted once (tied ones in the embeddings)."""

    embeddings: int
    encoder_layers: int
    head: int
    decoder: int
    largest_layer: int

    @property
    def total(self) -> int:
        return self.embeddings + self.encoder_layers + self.head + self.decoder


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one engine's peak, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    recompute: int

    @property
    def peak(self) -> int:
        return self.weights + self.optimizer + max(self.activations + self.transient, self.gradients + self.recompute)


def encoder_config(model: str, max_length: int) -> PreTrainedConfig:
    """
    The encoder configuration `--model` names: a size name of `retromae pretrain --config` (a BERT
    with bert-base-uncased's vocabulary), a known checkpoint (`KNOWN_MODELS`), or a folder or Hub id
    whose config.json is at hand (no download). A `max_length` beyond the model's positions is
    refused, as `retromae pretrain` refuses it: the plan is of a job pretrain would run, and
    pretrain does not extend a position table.
    """
    if model in SIZES:
        config = CONFIG_MAPPING["bert"](vocab_size=BERT_VOCABULARY, **SIZES[model])
    elif model in KNOWN_MODELS:
        model_type, fields = KNOWN_MODELS[model]
        config = CONFIG_MAPPING[model_type](**fields)
    else:
        try:
            config = AutoConfig.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as error:
            known = ", ".join([*SIZES, *KNOWN_MODELS])
            raise PlanError(f"--model {model}: neither a size name or known model ({known}) nor a config at hand ({error}).") from None
        if config.model_type == "retromae":
            config = config.encoder
    try:
        encoder_family(config.model_type)
    except ValueError as error:
        raise PlanError(f"--model {model}: {error}") from None
    if max_length > max_tokens(config):
        raise PlanError(
            f"--max-length {max_length} exceeds the {max_tokens(config)} tokens the model's positions allow "
            "(`retromae pretrain` refuses it too): plan a model whose config has a longer position table."
        )
    return config


def parameter_counts(encoder: PreTrainedConfig, num_decoder_layers: int = 1) -> Parameters:
    """The parameters of `RetroMAEForPreTraining` on `encoder`, by part, from the model built on the meta device."""
    with torch.device("meta"):
        model = RetroMAEForPreTraining(RetroMAEConfig(encoder=encoder, num_decoder_layers=num_decoder_layers))
    base = model.encoder.base_model
    embeddings = {id(p) for p in base.embeddings.parameters()} | {id(p) for p in model.get_input_embeddings().parameters()}
    layers = [module for module in base.modules() if isinstance(module, torch.nn.ModuleList)][0]
    layer_ids = {id(p) for p in layers.parameters()}
    decoder_ids = {id(p) for p in model.decoder.parameters()}
    counts = {"embeddings": 0, "encoder_layers": 0, "head": 0, "decoder": 0}
    for name, parameter in model.named_parameters():  # each shared tensor once
        key = id(parameter)
        part = "decoder" if key in decoder_ids else "encoder_layers" if key in layer_ids else "embeddings" if key in embeddings or name.startswith(f"encoder.{model.encoder.base_model_prefix}.") else "head"
        counts[part] += parameter.numel()
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return Parameters(**counts, largest_layer=largest)


def activation_bytes(encoder: PreTrainedConfig, batch_size: int, seq_length: int, bytes_per_value: int, checkpointing: bool, encoder_mask_ratio: float = 0.30) -> dict[str, int]:
    """
    Bytes one step keeps for backward, by part, and the short-lived peaks: `transient` at the end
    of forward, `recompute` what lives beside the gradients in backward.

    Per token of a transformer layer (BERT's layout, which the decoder layer also has) backward
    needs 9 hidden-wide values (the layer's input, query, key, value, attention output and its
    contiguous copy, two LayerNorm inputs, one LayerNorm output) and 2 intermediate-wide ones
    (the activation's input and output), plus two one-byte dropout masks. The decoder's query
    rows reuse the content stream's keys and values (kept in float32 under autocast, 4 bytes).
    """
    layer = decoder_config(RetroMAEConfig(encoder=encoder))
    h, inner, heads, vocab = layer.hidden_size, layer.intermediate_size, layer.num_attention_heads, encoder.vocab_size
    tokens, w = batch_size * seq_length, bytes_per_value
    per_layer_token = (9 * h + 2 * inner) * w + 2 * h
    embeddings = tokens * (h * w + h + 3 * 8)  # LayerNorm input, dropout mask, three index tensors
    if checkpointing:
        encoder_layers = encoder.num_hidden_layers * tokens * h * w
        encoder_recompute = tokens * per_layer_token
    else:
        encoder_layers = encoder.num_hidden_layers * tokens * per_layer_token
        encoder_recompute = 0

    encoder_rows = round(encoder_mask_ratio * (seq_length - 2)) * batch_size
    decoder_rows = (seq_length - 2) * batch_size
    head_weight_gradients = vocab * h * 4 + vocab * 4  # float32 gradient sums of the tied weight and the bias, per loss

    def head(rows: int) -> int:  # labelled states gathered, the head transform's two inner values, the states' gradient
        return rows * h * (3 * w + w) + head_weight_gradients

    key_value_bytes = 4 if w < 4 else w
    streams = embeddings + tokens * h * w * 2 + 2 * tokens * h * key_value_bytes  # decoder embeddings, content and query streams, keys, values
    block = max(1, DECODER_BLOCK_SCORES // (batch_size * heads * seq_length))
    recomputes = checkpointing or block < seq_length
    block_rows = min(block, seq_length)
    # A block's layer values, and its mask as drawn (three one-byte tensors) and as the attention kernel takes it (one value each).
    block_bytes = batch_size * block_rows * ((6 * h + 2 * inner) * w + 2 * h + (3 + w) * seq_length)
    pattern_bytes = batch_size * min(seq_length, 256) * seq_length
    decoder_blocks = tokens * h * w if recomputes else block_bytes * math.ceil(seq_length / block_rows)
    chunk_rows = min(decoder_rows, max(1, LOGITS_CHUNK // vocab))
    return {
        "encoder": embeddings + encoder_layers,
        "decoder": streams + pattern_bytes + decoder_blocks,
        "head": head(encoder_rows) + head(decoder_rows),
        # A chunk's float32 logits and log-probabilities, or its gradient and the weight's gradient term.
        "transient": max(8 * chunk_rows * vocab, 4 * chunk_rows * vocab + 4 * vocab * h),
        # In backward, what lives beside the gradients: the encoder layers' activations, as each layer (recomputed or kept)
        # runs its backward, or the decoder's recomputed block.
        "recompute": max(encoder_layers + encoder_recompute, block_bytes if recomputes else 0),
    }


def engine_memory(
    engine: str, parameters: Parameters, activations: dict[str, int], gpus: int, precision: str, encoder_layer: int
) -> Memory:
    """
    One engine's bytes per GPU. Under bf16 mixed precision (`precision="bf16"`):

    | engine | weights | gradients | optimiser |
    |---|---|---|---|
    | DDP (torch autocast) | 4 (float32, the master) + 2 (bf16 copies) | 4 + 4 (DDP's buckets, with more than one GPU) | 8 |
    | ZeRO-1 (DeepSpeed bf16) | 2 | 2 | 12 / N |
    | ZeRO-2 | 2 | 2 / N | 12 / N |
    | ZeRO-3 | 2 / N + gathered | 2 / N | 12 / N |
    | FSDP2 (bf16 compute, float32 shards) | 4 / N + gathered | 4 / N | 8 / N |

    bytes per parameter; "gathered" is the unsharded bf16 (float32 under `fp32`) copy of what runs:
    two encoder layers (the running one and the prefetched one) and, for FSDP2, the root unit
    (embeddings, head and decoder) that stays unsharded through the step. Under float32 there is no
    bf16 copy and no separate master: weights 4, gradients 4, optimiser 8.
    """
    psi, n, full = parameters.total, gpus, precision == "fp32"
    buckets = 4 * psi if n > 1 else 0
    root = parameters.total - parameters.encoder_layers
    compute = 4 if full else 2
    master = 0 if full else 4
    if engine == "DDP":
        weights, gradients, optimizer = (4 if full else 6) * psi, 4 * psi + buckets, 8 * psi
    elif engine in ("ZeRO-1", "ZeRO-2"):
        weights = compute * psi
        gradients = compute * psi // (n if engine == "ZeRO-2" else 1)
        optimizer = (master + 8) * psi // n
    elif engine == "ZeRO-3":
        gathered = 0 if full and n == 1 else compute * max(2 * encoder_layer, root)
        weights, gradients, optimizer = compute * psi // n + gathered, compute * psi // n, (master + 8) * psi // n
    else:  # FSDP2
        gathered = 0 if full and n == 1 else compute * (root + 2 * encoder_layer)
        weights, gradients, optimizer = 4 * psi // n + gathered, 4 * psi // n, 8 * psi // n
    stored = activations["encoder"] + activations["decoder"] + activations["head"]
    return Memory(weights, gradients, optimizer, stored, activations["transient"], activations["recompute"])


@dataclass(frozen=True)
class Plan:
    """The plan's inputs and, per engine and gradient checkpointing off/on, the memory and the largest batch that fits."""

    model: str
    max_length: int
    batch_size: int
    gpus: int
    gpu_memory_gib: float
    precision: str
    parameters: Parameters
    rows: list[tuple[str, bool, Memory, int]]


def make_plan(model: str, max_length: int, batch_size: int, gpus: int, gpu_memory_gib: float, precision: str = "bf16") -> Plan:
    """Every engine's peak per GPU at `batch_size`, with and without gradient checkpointing, and the largest batch under the memory."""
    config = encoder_config(model, max_length)
    parameters = parameter_counts(config)
    rows = []
    for checkpointing in (False, True):
        for engine in ENGINE_NAMES:
            def memory(batch: int) -> Memory:
                return step_memory(config, parameters, batch, max_length, engine, gpus, precision, checkpointing)

            rows.append((engine, checkpointing, memory(batch_size), largest_batch(memory, gpu_memory_gib * GIB)))
    return Plan(model, max_length, batch_size, gpus, gpu_memory_gib, precision, parameters, rows)


def step_memory(
    config: PreTrainedConfig, parameters: Parameters, batch_size: int, seq_length: int, engine: str, gpus: int, precision: str, checkpointing: bool
) -> Memory:
    """The memory per GPU of one step of `engine` on `gpus` GPUs (`parameters` from `parameter_counts(config)`)."""
    activations = activation_bytes(config, batch_size, seq_length, 4 if precision == "fp32" else 2, checkpointing)
    return engine_memory(engine, parameters, activations, gpus, precision, parameters.largest_layer)


def largest_batch(memory, capacity: float) -> int:
    """
    The largest batch whose peak fits in `capacity` bytes (0 when not even one passage does), at most
    `MAX_BATCH` (a capacity too large for a float, such as 1e308 GiB, is infinite); the peak grows with the batch.
    """
    if memory(1).peak > capacity:
        return 0
    low, high = 1, 2
    while memory(high).peak <= capacity:
        if high >= MAX_BATCH:
            return MAX_BATCH
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if memory(middle).peak <= capacity else (low, middle)
    return low


def format_plan(plan: Plan) -> str:
    """The plan as a table: GiB per GPU by part, the peak, and the largest batch that fits."""
    p = plan.parameters
    lines = [
        f"{plan.model}: {p.total / 1e6:,.1f}M parameters (embeddings {p.embeddings / 1e6:,.1f}M, encoder layers "
        f"{p.encoder_layers / 1e6:,.1f}M, MLM head {p.head / 1e6:,.1f}M, decoder {p.decoder / 1e6:,.1f}M)",
        f"{plan.max_length} tokens x {plan.batch_size} passages per GPU, {plan.gpus} GPU(s) of {plan.gpu_memory_gib:g} GiB, "
        + ("bf16 mixed precision (AdamW: float32 master weights and two float32 moments)" if plan.precision == "bf16" else "float32"),
        "",
        "| engine | checkpointing | weights | gradients | optimiser | activations | peak GiB | fits | largest batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, checkpointing, memory, batch in plan.rows:
        fits = "yes" if memory.peak <= plan.gpu_memory_gib * GIB else "no"
        lines.append(
            f"| {engine} | {'on' if checkpointing else 'off'} | {memory.weights / GIB:.2f} | {memory.gradients / GIB:.2f} | "
            f"{memory.optimizer / GIB:.2f} | {(memory.activations + memory.transient) / GIB:.2f} | {memory.peak / GIB:.2f} | {fits} | {batch} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `retromae plan`."""
    parser.add_argument(
        "--model",
        required=True,
        help=f"A size name ({', '.join(SIZES)}: BERT, as pretrain --config), a known model ({', '.join(KNOWN_MODELS)}), "
        "or a folder or Hub id whose config.json is at hand.",
    )
    parser.add_argument(
        "--max-length",
        type=at_least(3),
        required=True,
        help="Tokens per passage, the special tokens included; up to what the model's positions allow (512 for a size name), "
        "as for pretrain: a longer one is refused, not planned on an extended position table.",
    )
    parser.add_argument("--batch-size", type=at_least(1), required=True, help="Passages per GPU and step.")
    parser.add_argument("--gpus", type=at_least(1), default=1, help="GPUs in the job (data-parallel processes). Default: 1.")
    parser.add_argument("--gpu-memory", type=positive, required=True, help="GiB of memory per GPU (e.g. 40 for an A100-40G).")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16 mixed precision, or float32 (as on CPU). Default: bf16.")


def run(args: argparse.Namespace) -> str:
    """Make the plan (the numbers were checked as the command was read) and return its table."""
    return format_plan(make_plan(args.model, args.max_length, args.batch_size, args.gpus, args.gpu_memory, args.precision))
