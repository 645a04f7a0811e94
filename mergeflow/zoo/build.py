"""Build a zoo preset: bases, one fully fine-tuned expert per held-in task, a multitask model.

Every model is cached under `MERGEFLOW_ZOO_DIR/models/<name>-<key>`, where the key hashes what
determines it: the parent model's key, the training data, the hyper-parameters and the
architecture. A rebuild with nothing changed only reads the records; a change rebuilds exactly
the models downstream of it. Each folder is written to a staging folder and renamed into place
when complete, with `mergeflow-zoo.json` (role, task, hyper-parameters, metrics) written last.
The preset's index goes to `MERGEFLOW_ZOO_DIR/presets/<preset>.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergeflow.errors import ZooError
from mergeflow.eval import tasks as taskset
from mergeflow.eval.harness import evaluate_loaded
from mergeflow.zoo import RECORD, training, zoo_dir
from mergeflow.zoo.model_cache import (
    NotBuilt,
    cached,
    content_key,
    fingerprint,
    read_record,
    remove_abandoned_stages,
)
from mergeflow.zoo.presets import PRESETS, LlamaSize, Preset


def device() -> torch.device:
    """Train and score on the GPU when there is one; the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(folder: Path):
    from mergeflow.eval.harness import load_model

    model, tokenizer = load_model(folder)
    return model.to(device()), tokenizer


