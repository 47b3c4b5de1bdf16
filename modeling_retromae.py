"""RetroMAE: retrieval-oriented pre-training of a BERT encoder by a masked auto-encoder.

Xiao, Liu, Shao, Cao, "RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked
Auto-Encoder", EMNLP 2022 (arXiv 2205.12035).

One pre-training step, in the order of the paper and of this file:

1. The encoder, a full BERT, reads the input masked at a moderate ratio and is trained by
   masked language modelling (`encoder_loss`).
2. Its final [CLS] state is the sentence embedding `h_X`.
3. The decoder builds two streams from the original, unmasked tokens: the content stream
   `H2` (token embeddings, position 0 replaced by `h_X`) and the query stream `H1`
   (`h_X + p_i` at every position i).
4. Enhanced decoding: one transformer layer in which the query stream attends to the content
   stream under a position-specific mask; row i sees position 0 and a random, aggressive
   subset of the other tokens, never token i itself.
5. The shared MLM head rebuilds every original token from the decoder's output
   (`decoder_loss`). The loss is `encoder_loss + decoder_loss`.

After pre-training the decoder is discarded: the encoder is a plain BERT whose [CLS] state
is used for retrieval, and `save_pretrained` of the encoder classes writes it as a BERT
checkpoint first (config.json of type `bert`, sentence-transformers files for [CLS] pooling),
with this code as an opt-in. This file is Hub remote code: it imports only torch,
transformers and the configuration next to it.
"""

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM, BertModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.processing_utils import Unpack
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertOnlyMLMHead,
    BertOutput,
    BertPreTrainedModel,
)
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_retromae import RetroMAEConfig, release_config_dict


IGNORE_INDEX = -100
# sentence-transformers' files for [CLS] pooling, in the format every version of it reads (and
# text-embeddings-inference and Infinity, which read 1_Pooling/config.json themselves).
SENTENCE_TRANSFORMERS_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


@dataclass
class RetroMAEModelOutput(ModelOutput):
    """
    Output of [`RetroMAEModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, seq, hidden)`):
            The encoder's final hidden states.
        sentence_embedding (`torch.FloatTensor` of shape `(batch, hidden)`):
            The final hidden state at [CLS], the vector used for retrieval (no pooler layer).
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
            `encoder_loss + decoder_loss`, the RetroMAE objective.
        encoder_loss (`torch.FloatTensor` of shape `()`):
            Masked language modelling loss of the encoder on its moderately masked input.
        decoder_loss (`torch.FloatTensor` of shape `()`):
            Reconstruction loss of the enhanced decoder over every non-special token.
        sentence_embedding (`torch.FloatTensor` of shape `(batch, hidden)`):
            The encoder's final [CLS] state.
        encoder_logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`, *optional*):
            MLM head scores on the encoder output, only with `return_logits=True`.
        decoder_logits (`torch.FloatTensor` of shape `(batch, seq, vocab)`, *optional*):
            MLM head scores on the decoder output, only with `return_logits=True`.
    """

    loss: torch.FloatTensor | None = None
    encoder_loss: torch.FloatTensor | None = None
    decoder_loss: torch.FloatTensor | None = None
    sentence_embedding: torch.FloatTensor | None = None
    encoder_logits: torch.FloatTensor | None = None
    decoder_logits: torch.FloatTensor | None = None


class RetroMAEPreTrainedModel(BertPreTrainedModel):
    """
    BERT's weight initialisation and loading rules with the RetroMAE configuration.

    Flash and flex attention are turned off: the enhanced decoder needs an arbitrary dense
    (batch, seq, seq) mask, which eager and SDPA attention take and those kernels do not.
    """

    config_class = RetroMAEConfig
    config: RetroMAEConfig
    _supports_flash_attn = False
    _supports_flex_attn = False


