"""Tiny random checkpoints of every masked-LM family of `ENCODER_FAMILIES`, built offline, and of MPNet, a family outside it.

Each family gets a tokenizer of its own kind (WordPiece, byte-level BPE or SentencePiece-style Unigram),
trained by the `tokenizers` library on `CORPUS` and wrapped in the transformers class that the family's
real checkpoints load as, and a 2-layer, 32-wide random model saved with the family's own class. The
tests use them to run the code on every architecture without the Hub.

What differs between the families is one table, `TINY_FAMILIES`, as in the package; `FAMILIES` are its model
types, which tests/test_families.py holds equal to `ENCODER_FAMILIES`. It must not import `retromae`: subprocesses
that load checkpoints without `retromae` use it too.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram, WordPiece
from tokenizers.trainers import BpeTrainer, UnigramTrainer, WordPieceTrainer
from transformers import (
    CONFIG_MAPPING,
    AutoModel,
    AutoModelForMaskedLM,
    BertTokenizer,
    DebertaV2Tokenizer,
    DistilBertTokenizer,
    MPNetTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    RobertaTokenizer,
    TokenizersBackend,
    XLMRobertaTokenizer,
)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unbelievably, hyper-parameters matter more than most people expect.",
    "RetroMAE pre-trains retrieval-oriented encoders with a masked auto-encoder.",
    "A shallow decoder reconstructs the sentence from a single embedding.",
    "Dense retrieval maps queries and passages into the same vector space.",
    "Tokenization splits uncommon words, like antidisestablishmentarianism, into pieces.",
    "She said: \"Don't forget the well-known state-of-the-art baselines!\"",
    "In 2019, researchers released BERT-style models trained on Wikipedia.",
    "What is the capital of France? Paris, of course.",
    "The incomprehensibility of the instructions was, frankly, overwhelming.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose.",
    "Thermodynamically speaking, entropy never decreases in an isolated system.",
    "He re-read the counter-intuitive proof three times before understanding it.",
    "Electroencephalography records the electrical activity of the brain.",
    "My grandmother's recipe calls for two cups of flour and a pinch of salt.",
    "The committee postponed the decision until further notice.",
    "Is it raining? Take an umbrella; the forecast looks unreliable.",
    "Microarchitectural optimizations improved throughput by thirty percent.",
    "A long-distance runner trains for months before a marathon.",
    "Characteristically, the professor answered a question with another question.",
    "The museum's collection includes paintings, sculptures and manuscripts.",
    "Neural networks approximate functions by composing simple nonlinear layers.",
    "Unsurprisingly, the self-driving prototype struggled in heavy snow.",
    "They walked along the riverbank, talking about everything and nothing.",
    "Interdisciplinary collaboration accelerates scientific breakthroughs.",
    "Please return the library books by Friday, or pay a small fine.",
    "The mitochondria is often called the powerhouse of the cell.",
    "Contrastive learning pulls positive pairs together and pushes negatives apart.",
    "Her well-organized notes were surprisingly easy to follow.",
    "The orchestra tuned their instruments before the overture began.",
    "Misunderstandings multiplied as the conversation became increasingly heated.",
    "A fine-tuned encoder outperformed the zero-shot baseline on every benchmark.",
    "The old lighthouse keeper watched ships pass through the narrow strait.",
    "Quantum entanglement puzzled physicists for much of the twentieth century.",
    "Don't count your chickens before they hatch, the farmer warned.",
    "Semi-supervised methods combine labelled and unlabelled examples.",
    "The bakery on the corner sells croissants, baguettes and sourdough bread.",
    "Overfitting happens when a model memorizes noise instead of patterns.",
    "The mountaineers reached the summit just before the storm arrived.",
    "Internationalization requires handling many scripts and character sets.",
    "Why do cats knock things off tables? Nobody really knows.",
    "The legislation was controversial, yet it passed with bipartisan support.",
    "Gradient descent takes small steps against the direction of the gradient.",
    "Her great-grandfather emigrated across the ocean a century ago.",
    "Reproducibility depends on fixed random seeds and documented hyper-parameters.",
    "The children built an enormous sandcastle at low tide.",
    "Counterfactual reasoning asks what would have happened otherwise.",
    "Rain, wind and hail battered the coastline throughout the night.",
    "Search engines rank documents by their estimated relevance to a query.",
    "Finally, the experiment confirmed the hypothesis beyond reasonable doubt.",
]

VOCAB_SIZE = 400  # Of every tokenizer, special tokens included.
MAX_LENGTH = 128  # Usable positions of every tiny model, and the tokenizers' model_max_length.

# Special tokens by role that several families share (`TinyFamily.specials`). A token with several roles
# (RoBERTa's <s> is bos and cls) has one id.
_WORDPIECE_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
_ROBERTA_SPECIALS = {
    "bos_token": "<s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}


def _tokens(specials: dict[str, str]) -> list[str]:
    """The special tokens of a family's `specials`, in id order."""
    return list(dict.fromkeys(specials.values()))


