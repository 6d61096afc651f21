"""``tf.distribute`` as the core's :class:`~iba_core.contract.Collectives`.

Inside the scope of a ``tf.distribute.MirroredStrategy`` (or another single-worker
strategy) over several devices, the core shares estimates and explanations out to the
strategy's devices: one shard per device, all in this process, each worked on inside
``tf.device``.  The core owns the workflow; this module only names the devices.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from iba_core.contract import LocalShards


def collectives() -> LocalShards | None:
    """The devices of the distribution strategy in scope, or ``None`` (no strategy, one
    device, or inside a replica function).  Strategies of several workers (processes)
    are refused with a clear error: the core's data-parallel runs need them to exchange
    results, which this backend does not provide yet."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context() is False:
        return None
    strategy = tf.distribute.get_strategy()
    extended = strategy.extended
    workers = getattr(extended, "_num_workers", 1) or 1
    if int(workers) > 1:
        raise NotImplementedError(
            f"{type(strategy).__name__} over {workers} workers is not supported by iba yet; "
            "explain inside a MirroredStrategy on one machine, or run one process per machine "
            "and merge the saved estimates with 'iba merge-estimates'"
        )
    devices = list(extended.worker_devices)
    if len(devices) < 2:
        return None
    return LocalShards(devices, runtime=f"tf.distribute.{type(strategy).__name__}", enter=_on_device)


def _on_device(device: Any) -> Any:
    return tf.device(device)
