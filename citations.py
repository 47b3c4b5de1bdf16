"""The papers a RetroMAE model cites: RetroMAE, DupMAE (RetroMAE v2) for its objective, SPLADE for its sparse view."""

CITATION = """@inproceedings{xiao2022retromae,
  title     = {RetroMAE: Pre-Training Retrieval-oriented Language Models Via Masked Auto-Encoder},
  author    = {Xiao, Shitao and Liu, Zheng and Shao, Yingxia and Cao, Zhao},
  booktitle = {Proceedings of the 2022 Conference on Empirical Methods in Natural Language Processing},
  pages     = {538--548},
  year      = {2022},
  url       = {https://arxiv.org/abs/2205.12035}
}"""
# DupMAE (RetroMAE v2 on arXiv, 2211.08769), as the ACL Anthology lists it.
DUPMAE_CITATION = """@inproceedings{liu2023retromae2,
  title     = {RetroMAE-2: Duplex Masked Auto-Encoder For Pre-Training Retrieval-Oriented Language Models},
  author    = {Liu, Zheng and Xiao, Shitao and Shao, Yingxia and Cao, Zhao},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)},
  pages     = {2635--2648},
  year      = {2023},
  url       = {https://arxiv.org/abs/2211.08769}
}"""
SPLADE_CITATION = """@article{formal2021spladev2,
  title   = {SPLADE v2: Sparse Lexical and Expansion Model for Information Retrieval},
  author  = {Formal, Thibault and Lassance, Carlos and Piwowarski, Benjamin and Clinchant, St{\\'e}phane},
  journal = {arXiv preprint arXiv:2109.10086},
  year    = {2021},
  url     = {https://arxiv.org/abs/2109.10086}
}"""


def citations(objective: str | None = "retromae", sparse: bool = False) -> list[str]:
    """RetroMAE's entry; DupMAE's (RetroMAE v2) for a DupMAE run; SPLADE's for a sparse model."""
    return [CITATION, *([DUPMAE_CITATION] if objective == "dupmae" else []), *([SPLADE_CITATION] if sparse else [])]
