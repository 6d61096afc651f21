"""Keras models cut after the bottleneck (``TFBackend.split_after``: a Functional model
from the layer's output to the model's outputs); see tests/test_split.py for PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.tf, pytest.mark.filterwarnings("ignore::iba_core.FewSamplesWarning")]

from iba_tf import IBACopy, IBALayer  # noqa: E402
from iba_tf._backend import TFBackend  # noqa: E402

L = keras.layers
SAME = {"rtol": 1e-5, "atol": 1e-7}  # float32, the same features on the same rows


class Count(L.Layer):
    """The identity; records the batch size of each eager call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows: list[int] = []

    def call(self, x):
        if tf.executing_eagerly():
            self.rows.append(int(x.shape[0]))
        return x


def functional(skip: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = Count(name="count")(inputs)
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(h)
    z = L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    if skip:
        z = L.Add(name="skip")([z, h])
    z = L.GlobalAveragePooling2D(name="gap")(z)
    return keras.Model(inputs, L.Dense(4, name="fc")(z))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        keras.utils.set_random_seed(1)
        self.count = Count(name="count")
        self.conv1 = L.Conv2D(6, 3, padding="same", activation="relu", name="conv1")
        self.iba = IBALayer(name="iba")
        self.gap = L.GlobalAveragePooling2D()
        self.fc = L.Dense(4, name="fc")

    def call(self, x):
        return self.fc(self.gap(self.iba(self.conv1(self.count(x)))))


def images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype("float32")


def nodes(model: keras.Model) -> list[tuple[int, int]]:
    return [(len(x._inbound_nodes), len(x._outbound_nodes)) for x in model.layers]


def test_where_a_keras_model_can_be_cut():
    backend = TFBackend()
    model = functional()
    before = nodes(model)
    tail = backend.split_after(model, "conv2")
    assert tail is not None
    assert nodes(model) == before  # the nodes Keras recorded for the cut are gone
    x = images(2)
    features = keras.Model(model.inputs[0], model.get_layer("conv2").output)(x)
    before = nodes(model)
    np.testing.assert_allclose(tail(features), model(x), rtol=1e-6, atol=1e-6)
    assert nodes(model) == before
    assert backend.split_after(functional(skip=True), "conv2") is None  # a path around it
    sub = Subclassed()
    sub(images(1))
    assert backend.split_after(sub, sub.iba) is None  # no graph to cut


@pytest.mark.parametrize("skip", [False, True], ids=["cut", "skip around the layer"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_maps_are_those_of_the_whole_model(skip, compiled):
    model = functional(skip=skip)
    iba = IBACopy(model, "conv2")
    before = nodes(iba.model)
    iba.estimate(images(32, seed=9), progbar=False)
    count = iba.model.get_layer("count")
    x = images(2)
    count.rows.clear()
    maps = iba.analyze(x, target=[1, 3], seed=0, optimization_steps=4, compile=compiled)
    if not compiled:  # eager: the layers before the bottleneck run once when cut; with
        # the skip, the first step fails with the copies at the layer and the model runs
        # on the copies of the inputs from then on
        assert count.rows == ([2] if not skip else [2, 2] + [20] * 4)
    iba.engine.split_model = False
    expected = iba.analyze(x, target=[1, 3], seed=0, optimization_steps=4, compile=compiled)
    np.testing.assert_allclose(maps, expected, **SAME)
    assert nodes(iba.model) == before


def test_an_iba_layer_in_a_subclassed_model_runs_the_whole_model():
    model = Subclassed()
    x = images(2)
    model(x)
    model.iba.estimate(model, images(32, seed=9), progbar=False)
    model.count.rows.clear()
    maps = model.iba.analyze(x, target=[0, 2], model=model, seed=0, optimization_steps=3, compile=False)
    assert model.count.rows == [2] * 4  # the clean pass and every step: no cut
    model.iba.engine.split_model = False
    expected = model.iba.analyze(x, target=[0, 2], model=model, seed=0, optimization_steps=3, compile=False)
    np.testing.assert_allclose(maps, expected, **SAME)
