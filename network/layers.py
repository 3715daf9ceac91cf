"""3D layers on plain ``tf.compat.v1`` variables (no tflearn, no Keras).

All tensors are ``[batch, X, Y, Z, channels]``. Weights default to a truncated normal of stddev
0.02 (tflearn's default for dense layers; the original code's convolutions use tflearn's
'uniform_scaling', U(+-sqrt(3 / fan_in)), instead); biases start at 0.
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
    grid_mode=True, mode='nearest') per channel). Built from two 2-D bilinear resizes (half-pixel
    centres sample exactly there): over (Y, Z), then over X with the Y-Z plane as one image
    axis, which a resize to the same width leaves unchanged (two resize kernels, cheaper than
    gathers and an interleaving stack per axis).
    """
    _, X, Y, Z, C = x.shape.as_list()
    planes = tf.image.resize_bilinear(tf.reshape(x, [-1, Y, Z, C]), [2 * Y, 2 * Z], half_pixel_centers=True)
    volume = tf.image.resize_bilinear(tf.reshape(planes, [-1, X, 4 * Y * Z, C]), [2 * X, 4 * Y * Z],
                                      half_pixel_centers=True)
    return tf.reshape(volume, [-1, 2 * X, 2 * Y, 2 * Z, C])


def stack_channels(a, b):
    """tf.concat([a, b], axis=4) of two [B, X, Y, Z, C] tensors of one shape (static but for
    B), built as a stack and a transpose: ConcatV2 copies each voxel's few channels separately."""
    _, X, Y, Z, C = a.shape.as_list()
    return tf.reshape(tf.transpose(tf.stack([a, b]), [1, 2, 3, 4, 0, 5]), [-1, X, Y, Z, 2 * C])


def transform_vectors(M, v):
    """M v at every voxel: M [B, 3, 3], v [B, X, Y, Z, 3] -> [B, X, Y, Z, 3], as one batched
    matmul of v viewed as [B, X Y Z, 3] (cheaper on CPU than the equivalent einsum)."""
    batch = tf.shape(v)[0]
    return tf.reshape(tf.matmul(tf.reshape(v, [batch, -1, 3]), M, transpose_b=True), tf.shape(v))
