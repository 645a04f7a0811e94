"""An independent reference merge for the engine's tests: whole tensors, plain torch,
mergekit's formulas with mergeflow's documented conventions (DARE and DELLA draw from
mergeflow's random streams, so the masks are the same)."""

from __future__ import annotations

import math

import numpy as np
import torch

from mergeflow.methods.primitives import dare_key, dare_uniforms

RAM_EPSILON = 0.005  # about the size of the test zoos' task-vector entries


def reference_merge(
    method: str,
    base: dict,
    experts: list[dict],
    density=0.5,
    lam=1.0,
    t=0.5,
    seed=0,
    epsilon=0.15,
    select_topk=0.5,
):
    out = {}
    for name, b in base.items():
        b = b.float()
        models = torch.stack([e[name].float() for e in experts])
        taus = models - b
        if method == "average":
            out[name] = models.mean(0)
        elif method == "passthrough":
            out[name] = models[0]
        elif method == "task_arithmetic":
            out[name] = b + lam * taus.sum(0)
        elif method == "ties":
            out[name] = b + lam * consensus_mean([trim_topk(tau, density) for tau in taus])
        elif method == "dare_ties":
            dropped = [dare(tau, density, seed, name, i) for i, tau in enumerate(taus)]
            out[name] = b + lam * consensus_sum(dropped)
        elif method == "dare_linear":
            out[name] = b + lam * sum(dare(tau, density, seed, name, i) for i, tau in enumerate(taus))
        elif method == "della":
            pruned = [della(tau, density, epsilon, seed, name, i) for i, tau in enumerate(taus)]
            out[name] = b + lam * consensus_mean(pruned)
        elif method == "della_linear":
            out[name] = b + lam * sum(
                della(tau, density, epsilon, seed, name, i) for i, tau in enumerate(taus)
            )
        elif method == "breadcrumbs":
            out[name] = b + lam * sum(band(tau, density, 0.01) for tau in taus)
        elif method == "breadcrumbs_ties":
            out[name] = b + lam * consensus_sum([band(tau, density, 0.01) for tau in taus])
        elif method == "sce":
            out[name] = b + sce(taus, select_topk)
        elif method == "arcee_fusion":
            out[name] = arcee_fusion(b, models[0])
        elif method in ("ram", "ramplus_tl"):
            out[name] = b + ram(taus, RAM_EPSILON, plus=method == "ramplus_tl")
        elif method == "nearswap":
            a, other = b, models[0]
            weight = (0.005 / (a - other).abs().clamp(min=1e-6)).clamp(0, 1)
            out[name] = weight * other + (1 - weight) * a
        elif method == "nuslerp":
            out[name] = nuslerp(b, models, torch.ones(2), row_wise=True, flatten=False).float()
        elif method == "multislerp":
            out[name] = multislerp(b, models, torch.ones(len(models))).float()
        elif method == "karcher":
            out[name] = karcher(torch.cat([b[None], models])).float()
        elif method == "model_stock":
            flat = taus.reshape(len(taus), -1).double()
            cosines = [
                torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)
                for i in range(len(flat))
                for j in range(i + 1, len(flat))
            ]
            c = float(torch.stack(cosines).mean())
            ratio = len(flat) * c / (1 + (len(flat) - 1) * c)
            out[name] = ratio * models.mean(0) + (1 - ratio) * b
        elif method == "slerp":
            v0, v1 = b.reshape(-1).double(), models[0].reshape(-1).double()
            cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
            if abs(cos) > 0.9995:  # nearly parallel: linear interpolation, as mergekit
                a, c1 = 1 - t, t
            else:
                omega = math.acos(cos)
                a, c1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
            out[name] = (a * v0 + c1 * v1).float().reshape(b.shape)
    return out


def trim_topk(tau, density):
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep, flat, 0.0).reshape(tau.shape)


def band(tau, density, gamma):
    flat = tau.reshape(-1)
    n = flat.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom = max(0, n - keep_n - top_n)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs())[bottom : bottom + keep_n]] = True
    return torch.where(keep, flat, 0.0).reshape(tau.shape)


def dare(tau, density, seed, name, index):
    u = torch.from_numpy(dare_uniforms(dare_key(seed, name, index), 0, tau.numel())).reshape(tau.shape)
    return torch.where(u < density, tau / density, 0.0)


def della(tau, density, epsilon, seed, name, index):
    """DELLA's MagPrune: rank |τ| within each row (the last dimension; a 1-D tensor is one row;
    equal magnitudes by position), keep rank r of n with chance density − ε + 2ε·r/(n − 1) and
    divide kept entries by their chance. Parameters as the engine holds them: float32."""
    density, epsilon = float(np.float32(density)), float(np.float32(epsilon))
    rows = tau.reshape(-1, tau.shape[-1]) if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).double()
    chance = ((density - epsilon) + (2 * epsilon) * (ranks / (n - 1))).float()
    u = torch.from_numpy(dare_uniforms(dare_key(seed, name, index), 0, tau.numel())).reshape(rows.shape)
    return torch.where(u < chance.double(), rows * (1.0 / chance), 0.0).reshape(tau.shape)


