"""Turning text into a RetroMAE pre-training batch: the tensors `RetroMAEForPreTraining` reads.

The masking follows the paper (§3.2-3.3) and the authors' code: whole words are masked, never
the special tokens ([CLS]/<s>, [SEP]/</s>) or padding; the encoder's chosen tokens are replaced
BERT-style; every row of the enhanced-decoding mask hides an aggressive whole-word pattern and its
own position: a pattern of its own up to `decoder_mask_patterns` tokens, one of a pool of that many
patterns per example beyond. [UNK] stands for text the vocabulary cannot spell, so it is not
special here: as in the authors' code the decoder rebuilds it and its patterns may hide it, and
only the encoder's masking leaves it as it is (transformers' collator, which the authors' code
uses, never masks a special id). A passage of nothing but [UNK] thus still trains the decoder.

The collator draws the encoder's masking and describes the decoder's mask (the words, a seed per
example, the share to hide); the model draws that mask on its own device, a block of rows at a
time, with the same whole-word draw (`WholeWordDraw`), so that a (batch, seq, seq) mask is never
built on the host or sent to the device.

With a seed, a batch's masks are a pure function of (seed, epoch, the batch's tokens): a run
draws the same masks again when it is repeated or resumed from a checkpoint, however the data
loader prefetches, and a new epoch (`set_epoch`) draws new ones.
"""

import hashlib
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .configuration_retromae import RetroMAEConfig, check_settings
from .modeling_retromae import IGNORE_INDEX, WholeWordDraw


