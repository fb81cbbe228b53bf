"""Streaming extraction of raw clips into shards: parallel, bounded in memory, resumable.

Samples are assigned to shards before anything is extracted (`shard_order`), so a re-run plans
the same shards; each finished shard leaves a small record in `<out>/.partial/`, and a re-run
reuses every shard whose record and checksum still agree. A prep split across machines runs the
same plan on each and extracts only the shards of its part (`assign_parts`). Clips that fail go
to the errors table with a reason and never stop the run (so do samples with a NaN or Inf in a
float modality): every clip is extracted in a worker process, and a worker that takes longer
than the per-clip timeout (a decoder stuck in a broken file) or dies (a crash in native code) is
killed and replaced, its clip recorded as an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from mmval.atomic import write_atomic, write_text_atomic
from mmval.data.extract import ExtractionError
from mmval.data.extract.video import set_decoder_threads
from mmval.data.shards import (
    MANIFEST,
    DataManifest,
    DatasetHeader,
    ModalitySpec,
    SampleRecord,
    ShardResult,
    ShardWriter,
    TaskKind,
    finalize_dataset,
    record_problem,
    sha256_file,
    shard_order,
    shard_path,
)
from mmval.errors import UserError

PARTIAL = ".partial"
CLIP_TIMEOUT = 300.0  # seconds one clip may take; real clips take well under one


@dataclass(frozen=True)
class ClipTask:
    """One raw sample to extract: its identity, label and the files it is read from."""

    sample_id: str
    label: int
    source: str  # path relative to the raw folder: what errors.parquet names
    files: dict[str, str]  # role ("video", "audio") -> absolute path
    window: tuple[float, float] | None = None  # event window in seconds (AVE)
    inline: dict[str, Any] = field(default_factory=dict)  # values read while planning (text)


Extractor = Callable[[ClipTask], SampleRecord]


@dataclass
class PrepPlan:
    classes: list[str]
    modalities: list[ModalitySpec]
    extraction: dict
    splits: dict[str, list[ClipTask]]
    extractor: Extractor  # picklable: it runs in worker processes
    rows_per_shard: int
    errors: list[tuple[str, str]] = field(default_factory=list)  # found while planning
    files: dict[str, bytes] = field(default_factory=dict)  # written beside the shards (tokenizers)
    task: TaskKind = "classification"
    target: ModalitySpec | None = None  # the `target` column (`DataManifest.target`)


@dataclass(frozen=True)
class PartSpec:
    """Part `index` of `count`: one machine's share of a prep split across machines. Each part
    is a complete data directory named `name` inside the output folder."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(
                f"--shard-index {self.index} --num-shards {self.count}: the index must be in "
                f"0..{self.count - 1} (and --num-shards at least 1)."
            )

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