def write_sentence_transformers_files(folder: str | os.PathLike, config) -> None:
    """Configure a saved encoder folder for sentence-transformers: [CLS] pooling, no pooler layer, cosine similarity."""
    files = {
        "modules.json": SENTENCE_TRANSFORMERS_MODULES,
        "sentence_bert_config.json": {"max_seq_length": min(config.max_position_embeddings, 512), "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
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


class RetroMAEReleasedEncoder:
    """
    Saving writes what users are handed: a BERT checkpoint first, RetroMAE's code as an opt-in.

    `save_pretrained` (and so `push_to_hub`) writes the weights, this code, a config.json of
    type `bert` whose `auto_map` points the encoder classes at this code, and the
    sentence-transformers files, so that `SentenceTransformer(folder)` embeds with [CLS] as
    RetroMAE does, and BERT tools with no remote code take the folder as it is.
    """

    bert_architecture: str

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        upload = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "token") if key in kwargs}
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as file:
            json.dump(release_config_dict(self.config, self.bert_architecture), file, indent=2, sort_keys=True)
            file.write("\n")
        write_sentence_transformers_files(save_directory, self.config)
        if push_to_hub:
            self.push_to_hub(upload.pop("repo_id", os.path.basename(os.path.abspath(save_directory))), **upload)


class RetroMAEModel(RetroMAEReleasedEncoder, RetroMAEPreTrainedModel, BertModel):
    """
    The RetroMAE encoder: BERT without the pooler, returning the sentence embedding.

    Parameter names are BERT's, so a BERT checkpoint loads into it and a saved `RetroMAEModel`
    loads as `BertModel`. This is the class `AutoModel` resolves to. Pre-training checkpoints also
    hold the decoder and the MLM head, releases the MLM head, BERT checkpoints a pooler: none is
    used to embed, so loading skips them quietly.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^cls\.", r"^pooler\."]
    bert_architecture = "BertModel"

    def __init__(self, config: RetroMAEConfig):
        super().__init__(config, add_pooling_layer=False)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RetroMAEModelOutput:
        """Encode a batch; `sentence_embedding` is the final [CLS] state (paper §3.2)."""
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return RetroMAEModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            sentence_embedding=outputs.last_hidden_state[:, 0],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class RetroMAEForMaskedLM(RetroMAEReleasedEncoder, RetroMAEPreTrainedModel, BertForMaskedLM):
    """
    The RetroMAE encoder with its MLM head: the layout of a released RetroMAE checkpoint.

    Identical to `BertForMaskedLM` (the authors release their encoders in that layout); it is
    what `AutoModelForMaskedLM` resolves to, and what pre-training leaves once the decoder is
    dropped. A pre-training checkpoint's decoder and a BERT checkpoint's pooler are skipped
    quietly on load.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"pooler\."]
    bert_architecture = "BertForMaskedLM"


class RetroMAEDecoderLayer(GradientCheckpointingLayer):
    """
    One layer of enhanced decoding (paper §3.3, Eq. 7-8).

    Queries come from the query stream, keys and values from the content stream, under the
    position-specific mask; the residual and LayerNorm are taken on the query stream, then
    BERT's feed-forward block follows. BERT's cross-attention block is exactly this attention.
    """

    def __init__(self, config: RetroMAEConfig):
        super().__init__()
        self.attention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, query_stream: torch.Tensor, content_stream: torch.Tensor, enhanced_decoding_mask: torch.Tensor
    ) -> torch.Tensor:
        attention_output, _ = self.attention(
            query_stream, encoder_hidden_states=content_stream, encoder_attention_mask=enhanced_decoding_mask
        )
        return self.output(self.intermediate(attention_output), attention_output)


