"""``torch.distributed`` as the core's :class:`~iba_core.contract.Collectives`.

The core owns the data-parallel workflow; this module only says whether this process is
one of several in an initialised process group, and exchanges objects with
``all_gather_object``.  ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``) starts the processes; the ``iba`` command initialises
the process group from those variables (:func:`collectives` with ``init=True``).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from iba_core.contract import Collectives

#: Seconds a collective waits for the other processes before the runtime gives up, for
#: process groups the ``iba`` command starts (torch's default applies to yours).
TIMEOUT_ENV = "IBA_DIST_TIMEOUT"


class TorchCollectives(Collectives):
    """One shard per process of the default ``torch.distributed`` process group."""

    def __init__(self, owned: bool = False) -> None:
        self.rank = dist.get_rank()
        self.processes = dist.get_world_size()
        self.runtime = f"torch.distributed ({dist.get_backend()})"
        self._owned = owned

    def close(self) -> None:
        # A process that leaves with the group's threads still running may abort at exit.
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.processes
        dist.all_gather_object(out, obj)
        return out


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_environment() -> None:
    """Initialise the default process group from the launcher's variables: NCCL with one
    GPU per process (``LOCAL_RANK``) when CUDA is there, else gloo."""
    timeout = os.environ.get(TIMEOUT_ENV)
    kwargs: dict[str, Any] = {}
    if timeout:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
    if torch.cuda.is_available() and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()), **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)


def collectives(init: bool = False) -> TorchCollectives | None:
    """The collectives of the default process group when it holds several processes;
    with ``init``, a group is first started from the launcher's environment if there is
    one and no group yet."""
    if not dist.is_available():
        return None
    owned = False
    if not dist.is_initialized():
        if not (init and launched()):
            return None
        init_from_environment()
        owned = True
    if dist.get_world_size() < 2:
        return None
    return TorchCollectives(owned)
