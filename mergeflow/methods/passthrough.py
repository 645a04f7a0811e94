"""mergekit's passthrough: one model's tensors as they are, optionally scaled. With `slices:` it
stacks layers of models into a new one (a frankenmerge, or depth up-scaling of one model)."""

from __future__ import annotations

import numpy as np

from mergeflow.methods import kernels as K
from mergeflow.methods import primitives as P
from mergeflow.methods.base import Chunk, MergeMethod, Param


def _merge(chunk: Chunk) -> np.ndarray:
    model, scale = chunk.models[0], np.float32(chunk.params["scale"][0])
    out = np.empty(model.size, chunk.storage)
    if model.dtype == out.dtype == np.uint16 and scale == 1:
        # bfloat16 in and out: the bits as stored, one pass (widening and rounding back took
        # ~45% of a frankenmerge's time)
        non_finite = K.copy_bfloat16_(out, model)
    else:
        values = P.to_float32(model) if model.dtype == np.uint16 else model
        if scale != 1:
            values *= scale
        non_finite = (K.narrow_to_bfloat16_ if out.dtype == np.uint16 else K.copy_float32_)(out, values)
    P.refuse_non_finite(0, non_finite)
    return out


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary="One model's tensors as they are, times its `scale`; with slices, layers of models stacked.",
    formula="θ = s·θ1",
    merge=_merge,
    params=(Param("scale", 1.0, "factor for the model's values", per_model=True),),
    needs_base=False,
    min_models=1,
    max_models=1,
    reads_bfloat16=True,
    writes_storage=True,
)
