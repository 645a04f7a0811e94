"""The merge-method registry: every method mergeflow can run, by name."""

from __future__ import annotations

from mergeflow.errors import ConfigError
from mergeflow.methods.arcee_fusion import ARCEE_FUSION
from mergeflow.methods.base import Chunk, MergeMethod, Param
from mergeflow.methods.linear import AVERAGE
from mergeflow.methods.model_stock import MODEL_STOCK
from mergeflow.methods.nearswap import NEARSWAP
from mergeflow.methods.nuslerp import NUSLERP
from mergeflow.methods.passthrough import PASSTHROUGH
from mergeflow.methods.ram import RAM, RAMPLUS_TL
from mergeflow.methods.sce import SCE
from mergeflow.methods.slerp import SLERP
from mergeflow.methods.spherical import KARCHER, MULTISLERP
from mergeflow.methods.task_vector import task_vector_method

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        AVERAGE,
        task_vector_method(
            "task_arithmetic",
            "Add the weighted sum of task vectors, scaled by λ.",
            "θ = θ0 + λ·Σi wi·τi",
            sparsify=None,
            consensus=False,
            normalize=False,
            rescale=False,
        ),
        task_vector_method(
            "ties",
            "Trim each task vector to its largest entries, elect signs, average the agreeing.",
            "θ = θ0 + λ·Σi wi·trim(τi)·[sign = γ] / Σi wi·[sign = γ]",
            sparsify="magnitude",
            consensus=True,
            normalize=True,
            rescale=False,
        ),
        task_vector_method(
            "dare_ties",
            "Randomly drop task-vector entries (rescaling survivors), then TIES sign election.",
            "θ = θ0 + λ·Σi wi·dare(τi)·[sign = γ]",
            sparsify="random",
            consensus=True,
            normalize=False,
            rescale=True,
        ),
        task_vector_method(
            "dare_linear",
            "Randomly drop task-vector entries (rescaling survivors), then sum.",
            "θ = θ0 + λ·Σi wi·dare(τi)",
            sparsify="random",
            consensus=False,
            normalize=False,
            rescale=True,
        ),
        task_vector_method(
            "breadcrumbs",
            "Drop the largest and the smallest task-vector entries, then sum.",
            "θ = θ0 + λ·Σi wi·band(τi)",
            sparsify="outliers",
            consensus=False,
            normalize=False,
            rescale=False,
        ),
        task_vector_method(
            "breadcrumbs_ties",
            "Breadcrumbs sparsification, then TIES sign election.",
            "θ = θ0 + λ·Σi wi·band(τi)·[sign = γ]",
            sparsify="outliers",
            consensus=True,
            normalize=False,
            rescale=False,
        ),
        task_vector_method(
            "della",
            "Drop task-vector entries at random, smaller ones more often (DELLA), then TIES.",
            "θ = θ0 + λ·Σi wi·della(τi)·[sign = γ] / Σi wi·[sign = γ]",
            sparsify="ranked",
            consensus=True,
            normalize=True,
            rescale=True,
        ),
        task_vector_method(
            "della_linear",
            "Drop task-vector entries at random, smaller ones more often (DELLA), then sum.",
            "θ = θ0 + λ·Σi wi·della(τi)",
            sparsify="ranked",
            consensus=False,
            normalize=False,
            rescale=True,
        ),
        SCE,
        RAM,
        RAMPLUS_TL,
        MODEL_STOCK,
        SLERP,
        NUSLERP,
        MULTISLERP,
        KARCHER,
        NEARSWAP,
        ARCEE_FUSION,
        PASSTHROUGH,
    )
}
ALIASES = {"linear": "average"}  # mergekit's name for weighted averaging
PAPER_METHODS = ("average", "task_arithmetic", "ties", "dare_ties")


def get_method(name: str) -> MergeMethod:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        supported = ", ".join([*METHODS, *ALIASES])
        raise ConfigError(f"merge_method: unknown method {name!r} (supported: {supported})")
    return METHODS[name]


__all__ = ["ALIASES", "METHODS", "PAPER_METHODS", "Chunk", "MergeMethod", "Param", "get_method"]
