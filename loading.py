"""What a pre-training run starts from: the model (a family's checkpoint, a RetroMAE checkpoint or a fresh
size), its tokenizer, and the attention kernels the encoder and decoder run with."""

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertTokenizer, PreTrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from .configuration_retromae import RetroMAEConfig
from .errors import UsageError, loading
from .model_folder import encoder_config_dict, quiet_loading
from .modeling_retromae import RetroMAEForPreTraining, encoder_family, max_tokens
from .settings import SIZES, PretrainingSettings, demo_model_path


FRESH_PARTS = {"decoder": "the decoder (new in RetroMAE)", "head": "the MLM head (the checkpoint has none)"}
DECODER_ATTENTION_REASON = (
    "its enhanced-decoding mask hides a different whole-word pattern in every row, which flash-attention-2 cannot take "
    "and in which flex attention finds no empty block to skip."
)


# Attention kernels of --attn-implementation, and the flag of the family's ...ForMaskedLM class that says it takes each.
ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "eager": None, "flash_attention_2": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def build_model_and_tokenizer(settings: PretrainingSettings) -> tuple[RetroMAEForPreTraining, PreTrainedTokenizerBase]:
    """The model to pre-train (from --model, or fresh from --config) and its tokenizer."""
    ratios = dict(
        encoder_mask_ratio=settings.encoder_mask_ratio,
        decoder_mask_ratio=settings.decoder_mask_ratio,
        enhanced_decoding=settings.enhanced_decoding,
        decoder_mask_patterns=settings.decoder_mask_patterns,
        objective=settings.objective,
    )
    if settings.bow_loss_weight is not None:
        ratios["bow_loss_weight"] = settings.bow_loss_weight
    torch.manual_seed(settings.seed)  # the fresh parts (all of --config, the decoder from a checkpoint) are drawn from it
    if settings.config:
        tokenizer = load_tokenizer(settings.tokenizer or demo_model_path())
        config = RetroMAEConfig(vocab_size=len(tokenizer), **SIZES[settings.config], **ratios)
        attention = attention_implementations(settings.attn_implementation, config.encoder.to_dict())
        model = RetroMAEForPreTraining._from_config(config, attn_implementation=attention)
    else:
        model = load_base_model(settings.model, settings.attn_implementation, ratios, settings.fresh_decoder)
        tokenizer = load_tokenizer(settings.tokenizer or settings.model)
    vocab_size, positions = model.config.encoder.vocab_size, max_tokens(model.config.encoder)
    if len(tokenizer) > vocab_size:
        raise UsageError(f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of {vocab_size}.")
    if len(tokenizer) < vocab_size // 2:  # transformers makes a tokenizer of the special tokens alone from a bare tokenizer_config.json
        raise UsageError(
            f"--tokenizer {settings.tokenizer or settings.model}: the tokenizer loaded has {len(tokenizer)} tokens for the model's "
            f"vocabulary of {vocab_size}: it is not the model's (a folder with tokenizer_config.json but no vocabulary "
            "file gives one of special tokens alone). Give the tokenizer the model was trained with."
        )
    if settings.max_length > positions:
        raise UsageError(f"--max-length {settings.max_length} exceeds the {positions} tokens the model's positions allow.")
    if settings.attn_implementation in ("flash_attention_2", "flex_attention") and os.environ.get("RANK", "0") == "0":
        print(f"The encoder attends with {settings.attn_implementation}, the decoder with sdpa: {DECODER_ATTENTION_REASON}")
    return model, tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """
    A saved tokenizer, or the bare output of the `tokenizers` library: a folder holding only
    `vocab.txt` (`BertWordPieceTokenizer.save_model`) or `tokenizer.json` (`Tokenizer.save`) is
    read as a BERT WordPiece tokenizer with BERT's special tokens.
    """
    folder = Path(name)
    bare = folder.is_dir() and not (folder / "tokenizer_config.json").is_file()
    if bare and not any((folder / file).is_file() for file in ("vocab.txt", "tokenizer.json")):
        raise UsageError(f"--tokenizer {name}: the folder holds no tokenizer_config.json, vocab.txt or tokenizer.json.")
    with loading("--tokenizer", name):
        tokenizer = (BertTokenizer if bare else AutoTokenizer).from_pretrained(name)
    missing = [kind for kind in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, f"{kind}_id") is None]
    if missing:
        raise UsageError(
            f"--tokenizer {name} has no {', '.join(missing)}: RetroMAE needs a first token ([CLS] or <s>), a separator, a mask and a padding token."
        )
    return tokenizer


