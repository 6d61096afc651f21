"""Data-parallel estimation and explanation inside a ``tf.distribute.MirroredStrategy``.

Two logical CPU devices must be configured before TensorFlow starts, so the runs happen in
a subprocess, which writes what it computed to a file for the test to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import contextlib, sys, warnings
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from iba_core import IBA
    from iba_core.contract import LocalShards
    from iba_tf import IBACopy

    warnings.simplefilter("ignore")
    used = []
    enter = LocalShards.on_shard
    LocalShards.on_shard = lambda self, shard: used.append(shard) or enter(self, shard)


    def make_model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12, 12, 1))
        x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
        x = keras.layers.ReLU(name="relu1")(x)
        x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv2")(x)
        x = keras.layers.ReLU(name="relu2")(x)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


    rng = np.random.default_rng(1)
    data = rng.normal(size=(30, 12, 12, 1)).astype(np.float32)
    x = rng.normal(size=(40, 12, 12, 1)).astype(np.float32)
    targets = rng.integers(0, 5, size=40)
    out = {}
    for name, strategy in (("one", None), ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = make_model()
            iba = IBA(model, "relu2")
            state = iba.estimate(data, batch_size=6, n_samples=26).state_dict()
            out[name + "_estimated_on"] = np.asarray(sorted(set(used)))
            used.clear()
            out[name + "_n"], out[name + "_mean"], out[name + "_m2"] = state["n"], state["mean"], state["m2"]
            out[name + "_maps"] = iba.analyze(x, target=targets, seed=3, noise="numpy", optimization_steps=3)
            # The Keras front (a model copy with an IBALayer) uses the same engine.
            copy = IBACopy(make_model(), "relu2")
            copy.estimate(data, batch_size=6, n_samples=26)
            out[name + "_copy"] = copy.analyze(x, target=targets, seed=3, noise="numpy", optimization_steps=3)
            out[name + "_shards"] = np.asarray(sorted(set(used)))
            used.clear()
    np.savez(sys.argv[1], **out)
    """
)


def test_mirrored_strategy_over_two_devices_gives_one_device_results(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    # One device used no shards; the strategy's two devices both worked.
    assert got["one_shards"].size == 0 and got["one_estimated_on"].size == 0
    np.testing.assert_array_equal(got["two_estimated_on"], [0, 1])
    np.testing.assert_array_equal(got["two_shards"], [0, 1])
    assert int(got["one_n"]) == int(got["two_n"]) == 26
    np.testing.assert_allclose(got["two_mean"], got["one_mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["two_m2"], got["one_m2"], rtol=1e-12, atol=1e-12)
    assert got["two_maps"].shape == (40, 12, 12)
    # Float32 round-off (here the same operations on every device: equal).
    np.testing.assert_allclose(got["two_maps"], got["one_maps"], rtol=1e-6, atol=1e-6)
    assert np.all(got["one_maps"] > 0)
    np.testing.assert_allclose(got["two_copy"], got["one_copy"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["one_copy"], got["one_maps"], rtol=1e-4, atol=1e-5)
