"""Running one registered method on whole tensors given as torch tensors, as the method tests
do: defaults for unset parameters, statistics computed as the engine computes them."""

from __future__ import annotations

import numpy as np
import torch

from mergeflow.methods import METHODS, Chunk
from mergeflow.methods import primitives as P


def run_method(name: str, base, models, stats=None, tensor_name="w", start=0, **params):
    """Apply a registered method to whole tensors (base None: none) of any shape (models
    [N, *shape]; rows are the last dimension), with defaults for unset parameters; a per-model
    parameter takes one value or one per model."""
    method = METHODS[name]
    shape = tuple(models.shape[1:])
    models = models.reshape(len(models), -1).numpy().copy()
    base = None if base is None else base.reshape(-1).numpy().copy()
    resolved = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        per_model = np.broadcast_to(np.asarray(value, np.float32), models.shape[:1]).copy()
        resolved[p.name] = per_model if p.per_model else value
    if method.model_statistic is not None and stats is None:

        def per_model(i):
            return {k: float(v[i]) if isinstance(v, np.ndarray) else v for k, v in resolved.items()}

        magnitudes = [P.Magnitudes.of(model, base) for model in models]
        stats = np.stack([method.model_statistic(m, per_model(i)) for i, m in enumerate(magnitudes)])
    if method.chunk_statistic is not None and stats is None:
        stats = method.chunk_statistic(WholeTensor(base, models, shape), resolved)
    chunk = Chunk(tensor_name, start, base, models, resolved, stats, row_length=shape[-1])
    return torch.from_numpy(method.merge(chunk)).reshape(shape)


class WholeTensor:
    """A whole tensor as one chunk (a `TensorChunks`)."""

    def __init__(self, base: np.ndarray | None, models: np.ndarray, shape: tuple[int, ...]) -> None:
        self.name, self.base, self.models, self.shape = "w", base, models, shape
        self.numel, self.n_models, self.row_length = models[0].size, models.shape[0], shape[-1]
        self.has_base = base is not None

    def chunks(self):
        yield 0, self.base, self.models.copy()

    def scratch(self) -> np.ndarray:
        return np.empty(self.numel, np.float32)


def random_task_vectors(n=4, size=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=g), torch.randn(n, size, generator=g)
