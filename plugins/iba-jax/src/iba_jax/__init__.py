"""iba's backend for JAX and Flax NNX models, shipped as its own distribution.

Installing ``iba-jax`` registers the backend ``"jax"`` (alias ``"flax"``) through the
``iba.backends`` entry point; use it through the generic front::

    from iba_core import IBA

    iba = IBA(model, "conv2")            # an nnx.Module and the path of a submodule
    iba.estimate(train_images)           # (N, H, W, C) arrays
    maps = iba.analyze(images, target=labels)
"""

from __future__ import annotations

from iba_core.contract import lazy_exports

__all__ = ["JaxBackend"]

__getattr__, __dir__ = lazy_exports(__name__, {"JaxBackend": "iba_jax._backend"})
