"""RetroMAE as a sentence-transformers loss: pre-train a `SentenceTransformer` with `SentenceTransformerTrainer`.

`RetroMAELoss` holds what RetroMAE adds to an encoder: the enhanced decoder and the MLM head
(the checkpoint's own where it has one). The encoder is the model's own transformer, run by the
model itself, so the sentence embedding trained is the one the model embeds with. The masks are
`RetroMAECollator`'s, drawn from the token ids the trainer hands over, and the losses are
`RetroMAEForPreTraining.pretraining_losses`'s, from the model's token embeddings (the encoder's final states).

The trainer saves, clips and (in a multi-process job) synchronises the model only:
`loss.checkpoints`, a trainer callback, writes the loss's own weights into every checkpoint,
reads them back when a run resumes, averages their gradients across processes as DDP averages
the model's, and clips their gradient norm.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .collator import RetroMAECollator
from .configuration_retromae import RetroMAEConfig
from .citations import citations
from .model_folder import quiet_loading
from .modeling_retromae import RetroMAEForPreTraining, encoder_family, max_tokens


LOSS_FOLDER = "retromae_loss"
LOSS_WEIGHTS = "model.safetensors"


class RetroMAELoss(nn.Module):
    """
    The RetroMAE objective for a `SentenceTransformer` with first-token (CLS) pooling.

    Args:
        model: the SentenceTransformer to pre-train: a transformer of a supported family
            (`ENCODER_FAMILIES`) and CLS pooling, nothing after it.
        encoder_mask_ratio, decoder_mask_ratio, num_decoder_layers, decoder_mask_patterns: RetroMAE's
            settings, as `RetroMAEConfig` documents, defaults and checks them.
        seed: seeds the masks as `RetroMAECollator` does; `None` draws them from torch's
            generator, which the trainer seeds and restores on resume.
        objective, bow_loss_weight: `"retromae"` (the paper's) or `"dupmae"` (RetroMAE v2, which
            adds the bag-of-words loss at `bow_loss_weight`), as for `RetroMAEConfig`.

    Every text of the dataset's single column is one example. The loss returns
    `{"encoder_loss", "decoder_loss"}`, and for DupMAE `"bow_loss"` already multiplied by
    `bow_loss_weight`, which the trainer sums and logs one by one. Pass
    `callbacks=[loss.checkpoints]` to the trainer so that checkpoints hold the decoder and the
    MLM head, a resumed run carries on from them, and their gradients are averaged across the
    processes of a distributed job (torchrun, accelerate launch) and clipped as the model's are.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        encoder_mask_ratio: float = RetroMAEConfig.encoder_mask_ratio,
        decoder_mask_ratio: float = RetroMAEConfig.decoder_mask_ratio,
        num_decoder_layers: int = RetroMAEConfig.num_decoder_layers,
        decoder_mask_patterns: int = RetroMAEConfig.decoder_mask_patterns,
        seed: int | None = None,
        objective: str = "retromae",
        bow_loss_weight: float = 0.1,
    ):
        super().__init__()
        backbone = check_model(model)
        self.model = model
        config = RetroMAEConfig(
            encoder=backbone.config,
            encoder_mask_ratio=encoder_mask_ratio,
            decoder_mask_ratio=decoder_mask_ratio,
            num_decoder_layers=num_decoder_layers,
            decoder_mask_patterns=decoder_mask_patterns,
            objective=objective,
            bow_loss_weight=bow_loss_weight,
            attn_implementation=backbone.config._attn_implementation,
        )
        max_length = min(model.max_seq_length or max_tokens(backbone.config), max_tokens(backbone.config))
        self.collator = RetroMAECollator.from_config(config, model.tokenizer, max_length=max_length, seed=seed)
        self.retromae = RetroMAEForPreTraining(config, encoder=masked_lm_around(backbone))
        self.checkpoints = LossCheckpoints(self)

    def forward(self, sentence_features: list[dict], labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if len(sentence_features) != 1:
            raise ValueError(f"RetroMAELoss reads one text column; the dataset has {len(sentence_features)} input columns.")
        features = sentence_features[0]
        if "attention_mask" not in features:
            raise ValueError("RetroMAELoss needs padded inputs with an attention mask: set `model[0].unpad_inputs = False`.")
        batch = self.masked_batch(features)
        passed_on = {name: value for name, value in features.items() if not isinstance(value, torch.Tensor)}  # e.g. the modality
        encoded = self.model(passed_on | {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in batch})
        losses = self.retromae.pretraining_losses(encoded["token_embeddings"], batch)  # sentence_embedding is their first row
        terms = {"encoder_loss": losses.encoder_loss, "decoder_loss": losses.decoder_loss}
        if losses.bow_loss is not None:
            terms["bow_loss"] = self.retromae.config.bow_loss_weight * losses.bow_loss
        return terms

    def masked_batch(self, features: dict) -> dict[str, torch.Tensor]:
        """The collator's batch for the texts the trainer tokenised, on the model's device, with the encoder's input under the model's names."""
        device = features["input_ids"].device
        ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"].cpu(), features["attention_mask"].cpu())]
        batch = {name: tensor.to(device) for name, tensor in self.collator(ids).items()}
        batch["input_ids"], batch["attention_mask"] = batch["encoder_input_ids"], batch["encoder_attention_mask"]
        if "token_type_ids" in features:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch

    @property
    def citation(self) -> str:
        """The papers (RetroMAE's, and DupMAE's for its objective), for the model card sentence-transformers writes."""
        return "\n\n".join(citations(self.retromae.config.objective))

    def get_config_dict(self) -> dict:
        config = self.retromae.config
        return {name: getattr(config, name) for name in ("encoder_mask_ratio", "decoder_mask_ratio", "num_decoder_layers", "decoder_mask_patterns", "objective", "bow_loss_weight")}

    def own_parameters(self) -> dict[str, nn.Parameter]:
        """The loss's parameters that the model does not hold: the decoder and the MLM head (the head's tied weights excepted)."""
        held = {id(parameter) for parameter in self.model.parameters()}
        return {name: parameter for name, parameter in self.retromae.named_parameters() if id(parameter) not in held}

    def save(self, folder: str | os.PathLike) -> None:
        """Write the loss's own weights to `folder/retromae_loss/` (safetensors, through a temporary name)."""
        target = Path(folder) / LOSS_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        staging = target / f".{LOSS_WEIGHTS}.tmp"
        save_file({name: parameter.detach().contiguous().cpu() for name, parameter in self.own_parameters().items()}, staging)
        staging.replace(target / LOSS_WEIGHTS)

    def load(self, folder: str | os.PathLike) -> None:
        """Read the loss's own weights back from `folder/retromae_loss/`, in place (the optimiser keeps its parameters)."""
        path = Path(folder) / LOSS_FOLDER / LOSS_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no RetroMAELoss weights ({LOSS_FOLDER}/{LOSS_WEIGHTS}): it was saved without "
                "`callbacks=[loss.checkpoints]`, so its decoder is lost; resume from a checkpoint saved with it, or start anew."
            )
        parameters = self.own_parameters()
        saved = load_file(path)
        if set(saved) != set(parameters):
            raise ValueError(f"{path} holds the weights of another RetroMAELoss (other decoder layers or encoder family).")
        with torch.no_grad():
            for name, tensor in saved.items():
                parameters[name].copy_(tensor)