def load_base_model(name: str, attn_implementation: str, settings: dict, fresh_decoder: bool = False) -> RetroMAEForPreTraining:
    """
    RetroMAEForPreTraining from a checkpoint of a supported family or a RetroMAE pre-training
    checkpoint, saying in one line what was carried over and what starts fresh (`model.fresh_parts`,
    which the run's record reads): the decoder continues from a checkpoint that has one (a release
    of this package, a pre-training checkpoint) unless `fresh_decoder`.

    transformers' own load report is replaced by that line: it would list every decoder tensor as
    missing and call a checkpoint without an MLM head corrupted. An encoder tensor the checkpoint
    lacks is an error.
    """
    family = encoder_type(name)
    attention = attention_implementations(attn_implementation, encoder_config_dict(checkpoint_config(name)))
    with quiet_loading(), loading("--model", name):
        model, info = RetroMAEForPreTraining.from_pretrained(
            name, attn_implementation=attention, output_loading_info=True, fresh_decoder=fresh_decoder, **settings
        )
    base = f"encoder.{model.encoder.base_model_prefix}."
    missing = set(info["missing_keys"])
    missing_encoder = sorted(key.removeprefix("encoder.") for key in missing if key.startswith(base))
    if missing_encoder:
        raise UsageError(
            f"--model {name}: the checkpoint lacks {len(missing_encoder)} encoder tensors of its {family} "
            f"model ({', '.join(missing_encoder[:3])}, ...): it is not a {family} encoder checkpoint."
        )
    model.fresh_parts = [part for part, prefix in (("decoder", "decoder."), ("head", "encoder.")) if any(k.startswith(prefix) for k in missing)]
    if os.environ.get("RANK", "0") == "0":
        print(load_summary(name, family, model.fresh_parts, info["unexpected_keys"], fresh_decoder))
    return model


def encoder_type(name: str) -> str:
    """The encoder family of a checkpoint (the one inside a RetroMAE pre-training checkpoint); unsupported ones are refused."""
    model_type = encoder_config_dict(checkpoint_config(name))["model_type"]
    try:
        encoder_family(model_type)
    except ValueError as error:
        raise UsageError(f"--model {name}: {error}") from None
    return model_type


def checkpoint_config(name: str) -> dict:
    """A checkpoint's config.json; a folder or Hub id without one naming a `model_type` is a `UsageError`."""
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise UsageError(f"--model {name}: not a model checkpoint (the folder has no config.json).")
    with loading("--model", name):
        config, _ = PreTrainedConfig.get_config_dict(name)
    if not config.get("model_type"):
        raise UsageError(f"--model {name}: not a model checkpoint (no config.json naming a model_type).")
    return config


def supported_attention(model_type: str) -> list[str]:
    """The attention kernels of `ATTENTION_SUPPORT` that the family's transformers model takes (DeBERTa-v2: eager only)."""
    masked_lm = MODEL_FOR_MASKED_LM_MAPPING[CONFIG_MAPPING[model_type]]
    return [name for name, flag in ATTENTION_SUPPORT.items() if flag is None or getattr(masked_lm, flag)]


def attention_implementations(requested: str, encoder: dict) -> dict[str, str]:
    """
    `attn_implementation` for `RetroMAEForPreTraining`: the encoder's kernel (`requested`) and the decoder's ("").

    The decoder runs SDPA under flash and flex attention (see `RetroMAEPreTrainedModel`). The
    default, SDPA, falls back to eager for a family without it; any other kernel a family lacks is
    refused, as are flash-attention-2 without CUDA or the flash-attn package, and flex attention
    without CUDA (torch has no flex backward on CPU) or with attention dropout (transformers' flex
    attention has none).
    """
    model_type = encoder["model_type"]
    supported = supported_attention(model_type)
    if requested not in supported:
        if requested == "sdpa":
            return {"": "eager", "encoder": "eager"}
        raise UsageError(f"--attn-implementation {requested}: the {model_type} family's transformers model takes only {', '.join(supported)}.")
    if requested in ("flash_attention_2", "flex_attention") and not torch.cuda.is_available():
        raise UsageError(f"--attn-implementation {requested} needs a CUDA device, and this machine has none; use sdpa.")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UsageError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa without it.")
    dropout_name = encoder_family(model_type).config_names.get("attention_probs_dropout_prob", "attention_probs_dropout_prob")
    if requested == "flex_attention" and encoder.get(dropout_name, 0.0) > 0:
        raise UsageError(
            f"--attn-implementation flex_attention: transformers' flex attention has no dropout, and the encoder's "
            f"{dropout_name} is {encoder[dropout_name]}; use sdpa, or a checkpoint whose {dropout_name} is 0."
        )
    return {"": "eager" if requested == "eager" else "sdpa", "encoder": requested}


def load_summary(name: str, family: str, fresh: list[str], unexpected: list[str], fresh_decoder: bool = False) -> str:
    """One line: the checkpoint's family, that its encoder was carried over, where the decoder comes from, what else starts fresh, what was left out."""
    decoder = (
        "; decoder initialised afresh (--fresh-decoder)" if fresh_decoder
        else f"; {FRESH_PARTS['decoder']} initialised afresh" if "decoder" in fresh
        else "; decoder from the checkpoint, continued"
    )
    return (
        f"Loaded {name} ({family}): encoder from the checkpoint"
        + decoder
        + "".join(f"; {FRESH_PARTS[part]} initialised afresh" for part in fresh if part != "decoder")
        + (f"; ignored {len(unexpected)} tensors it has and RetroMAE does not use" if unexpected else "")
        + "."
    )
