"""mergekit's passthrough: one model's tensors as they are, optionally scaled. With `slices:` it
stacks layers of models into a new one (a frankenmerge, or depth up-scaling of one model)."""

from __future__ import annotations

import numpy as np

from mergeflow.methods.base import Chunk, MergeMethod, Param


def _merge(chunk: Chunk) -> np.ndarray:
    model, scale = chunk.models[0], chunk.params["scale"][0]
    if scale != 1:  # scaling by 1 would be exact too; this spares the pass
        model *= scale
    return model


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary="One model's tensors as they are, times its `scale`; with slices, layers of models stacked.",
    formula="θ = s·θ1",
    merge=_merge,
    params=(Param("scale", 1.0, "factor for the model's values", per_model=True),),
    needs_base=False,
    min_models=1,
    max_models=1,
)
