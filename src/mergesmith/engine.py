"""Executor: streams a Plan's jobs through a method and into a sink.

* A reader thread prefetches the next unit's input tensors (safetensors are memory-mapped).
* Compute runs on the chosen device in float32 (torch uses all intra-op threads).
* A writer thread writes finished tensors (the sink writes each at its planned offset).
* Element- and row-wise methods get large tensors in row chunks, so memory stays bounded by a few
  chunks per input model — independent of model size.
* Methods with whole-model statistics get one or more statistics passes first (streaming).

Randomness is seeded per (seed, tensor name, model index, chunk) and chunk boundaries depend only on
the tensor's shape, so output bytes do not depend on threads or device scheduling.
"""
from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from ._memory import trim_if_above
from .deferred import SignDeferral
from .methods.base import MergeError, TensorContext
from .plan import InputRef, Plan, TensorJob

# most tensors computed at once (concurrent_tensors): each holds its inputs and temporaries; 1 = one at a
# time. On the 0.5B benchmark 2 took TSV-M from 775 s (one at a time, load 2-3) to 559 s and its peak RSS
# from 1.28 to 1.65 GB.
TENSOR_WORKERS = 2  # default of the environment variable MERGESMITH_TENSOR_WORKERS
CHUNK_ELEMENTS = 1 << 22  # 4M elements (16 MB in float32) per input per chunk
PREFETCH_BYTES = 1 << 28  # units read ahead hold at most 256 MB of float32 inputs (a bigger unit is read when due)
PREFETCH_UNITS = 3  # units read ahead at most
TRIM_RSS_BYTES = 1280 << 20  # above this resident size, hand freed heap holes back to the OS (see _memory)


def _input_bytes(unit: "Unit") -> int:
    rows = unit.rows[1] - unit.rows[0] if unit.rows is not None else None
    if unit.runs:
        rows = sum(b - a for a, b in unit.runs)
    n = 1
    for k, s in enumerate(unit.job.shape):
        n *= rows if (k == 0 and rows is not None) else s
    return 4 * n * (len(unit.job.models) + (unit.job.base is not None))


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, row_offset_bytes: int = 0) -> None: ...


class DictSink:
    """Collects output tensors in memory (for merge_state_dicts)."""

    def __init__(self, plan: Plan):
        self.tensors = {j.out_name: torch.empty(j.shape, dtype=j.dtype) for j in plan.jobs}

    def write(self, name: str, tensor: torch.Tensor, row_offset_bytes: int = 0) -> None:
        out = self.tensors[name]
        flat = out.reshape(-1).view(torch.uint8)
        src = tensor.contiguous().reshape(-1).view(torch.uint8)
        flat[row_offset_bytes : row_offset_bytes + src.numel()] = src

    def patch(self, name: str, offset: int, idx, values: torch.Tensor) -> None:
        """Overwrite elements ``offset + idx`` of the flattened tensor (``values`` in its dtype)."""
        flat = self.tensors[name].reshape(-1)
        flat[offset + torch.as_tensor(idx, dtype=torch.int64)] = values


@dataclass
class Unit:
    job: TensorJob
    chunk: int
    rows: tuple[int, int] | None  # row range of a chunk, None = whole tensor
    phase: str = "apply"  # "sums": accumulate the method's per-tensor sums (MethodSpec.sums), no output
    step: int = 0  # which sums phase (MethodSpec.sum_phases), for phase "sums"
    runs: tuple = ()  # a sample of the tensor: these row ranges read one after the other as one tensor (rows None)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .methods.base import MergeError

        raise MergeError("--device cuda was requested but no CUDA GPU is available")
    return dev


