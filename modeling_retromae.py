"""RetroMAE: retrieval-oriented pre-training of a masked-LM encoder by a masked auto-encoder.

Xiao, Liu, Shao, Cao, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked
Auto-Encoder", EMNLP 2022 (arXiv 2205.12035).

One pre-training step, in the order of the paper:

1. The encoder, the family's own masked-LM model (BERT in the paper), reads the input masked at
   a moderate ratio and is trained by masked language modelling (`encoder_loss`).
2. Its final state at the first token ([CLS] or <s>) is the sentence embedding `h_X`.
3. The decoder builds two streams from the original, unmasked tokens: the content stream
   `H2` (the encoder's embeddings of the tokens, position 0 replaced by `h_X`) and the query
   stream `H1` (`h_X + p_i` at every position i, with the family's own position numbering).
4. Enhanced decoding: one transformer layer in which the query stream attends to the content
   stream under a position-specific mask; row i sees position 0 and a random, aggressive
   subset of the other tokens, never token i itself.
5. The family's MLM head, shared with the encoder, rebuilds every original token from the
   decoder's output (`decoder_loss`). The loss is `encoder_loss + decoder_loss`.

RetroMAE v2, DupMAE (Xiao, Liu, Shao, Cao, ACL 2023; the authors' `modeling_duplex.py`), is the
option `objective="dupmae"`: the query stream is `h_X` sent through the encoder's embeddings
module, and a third loss (`bow_loss`) trains the maximum over positions of the encoder's MLM
scores to predict the passage's bag of words. The loss is
`encoder_loss + decoder_loss + bow_loss_weight * bow_loss`. The maximum is taken a chunk of
positions at a time (`LinearMaxOverPositions`), so no (batch, seq, vocabulary) scores exist.

Long inputs (up to 8,192 tokens) cost no (batch, seq, seq) tensor: the collator describes the
enhanced-decoding mask in a few (batch, seq) tensors, `EnhancedDecodingMask` draws it on the
model's device a block of query rows at a time, the decoder runs block by block, and the MLM
head's vocabulary projection is fused with the cross entropy over chunks of rows
(`LinearCrossEntropy`). None of this changes the loss.

The file, top to bottom:

- The family table, `ENCODER_FAMILIES`: what differs between encoder families (where the MLM
  head is, how positions are numbered), read by the generic code below, which has no branch per
  family; `register_family` adds a row at run time. Families without an absolute position table
  (ModernBERT: rotary; DeBERTa-v3: relative) have no `p_i` to add; for them the decoder rotates
  its queries (`h_X` at every position, rotated by i) and keys (rotated by j) with rotary
  position embeddings: this package's extension of the paper.
- The typed outputs (`RetroMAEModelOutput`, `RetroMAEForPreTrainingOutput`, `RetroMAELosses`).
- The masks: whole-word patterns drawn from per-example seeds (`WholeWordDraw`) and the
  enhanced-decoding mask made from them (`EnhancedDecodingMask`), step 4.
- The decoder (`RetroMAEDecoder`): BERT's cross-attention layer, the query stream attending to
  the content stream, step 4.
- The pre-training model (`RetroMAEForPreTraining`): steps 1 to 5, each a method named after
  the paper's step (`query_stream`, `content_stream`, `decode`, `masked_lm_loss`).
- Its kernels: the MLM head's vocabulary projection fused with the cross entropy
  (`LinearCrossEntropy`) and with DupMAE's maximum over positions (`LinearMaxOverPositions`).
- The released classes and what writes a release. After pre-training the decoder is discarded:
  the encoder is a plain checkpoint of its family whose first-token state is used for retrieval.
  Each family's two classes are declared here (`RetroMAEModel` and `RetroMAEForMaskedLM` for the
  paper's BERT, `RetroMAEXLMRobertaModel`, ... for the others), and their `save_pretrained`
  writes a release: the family's config.json, whose `auto_map` names them, and
  sentence-transformers files for first-token pooling, with this code as an opt-in.

This file is Hub remote code: it imports only torch, transformers and the configuration next to it.
"""

import contextlib
import copy
import importlib.metadata
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from safetensors.torch import load_file, save_file
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DebertaV2ForMaskedLM,
    DebertaV2Model,
    DistilBertForMaskedLM,
    DistilBertModel,
    ElectraForMaskedLM,
    ElectraModel,
    ModernBertForMaskedLM,
    ModernBertModel,
    PreTrainedConfig,
    PreTrainedModel,
    RobertaForMaskedLM,
    RobertaModel,
    XLMRobertaForMaskedLM,
    XLMRobertaModel,
)
from transformers import initialization as init
from transformers.activations import gelu
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertIntermediate,
    BertOutput,
    eager_attention_forward,
)
from transformers.utils import TransformersKwargs, cached_file
from transformers.utils import logging as transformers_logging

from .configuration_retromae import RETROMAE_FIELDS, RetroMAEConfig, release_config_dict


logger = transformers_logging.get_logger(__name__)

IGNORE_INDEX = -100
# Beside a release's encoder: what pre-training trains with it (the MLM head, the decoder), as `RetroMAEForPreTraining` names them.
RELEASE_PARTS_FILE = "retromae_parts.safetensors"
# The keyword arguments of `from_pretrained` that say where a checkpoint's config.json is found.
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# The decoder layer is BERT's, as wide as the encoder: these BertConfig fields are read from the encoder's config.
DECODER_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
)


@dataclass(frozen=True)
class EncoderFamily:
    """
    Where a masked-LM family keeps what RetroMAE reads; one row of `ENCODER_FAMILIES`.

    Args:
        head_transform: the family's MLM head up to its vocabulary projection, `(masked_lm_model, states) -> states`.
        head_output: the weight and bias of that projection (the word embeddings where the family ties them).
        position_offset: the row of the position table that holds position 0, from the config
            (RoBERTa numbers positions from `padding_idx + 1`); `None` where the family has no
            absolute position table, and the decoder uses rotary positions instead.
        rotary_base: the rotary base for those families (the backbone's own where it has one).
        config_names: the family's names for `DECODER_FIELDS` that it spells differently.
        embeddings_projection: the base model's layer that maps factorised embeddings to the
            hidden width (ELECTRA), applied to both decoder streams' embeddings where present.
    """

    head_transform: Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]
    head_output: Callable[[PreTrainedModel], tuple[torch.Tensor, torch.Tensor | None]]
    position_offset: Callable[[PreTrainedConfig], int] | None
    rotary_base: Callable[[PreTrainedConfig], float] = lambda config: 10_000.0
    config_names: dict[str, str] = field(default_factory=dict)
    embeddings_projection: str | None = None

    @property
    def rotary(self) -> bool:
        return self.position_offset is None


def roberta_positions(config: PreTrainedConfig) -> int:
    return config.pad_token_id + 1