def assign_parts(shard_counts: Mapping[str, int], count: int) -> dict[str, list[int]]:
    """The part that prepares each planned shard. The shards of all splits, split by split in
    shard order, are cut into `count` contiguous runs whose sizes differ by at most one shard:
    every part gets work as long as there are as many shards as parts, and shard numbers grow
    with the part index, so the merged index lists samples exactly as a one-machine prep."""
    total = sum(shard_counts.values())
    owners: dict[str, list[int]] = {}
    at = 0
    for split, n in shard_counts.items():
        owners[split] = [(at + j) * count // total for j in range(n)]
        at += n
    return owners


def part_ranges(shard_counts: Mapping[str, int], part: PartSpec) -> dict[str, list[int]]:
    """The shard numbers [first, stop) of each split that `part` prepares (`assign_parts`)."""
    owners = assign_parts(shard_counts, part.count)
    return {
        split: [sum(o < part.index for o in owned), sum(o <= part.index for o in owned)]
        for split, owned in owners.items()
    }


def plan_digest(plan: PrepPlan) -> str:
    """sha256 of what a plan lists (ids, labels, sources relative to the raw folder, windows,
    inline values, planning errors): equal on two machines iff both saw the same inputs."""
    digest = hashlib.sha256()

    def line(value: object) -> None:
        text = json.dumps(value, sort_keys=True, default=lambda v: v.tolist())
        digest.update(text.encode("utf-8") + b"\n")

    for split, tasks in plan.splits.items():
        for t in tasks:
            line([split, t.sample_id, t.label, t.source, t.window, t.inline])
    for error in plan.errors:
        line(list(error))
    return digest.hexdigest()


def part_record(plan: PrepPlan, part: PartSpec) -> dict[str, Any]:
    """What a part's manifest says about its share (`extraction.part`), for the merge to check
    that the parts come from one plan and together account for every input exactly once."""
    shards = _shard_tasks(plan)
    ranges = part_ranges({s: len(v) for s, v in shards.items()}, part)
    return {
        "index": part.index,
        "count": part.count,
        "plan_sha256": plan_digest(plan),
        "plan": {
            "clips": {s: len(tasks) for s, tasks in plan.splits.items()},
            "shards": {s: len(v) for s, v in shards.items()},
            "planning_errors": len(plan.errors),
        },
        "shards": ranges,
        "clips": {s: sum(len(t) for t in shards[s][a:b]) for s, (a, b) in ranges.items()},
    }


@dataclass
class SplitCounts:
    planned: int = 0
    written: int = 0
    failed: int = 0
    reused_shards: int = 0


@dataclass
class PrepSummary:
    splits: dict[str, SplitCounts]
    planning_errors: int

    @property
    def failure_share(self) -> float:
        failed = sum(c.failed for c in self.splits.values()) + self.planning_errors
        total = sum(c.planned for c in self.splits.values()) + self.planning_errors
        return failed / total if total else 0.0


@dataclass
class PrepCallbacks:
    on_plan: Callable[[int], None] = lambda total: None
    on_clip: Callable[[bool], None] = lambda ok: None


def _extract_safely(job: tuple[Extractor, ClipTask]) -> SampleRecord | tuple[str, str]:
    """Run in a worker: a record, or (source, reason) for any failure, never an exception."""
    extractor, task = job
    try:
        return extractor(task)
    except ExtractionError as exc:
        return task.source, str(exc)
    except Exception as exc:  # every input must be accounted for, bugs included
        return task.source, f"{type(exc).__name__}: {exc}"


def _init_worker() -> None:
    """Each worker extracts one clip at a time on one core: the workers provide the parallelism."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    set_decoder_threads(1)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """glibc hands blocks over 128 KiB back to the kernel when they are freed (unmapped, or
    trimmed off the heap), and every clip allocates such blocks anew (its wave, spectrogram,
    frames): a few thousand page faults a clip, each a zeroed page, about 5 ms of a 10-s clip's
    60. A worker keeps them in its heap instead: blocks up to 32 MiB come from the heap, and up to
    64 MiB of free heap is kept (the peak stays about what the largest clip needs)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h


def _worker_loop(conn: Connection, inherited: list[Connection]) -> None:
    """Extract the jobs the parent sends, one at a time, until it sends None or goes away."""
    for other in inherited:  # parent ends copied by fork: EOF must come when the parent dies
        other.close()
    _init_worker()
    while True:
        try:
            job = conn.recv()
            if job is None:
                return
            conn.send(_extract_safely(job))
        except (EOFError, OSError):  # the parent is gone (killed): nothing to report to
            return


class _Worker:
    """One extraction process and the job it is working on."""

    def __init__(self, context: Any, inherited: list[Connection]) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_loop,
            args=(child, [*inherited, self.conn]),  # the child must not hold the parent's end
            daemon=True,
            name="mmval-prep",
        )
        # A forked child's garbage collector walks every object it inherited, writing to each
        # one's header: the pages holding them (most of the heap, torch imported) were copied into
        # every worker, and each clip paid for the faults. Frozen objects are never walked; the
        # child keeps them frozen, the parent thaws them at once (unless its caller froze some).
        thaw = gc.get_freeze_count() == 0
        gc.freeze()
        try:
            self.process.start()
        finally:
            if thaw:
                gc.unfreeze()
        child.close()
        self.job: int | None = None
        self.started = 0.0

    def give(self, number: int, job: tuple[Extractor, ClipTask]) -> None:
        self.conn.send(job)
        self.job, self.started = number, time.monotonic()

    def stop(self, *, kill: bool) -> None:
        """End the process: an idle one is asked to return, a busy (or hung) one is killed."""
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                kill = True
        if kill:
            self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _results(
    jobs: Sequence[tuple[Extractor, ClipTask]], workers: int, timeout: float
) -> Iterator[SampleRecord | tuple[str, str]]:
    """Outcomes in job order. At most `workers` clips run at once, each in a worker process; a
    clip past `timeout` seconds, or whose worker dies, becomes (source, reason) and the worker
    is replaced. Results wait for their turn in a window of a few jobs per worker (memory)."""
    if not jobs:
        return
    # Forked workers inherit the imported torch and PyAV; spawned ones re-import them, seconds
    # each, which dominated short jobs (bench/prep.py). Fork is safe here: the parent has decoded
    # nothing, and each worker resets torch to one thread. Elsewhere fork is not the safe default.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool: list[_Worker] = []
    window = 4 * max(workers, 1)
    done: dict[int, SampleRecord | tuple[str, str]] = {}
    given = returned = 0
    try:
        for _ in range(min(max(workers, 1), len(jobs))):
            pool.append(_Worker(context, [w.conn for w in pool]))
        while returned < len(jobs):
            if returned in done:
                yield done.pop(returned)
                returned += 1
                continue
            for worker in pool:
                if worker.job is None and given < min(len(jobs), returned + window):
                    worker.give(given, jobs[given])
                    given += 1
            busy = [w for w in pool if w.job is not None]
            deadline = min(w.started for w in busy) + timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for i, worker in enumerate(pool):
                if worker.job is None:
                    continue
                source = jobs[worker.job][1].source
                if worker.conn in ready:
                    try:
                        done[worker.job] = worker.conn.recv()
                        worker.job = None
                        continue
                    except (EOFError, OSError):  # it closed its pipe: it died
                        worker.process.join(timeout=5)
                        reason = f"worker process died (exit code {worker.process.exitcode})"
                elif time.monotonic() - worker.started >= timeout:
                    reason = f"timeout: no result after {timeout:g} s (worker killed)"
                else:
                    continue
                done[worker.job] = (source, reason)
                worker.stop(kill=True)
                pool[i] = _Worker(context, [w.conn for w in pool if w is not worker])
    finally:
        for worker in pool:
            worker.stop(kill=worker.job is not None)