def _train(model, trainer, pipeline: Tokenizer, pre_tokenizer=None) -> dict:
    """Train `model` on CORPUS behind `pipeline`'s normalizer and pre-tokenizer; return its JSON form.

    Training behind the very pipeline that the transformers class rebuilds on loading keeps the learnt
    vocabulary consistent with how the saved tokenizer splits text. `pre_tokenizer`, if given, further
    splits the words for training only.
    """
    backend = Tokenizer(model)
    backend.normalizer = pipeline.normalizer
    backend.pre_tokenizer = pipeline.pre_tokenizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pipeline.pre_tokenizer, pre_tokenizer])
    backend.train_from_iterator(CORPUS, trainer)
    return json.loads(backend.to_str())["model"]


def _wordpiece(tokenizer_class: type, specials: dict[str, str]) -> PreTrainedTokenizerBase:
    """A lowercasing BERT WordPiece tokenizer (`##` continuations).

    The trainer numbers the `##` forms of the characters in a random (hash) order, and breaks ties between
    merges by those numbers, so the vocabulary itself would vary from run to run. Listing every `##c` up
    front, after the special tokens, fixes their numbers and hence the vocabulary.
    """
    pipeline = tokenizer_class(**specials).backend_tokenizer
    characters = sorted({c for text in CORPUS for c in pipeline.normalizer.normalize_str(text) if not c.isspace()})
    trainer = WordPieceTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_tokens(specials) + [f"##{c}" for c in characters],
        show_progress=False,
    )
    vocab = _train(WordPiece(unk_token=specials["unk_token"]), trainer, pipeline)["vocab"]
    return tokenizer_class(vocab=vocab, **specials)


def _roberta(specials: dict[str, str]) -> PreTrainedTokenizerBase:
    """A RoBERTa byte-level BPE tokenizer (`Ġ` marks a word start)."""
    pipeline = RobertaTokenizer(**specials).backend_tokenizer
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_tokens(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model = _train(BPE(), trainer, pipeline)
    return RobertaTokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]], **specials)


def _unigram(tokenizer_class: type, specials: dict[str, str]) -> PreTrainedTokenizerBase:
    """A SentencePiece-style Unigram tokenizer (`▁` marks a word start), for XLM-RoBERTa or DeBERTa-v2.

    Like SentencePiece, which splits words where the Unicode script changes, it learns no piece across
    punctuation: "hyper-parameters" is not one piece.
    """
    pipeline = tokenizer_class(**specials).backend_tokenizer
    special_tokens = _tokens(specials)
    trainer = UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        unk_token=specials["unk_token"],
        show_progress=False,
    )
    vocab = _train(Unigram(), trainer, pipeline, pre_tokenizers.Punctuation())["vocab"]
    pieces = _stable_pieces([tuple(piece) for piece in vocab[len(special_tokens) :]])
    return tokenizer_class(vocab=[(token, 0.0) for token in special_tokens] + pieces, **specials)