def save(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as transformers_logging

    # A bar per one-file save would cut through the build's own.
    transformers_logging.disable_progress_bar()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Builder:
    def __init__(self, preset: Preset, progress: bool = True):
        self.preset = preset
        self.progress = progress
        self.tasks = list(preset.tasks) if preset.tasks else taskset.held_in_tasks()
        self.built: list[str] = []
        # False for a cache-only pass: a model that is not built raises NotBuilt.
        self.may_build = True
        self._pretraining_texts: list[str] | None = None
        # The tokenizer and each PT base are needed by several later models; resolve them once.
        self._bases: dict[str, tuple[Path, str]] = {}

    def pretraining_texts(self) -> list[str]:
        if self._pretraining_texts is None:
            self._pretraining_texts = taskset.pretraining_texts()
        return self._pretraining_texts

    # -- bases -------------------------------------------------------------------------------
    def tokenizer(self) -> tuple[Path, str]:
        if "tokenizer" in self._bases:
            return self._bases["tokenizer"]
        texts = list(self.pretraining_texts())
        for task in self.preset.tokenizer_tasks or self.tasks:
            texts += taskset.load_task(task)["train"]["prompt"]
        key = content_key(role="tokenizer", vocab=self.preset.vocab_size, texts=fingerprint(texts))

        def build(stage: Path) -> dict:
            from mergeflow.zoo.tokenizer import train_tokenizer

            train_tokenizer(texts, self.preset.vocab_size).save_pretrained(stage)
            return {"role": "tokenizer", "vocab_size": self.preset.vocab_size}

        folder, _ = self._cached(f"tokenizer-bpe{self.preset.vocab_size // 1024}k-trained-here", key, build)
        self._bases["tokenizer"] = folder, key
        return folder, key

    def pretrained(self, size: LlamaSize) -> tuple[Path, str]:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if f"pt-{size.name}" in self._bases:
            return self._bases[f"pt-{size.name}"]
        tokenizer_folder, tokenizer_key = self.tokenizer()
        spec = training.resolved_precision(self.preset.pretrain, device())
        texts = self.pretraining_texts()
        key = content_key(
            role="pt",
            size=asdict(size),
            spec=spec.as_dict(),
            tokenizer=tokenizer_key,
            texts=fingerprint(texts),
        )

        def build(stage: Path) -> dict:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=size.hidden_size,
                num_hidden_layers=size.num_layers,
                intermediate_size=size.intermediate_size,
                num_attention_heads=size.num_heads,
                num_key_value_heads=size.num_heads,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config).to(device())
            sequences = training.text_windows(tokenizer, texts, spec.max_len)
            stats = self._train_and_save(stage, model, tokenizer, sequences, spec, f"pre-train {size.name}")
            return {
                "role": "base",
                "stage": "pt",
                "size": size.name,
                "train": spec.as_dict(),
                "parameters": model.num_parameters(),
                "data": "pretraining_texts",
                "stats": stats,
            }

        folder, _ = self._cached(family_name(size, "pt"), key, build)
        self._bases[f"pt-{size.name}"] = folder, key
        return folder, key

    def instruction_tuned(self, size: LlamaSize) -> tuple[Path, str]:
        parent, parent_key = self.pretrained(size)
        spec = training.resolved_precision(self.preset.instruct, device())
        mixture = taskset.instruction_mixture(self.preset.instruct_examples, seed=spec.seed)
        key = content_key(
            role="it", parent=parent_key, spec=spec.as_dict(), data=fingerprint(mixture.to_dict())
        )

        def build(stage: Path) -> dict:
            model, tokenizer = load(parent)
            sequences = training.dataset_sequences(tokenizer, mixture, spec.max_len)
            stats = self._train_and_save(
                stage, model, tokenizer, sequences, spec, f"instruction-tune {size.name}"
            )
            return {
                "role": "base",
                "stage": "it",
                "size": size.name,
                "parent": parent.name,
                "train": spec.as_dict(),
                "parameters": model.num_parameters(),
                "data": "instruction_mixture",
                "stats": stats,
            }

        folder, _ = self._cached(family_name(size, "it"), key, build)
        return folder, key

    def real_base(self) -> tuple[Path, str]:
        from mergeflow.zoo.smollm2 import smollm2_base

        folder = smollm2_base()
        return folder, content_key(role="real-base", record=read_record(folder))

    # -- experts -----------------------------------------------------------------------------
    def fine_tuned(self, base: Path, base_key: str, family: str, task: str | None) -> tuple[Path, dict]:
        """An expert for `task`, or the multitask model when task is None."""
        spec = training.resolved_precision(
            self.preset.expert_spec(task) if task else self.preset.multitask, device()
        )
        names = [task] if task else self.tasks
        splits = [taskset.load_task(name)["train"] for name in names]
        data_key = fingerprint([split.to_dict() for split in splits])
        key = content_key(
            role="expert" if task else "multitask", parent=base_key, spec=spec.as_dict(), data=data_key
        )

        def build(stage: Path) -> dict:
            model, tokenizer = load(base)
            sequences = [
                s for split in splits for s in training.dataset_sequences(tokenizer, split, spec.max_len)
            ]
            stats = self._train_and_save(
                stage, model, tokenizer, sequences, spec, f"{family} {task or 'multitask'}"
            )
            validation = evaluate_loaded(model, tokenizer, names, "validation")
            return {
                "role": "expert" if task else "multitask",
                "family": family,
                "task": task,
                "tasks": names,
                "parent": base.name,
                "train": spec.as_dict(),
                "stats": stats,
                "validation_accuracy": validation,
            }

        folder, record = self._cached(f"{family}--{task or 'multitask'}", key, build)
        return folder, record

    def base_accuracy(self, base: Path) -> dict[str, float]:
        """Validation accuracy of a base on the preset's tasks, cached in a file beside it; a task
        added to the preset is scored and added to the file."""
        path = base / "mergeflow-zoo-base-accuracy.json"
        scores = json.loads(path.read_text()) if path.is_file() else {}
        missing = [task for task in self.tasks if task not in scores]
        if not missing:
            return scores
        if not self.may_build:
            raise NotBuilt(f"{base.name} scores")
        model, tokenizer = load(base)
        scores |= evaluate_loaded(model, tokenizer, missing, "validation")
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(scores, indent=2) + "\n")
        tmp.rename(path)
        return scores

    def family(self, family: str, base: Path, base_key: str, stage: str, size: str) -> dict:
        base_scores = self.base_accuracy(base)
        experts, rows = {}, []
        for task in self.tasks:
            folder, record = self.fine_tuned(base, base_key, family, task)
            experts[task] = str(folder)
            expert_score = record["validation_accuracy"][task]
            rows.append(
                {
                    "family": family,
                    "task": task,
                    "base": base_scores[task],
                    "expert": expert_score,
                    "gain": expert_score - base_scores[task],
                }
            )
        multitask, multitask_record = self.fine_tuned(base, base_key, family, None)
        for row in rows:
            row["multitask"] = multitask_record["validation_accuracy"][row["task"]]
        return {
            "base": str(base),
            "stage": stage,
            "size": size,
            "experts": experts,
            "multitask": str(multitask),
            "table": rows,
        }

    def _train_and_save(self, stage: Path, model, tokenizer, sequences, spec, description: str) -> dict:
        stats = training.train(model, sequences, spec, _pad_id(tokenizer), description, self.progress)
        save(model, tokenizer, stage)
        return stats

    def _cached(self, name: str, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
        folder, record, built = cached(name, key, build if self.may_build else None)
        if built:
            self.built.append(folder.name)
        if self.progress:
            tqdm.write(f"{'built ' if built else 'cached'} {folder.name}")
        return folder, record


def family_name(size: LlamaSize, stage: str) -> str:
    return f"tiny{size.name}-{stage}-trained-here"


def _families(builder: Builder) -> dict[str, dict]:
    """Each family's base, experts, multitask model and expert-vs-base table, building what is
    missing one model after another."""
    preset = builder.preset
    families = {}
    if preset.real_base:
        base, key = builder.real_base()
        families[preset.real_base] = builder.family(preset.real_base, base, key, "it", "135m")
    for size in preset.sizes:
        for stage in preset.stages:
            base, key = builder.pretrained(size) if stage == "pt" else builder.instruction_tuned(size)
            family = family_name(size, stage)
            families[family] = builder.family(family, base, key, stage, size.name)
    return families


def build_preset(preset: str | Preset, progress: bool = True, workers: int = 1) -> dict:
    """Build (or reuse) every model of a preset, check the experts, write the preset index.
    With `workers` > 1 the models are trained in that many processes at once
    (`mergeflow.zoo.parallel`); the models are the same whatever the number.
    Raises ZooError, after writing the index, when an expert does not beat its base clearly."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ZooError(f"unknown zoo preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    if workers < 1:
        raise ZooError(f"workers must be at least 1, got {workers}")
    name = preset.name
    remove_abandoned_stages()
    builder = Builder(preset, progress)
    families = None
    if workers > 1:
        # Workers take seconds to start: only when something is missing.
        builder.may_build = False
        try:
            families = _families(builder)
        except NotBuilt:
            from mergeflow.zoo.parallel import build_in_workers

            builder.may_build = True
            build_in_workers(builder, workers)
            # Everything is built now; the pass below only reads the records, quietly.
            builder.progress = False
    if families is None:
        families = _families(builder)
    index = {
        "preset": name,
        "description": preset.description,
        "min_gain": preset.min_gain,
        "tasks": builder.tasks,
        "families": families,
        "built_now": builder.built,
    }
    folder = zoo_dir() / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(index, indent=2) + "\n")
    weak = [row for fam in families.values() for row in fam["table"] if row["gain"] < preset.min_gain]
    if weak:
        listing = "; ".join(
            f"{r['family']}/{r['task']}: base {r['base']:.2f} expert {r['expert']:.2f}" for r in weak
        )
        raise ZooError(f"{len(weak)} expert(s) do not beat their base by {preset.min_gain:.2f}: {listing}")
    return index


def load_index(name: str) -> dict:
    path = zoo_dir() / "presets" / f"{name}.json"
    if not path.is_file():
        raise ZooError(
            f"zoo preset {name!r} is not built ({path} missing); run: mergeflow zoo build --preset {name}"
        )
    return json.loads(path.read_text())


def built_models() -> list[dict]:
    """Records of every complete model in the zoo folder, for `mergeflow zoo list`."""
    folder = zoo_dir() / "models"
    records = []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (child / RECORD).is_file():
            size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
            records.append({**read_record(child), "path": str(child), "bytes": size})
    return records
