"""Python API of continual merging: fold models into a state folder one at a time, export any time.

    m = ContinualMerger("state/")
    m.init("base_model/", method="opcm", alpha=0.5)
    m.add("finetune_a/")            # streams tensor by tensor; atomic
    m.add("finetune_b/")
    m.export("merged/")             # HF folder: config + tokenizer of the base, sharded safetensors

Every ``add`` reads the base, the state and the new model tensor by tensor (lazily; never a whole model),
runs the method's whole-model statistics passes first when it has any (continual TIES), writes the new
state into a temporary version and commits it atomically (:mod:`.state`).  Memory: a few tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from ..io.checkpoint import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from ..io.writer import ShardedWriter, parse_size
from ..methods.base import MergeError, TensorContext
from ..methods.kernels import row_ranges
from .protocol import get_continual_method
from .state import FORMAT, FORMAT_VERSION, StateFolder

STATE_SHARD = 4 * 10**9
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
            "added_tokens.json", "spiece.model", "chat_template.jinja", "chat_template.json",
            "preprocessor_config.json")
OUT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mergesmith")
    except Exception:  # noqa: BLE001
        return "unknown"


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _tensor_list(ck: Checkpoint) -> dict:
    return {k: {"shape": list(ck.meta(k).shape), "dtype": DTYPE_TO_SAFETENSORS[ck.meta(k).dtype]} for k in ck.keys()}


def _identity(ck: Checkpoint) -> dict:
    try:
        return ck.identity()
    except Exception:  # noqa: BLE001 - provenance is best effort
        return {"source": ck.label}


def _same_files(a: dict, b: dict) -> bool:
    return [(f.get("name"), f.get("bytes"), f.get("header_sha256") or f.get("head_sha256")) for f in a.get("files", [])] == \
        [(f.get("name"), f.get("bytes"), f.get("header_sha256") or f.get("head_sha256")) for f in b.get("files", [])]


CHUNK_BYTES = 64 * 2**20  # row-chunk size (float32) for element-wise tensors


def row_chunks(shape, budget: int | None = None) -> list:
    """Row ranges covering a tensor in pieces of about ``budget`` float32 bytes ([None] = whole)."""
    budget = budget or CHUNK_BYTES
    if len(shape) < 1 or shape[0] == 0:
        return [None]
    row = 4
    for d in shape[1:]:
        row *= int(d)
    ranges = row_ranges(shape[0], row, budget)
    return [None] if len(ranges) == 1 else ranges


def _offset(rows, shape, dtype) -> int:
    if rows is None:
        return 0
    n = rows[0]
    for d in shape[1:]:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class _Pool:
    """In-order pipeline: ``submit(finish, fn, *args)`` runs fn now (workers = 1) or in a thread, and calls
    ``finish`` on the results in submission order, keeping at most ``workers`` tasks in flight."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pending: list = []
        self.ex = None
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
            self.ex = ThreadPoolExecutor(workers)

    def submit(self, finish, fn, *args):
        if self.ex is None:
            finish(fn(*args))
            return
        self.pending.append(self.ex.submit(fn, *args))
        while len(self.pending) >= self.workers:
            finish(self.pending.pop(0).result())

    def drain(self, finish):
        while self.pending:
            finish(self.pending.pop(0).result())

    def close(self):
        if self.ex is not None:
            for f in self.pending:
                f.cancel()
            self.ex.shutdown(wait=True)
            self.pending = []
            torch.set_num_threads(self.threads)
            self.ex = None


def run_stats(gs, gp, names, inputs) -> Any:
    """Stream every tensor through a GlobalStats' passes: ``inputs(name) -> (ctx, base, models)``."""
    state = gs.init(gp, 2)
    k = 0
    while k < gs.passes(gp, state):  # the count may grow (GlobalStats.passes); sampled passes read all
        partials = []
        for name in names:
            ctx, b, ms = inputs(name)
            ctx.stats = state
            partials.append(gs.collect(k, state, ctx, b, ms, gp))
        state = gs.reduce(k, state, partials)
        k += 1
    return state


