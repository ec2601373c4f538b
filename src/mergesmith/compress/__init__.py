"""Task-conditioned compression of fine-tuned experts: one merged task vector + N bit-packed masks.

``compress_experts`` writes the set (TALL masks, Wang et al. ICML 2024; or EMR-Merging, Huang et al.
NeurIPS 2024); ``extract_expert`` rebuilds any one expert; ``Artefact`` opens a set lazily. Imports are
lazy so that ``mergesmith.compress.cli`` stays torch-free at import time.
"""
from __future__ import annotations

__all__ = ["compress_experts", "extract_expert", "Artefact"]


def __getattr__(name):
    if name == "compress_experts":
        from .build import compress_experts

        return compress_experts
    if name == "extract_expert":
        from .extract import extract_expert

        return extract_expert
    if name == "Artefact":
        from .storage import Artefact

        return Artefact
    raise AttributeError(name)
