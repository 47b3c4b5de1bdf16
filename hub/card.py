"""The model card of a RetroMAE release: Hub metadata, usage, the run's settings, evaluation, citation.

Rendered from `model_card_template.md` with huggingface_hub's `ModelCard.from_template`, so the
YAML header is `ModelCardData`'s own, and checked by parsing it back before anything is uploaded.
One template serves both kinds of release; `sparse` switches its description and usage to the SPLADE model's.
"""

from pathlib import Path

import jinja2
import jinja2.meta
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from ..citations import citations
from ..diagnostics import LABELS, RETRIEVAL_LABELS
from ..errors import UsageError, is_hub_id
from ..model_folder import public_name
from ..modeling_retromae import RELEASE_PARTS_FILE


TEMPLATE = Path(__file__).with_name("model_card_template.md")
TAGS = ["retromae", "sentence-transformers", "feature-extraction"]
SPARSE_TAGS = ["retromae", "sentence-transformers", "sparse-encoder", "sparse", "splade", "feature-extraction"]
PIPELINE_TAG = "sentence-similarity"
SPARSE_PIPELINE_TAG = "feature-extraction"  # sentence-transformers' own tag for SparseEncoder models
METRIC_NAMES = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@100": "Recall@100"}
NAMED_SOURCES = ("base_model", "converted_from", "corpus")
PRETRAINING_ROWS = {
    "base_model": "initial weights",
    "corpus": "corpus",
    "passages": "passages",
    "encoder_mask_ratio": "encoder mask ratio",
    "decoder_mask_ratio": "decoder mask ratio",
    "enhanced_decoding": "enhanced decoding",
    "objective": "objective",
    "bow_loss_weight": "bag-of-words loss weight",
    "max_length": "max length (tokens)",
    "max_seq_length": "sentence-transformers max_seq_length (tokens)",
    "steps": "optimiser steps",
    "batch_size": "batch size per process",
    "processes": "processes",
    "gradient_accumulation_steps": "gradient accumulation",
    "learning_rate": "peak learning rate",
    "seed": "seed",
    "hardware": "hardware",
    "train_seconds": "training time (s)",
    "final_loss": "final loss (encoder + decoder, + weight x bag of words for DupMAE)",
    "converted_from": "converted from",
}


class CardError(UsageError):
    """A model card that cannot be rendered or does not validate; the message says what is wrong."""


def model_card(
    repo_id: str,
    pretraining: dict | None = None,
    evaluations: list[dict] = (),
    license: str = "apache-2.0",
    language: str = "en",
    template: str | Path = TEMPLATE,
    encoder: dict | None = None,
    sparse: bool = False,
    decoder: bool = False,
    source: str | Path | None = None,
    mlm_head: bool = True,
) -> ModelCard:
    """
    The card of `repo_id`, from the run's settings (`retromae_pretraining.json`), `retromae evaluate`
    reports and the encoder's config (its family; BERT where it is not given); with `sparse`, the
    card of the SPLADE model made from the encoder's MLM head; `decoder` and `mlm_head` say whether the release keeps them;
    `source` is the folder released, which a report of it names ("this model").
    """
    encoder = encoder or {"model_type": "bert", "architectures": ["BertForMaskedLM"]}
    pretraining = public_record(pretraining or {})
    base_model = hub_id(pretraining.get("base_model") or pretraining.get("converted_from"))
    data = ModelCardData(
        license=license,
        language=language,
        library_name="sentence-transformers",
        pipeline_tag=SPARSE_PIPELINE_TAG if sparse else PIPELINE_TAG,
        tags=SPARSE_TAGS if sparse else TAGS,
        base_model=base_model,
        datasets=pretraining.get("datasets") or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(evaluations) or None,
    )
    fields = {
        "repo_id": repo_id,
        "model_name": repo_id.split("/")[-1],
        "base_model_sentence": f"It starts from [{base_model}](https://huggingface.co/{base_model})." if base_model else "",
        "pretraining_table": pretraining_table(pretraining),
        "evaluation_table": evaluation_table(evaluations, sparse, source),
        "training_evaluation": training_evaluation_section(pretraining.get("training_evaluation")),
        "truncation_sentence": truncation_sentence(pretraining.get("max_seq_length")),
        "fresh_head_warning": fresh_head_warning(pretraining) if sparse else "",
        "citation": "\n\n".join(citations(pretraining.get("objective"), sparse)),
        "sparse": sparse,
        "model_type": encoder["model_type"],
        "architecture": (encoder.get("architectures") or ["its family's ...ForMaskedLM"])[0],
        "parts_sentence": parts_sentence(repo_id, decoder, mlm_head),
    }
    check_template_fields(Path(template), fields)
    card = ModelCard.from_template(data, template_path=str(template), **fields)
    check_card(str(card))
    return card


