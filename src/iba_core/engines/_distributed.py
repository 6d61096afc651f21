"""Data-parallel estimation and explanation, written once for every backend.

A backend hands the core its framework's collectives (:meth:`Backend.distributed`:
``torch.distributed`` under ``torchrun``, a ``tf.distribute.MirroredStrategy`` in scope);
everything else is here:

- **Estimation.**  The batches are dealt out to the shards in turn (batch ``i`` to shard
  ``i % K``) when every process reads the same data; when the processes read different
  data (e.g. through a ``DistributedSampler``) each process estimates on all of its own.
  Each shard keeps its own Welford estimate; the estimates are merged exactly with Chan's
  formula (:meth:`Estimator.merge`) in shard order, so every process ends with the same
  estimate, equal to one process's estimate over the same batches to float64 round-off.
  The sample limit counts all shards together, in the order one process would read the
  batches.
- **Explanation.**  The inputs are cut into units of whole clean passes (the pass that
  finds the targets and features) made of whole optimisation passes, as one process
  makes them (see :func:`clean_chunk`); unit ``j`` is explained by shard ``j % K``, and
  the maps are gathered in input order on every process.  Input ``i`` draws its noise
  from the stream ``seed + i`` wherever it is explained, so the maps equal one
  process's maps: bitwise where the backend limits its passes (the CPU), to round-off
  where one process would make a single pass (accelerators).
- **Failures.**  Each process does its part, then the processes exchange either their
  results or the error they met; a failure anywhere raises on every process (the failing
  one re-raises its own error, the others a :class:`DistributedError` naming it), and so
  does a disagreement (another layer, other feature shapes).  A process that dies or hangs
  without reaching the exchange is left to the runtime's own timeout and to the launcher.

Progress bars are shown by rank 0 only; log lines (logger ``"iba"``) name the rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from ..contract._backend import Backend
from ..contract._collectives import Collectives, DistributedError
from ..math._estimator import Estimator
from ._padding import record_masked

T = TypeVar("T")

LOG = logging.getLogger("iba")

_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("iba_data_parallel", default=None)


@contextlib.contextmanager
def data_parallel(enabled: bool) -> Iterator[None]:
    """Context: whether estimates and explanations inside use the framework's distributed
    runtime when one is active.

    ``data_parallel(True)``: under an initialised ``torch.distributed`` process group of
    several processes, ``estimate`` and ``analyze`` are collective calls that every
    process must make (as with ``distributed=True``).  ``data_parallel(False)``: each
    process works alone, also inside a ``tf.distribute`` strategy's scope.  Outside both,
    only a strategy's scope is used without being asked: a process group may be there
    for other work, and a call made on one rank alone must not wait for the others.
    """
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


#: What ``distributed=`` of ``estimate`` accepts besides ``None``, ``True`` and ``False``:
#: every process reads the same batches (dealt out to the shards), or each its own.
DATA_SPLITS = ("shared", "own")


def collectives(backend: Backend, distributed: bool | str | None = None) -> Collectives | None:
    """The collectives to use: ``None`` to work alone.

    ``distributed``: ``None`` follows :func:`data_parallel` and the runtime (data-parallel
    when the backend reports a run of several shards that is used without being asked,
    :attr:`Collectives.automatic`, or inside ``data_parallel(True)``), ``False`` works
    alone, ``True`` (or, for estimates, one of :data:`DATA_SPLITS`) requires a
    data-parallel run.
    """
    if distributed is not None and not isinstance(distributed, bool) and distributed not in DATA_SPLITS:
        raise ValueError(
            f"distributed must be None, True, False or one of {DATA_SPLITS}, got {distributed!r}"
        )
    enabled = _ENABLED.get()
    if distributed is False or (distributed is None and enabled is False):
        return None
    dist = backend.distributed()
    if dist is not None and dist.shards < 2:
        dist = None
    if dist is not None and distributed is None and enabled is None and not dist.automatic:
        return None  # a process group is used when asked for
    if dist is None and distributed is not None:
        raise RuntimeError(
            f"distributed={distributed!r} but the {backend.name} backend reports no data-parallel run: "
            "start the processes with the framework's launcher (e.g. torchrun) and initialise "
            "its runtime, or open a distribution strategy's scope"
        )
    return dist


def log(dist: Collectives | None, message: str, *args: Any) -> None:
    """An info line on logger ``"iba"`` naming the rank."""
    if dist is not None:
        LOG.info(f"[{dist.describe()}] {message}", *args)
    else:
        LOG.info(message, *args)


def exchange(dist: Collectives, work: Callable[[], T]) -> list[T]:
    """Run ``work()`` here, then gather every process's result in rank order.

    A failure on any process raises on every process: the failing process re-raises its
    own exception, the others raise :class:`DistributedError` naming the rank and its
    error.  So one process's error stops the run instead of leaving the others waiting.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = work()
    except Exception as exc:
        error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    outcomes = dist.all_gather((message, None if error is not None else result))
    failed = [(rank, m) for rank, (m, _) in enumerate(outcomes) if m is not None]
    if error is not None:
        raise error
    if failed:
        rank, m = failed[0]
        raise DistributedError(f"{dist.runtime}: rank {rank} failed: {m}")
    return [r for _, r in outcomes]


