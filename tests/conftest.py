"""Shared fixtures: a small generated Llama zoo on real files, and file helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Hash caches and other state go to a throwaway folder, never the user's ~/.cache.
os.environ.setdefault("MERGEFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="mergeflow-test-cache-"))

from mergeflow.model_card import MODEL_CARD  # noqa: E402
from mergeflow.zoo.build import build_preset  # noqa: E402
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo, llama_config  # noqa: E402
from mergeflow.zoo.presets import MIXED, LlamaSize, Preset  # noqa: E402
from mergeflow.zoo.training import TrainSpec  # noqa: E402

ROOT = Path(__file__).parent.parent

# The S3 server and S3 zoo fixtures (tests/s3_zoo.py) for test_s3 and reliability/test_bad_s3.
pytest_plugins = ["s3_zoo"]
SMALL_ZOO = GeneratedZooSpec(num_experts=4, shard_bytes=60_000)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, str]:
    """base + 4 experts with conflicting task vectors, sharded into several files each."""
    return build_generated_zoo(tmp_path_factory.mktemp("zoo"), SMALL_ZOO)


# Micro models trained here in seconds; named so nobody mistakes them for the real zoo.
MICRO = Preset(
    name="micro-test",
    description="test-only micro zoo",
    sizes=(LlamaSize("micro", hidden_size=128, num_layers=2, intermediate_size=256, num_heads=4),),
    vocab_size=4096,
    # In tiny's precisions: bases in float32, experts and multitask mixed where the CPU has
    # bfloat16 natively (float32 elsewhere).
    pretrain=TrainSpec(steps=10, lr=3e-3, batch_size=8, max_len=64, warmup_steps=2),
    instruct=TrainSpec(steps=10, lr=1e-3, batch_size=8, max_len=64, warmup_steps=2),
    # At lr 3e-3 the expert gained +0.02 on 300 validation examples; +0.16 at 1e-3, tiny's rate.
    expert=TrainSpec(steps=100, lr=1e-3, batch_size=16, max_len=96, precision=MIXED),
    multitask=TrainSpec(steps=20, lr=3e-3, batch_size=16, max_len=64, precision=MIXED),
    instruct_examples=200,
    tasks=("text_genre",),
)


def random_llama(vocab_size: int, tie_word_embeddings: bool = False):
    """A 2-layer Llama with seeded random weights, for checking computations on a real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = GeneratedZooSpec(hidden_size=32, num_layers=2, vocab_size=vocab_size, intermediate_size=64)
    torch.manual_seed(0)
    config = llama_config(spec) | {"tie_word_embeddings": tie_word_embeddings}
    return LlamaForCausalLM(LlamaConfig.from_dict(config))


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """(zoo folder, preset index) of MICRO: PT and IT bases, a text_genre expert and a multitask
    model each. MERGEFLOW_ZOO_DIR points at it while the fixture is built."""
    folder = tmp_path_factory.mktemp("micro-zoo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
        index = build_preset(MICRO, progress=False)
    return folder, index


def rewrite_safetensors(file: Path, edit) -> None:
    """Load the tensors of `file`, let `edit` change the dict in place, save them back."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def but_the_model_card(manifest: dict) -> list[dict]:
    """The files a merge's manifest lists but its model card, which names the inputs as the
    config did: merges of the same models named otherwise (S3 or local, repo id or path)."""
    return [f for f in manifest["files"] if f["path"] != MODEL_CARD]


def load_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's ephemeral API, one for the session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def settled_task_runs(ready, flow_run_id=None, timeout: float = 180.0) -> list:
    """The task runs (of one flow run, or all of them), once `ready(runs)` holds and every run has a
    final state: the server records task run states from events, a moment after a flow returns
    (over a minute, once, late in a full run on 2 busy cores)."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=flow_runs)

    deadline = time.monotonic() + timeout
    while True:
        runs = asyncio.run(read())
        # A task run can be listed before its first state has arrived: its state is None then.
        settled = all(r.state is not None and r.state.is_final() for r in runs) and ready(runs)
        if settled:
            return runs
        if time.monotonic() > deadline:
            names = sorted(f"{r.name} ({r.state.name if r.state else 'no state'})" for r in runs)
            raise AssertionError(f"the task runs did not settle within {timeout:.0f}s: {names}")
        time.sleep(0.5)


def state_name(task_run) -> str:
    return task_run.state.name if task_run.state else "no state yet"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, micro_zoo):
    """The whole stack (SeaweedFS, MLflow server, Prefect server) on free ports for the session:
    (settings, environment of a client of it, S3 client). The micro zoo is its MERGEFLOW_ZOO_DIR."""
    from s3_server import free_ports
    from stack_helpers import sourced, stack_env

    from mergeflow.settings import Settings
    from mergeflow.stack import S3Credentials, down, s3_client, up

    home = tmp_path_factory.mktemp("e2e-home")
    ports = free_ports(3)
    settings = Settings(home=home, s3_port=ports[0], mlflow_port=ports[1], prefect_port=ports[2])
    try:
        up(settings, timeout=180)
        env = sourced(home / "stack" / "env.sh", stack_env(home, ports))
        env |= {
            "MERGEFLOW_ZOO_DIR": str(micro_zoo[0]),
            "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-client")),
            "PYTHONPATH": str(ROOT),
        }
        s3 = s3_client(
            env["MERGEFLOW_S3_ENDPOINT_URL"],
            S3Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]),
        )
        yield settings, env, s3
    finally:
        down(settings)


@pytest.fixture(scope="session")
def deployed(stack, tmp_path_factory):
    """Deployments created from prefect.yaml and a process worker serving them, for the session:
    the stack's client environment, tuned so the worker polls every 2 s."""
    from stack_helpers import background, prefect

    _, env, _ = stack
    env = env | {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    prefect(env, "work-pool", "create", "mergeflow", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with background("prefect", ["worker", "start", "--pool", "mergeflow"], env, log):
        yield env


# --- the reliability suite's count (tests/reliability) ----------------------------------------
# Every test there is a bad input (test_bad_*.py: a clear error naming the culprit, nothing
# partial left) or a fault (test_faults.py: real servers failing mid-work, nothing lost, a
# re-run completes). The summary line goes into the README.

KINDS = {"test_bad_": "bad_input", "test_faults": "fault"}
_outcomes: dict[str, dict[str, int]] = {"bad_input": {}, "fault": {}}


def kind_of(path: Path) -> str | None:
    if path.parent.name != "reliability":
        return None
    return next((kind for prefix, kind in KINDS.items() if path.name.startswith(prefix)), None)


def pytest_collection_modifyitems(items):
    for item in items:
        kind = kind_of(Path(str(item.fspath)))
        if kind:
            item.add_marker(getattr(pytest.mark, kind))


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    kind = kind_of(Path(report.fspath))
    if kind:
        counts = _outcomes[kind]
        counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    bad, faults = _outcomes["bad_input"], _outcomes["fault"]
    if not bad and not faults:
        return
    failed = bad.get("failed", 0) + faults.get("failed", 0)
    terminalreporter.write_line(
        f"reliability: {bad.get('passed', 0)} bad inputs refused clearly / "
        f"{faults.get('passed', 0)} faults survived / "
        + ("data lost: 0" if not failed else f"{failed} FAILED: see above")
    )