def public_record(pretraining: dict) -> dict:
    """The pre-training record as a release shows it: models and corpora named by Hub id or plain name, never a local path."""
    return {k: public_name(v) if k in NAMED_SOURCES and isinstance(v, str) else v for k, v in pretraining.items()}


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub repo id with its organisation (`org/name`), else None: a local folder is named by its last part."""
    return name if name and "/" in name and is_hub_id(name) else None


def eval_results(evaluations: list[dict]) -> list[EvalResult]:
    results = []
    for report in evaluations:
        dataset = Path(report["data"]).name or report["data"]
        for metric, label in METRIC_NAMES.items():
            results.append(
                EvalResult(
                    task_type="retrieval",
                    task_name="Retrieval",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=report.get("split", "test"),
                    metric_type=metric.replace("@", "_at_"),
                    metric_name=label,
                    metric_value=round(float(report[metric]), 4),
                )
            )
    return results


def pretraining_table(pretraining: dict) -> str:
    if not pretraining:
        return "Not recorded: the release folder has no `retromae_pretraining.json`."
    rows = [(label, pretraining[key]) for key, label in PRETRAINING_ROWS.items() if pretraining.get(key) is not None]
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows)])


def evaluation_table(evaluations: list[dict], sparse: bool = False, source: str | Path | None = None) -> str:
    """The `retromae evaluate` reports, a row each: this model's, and any other's (the model it started from, say) for comparison."""
    if not evaluations:
        return "No evaluation was given with this release (`retromae evaluate` writes one)."
    header = ["| model | data | split | queries | documents | " + " | ".join(METRIC_NAMES.values()) + " |", "|---|---|---|---|---|---|---|---|"]
    rows = [
        f"| {evaluated_model(r, source)} | {Path(r['data']).name} | {r.get('split', 'test')} | {r.get('queries', '')} | {r.get('documents', '')} | "
        + " | ".join(f"{float(r[m]):.4f}" for m in METRIC_NAMES)
        + " |"
        for r in evaluations
    ]
    note = (
        "\n\nThe sparse embedding ranked by dot product, scored by trec_eval (`retromae evaluate --sparse`)."
        if sparse
        else "\n\nThe first-token embedding ranks each query's documents by the model's similarity; trec_eval scores "
        "the ranking (through `pytrec_eval`), as BEIR and MTEB do (`retromae evaluate`)."
    )
    return "\n".join(header + rows) + note


def evaluated_model(report: dict, source: str | Path | None) -> str:
    """The model a report evaluated: "this model" where it is the folder released, else its public name."""
    model = report.get("model")
    if not model:
        return "this model"
    if source is not None and Path(model).expanduser().resolve() == Path(source).resolve():
        return "this model"
    return public_name(model)


def training_evaluation_section(evaluation: dict | None) -> str:
    """
    The evaluations of pre-training (held-out passages, the `--eval-retrieval` task): the picture (where the release
    has it) and the first and last evaluation.
    """
    if not evaluation:
        return (
            "Not recorded: the run held out no passages (`retromae pretrain --eval-data` or `--eval-split` evaluates on some) "
            "and had no retrieval task (`--eval-retrieval`)."
        )
    first, last = evaluation["first"], evaluation["last"]
    picture = [f"![Held-out evaluation during pre-training]({evaluation['picture']})", ""] if evaluation.get("picture") else []
    labels = LABELS | RETRIEVAL_LABELS
    rows = [f"| {label} | {first[key]:.4f} | {last[key]:.4f} |" for key, label in labels.items() if key in first and key in last]
    held_out = (
        f"Evaluated during pre-training on {evaluation['passages']} held-out passages, with the same masks every time "
        f"({evaluation['evaluations']} evaluations). Embedding information is the decoder's loss with another "
        "passage's sentence embedding minus with its own: what the embedding tells the decoder. Span retrieval finds "
        "each passage's second half from its first half's embedding among all second halves."
        if evaluation.get("passages")
        else f"Evaluated {evaluation['evaluations']} times during pre-training."
    )
    return "\n".join(
        [
            *picture,
            " ".join([held_out, *([retrieval_sentence(evaluation["retrieval"])] if evaluation.get("retrieval") else [])]),
            "",
            f"| held-out figure | step {first['step']} | step {last['step']} |",
            "|---|---|---|",
            *rows,
        ]
    )


def retrieval_sentence(retrieval: dict) -> str:
    """What the retrieval figures of pre-training are: `retromae evaluate`'s on the `--eval-retrieval` task, and on how much of its corpus."""
    part = f" (of its {retrieval['corpus']:,}: every one judged relevant, the others drawn at random)"
    return (
        f"The retrieval figures rank {retrieval['documents']:,} passages of {retrieval['data']}"
        f"{part if retrieval['documents'] < retrieval['corpus'] else ''} for its {retrieval['queries']:,} judged queries, "
        "as `retromae evaluate` ranks them with the model of that step: dense by the first-token embedding (cosine), "
        "sparse by the SPLADE model of the MLM head, hybrid by their fusion."
    )


