"""3D layers on plain ``tf.compat.v1`` variables (no tflearn, no Keras).

All tensors are ``[batch, X, Y, Z, channels]``. Weights default to the original code's
tflearn initialisation: truncated normal, stddev 0.02; biases start at 0.
"""
from .tfv1 import tf

DEFAULT_INIT_STDDEV = 0.02


def leaky_relu(x, alpha=0.1):
    return tf.nn.leaky_relu(x, alpha=alpha)


def _activate(x, activation):
    if activation is None:
        return x
    if activation == 'relu':
        return tf.nn.relu(x)
    if activation == 'leaky_relu':
        return leaky_relu(x)
    raise ValueError('unknown activation {!r}'.format(activation))


def _as_triple(v):
    return list(v) if isinstance(v, (list, tuple)) else [v] * 3


def conv3d(name, x, channels, kernel, stride=1, activation=None, bias=True,
           padding='SAME', init_stddev=DEFAULT_INIT_STDDEV):
    """3D convolution. ``kernel``: int or [kx, ky, kz]; output spatial size ceil(n / stride) for SAME."""
    k = _as_triple(kernel)
    with tf.variable_scope(name):
        w = tf.get_variable('W', k + [int(x.shape[-1]), channels],
                            initializer=tf.truncated_normal_initializer(stddev=init_stddev))
        y = tf.nn.conv3d(x, w, [1, stride, stride, stride, 1], padding)
        if bias:
            y = tf.nn.bias_add(y, tf.get_variable("b", [channels], initializer=tf.zeros_initializer()))
    return _activate(y, activation)


def conv3d_transpose(name, x, channels, kernel, stride, activation=None, bias=False,
                     init_stddev=DEFAULT_INIT_STDDEV):
    """3D transposed convolution (SAME padding): spatial size multiplied by ``stride``."""
    k = _as_triple(kernel)
    size = [int(d) * stride for d in x.shape[1:4]]
    with tf.variable_scope(name):
        w = tf.get_variable('W', k + [channels, int(x.shape[-1])],
                            initializer=tf.truncated_normal_initializer(stddev=init_stddev))
        out_shape = tf.stack([tf.shape(x)[0]] + size + [channels])
        y = tf.nn.conv3d_transpose(x, w, out_shape, [1, stride, stride, stride, 1], 'SAME')
        y = tf.reshape(y, [-1] + size + [channels])
        if bias:
            y = tf.nn.bias_add(y, tf.get_variable("b", [channels], initializer=tf.zeros_initializer()))
    return _activate(y, activation)


def upsample_nearest(x, factor=2):
    """Nearest-neighbour upsampling of the three spatial axes by an integer factor."""
    for axis in (1, 2, 3):
        shape = x.shape.as_list()
        tiles = [1] * (len(shape) + 1)
        tiles[axis + 1] = factor
        x = tf.tile(tf.expand_dims(x, axis + 1), tiles)
        shape[axis] *= factor
        x = tf.reshape(x, [-1] + shape[1:])
    return x


def upsample_linear2(x):
    """Linear upsampling by 2 of the three spatial axes, voxel centres aligned.

    x [B, X, Y, Z, C] -> [B, 2X, 2Y, 2Z, C]. Output voxel j of an axis samples the input at
    (j + 0.5) / 2 - 0.5, i.e. out[2i] = x[i-1] / 4 + 3 x[i] / 4 and out[2i+1] = 3 x[i] / 4 + x[i+1] / 4,
    with the edge voxel repeated outside the volume (scipy.ndimage.zoom(x, 2, order=1,
    grid_mode=True, mode='nearest') per channel).
    """
    for axis in (1, 2, 3):
        shape = x.shape.as_list()
        n = shape[axis]
        padded = tf.concat([tf.gather(x, [0], axis=axis), x, tf.gather(x, [n - 1], axis=axis)], axis=axis)
        before = tf.gather(padded, tf.range(0, n), axis=axis)
        after = tf.gather(padded, tf.range(2, n + 2), axis=axis)
        even, odd = 0.25 * before + 0.75 * x, 0.75 * x + 0.25 * after
        x = tf.stack([even, odd], axis=axis + 1)
        shape[axis] = 2 * n
        x = tf.reshape(x, [-1] + shape[1:])
    return x