class RetroMAEDecoder(nn.Module):
    """The decoder: `num_decoder_layers` enhanced-decoding layers, one in the paper."""

    def __init__(self, config: RetroMAEConfig):
        super().__init__()
        self.layers = nn.ModuleList([RetroMAEDecoderLayer(config) for _ in range(config.num_decoder_layers)])

    def forward(
        self, query_stream: torch.Tensor, content_stream: torch.Tensor, enhanced_decoding_mask: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.layers:
            query_stream = layer(query_stream, content_stream, enhanced_decoding_mask)
        return query_stream


class RetroMAEForPreTraining(RetroMAEPreTrainedModel):
    """
    RetroMAE pre-training: encoder, shared MLM head and enhanced decoder.

    `forward` takes the batch made by `RetroMAECollator`. Loaded with `from_pretrained` from a
    BERT or `BertForMaskedLM` checkpoint, the encoder (and MLM head, where present) come from
    the checkpoint and the decoder is initialised afresh, as pre-training from
    bert-base-uncased requires.
    """

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    main_input_name = "encoder_input_ids"

    def __init__(self, config: RetroMAEConfig):
        super().__init__(config)
        self.bert = RetroMAEModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.decoder = RetroMAEDecoder(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        encoder_input_ids: torch.LongTensor,
        encoder_attention_mask: torch.Tensor,
        encoder_labels: torch.LongTensor,
        decoder_input_ids: torch.LongTensor,
        decoder_attention_mask: torch.BoolTensor,
        decoder_labels: torch.LongTensor,
        return_logits: bool = False,
    ) -> RetroMAEForPreTrainingOutput:
        """
        Compute the RetroMAE loss for one batch.

        `decoder_attention_mask` is the (batch, seq, seq) enhanced-decoding mask, True where a
        query row may attend. Without enhanced decoding (`config.enhanced_decoding=False`, the
        paper's ablation) the collator's decoder inputs are a masked copy and the mask only hides
        padding. With `return_logits=True` the MLM scores over the whole sequence
        are returned as well; the losses are the same either way.
        """
        encoder_output = self.bert(encoder_input_ids, attention_mask=encoder_attention_mask)
        sentence_embedding = encoder_output.sentence_embedding  # (batch, hidden)
        encoder_loss = self.masked_lm_loss(encoder_output.last_hidden_state, encoder_labels)

        decoded = self.decode(sentence_embedding, decoder_input_ids, decoder_attention_mask)
        decoder_loss = self.masked_lm_loss(decoded, decoder_labels)

        return RetroMAEForPreTrainingOutput(
            loss=encoder_loss + decoder_loss,
            encoder_loss=encoder_loss,
            decoder_loss=decoder_loss,
            sentence_embedding=sentence_embedding,
            encoder_logits=self.cls(encoder_output.last_hidden_state) if return_logits else None,
            decoder_logits=self.cls(decoded) if return_logits else None,
        )

    def decode(
        self, sentence_embedding: torch.Tensor, decoder_input_ids: torch.LongTensor, decoder_attention_mask: torch.BoolTensor
    ) -> torch.Tensor:
        """The decoder's final states: the sentence rebuilt from `h_X` and the decoder's inputs (Eq. 6-8)."""
        content_stream = self.content_stream(sentence_embedding, decoder_input_ids)
        if self.config.enhanced_decoding:
            query_stream = self.query_stream(sentence_embedding, decoder_input_ids.shape[1])
        else:
            query_stream = content_stream  # the ablation: self-attention over the masked copy
        return self.decoder(query_stream, content_stream, self.attention_bias(decoder_attention_mask))

    def query_stream(self, sentence_embedding: torch.Tensor, seq_length: int) -> torch.Tensor:
        """`H1`: the sentence embedding plus the raw position embedding at every position (Eq. 6)."""
        embeddings = self.bert.embeddings
        positions = embeddings.position_embeddings(embeddings.position_ids[:, :seq_length])  # (1, seq, hidden)
        return sentence_embedding[:, None] + positions  # (batch, seq, hidden)

    def content_stream(self, sentence_embedding: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        """`H2`: the encoder's embeddings of the original tokens, position 0 replaced by `h_X` (Eq. 6)."""
        token_embeddings = self.bert.embeddings(input_ids=input_ids)  # (batch, seq, hidden)
        return torch.cat([sentence_embedding[:, None], token_embeddings[:, 1:]], dim=1)

    def attention_bias(self, enhanced_decoding_mask: torch.BoolTensor) -> torch.Tensor:
        """The (batch, seq, seq) mask in the form the configured attention function takes."""
        mask = enhanced_decoding_mask[:, None].bool()  # (batch, 1, seq, seq) True = may attend
        if self.config._attn_implementation == "sdpa":
            return mask
        dtype = self.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def masked_lm_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """
        Cross entropy of the shared MLM head over the labelled positions.

        Only labelled positions go through the vocabulary projection: the mean over them is the
        same as over full logits with `ignore_index`, at a fraction of the cost.
        """
        labelled = labels != IGNORE_INDEX  # (batch, seq)
        logits = self.cls(hidden_states[labelled])  # (labelled, vocab)
        return F.cross_entropy(logits.float(), labels[labelled])


RetroMAEModel.register_for_auto_class("AutoModel")
RetroMAEForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
RetroMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "RetroMAEForMaskedLM",
    "RetroMAEForPreTraining",
    "RetroMAEForPreTrainingOutput",
    "RetroMAEModel",
    "RetroMAEModelOutput",
    "RetroMAEPreTrainedModel",
    "write_sentence_transformers_files",
]
