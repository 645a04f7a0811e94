"""Every command has --help; `methods` lists the registry; `zoo generate` writes a zoo."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import mergeflow
from mergeflow.checkpoint import MANIFEST
from mergeflow.cli import app, merge_command, parse_size
from mergeflow.engine import merge
from mergeflow.methods import ALIASES, METHODS
from mergeflow.safetensors_io import read_header
from mergeflow.storage import locate


def all_commands(group=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command path of the CLI, walked from the app itself."""
    group = group or typer.main.get_command(app)
    paths = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            paths += all_commands(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def test_the_walk_finds_the_commands():
    assert {("merge",), ("expert", "publish"), ("stack", "up"), ("promote",), ("report",)} <= set(
        all_commands()
    )


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "mergeflow")
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert "TODO" not in result.output


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "mergeflow")
def test_help_paragraphs_have_no_line_breaks_of_their_own(command):
    """typer's rich help keeps a line break inside a paragraph (after the first, which a group's
    listing shows as written), so a docstring wrapped at the source's width prints ragged."""
    found = typer.main.get_command(app)
    for name in command:
        found = found.commands[name]
    for paragraph in inspect.cleandoc(found.help or "").split("\n\n"):
        assert "\n" not in paragraph, paragraph


def test_methods_lists_every_method_and_alias():
    output = CliRunner().invoke(app, ["methods"]).output
    for name in METHODS:
        assert name in output
    for alias in ALIASES:
        assert f"alias: {alias}" in output


