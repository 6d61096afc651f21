"""TensorFlow/Keras backend speed: ``analyze`` against the bare work it needs, and against
the PyTorch backend on the same model with the same weights.

The bare work is what any per-sample bottleneck must do: ``optimization_steps`` forward
passes of the model on ``batch_size`` copies of the input with a multiplicative mask on
the feature map, and a backward pass to that mask only (a ``tf.GradientTape`` watching
the mask, never the weights), run the way ``analyze`` runs the model (eagerly).  IBA's
own cost (noise, mask smoothing, capacity, Adam, the layer hook and its layout
transposes) is the difference.  Timings alternate and the median of several repeats is
reported.  The architecture is ``benchmarks/bench_torch.py``'s: 3x64x64 input, the
bottleneck on a 128x16x16 feature map, reference defaults (10 steps, batch 10).

Run: ``python benchmarks/bench_tf.py [--repeats 7] [--no-torch]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from iba_core import FewSamplesWarning
from iba_tf import IBACopy

warnings.simplefilter("ignore", FewSamplesWarning)

# (out_channels, stride) of the four 3x3 convolutions; the bottleneck follows the third.
CONVS = [(32, 1), (64, 2), (128, 2), (128, 2)]
LAYER = "relu3"


def make_keras_model(seed: int = 0) -> keras.Model:
    """3x64x64 (channels-last) -> ... -> 'relu3' 128x16x16 -> ... -> 10 logits.

    Explicit ``ZeroPadding2D(1)`` + ``"valid"`` convolutions pad exactly like PyTorch's
    ``padding=1`` (Keras' ``"same"`` pads asymmetrically for stride 2).
    """
    rng = np.random.default_rng(seed)
    inputs = x = keras.Input((64, 64, 3))
    c_in = 3
    for i, (c_out, stride) in enumerate(CONVS, start=1):
        x = keras.layers.ZeroPadding2D(1, name=f"pad{i}")(x)
        conv = keras.layers.Conv2D(c_out, 3, strides=stride, name=f"conv{i}")
        x = conv(x)
        bound = 1 / np.sqrt(9 * c_in)
        conv.set_weights([rng.uniform(-bound, bound, (3, 3, c_in, c_out)).astype("float32"),
                          rng.uniform(-bound, bound, c_out).astype("float32")])
        x = keras.layers.ReLU(name=f"relu{i}")(x)
        c_in = c_out
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    fc = keras.layers.Dense(10, name="fc")
    outputs = fc(x)
    bound = 1 / np.sqrt(c_in)
    fc.set_weights([rng.uniform(-bound, bound, (c_in, 10)).astype("float32"),
                    rng.uniform(-bound, bound, 10).astype("float32")])
    return keras.Model(inputs, outputs, name="bench")


def torch_twin(model: keras.Model):
    """The same network in PyTorch (channels-first) with the Keras model's weights."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    c_in = 3
    for i, (c_out, stride) in enumerate(CONVS, start=1):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        kernel, bias = model.get_layer(f"conv{i}").get_weights()
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(bias))
        layers += [conv, nn.ReLU()]
        c_in = c_out
    fc = nn.Linear(c_in, 10)
    kernel, bias = model.get_layer("fc").get_weights()
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(kernel.T.copy()))
        fc.bias.copy_(torch.from_numpy(bias))
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    return net, net[5]  # the third ReLU: 128x16x16


def bare_work(model: keras.Model, x: tf.Tensor, target: int, steps: int = 10,
              batch_size: int = 10) -> None:
    """Forward + backward to a mask on the feature map, ``steps`` times, batch ``batch_size``."""
    layer = model.get_layer(LAYER)
    xb = tf.repeat(x, batch_size, axis=0)
    onehot = tf.one_hot([target] * batch_size, 10)
    mask = tf.ones((1, *layer.output.shape[1:]))
    original = layer.call
    layer.call = lambda *a, **k: original(*a, **k) * mask_now[0]
    mask_now = [mask]
    try:
        for _ in range(steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(mask)
                mask_now[0] = mask
                logits = model(xb, training=False)
                loss = tf.reduce_mean(
                    tf.nn.softmax_cross_entropy_with_logits(onehot, logits))
            grad = tape.gradient(loss, mask)
            mask = mask - 0.0 * grad
    finally:
        del layer.call


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args()

    model = make_keras_model()
    iba = IBACopy(model, LAYER)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 64, 64, 3)).astype("float32")
    iba.estimate(data, batch_size=50)
    x1 = tf.constant(rng.standard_normal((1, 64, 64, 3)).astype("float32"))

    bare_work(model, x1, 3)  # warm-up
    iba.analyze(x1, target=3)

    bare, ana = [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_work(model, x1, 3)))
        ana.append(timed(lambda: iba.analyze(x1, target=3)))
    t_bare, t_ana = statistics.median(bare), statistics.median(ana)

    t_torch = None
    if not args.no_torch:
        import torch

        from iba_torch import IBA

        net, layer = torch_twin(model)
        iba_t = IBA(layer)
        iba_t.estimate(net, [torch.from_numpy(data[i:i + 50].transpose(0, 3, 1, 2).copy())
                             for i in range(0, 200, 50)])
        xt = torch.from_numpy(x1.numpy().transpose(0, 3, 1, 2).copy())
        iba_t.analyze(xt, target=3, model=net)  # warm-up
        tor = [timed(lambda: iba_t.analyze(xt, target=3, model=net))
               for _ in range(args.repeats)]
        t_torch = statistics.median(tor)

    print(f"tensorflow {tf.__version__}  keras {keras.__version__}  "
          f"devices {[d.device_type for d in tf.config.list_logical_devices()]}")
    print("model: 3x64x64 input, bottleneck on 128x16x16, defaults (10 steps, batch 10)")
    print(f"{'measurement':<46}{'seconds':>10}{'ratio':>10}")
    print(f"{'bare forward+backward work (1 image, TF)':<46}{t_bare:>10.4f}{'':>10}")
    print(f"{'IBA analyze (1 image, TF)':<46}{t_ana:>10.4f}{t_ana / t_bare:>10.3f}"
          "  (target <= 1.20)")
    if t_torch is not None:
        import torch

        print(f"{'IBA analyze (1 image, PyTorch, same weights)':<46}{t_torch:>10.4f}"
              f"{t_ana / t_torch:>10.3f}  (TF / PyTorch; torch threads "
              f"{torch.get_num_threads()})")


if __name__ == "__main__":
    main()
