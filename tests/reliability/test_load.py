"""Load: 20 `mergeflow.expert.landed` events in a burst, on the real stack and a process worker.
They must be coalesced (a few expert sets merged, not one merge per event) and every run and
merge must complete. Slow (minutes): `./dev test --slow`, or `bench/landing_load.py`, which
records the time and peak memory this test measures."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file
from stack_helpers import merge_runs, runs_of, wait_for_runs, with_env

from mergeflow.events import EXPERT_LANDED, emit
from mergeflow.experts import base_uri, publish_expert

pytestmark = pytest.mark.slow

BASE = "tinymicro-load"
LANDINGS = 20


class PeakMemory:
    """Samples, every 0.5 s, the summed RSS of every process this test started (stack servers,
    worker, flow runs): the peak, and the processes it was taken over."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.processes_at_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            total, count = 0, 0
            for process in psutil.Process().children(recursive=True):
                try:
                    total += process.memory_info().rss
                    count += 1
                except psutil.Error:  # ended between listing and reading
                    continue
            if total > self.peak_bytes:
                self.peak_bytes, self.processes_at_peak = total, count


def variant(source: str, folder: Path, number: int) -> Path:
    """A copy of a model with one weight nudged: same shapes, a content hash of its own."""
    shutil.copytree(source, folder)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        name = sorted(tensors)[0]
        tensors[name].view(-1)[0] += (number + 1) * 1e-4
        save_file(tensors, shard, metadata={"format": "pt"})
        break
    return folder


def test_a_burst_of_20_landings_is_coalesced_and_every_merge_completes(stack, deployed, micro_zoo, tmp_path):
    settings, _, s3 = stack
    env, api = deployed, deployed["PREFECT_API_URL"]
    store = f"s3://{settings.bucket}"
    family = micro_zoo[1]["families"]["tinymicro-it-trained-here"]
    sources = {"text_genre": family["experts"]["text_genre"], "topic": family["multitask"]}
    landings = [
        (task, variant(sources[task], tmp_path / f"{task}-{i}", i))
        for i in range(LANDINGS)
        for task in [("text_genre", "topic")[i % 2]]
    ]
    runs_before, merges_before = len(runs_of(api, "merge-on-landing")), set(merge_runs(api))

    started = time.monotonic()
    with PeakMemory() as memory:
        latest = {}
        for number, (task, folder) in enumerate(landings):
            base_model = Path(family["base"]) if number == 0 else None
            expert = with_env(env, publish_expert, folder, BASE, task, store, base_model)
            emit(EXPERT_LANDED, expert.uri, expert.payload(base_uri(store, BASE)), expert.sha256, api_url=api)
            latest[task] = expert.uri
        published_s = time.monotonic() - started
        wait_for_runs(api, "merge-on-landing", runs_before + LANDINGS, timeout=1800)
    elapsed_s = time.monotonic() - started

    claims = []
    for entry in s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"landings/{BASE}/")["Contents"]:
        claims.append(json.loads(s3.get_object(Bucket=settings.bucket, Key=entry["Key"])["Body"].read()))
    assert [c["status"] for c in claims] == ["done"] * len(claims)
    assert 1 <= len(claims) <= 2, "a burst must be coalesced into one or two expert sets"
    assert latest in [c["experts"] for c in claims], "the last expert of each task was merged"
    merges = set(merge_runs(api)) - merges_before
    assert len(merges) == 4 * len(claims)  # the four paper methods per set, nothing more

    measured = {
        "landings": LANDINGS,
        "published_s": round(published_s, 1),
        "all_runs_final_s": round(elapsed_s, 1),
        "expert_sets_merged": len(claims),
        "merge_runs": len(merges),
        "peak_rss_mib": round(memory.peak_bytes / 2**20),
        "processes_at_peak": memory.processes_at_peak,
    }
    print("landing load:", json.dumps(measured))
    if os.environ.get("MERGEFLOW_BENCH_OUT"):
        Path(os.environ["MERGEFLOW_BENCH_OUT"]).write_text(json.dumps(measured, indent=2) + "\n")
