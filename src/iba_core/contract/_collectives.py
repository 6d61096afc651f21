"""The optional collectives part of the contract: what data-parallel work needs from a
framework's own distributed runtime (``torch.distributed``, ``tf.distribute``).

The core owns the whole data-parallel workflow (which inputs each shard takes, merging
estimates exactly, gathering maps in input order, who writes files and shows progress);
a backend supplies only this small object from :meth:`Backend.distributed`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any


class DistributedError(RuntimeError):
    """A data-parallel run failed on one of its processes or shards, or the processes
    disagreed (another layer, other shapes, other inputs).  Raised on every process with
    the same message, so the whole run stops instead of waiting for the missing one."""


class Collectives(abc.ABC):
    """The collectives of a data-parallel run, as the core sees them.

    The work is split into :attr:`shards` parts.  This process works on
    :meth:`local_shards`, each inside :meth:`on_shard` (e.g. on that shard's device);
    processes exchange Python objects (NumPy arrays, numbers, strings) with
    :meth:`all_gather`.  ``torch.distributed`` has one shard per process (the process's
    rank); a ``tf.distribute.MirroredStrategy`` has one shard per device, all in one
    process.

    Attributes:
        rank: this process's index among the :attr:`processes` (0 writes files and shows
            progress bars).
        processes: how many processes take part.
        runtime: the runtime's name for messages (e.g. ``"torch.distributed (gloo)"``).
    """

    rank: int = 0
    processes: int = 1
    runtime: str = ""
    #: Whether estimates and explanations use this run without being asked.  ``True`` for
    #: a run the user opened around the calls (a ``tf.distribute`` strategy's scope);
    #: ``False`` for a process group, which a training script may hold for other work: a
    #: call on one rank alone would then wait for the others, so it must be asked for
    #: (``distributed=True`` or :func:`iba_core.engines.data_parallel`).
    automatic: bool = False

    @property
    def shards(self) -> int:
        """How many shards the work is split into (all processes together)."""
        return self.processes

    def local_shards(self) -> tuple[int, ...]:
        """The shards this process works on, in increasing order."""
        return (self.rank,)

    def on_shard(self, shard: int) -> contextlib.AbstractContextManager[Any]:
        """Context in which this process works on ``shard`` (e.g. on its device)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process.

        A collective: every process must call it, the same number of times.
        """

    def close(self) -> None:
        """End the runtime if the backend started it (``Backend.distributed(init=True)``);
        a runtime the user started is left alone.  Called once, when the work is done."""
        return None  # nothing to end by default

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0

    def describe(self) -> str:
        """``"rank r/K"`` for log lines."""
        return f"rank {self.rank}/{self.processes}"


class LocalShards(Collectives):
    """Several shards in this one process (e.g. the devices of a ``MirroredStrategy``):
    nothing to exchange."""

    automatic = True

    def __init__(self, devices: list[Any], runtime: str, enter: Any = None) -> None:
        self._devices = list(devices)
        self._enter = enter
        self.runtime = runtime

    @property
    def shards(self) -> int:
        return len(self._devices)

    def local_shards(self) -> tuple[int, ...]:
        return tuple(range(len(self._devices)))

    def on_shard(self, shard: int) -> contextlib.AbstractContextManager[Any]:
        if self._enter is None:
            return contextlib.nullcontext()
        return self._enter(self._devices[shard])

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def describe(self) -> str:
        return f"{len(self._devices)} devices"
