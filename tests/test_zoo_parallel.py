"""Zoo builds in worker processes: the same models as one process builds, a failing step named and
the workers stopped, nothing half-built left behind."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import MICRO

from mergeflow.errors import ZooError
from mergeflow.scratch import process_tagged
from mergeflow.zoo import parallel
from mergeflow.zoo.build import build_preset
from mergeflow.zoo.model_cache import remove_abandoned_stages


def _models(zoo: Path) -> dict[str, dict[str, str]]:
    """The sha256 of every model folder's weight files, by folder name (which carries the
    content key). Digests, not bytes: pytest's diff of two differing byte strings takes hours."""
    return {
        folder.name: {
            file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in folder.glob("*.safetensors")
        }
        for folder in (zoo / "models").iterdir()
    }


def _workers_alive() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "mergeflow.zoo.worker" in " ".join(child.cmdline())
    ]


def test_two_workers_build_the_models_one_process_builds_bit_for_bit(tmp_path, monkeypatch):
    # Both builds train every model on one thread: on some CPUs (this project's Intel Xeon, not
    # its AMD EPYC) a training's last bits depend on its thread count (docs/zoo.md, Workers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        builds = {}
        for workers in (1, 2):
            folder = tmp_path / f"{workers}-workers"
            monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
            index = build_preset(MICRO, progress=False, workers=workers)
            builds[workers] = (_models(folder), index)
    finally:
        torch.set_num_threads(threads)
    (serial, serial_index), (ours, index) = builds[1], builds[2]
    assert len(index["built_now"]) == 7  # tokenizer, PT and IT bases, an expert and a multitask model each
    assert len(ours) == 7 and ours == serial
    for family, expected in serial_index["families"].items():
        assert index["families"][family]["table"] == expected["table"]
    assert not _workers_alive()

    # Built: a rebuild reads the cache without starting workers.
    def no_workers(*args):
        raise AssertionError("workers started for a preset that is built")

    monkeypatch.setattr(parallel, "build_in_workers", no_workers)
    assert build_preset(MICRO, progress=False, workers=2)["built_now"] == []


def test_a_failing_step_names_itself_and_stops_the_other_workers(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    # Same tokenizer and bases (cached); the step that scores or trains on the unknown task fails.
    broken = dataclasses.replace(MICRO, tasks=("text_genre", "no_such_task"), tokenizer_tasks=("text_genre",))
    with pytest.raises(ZooError, match=r"^tinymicro-(pt|it)-trained-here .*unknown task 'no_such_task'"):
        build_preset(broken, progress=False, workers=2)
    assert not _workers_alive()
    assert not list((folder / "models").glob(".*.partial-*"))


def test_a_worker_that_cannot_start_gives_a_clear_error_not_a_hang(micro_zoo, monkeypatch):
    folder, _ = micro_zoo
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(folder))
    monkeypatch.setattr(parallel.sys, "executable", "/bin/false")  # exits at once, status 1
    changed = dataclasses.replace(MICRO, multitask=dataclasses.replace(MICRO.multitask, steps=11))
    # Which of the two dead workers is heard first, the idle one or the one given the step, varies.
    stopped = r"zoo worker .* stopped (before its first step|on pt micro), exit code 1"
    with pytest.raises(ZooError, match=stopped):
        build_preset(changed, progress=False, workers=2)


def test_staging_folders_of_ended_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_ZOO_DIR", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    models = tmp_path / "models"
    abandoned = models / process_tagged(".tinymicro-pt-trained-here-0123.partial", ended.pid)
    live = models / process_tagged(".tinymicro-it-trained-here-4567.partial", psutil.Process().pid)
    for stage in (abandoned, live):
        stage.mkdir(parents=True)
        (stage / "model.safetensors").write_bytes(b"half")
    remove_abandoned_stages()
    assert not abandoned.exists() and live.exists()


def test_workers_are_refused_below_one():
    with pytest.raises(ZooError, match="workers must be at least 1"):
        build_preset(MICRO, progress=False, workers=0)
