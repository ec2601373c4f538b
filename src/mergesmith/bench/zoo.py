"""The benchmark zoo: families of small models built locally, deterministically, and cached.

A *family* is one shared pretrained base plus experts fine-tuned from it on clearly different tasks
(and a multi-task model as the upper bound), all trained by the family's own builder on data that
needs no download. Families register themselves in :data:`FAMILIES`; :func:`get_zoo` builds a family
once into ``$MERGESMITH_CACHE/zoo/<family>-<version>`` (default cache ``~/.cache/mergesmith``) and
reuses it afterwards.

On disk (every model is a folder that :func:`mergesmith.io.checkpoint.open_checkpoint` reads)::

    <family>-<version>/zoo.json            manifest: tasks, metric, model folders, quality numbers
    <family>-<version>/base/               config.json + model.safetensors
    <family>-<version>/experts/<task>/
    <family>-<version>/multitask/
    <family>-<version>/eval/               frozen heads / validation data used by the evaluator

The build runs in a temporary folder beside the target and is renamed at the end, so an interrupted
build leaves nothing half-written behind.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..methods.base import MergeError

FAMILY_MODULES = ("mergesmith.bench.zoo_classify", "mergesmith.bench.zoo_bytegpt")
DEMO_FAMILY = "classify"


@dataclass
class Family:
    """A zoo family. ``build(folder, config, seed, log) -> manifest`` trains and saves every model;
    ``evaluator(zoo)`` returns an object with ``evaluate(state_dict) -> {task: value}``."""

    name: str
    version: str
    description: str
    metric: str  # e.g. "accuracy", "loss"
    higher_is_better: bool
    sizes: dict[str, dict]  # size name -> builder config; "default" is what demo/bench use
    build: Callable[[Path, dict, int, Callable[[str], None]], dict]
    evaluator: Callable[["Zoo"], Any]
    merge_note: str = ""  # what is merged (e.g. "body only; each task keeps its head")


FAMILIES: dict[str, Family] = {}
_LOADED = False


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def _load_families() -> None:
    global _LOADED
    if not _LOADED:
        for mod in FAMILY_MODULES:
            importlib.import_module(mod)
        _LOADED = True


def get_family(name: str) -> Family:
    _load_families()
    if name not in FAMILIES:
        raise MergeError(f"unknown zoo '{name}'; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def list_families() -> list[Family]:
    _load_families()
    return [FAMILIES[k] for k in sorted(FAMILIES)]


def cache_root() -> Path:
    """``$MERGESMITH_CACHE`` or ``$XDG_CACHE_HOME/mergesmith`` or ``~/.cache/mergesmith``."""
    env = os.environ.get("MERGESMITH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mergesmith"


def zoo_dir(family: Family, size: str = "default", seed: int = 0) -> Path:
    """``<cache>/zoo/<family>-<version>``; other sizes and seeds get a suffix."""
    name = f"{family.name}-{family.version}"
    if size != "default":
        name += f"-{size}"
    if seed != 0:
        name += f"-seed{seed}"
    return cache_root() / "zoo" / name


@dataclass
class Zoo:
    """A built family on disk."""

    family: Family
    root: Path
    manifest: dict
    _evaluator: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def path(self, which: str) -> Path:
        """Folder of ``base``, ``multitask`` or an expert (given by its task name)."""
        models = self.manifest["models"]
        if which in ("base", "multitask"):
            return self.root / models[which]
        if which in models["experts"]:
            return self.root / models["experts"][which]
        raise MergeError(f"zoo {self.name} has no model '{which}' (tasks: {', '.join(self.tasks)})")

    def expert_paths(self) -> list[Path]:
        return [self.path(t) for t in self.tasks]

    def state_dict(self, which: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.path(which) / "model.safetensors"))

    @property
    def evaluator(self):
        if self._evaluator is None:
            self._evaluator = self.family.evaluator(self)
        return self._evaluator

    def evaluate(self, state_dict: dict) -> dict[str, float]:
        """Per-task metric of a model given as a state dict of the base's tensors."""
        return self.evaluator.evaluate(state_dict)


def _valid(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / "zoo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not manifest.get("complete"):
        return None
    models = manifest.get("models", {})
    folders = [models.get("base"), models.get("multitask"), *models.get("experts", {}).values()]
    if not all(f and (root / f / "model.safetensors").exists() for f in folders):
        return None
    return manifest


def get_zoo(
    name: str,
    *,
    size: str = "default",
    seed: int = 0,
    rebuild: bool = False,
    root: Path | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> Zoo:
    """Load the zoo ``name`` from the cache, building it first when missing (or when ``rebuild``)."""
    family = get_family(name)
    if size not in family.sizes:
        raise MergeError(f"zoo '{name}' has no size '{size}'; sizes: {', '.join(family.sizes)}")
    target = Path(root) if root is not None else zoo_dir(family, size, seed)
    manifest = None if rebuild else _valid(target)
    if manifest is None:
        manifest = build_zoo(family, target, size=size, seed=seed, log=log, threads=threads)
    return Zoo(family, target, manifest)


def build_zoo(family: Family, target: Path, *, size: str = "default", seed: int = 0,
              log: Callable[[str], None] | None = None, threads: int | None = None) -> dict:
    """Train every model of ``family`` into ``target`` (atomically: temp folder, then rename)."""
    import torch

    log = log or (lambda msg: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    started = time.time()
    try:
        torch.set_num_threads(threads or 1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(seed)
        manifest = family.build(tmp, dict(family.sizes[size]), seed, log)
        manifest.update({
            "family": family.name, "version": family.version, "size": size, "seed": seed,
            "metric": family.metric, "higher_is_better": family.higher_is_better,
            "build_seconds": round(time.time() - started, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "complete": True,
        })
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    log(f"built zoo {family.name} in {time.time() - started:.0f}s -> {target}")
    return manifest
