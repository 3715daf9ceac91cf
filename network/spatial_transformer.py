"""Trilinear warping: the one function every cascade, metric and tool calls.

``warp(image, flow)(p) = image(p + flow(p))`` with ``image`` ``[B, X, Y, Z, C]`` (any C),
``flow`` ``[B, X, Y, Z, 3]`` in voxels (channel k moves along array axis k+1).
``padding='border'`` clamps sample positions into the volume (scipy ``mode='nearest'``);
``padding='zeros'`` treats everything outside the volume as 0.

Two implementations sit behind ``warp``: the pure-TF gather warp below, and the compiled
op of ``network.ops`` (when built). ``set_warp_impl`` / env ``LDR_WARP_IMPL`` choose:
'auto' (the op when it can be loaded, else pure TF), 'tf', or 'op' (error if unavailable).
The compiled op has CPU kernels only: a warp built under a GPU device scope (``-g 0,1``
towers) uses the pure-TF warp there, whatever the choice, so that it runs on the GPU.
"""
import os

from errors import ConfigError

from .tfv1 import tf

PADDINGS = ('border', 'zeros')
IMPLS = ('auto', 'tf', 'op')

_impl = os.environ.get('LDR_WARP_IMPL', 'auto')


def set_warp_impl(name):
    """Select the warp implementation for graphs built from now on: 'auto', 'tf' or 'op'."""
    global _impl
    if name not in IMPLS:
        raise ConfigError('unknown warp implementation {!r} (choose from {})'.format(name, ', '.join(IMPLS)))
    if name == 'op':
        from . import ops
        ops.load_warp_op(required=True)
    _impl = name


def warp_impl():
    """The implementation ``warp`` uses now: 'tf' or 'op'."""
    if _impl == 'tf':
        return 'tf'
    from . import ops
    return 'op' if ops.load_warp_op(required=_impl == 'op') is not None else 'tf'


def warp(image, flow, padding='border'):
    """Warp ``image`` [B,X,Y,Z,C] by ``flow`` [B,X,Y,Z,3] (voxels), trilinear; see module doc."""
    if padding not in PADDINGS:
        raise ConfigError('unknown warp padding {!r} (choose from {})'.format(padding, ', '.join(PADDINGS)))
    if warp_impl() == 'op' and not on_gpu():
        from . import ops
        return ops.warp_op(image, flow, padding)
    return warp_tf(image, flow, padding)


def on_gpu():
    """Whether ops built here now are placed on a GPU (the device scope of the default graph)."""
    return 'GPU' in tf.no_op(name='device_probe').device.upper()


def _corner_weights(coords, size, padding):
    """Per axis: lower index, upper index (both clamped) and weights of the two corners.

    coords: [B, X, Y, Z] float sample positions along one axis; size: that axis' length.
    With border padding the position is clamped first; with zeros padding a corner outside
    the volume gets weight 0.
    """
    if padding == 'border':
        coords = tf.clip_by_value(coords, 0.0, float(size - 1))
    lo = tf.floor(coords)
    w_hi = coords - lo
    w_lo = 1.0 - w_hi
    lo_i = tf.cast(lo, tf.int32)
    hi_i = lo_i + 1
    if padding == 'zeros':
        w_lo = w_lo * tf.cast((lo_i >= 0) & (lo_i <= size - 1), tf.float32)
        w_hi = w_hi * tf.cast((hi_i >= 0) & (hi_i <= size - 1), tf.float32)
    lo_i = tf.clip_by_value(lo_i, 0, size - 1)
    hi_i = tf.clip_by_value(hi_i, 0, size - 1)
    return (lo_i, w_lo), (hi_i, w_hi)


def sample_tf(image, coords, padding='border'):
    """Trilinear samples of ``image`` [B,X,Y,Z,C] at ``coords`` [B, ..., 3] (voxel positions).

    Returns [B, ..., C]. The pure-TF reference: gathers the 8 corners from a flat image.
    """
    return sample_axes(image, tf.unstack(coords, axis=-1), padding)


def sample_axes(image, coords, padding='border'):
    """``sample_tf`` with the positions given per axis: ``coords`` three tensors [B, ...] of one
    shape, the positions along array axes 1, 2 and 3. Returns [B, ..., C]."""
    shape = image.shape.as_list()
    sizes = shape[1:4]
    channels = shape[4]
    batch = tf.shape(image)[0]
    out_shape = tf.concat([tf.shape(coords[0]), [channels]], 0)
    flat = tf.reshape(image, [-1, channels])
    base = tf.reshape(tf.range(batch) * (sizes[0] * sizes[1] * sizes[2]), [-1, 1])
    corners = [_corner_weights(tf.reshape(coords[k], [batch, -1]), sizes[k], padding) for k in range(3)]
    strides = [sizes[1] * sizes[2], sizes[2], 1]
    out = 0.0
    for cx in corners[0]:
        for cy in corners[1]:
            for cz in corners[2]:
                index = base + cx[0] * strides[0] + cy[0] * strides[1] + cz[0]
                weight = cx[1] * cy[1] * cz[1]
                out = out + tf.gather(flat, index) * weight[..., None]
    return tf.reshape(out, out_shape)


def identity_grid(sizes):
    """[X, Y, Z, 3] float32 grid of voxel positions."""
    axes = [tf.range(n, dtype=tf.float32) for n in sizes]
    return tf.stack(tf.meshgrid(*axes, indexing='ij'), axis=-1)


def warp_tf(image, flow, padding='border'):
    """Pure-TF trilinear warp; same contract as ``warp``. The positions are taken per axis, a
    range along that axis plus the flow's component, so that no grid of positions is a
    constant of the graph (freezing or converting it would fold one of 12 bytes a voxel)."""
    coords = []
    for k, (size, component) in enumerate(zip(image.shape.as_list()[1:4], tf.unstack(flow, axis=-1))):
        along = [1, 1, 1, 1]
        along[k + 1] = size
        coords.append(tf.reshape(tf.range(size, dtype=tf.float32), along) + component)
    return sample_axes(image, coords, padding)


def warp_nearest(image, flow):
    """Nearest-neighbour warp (for label maps): samples at the rounded position p + flow(p)."""
    grid = identity_grid(image.shape.as_list()[1:4])[None]
    return warp(image, tf.round(grid + flow) - grid)


def sample_points(volume, points):
    """Trilinear samples of ``volume`` [B,X,Y,Z,C] at ``points`` [B,K,3] (voxels) -> [B,K,C]; border clamped."""
    return sample_tf(volume, points)