class LossCheckpoints(TrainerCallback):
    """
    What the trainer does for the model, done for a `RetroMAELoss`'s own weights (the decoder and the head).

    They are saved with every checkpoint and restored on resume. Before each optimiser step their
    gradients are averaged across processes (the trainer's DDP wraps the model, not the loss) and
    their norm is clipped at `max_grad_norm`, apart from the model's, which the trainer clips. The
    collator is told each epoch.
    """

    def __init__(self, loss: RetroMAELoss):
        self.loss = [loss]  # in a list: not a submodule of the loss it belongs to

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.loss[0].load(checkpoint_folder(args, state))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.loss[0].collator.set_epoch(int(state.epoch or 0))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        parameters = list(self.loss[0].own_parameters().values())
        average_gradients(parameters)
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.loss[0].save(checkpoint_folder(args, state))


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """
    Replace the gradients of `parameters` by their mean over the processes of a distributed job, in
    one all-reduce, as DDP does for the model's; nothing in one process. A parameter without a
    gradient counts as a zero one, so that every process reduces the same buffer.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    gradients = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters]
    flat = torch.cat([gradient.flatten() for gradient in gradients])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for parameter, mean in zip(parameters, flat.split([gradient.numel() for gradient in gradients])):
        parameter.grad = mean.view_as(parameter)


def checkpoint_folder(args, state) -> Path:
    """The trainer's checkpoint folder of the current step."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def check_model(model: SentenceTransformer) -> PreTrainedModel:
    """The model's transformer backbone, after checking that its embedding is the first token's final state."""
    modules = list(model)
    if not modules or not isinstance(modules[0], Transformer):
        raise ValueError("RetroMAELoss pre-trains a SentenceTransformer whose first module is a Transformer.")
    backbone = modules[0].auto_model
    encoder_family(backbone.config.model_type)
    after = [describe(module) for module in modules[1:]]
    if after != ["Pooling(cls)"]:
        raise ValueError(
            "RetroMAELoss trains the sentence embedding RetroMAE defines, the first token's final state: the model must be "
            f"a Transformer followed by Pooling(pooling_mode='cls') and nothing else, and it has {', '.join(after) or 'no pooling'}. "
            "Build it with `SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode='cls')])`."
        )
    return backbone


def describe(module: nn.Module) -> str:
    """A module's class, with its modes for a pooling module: `Pooling(cls)`, `Pooling(mean)`, `Normalize`."""
    if not isinstance(module, Pooling):
        return type(module).__name__
    modes = module.pooling_mode
    return f"Pooling({modes if isinstance(modes, str) else ', '.join(modes)})"


def masked_lm_around(backbone: PreTrainedModel) -> PreTrainedModel:
    """
    The family's `...ForMaskedLM` whose base model is `backbone` itself, so that both train one encoder.

    Its MLM head comes from the backbone's checkpoint where it has one and starts fresh
    otherwise, as `retromae pretrain` does. The head's output layer takes the backbone's word
    embeddings wherever the family ties the two.
    """
    with quiet_loading():
        try:
            masked_lm = AutoModelForMaskedLM.from_pretrained(backbone.name_or_path, config=backbone.config)
        except (OSError, ValueError):
            masked_lm = AutoModelForMaskedLM.from_config(backbone.config)
    replaced = masked_lm.get_input_embeddings().weight
    setattr(masked_lm, masked_lm.base_model_prefix, backbone)
    for module in masked_lm.modules():
        if getattr(module, "weight", None) is replaced:
            module.weight = backbone.get_input_embeddings().weight
    return masked_lm.to(backbone.device)
