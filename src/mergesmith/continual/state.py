"""The continual-merge state folder: versioned, every update atomic.

Layout::

    STATE/
      CURRENT              name of the live version folder, e.g. "v000003" (replaced atomically)
      v000003/
        manifest.json      method, params, seed, count, base reference, tensor list, scalars, history
        tensors/           the state tensors as safetensors (float32: OPCM's D, the running mean, ...)
      base/                only when the base was given in memory (state dict / nn.Module): its copy
      .lock                flock: one writer (add/init) at a time; readers (export) share

An update writes a complete new version into ``.tmp-*``, fsyncs it, renames it to ``vNNNNNN`` and then
replaces ``CURRENT`` (``os.replace``).  A crash at any point leaves ``CURRENT`` naming a complete
version; leftovers are removed by the next writer.  The state's size does not depend on the number of
models merged (one float32 copy of the model plus a manifest whose history grows by one line per model).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..methods.base import MergeError

FORMAT = "mergesmith-continual"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    for p in [path, *[d for d in path.rglob("*") if d.is_dir()]]:
        _fsync_dir(p)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StateFolder:
    def __init__(self, path):
        self.path = Path(path).expanduser()

    # -- reading ------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        cur = self.path / "CURRENT"
        return cur.is_file() and (self.path / cur.read_text().strip() / "manifest.json").is_file()

    def version_dir(self) -> Path:
        if not self.initialized:
            raise MergeError(f"{self.path} is not a continual-merge state folder (run `mergesmith continual init` first)")
        return self.path / (self.path / "CURRENT").read_text().strip()

    def manifest(self) -> dict:
        path = self.version_dir() / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"cannot read {path}: {e}") from None
        if data.get("format") != FORMAT:
            raise MergeError(f"{path} is not a {FORMAT} manifest")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise MergeError(f"{path} was written by a newer mergesmith (format {data['format_version']})")
        return data

    def tensors_dir(self) -> Path | None:
        d = self.version_dir() / "tensors"
        return d if d.is_dir() else None

    def disk_bytes(self) -> int:
        d = self.version_dir()
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    # -- writing ------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, shared: bool = False, create: bool = False):
        """flock on STATE/.lock; fails at once (one clear line) if another process holds it."""
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.initialized:
            self.version_dir()  # raises the "not a state folder" error
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MergeError(f"{self.path} is busy: another continual add/export is running on it") from None
            yield
        finally:
            os.close(fd)

    @contextmanager
    def staging(self):
        """A fresh temporary folder inside the state; removed if the block fails."""
        tmp = self.path / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, tmp: Path, manifest: dict) -> Path:
        """Make ``tmp`` (with ``manifest``) the live version, atomically; drop the previous version."""
        write_json_atomic(tmp / "manifest.json", manifest)
        _fsync_tree(tmp)
        old = self.version_dir() if self.initialized else None
        n = 0 if old is None else int(old.name[1:]) + 1
        new = self.path / f"v{n:06d}"
        if new.exists():  # a leftover of a crash between rename and CURRENT: not live, safe to drop
            shutil.rmtree(new)
        os.rename(tmp, new)
        _fsync_dir(self.path)
        cur_tmp = self.path / f".CURRENT.tmp-{uuid.uuid4().hex[:8]}"
        with open(cur_tmp, "w") as f:
            f.write(new.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(cur_tmp, self.path / "CURRENT")
        _fsync_dir(self.path)
        if old is not None and old != new:
            shutil.rmtree(old, ignore_errors=True)
        return new

    def cleanup(self) -> None:
        """Remove what a crashed writer left behind (call while holding the exclusive lock)."""
        if not self.path.is_dir():
            return
        live = self.version_dir().name if self.initialized else None
        for p in self.path.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".CURRENT.tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            elif p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit() and p.name != live:
                shutil.rmtree(p, ignore_errors=True)

    def is_state_entry(self, p: Path) -> bool:
        n = p.name
        return (n in ("CURRENT", "base", ".lock") or n.startswith(".tmp-") or n.startswith(".CURRENT.tmp-")
                or (n.startswith("v") and n[1:].isdigit()))

    def reset(self) -> None:
        """Delete the state's own files (init --overwrite); anything else in the folder is refused."""
        if not self.path.exists():
            return
        foreign = [p.name for p in self.path.iterdir() if not self.is_state_entry(p)]
        if foreign:
            raise MergeError(f"{self.path} holds files that are not a continual state ({foreign[0]}, ...); "
                             "refusing to delete them - give an empty or new folder")
        for p in self.path.iterdir():
            if p.name == ".lock":
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