def _stable_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The Unigram trainer's pieces, with the scores and order it leaves to chance made deterministic.

    The trainer puts back the characters that training dropped with the scores floor + k * 1e-4
    (k = 0, 1, ...), taking the characters in hash order: they get these scores in alphabetical order
    instead. Its other scores vary in their last bits: they are rounded. Ties are sorted by piece.
    """
    floor = min(score for _, score in pieces)
    steps = {piece: (score - floor) / 1e-4 for piece, score in pieces}
    put_back = sorted(piece for piece, step in steps.items() if len(piece) == 1 and abs(step - round(step)) < 1e-6)
    scores = dict(pieces) | {piece: floor + k * 1e-4 for k, piece in enumerate(put_back)}
    return sorted(((piece, round(score, 6)) for piece, score in scores.items()), key=lambda p: (-p[1], p[0]))


def _modernbert(specials: dict[str, str]) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer built like ModernBERT's (OLMo's BPE, BERT's special tokens).

    ModernBERT has no tokenizer class of its own: transformers loads its tokenizer.json as is into a
    `TokenizersBackend`, so the whole pipeline, post-processor included, is set here.
    """
    special_tokens = _tokens(specials)
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    cls, sep = specials["cls_token"], specials["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, special_tokens.index(cls)), (sep, special_tokens.index(sep))],
    )
    return TokenizersBackend(tokenizer_object=backend, **specials)


# What a tiny model of every family is made of: a 2-layer, 32-wide, 4-head configuration without dropout, for
# 128-token inputs, and its own kind of tokenizer.
_BERT_LIKE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": MAX_LENGTH,
}


@dataclass(frozen=True)
class TinyFamily:
    """
    How the tests make a family's tiny checkpoint, and what they expect of it.

    Args:
        specials: its special tokens by role, in id order from 0 (in the real checkpoints' relative order).
        tokenizer: trains a tokenizer of the family's kind on CORPUS, given `specials`.
        word_pieces: the tokenizer's kind of word boundaries: "continuations" (WordPiece's `##`), or "word starts"
            (byte-level BPE's `Ġ`, SentencePiece's `▁`), where words run between spaces.
        layer: the layer its base model repeats, which FSDP shards one by one.
        config: the configuration's fields, besides the vocabulary size and the special tokens' ids.
        rotary: whether it has no absolute position table, so that RetroMAE's decoder rotates its queries and keys.
    """

    specials: dict[str, str]
    tokenizer: Callable[[dict[str, str]], PreTrainedTokenizerBase]
    word_pieces: str
    layer: str
    config: dict
    rotary: bool = False


TINY_FAMILIES = {
    "bert": TinyFamily(_WORDPIECE_SPECIALS, partial(_wordpiece, BertTokenizer), "continuations", "BertLayer", _BERT_LIKE),
    # RoBERTa and XLM-RoBERTa number positions from padding_idx + 1, <pad> being 1.
    "roberta": TinyFamily(
        _ROBERTA_SPECIALS, _roberta, "word starts", "RobertaLayer", {**_BERT_LIKE, "max_position_embeddings": MAX_LENGTH + 2}
    ),
    "xlm-roberta": TinyFamily(
        _ROBERTA_SPECIALS,
        partial(_unigram, XLMRobertaTokenizer),
        "word starts",
        "XLMRobertaLayer",
        {**_BERT_LIKE, "max_position_embeddings": MAX_LENGTH + 2},
    ),
    # ModernBERT's configs give bos/eos the ids of [CLS]/[SEP]. Layer 0 attends globally, layer 1 within a 16-token window.
    "modernbert": TinyFamily(
        {
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "bos_token": "[CLS]",
            "sep_token": "[SEP]",
            "eos_token": "[SEP]",
            "pad_token": "[PAD]",
            "mask_token": "[MASK]",
        },
        _modernbert,
        "word starts",
        "ModernBertEncoderLayer",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": MAX_LENGTH,
            "local_attention": 16,
            "global_attn_every_n_layers": 2,
            "attention_dropout": 0.0,
            "embedding_dropout": 0.0,
            "mlp_dropout": 0.0,
            "classifier_dropout": 0.0,
        },
        rotary=True,
    ),
    # As DeBERTa-v3, whose tokenizer names bos/eos [CLS]/[SEP].
    "deberta-v2": TinyFamily(
        {
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "bos_token": "[CLS]",
            "sep_token": "[SEP]",
            "eos_token": "[SEP]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        },
        partial(_unigram, DebertaV2Tokenizer),
        "word starts",
        "DebertaV2Layer",
        {
            **_BERT_LIKE,
            "relative_attention": True,
            "position_buckets": 64,
            "position_biased_input": False,
            "pos_att_type": ["p2c", "c2p"],
            "type_vocab_size": 0,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "pooler_dropout": 0.0,
        },
        rotary=True,
    ),
    # DistilBERT's tokenizer returns no token_type_ids.
    "distilbert": TinyFamily(
        _WORDPIECE_SPECIALS,
        partial(_wordpiece, DistilBertTokenizer),
        "continuations",
        "TransformerBlock",
        {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 64,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "qa_dropout": 0.0,
            "seq_classif_dropout": 0.0,
            "max_position_embeddings": MAX_LENGTH,
        },
    ),
    "electra": TinyFamily(
        _WORDPIECE_SPECIALS,
        partial(_wordpiece, BertTokenizer),
        "continuations",
        "ElectraLayer",
        {**_BERT_LIKE, "embedding_size": 32, "summary_last_dropout": 0.0},
    ),
}
FAMILIES = tuple(TINY_FAMILIES)