def agree(dist: Collectives, what: str, value: Any, remedy: str) -> None:
    """Raise :class:`DistributedError` on every process unless all processes give equal
    ``value`` (a small picklable description)."""
    values = dist.all_gather(value)
    differ = [rank for rank, v in enumerate(values) if v != values[0]]
    if differ:
        shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"{dist.runtime}: the processes disagree on {what} ({shown}); {remedy}")


def fingerprint(a: np.ndarray) -> str:
    """A short digest of an array's shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, str(a.dtype))).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- estimation --------------------------------------------------------------------------
def sharded_estimate(
    dist: Collectives,
    backend: Backend,
    batches: Iterable[Any],
    record: Callable[[Any], list[Any]],
    estimators: Sequence[Estimator],
    *,
    n_samples: int,
    bar: Any,
    split: str | None = None,
) -> None:
    """The estimation loop over shards (see the module docstring).

    ``split``: ``"shared"`` (every process reads the same batches; batch ``i`` goes to
    shard ``i % K``), ``"own"`` (each process reads its own; in round ``j`` shard ``s``
    takes its process's next batch, read as batch ``j * K + s``), or ``None`` to tell
    by comparing the processes' first batches.

    Batches may be :class:`~iba_core.engines.MaskedBatch` es: each shard's statistics then
    leave the padding out, with per-element counts that the merge combines exactly.

    Round by round, each shard records the features of one batch; the processes exchange
    the batches' sample counts (so the sample limit cuts where one process would cut),
    then each batch's own statistics (count, mean, sum of squared deviations, non-zero
    counts), which every process merges into ``estimators`` in the order one process
    would have read the batches.  The result is therefore the very estimate one process
    makes over the same batches, on every process.
    """
    shards, local = dist.shards, dist.local_shards()
    it = iter(batches)
    first = next(it, None)
    if split is None:
        mine = None if first is None else describe(backend, first)
        same_data = len(set(dist.all_gather(mine))) == 1 and mine is not None
    else:
        same_data = split == "shared"
    log(
        dist,
        "estimate: %s",
        "batches dealt out to the shards" if same_data else "each process on its own data",
    )
    stream: Iterator[Any] = it if first is None else _chain(first, it)
    counted = 0
    while counted < n_samples:
        taken, exhausted = _deal(stream, shards, local, same_data)
        features: dict[int, list[tuple[np.ndarray, np.ndarray | None]]] = {}
        work = functools.partial(_record_shards, dist, backend, record, taken, features, exhausted)
        outcomes = exchange(dist, work)
        sizes = {s: n for sizes_p, _ in outcomes for s, n in sizes_p.items()}
        takes, before = {}, counted
        for s in sorted(sizes):
            takes[s] = max(0, min(sizes[s], n_samples - before))
            before += takes[s]
        gathered: dict[int, list[dict[str, np.ndarray]]] = {}
        for process in exchange(dist, functools.partial(_shard_statistics, features, takes)):
            gathered.update(process)
        for s in sorted(gathered):
            _check_shapes(dist, s, gathered[s], estimators)
            _merge_states(estimators, gathered[s])
        if bar is not None:
            bar.update(before - counted)
        counted = before
        if all(done for _, done in outcomes) or not sizes:
            break


def _deal(
    stream: Iterator[Any], shards: int, local: Sequence[int], same_data: bool
) -> tuple[dict[int, Any], bool]:
    """One round's batches of this process's shards, and whether the data ran out.

    With the same data on every process, the next ``shards`` batches are read and shard
    ``s`` takes the ``s``-th; otherwise each local shard takes the process's next batch.
    """
    if same_data:
        # At most one batch per shard: the stream may end sooner, and must not be read further.
        group = [b for _, b in zip(range(shards), stream, strict=False)]
        return {s: group[s] for s in local if s < len(group)}, len(group) < shards
    taken = {}
    for s in local:
        b = next(stream, None)
        if b is not None:
            taken[s] = b
    return taken, len(taken) < len(local)


def _record_shards(
    dist: Collectives,
    backend: Backend,
    record: Callable[[Any], list[Any]],
    taken: dict[int, Any],
    features: dict[int, list[tuple[np.ndarray, np.ndarray | None]]],
    exhausted: bool,
) -> tuple[dict[int, int], bool]:
    """Record the features (and element masks) of each shard's batch into ``features``:
    ``({shard: samples}, exhausted)`` for the exchange."""
    for s, b in taken.items():
        with dist.on_shard(s):
            features[s] = [(np.asarray(backend.to_numpy(f)), m) for f, m in record_masked(backend, record, b)]
    return {s: int(f[0][0].shape[0]) for s, f in features.items()}, exhausted


def _shard_statistics(
    features: dict[int, list[tuple[np.ndarray, np.ndarray | None]]], takes: dict[int, int]
) -> dict[int, list[dict[str, np.ndarray]]]:
    """Each shard's statistics of its first ``takes[s]`` samples (shards taking none are left out)."""
    out = {}
    for s, fs in features.items():
        if takes[s] > 0:
            parts = [Estimator() for _ in fs]
            for est, (f, m) in zip(parts, fs, strict=True):
                est.update(f[: takes[s]], None if m is None else m[: takes[s]])
            out[s] = [est.state_dict() for est in parts]
    return out


