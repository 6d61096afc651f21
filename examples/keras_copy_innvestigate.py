"""Per-Sample Bottleneck with Keras: the classifier wrapper and a saved estimate.

Uses the Keras demo network and the cluttered-digits data that ship with iba:
python examples/keras_copy_innvestigate.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from iba_core.apps.datasets import cluttered_digits
from iba_tf import IBACopyInnvestigate
from iba_tf._demo import demo_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("iba-examples-out"))
    parser.add_argument("--n-estimate", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = demo_cnn()  # Functional, returns logits
    train = cluttered_digits(args.n_estimate, split="train", seed=0)
    test = cluttered_digits(4, split="test", seed=1)
    to_nhwc = lambda a: np.moveaxis(a, 1, -1)  # the data set is channels-first

    iba = IBACopyInnvestigate(model, neuron_selection_mode="index", feature_name="features.relu3")
    iba.fit(to_nhwc(train.images))
    estimate = args.out / "keras_relu3_estimate.npz"
    iba.save_npz(estimate)

    # A second wrapper reuses the saved estimate; "max_activation" explains the prediction.
    again = IBACopyInnvestigate(
        model, neuron_selection_mode="max_activation", feature_name="features.relu3"
    ).load_npz(estimate)
    maps = again.analyze(to_nhwc(test.images), seed=0)  # (4, 64, 64), bits/pixel
    predicted = again.predict(to_nhwc(test.images)).argmax(axis=1)
    for label, pred, smap in zip(test.labels, predicted, maps, strict=True):
        print(f"digit {label} (predicted {pred}): {smap.sum():8.1f} bits")
    np.savez(args.out / "keras_maps.npz", saliency_maps=maps)


if __name__ == "__main__":
    main()
