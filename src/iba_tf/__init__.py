"""iba_tf: the TensorFlow 2 / Keras 3 backend of iba (in progress)."""