def _merge_states(estimators: Sequence[Estimator], states: list[dict[str, np.ndarray]]) -> None:
    """Merge one shard's statistics (one state per estimator) into ``estimators``."""
    for est, state in zip(estimators, states, strict=True):
        part = Estimator()
        part.load_state_dict(state)
        est.merge(part)


def _check_shapes(
    dist: Collectives, shard: int, states: list[dict[str, np.ndarray]], estimators: Sequence[Estimator]
) -> None:
    if len(states) != len(estimators):
        raise DistributedError(
            f"{dist.runtime}: shard {shard} recorded {len(states)} layers, this process "
            f"{len(estimators)}; every process must run the same model and layers"
        )
    for est, state in zip(estimators, states, strict=True):
        shape = tuple(state["mean"].shape)
        if est.shape is not None and est.n > 0 and shape != est.shape:
            raise DistributedError(
                f"{dist.runtime}: shard {shard} recorded features of shape {shape}, the "
                f"others {est.shape}; every process must run the same model, layer and input size"
            )


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# -- explanation -------------------------------------------------------------------------
def clean_chunk(backend: Backend, x: Any, copies: int, inputs_per_pass: int | None) -> int:
    """Inputs per clean pass (the one pass without noise that finds the targets and the
    layer's features): those of one optimisation pass where the backend limits its passes
    (:meth:`~Backend.pass_size`), all inputs where it does not.  The whole model on as
    many inputs as an optimisation pass explains takes no more memory than that pass, so
    the clean pass does not set the peak of a call on many inputs; and a data-parallel
    run that gives each shard whole clean passes makes exactly the passes one process
    makes."""
    n = int(x.shape[0])
    limit = backend.pass_size(x)
    if limit is None:
        return n
    if inputs_per_pass is not None and not _whole(inputs_per_pass):
        return limit  # Bottleneck.explain refuses it with a clear message
    return int(inputs_per_pass) if inputs_per_pass is not None else max(1, limit // copies)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) >= 1


def shard_unit(
    backend: Backend, x: Any, copies: int, inputs_per_pass: int | None, shards: int
) -> tuple[int, int]:
    """``(unit, k)``: the inputs a shard takes at a time, and the inputs per optimisation
    pass.  Where the backend limits its passes, a unit is one clean pass of one process
    (see :func:`clean_chunk`), so the shards make the very passes one process makes;
    elsewhere the inputs are split evenly over the shards."""
    if inputs_per_pass is not None and not _whole(inputs_per_pass):
        raise ValueError(f"inputs_per_pass must be an integer >= 1, got {inputs_per_pass!r}")
    limit = backend.pass_size(x)
    if limit is None:
        k = int(inputs_per_pass) if inputs_per_pass is not None else math.ceil(int(x.shape[0]) / shards)
        return max(1, k), max(1, k)
    k = int(inputs_per_pass) if inputs_per_pass is not None else max(1, limit // copies)
    return clean_chunk(backend, x, copies, k), k


def rows_of(value: Any, n: int, start: int, stop: int, backend: Backend) -> Any:
    """``value`` for inputs ``start:stop`` when it holds one entry per input (an array,
    tensor or sequence of ``n``), else ``value`` itself (one value for all)."""
    if value is None or isinstance(value, (str, bytes, int, float, np.integer, np.floating)):
        return value
    if hasattr(value, "shape"):
        shape = tuple(value.shape)
        return value[start:stop] if len(shape) >= 1 and shape[0] == n else value
    if isinstance(value, Sequence) and len(value) == n:
        return list(value)[start:stop]
    return value


def seeds_of(seed: Any, start: int, stop: int, n: int, backend: Backend) -> Any:
    """The noise seeds of inputs ``start:stop`` (input ``i`` draws from ``seed + i``)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(start, stop)]
    return rows_of(seed, n, start, stop, backend)


def sharded_analyze(
    dist: Collectives,
    backend: Backend,
    x: Any,
    *,
    unit: int,
    explain_part: Callable[[int, int], Any],
    explain_alone: Callable[[], Any],
    given: Any = None,
) -> Any:
    """Maps ``(N, ...)`` of ``x`` made by all shards and gathered in input order, on every
    process.

    The inputs are cut into units of ``unit``; unit ``j`` is explained by shard ``j % K``
    (``explain_part(start, stop)``: the maps of inputs ``start:stop``, explained alone)
    inside :meth:`Collectives.on_shard`.  ``explain_alone()`` explains all inputs here:
    what happens when the processes were given different inputs or settings (``given``:
    what else must agree, compared by :func:`describe`).
    """
    n = int(x.shape[0])
    key = (describe(backend, x), describe(backend, given))
    if len(set(dist.all_gather(key))) > 1:
        log(dist, "analyze: the processes were given different inputs; each explains its own")
        return explain_alone()
    local = set(dist.local_shards())
    cuts = [(j, start, min(n, start + unit)) for j, start in enumerate(range(0, n, unit))]
    mine = [(j, start, stop) for j, start, stop in cuts if j % dist.shards in local]
    log(dist, "analyze: %d inputs, %d of %d parts here", n, len(mine), len(cuts))

    def work() -> dict[int, np.ndarray]:
        done = {}
        for j, start, stop in mine:
            with dist.on_shard(j % dist.shards):
                done[j] = np.asarray(backend.to_numpy(explain_part(start, stop)))
        return done

    results: dict[int, np.ndarray] = {}
    for process in exchange(dist, work):
        results.update(process)
    maps = np.concatenate([results[j] for j, _, _ in cuts])
    return backend.from_numpy(maps, like=x)


def describe(backend: Backend, value: Any) -> str:
    """A short text that is equal for equal values: arrays and tensors by their bytes,
    sequences and mappings item by item, numbers and strings by ``repr``; other objects
    (e.g. a loss function) by their type only."""
    if value is None or isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        return repr(value)
    if isinstance(value, np.ndarray):
        return fingerprint(value)
    if hasattr(value, "shape"):
        return fingerprint(np.asarray(backend.to_numpy(value)))
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{describe(backend, v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(describe(backend, v) for v in value) + "]"
    return type(value).__name__