class ContinualMerger:
    """A continual merge kept in ``state_dir``; see the module docstring."""

    def __init__(self, state_dir, device: str | torch.device = "cpu", workers: int = 1):
        """``workers`` > 1 computes that many tensors at once, one torch thread each.  On CPU, LAPACK's SVD
        scales poorly with threads and collapses when cores are shared (a 2048^2 OPCM step: 2 threads
        were 2.6x slower than 1 on a loaded 2-core machine); independent tensors in parallel do not.
        Peak memory grows with the number of tensors in flight."""
        self.folder = StateFolder(state_dir)
        self.workers = max(1, int(workers))
        self.device = torch.device(device) if device != "auto" else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")

    # -- init ---------------------------------------------------------------------------------------
    def init(self, base=None, method: str = "opcm", *, seed: int = 0, overwrite: bool = False, **params) -> dict:
        """Start a new continual merge of ``method`` over ``base`` (a path, state dict or nn.Module)."""
        spec = get_continual_method(method)
        p = spec.resolve(params)
        path = self.folder.path
        if self.folder.initialized and not overwrite:
            raise MergeError(f"{path} already holds a continual merge; use --overwrite to start again")
        if path.exists() and not path.is_dir():
            raise MergeError(f"{path} exists and is not a folder")
        if path.exists() and any(not self.folder.is_state_entry(x) for x in path.iterdir()):
            raise MergeError(f"{path} is not empty and not a continual state; give an empty or new folder")
        if spec.base == "required" and base is None:
            raise MergeError(f"continual method '{spec.name}' needs a base model (--base)")
        ck = open_checkpoint(base, label="base") if base is not None else None
        with self.folder.lock(create=True):
            if overwrite:
                self.folder.reset()
            base_ref = None
            template = None
            if ck is not None:
                if isinstance(base, (str, os.PathLike)) and getattr(ck, "files", None):  # file-backed: reference
                    ref = str(Path(str(base)).expanduser().resolve())
                    base_ref = {"ref": ref, "stored": False, "identity": _identity(ck)}
                    template = str(ck.folder.resolve()) if ck.folder is not None else None
                else:  # in memory: keep a copy inside the state
                    self._store_base(ck)
                    base_ref = {"ref": "base", "stored": True, "identity": {"source": ck.label}}
                    template = "base" if (path / "base" / "config.json").exists() else None
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "mergesmith": _version(),
                "method": spec.name, "params": dict(p), "seed": int(seed), "count": 0,
                "created": _now(), "updated": _now(), "base": base_ref, "template": template,
                "tensors": _tensor_list(ck) if ck is not None else None,
                "scalars": {}, "history": [],
            }
            with self.folder.staging() as tmp:
                self.folder.commit(tmp, manifest)
        return manifest

    def _store_base(self, ck: Checkpoint) -> None:
        out = self.folder.path / "base"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        entries = {k: (ck.meta(k).shape, ck.meta(k).dtype) for k in ck.keys()}
        w = ShardedWriter(out, entries, STATE_SHARD)
        try:
            for k in ck.keys():
                w.write(k, ck.get(k).contiguous())
        finally:
            w.close()
        if ck.config:
            (out / "config.json").write_text(json.dumps(ck.config, indent=2, default=str))

    # -- helpers ------------------------------------------------------------------------------------
    def _open_base(self, manifest: dict) -> Checkpoint | None:
        b = manifest.get("base")
        if not b:
            return None
        if b.get("stored"):
            return open_checkpoint(self.folder.path / "base", label="base")
        ck = open_checkpoint(b["ref"], label="base")
        if not _same_files(_identity(ck), b.get("identity") or {}):
            raise MergeError(f"the base model at {b['ref']} changed since `continual init` (file sizes or headers "
                             "differ); restore it or start a new state")
        return ck

    def _open_state(self) -> Checkpoint | None:
        d = self.folder.tensors_dir()
        return open_checkpoint(d, label="state") if d is not None else None

    def _check_model(self, manifest: dict, ck: Checkpoint) -> None:
        want = manifest["tensors"]
        have = set(ck.keys())
        for name, info in want.items():
            if name not in have:
                raise MergeError(f"{ck.label}: tensor '{name}' of the base is missing (different architecture?)")
            if list(ck.meta(name).shape) != list(info["shape"]):
                raise MergeError(f"{ck.label}: tensor '{name}' has shape {list(ck.meta(name).shape)}, "
                                 f"the merge has {info['shape']}")
        extra = sorted(have - set(want))
        if extra:
            raise MergeError(f"{ck.label}: tensor '{extra[0]}' is not in the base ({len(extra)} extra tensor(s))")

    def _ctx(self, name: str, shape, seed: int) -> TensorContext:
        return TensorContext(name=name, seed=seed, device=self.device, shape=tuple(shape))

    # -- add ----------------------------------------------------------------------------------------
    def add(self, model, *, label: str | None = None, allow_duplicate: bool = False) -> dict:
        """Fold one model into the state (atomic).  Returns the history entry written."""
        t0 = time.perf_counter()
        with self.folder.lock():
            self.folder.cleanup()
            man = self.folder.manifest()
            spec = get_continual_method(man["method"])
            p = spec.resolve(man["params"])
            ck = open_checkpoint(model, label=label)
            if label is None and isinstance(model, (str, os.PathLike)) and Path(str(model)).expanduser().exists():
                label = str(Path(str(model)).expanduser().resolve())
            label = label or ck.label
            if man["tensors"] is None:  # no base (average): the first model defines the tensor list
                man["tensors"] = _tensor_list(ck)
                if ck.folder is not None and (ck.folder / "config.json").exists():
                    man["template"] = str(ck.folder.resolve())
            self._check_model(man, ck)
            base = self._open_base(man)
            state = self._open_state()
            count = int(man["count"])
            names = list(man["tensors"])
            floats = [n for n in names if _is_float(SAFETENSORS_DTYPES[man["tensors"][n]["dtype"]])]
            seed = int(man["seed"])

            uses_base = spec.base != "none"

            def load(name, raw=None, rows=None):
                """(state, x): x = model - base for methods with a base, else the model (float32, fresh)."""
                m = (ck.get(name, rows) if raw is None else raw).to(torch.float32)
                x = m - base.get(name, rows).to(torch.float32) if uses_base else m.clone()
                del m
                s = state.get(name, rows).to(torch.float32) if state is not None else None
                return s, x

            st = spec.stats(p) if count >= 1 else None
            stats = None
            if st is not None and st[0] is not None:
                gs, gp = st

                def inputs(name):
                    s, x = load(name)
                    ctx = self._ctx(name, x.shape, seed)
                    sb, sms = spec.stats_inputs(ctx, s, x, p)
                    return ctx, sb, sms

                stats = run_stats(gs, gp, floats, inputs)

            acc: dict = {}
            digest = hashlib.blake2b(digest_size=16)
            with self.folder.staging() as tmp:
                tdir = tmp / "tensors"
                tdir.mkdir()
                entries = {}
                for n in names:
                    dt = SAFETENSORS_DTYPES[man["tensors"][n]["dtype"]]
                    entries[n] = (tuple(man["tensors"][n]["shape"]), torch.float32 if _is_float(dt) else dt)
                w = ShardedWriter(tdir, entries, STATE_SHARD)
                pool = _Pool(self.workers)

                def compute(n, shape, k, s, x):
                    """One tensor (or row chunk) of the update; runs in a worker when workers > 1."""
                    ctx = self._ctx(n, shape, seed)
                    ctx.stats, ctx.chunk = stats, k
                    part: dict = {}
                    new = spec.first(ctx, x, p, part) if count == 0 else spec.step(ctx, s, x, p, count, part)
                    del s, x
                    if not bool(torch.isfinite(new).all()):
                        raise MergeError(f"continual {spec.name}: non-finite values in '{n}' after adding {label}")
                    return n, shape, k, new.to(torch.float32).cpu().contiguous(), part

                def finish(res):  # in submission order: writes and sums are identical to a sequential run
                    n, shape, k, new, part = res
                    rows = chunk_rows[(n, k)]
                    w.write(n, new, _offset(rows, shape, torch.float32))
                    for key, v in part.items():
                        acc[key] = acc.get(key, 0.0) + v

                chunk_rows: dict = {}
                try:
                    for n in names:
                        shape = tuple(man["tensors"][n]["shape"])
                        digest.update(n.encode())
                        if n not in floats:  # integer/bool buffers: carried from the state, base or model
                            raw = ck.get(n)
                            if raw.numel():
                                digest.update(raw.contiguous().reshape(-1).view(torch.uint8).numpy())
                            src = state if state is not None else (base if base is not None else ck)
                            w.write(n, src.get(n).contiguous())
                            continue
                        chunks = row_chunks(shape) if spec.chunkable(n, shape) else [None]
                        for k, rows in enumerate(chunks):
                            raw = ck.get(n, rows)
                            if raw.numel():
                                digest.update(raw.contiguous().reshape(-1).view(torch.uint8).numpy())
                            s, x = load(n, raw, rows)
                            del raw
                            chunk_rows[(n, k)] = rows
                            pool.submit(finish, compute, n, shape, k, s, x)
                            del s, x
                    pool.drain(finish)
                finally:
                    pool.close()
                    w.close()
                fingerprint = digest.hexdigest()
                if not allow_duplicate:
                    for h in man["history"]:
                        if h.get("content_blake2b") == fingerprint:
                            raise MergeError(f"{label} has the same weights as input #{h['index']} ({h['source']}); "
                                             "use --allow-duplicate to fold it in again")
                man["scalars"] = spec.finish(man.get("scalars") or {}, acc, count + 1)
                man["count"] = count + 1
                man["updated"] = _now()
                entry = {"index": count + 1, "source": str(label), "identity": _identity(ck),
                         "content_blake2b": fingerprint, "added": _now(),
                         "seconds": round(time.perf_counter() - t0, 3)}
                summ = spec.summary(man["scalars"], count + 1)
                if summ:
                    entry["summary"] = summ
                man["history"].append(entry)
                self.folder.commit(tmp, man)
        return entry

    # -- read out -----------------------------------------------------------------------------------
    def status(self) -> dict:
        man = self.folder.manifest()
        spec = get_continual_method(man["method"])
        out = {k: man[k] for k in ("method", "params", "seed", "count", "created", "updated")}
        out["base"] = (man.get("base") or {}).get("ref")
        out["order_dependent"] = spec.order_dependent
        out["summary"] = spec.summary(man.get("scalars") or {}, man["count"]) if man["count"] else {}
        out["state_bytes"] = self.folder.disk_bytes()
        out["history"] = [{k: h.get(k) for k in ("index", "source", "added", "seconds")} for h in man["history"]]
        return out

    def merged_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream the current merged model as (name, tensor) pairs (float tensors in ``dtype`` or the
        base's dtype)."""
        parts: list = []
        for name, rows, t, last in self._pieces(dtype):
            parts.append(t)
            if last:
                yield name, parts[0] if len(parts) == 1 else torch.cat(parts)
                parts = []

    def _pieces(self, dtype: torch.dtype | None = None):
        """(name, rows, tensor, last piece?) of the merged model; element-wise tensors come in row chunks."""
        with self.folder.lock(shared=True):
            man = self.folder.manifest()
            if int(man["count"]) < 1:
                raise MergeError(f"{self.folder.path}: no model has been added yet (`mergesmith continual add`)")
            spec = get_continual_method(man["method"])
            p = spec.resolve(man["params"])
            base = self._open_base(man)
            state = self._open_state()
            for n, info in man["tensors"].items():
                dt = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                if not _is_float(dt):
                    yield n, None, state.get(n), True
                    continue
                chunks = row_chunks(shape) if spec.chunkable(n, shape) else [None]
                for k, rows in enumerate(chunks):
                    b = base.get(n, rows).to(torch.float32) if base is not None else None
                    s = state.get(n, rows).to(torch.float32)
                    ctx = self._ctx(n, shape, int(man["seed"]))
                    ctx.chunk = k
                    out = spec.export(ctx, s, b, p, man.get("scalars") or {}, int(man["count"]))
                    del b, s
                    yield n, rows, out.to(dtype or dt), k == len(chunks) - 1

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged model in memory (small models, tests)."""
        return dict(self.merged_tensors(dtype))

    def export(self, out_dir, *, dtype: str | None = None, shard_size: str | int = "2GB",
               overwrite: bool = False) -> Path:
        """Write the merged model as a Hugging Face folder (config/tokenizer copied from the base)."""
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise MergeError(f"output {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise MergeError(f"output folder {out} is not empty; use --overwrite to replace it")
        if dtype is not None and dtype not in OUT_DTYPES:
            raise MergeError(f"unknown dtype '{dtype}' (use float32, float16 or bfloat16)")
        try:
            size = parse_size(shard_size)
        except ValueError as e:
            raise MergeError(str(e)) from None
        with self.folder.lock(shared=True):
            return self._export(out, dtype, size, overwrite)

    def _export(self, out: Path, dtype: str | None, size: int, overwrite: bool) -> Path:
        man = self.folder.manifest()
        if int(man["count"]) < 1:
            raise MergeError(f"{self.folder.path}: no model has been added yet (`mergesmith continual add`)")
        odt = OUT_DTYPES[dtype] if dtype else None
        entries = {}
        for n, info in man["tensors"].items():
            dt = SAFETENSORS_DTYPES[info["dtype"]]
            entries[n] = (tuple(info["shape"]), (odt or dt) if _is_float(dt) else dt)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            w = ShardedWriter(tmp, entries, size, metadata={"mergesmith": "continual " + man["method"]})
            try:
                for n, rows, t, _ in self._pieces(odt):
                    w.write(n, t.contiguous(), _offset(rows, entries[n][0], t.dtype))
            finally:
                w.close()
            self._write_extras(tmp, man, odt)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out

    def _write_extras(self, folder: Path, man: dict, odt) -> None:
        tpl = man.get("template")
        src = None
        if tpl:
            src = self.folder.path / "base" if tpl == "base" else Path(tpl)
        if src is not None and src.is_dir():
            for name in HF_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, folder / name)
        cfg = folder / "config.json"
        if odt is not None and cfg.exists():
            try:
                data = json.loads(cfg.read_text())
                name = str(odt).removeprefix("torch.")
                for key in ("torch_dtype", "dtype"):
                    if key in data:
                        data[key] = name
                cfg.write_text(json.dumps(data, indent=2))
            except (OSError, json.JSONDecodeError):
                pass
        prov = {k: man[k] for k in ("method", "params", "seed", "count", "base", "history", "scalars")}
        prov["mergesmith"] = _version()
        (folder / "mergesmith_continual.json").write_text(json.dumps(prov, indent=1))
        base = (man.get("base") or {}).get("ref")
        lines = ["---", "library_name: transformers", "tags:", "- merge", "- mergesmith", f"- continual-{man['method']}"]
        if base and base != "base":
            lines.insert(1, f"base_model: {base}")
        lines += ["---", "", f"# Continual merge ({man['method']}, {man['count']} model(s))", "",
                  "Merged with `mergesmith continual`, in this order:", ""]
        lines += [f"{h['index']}. {h['source']}" for h in man["history"]]
        lines += ["", f"Parameters: `{json.dumps(man['params'])}`, seed {man['seed']}.", ""]
        (folder / "README.md").write_text("\n".join(lines))