def truncation_sentence(max_seq_length: int | None) -> str:
    """What the card says of where inputs are cut, and by which rule (docs/publishing.md); nothing where the record does not say."""
    if not max_seq_length:
        return ""
    return (
        f"sentence-transformers truncates inputs at {max_seq_length} tokens (`max_seq_length`): the longer of the "
        "pre-training's max length and the starting model's own sentence-transformers `max_seq_length`, where it has "
        "one, the lengths the encoder was trained to embed. Set `model.max_seq_length` to change it."
    )


def fresh_head_warning(pretraining: dict) -> str:
    """
    The sparse card's warning where the run started the MLM head afresh (a checkpoint without one, or
    `--config`): the term weights are then the work of this run's steps alone, noise after a short run.
    """
    if not pretraining.get("fresh_head"):
        return ""
    return (
        f"**Its MLM head was trained by one pre-training run alone** ({pretraining.get('steps', 'a few')} steps): the "
        "run started from a model without one, so the head, and with it every term weight, began at random. After a "
        "short run the weights are noise, with nearly every vocabulary entry active; pre-train longer, or start from "
        "a checkpoint with an MLM head, before using it."
    )


def check_template_fields(template: Path, fields: dict) -> None:
    """Refuse a template that uses a field the release does not fill (Jinja would render it empty)."""
    if not template.is_file():
        raise CardError(f"Card template {template} does not exist.")
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template.read_text()))
    missing = sorted(used - set(fields) - {"card_data"})
    if missing:
        raise CardError(
            f"Card template {template} uses {', '.join(missing)}, which a release does not provide "
            f"(available: card_data, {', '.join(sorted(fields))})."
        )


def check_card(content: str) -> None:
    """Parse the card back as the Hub does: YAML header, required metadata, model-index."""
    try:
        card = ModelCard(content, ignore_metadata_errors=False)
    except ValueError as error:
        raise CardError(f"The model card's metadata does not parse: {error}") from None
    metadata = card.data.to_dict()
    for key in ("license", "language", "library_name", "pipeline_tag", "tags"):
        if not metadata.get(key):
            raise CardError(f"The model card's metadata has no {key}.")
    if metadata.get("model-index"):
        model_index_to_eval_results(metadata["model-index"])


def parts_sentence(repo_id: str, decoder: bool, mlm_head: bool) -> str:
    """What the release keeps beside the encoder (`retromae_parts.safetensors`), and what it is for; nothing where it keeps nothing."""
    if not mlm_head:
        return (
            "The repository holds the encoder alone, without the MLM head and the decoder of its pre-training: "
            "pre-training continued from it starts both afresh."
        )
    continued = (
        f"and the trained decoder: `retromae pretrain --model {repo_id}` continues pre-training with both (on a corpus of your domain, say)"
        if decoder
        else "but not the decoder, which was left out of this release: pre-training continued from it starts a fresh decoder"
    )
    return (
        f"Beside the encoder, `{RELEASE_PARTS_FILE}` keeps what pre-training trained with it: the MLM head, {continued}. "
        f'`AutoModelForMaskedLM.from_pretrained("{repo_id}", trust_remote_code=True)` gives the encoder with its MLM head (fill-mask).'
    )
