"""IBALayer: a bottleneck layer inside your own Keras model, trained with it as usual.

The layer is the identity while the model trains and predicts; afterwards it estimates
its input's statistics and explains inputs.  Trains a small CNN on cluttered digits:
python examples/keras_iba_layer.py [--epochs E] [--n-train N]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

from iba_core.apps.datasets import cluttered_digits
from iba_tf import IBALayer


def build(iba: IBALayer) -> keras.Model:
    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)  # 16x16x32
    x = iba(x)  # the bottleneck goes here
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))  # logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=6000)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    train = cluttered_digits(args.n_train, split="train", seed=0)
    test = cluttered_digits(200, split="test", seed=1)
    x_train = np.moveaxis(train.images, 1, -1)  # channels-last for Keras
    x_test = np.moveaxis(test.images, 1, -1)

    iba = IBALayer(name="iba")
    model = build(iba)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, train.labels, epochs=args.epochs, batch_size=64, verbose=0)
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == test.labels))
    print(f"test accuracy on {len(test.labels)} images: {accuracy:.2f}")

    iba.estimate(model, x_train)  # mean/std of the layer's input
    x, labels = x_test[:4], test.labels[:4]
    maps = iba.analyze(x, model=model, target=labels, seed=0)  # (4, 64, 64)
    with iba.restrict_flow():  # the model with the last masks
        restricted = model(x).numpy().argmax(1)
    for label, pred, smap in zip(labels, restricted, maps, strict=True):
        print(f"digit {label}: {smap.sum():7.1f} bits; restricted model predicts {pred}")


if __name__ == "__main__":
    main()