class RetroMAECollator:
    """
    Build RetroMAE batches from texts or token ids.

    Args:
        tokenizer: the encoder's tokenizer, with a first token ([CLS] or <s>), a separator and a
            mask token. Words are read from its vocabulary (see `word_start_flags`): WordPiece
            marks continuations (`##`), byte-level BPE (`Ġ`) and SentencePiece (`▁`) mark word starts.
        encoder_mask_ratio, decoder_mask_ratio, enhanced_decoding, decoder_mask_patterns: RetroMAE's
            settings, as `RetroMAEConfig` documents, defaults and checks them; `from_config` takes
            them from the model's config.
        max_length: sequences are truncated to this many tokens, [CLS] and [SEP] included.
        seed: makes masking reproducible: each batch's masks are drawn from a generator seeded
            by (seed, epoch, the batch's token ids). `None` draws from torch's global generator.

    Without enhanced decoding (the paper's ablation) the decoder's input is one copy masked at
    `decoder_mask_ratio` like the encoder's, with labels at its masked tokens.

    An example is a string, a dict with a `text` string or `input_ids`, or a sequence of token
    ids; token ids get [CLS] and [SEP] added when they do not already start and end with them.
    Empty text, non-text input and sequences with nothing but special tokens ([UNK] is text, see
    `special_token_ids`) raise `ValueError` or `TypeError` naming the example.

    Returns a dict of:
        encoder_input_ids (batch, seq), encoder_attention_mask (batch, seq),
        encoder_labels (batch, seq): original ids at masked positions, -100 elsewhere (and at [UNK]);
        decoder_input_ids (batch, seq): the original ids;
        decoder_labels (batch, seq): original ids everywhere except [CLS], [SEP] and padding ([UNK] included);
        decoder_word_ids (batch, seq): the word of each maskable token, -1 at special tokens and padding;
        decoder_mask_seeds (batch,): the seed of each example's enhanced-decoding mask;
        decoder_mask_budget (batch,): the tokens a pattern of that mask hides, round(ratio x maskable tokens);
        decoder_row_patterns (batch, seq): which of the example's patterns each row of the mask takes.
    `EnhancedDecodingMask.from_batch(batch).dense()` gives the (batch, seq, seq) mask itself, True
    where query row i may attend to position j. (Without enhanced decoding the decoder ids are
    masked and labelled like the encoder's, and there is no mask to describe.)
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoder_mask_ratio: float = RetroMAEConfig.encoder_mask_ratio,
        decoder_mask_ratio: float = RetroMAEConfig.decoder_mask_ratio,
        max_length: int = 512,
        seed: int | None = None,
        enhanced_decoding: bool = RetroMAEConfig.enhanced_decoding,
        decoder_mask_patterns: int = RetroMAEConfig.decoder_mask_patterns,
    ):
        check_settings(encoder_mask_ratio=encoder_mask_ratio, decoder_mask_ratio=decoder_mask_ratio, decoder_mask_patterns=decoder_mask_patterns)
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS], a token and [SEP], got {max_length!r}.")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.mask_token_id is None:
            raise ValueError("The tokenizer needs a first token ([CLS] or <s>), a separator ([SEP] or </s>) and a mask token.")
        self.tokenizer = tokenizer
        self.encoder_mask_ratio = encoder_mask_ratio
        self.decoder_mask_ratio = decoder_mask_ratio
        self.max_length = max_length
        self.seed = seed
        self.enhanced_decoding = enhanced_decoding
        self.decoder_mask_patterns = decoder_mask_patterns
        self.epoch = 0
        self.vocab_size = len(tokenizer)
        self.is_special = vocabulary_flags(special_token_ids(tokenizer), self.vocab_size)
        self.is_unknown = vocabulary_flags([tokenizer.unk_token_id] if tokenizer.unk_token_id is not None else [], self.vocab_size)
        self.starts_word = word_start_flags(tokenizer, self.vocab_size)

    @classmethod
    def from_config(cls, config: RetroMAEConfig, tokenizer: PreTrainedTokenizerBase, **kwargs) -> "RetroMAECollator":
        """The collator of the model `config` describes: its mask ratios, enhanced decoding and patterns; `kwargs` as for `__init__`."""
        settings = {name: getattr(config, name) for name in ("encoder_mask_ratio", "decoder_mask_ratio", "enhanced_decoding", "decoder_mask_patterns")}
        return cls(tokenizer, **settings, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Draw new masks for a new pass over the data (as a sampler's `set_epoch` reshuffles)."""
        self.epoch = epoch

    def __call__(self, examples: Sequence) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.pad(self.tokenize(examples))
        word_ids = self.word_ids(input_ids, attention_mask & ~self.is_special[input_ids])  # (batch, seq)
        generator = self.generator_for(input_ids)
        encoder_seeds, decoder_seeds = torch.randint(1 << 32, (2, len(input_ids)), generator=generator)
        encoder_input_ids, encoder_labels = self.mask_tokens(input_ids, word_ids, self.encoder_mask_ratio, encoder_seeds, generator)
        encoder = {
            "encoder_input_ids": encoder_input_ids,
            "encoder_attention_mask": attention_mask.long(),
            "encoder_labels": encoder_labels,
        }
        if not self.enhanced_decoding:
            decoder_input_ids, decoder_labels = self.mask_tokens(input_ids, word_ids, self.decoder_mask_ratio, decoder_seeds, generator)
            return encoder | {"decoder_input_ids": decoder_input_ids, "decoder_labels": decoder_labels}
        return encoder | {
            "decoder_input_ids": input_ids,
            "decoder_labels": input_ids.masked_fill(word_ids < 0, IGNORE_INDEX),
            "decoder_word_ids": word_ids,
            "decoder_mask_seeds": decoder_seeds,
            "decoder_mask_budget": budget(word_ids, self.decoder_mask_ratio),
            "decoder_row_patterns": self.row_patterns(input_ids.shape, generator),
        }

    def row_patterns(self, shape: torch.Size, generator: torch.Generator | None) -> torch.LongTensor:
        """(batch, seq) the pattern each decoder row takes: its own up to `decoder_mask_patterns` rows, one of that many at random beyond."""
        batch_size, seq_length = shape
        if seq_length <= self.decoder_mask_patterns:
            return torch.arange(seq_length).expand(batch_size, -1).contiguous()
        return torch.randint(self.decoder_mask_patterns, shape, generator=generator)

    def generator_for(self, input_ids: torch.LongTensor) -> torch.Generator | None:
        """The generator for one batch: seeded by (seed, epoch, token ids), or `None` for torch's global one."""
        if self.seed is None:
            return None
        key = f"{self.seed}:{self.epoch}".encode()
        digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=key).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def tokenize(self, examples: Sequence) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated to `max_length`; bad examples raise naming their index."""
        if isinstance(examples, (str, Mapping)) or len(examples) == 0:
            raise ValueError("RetroMAECollator takes a non-empty list of examples.")
        texts, sequences = {}, {}
        for index, example in enumerate(examples):
            if isinstance(example, Mapping):
                example = example.get("input_ids", example.get("text"))
            if isinstance(example, str):
                if not example.strip():
                    raise ValueError(f"Example {index} is empty text: there is nothing to reconstruct.")
                texts[index] = example
            elif isinstance(example, (Sequence, torch.Tensor)) and all(isinstance(i, int) for i in list(example)):
                sequences[index] = self._with_special_tokens([int(i) for i in example])
            else:
                raise TypeError(
                    f"Example {index} is a {type(example).__name__}; expected text, token ids, "
                    "or a dict with 'text' or 'input_ids'."
                )
        if texts:
            encoded = self.tokenizer(list(texts.values()), truncation=True, max_length=self.max_length)
            sequences.update(zip(texts, encoded["input_ids"]))
        ordered = [sequences[index] for index in range(len(examples))]
        for index, ids in enumerate(ordered):
            if not any(not self.is_special[i] for i in ids):
                raise ValueError(f"Example {index} holds only special tokens: there is nothing to reconstruct.")
        return ordered

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if not (ids and ids[0] == cls and ids[-1] == sep):
            ids = [cls, *ids, sep]
        if len(ids) > self.max_length:
            ids = ids[: self.max_length - 1] + [sep]
        return ids

    def pad(self, sequences: list[list[int]]) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Right-pad to the longest sequence: (batch, seq) ids and (batch, seq) True = real token."""
        seq_length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), seq_length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), seq_length), dtype=torch.bool)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = True
        return input_ids, attention_mask

    def mask_tokens(
        self,
        input_ids: torch.LongTensor,
        word_ids: torch.LongTensor,
        ratio: float,
        seeds: torch.LongTensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """
        Whole-word masking at `ratio`, chosen tokens 80% [MASK], 10% random, 10% kept; and the labels.

        [UNK] is drawn with the words, as the authors' code draws it, and then left unmasked and
        unlabelled, as transformers' collator leaves every special id.
        """
        drawn = WholeWordDraw(word_ids, seeds, budget(word_ids, ratio)).patterns(torch.zeros(1, dtype=torch.long))[:, 0]
        chosen = drawn & ~self.is_unknown[input_ids]
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        draw = torch.rand(input_ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=generator)
        masked = input_ids.masked_fill(chosen & (draw < 0.8), self.tokenizer.mask_token_id)
        masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
        return masked, labels

    def word_ids(self, input_ids: torch.LongTensor, content: torch.BoolTensor) -> torch.LongTensor:
        """(batch, seq) the index of the word each maskable token belongs to, -1 at special tokens and padding."""
        after_content = torch.nn.functional.pad(content[:, :-1], (1, 0))  # (batch, seq) the previous token is content
        starts = content & (self.starts_word[input_ids] | ~after_content)
        return (starts.long().cumsum(1) - 1).masked_fill(~content, -1)


def budget(word_ids: torch.LongTensor, ratio: float) -> torch.LongTensor:
    """(batch,) tokens a pattern takes at `ratio`: round(ratio x maskable tokens), at least one."""
    return ((word_ids >= 0).sum(1) * ratio).round().long().clamp(min=1)


# How vocabularies mark words: WordPiece marks the tokens that continue a word, byte-level BPE (RoBERTa,
# ModernBERT) and SentencePiece (XLM-RoBERTa, DeBERTa-v3) the tokens that begin one.
CONTINUATION_MARKERS = ("##",)
WORD_START_MARKERS = ("Ġ", "▁")


def word_start_flags(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.BoolTensor:
    """
    (vocab,) True for the tokens that begin a word, read from the vocabulary's markers.

    The marker is the one most of the vocabulary carries: `##` (WordPiece) flags continuations,
    `Ġ` (byte-level BPE) or `▁` (SentencePiece) flag word starts. A token right after a special
    token or at the start always begins a word (`RetroMAECollator.word_ids`), so a text's first
    word counts even without its marker. A vocabulary with none of them has a word per token.
    """
    vocabulary = tokenizer.get_vocab()
    counts = {marker: sum(token.startswith(marker) for token in vocabulary) for marker in CONTINUATION_MARKERS + WORD_START_MARKERS}
    marker = max(counts, key=counts.get)
    if counts[marker] == 0:
        return torch.ones(vocab_size, dtype=torch.bool)
    marked = vocabulary_flags([i for token, i in vocabulary.items() if token.startswith(marker)], vocab_size)
    return ~marked if marker in CONTINUATION_MARKERS else marked


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """
    The ids that are not text: the tokenizer's special tokens except [UNK].

    These are never labelled or masked. [UNK] stands for a word the vocabulary cannot spell
    (an emoji, a 200-character "word"), so the decoder rebuilds it as the authors' code does.
    """
    return [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]


def vocabulary_flags(ids: Sequence[int], vocab_size: int) -> torch.BoolTensor:
    """(vocab,) True at `ids`."""
    flags = torch.zeros(vocab_size, dtype=torch.bool)
    flags[torch.tensor(sorted(ids), dtype=torch.long)] = True
    return flags