# A masked-LM family outside `ENCODER_FAMILIES`, which docs/families.md adds with `register_family`. Its
# embeddings number positions from padding_idx + 1 = 2, whatever the config says (<pad> is 1 here too).
UNLISTED_FAMILIES = {
    "mpnet": TinyFamily(
        _ROBERTA_SPECIALS | {"unk_token": "[UNK]"},
        partial(_wordpiece, MPNetTokenizer),
        "continuations",
        "MPNetLayer",
        {**_BERT_LIKE, "max_position_embeddings": MAX_LENGTH + 2},
    ),
}


def tiny_family(family: str) -> TinyFamily:
    """The row of `TINY_FAMILIES` (or `UNLISTED_FAMILIES`) of `family`."""
    rows = TINY_FAMILIES | UNLISTED_FAMILIES
    if family not in rows:
        raise ValueError(f"unknown family {family!r}, expected one of {tuple(rows)}")
    return rows[family]


def build_tokenizer(family: str, folder: Path) -> PreTrainedTokenizerBase:
    """Train a tokenizer of the family's kind on CORPUS, save it to `folder` and return it.

    Training is deterministic, so a family always gets the same vocabulary. Its special tokens take the
    first ids, in the order of its `specials`, which `tiny_config` relies on.
    """
    row = tiny_family(family)
    tokenizer = row.tokenizer(row.specials)
    tokenizer.model_max_length = MAX_LENGTH
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(family: str, vocab_size: int, **overrides) -> PreTrainedConfig:
    """The family's tiny configuration (`TinyFamily.config`), for a vocabulary of `vocab_size`.

    Its special token ids (pad, bos, eos, cls, sep, where the configuration has such fields) are those of
    `build_tokenizer`'s tokenizer. `overrides` are passed to the configuration last.
    """
    config_class, row = CONFIG_MAPPING[family], tiny_family(family)
    specials = _tokens(row.specials)
    token_ids = {f"{role}_id": specials.index(token) for role, token in row.specials.items() if hasattr(config_class, f"{role}_id")}
    return config_class(**{"vocab_size": vocab_size, **row.config, **token_ids, **overrides})


def build_checkpoint(family: str, folder: Path, layout: str = "masked_lm", seed: int = 0) -> Path:
    """Save a tiny random checkpoint of the family, and its tokenizer, to `folder`; return `folder`.

    `layout` "masked_lm" saves the family's masked-LM class (BertForMaskedLM, ...), "base" its bare
    encoder class (BertModel, ...). The weights depend on `seed` only.
    """
    model_class = {"masked_lm": AutoModelForMaskedLM, "base": AutoModel}[layout]
    tokenizer = build_tokenizer(family, folder)
    torch.manual_seed(seed)
    model_class.from_config(tiny_config(family, len(tokenizer))).save_pretrained(folder)
    return Path(folder)
