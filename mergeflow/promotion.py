"""Champion/challenger promotion in the MLflow registry.

Every newly registered merge gets the alias `challenger` (mergeflow.registry.register_merge).
`decide` compares it with the `champion` on the paper's normalised scores, as logged on each
version's run (`held_in_normalised_mean`, `held_out_normalised_mean`), against `Gates`:

- held-in: the challenger's normalised held-in mean must reach `min_held_in`;
- held-out: it must not fall more than `max_held_out_drop` below the champion's (with no
  champion yet, not below `min_held_out`).

`apply` records the decision on the challenger version as tags (`mergeflow.promotion.*`) and,
when it passed (and a person approved, if asked), moves `champion` to it. The registered model
keeps the champion history in the tag `mergeflow.champion_history`, so `rollback` can point
`champion` back at the previous one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from mlflow.exceptions import MlflowException
from pydantic import BaseModel, Field

from mergeflow.registry import CHAMPION, RegistryError, client_for, resolve_version

HISTORY_TAG = "mergeflow.champion_history"
HELD_IN, HELD_OUT = "held_in_normalised_mean", "held_out_normalised_mean"


class Gates(BaseModel):
    min_held_in: float = Field(0.9, description="Challenger's normalised held-in mean must reach this")
    max_held_out_drop: float = Field(
        0.0, ge=0, description="How far the held-out mean may fall below the champion's"
    )
    min_held_out: float = Field(0.0, description="With no champion yet, the held-out mean must reach this")


@dataclass
class Decision:
    model_name: str
    challenger: int
    champion: int | None
    passed: bool
    reasons: list[str]
    challenger_scores: dict[str, float]
    champion_scores: dict[str, float] | None
    approved: bool | None = None  # None: no approval was asked for
    comment: str = ""
    promoted: bool = field(default=False)

    def as_dict(self) -> dict:
        return asdict(self)


def decide(
    model_name: str, gates: Gates, challenger: str = "challenger", tracking_uri: str | None = None
) -> Decision:
    """Compare `challenger` (a version number or alias) with the current champion."""
    candidate = resolve_version(model_name, challenger, tracking_uri)
    current = _champion(model_name, tracking_uri)
    mine = scores_of(candidate.run_id, tracking_uri)
    theirs = scores_of(current.run_id, tracking_uri) if current else None
    reasons = []
    if not mine[HELD_IN] >= gates.min_held_in:
        reasons.append(f"held-in {mine[HELD_IN]:.3f} < required {gates.min_held_in:.3f}")
    if theirs is not None:
        floor = theirs[HELD_OUT] - gates.max_held_out_drop
        if not mine[HELD_OUT] >= floor:
            reasons.append(
                f"held-out {mine[HELD_OUT]:.3f} < champion's {theirs[HELD_OUT]:.3f} "
                f"- allowed drop {gates.max_held_out_drop:.3f}"
            )
    elif not mine[HELD_OUT] >= gates.min_held_out:
        reasons.append(f"held-out {mine[HELD_OUT]:.3f} < required {gates.min_held_out:.3f}")
    if current is not None and current.version == candidate.version:
        reasons.append(f"version {candidate.version} is already the champion")
    return Decision(
        model_name,
        candidate.version,
        current.version if current else None,
        passed=not reasons,
        reasons=reasons or ["all gates passed"],
        challenger_scores=mine,
        champion_scores=theirs,
    )


def apply(decision: Decision, tracking_uri: str | None = None) -> Decision:
    """Record the decision on the challenger's version and promote it when it passed and was
    not rejected by a person."""
    client, uri = client_for(tracking_uri)
    decision.promoted = decision.passed and decision.approved is not False
    if decision.champion == decision.challenger:
        return decision  # judging the champion itself changes nothing; its record stays
    tags = {
        "mergeflow.promotion.decision": "promoted" if decision.promoted else "rejected",
        "mergeflow.promotion.reasons": "; ".join(decision.reasons),
        "mergeflow.promotion.compared_with": str(decision.champion) if decision.champion else "none",
        "mergeflow.promotion.held_in": f"{decision.challenger_scores[HELD_IN]:.4f}",
        "mergeflow.promotion.held_out": f"{decision.challenger_scores[HELD_OUT]:.4f}",
    }
    if decision.approved is not None:
        tags["mergeflow.promotion.approved"] = str(decision.approved).lower()
        tags["mergeflow.promotion.comment"] = decision.comment
    try:
        for key, value in tags.items():
            client.set_model_version_tag(decision.model_name, str(decision.challenger), key, value)
        if decision.promoted:
            _set_champion(client, decision.model_name, decision.challenger)
    except MlflowException as error:
        raise RegistryError(
            f"{decision.model_name} at {uri}: recording the promotion failed: {error.message}"
        ) from None
    return decision


def rollback(model_name: str, tracking_uri: str | None = None) -> int:
    """Point `champion` back at the previous champion; returns that version."""
    client, uri = client_for(tracking_uri)
    history = _history(client, model_name)
    if len(history) < 2:
        raise RegistryError(f"{model_name} at {uri}: no previous champion to roll back to")
    previous = history[-2]
    client.set_registered_model_alias(model_name, CHAMPION, str(previous))
    client.set_registered_model_tag(model_name, HISTORY_TAG, ",".join(map(str, history[:-1])))
    return previous


def scores_of(run_id: str, tracking_uri: str | None = None) -> dict[str, float]:
    client, uri = client_for(tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    missing = [key for key in (HELD_IN, HELD_OUT) if key not in metrics or math.isnan(metrics[key])]
    if missing:
        raise RegistryError(f"MLflow run {run_id} at {uri} has no {missing[0]} metric to compare on")
    return {HELD_IN: metrics[HELD_IN], HELD_OUT: metrics[HELD_OUT]}


def _champion(model_name: str, tracking_uri: str | None):
    try:
        return resolve_version(model_name, CHAMPION, tracking_uri)
    except RegistryError:
        return None


def _history(client, model_name: str) -> list[int]:
    value = client.get_registered_model(model_name).tags.get(HISTORY_TAG, "")
    return [int(v) for v in value.split(",") if v]


def _set_champion(client, model_name: str, version: int) -> None:
    history = _history(client, model_name)
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    client.set_registered_model_tag(model_name, HISTORY_TAG, ",".join(map(str, [*history, version])))
