"""The one place TensorFlow is imported: graph-mode ``tf.compat.v1`` with oneDNN on.

oneDNN is off by default on these AMD CPUs; without it TensorFlow's reference 3-D
convolution gradient (Conv3DBackpropFilterV2) dominates a training step. The environment
defaults are applied before TensorFlow's first import unless the user set them already. C++
log lines are silenced (TF_CPP_MIN_LOG_LEVEL=3: Grappler prints a harmless 'remapper failed'
error for fused LeakyReLU gradients); set TF_CPP_MIN_LOG_LEVEL=0 to see them.
"""
import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import tensorflow.compat.v1 as tf  # noqa: E402

tf.logging.set_verbosity(tf.logging.ERROR)
tf.disable_v2_behavior()

__all__ = ['tf']
