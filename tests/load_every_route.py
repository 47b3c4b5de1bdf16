"""Load a repository every way a Hub user does, in a process that never imports `retromae`.

    python tests/load_every_route.py TEXTS_JSON OUTPUT_JSON REPO_ID [REPO_ID ...]

Writes, for each repository and every route, the class it gave, the first-token embedding of the
texts and the warnings transformers logged while loading (one process for several repositories:
its start-up is most of the cost). The family's own classes (`BertModel`,
`RobertaForMaskedLM`, ...) are those transformers maps the repository's model type to. Standard input is closed by the caller, so a route that
stops to ask whether to trust remote code fails instead of waiting.
"""

import json
import logging
import sys

import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING
from transformers.utils import logging as transformers_logging


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def cls_state(model, inputs):
    output = model(**inputs, output_hidden_states=True)
    return output.hidden_states[-1][:, 0]


def main(repo_id: str, texts: list[str]) -> dict:
    recorder = Recorder()
    transformers_logging.add_handler(recorder)
    try:
        return routes_of(repo_id, texts, recorder)
    finally:
        transformers_logging.remove_handler(recorder)


def routes_of(repo_id: str, texts: list[str], recorder: Recorder) -> dict:
    transformers_logging.set_verbosity_warning()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    config_class = type(AutoConfig.from_pretrained(repo_id))
    base, masked_lm = MODEL_MAPPING[config_class], MODEL_FOR_MASKED_LM_MAPPING[config_class]
    loaders = {
        "SentenceTransformer": lambda: SentenceTransformer(repo_id),
        "AutoModel": lambda: AutoModel.from_pretrained(repo_id),
        base.__name__: lambda: base.from_pretrained(repo_id),
        masked_lm.__name__: lambda: masked_lm.from_pretrained(repo_id),
        "AutoModel(trust_remote_code=True)": lambda: AutoModel.from_pretrained(repo_id, trust_remote_code=True),
        "AutoModelForMaskedLM(trust_remote_code=True)": lambda: AutoModelForMaskedLM.from_pretrained(repo_id, trust_remote_code=True),
    }
    if "add_pooling_layer" in base.__init__.__code__.co_varnames:
        loaders["AutoModel(add_pooling_layer=False)"] = lambda: AutoModel.from_pretrained(repo_id, add_pooling_layer=False)
    routes = {"AutoTokenizer": {"class": type(tokenizer).__name__, "warnings": recorder.messages[:]}}
    for route, load in loaders.items():
        recorder.messages.clear()
        model = load().eval()
        warnings = recorder.messages[:]
        with torch.no_grad():
            if route == "SentenceTransformer":
                embedding = model.encode(texts, convert_to_tensor=True)
            elif route == "AutoModel(trust_remote_code=True)":
                embedding = model(**inputs).sentence_embedding
            else:
                embedding = cls_state(model, inputs)
        classes = type(model[0].auto_model if route == "SentenceTransformer" else model)
        routes[route] = {"class": classes.__name__, "embedding": embedding.tolist(), "warnings": warnings}
    assert "retromae" not in sys.modules, "a Hub user's process has no retromae package"
    return routes


if __name__ == "__main__":
    texts_file, output_file, *repos = sys.argv[1:]
    with open(texts_file) as file:
        texts = json.load(file)
    result = {repo: main(repo, texts) for repo in repos}
    with open(output_file, "w") as file:
        json.dump(result, file)