def _shard_tasks(plan: PrepPlan) -> dict[str, list[list[ClipTask]]]:
    shards: dict[str, list[list[ClipTask]]] = {}
    for split, tasks in plan.splits.items():
        order = shard_order([t.sample_id for t in tasks])
        ordered = [tasks[i] for i in order]
        step = plan.rows_per_shard
        shards[split] = [ordered[i : i + step] for i in range(0, len(ordered), step)]
    return shards


def _reusable(out: Path, record_path: Path, tasks: list[ClipTask]) -> ShardResult | None:
    if not record_path.is_file():
        return None
    result = ShardResult.model_validate_json(record_path.read_text(encoding="utf-8"))
    if result.tasks != [t.sample_id for t in tasks]:
        return None
    shard = result.shard
    if shard is not None:
        path = out / shard.path
        if not path.is_file() or path.stat().st_size != shard.bytes:
            return None
        if sha256_file(path) != shard.sha256:
            return None
    return result


def run_plan(
    plan: PrepPlan,
    out: Path,
    header: DatasetHeader,
    *,
    workers: int | None = None,
    clip_timeout: float = CLIP_TIMEOUT,
    callbacks: PrepCallbacks | None = None,
    part: PartSpec | None = None,
) -> tuple[DataManifest, PrepSummary]:
    """Extract the plan's shards into `out` (with `part`, only that part's shards, keeping their
    numbers, and the planning errors only in part 0) and write its manifest last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    callbacks = callbacks or PrepCallbacks()
    workers = workers if workers is not None else (os.cpu_count() or 1)
    shards = _shard_tasks(plan)
    planning_errors = plan.errors
    if part is not None:
        record = part_record(plan, part)
        header = replace(header, extraction={**header.extraction, "part": record})
        shards = {
            s: {j: shards[s][j] for j in range(a, b)} for s, (a, b) in record["shards"].items()
        }
        planning_errors = plan.errors if part.index == 0 else []
    else:
        shards = {s: dict(enumerate(v)) for s, v in shards.items()}
    counts = {
        split: SplitCounts(planned=sum(len(tasks) for tasks in shards[split].values()))
        for split in plan.splits
    }
    results: dict[str, dict[int, ShardResult | None]] = {}
    pending: list[tuple[str, int, list[ClipTask]]] = []
    for split, shard_list in shards.items():
        results[split] = {}
        for number, tasks in shard_list.items():
            reused = _reusable(out, out / PARTIAL / f"{shard_path(split, number)}.json", tasks)
            results[split][number] = reused
            if reused is None:
                pending.append((split, number, tasks))
            else:
                counts[split].reused_shards += 1
                counts[split].written += len(reused.sample_ids)
                counts[split].failed += len(reused.errors)
    callbacks.on_plan(sum(len(tasks) for _, _, tasks in pending))

    jobs = [(plan.extractor, task) for _, _, tasks in pending for task in tasks]
    # closed on any exit: an exception (Ctrl-C) must not leave workers running
    with contextlib.closing(_results(jobs, workers, clip_timeout)) as stream:
        for split, number, tasks in pending:
            kept: list[tuple[str, int]] = []  # sample id, label
            errors: list[tuple[str, str]] = []
            rel = shard_path(split, number)
            with ShardWriter(out, rel, split, header.columns) as shard:
                for _ in tasks:
                    outcome = next(stream)
                    if isinstance(outcome, SampleRecord):
                        problem = record_problem(outcome, header.modalities)
                        if problem:  # a NaN or Inf input: an error, as a clip that fails
                            outcome = (outcome.source, problem)
                    if isinstance(outcome, SampleRecord):
                        shard.add(outcome)
                        kept.append((outcome.sample_id, outcome.label))
                    else:
                        errors.append(outcome)
                    callbacks.on_clip(isinstance(outcome, SampleRecord))
            result = ShardResult(
                tasks=[t.sample_id for t in tasks],
                shard=shard.info,
                sample_ids=[sample_id for sample_id, _ in kept],
                labels=[label for _, label in kept],
                errors=errors,
            )
            write_text_atomic(out / PARTIAL / f"{rel}.json", result.model_dump_json())
            results[split][number] = result
            counts[split].written += len(kept)
            counts[split].failed += len(errors)

    for name, data in plan.files.items():
        write_atomic(out / name, lambda path, data=data: path.write_bytes(data))
    completed = {
        split: [r for _, r in sorted(rs.items()) if r is not None] for split, rs in results.items()
    }
    manifest = finalize_dataset(out, header, completed, planning_errors)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return manifest, PrepSummary(splits=counts, planning_errors=len(planning_errors))
