"""The Per-Sample Bottleneck's settings: one validated, immutable configuration type."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, SupportsInt, cast


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    as_int = int(cast(SupportsInt, value))  # every Real has __int__
    if as_int != value or as_int < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return as_int


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class IBAConfig:
    """Settings of a Per-Sample Bottleneck; defaults are the reference library's.

    Immutable and validated on creation: :meth:`replace` makes a changed copy and
    validates it the same way, so per-call overrides (``analyze(..., beta=...)``) and
    attribute assignments (``iba.beta = 1``) obey exactly the constructor's rules.

    Attributes:
        sigma: std of the Gaussian that smooths the mask, in feature-map pixels
            (0 or ``None``: no smoothing).
        beta: weight of the mean capacity (nats per element) in the loss.
        min_std: lower bound on the feature std (avoids division by ~0).
        optimization_steps: Adam steps per explanation.
        lr: Adam learning rate.
        batch_size: noise samples (noisy copies of each input) per step.
        initial_alpha: starting mask logit (5 lets ~99.3% of the signal pass).
        active_neurons_threshold: elements non-zero in at most this fraction of the
            estimation samples are inactive (carry no information).
        relu: clamp the noisy features at zero (for post-ReLU layers).
        progbar: show tqdm progress bars.
        compile: compile the optimisation step with the backend's compiler.  ``None``
            (default): as the backend recommends (:attr:`Backend.compile_by_default`),
            for the engine's own losses; a user's loss closure is compiled only when
            this is ``True`` (the closure must then be traceable).
    """

    sigma: float | None = 1.0
    beta: float = 10.0
    min_std: float = 0.01
    optimization_steps: int = 10
    lr: float = 1.0
    batch_size: int = 10
    initial_alpha: float = 5.0
    active_neurons_threshold: float = 0.01
    relu: bool = False
    progbar: bool = False
    compile: bool | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.sigma is not None:
            sigma = _real("sigma", self.sigma)
            if sigma < 0:
                raise ValueError(f"sigma must be >= 0 or None, got {self.sigma!r}")
            put(self, "sigma", sigma)
        beta = _real("beta", self.beta)
        if beta < 0:
            raise ValueError(f"beta must be finite and >= 0, got {self.beta!r}")
        put(self, "beta", beta)
        min_std = _real("min_std", self.min_std)
        if min_std < 0:
            raise ValueError(f"min_std must be >= 0, got {self.min_std!r}")
        put(self, "min_std", min_std)
        put(self, "optimization_steps", _integer("optimization_steps", self.optimization_steps, 0))
        lr = _real("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        put(self, "lr", lr)
        put(self, "batch_size", _integer("batch_size", self.batch_size, 1))
        put(self, "initial_alpha", _real("initial_alpha", self.initial_alpha))
        threshold = _real("active_neurons_threshold", self.active_neurons_threshold)
        if not 0 <= threshold < 1:
            raise ValueError(
                f"active_neurons_threshold must be in [0, 1), got {self.active_neurons_threshold!r}"
            )
        put(self, "active_neurons_threshold", threshold)
        put(self, "relu", _flag("relu", self.relu))
        put(self, "progbar", _flag("progbar", self.progbar))
        if self.compile is not None:
            put(self, "compile", _flag("compile", self.compile))

    def replace(self, **changes: Any) -> IBAConfig:
        """A copy with ``changes`` applied and validated; unknown names are refused."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the settings are: {list(FIELDS)}")
        return dataclasses.replace(self, **changes)

    def override(self, **changes: Any) -> IBAConfig:
        """:meth:`replace` with the changes that are not ``None`` (per-call overrides)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return self.replace(**given) if given else self

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)


#: Names of the settings, in declaration order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(IBAConfig))


def _setting_property(name: str) -> property:
    def get(self: Any) -> Any:
        return getattr(self.config, name)

    def set_(self: Any, value: Any) -> None:
        self.config = self.config.replace(**{name: value})

    return property(
        get, set_, doc=f"The ``{name}`` setting (see :class:`IBAConfig`); assignments are validated."
    )


class LiveSettings:
    """Every :class:`IBAConfig` field as a live, validated attribute of an object with a
    ``config`` attribute (the bottleneck, every front): assigning ``obj.beta = 1``
    replaces the whole configuration through :meth:`IBAConfig.replace`, so the
    constructor's checks apply."""

    config: IBAConfig
    # The fields' types, for type checkers; the properties are added below.
    sigma: float | None
    beta: float
    min_std: float
    optimization_steps: int
    lr: float
    batch_size: int
    initial_alpha: float
    active_neurons_threshold: float
    relu: bool
    progbar: bool
    compile: bool | None


for _name in FIELDS:
    setattr(LiveSettings, _name, _setting_property(_name))