def linear_weights(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return layer.weight, layer.bias


def deberta_transform(mlm: PreTrainedModel, states: torch.Tensor) -> torch.Tensor:
    if mlm.legacy:
        return mlm.cls.predictions.transform(states)
    head = mlm.lm_predictions.lm_head
    return head.LayerNorm(head.transform_act_fn(head.dense(states)))


def deberta_output(mlm: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    if mlm.legacy:
        return linear_weights(mlm.cls.predictions.decoder)
    return mlm.deberta.embeddings.word_embeddings.weight, mlm.lm_predictions.lm_head.bias


ENCODER_FAMILIES = {
    "bert": EncoderFamily(
        head_transform=lambda mlm, states: mlm.cls.predictions.transform(states),
        head_output=lambda mlm: linear_weights(mlm.cls.predictions.decoder),
        position_offset=lambda config: 0,
    ),
    "roberta": EncoderFamily(
        head_transform=lambda mlm, states: mlm.lm_head.layer_norm(gelu(mlm.lm_head.dense(states))),
        head_output=lambda mlm: linear_weights(mlm.lm_head.decoder),
        position_offset=roberta_positions,
    ),
    "xlm-roberta": EncoderFamily(
        head_transform=lambda mlm, states: mlm.lm_head.layer_norm(gelu(mlm.lm_head.dense(states))),
        head_output=lambda mlm: linear_weights(mlm.lm_head.decoder),
        position_offset=roberta_positions,
    ),
    "modernbert": EncoderFamily(
        head_transform=lambda mlm, states: mlm.head(states),
        head_output=lambda mlm: linear_weights(mlm.decoder),
        position_offset=None,
        rotary_base=lambda config: config.rope_parameters["full_attention"]["rope_theta"],
        config_names={
            "hidden_act": "hidden_activation",
            "layer_norm_eps": "norm_eps",
            "hidden_dropout_prob": "mlp_dropout",
            "attention_probs_dropout_prob": "attention_dropout",
        },
    ),
    "deberta-v2": EncoderFamily(head_transform=deberta_transform, head_output=deberta_output, position_offset=None),
    "distilbert": EncoderFamily(
        head_transform=lambda mlm, states: mlm.vocab_layer_norm(mlm.activation(mlm.vocab_transform(states))),
        head_output=lambda mlm: linear_weights(mlm.vocab_projector),
        position_offset=lambda config: 0,
        config_names={
            "intermediate_size": "hidden_dim",
            "hidden_act": "activation",
            "hidden_dropout_prob": "dropout",
            "attention_probs_dropout_prob": "attention_dropout",
        },
    ),
    "electra": EncoderFamily(
        head_transform=lambda mlm, states: mlm.generator_predictions(states),
        head_output=lambda mlm: linear_weights(mlm.generator_lm_head),
        position_offset=lambda config: 0,
        embeddings_projection="embeddings_project",
    ),
}


def encoder_family(model_type: str) -> EncoderFamily:
    """The row of `ENCODER_FAMILIES` for `model_type`; `ValueError` naming the supported families otherwise."""
    if model_type not in ENCODER_FAMILIES:
        raise ValueError(
            f"RetroMAE pre-trains masked-LM encoders of the families {', '.join(ENCODER_FAMILIES)}; "
            f"a {model_type!r} model is not one of them."
        )
    return ENCODER_FAMILIES[model_type]


def max_tokens(config: PreTrainedConfig) -> int:
    """The longest input, special tokens included, that the encoder's positions allow."""
    family = encoder_family(config.model_type)
    return config.max_position_embeddings - (0 if family.rotary else family.position_offset(config))


def register_family(model_type: str, family: EncoderFamily) -> None:
    """
    Add a masked-LM encoder family to `ENCODER_FAMILIES`, as `AutoConfig.register` adds a model type.

    From then on, in this process, a checkpoint of `model_type` pre-trains as those of the table
    do, and its release classes (`RetroMAE<Base>`, `RetroMAE<...ForMaskedLM>`, made here, since no
    file declares them) write a checkpoint of the family that loads with no flag; it carries no
    remote code, as this file holds no row for it (docs/families.md). The row is checked first,
    on the family's model as its default config builds it without weights (on the meta device):
    `ValueError` naming what is missing. The first token is the tokenizer's, checked when a run reads it.
    """
    problem = family_problem(model_type, family)
    if problem is not None:
        raise ValueError(f"register_family({model_type!r}): {problem}.")
    ENCODER_FAMILIES[model_type] = family
    RELEASED_ENCODERS[model_type] = registered_release_classes(model_type)


def family_problem(model_type: str, family: EncoderFamily) -> str | None:
    """What keeps RetroMAE from pre-training a `model_type` encoder read through the row `family`, in words; `None` if nothing."""
    if not isinstance(family, EncoderFamily):
        return f"the row is a {type(family).__name__}, not an EncoderFamily"
    if model_type in ENCODER_FAMILIES:
        return f"{model_type!r} is already a family of ENCODER_FAMILIES"
    if model_type not in CONFIG_MAPPING:
        return f"transformers has no model type {model_type!r}"
    config = CONFIG_MAPPING[model_type]()
    if getattr(config, "is_encoder_decoder", False):
        return f"a {model_type} model is an encoder-decoder; RetroMAE pre-trains an encoder, whose first token's state is the sentence embedding"
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        kind = "a decoder-only model, with" if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else "a model with"
        return f"{model_type} is {kind} no masked-LM class (AutoModelForMaskedLM), and RetroMAE trains the encoder and rebuilds the tokens with its MLM head"
    with torch.device("meta"):
        masked_lm = AutoModelForMaskedLM.from_config(config)
    return row_problem(masked_lm, family)


def row_problem(masked_lm: PreTrainedModel, family: EncoderFamily) -> str | None:
    """What the row `family` gets wrong about `masked_lm`, a model of its family (weights need not exist); `None` if nothing."""
    config, names, base = masked_lm.config, family.config_names, masked_lm.base_model
    missing = [names.get(name, name) for name in ("hidden_size", "num_attention_heads") if not hasattr(config, names.get(name, name))]
    if missing:
        return f"its config has no {', '.join(missing)}, which the decoder reads (config_names gives the family's names)"
    embeddings = getattr(base, "embeddings", None)
    if not isinstance(embeddings, nn.Module) or not {"input_ids", "inputs_embeds"} <= inspect.signature(embeddings.forward).parameters.keys():
        return "its base model has no embeddings module taking input_ids and inputs_embeds, from which the decoder's streams are made"
    if family.embeddings_projection is not None and not isinstance(getattr(base, family.embeddings_projection, None), nn.Module):
        return f"its base model has no {family.embeddings_projection!r} layer (embeddings_projection)"
    if not family.rotary and not isinstance(getattr(embeddings, "position_embeddings", None), nn.Embedding):
        return "its embeddings have no position table (position_embeddings) for position_offset to point into; a row without one gives position_offset=None"
    try:
        (family.rotary_base if family.rotary else family.position_offset)(config)
        weight, bias = family.head_output(masked_lm)
        states = torch.zeros(2, getattr(config, names.get("hidden_size", "hidden_size")), device=weight.device)
        scores = F.linear(family.head_transform(masked_lm, states), weight, bias)
    except Exception as error:  # the row's functions are the user's: say how they fail
        return f"its functions fail on a {type(masked_lm).__name__} ({type(error).__name__}: {error})"
    if tuple(scores.shape) != (2, config.vocab_size):
        return f"head_transform and head_output give scores of shape {tuple(scores.shape)} for 2 rows, not (2, vocab_size {config.vocab_size})"
    return None


@dataclass
class RetroMAEModelOutput(ModelOutput):
    """
    Output of the RetroMAE encoder classes (`RetroMAEModel` and its kind for every family).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq, hidden)`):
            The encoder's final hidden states.
        sentence_embedding (`torch.FloatTensor` of shape `(batch, hidden)`):
            The final hidden state at the first token, the vector used for retrieval (no pooler layer).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states after the embeddings and after every layer, when asked for.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights of every layer, when asked for (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    sentence_embedding: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RetroMAEForPreTrainingOutput(ModelOutput):
    """
    Output of [`RetroMAEForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `encoder_loss + decoder_loss`, the RetroMAE objective; DupMAE adds `bow_loss_weight * bow_loss`.
        encoder_loss (`torch.FloatTensor` of shape `()`):
            Masked language modelling loss of the encoder on its moderately masked input.
        decoder_loss (`torch.FloatTensor` of shape `()`):
            Reconstruction loss of the enhanced decoder over every non-special token.
        sentence_embedding (`torch.FloatTensor` of shape `(batch, hidden)`):
            The encoder's final first-token state.
        encoder_logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`, *optional*):
            MLM head scores on the encoder output, only with `return_logits=True`.
        decoder_logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`, *optional*):
            MLM head scores on the decoder output, only with `return_logits=True`.
        bow_loss (`torch.FloatTensor` of shape `()`, *optional*):
            DupMAE's bag-of-words loss, unweighted (`objective="dupmae"` only; `None` for RetroMAE).
    """

    loss: torch.FloatTensor | None = None
    encoder_loss: torch.FloatTensor | None = None
    decoder_loss: torch.FloatTensor | None = None
    sentence_embedding: torch.FloatTensor | None = None
    encoder_logits: torch.FloatTensor | None = None
    decoder_logits: torch.FloatTensor | None = None
    bow_loss: torch.FloatTensor | None = None


@dataclass
class RetroMAELosses(ModelOutput):
    """
    The objective's losses of a batch, from [`RetroMAEForPreTraining.pretraining_losses`].

    Args:
        loss, encoder_loss, decoder_loss, bow_loss:
            As in [`RetroMAEForPreTrainingOutput`]: the objective, its terms, and DupMAE's unweighted BoW loss (`None` for RetroMAE).
        decoder_states (`torch.FloatTensor` of shape `(batch, seq, hidden)`):
            The enhanced decoder's final states, which `decoder_loss` scores: for the decoder's logits
            or accuracy without decoding again.
    """

    loss: torch.FloatTensor | None = None
    encoder_loss: torch.FloatTensor | None = None
    decoder_loss: torch.FloatTensor | None = None
    bow_loss: torch.FloatTensor | None = None
    decoder_states: torch.FloatTensor | None = None


# Whole-word masking draws (the collator's encoder masking and the decoder's enhanced-decoding mask).
#
# A pattern takes a sequence's words in a random order while their tokens fit in the budget, the
# first word always. The random order of pattern k of an example comes from keys that are a pure
# function of (the example's seed, k, the word): a 32-bit integer hash in the high bits and the
# word's index in the low `WORD_BITS`, so that keys are distinct. A pattern is thus the same
# whichever device draws it, and whichever other patterns are drawn with it.
WORD_BITS = 24
UINT32 = 0xFFFFFFFF
# Rows of the decoder per block: a block's attention scores (and a block of patterns' keys) stay under this many elements.
DECODER_BLOCK_SCORES = 2**25
# Elements of (labelled rows, vocabulary) logits made at a time (128 MiB in float32).
LOGITS_CHUNK = 2**25
# What DupMAE's maximum over positions adds to the scores at padding (the authors' -1000).
PADDING_SCORE = -1000.0


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors; products stay below 2**63. In place on a copy of `x`."""
    x = x & UINT32
    x ^= x >> 16
    x *= 0x21F0AAAD
    x &= UINT32
    x ^= x >> 15
    x *= 0x735A2D97
    x &= UINT32
    x ^= x >> 15
    return x


def word_keys(seeds: torch.LongTensor, patterns: torch.LongTensor, num_words: int) -> torch.LongTensor:
    """(batch, patterns, words) distinct keys whose ascending order is a random order of the words, one per (example, pattern)."""
    pattern_states = mix32(mix32(seeds)[:, None] + patterns)  # (batch, patterns)
    words = torch.arange(num_words, device=seeds.device)
    keys = mix32(pattern_states[..., None] + mix32(words))
    keys <<= WORD_BITS
    return keys.bitwise_or_(words)


class WholeWordDraw:
    """
    Whole-word masking patterns of a batch, any number per example, drawn from per-example seeds.

    Args:
        word_ids: (batch, seq) the word each maskable token belongs to, -1 at special tokens and padding.
        seeds: (batch,) the examples' seeds.
        budget: (batch,) tokens a pattern may take: round(ratio x maskable tokens), at least 1.
    """

    def __init__(self, word_ids: torch.LongTensor, seeds: torch.LongTensor, budget: torch.LongTensor):
        self.word_ids, self.seeds, self.budget = word_ids, seeds, budget
        self.maskable = word_ids >= 0
        self.num_words = int(word_ids.max()) + 1
        self.word_lengths = torch.zeros((word_ids.shape[0], self.num_words), dtype=torch.long, device=word_ids.device)
        self.word_lengths.scatter_add_(1, word_ids.clamp(min=0), self.maskable.long())

    def patterns(self, indices: torch.LongTensor) -> torch.BoolTensor:
        """(batch, patterns, seq) True at the tokens each pattern hides; pattern k of an example is the same whenever drawn."""
        keys = word_keys(self.seeds, indices, self.num_words)  # (batch, patterns, words)
        keys.masked_fill_(self.word_lengths[:, None] == 0, torch.iinfo(torch.long).max)  # absent words come last
        in_order, order = keys.sort(dim=-1)
        lengths = self.word_lengths[:, None].expand_as(order).gather(-1, order)
        taken = (lengths.cumsum(-1) <= self.budget[:, None, None]).sum(-1, keepdim=True).clamp(min=1)
        taken_words = keys <= in_order.gather(-1, taken - 1)  # (batch, patterns, words)
        return taken_words.gather(-1, self.word_ids.clamp(min=0)[:, None].expand(-1, len(indices), -1)) & self.maskable[:, None]


class EnhancedDecodingMask:
    """
    The position-specific attention mask of enhanced decoding (paper §3.3, Eq. 7), made block by block.

    Row i hides a whole-word pattern (`WholeWordDraw`), its own position i, and padding; it sees
    everything else, the sentence embedding at position 0 included, since patterns never take
    special tokens. `row_patterns` says which of the example's patterns each row takes: its own
    when the collator draws one per row, one of a pool otherwise (the authors' code draws 256 per
    example and gives each row one at random). The patterns are drawn once, (batch, patterns, seq);
    `rows` makes any block of rows of the mask from them. Without a draw (the paper's ablation,
    no enhanced decoding) the mask hides only padding.
    """

    # The collator's names for the mask's description, in the order `__init__` takes them.
    DESCRIPTION = ("decoder_word_ids", "decoder_mask_seeds", "decoder_mask_budget", "decoder_row_patterns")

    def __init__(
        self,
        padding: torch.Tensor,
        word_ids: torch.LongTensor | None = None,
        seeds: torch.LongTensor | None = None,
        budget: torch.LongTensor | None = None,
        row_patterns: torch.LongTensor | None = None,
    ):
        self.padding, self.row_patterns = padding.bool(), row_patterns
        if word_ids is None:
            self.patterns = None
        else:
            self.patterns = self.draw_patterns(WholeWordDraw(word_ids, seeds, budget), int(row_patterns.max()) + 1)

    @classmethod
    def from_batch(cls, batch: dict) -> "EnhancedDecodingMask":
        """The mask described by a `RetroMAECollator` batch (padding only for the ablation's batches, which describe none)."""
        return cls(batch["encoder_attention_mask"], *(batch.get(name) for name in cls.DESCRIPTION))

    def draw_patterns(self, draw: WholeWordDraw, count: int) -> torch.BoolTensor:
        """(batch, count, seq) the patterns, drawn in blocks that keep their (batch, patterns, words) keys small."""
        block = max(1, DECODER_BLOCK_SCORES // (len(self.padding) * draw.num_words))
        indices = torch.arange(count, device=self.padding.device)
        return torch.cat([draw.patterns(part) for part in indices.split(block)], dim=1)

    def rows(self, rows: torch.LongTensor) -> torch.BoolTensor:
        """(batch, rows, seq) True where each of `rows` may attend."""
        visible = self.padding[:, None].expand(-1, len(rows), -1)
        if self.patterns is None:
            return visible
        examples = torch.arange(len(self.padding), device=rows.device)[:, None]
        hidden = self.patterns[examples, self.row_patterns[:, rows]]  # (batch, rows, seq)
        hidden |= rows[:, None] == torch.arange(self.padding.shape[1], device=rows.device)  # a row never sees itself
        return visible & ~hidden

    def dense(self) -> torch.BoolTensor:
        """The whole (batch, seq, seq) mask, True where query row i may attend to position j."""
        return self.rows(torch.arange(self.padding.shape[1], device=self.padding.device))


def rotate(states: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: rotate (batch, heads, seq, head) states by (seq, head / 2) angles (RoFormer's halves layout)."""
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # (seq, head)
    first, second = states.chunk(2, dim=-1)
    return states * cos + torch.cat([-second, first], dim=-1) * sin


class EnhancedDecodingAttention(BertCrossAttention):
    """
    BERT's cross-attention with the key and value projections split from the query side.

    The keys and values come from the content stream, the same for every query row and every
    decoder layer's block of rows, so they are projected once (`keys_values`) and each block of
    query rows attends to them. For encoders without an absolute position table (`rotary_base`
    given) query row i is rotated by i and key j by j, so that a score depends on where the two
    tokens are relative to each other; the parameters and the attention kernels are BERT's.
    """

    def __init__(self, config: BertConfig, rotary_base: float | None = None):
        super().__init__(config)
        self.rotary_base = rotary_base

    def keys_values(self, content_stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        (batch, heads, seq, head) keys and values of the content stream, in its dtype.

        Every block of query rows reads them, so their gradients are sums over the blocks: kept in
        the content stream's dtype (float32 under bf16 autocast, where the projection gives bf16),
        those sums accumulate in float32; each block's attention still runs in bf16.
        """
        key, value = (self.heads(projection(content_stream).to(content_stream.dtype)) for projection in (self.key, self.value))
        if self.rotary_base is not None:
            key = rotate(key, self.angles(torch.arange(key.shape[2], device=key.device)))
        return key, value

    def forward(
        self, query_rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """The attention output of the query stream's `rows` (positions), (batch, rows, hidden)."""
        query = self.heads(self.query(query_rows))
        if self.rotary_base is not None:
            query = rotate(query, self.angles(rows))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self, query, key, value, attention_mask, dropout=self.dropout.p if self.training else 0.0, scaling=self.scaling
        )
        return output.reshape(query_rows.shape[0], query_rows.shape[1], -1).contiguous()

    def heads(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, heads, seq, head)."""
        return states.view(states.shape[0], states.shape[1], -1, self.attention_head_size).transpose(1, 2)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(positions, head / 2) rotation angles: position x inverse frequency."""
        exponents = torch.arange(0, self.attention_head_size, 2, device=positions.device, dtype=torch.float32) / self.attention_head_size
        return positions.float()[:, None] * self.rotary_base**-exponents


class RetroMAEDecoderLayer(nn.Module):
    """
    One layer of enhanced decoding (paper §3.3, Eq. 7-8).

    Queries come from the query stream, keys and values from the content stream, under the
    position-specific mask; the residual and LayerNorm are taken on the query stream, then
    BERT's feed-forward block follows. BERT's cross-attention block is exactly this attention;
    for encoders without absolute positions its queries and keys are rotated by position.
    Every query row is computed on its own, so the layer runs on any block of rows.
    """

    def __init__(self, config: BertConfig, rotary_base: float | None = None):
        super().__init__()
        self.attention = BertAttention(config, is_cross_attention=True)
        self.attention.self = EnhancedDecodingAttention(config, rotary_base)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, query_rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(query_rows, key, value, attention_mask, rows), query_rows)
        return self.output(self.intermediate(attended), attended)


class RetroMAEDecoder(nn.Module):
    """
    The decoder: `num_decoder_layers` enhanced-decoding layers, one in the paper.

    The query stream is decoded in blocks of rows, each with its own block of the mask, so that
    neither the (batch, seq, seq) mask nor the attention scores exist for the whole sequence at
    once: a block holds at most `DECODER_BLOCK_SCORES` scores. With more than one block (long
    inputs) or with gradient checkpointing on, a block's activations are recomputed in backward
    instead of kept.
    """

    gradient_checkpointing = False  # set by `activation_checkpointing_enable` (the Trainer's `activation_checkpointing`)

    def __init__(self, config: BertConfig, num_layers: int, rotary_base: float | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([RetroMAEDecoderLayer(config, rotary_base) for _ in range(num_layers)])

    def forward(self, query_stream: torch.Tensor, content_stream: torch.Tensor, mask: "EnhancedDecodingMask") -> torch.Tensor:
        keys_values = [layer.attention.self.keys_values(content_stream) for layer in self.layers]
        batch, seq_length, _ = query_stream.shape
        block = max(1, DECODER_BLOCK_SCORES // (batch * self.config.num_attention_heads * seq_length))
        recompute = torch.is_grad_enabled() and (self.gradient_checkpointing or block < seq_length)
        decoded = []
        for start in range(0, seq_length, block):
            rows = torch.arange(start, min(start + block, seq_length), device=query_stream.device)
            inputs = (query_stream[:, start : start + block], keys_values, mask, rows)
            decoded.append(checkpoint(self.decode_rows, *inputs, use_reentrant=False) if recompute else self.decode_rows(*inputs))
        return torch.cat(decoded, dim=1)

    def decode_rows(self, query_rows: torch.Tensor, keys_values: list, mask: "EnhancedDecodingMask", rows: torch.Tensor) -> torch.Tensor:
        """The decoder's output at `rows`, drawing that block of the mask."""
        bias = attention_bias(mask.rows(rows), self.config._attn_implementation, query_rows.dtype)
        for layer, (key, value) in zip(self.layers, keys_values):
            query_rows = layer(query_rows, key, value, bias, rows)
        return query_rows


def attention_bias(visible: torch.BoolTensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, rows, seq) mask, True = may attend, in the form the attention function takes: (batch, 1, rows, seq)."""
    mask = visible[:, None]
    if attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def decoder_config(config: RetroMAEConfig) -> BertConfig:
    """
    The decoder layer's settings: BERT's layer at the encoder's width, activation and initialisation.

    A setting the family does not configure (DistilBERT's LayerNorm epsilon) takes BERT's default.
    """
    encoder, defaults = config.encoder, BertConfig()
    names = encoder_family(encoder.model_type).config_names
    decoder = BertConfig(**{name: getattr(encoder, names.get(name, name), getattr(defaults, name)) for name in DECODER_FIELDS})
    decoder._attn_implementation = config._attn_implementation
    return decoder


class RetroMAEPreTrainedModel(PreTrainedModel):
    """
    Weight initialisation and loading rules of RetroMAE pre-training models.

    The encoder is initialised by its family's own rules; the decoder's layers like BERT's.
    The decoder's attention is eager or SDPA, never flash or flex attention: flash-attention-2
    takes no mask but padding and causality, and the enhanced-decoding mask is an arbitrary
    (batch, rows, seq) one; flex attention would take it as a `mask_mod`, but a random half of
    every row is hidden, so no block of it is empty for a `BlockMask` to skip, and SDPA with the
    boolean block does the same work without compiling. The encoder takes any kernel its family
    does: `attn_implementation={"": "sdpa", "encoder": "flash_attention_2"}` (a single name sets both).
    """

    config_class = RetroMAEConfig
    config: RetroMAEConfig
    base_model_prefix = "retromae"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module):
        std = decoder_config(self.config).initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class RetroMAEForPreTraining(RetroMAEPreTrainedModel):
    """
    RetroMAE pre-training: the family's masked-LM encoder (with its MLM head) and the enhanced decoder.

    `forward` takes the batch made by `RetroMAECollator`. `encoder` is the family's own
    `...ForMaskedLM` model, so its weights are named as in the family's checkpoints; pass one
    loaded from a checkpoint (`AutoModelForMaskedLM.from_pretrained`) to pre-train from it, with
    the decoder initialised afresh. Checkpoints written by earlier versions of this package (a
    BERT at the top level) load with `from_pretrained` as they are.
    """

    main_input_name = "encoder_input_ids"
    # The decoder is new in RetroMAE: a checkpoint without it (a release) starts it fresh, as a family's checkpoint does.
    _keys_to_ignore_on_load_missing = [r"^decoder\."]
    # Checkpoints of earlier versions held the BERT encoder and its head at the top level.
    LEGACY_PREFIXES = {"bert.": "encoder.bert.", "cls.": "encoder.cls."}

    def __init__(self, config: RetroMAEConfig, encoder: PreTrainedModel | None = None):
        super().__init__(config)
        self.family = encoder_family(config.encoder.model_type)
        self.encoder = encoder if encoder is not None else AutoModelForMaskedLM.from_config(config.encoder)
        self.decoder = self.new_decoder()
        self.register_load_state_dict_pre_hook(rename_legacy_keys)
        self.post_init()

    def new_decoder(self) -> "RetroMAEDecoder":
        """A decoder as the config describes it, as wide as the encoder, its positions rotary where the encoder's are."""
        rotary_base = self.family.rotary_base(self.config.encoder) if self.family.rotary else None
        return RetroMAEDecoder(decoder_config(self.config), self.config.num_decoder_layers, rotary_base)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        A pre-training model from any checkpoint it can start from.

        A RetroMAE checkpoint (this version's, or an earlier one with BERT at the top level) loads
        whole. A checkpoint of a supported family (its `...ForMaskedLM` or base-model layout) is read
        by the family's own `AutoModelForMaskedLM`: its encoder (and MLM head, where it has one)
        is carried over, and the decoder too where it is a release of this package that keeps one;
        otherwise the decoder starts fresh, as it does with `fresh_decoder=True`. RetroMAE's settings
        (`encoder_mask_ratio`, ...) may be passed as keyword arguments. With `output_loading_info=True`,
        the missing keys are named as in this model (`encoder.` + the family's key; the decoder's).
        """
        config = kwargs.get("config")
        hub = {key: kwargs[key] for key in HUB_ARGUMENTS if key in kwargs}
        model_type = config.model_type if config is not None else PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)[0].get("model_type")
        if model_type in ENCODER_FAMILIES:
            return cls.from_encoder_checkpoint(pretrained_model_name_or_path, *args, **kwargs)
        fresh_decoder = kwargs.pop("fresh_decoder", False)
        legacy = {f"^{re.escape(old)}": new for old, new in cls.LEGACY_PREFIXES.items()}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **({"key_mapping": legacy} | kwargs))
        if fresh_decoder:
            model, info = loaded if isinstance(loaded, tuple) else (loaded, {"missing_keys": set()})
            model.decoder = model.new_decoder().to(model.device)
            model.decoder.apply(model._init_weights)
            info["missing_keys"] = set(info["missing_keys"]) | {f"decoder.{key}" for key in model.decoder.state_dict()}
        return loaded

    @classmethod
    def from_encoder_checkpoint(
        cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, fresh_decoder: bool = False, **kwargs
    ):
        """
        The family's masked-LM model from its checkpoint as the encoder (see `from_pretrained`).

        A release's MLM head and decoder (its `RELEASE_PARTS_FILE`) are carried over, so that
        pre-training continues where the release left it; the decoder starts fresh where the
        checkpoint has none, or with `fresh_decoder=True`. RetroMAE's settings are those given, else
        those the release was pre-trained with, else RetroMAE's own.
        """
        settings = {name: kwargs.pop(name) for name in RETROMAE_FIELDS if name in kwargs}
        attention = kwargs.pop("attn_implementation", None)
        # One kernel for both, or {"": the decoder's, "encoder": the encoder's} as `_from_config` takes it.
        parts = attention if isinstance(attention, dict) else {"": attention}
        released = read_release_parts(pretrained_model_name_or_path, **{key: kwargs[key] for key in HUB_ARGUMENTS if key in kwargs})
        with quiet_loading() if released else contextlib.nullcontext():  # the head it would call missing is filled below
            encoder, info = AutoModelForMaskedLM.from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, attn_implementation=parts.get("encoder", parts.get("")), **kwargs
            )
        head, decoder = release_part(released, "encoder"), ({} if fresh_decoder else release_part(released, "decoder"))
        encoder.load_state_dict(head, strict=False)
        # A release's config keeps the settings it was pre-trained with: they are the defaults of its continuation.
        settings = {name: getattr(encoder.config, name) for name in RETROMAE_FIELDS if hasattr(encoder.config, name)} | settings
        attention = {"": parts.get("") or encoder.config._attn_implementation, "encoder": encoder.config._attn_implementation}
        config = RetroMAEConfig(encoder=encoder.config, attn_implementation=attention, **settings)
        model = cls(config, encoder=encoder)
        model.load_decoder(decoder, pretrained_model_name_or_path)
        if not output_loading_info:
            return model
        fresh_decoder_keys = set() if decoder else {f"decoder.{key}" for key in model.decoder.state_dict()}
        missing_encoder_keys = {f"encoder.{key}" for key in set(info["missing_keys"]) - set(head)}
        unexpected = {key for key in info["unexpected_keys"] if "pooler." not in key}  # a release's (or BERT's) pooler: never trained here
        return model, info | {"missing_keys": missing_encoder_keys | fresh_decoder_keys, "unexpected_keys": unexpected}

    def load_decoder(self, decoder: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
        """Take a release's decoder tensors (none: it stays as initialised); `ValueError` where they do not fit this encoder."""
        if not decoder:
            return
        expected = {key: tuple(tensor.shape) for key, tensor in self.decoder.state_dict().items()}
        given = {key: tuple(tensor.shape) for key, tensor in decoder.items()}
        if given != expected:
            key = next(key for key in sorted(given.keys() | expected.keys()) if given.get(key) != expected.get(key))
            raise ValueError(
                f"The decoder kept in {source} ({RELEASE_PARTS_FILE}) does not fit this encoder's: its {key} is "
                f"{given.get(key, 'missing')}, this model's {expected.get(key, 'absent')}; start the decoder afresh "
                "(`fresh_decoder=True`, `retromae pretrain --fresh-decoder`)."
            )
        self.decoder.load_state_dict(decoder)

    def decoder_weights(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The decoder's tensors, named as in this model, for a release: this model's own, or those of a gathered state dict `weights`."""
        source = weights if weights is not None else self.state_dict()
        return {name: tensor.contiguous() for name, tensor in source.items() if name.startswith("decoder.")}

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        """Give the encoder new word embeddings (`resize_token_embeddings`); its MLM head, shared by the decoder, stays tied to them."""
        self.encoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.encoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.encoder.set_output_embeddings(value)

    def released_encoder(self, with_mlm_head: bool = True, weights: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
        """
        The encoder as its family's release class, without the decoder (as in the paper).

        With its MLM head (the `...ForMaskedLM` layout a release has) or without (the base model,
        whose output is the sentence embedding); RetroMAE's settings are kept in its config. Its
        weights are this model's own, or those of the whole model in `weights` (a state dict
        gathered from the processes that train it sharded, whose own tensors are shards).
        """
        config = copy.deepcopy(self.encoder.config)  # the training encoder's own config stays as it is
        for name in RETROMAE_FIELDS:
            setattr(config, name, getattr(self.config, name))
        model, masked_lm = RELEASED_ENCODERS[config.model_type]
        encoder = masked_lm(config)
        if weights is None:
            encoder.load_state_dict(self.encoder.state_dict())
        else:
            encoder.load_state_dict({name.removeprefix("encoder."): tensor for name, tensor in weights.items() if name.startswith("encoder.")})
        if with_mlm_head:
            return encoder.eval()
        base = model(config)
        base.load_state_dict(encoder.base_model.state_dict())
        return base.eval()

    def forward(
        self,
        encoder_input_ids: torch.LongTensor,
        encoder_attention_mask: torch.Tensor,
        encoder_labels: torch.LongTensor,
        decoder_input_ids: torch.LongTensor,
        decoder_labels: torch.LongTensor,
        decoder_word_ids: torch.LongTensor | None = None,
        decoder_mask_seeds: torch.LongTensor | None = None,
        decoder_mask_budget: torch.LongTensor | None = None,
        decoder_row_patterns: torch.LongTensor | None = None,
        return_logits: bool = False,
    ) -> RetroMAEForPreTrainingOutput:
        """
        Compute the RetroMAE (or, with `config.objective="dupmae"`, the DupMAE) loss for one batch.

        The enhanced-decoding mask comes as its description (`decoder_word_ids`, the words of the
        maskable tokens; `decoder_mask_seeds`, one seed per example; `decoder_mask_budget`, the
        tokens a pattern hides; `decoder_row_patterns`, the pattern each row takes) and is made
        here, on the model's device, a block of rows at a time (`EnhancedDecodingMask`). Without enhanced decoding (`config.enhanced_decoding=False`,
        the paper's ablation) the collator's decoder inputs are a masked copy, there is no
        description, and the decoder's mask only hides padding. With `return_logits=True` the MLM
        scores over the whole sequence are returned as well; the losses are the same either way.
        The losses are `pretraining_losses`'s, from the encoder's states on `encoder_input_ids`.
        """
        encoder_states = self.encoder.base_model(encoder_input_ids, attention_mask=encoder_attention_mask).last_hidden_state
        description = (decoder_word_ids, decoder_mask_seeds, decoder_mask_budget, decoder_row_patterns)
        batch = {
            "encoder_attention_mask": encoder_attention_mask,
            "encoder_labels": encoder_labels,
            "decoder_input_ids": decoder_input_ids,
            "decoder_labels": decoder_labels,
            **dict(zip(EnhancedDecodingMask.DESCRIPTION, description)),
        }
        losses = self.pretraining_losses(encoder_states, batch)
        return RetroMAEForPreTrainingOutput(
            loss=losses.loss,
            encoder_loss=losses.encoder_loss,
            decoder_loss=losses.decoder_loss,
            sentence_embedding=encoder_states[:, 0],
            encoder_logits=self.mlm_head(encoder_states) if return_logits else None,
            decoder_logits=self.mlm_head(losses.decoder_states) if return_logits else None,
            bow_loss=losses.bow_loss,
        )

    def pretraining_losses(self, encoder_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> RetroMAELosses:
        """
        The objective's losses of a `RetroMAECollator` batch, from the encoder's final states on its masked input.

        The one home of the objective: `forward`, `RetroMAELoss` (whose SentenceTransformer runs the
        encoder) and the held-out evaluation take their losses from here. The sentence embedding
        `h_X` is the first token's state; the decoder rebuilds every token from it under the
        batch's enhanced-decoding mask (Eq. 6-8); the loss is `encoder_loss + decoder_loss`, and
        DupMAE adds `bow_loss_weight * bow_loss`, taken from the same encoder states.
        """
        sentence_embedding = encoder_states[:, 0]  # (batch, hidden) h_X, the first token's final state
        # The encoder's loss is built before the decoder: the order sets the order in which backward
        # sums the tied word embeddings' gradients, and so their last bits.
        encoder_loss = self.masked_lm_loss(encoder_states, batch["encoder_labels"])
        decoder_states = self.decode(sentence_embedding, batch["decoder_input_ids"], self.enhanced_decoding_mask(batch))
        decoder_loss = self.masked_lm_loss(decoder_states, batch["decoder_labels"])
        loss = encoder_loss + decoder_loss

        bow_loss = None
        if self.config.objective == "dupmae":
            bow_loss = self.bag_of_words_loss(encoder_states, batch["encoder_attention_mask"], batch["decoder_labels"])
            loss = loss + self.config.bow_loss_weight * bow_loss

        return RetroMAELosses(loss=loss, encoder_loss=encoder_loss, decoder_loss=decoder_loss, bow_loss=bow_loss, decoder_states=decoder_states)

    def enhanced_decoding_mask(self, batch: dict[str, torch.Tensor]) -> EnhancedDecodingMask:
        """The mask the batch describes (padding only for the ablation); `ValueError` where the batch and the config disagree on enhanced decoding."""
        described = batch.get("decoder_word_ids") is not None
        if self.config.enhanced_decoding != described:
            raise ValueError(
                f"The batch {'describes an' if described else 'describes no'} enhanced-decoding mask "
                f"({', '.join(EnhancedDecodingMask.DESCRIPTION)}), and the config has enhanced_decoding="
                f"{self.config.enhanced_decoding}: build the collator with RetroMAECollator.from_config(model.config, tokenizer)."
            )
        return EnhancedDecodingMask.from_batch(batch)

    def decode(self, sentence_embedding: torch.Tensor, decoder_input_ids: torch.LongTensor, mask: EnhancedDecodingMask) -> torch.Tensor:
        """The decoder's final states: the sentence rebuilt from `h_X` and the decoder's inputs (Eq. 6-8)."""
        content_stream = self.content_stream(sentence_embedding, decoder_input_ids)
        if self.config.objective == "dupmae":
            query_stream = self.embedded_query_stream(sentence_embedding, decoder_input_ids.shape[1])
        elif self.config.enhanced_decoding:
            query_stream = self.query_stream(sentence_embedding, decoder_input_ids.shape[1])
        else:
            query_stream = content_stream  # the ablation: self-attention over the masked copy
        return self.decoder(query_stream, content_stream, mask)

    def query_stream(self, sentence_embedding: torch.Tensor, seq_length: int) -> torch.Tensor:
        """
        `H1`: the sentence embedding plus the raw position embedding of every position (Eq. 6).

        Positions are numbered as the encoder numbers them (from `padding_idx + 1` in RoBERTa).
        Without a position table the query is `h_X` itself at every position, which the rotary
        decoder then rotates by the position.
        """
        queries = sentence_embedding[:, None].expand(-1, seq_length, -1)  # (batch, seq, hidden)
        if self.family.rotary:
            return queries
        table = self.encoder.base_model.embeddings.position_embeddings
        first = self.family.position_offset(self.config.encoder)
        positions = table(torch.arange(first, first + seq_length, device=sentence_embedding.device))  # (seq, embedding)
        return queries + self.to_hidden_width(positions)

    def embedded_query_stream(self, sentence_embedding: torch.Tensor, seq_length: int) -> torch.Tensor:
        """
        DupMAE's `H1`: `h_X` at every position sent through the encoder's embeddings module as `inputs_embeds`.

        Each family's module does what it does with `inputs_embeds`: BERT adds the position and
        token-type embeddings, then LayerNorm and dropout (the authors' `modeling_duplex.py`);
        RoBERTa numbers the positions from `padding_idx + 1`; ModernBERT and DeBERTa-v3, which
        have no position table, normalise it and the rotary decoder rotates it by the position.
        """
        queries = sentence_embedding[:, None].expand(-1, seq_length, -1)  # (batch, seq, hidden)
        return self.to_hidden_width(self.encoder.base_model.embeddings(input_ids=None, inputs_embeds=queries))

    def content_stream(self, sentence_embedding: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        """`H2`: the encoder's embeddings of the original tokens, position 0 replaced by `h_X` (Eq. 6)."""
        token_embeddings = self.to_hidden_width(self.encoder.base_model.embeddings(input_ids=input_ids))  # (batch, seq, hidden)
        return torch.cat([sentence_embedding[:, None], token_embeddings[:, 1:]], dim=1)

    def to_hidden_width(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Factorised embeddings (ELECTRA's `embedding_size`) projected as the encoder projects them; others as they are."""
        name = self.family.embeddings_projection
        projection = getattr(self.encoder.base_model, name, None) if name else None
        return embeddings if projection is None else projection(embeddings)

    def mlm_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The family's MLM head, shared by encoder and decoder: vocabulary scores of hidden states."""
        weight, bias = self.family.head_output(self.encoder)
        return F.linear(self.family.head_transform(self.encoder, hidden_states), weight, bias)

    def masked_lm_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """
        Cross entropy of the shared MLM head over the labelled positions.

        Only labelled positions go through the vocabulary projection: the mean over them is the
        same as over full logits with `ignore_index`, at a fraction of the cost. The projection
        and the cross entropy run a chunk of rows at a time (`linear_cross_entropy`), so that
        the (rows, vocabulary) logits never exist for the whole batch. A batch with no labelled
        position (the encoder's, when every passage is [UNK], which its masking leaves) has loss 0.
        """
        labelled = labels != IGNORE_INDEX  # (batch, seq)
        weight, bias = self.family.head_output(self.encoder)
        states = self.family.head_transform(self.encoder, hidden_states[labelled])
        return linear_cross_entropy(states, weight, bias, labels[labelled]) / labelled.sum().clamp(min=1)

    def bag_of_words_loss(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor, decoder_labels: torch.LongTensor) -> torch.Tensor:
        """
        DupMAE's bag-of-words loss: cross entropy of the log-softmax of `bag_of_words_scores` against the bag of words.

        The target (`bag_of_words_target`) is read from `decoder_labels`, which hold the passage's
        original non-special tokens and -100 elsewhere. Mean over the batch.
        """
        log_probabilities = self.bag_of_words_scores(encoder_states, attention_mask).log_softmax(-1)  # (batch, vocab)
        target = bag_of_words_target(decoder_labels, log_probabilities.shape[-1])
        return -(target * log_probabilities).sum(-1).mean()

    def bag_of_words_scores(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        (batch, vocab) float32: for each vocabulary entry the maximum of the encoder's MLM scores over positions 1..L-1.

        Padding takes -1000 before the maximum, as in the authors' code; [CLS] is left out, [SEP]
        and masked positions are in. The projection runs a chunk of positions at a time
        (`linear_max_over_positions`).
        """
        weight, bias = self.family.head_output(self.encoder)
        states = self.family.head_transform(self.encoder, encoder_states[:, 1:])  # (batch, seq - 1, hidden)
        penalty = (1 - attention_mask[:, 1:].float()) * PADDING_SCORE  # (batch, seq - 1)
        return linear_max_over_positions(states, weight, bias, penalty)


def bag_of_words_target(labels: torch.LongTensor, vocab_size: int) -> torch.Tensor:
    """
    (batch, vocab) DupMAE's target: 1/n at each distinct labelled token, n = the labelled tokens counted with repeats.

    As the authors' `DupMAECollator`, so each row sums to at most 1; built on the labels' device.
    """
    labelled = labels != IGNORE_INDEX  # (batch, seq)
    present = torch.zeros(labels.shape[0], vocab_size, device=labels.device)
    present.scatter_reduce_(1, labels.clamp(min=0), labelled.float(), reduce="amax")
    return present / labelled.sum(1, keepdim=True).clamp(min=1)


def rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Read a state dict of an earlier version (BERT encoder and head at the top level) into the current layout."""
    for old, new in RetroMAEForPreTraining.LEGACY_PREFIXES.items():
        for key in [key for key in state_dict if key.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


def linear_max_over_positions(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, penalty: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) maximum over positions of `states @ weight.T + bias + penalty`, made `LOGITS_CHUNK` elements at a time."""
    chunk_positions = max(1, LOGITS_CHUNK // (states.shape[0] * weight.shape[0]))
    return LinearMaxOverPositions.apply(states, weight, bias, penalty, chunk_positions)


class LinearMaxOverPositions(torch.autograd.Function):
    """
    The vocabulary projection and its maximum over positions, fused over chunks of positions.

    Forward makes the (batch, chunk, vocab) scores of one chunk of positions at a time and keeps
    the running maximum and the position that attains it (the arg-max). The maximum's gradient
    reaches only that position, so backward needs no scores: the gradient of the scores is a
    sparse (batch x seq, vocab) matrix `G` with one entry per (example, vocabulary entry), at the
    winning position, and the gradients of the states and the weight are the sparse products
    `G @ weight` and `G.T @ states`: (batch, vocab, hidden) multiply-adds, not the projection's
    (batch, seq, vocab, hidden), and nothing of size (batch, vocab, hidden) is made.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, penalty, chunk_positions: int):
        batch, seq_length, _ = states.shape
        maximum = torch.full((batch, weight.shape[0]), float("-inf"), dtype=torch.float32, device=states.device)  # (batch, vocab)
        winner = torch.zeros((batch, weight.shape[0]), dtype=torch.long, device=states.device)
        padded = penalty.ne(0).any(0)  # (seq,) positions where some example is padding
        first_padded = int(padded.float().argmax()) if padded.any() else seq_length
        for start in range(0, seq_length, chunk_positions):
            scores = F.linear(states[:, start : start + chunk_positions], weight, bias)  # (batch, chunk, vocab)
            if start + chunk_positions > first_padded:
                scores = scores + penalty[:, start : start + chunk_positions, None].to(scores.dtype)
            chunk_maximum, chunk_winner = scores.max(1)
            chunk_maximum = chunk_maximum.float()
            better = chunk_maximum > maximum  # a tie keeps the earlier chunk's position
            maximum = torch.where(better, chunk_maximum, maximum)
            winner = torch.where(better, chunk_winner + start, winner)
        ctx.save_for_backward(states, weight, winner)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return maximum

    @staticmethod
    def backward(ctx, grad_maximum):
        states, weight, winner = ctx.saved_tensors
        batch, seq_length, hidden = states.shape
        vocab_size = weight.shape[0]
        rows = winner + seq_length * torch.arange(batch, device=winner.device)[:, None]  # (batch, vocab) winner's row of the flat states
        entries = torch.arange(vocab_size, device=winner.device).repeat_interleave(batch)
        # G.T, (vocab, batch x seq): its indices are sorted and distinct as built (by entry, then example).
        grad_scores_t = torch.sparse_coo_tensor(
            torch.stack([entries, rows.T.flatten()]),
            grad_maximum.T.flatten().float(),
            (vocab_size, batch * seq_length),
            is_coalesced=True,
            check_invariants=False,
        )
        grad_weight = torch.sparse.mm(grad_scores_t, states.reshape(batch * seq_length, hidden).float())  # (vocab, hidden)
        grad_states = torch.sparse.mm(grad_scores_t.t(), weight.float())  # (batch x seq, hidden)
        return (
            grad_states.view(batch, seq_length, hidden).to(states.dtype),
            grad_weight.to(weight.dtype),
            None if ctx.bias_dtype is None else grad_maximum.sum(0).to(ctx.bias_dtype),
            None,
            None,
        )


def linear_cross_entropy(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.LongTensor) -> torch.Tensor:
    """Summed cross entropy of `states @ weight.T + bias` against `labels`, the logits made `LOGITS_CHUNK` elements at a time."""
    wants_gradients = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (states, weight, bias))
    return LinearCrossEntropy.apply(states, weight, bias, labels, max(1, LOGITS_CHUNK // weight.shape[0]), wants_gradients)


class LinearCrossEntropy(torch.autograd.Function):
    """
    The vocabulary projection and cross entropy, fused over chunks of rows.

    Each chunk's logits are made once, in forward: their loss is summed and, while they exist,
    their gradients with respect to the states, the weight and the bias are accumulated; backward
    only scales those. The logits of one chunk exist at a time, and nothing is recomputed: the
    matrix multiplies are those of the unfused projection's forward and backward.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, labels, chunk_rows: int, wants_gradients: bool):
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grad_states = torch.empty_like(states) if wants_gradients else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_gradients else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_gradients and bias is not None else None
        for start in range(0, len(labels), chunk_rows):
            rows = slice(start, start + chunk_rows)
            gradients = (grad_states[rows], grad_weight, grad_bias) if wants_gradients else None
            total += LinearCrossEntropy.chunk(states[rows], weight, bias, labels[rows], gradients)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def chunk(rows, weight, bias, targets, gradients: tuple | None) -> torch.Tensor:
        """
        The summed loss of one chunk of rows; with `gradients` (the chunk's rows of the states'
        gradient, the weight's and the bias's sums), the chunk's gradients are added to them. The
        chunk's logits live only while this runs: at most two (chunk, vocab) float32 tensors at once.
        """
        log_probabilities = F.linear(rows, weight, bias).float().log_softmax(-1)  # (chunk, vocab)
        loss = -log_probabilities.gather(1, targets[:, None]).sum()
        if gradients is None:
            return loss
        grad_rows, grad_weight, grad_bias = gradients
        grad_logits = log_probabilities.exp_()  # softmax - one-hot: d(summed loss) / d(logits)
        grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        grad_rows.copy_(grad_logits.to(rows.dtype) @ weight.to(rows.dtype))
        grad_weight += grad_logits.T @ rows.float()
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        return loss

    @staticmethod
    def backward(ctx, grad_total):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_states * grad_total.to(grad_states.dtype),
            (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
            None,
            None,
            None,
        )


# What is handed to users: the released classes, and what writes a release.

# sentence-transformers' files for first-token pooling, in the format every version of it reads.
SENTENCE_TRANSFORMERS_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def write_sentence_transformers_files(folder: str | os.PathLike, config: PreTrainedConfig, max_seq_length: int | None = None) -> None:
    """
    Configure a saved encoder folder for sentence-transformers: first-token pooling, no pooler layer, cosine similarity.

    Inputs are truncated at `max_seq_length` tokens; left out, at as many as the positions allow
    (a pre-training run passes its own rule's length, docs/publishing.md).
    """
    files = {
        "modules.json": SENTENCE_TRANSFORMERS_MODULES,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length or max_tokens(config), "do_lower_case": False},
        "config_sentence_transformers.json": sentence_transformers_config(),
        "1_Pooling/config.json": {
            "word_embedding_dimension": config.hidden_size,
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    }
    for name, content in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
            file.write("\n")


def sentence_transformers_config() -> dict:
    """
    config_sentence_transformers.json as sentence-transformers' own `save` writes it for a model with
    cosine similarity and no prompts: its model type, the versions that wrote it (sentence-transformers'
    where it is installed), its empty query and document prompts.
    """
    versions = {"transformers": transformers.__version__, "pytorch": torch.__version__}
    try:
        versions["sentence_transformers"] = importlib.metadata.version("sentence-transformers")
    except importlib.metadata.PackageNotFoundError:
        pass  # written without sentence-transformers: no version of it to name
    return {
        "model_type": "SentenceTransformer",
        "__version__": versions,
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }


class RetroMAEReleasedEncoder:
    """
    Saving writes what users are handed: a checkpoint of the encoder's family first, RetroMAE's code as an opt-in.

    `save_pretrained` (and so `push_to_hub`) writes, in `model.safetensors`, the family's base
    model (`BertModel`, with the pooler the family builds), which `SentenceTransformer`, `AutoModel`
    and the family's base class load as they are, without a load report; in `RELEASE_PARTS_FILE`
    what pre-training trains beside it (the MLM head, and the decoder where one is given), which
    the RetroMAE classes read back (`AutoModelForMaskedLM` with `trust_remote_code=True`,
    `RetroMAEForPreTraining.from_pretrained`); this code; the family's config.json, whose
    `auto_map` points the encoder classes at this code; and the sentence-transformers files, so
    that `SentenceTransformer(folder)` embeds with the first token as RetroMAE does. A family added
    by `register_family` has no classes in this file: its releases hold no code and no `auto_map`.
    `max_seq_length` is where sentence-transformers truncates inputs (as the positions allow where not given).
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        max_seq_length: int | None = None,
        decoder: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        """`decoder`: the decoder's tensors (`RetroMAEForPreTraining.decoder_weights`), kept beside the MLM head."""
        upload = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "token") if key in kwargs}
        base = family_base_model(self)
        base.save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        if self._auto_class is not None:
            custom_object_save(self, save_directory, config=self.config)
        auto_map = release_auto_map(self.config.model_type)
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as file:
            json.dump(release_config_dict(self.config, type(base).__name__, auto_map), file, indent=2, sort_keys=True)
            file.write("\n")
        write_sentence_transformers_files(save_directory, self.config, max_seq_length)
        parts = self.mlm_head_weights() | (decoder or {})
        if parts:
            save_file(parts, os.path.join(save_directory, RELEASE_PARTS_FILE), metadata={"format": "pt"})
        if push_to_hub:
            self.push_to_hub(upload.pop("repo_id", os.path.basename(os.path.abspath(save_directory))), **upload)

    def mlm_head_weights(self) -> dict[str, torch.Tensor]:
        """The MLM head's own tensors, named as in `RetroMAEForPreTraining` (none without a head)."""
        return {}


def family_base_model(encoder: PreTrainedModel) -> PreTrainedModel:
    """
    The encoder as its family's own base model (`BertModel`, ...), sharing its tensors: the weights of a release.

    Where the family builds a pooler, it is there, as the family initialises it under a fixed
    seed: RetroMAE never trains it (the sentence embedding is the first token's final state), but
    every loader of the family expects it.
    """
    base_class = family_classes(encoder.config.model_type)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = base_class(encoder.config)
    result = base.load_state_dict(encoder.base_model.state_dict(), strict=False, assign=True)
    unfilled = [key for key in result.missing_keys if not key.startswith("pooler.")]
    if unfilled or result.unexpected_keys:
        raise ValueError(f"The encoder does not fit its family's {base_class.__name__}: {(unfilled + result.unexpected_keys)[:3]}.")
    return base.eval()


def read_release_parts(name: str | os.PathLike, **hub) -> dict[str, torch.Tensor]:
    """The tensors of a release's `RELEASE_PARTS_FILE` (MLM head and decoder), or none where it has no such file."""
    path = cached_file(str(name), RELEASE_PARTS_FILE, _raise_exceptions_for_missing_entries=False, **hub)
    if not path:
        return {}
    try:
        return load_file(path)
    except Exception as error:  # safetensors' own error type has no common base with OSError
        raise OSError(f"its {RELEASE_PARTS_FILE} is not a safetensors file ({error}).") from error


@contextlib.contextmanager
def quiet_loading():
    """Hold back transformers' warnings (its load report among them) where the caller says itself what loading did."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def family_classes(model_type: str) -> tuple[type, type]:
    """The family's base model class (`BertModel`, ...) and its masked-LM class (`BertForMaskedLM`, ...) in transformers."""
    config_class = CONFIG_MAPPING[model_type]
    return MODEL_MAPPING[config_class], MODEL_FOR_MASKED_LM_MAPPING[config_class]


def builds_pooler(model_type: str) -> bool:
    """Whether the family's base model builds a pooler unless told `add_pooling_layer=False` (BERT, RoBERTa, ...)."""
    return "add_pooling_layer" in family_classes(model_type)[0].__init__.__code__.co_varnames


def family_config(config: PreTrainedConfig, model_type: str) -> PreTrainedConfig:
    """
    The config a released encoder class of `model_type` is built from: the family's own as it is,
    or a `RetroMAEConfig`'s encoder carrying RetroMAE's settings (as earlier versions built encoders).
    """
    if not isinstance(config, RetroMAEConfig):
        return config
    if config.encoder.model_type != model_type:
        raise ValueError(f"This class is a {model_type!r} encoder; the RetroMAEConfig describes a {config.encoder.model_type!r} one.")
    encoder = copy.deepcopy(config.encoder)
    for name in RETROMAE_FIELDS:
        setattr(encoder, name, getattr(config, name))
    return encoder


class RetroMAEEncoderModel(RetroMAEReleasedEncoder):
    """
    The RetroMAE encoder of a family without its MLM head: what `AutoModel` gives with `trust_remote_code=True`.

    Each family declares one, `class RetroMAE<Base>(RetroMAEEncoderModel, <Base>)`, its base model
    class last: that base model without a pooler, whose `forward` takes the family's arguments (its
    signature, which transformers reads: `main_input_name`, the Trainer's `remove_unused_columns`)
    and returns the sentence embedding as well (paper §3.2). Parameter names are the family's, so its
    checkpoints load into it and it saves as one of them. Releases also hold an MLM head, BERT
    checkpoints a pooler: loading skips those quietly.
    """

    _auto_class = "AutoModel"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = cls.__bases__[-1]
        cls._keys_to_ignore_on_load_unexpected = [rf"^(?!{base.base_model_prefix}\.)", r"pooler\."]

        def forward(self, *args, **kwargs):
            return RetroMAEEncoderModel.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(base.forward).replace(return_annotation=RetroMAEModelOutput)
        forward.__doc__ = RetroMAEEncoderModel.forward.__doc__
        cls.forward = forward

    def __init__(self, config: PreTrainedConfig, **kwargs):
        model_type = self.config_class.model_type
        without_pooler = {"add_pooling_layer": False} if builds_pooler(model_type) else {}
        super().__init__(family_config(config, model_type), **without_pooler, **kwargs)

    def forward(self, *args, **kwargs: Unpack[TransformersKwargs]) -> RetroMAEModelOutput:
        """The family's base model's outputs, and the sentence embedding: the final state at the first token."""
        outputs = super().forward(*args, **(kwargs | {"return_dict": True}))
        if kwargs.get("return_dict") is False:
            return (outputs.last_hidden_state, outputs.last_hidden_state[:, 0])
        return RetroMAEModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            sentence_embedding=outputs.last_hidden_state[:, 0],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class RetroMAEEncoderForMaskedLM(RetroMAEReleasedEncoder):
    """
    The RetroMAE encoder of a family with its MLM head, the layout of a release: what `AutoModelForMaskedLM`
    gives with `trust_remote_code=True`.

    Each family declares one, `class RetroMAE<...ForMaskedLM>(RetroMAEEncoderForMaskedLM, <...ForMaskedLM>)`:
    the family's own masked-LM model. Pre-training checkpoints of earlier versions also hold the
    decoder, BERT checkpoints a pooler: loading skips those quietly.
    """

    _auto_class = "AutoModelForMaskedLM"
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.layers\.", r"pooler\."]

    def __init__(self, config: PreTrainedConfig, **kwargs):
        super().__init__(family_config(config, self.config_class.model_type), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """The family's checkpoint; a release's MLM head, kept in its `RELEASE_PARTS_FILE`, is read from there."""
        head = release_part(read_release_parts(pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_ARGUMENTS if k in kwargs}), "encoder")
        if not head:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        with quiet_loading():  # its report would call the head missing: it is filled below
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        model.load_state_dict(head, strict=False)
        info["missing_keys"] = set(info["missing_keys"]) - set(head)
        if info["missing_keys"] or info["unexpected_keys"]:
            logger.warning(f"{pretrained_model_name_or_path}: missing {sorted(info['missing_keys'])}, unexpected {sorted(info['unexpected_keys'])}.")
        return (model, info) if wants_info else model

    def mlm_head_weights(self) -> dict[str, torch.Tensor]:
        """The MLM head's own tensors (not the word embeddings it is tied to), named as in `RetroMAEForPreTraining`."""
        prefix, tied = f"{self.base_model_prefix}.", self.get_input_embeddings().weight.data_ptr()
        return {f"encoder.{key}": tensor.clone() for key, tensor in self.state_dict().items() if not key.startswith(prefix) and tensor.data_ptr() != tied}


def release_part(parts: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """The tensors of one module of a release's parts (`"encoder"`: the MLM head; `"decoder"`), named as in that module."""
    return {key.removeprefix(f"{module}."): tensor for key, tensor in parts.items() if key.startswith(f"{module}.")}


# The encoder classes of the families of `ENCODER_FAMILIES`, the names a release's `auto_map` gives.
# The paper's BERT keeps the names `RetroMAEModel` and `RetroMAEForMaskedLM`; the other families'
# classes are named after their own.


class RetroMAEModel(RetroMAEEncoderModel, BertModel):
    """BERT's (the paper's) RetroMAE encoder: a `BertModel` without a pooler, returning the sentence embedding."""


class RetroMAEForMaskedLM(RetroMAEEncoderForMaskedLM, BertForMaskedLM):
    """BERT's (the paper's) RetroMAE encoder with its MLM head: a `BertForMaskedLM`, the layout of a release."""


class RetroMAERobertaModel(RetroMAEEncoderModel, RobertaModel):
    """RoBERTa's RetroMAE encoder: a `RobertaModel` without a pooler, returning the sentence embedding."""


class RetroMAERobertaForMaskedLM(RetroMAEEncoderForMaskedLM, RobertaForMaskedLM):
    """RoBERTa's RetroMAE encoder with its MLM head: a `RobertaForMaskedLM`, the layout of a release."""


class RetroMAEXLMRobertaModel(RetroMAEEncoderModel, XLMRobertaModel):
    """XLM-RoBERTa's RetroMAE encoder: a `XLMRobertaModel` without a pooler, returning the sentence embedding."""


class RetroMAEXLMRobertaForMaskedLM(RetroMAEEncoderForMaskedLM, XLMRobertaForMaskedLM):
    """XLM-RoBERTa's RetroMAE encoder with its MLM head: a `XLMRobertaForMaskedLM`, the layout of a release."""


class RetroMAEModernBertModel(RetroMAEEncoderModel, ModernBertModel):
    """ModernBERT's RetroMAE encoder: a `ModernBertModel` without a pooler, returning the sentence embedding."""


class RetroMAEModernBertForMaskedLM(RetroMAEEncoderForMaskedLM, ModernBertForMaskedLM):
    """ModernBERT's RetroMAE encoder with its MLM head: a `ModernBertForMaskedLM`, the layout of a release."""


class RetroMAEDebertaV2Model(RetroMAEEncoderModel, DebertaV2Model):
    """DeBERTa-v2's (and v3's) RetroMAE encoder: a `DebertaV2Model` without a pooler, returning the sentence embedding."""


class RetroMAEDebertaV2ForMaskedLM(RetroMAEEncoderForMaskedLM, DebertaV2ForMaskedLM):
    """DeBERTa-v2's (and v3's) RetroMAE encoder with its MLM head: a `DebertaV2ForMaskedLM`, the layout of a release."""


class RetroMAEDistilBertModel(RetroMAEEncoderModel, DistilBertModel):
    """DistilBERT's RetroMAE encoder: a `DistilBertModel` without a pooler, returning the sentence embedding."""


class RetroMAEDistilBertForMaskedLM(RetroMAEEncoderForMaskedLM, DistilBertForMaskedLM):
    """DistilBERT's RetroMAE encoder with its MLM head: a `DistilBertForMaskedLM`, the layout of a release."""


class RetroMAEElectraModel(RetroMAEEncoderModel, ElectraModel):
    """ELECTRA's RetroMAE encoder: a `ElectraModel` without a pooler, returning the sentence embedding."""


class RetroMAEElectraForMaskedLM(RetroMAEEncoderForMaskedLM, ElectraForMaskedLM):
    """ELECTRA's RetroMAE encoder with its MLM head: a `ElectraForMaskedLM`, the layout of a release."""


RELEASED_ENCODERS = {
    "bert": (RetroMAEModel, RetroMAEForMaskedLM),
    "roberta": (RetroMAERobertaModel, RetroMAERobertaForMaskedLM),
    "xlm-roberta": (RetroMAEXLMRobertaModel, RetroMAEXLMRobertaForMaskedLM),
    "modernbert": (RetroMAEModernBertModel, RetroMAEModernBertForMaskedLM),
    "deberta-v2": (RetroMAEDebertaV2Model, RetroMAEDebertaV2ForMaskedLM),
    "distilbert": (RetroMAEDistilBertModel, RetroMAEDistilBertForMaskedLM),
    "electra": (RetroMAEElectraModel, RetroMAEElectraForMaskedLM),
}


def release_auto_map(model_type: str) -> dict | None:
    """The `auto_map` of a release of `model_type`: its two classes in this file; `None` for a family added by `register_family`."""
    model, masked_lm = RELEASED_ENCODERS[model_type]
    if model._auto_class is None:
        return None
    module = __name__.rsplit(".", 1)[-1]
    return {"AutoModel": f"{module}.{model.__name__}", "AutoModelForMaskedLM": f"{module}.{masked_lm.__name__}"}


def registered_release_classes(model_type: str) -> tuple[type, type]:
    """
    The two encoder classes of a family added by `register_family`, made as the ones above are declared.

    No file holds them, so they are not remote code: their releases have no `auto_map` and load
    as the family's own checkpoints, which they are.
    """
    base, masked_lm = family_classes(model_type)
    not_remote_code = {"_auto_class": None, "__module__": __name__}
    return (
        type(f"RetroMAE{base.__name__}", (RetroMAEEncoderModel, base), dict(not_remote_code)),
        type(f"RetroMAE{masked_lm.__name__}", (RetroMAEEncoderForMaskedLM, masked_lm), dict(not_remote_code)),
    )


class RetroMAECheckpointEncoder(RetroMAEPreTrainedModel):
    """
    What `AutoModel` gives for a pre-training checkpoint (with `trust_remote_code=True`): its encoder
    as its family's RetroMAE encoder class, returning the sentence embedding; the decoder is left behind.
    Only `from_pretrained` is used: the class itself is never built.
    """

    with_mlm_head = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        pretraining = RetroMAEForPreTraining.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return pretraining.released_encoder(with_mlm_head=cls.with_mlm_head)


class RetroMAECheckpointMaskedLM(RetroMAECheckpointEncoder):
    """What `AutoModelForMaskedLM` gives for a pre-training checkpoint: its encoder with the MLM head, the layout of a release."""

    with_mlm_head = True


RetroMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "ENCODER_FAMILIES",
    "EncoderFamily",
    "EnhancedDecodingMask",
    # The released classes, two per family of ENCODER_FAMILIES.
    "RetroMAEModel",
    "RetroMAEForMaskedLM",
    "RetroMAERobertaModel",
    "RetroMAERobertaForMaskedLM",
    "RetroMAEXLMRobertaModel",
    "RetroMAEXLMRobertaForMaskedLM",
    "RetroMAEModernBertModel",
    "RetroMAEModernBertForMaskedLM",
    "RetroMAEDebertaV2Model",
    "RetroMAEDebertaV2ForMaskedLM",
    "RetroMAEDistilBertModel",
    "RetroMAEDistilBertForMaskedLM",
    "RetroMAEElectraModel",
    "RetroMAEElectraForMaskedLM",
    "RetroMAEForPreTraining",
    "RetroMAEForPreTrainingOutput",
    "RetroMAELosses",
    "RetroMAEModelOutput",
    "RetroMAEPreTrainedModel",
    "encoder_family",
    "register_family",
    "write_sentence_transformers_files",
]
