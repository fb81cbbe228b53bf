"""Multi-process training (DDP) on torch.distributed: the process group and the collectives
the engine and the methods use. Every helper is the identity (or a no-op) in a single process,
so code written with them runs unchanged without torchrun.

The scheme (docs/distributed.md): every rank holds the whole model, identical on every rank by
construction (same seed, same updates); each trains on its share of every global batch and the
gradients of all optimised parameters are averaged (`GradientSync`) before any method reads or
edits them, so gradient edits see the global batch's gradient. Batch statistics a method needs
are reduced with `all_reduce_sum` / `batch_mean`; losses that couple the samples of a batch use
`differentiable_sum` and `gather_rows_with_grad`, whose backward passes make the averaged
gradient that of the global batch. The global random stream is seeded alike on every rank and
kept in lockstep, so a random decision the single-process method takes once per batch or epoch
is taken identically everywhere without communication.

`replicated()` marks code that every rank runs whole on the same data (a method re-training
copies of the model on the full split): inside it every helper acts as in one process.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from mmval.errors import UserError
from mmval.lazy import lazy_module

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist
    from torch import nn
else:
    torch = lazy_module("torch")
    dist = lazy_module("torch.distributed")
    nn = lazy_module("torch.nn")

T = TypeVar("T")
# the `op` names of all_reduce -> their torch.distributed.ReduceOp member
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


@dataclass
class _State:
    comm: torch.device | None = None  # where collectives run: this rank's GPU (NCCL) or the CPU
    replicated: int = 0  # depth of `replicated()` blocks


_STATE = _State()


def launched() -> bool:
    """Whether this process was started by torchrun (or `mmval train --nproc`) with others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group that torchrun's environment describes (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), once per process: NCCL when training on CUDA, gloo on
    the CPU. Returns this rank's device (cuda:LOCAL_RANK); outside torchrun, `device`."""
    if not launched():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise UserError(
                f"the processes joined a {dist.get_backend()} group for an earlier run; a run on "
                f"{device.type} needs {backend}: train every run of one command on one device kind."
            )
        if _STATE.comm is None:  # the group was joined by the caller
            cuda = backend == "nccl"
            _STATE.comm = torch.device("cuda", torch.cuda.current_device()) if cuda else device
        return _STATE.comm if device.type == "cuda" else device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(
                f"process with LOCAL_RANK {local} sees {torch.cuda.device_count()} GPU(s): start "
                "at most one process per GPU (--nproc-per-node)."
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _STATE.comm = device
    atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave the process group (at exit; a test's worker process calls it itself)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.comm = None


def world_size() -> int:
    """Processes sharing the training (1 outside torchrun and inside `replicated()`)."""
    if _STATE.replicated or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's index among `world_size()` (0 where that is 1)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0, the one that prints and writes files; also before the group is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def replicated() -> Iterator[None]:
    """Code every rank runs whole on the same data: collectives inside are skipped (every
    helper acts as in one process), so nothing is counted once per rank."""
    _STATE.replicated += 1
    try:
        yield
    finally:
        _STATE.replicated -= 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard_bounds(n: int) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of n items (rank order = item order)."""
    size, r = world_size(), rank()
    return n * r // size, n * (r + 1) // size


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    assert _STATE.comm is not None
    return t.detach().to(_STATE.comm if _STATE.comm.type == "cuda" else "cpu", copy=True)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The element-wise sum (or max, min) over ranks, as a new tensor on t's device (t itself
    in one process). Not differentiable."""
    if world_size() == 1:
        return t
    buf = _to_comm(t if t.dtype != torch.bool else t.to(torch.int64))
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    return buf.to(t.device, t.dtype)


def batch_mean(mean: torch.Tensor, count: int) -> torch.Tensor:
    """The global batch's mean from each rank's `mean` over its `count` samples (`mean` itself
    in one process)."""
    if world_size() == 1:
        return mean
    packed = torch.cat([(mean.detach() * count).reshape(-1), mean.new_tensor([count])])
    packed = all_reduce(packed)
    return (packed[:-1] / packed[-1]).view_as(mean)


def sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums over ranks, keys in the order rank 0 (then rank 1, ...) has them; a key some
    rank lacks counts 0 there."""
    if world_size() == 1:
        return dict(values)
    keys = list(dict.fromkeys(k for keys in all_gather_object(list(values)) for k in keys))
    total = all_reduce(torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t (first dimensions may differ) concatenated in rank order, on t's device.
    Not differentiable."""
    if world_size() == 1:
        return t
    return _gather(t, _row_counts(t))


def _row_counts(t: torch.Tensor) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.int64, device=_STATE.comm) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64, device=_STATE.comm))
    return [int(c) for c in counts]


def _gather(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    buf = _to_comm(t)
    if buf.shape[0] < max(sizes):  # all_gather takes equal shapes: pad, then cut
        buf = torch.cat([buf, buf.new_zeros(max(sizes) - buf.shape[0], *buf.shape[1:])])
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)


