"""Output values that depend on one whole-model sign, known only after the last tensor.

Official TIES gives every coordinate whose elected sign is 0 the *global* majority sign
``sgn(sum_p gamma_p)`` over the whole model (ties-merging's ``resolve_zero_signs``). Computing that sign
first costs one more full read of every input. Instead, the apply pass merges with the tentative sign
+1, records the few coordinates where -1 would give another value (exact cancellations such as +a, -a
between task vectors) together with those values, and adds its share of the tally ``sum_p gamma_p``.
After the last tensor the engine overwrites the recorded coordinates when the tally is negative
(a tally of exactly 0 keeps +1, as the official code does). The output bytes equal those of a run that
knew the sign first.

Recorded values are float32 with int64 flat indices (12 bytes per coordinate); beyond ``SPILL_BYTES``
they go to a temporary folder, so memory stays bounded however many coordinates cancel.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

SPILL_BYTES = 64 << 20


@dataclass
class _Entry:
    name: str
    offset: int  # element offset of the unit (row chunk) in the flattened output tensor
    idx: np.ndarray | None  # flat indices inside the unit (None when spilled)
    values: np.ndarray | None
    path: str | None = None


class SignDeferral:
    """Collects, over one merge, the tally of a whole-model sign and the alternative output values
    that apply when it turns out negative."""

    def __init__(self, spill_bytes: int = SPILL_BYTES):
        self.tally = 0
        self.entries: list[_Entry] = []
        self.spill_bytes = spill_bytes
        self._held = 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def recorder(self, name: str, offset: int) -> "Recorder":
        return Recorder(self, name, offset)

    @property
    def negative(self) -> bool:
        return self.tally < 0

    def add(self, name: str, offset: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        if idx.numel() == 0:
            return
        i = idx.detach().to("cpu", torch.int64).numpy()
        v = values.detach().to("cpu", torch.float32).numpy()
        if self._held + i.nbytes + v.nbytes <= self.spill_bytes:
            self._held += i.nbytes + v.nbytes
            self.entries.append(_Entry(name, offset, i, v))
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="mergesmith-signs-", dir=os.environ.get("MERGESMITH_SCRATCH"))
        path = os.path.join(self._dir.name, f"{len(self.entries)}.npz")
        np.savez(path, idx=i, values=v)
        self.entries.append(_Entry(name, offset, None, None, path))

    def patches(self):
        """(output name, element offset, flat indices, float32 values) of every recorded coordinate."""
        for e in self.entries:
            if e.path is None:
                yield e.name, e.offset, e.idx, e.values
            else:
                with np.load(e.path) as z:
                    yield e.name, e.offset, z["idx"], z["values"]

    def close(self) -> None:
        self.entries = []
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class Recorder:
    """What a method sees (``ctx.defer``) for one unit of work."""

    def __init__(self, owner: SignDeferral, name: str, offset: int):
        self.owner, self.name, self.offset = owner, name, offset

    def vote(self, n: int) -> None:
        """Add this unit's share of the tally (an exact integer)."""
        self.owner.tally += int(n)

    def alternative(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Output values (float32, before the cast to the output dtype) at flat indices ``idx`` of this
        unit's output, to use if the final tally is negative."""
        self.owner.add(self.name, self.offset, idx.reshape(-1), values.reshape(-1))
