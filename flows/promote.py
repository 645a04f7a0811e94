"""promote: compare the challenger with the champion on the paper's normalised scores, ask a
person when required, record the decision in MLflow and move `champion` when the gates pass.

With `require_approval`, a challenger that passes the gates pauses the run until someone
answers the typed form (approve, comment) in the Prefect UI, or `resume_flow_run(id,
run_input={"approve": ..., "comment": ...})`; the answer is recorded with the decision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field, field_validator

from mergeflow.promotion import HELD_IN, HELD_OUT, Decision, Gates
from tasks.credentials import load_credentials
from tasks.promote import apply_promotion, compare_with_champion


class PromoteRequest(BaseModel):
    model_name: str = Field(description="Registered model, e.g. mergeflow-tiny2m-pt-trained-here")
    # An int too: an event trigger renders `{{ event.payload.version }}` as a number, and the
    # server checks parameters against this schema before the run exists. Always text after.
    challenger: str | int = Field("challenger", description="Version number or alias to judge")
    gates: Gates = Field(default_factory=Gates)
    require_approval: bool = Field(False, description="Pause for a person's approval when the gates pass")
    approval_timeout_s: int = Field(24 * 3600, gt=0, description="How long to wait for the approval")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default from mergeflow settings")

    @field_validator("challenger")
    @classmethod
    def _as_text(cls, value: str | int) -> str:
        return str(value)


class Approval(RunInput):
    approve: bool = Field(description="Promote the challenger to champion?")
    comment: str = Field("", description="Why (recorded in MLflow with the decision)")


@flow(name="promote", log_prints=True)
def promote(request: PromoteRequest) -> dict:
    load_credentials()
    decision = compare_with_champion(
        request.model_name, request.challenger, request.gates, request.tracking_uri
    )
    print(f"{request.model_name} v{decision.challenger} vs champion {decision.champion}: {decision.reasons}")
    if decision.passed and request.require_approval:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(
                description=summary(decision), approve=False, comment=""
            ),
            timeout=request.approval_timeout_s,
        )
        decision.approved, decision.comment = answer.approve, answer.comment
    decision = apply_promotion(decision, request.tracking_uri)
    create_markdown_artifact(
        summary(decision), key="promotion", description=f"{request.model_name} promotion"
    )
    return decision.as_dict()


def summary(decision: Decision) -> str:
    def row(label: str, scores: dict | None) -> str:
        if scores is None:
            return f"| {label} | - | - |"
        return f"| {label} | {scores[HELD_IN]:.3f} | {scores[HELD_OUT]:.3f} |"

    champion = f"champion v{decision.champion}" if decision.champion else "champion (none)"
    verdict = (
        "promoted to champion"
        if decision.promoted
        else ("passes the gates" if decision.passed else "rejected")
    )
    approval = ""
    if decision.approved is not None:
        answer = "approved" if decision.approved else "rejected"
        approval = f"\n\nApproval: {answer} — {decision.comment or 'no comment'}"
    return (
        f"# {decision.model_name}: version {decision.challenger} {verdict}\n\n"
        "| model | held-in ÷ expert | held-out ÷ base |\n|---|---|---|\n"
        f"{row(f'challenger v{decision.challenger}', decision.challenger_scores)}\n"
        f"{row(champion, decision.champion_scores)}"
        f"\n\nGates: {'; '.join(decision.reasons)}{approval}\n"
    )


if __name__ == "__main__":
    # python -m flows.promote request.json
    print(json.dumps(promote(PromoteRequest.model_validate_json(Path(sys.argv[1]).read_text())), indent=2))