def ram(taus, epsilon, plus, r=0.1, alpha=0.2):
    """RAM: an entry one model changes (|τ| > ε) keeps its change, scaled for RAM+ by
    1 + r·clamp(shared/unique, 0, α) of that model over the tensor; one several change gets
    their mean. In float64."""
    taus = taus.double()
    changed = taus.abs() > epsilon
    changed_by = changed.sum(0)
    only = changed & (changed_by == 1)
    scales = torch.ones(len(taus), dtype=torch.float64)
    if plus:
        flat_only, flat_changed = only.reshape(len(taus), -1), changed.reshape(len(taus), -1)
        unique = flat_only.sum(1).double()
        shared = (flat_changed & ~flat_only).sum(1).double()
        ratio = torch.where(shared > 0, shared / unique.clamp(min=epsilon), 0.0)
        scales = 1 + r * ratio.clamp(0, alpha)
    scales = scales.reshape(-1, *[1] * (taus.dim() - 1))
    mean = (taus * changed).sum(0) / changed_by.clamp(min=1)
    return torch.where(changed_by == 1, (taus * only * scales).sum(0), mean).float()


def arcee_fusion(base, model):
    """Arcee Fusion with exact quartiles: |τ|·KL(softmax(model row) + 1e-8 ‖ softmax(base row)
    + 1e-8) (rows: the last dimension), kept where it reaches Q2 + 1.5·(Q3 − Q1), Qk at index
    ⌊k·(n − 1)/4⌋ of the sorted values. KL in float64."""
    rows = base.reshape(-1, base.shape[-1]) if base.dim() > 1 else base.reshape(1, -1)
    model_rows = model.reshape(rows.shape)
    p = torch.softmax(model_rows.double(), -1) + 1e-8
    q = torch.softmax(rows.double(), -1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True).float()
    importance = ((model_rows - rows).abs() * kl).reshape(-1)
    ordered, last = importance.sort().values, importance.numel() - 1
    q1, median, q3 = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]
    keep = (importance >= median + 1.5 * (q3 - q1)).reshape(base.shape)
    return base + (model - base) * keep


def sce(taus, select_topk):
    """SCE as mergekit writes it: torch.topk of the variances across models (no ties in the
    zoo's random values), energy weights with the 1e-6 guard, erase, weighted mean; in float64."""
    taus = taus.double()
    if select_topk < 1:
        variances = taus.var(0, unbiased=False).reshape(-1)
        k = int(torch.count_nonzero(variances) * select_topk)
        mask = torch.zeros_like(variances)
        mask[torch.topk(variances, k).indices] = 1
        taus = taus * mask.reshape(taus.shape[1:])
    energy = taus.square().reshape(len(taus), -1).mean(1)
    weights = energy / energy.sum() if energy.sum() >= 1e-6 else torch.full_like(energy, 1 / len(taus))
    weights = weights.reshape(-1, *[1] * (taus.dim() - 1))
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    erased = weights * (torch.sign(taus) == sign)
    return ((taus * erased).sum(0) / erased.sum(0).clamp(min=1e-6)).float()


def multislerp(base, models, weights, eps=1e-8):
    """mergekit's multislerp step by step (tangent space at the weighted mean and back), in
    float64; base None merges the models themselves."""
    tensors = models.double() - (0 if base is None else base.double())
    flat = tensors.reshape(len(tensors), -1)
    w = weights.double() / weights.double().sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w[:, None]).sum(0)
    length = step.norm() + eps
    result = (mean * torch.cos(length) + step * (torch.sin(length) / length)) * (norms[:, 0] * w).sum()
    return result.reshape(models.shape[1:]) + (0 if base is None else base.double())


def nuslerp(base, models, weights, row_wise=False, flatten=True):
    """mergekit's nuslerp in float64: vectors over the whole tensor, its rows, or with
    `row_wise` along its first dimension (transposed to the last)."""
    total = float(weights.sum())
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    v0, v1 = (m.double() - (0 if base is None else base.double()) for m in models)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    angle = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * angle) * v0 + torch.sin(t * angle) * v1) / torch.sin(angle)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape) + (0 if base is None else base.double())


def karcher(points, max_iter=10, tol=1e-5):
    """mergekit's Karcher mean iteration on the flattened points (equal weights), in float64."""
    flat = points.double().reshape(len(points), -1)
    norms = flat.norm(dim=1)
    units = flat / norms[:, None]
    alpha = 1 / len(points)
    mean = units.mean(0)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in units:
            dot = torch.clamp(mean @ unit, -1.0, 1.0)
            angle = torch.arccos(dot)
            if angle < tol:
                continue
            tangent += alpha * (angle / torch.sin(angle)) * (unit - dot * mean)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / mean.norm()
    return (norms.mean() * mean).reshape(points.shape[1:])


def consensus_terms(taus):
    stacked = torch.stack(taus)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    return (stacked * agree).sum(0), agree.sum(0)


def consensus_mean(taus):
    total, count = consensus_terms(taus)
    return total / count.clamp(min=1)


def consensus_sum(taus):
    return consensus_terms(taus)[0]
