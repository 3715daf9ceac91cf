"""The one place TensorFlow is imported: graph-mode ``tf.compat.v1`` with oneDNN on.

oneDNN is off by default on these AMD CPUs; without it TensorFlow's reference 3-D
convolution gradient (Conv3DBackpropFilterV2) dominates a training step. The environment
defaults are applied before TensorFlow's first import unless the user set them already. C++
log lines are silenced (TF_CPP_MIN_LOG_LEVEL=3: Grappler prints a harmless 'remapper failed'
error for fused LeakyReLU gradients); set TF_CPP_MIN_LOG_LEVEL=0 to see them.

TensorFlow >= 2.16 imports Keras' optimizers eagerly while it is imported itself (to register
them for Keras SavedModels), a large part of the start-up of every train.py, eval.py and
TensorFlow predict.py process (`python -m bench.cold_start` times it). This code uses no Keras, so that one import is made to fail
(TensorFlow catches the ImportError and goes on); Keras stays importable afterwards, lazily, for
whatever asks for it (``tf.keras``, tf2onnx).
"""
import os
import sys

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_EAGER_KERAS = 'keras.src.optimizers'
_skip_keras = _EAGER_KERAS not in sys.modules
if _skip_keras:
    sys.modules[_EAGER_KERAS] = None        # `import keras.src.optimizers` now raises ImportError
try:
    import tensorflow.compat.v1 as tf  # noqa: E402
finally:
    if _skip_keras and sys.modules.get(_EAGER_KERAS, 0) is None:
        del sys.modules[_EAGER_KERAS]

tf.logging.set_verbosity(tf.logging.ERROR)
tf.disable_v2_behavior()

__all__ = ['tf']