def test_zoo_generate_writes_base_and_experts(tmp_path):
    result = CliRunner().invoke(
        app, ["zoo", "generate", str(tmp_path / "z"), "--experts", "2", "--layers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["base", "expert_0", "expert_1", "zoo.json"]
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["spec"]["num_experts"] == 2


@pytest.mark.parametrize(("text", "expected"), [("200MB", 200_000_000), ("2GB", 2_000_000_000), ("512", 512)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_the_merge_command_and_the_python_api_shard_alike():
    default = inspect.signature(merge_command).parameters["shard_size"].default
    assert parse_size(default) == inspect.signature(merge).parameters["max_shard_bytes"].default


def test_parse_size_rejects_nonsense():
    import typer

    for nonsense in ("lots", "0", "0GB"):  # a shard size of 0 gave a shard per tensor
        with pytest.raises(typer.BadParameter):
            parse_size(nonsense)
    # mergekit's --out-shard-size 5B is 5 billion parameters; here it would be 5 bytes
    with pytest.raises(typer.BadParameter, match="'5B' is 5 bytes: sizes here are in bytes"):
        parse_size("5B")


def test_a_merge_process_waits_without_spinning_unless_the_user_says_otherwise():
    # The settings only take effect before torch loads, so each case runs in a fresh process.
    script = (
        "import os, sys; from mergeflow.cli import _threads_for_command; _threads_for_command(sys.argv[1:]);"
        "print(os.environ['GOMP_SPINCOUNT'], os.environ['OPENBLAS_NUM_THREADS'])"
    )
    ours = ("GOMP_SPINCOUNT", "MERGEFLOW_SET_GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in ours}

    def settings(*args: str, **extra: str) -> list[str]:
        run = subprocess.run(
            [sys.executable, "-c", script, *args], env=env | extra, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert settings("-v", "merge", "config.yaml") == [mergeflow.MERGE_SPIN_COUNT, "1"]
    assert settings("zoo", "build") == [mergeflow.TRAINING_SPIN_COUNT, "1"]
    assert settings("merge", "config.yaml", GOMP_SPINCOUNT="5", OPENBLAS_NUM_THREADS="2") == ["5", "2"]
    # Started by a process that imported mergeflow (this one): the spin count it inherits is
    # mergeflow's default, not the user's.
    inherited = {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "MERGEFLOW_SET_GOMP_SPINCOUNT")}
    assert inherited["GOMP_SPINCOUNT"] == mergeflow.TRAINING_SPIN_COUNT
    assert settings("merge", "config.yaml", **inherited) == [mergeflow.MERGE_SPIN_COUNT, "1"]


KERNEL_MODULE = """
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def doubled_total(x):
    doubled = np.empty(x.size, np.float64)  # allocates: needs numba's runtime
    for j in prange(x.size):
        doubled[j] = 2.0 * x[j]
    return doubled.sum()
"""

RUN_KERNELS = (
    "import json, sys, numpy as np\n"
    "from mergeflow.methods.kernels import load_cached_kernels_without_compiler_setup\n"
    "def compiling(): print('compiling', file=sys.stderr)\n"
    "if sys.argv[1] == 'merge-command': load_cached_kernels_without_compiler_setup(on_compile=compiling)\n"
    "from tiny_kernel import doubled_total\n"
    "from mergeflow.methods.primitives import merge_task_vectors\n"
    "total = doubled_total(np.arange(10.0))\n"
    "models = np.arange(12, dtype=np.float32).reshape(3, 4) - 5\n"
    "merged = merge_task_vectors(models, np.zeros(4, np.float32), np.ones(3, np.float32),\n"
    "    consensus=True, normalize=True, lam=1.0, keys=[1, 2, 3], density=np.full(3, 0.5),\n"
    "    scale=np.full(3, 2.0, np.float32))\n"
    "set_up = 'numba.np.arraymath' in sys.modules\n"
    "print(json.dumps([total, merged.tolist(), set_up]))\n"
)


def test_the_merge_command_loads_cached_kernels_without_numba_compiler_setup_and_still_compiles(tmp_path):
    # Fresh processes: this one has set numba's compiler up already. The first run compiles
    # the tiny kernel (a cache miss: the compiler sets itself up), the next ones load it cached.
    (tmp_path / "tiny_kernel.py").write_text(KERNEL_MODULE)

    said_compiling = []

    def kernel_results(setup: str) -> list:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        command = [sys.executable, "-c", RUN_KERNELS, setup]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        said_compiling.append("compiling" in run.stderr)
        return json.loads(run.stdout)

    *compiled, compiler_set_up = kernel_results("merge-command")
    assert compiler_set_up
    *cached, compiler_set_up = kernel_results("merge-command")
    assert not compiler_set_up  # for the cached tiny kernel and mergeflow's kernels alike
    assert said_compiling == [True, False]  # the user is told why a first merge takes longer
    *stock, _ = kernel_results("numba-as-it-is")
    assert compiled == cached == stock
    assert compiled[0] == 90.0


RUN_MERGE_COMMAND = (
    "import json, sys, threading\n"
    "sys.argv = ['mergeflow', *sys.argv[1:]]\n"
    "from mergeflow.cli import app\n"
    "try:\n"
    "    app()\n"
    "except SystemExit as exit:\n"
    "    assert not exit.code, exit.code\n"
    "print(json.dumps(sorted(m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules)))\n"
)


def test_a_merge_of_local_models_never_imports_the_s3_libraries(zoo, tmp_path):
    # fsspec alone took 0.04 s of a 1 s merge to import; S3 locations import it when used.
    config = tmp_path / "merge.yaml"
    config.write_text(
        json.dumps(
            {
                "merge_method": "task_arithmetic",
                "base_model": zoo["base"],
                "models": [{"model": zoo["expert_0"]}],
            }
        )
    )
    env = {**os.environ, "MERGEFLOW_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-c",
        RUN_MERGE_COMMAND,
        "merge",
        str(config),
        "--out",
        str(tmp_path / "out"),
        "-q",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / MANIFEST).is_file()
    assert json.loads(run.stdout.splitlines()[-1]) == []


def test_a_dry_run_checks_what_the_merge_checks_and_writes_nothing(zoo, tmp_path):
    config = tmp_path / "merge.yaml"
    ties = {
        "merge_method": "ties",
        "base_model": zoo["base"],
        "models": [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}],
        "parameters": {"density": 0.5},
    }
    config.write_text(json.dumps(ties))
    out = tmp_path / "out"
    checked = CliRunner().invoke(
        app, ["merge", str(config), "-o", str(out), "--shard-size", "100KB", "--dry-run"]
    )
    assert checked.exit_code == 0, checked.output
    assert not out.exists()
    merged = CliRunner().invoke(app, ["merge", str(config), "-o", str(out), "--shard-size", "100KB", "-q"])
    assert merged.exit_code == 0, merged.output
    shards = sorted(out.glob("*.safetensors"))
    entries = [e for shard in shards for e in read_header(locate(str(shard)))]
    assert checked.output.strip() == (
        f"checked: ties of 3 models would write {len(entries)} tensors "
        f"({sum(e.nbytes for e in entries) / 1e6:.1f} MB) in {len(shards)} shards into {out}; nothing written"
    )
    # a refusal is the merge's, and the output stays as it was
    ties["models"].append({"model": zoo["expert_0"]})
    config.write_text(json.dumps(ties))
    refused = CliRunner().invoke(app, ["merge", str(config), "-o", str(tmp_path / "other"), "--dry-run"])
    assert refused.exit_code == 2
    assert refused.output.strip() == (
        f"error: {config}: models[2]: '{zoo['expert_0']}' is listed already, as models[0]; "
        "give it a weight to count it more"
    )
    assert not (tmp_path / "other").exists()