def gather_rows_with_grad(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's rows in rank order, the offset of this rank's rows), differentiable: the
    backward sums every rank's gradient for this rank's rows, so that with the gradients
    averaged over ranks a loss over the gathered rows trains as on the global batch."""
    if world_size() == 1:
        return t, 0
    sizes = _row_counts(t)
    offset = sum(sizes[: rank()])
    return _autograd()[0].apply(t, offset, sizes), offset


def differentiable_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of t over ranks, differentiable: its backward scales this rank's gradient by the
    number of ranks, so that after the gradients are averaged a loss f(sum over the global batch)
    gets f'(S) times the global batch's gradient of S, as in one process."""
    if world_size() == 1:
        return t
    return _autograd()[1].apply(t)


@functools.cache
def _autograd() -> tuple[type[torch.autograd.Function], type[torch.autograd.Function]]:
    """The autograd Functions of `gather_rows_with_grad` and `differentiable_sum`, defined on
    first use, so that importing this module does not import torch."""

    class _Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor, offset: int, sizes: list[int]) -> torch.Tensor:
            ctx.offset, ctx.rows = offset, t.shape[0]
            return _gather(t, sizes)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            total = all_reduce(grad.contiguous())
            return total[ctx.offset : ctx.offset + ctx.rows], None, None

    class _Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            return all_reduce(t.detach().clone())

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * world_size()

    return _Gather, _Sum


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's picklable `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and hand its result to every rank; a UserError there is
    raised on every rank (with its message), so no rank waits for one that stopped."""
    if world_size() == 1:
        return work()
    outcome: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if rank() == 0:
        try:
            outcome = ("ok", work())
        except UserError as exc:
            outcome = ("user", str(exc))
        except BaseException as exc:  # the others must not wait forever for rank 0
            outcome, failure = ("crash", f"{type(exc).__name__}: {exc}"), exc
    kind, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def main_first(work: Callable[[], T]) -> T:
    """Rank 0 runs `work` (which may write, e.g. prepare a data set), then the others do (and
    read what it wrote); errors as in `on_main`."""
    result = on_main(work)
    return result if rank() == 0 else work()


def _groups(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def module_digest(modules: Sequence[nn.Module]) -> torch.Tensor:
    """One float64 per parameter and floating buffer (its sum): equal on ranks in sync."""
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.detach().double().sum().cpu() for t in tensors])


def ranks_agree(digest: torch.Tensor) -> bool:
    """Whether every rank computed the same `digest` (exactly)."""
    if world_size() == 1:
        return True
    return bool(torch.equal(all_reduce(digest, "max"), all_reduce(digest, "min")))


def rng_digest(device: torch.device) -> torch.Tensor:
    """The global random state (CPU, and this rank's GPU) as float64 words, for `ranks_agree`."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    words = hashlib.sha256(state.numpy().tobytes()).digest()
    return torch.tensor([int.from_bytes(words[i : i + 6], "little") for i in range(0, 30, 6)])


class GradientSync:
    """Averages the gradients of `params` over ranks: the engine's stand-in for DDP's backward
    all-reduce, called by `StepTools.reduce_gradients` / `step`.

    One flat all-reduce per dtype; a parameter no rank gave a gradient keeps `None` (so the
    optimizer skips it, as in one process), one that only some ranks reached gets the mean with
    zeros for the others. Hooks note every backward that adds to a gradient, so `reduce` is a
    no-op until something was back-propagated since the last one; edits a method makes to the
    reduced gradients (identical on every rank) are kept.

    `params` are those trainable when it is made, before `train.freeze` froze any: a parameter
    frozen in an epoch (`requires_grad` off on every rank alike, from the recipe and the epoch)
    is left out of that epoch's reductions, and taken in again once it trains.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.pending = False
        self.handles = [p.register_post_accumulate_grad_hook(self._touched) for p in self.params]

    def _touched(self, param: torch.Tensor) -> None:
        self.pending = True

    def reduce(self) -> None:
        if not self.pending or world_size() == 1:
            return
        self.pending = False
        size = world_size()
        trained = [p for p in self.params if p.requires_grad]
        for (device, dtype), members in _groups(trained).items():
            params = [trained[i] for i in members]
            flat = torch.cat(
                [
                    *(
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in params
                    ),
                    torch.tensor(
                        [float(p.grad is not None) for p in params], dtype=dtype, device=device
                    ),
                ]
            )
            flat = all_reduce(flat)
            reached = flat[-len(params) :].tolist()
            start = 0
            for p, count in zip(params, reached, strict=True):
                mean = flat[start : start + p.numel()].view_as(p).div_(size)
                start += p.numel()
                if not count:
                    p.grad = None
                elif p.grad is None:
                    p.grad = mean
                else:  # in place: keeps the gradient's memory layout (channels_last)
                    p.grad.copy_(mean)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def spawn_local(nproc: int, args: Sequence[str]) -> int:
    """Run `python -m mmval ARGS` in `nproc` local processes through torchrun's launcher
    (standalone rendezvous on a free local port); returns the exit code (a failed rank's)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    config = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "mmval", *args]
    )
    try:
        run(config)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0