def _float32_copy(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` as a float32 tensor on ``dev`` that is never ``t``'s storage (methods may work in place on
    their inputs; in-memory inputs are the caller's). To another device the stored dtype goes over the bus
    and is widened there (``t.to(dev, float32)`` widens on the host first: twice the bytes, a host pass)."""
    moved = t.to(dev)
    if moved is t:
        return t.to(torch.float32, copy=True)
    return moved.to(torch.float32)


def units_of(job: TensorJob, chunkable: bool, chunk_elements: int = CHUNK_ELEMENTS) -> list[Unit]:
    numel = 1
    for s in job.shape:
        numel *= s
    if not chunkable or job.method is None or len(job.shape) < 2 or numel <= chunk_elements:
        return [Unit(job, 0, None)]
    row = numel // job.shape[0]
    step = max(1, chunk_elements // row)
    return [Unit(job, k, (a, min(a + step, job.shape[0]))) for k, a in enumerate(range(0, job.shape[0], step))]


def run_statistics(spec, params, items, num_models: int, deferral: Any = None) -> Any:
    """Run ``spec``'s whole-model statistics passes (``GlobalStats``); the final state, or None.

    ``params``: the first tensor's parameters (they choose the statistics and the number of passes,
    which may grow while running, see ``GlobalStats.passes``); ``items``: per tensor ``(ctx, base,
    models, params)``, read once per pass: a re-iterable, or a callable returning a fresh iterable (so
    inputs can be streamed). A pass for which ``GlobalStats.sample_stride`` is > 0 calls
    ``items(stride)``: the callable may then yield only about one row in ``stride`` of each tensor.
    ``ctx.stats`` is set to the current state before each ``collect``. ``deferral``: the executor's
    ``deferred.SignDeferral`` when it patches outputs after the last tensor (``GlobalStats.defer``).
    """
    gs = spec.stats_for(params)
    if gs is None:
        return None
    state = gs.init(params, num_models)
    if deferral is not None:
        state = gs.defer(state)
    k = 0
    while k < gs.passes(params, state):
        stride = gs.sample_stride(k, state)
        partials: list = []
        acc, folding = None, True
        for ctx, base, models, p in (items(stride) if callable(items) else items):
            ctx.stats = state
            part = gs.collect(k, state, ctx, base, models, p)
            if folding:
                got = gs.fold(k, state, acc, part)
                if got is NotImplemented:
                    folding = False
                else:
                    acc = got
                    continue
            partials.append(part)
        state = gs.reduce(k, state, [acc] if folding else partials)
        k += 1
    return state


def sample_units(job: TensorJob, stride: int, blocks: int = 32) -> list[Unit]:
    """About one row in ``stride`` of a tensor, as ~``blocks`` evenly spaced runs of rows read as one
    unit (for an estimate; chunk ids are negative so seeded sparsifiers draw fresh masks). Small
    tensors are whole."""
    numel = 1
    for s in job.shape:
        numel *= s
    rows = job.shape[0] if job.shape else 1
    if len(job.shape) < 2 or numel <= 1 << 16 or rows < 2 * stride:
        return [Unit(job, -1, None)]
    run = max(1, -(-rows // (stride * blocks)))
    step = run * stride
    return [Unit(job, -1, None, runs=tuple((a, min(a + run, rows)) for a in range(step // 2, rows, step)))]


class Executor:
    def __init__(self, plan: Plan, sink: Sink, device: str | torch.device | None = "cpu",
                 threads: int | None = None, progress: bool = False, chunk_elements: int = CHUNK_ELEMENTS):
        self.plan = plan
        self.sink = sink
        self.device = resolve_device(device)
        self.threads = threads
        self.progress = progress
        self.chunk_elements = chunk_elements
        self.spec = plan.method
        self.deferral: SignDeferral | None = None

    # -- reading -----------------------------------------------------------------------------------
    def _read(self, ref: InputRef, rows: tuple[int, int] | None) -> torch.Tensor:
        ck = self.plan.inputs[ref.model]
        if rows is None and ref.rows is not None:
            rows = (0, ref.rows)
        t = ck.get(ref.name, rows)
        return t

    def _load(self, unit: Unit):
        job = unit.job
        if job.align is not None:  # rows re-indexed to the output vocabulary (io.vocab)
            refs = ([job.base] if job.base is not None else []) + list(job.models)
            parts = [job.align.rows(self.plan.inputs, refs, r) for r in (unit.runs or (unit.rows,))]
            got = [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts)]
            base, models = (got[0], got[1:]) if job.base is not None else (None, got)
        else:
            if unit.runs:  # a sample (statistics only): its runs of rows concatenated
                def read(ref):
                    return torch.cat([self._read(ref, r) for r in unit.runs])
            else:
                def read(ref):
                    return self._read(ref, unit.rows)
            base = read(job.base) if job.base is not None else None
            models = [read(r) for r in job.models]
        if job.method is None or self._raw(job):
            return base, models
        dev = self.device
        base = _float32_copy(base, dev) if base is not None else None
        return base, [_float32_copy(m, dev) for m in models]

    def _ctx(self, unit: Unit, stats: Any, sums: Any = None, record: bool = False) -> TensorContext:
        j = unit.job
        raw = self._raw(j)
        defer = None
        if record and self.deferral is not None:
            row = 1
            for s in j.shape[1:]:
                row *= s
            defer = self.deferral.recorder(j.out_name, unit.rows[0] * row if unit.rows is not None else 0)
        return TensorContext(name=j.out_name, layer=j.layer, num_layers=j.num_layers, seed=self.plan.seed,
                             device=self.device, stats=stats, sums=sums, chunk=unit.chunk, rows=unit.rows,
                             shape=tuple(j.shape), owned=not raw, raw=raw, defer=defer, out_dtype=j.dtype)

    def _raw(self, job: TensorJob) -> bool:
        """Whether this job's inputs go to the method in their stored dtype (MethodSpec.raw_inputs; CPU only)."""
        return (self.device.type == "cpu" and job.method is not None and self.spec.raw_inputs is not None
                and bool(self.spec.raw_inputs(job.params, tuple(job.shape))))

    def _stream(self, units: list[Unit]) -> Iterator[tuple[Unit, Any]]:
        """Yield (unit, loaded inputs) with the next units prefetched in a reader thread.

        A unit whose inputs exceed PREFETCH_BYTES (a whole embedding for a tensor-wise method) is
        loaded only after the previous unit is done, so two big units are never held at once."""
        if not units:
            return
        # the reader's conversions run single-threaded: torch's thread count is per calling thread, and a
        # second intra-op team competing with the compute's for the same cores was 3-6x slower per op
        with ThreadPoolExecutor(1, thread_name_prefix="mergesmith-read", initializer=torch.set_num_threads,
                                initargs=(1,)) as reader:
            ahead: deque[tuple[int, int, Future]] = deque([(0, 0, reader.submit(self._load, units[0]))])
            nxt = 1  # the next unit to hand to the reader
            for k, unit in enumerate(units):
                if ahead and ahead[0][0] == k:
                    data = ahead.popleft()[2].result()
                else:  # a big unit: read now, after the previous one was let go
                    data = self._load(unit)
                    nxt = max(nxt, k + 1)
                # read ahead (a reader that the kernel threads starve of CPU for a while still keeps them fed):
                # up to PREFETCH_UNITS units and PREFETCH_BYTES in all, never a big unit
                while nxt < len(units) and len(ahead) < PREFETCH_UNITS:
                    size = _input_bytes(units[nxt])
                    if size > PREFETCH_BYTES or sum(a[1] for a in ahead) + size > PREFETCH_BYTES:
                        break
                    ahead.append((nxt, size, reader.submit(self._load, units[nxt])))
                    nxt += 1
                yield unit, data
                del data
                trim_if_above(TRIM_RSS_BYTES)

    # -- passes ------------------------------------------------------------------------------------
    def _statistics(self, merge_jobs: list[TensorJob]) -> Any:
        if not merge_jobs:
            return None
        units = [u for j in merge_jobs for u in self._units(j) if u.phase == "apply"]  # as in the apply pass

        def items(stride: int = 0):
            todo = [u for j in merge_jobs for u in sample_units(j, stride)] if stride > 0 else units
            for unit, (base, models) in self._stream(todo):
                yield self._ctx(unit, None), base, models, unit.job.params

        return run_statistics(self.spec, merge_jobs[0].params, items, len(merge_jobs[0].models), self.deferral)

    def run(self) -> None:
        if self.device.type == "cpu" and self.spec.raw_inputs is not None:
            from .methods import _fused, _sampling

            big = next((j for j in self.plan.jobs if j.method is not None and math.prod(j.shape) >= 2 * _sampling.BLOCK), None)
            if big is not None:  # a method with kernels loads them in its raw_inputs test: in the background now
                _fused.warm_in_background(lambda: self._raw(big))
        old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self._run()
        finally:
            torch.set_num_threads(old_threads)

    def _run(self) -> None:
        merge_jobs = [j for j in self.plan.jobs if j.method is not None]
        self.deferral = SignDeferral() if hasattr(self.sink, "patch") else None
        try:
            self._merge(merge_jobs)
        finally:
            if self.deferral is not None:
                self.deferral.close()

    def _merge(self, merge_jobs: list[TensorJob]) -> None:
        stats = self._statistics(merge_jobs)
        units = [u for j in self.plan.jobs for u in self._units(j)]
        bar = _Progress(self.progress, len(units), self.plan.method.name)
        pending: list[Future] = []
        error: list[BaseException] = []
        lock = threading.Lock()
        workers = self._tensor_workers()
        with ThreadPoolExecutor(1, thread_name_prefix="mergesmith-write") as writer, \
                ThreadPoolExecutor(max(1, workers), thread_name_prefix="mergesmith-compute",
                                   initializer=torch.set_num_threads, initargs=(1,)) as computer:
            inflight: dict[Future, Unit] = {}

            def emit(unit: Unit, out: torch.Tensor) -> None:
                offset = 0
                if unit.rows is not None:
                    row_bytes = out[0].numel() * out.element_size() if out.dim() else 0
                    offset = unit.rows[0] * row_bytes
                # bound the write queue: at most 2 finished tensors waiting
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(writer.submit(self.sink.write, unit.job.out_name, out, offset))
                bar.advance()

            def drain(keep: int) -> None:  # wait until at most ``keep`` computations are in flight
                while len(inflight) > keep:
                    done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                    for f in done:
                        emit(inflight.pop(f), f.result())

            try:
                sums: dict[str, Any] = {}  # tensor name -> result of its last finished sums phase
                totals: dict[str, Any] = {}  # tensor name -> running total of the phase being collected
                for unit, (base, models) in self._stream(units):
                    if unit.phase == "sums":
                        self._sum_chunk(unit, base, models, stats, sums, totals)
                        del base, models
                        bar.advance()
                        continue
                    if workers:
                        inflight[computer.submit(self._compute, unit, base, models, stats,
                                                 sums.get(unit.job.out_name))] = unit
                        del base, models
                        # wait for a free worker before taking the next unit: inputs held = the units in
                        # flight plus the one the reader prefetches (not one more waiting here)
                        drain(workers - 1)
                        continue
                    out = self._compute(unit, base, models, stats, sums.get(unit.job.out_name))
                    del base, models  # free the inputs before the next (possibly big) unit loads
                    emit(unit, out)
                drain(0)
                for f in pending:
                    f.result()
                self._patch()
            except BaseException as e:  # noqa: BLE001 - re-raised after the writer drained
                with lock:
                    error.append(e)
                for f in list(pending) + list(inflight):
                    f.cancel()
                raise
            finally:
                bar.close()

    def _tensor_workers(self) -> int:
        """How many tensors to compute at once (0: one at a time on this thread, torch's threads inside).
        Methods with ``concurrent_tensors`` on the CPU: one single-threaded computation per thread, as
        LAPACK gains ~1.5x from 2 threads where two independent decompositions gain ~2x."""
        if not self.spec.concurrent_tensors or self.device.type != "cpu":
            return 0
        raw = os.environ.get("MERGESMITH_TENSOR_WORKERS", str(TENSOR_WORKERS))
        try:
            n = int(raw)
        except ValueError:
            raise MergeError(f"MERGESMITH_TENSOR_WORKERS must be a whole number (1 = one tensor at a time), got {raw!r}") from None
        n = min(torch.get_num_threads(), n)
        return n if n >= 2 else 0

    def _patch(self) -> None:
        """Overwrite the coordinates recorded by ``ctx.defer`` when the whole-model sign came out negative."""
        if self.deferral is None or not self.deferral.negative:
            return
        dtypes = {j.out_name: j.dtype for j in self.plan.jobs}
        for name, offset, idx, values in self.deferral.patches():
            self.sink.patch(name, offset, idx, torch.from_numpy(values).to(dtypes[name]))

    def _units(self, job: TensorJob) -> list[Unit]:
        if job.method is None:
            return units_of(job, False, self.chunk_elements)
        if self.spec.can_chunk(job.params, job.out_name, tuple(job.shape)):
            return units_of(job, True, self.chunk_elements)
        whole = units_of(job, False, self.chunk_elements)
        phases = self.spec.phases(job.params)
        if phases > 0 and _input_bytes(whole[0]) > PREFETCH_BYTES:
            chunks = units_of(job, True, self.chunk_elements)  # too big to hold whole: sums phases, then apply
            if len(chunks) > 1:
                return [Unit(u.job, u.chunk, u.rows, "sums", k) for k in range(phases) for u in chunks] + chunks
        return whole

    def _sum_chunk(self, unit: Unit, base, models, stats, sums: dict, totals: dict) -> None:
        """Add one row chunk's part of sums phase ``unit.step`` to ``totals``; after the tensor's last
        chunk, ``sums[name]`` becomes the finished phase's result (MethodSpec.finish), which the next
        phase and the apply get as ``ctx.sums``."""
        name, p = unit.job.out_name, unit.job.params
        ctx = self._ctx(unit, stats, sums.get(name))
        ctx.phase = unit.step
        with torch.no_grad():
            part = self.spec.sums(ctx, base, models, p)
        totals[name] = part if name not in totals else totals[name] + part
        if unit.rows[1] == unit.job.shape[0]:  # the last chunk of this phase
            sums[name] = self.spec.finish(unit.step, sums.get(name), totals.pop(name), p)

    def _compute(self, unit: Unit, base, models, stats, sums=None) -> torch.Tensor:
        job = unit.job
        if job.method is None:
            return models[0].to(job.dtype)
        with torch.no_grad():
            out = self.spec.fn(self._ctx(unit, stats, sums, record=True), base, models, job.params)
        expected = tuple(job.shape) if unit.rows is None else (unit.rows[1] - unit.rows[0],) + tuple(job.shape[1:])
        if tuple(out.shape) != expected:
            raise RuntimeError(f"method {self.spec.name} returned shape {tuple(out.shape)} for {job.out_name}, expected {expected}")
        return out.to(job.dtype).to("cpu")


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.p = None
        if enabled and total > 0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              TimeRemainingColumn(), transient=True)
            self.p.start()
            self.task = self.p.add_task(f"merging ({label})", total=total)

    def advance(self):
        if self.p is not None:
            self.p.advance(self.task)

    def close(self):
        if self.p is not None:
            self.p.stop()
            self.p = None


def execute(plan: Plan, sink: Sink, **kwargs) -> None:
    Executor(plan, sink, **kwargs).run()
