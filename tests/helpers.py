"""Small utilities shared by the tests: graph sessions and NumPy references."""
import numpy as np
import scipy.ndimage as ndi

from network.tfv1 import tf


def run_graph(build, feeds=None):
    """Build ``build(**placeholders)`` in a fresh graph and run it once.

    ``feeds``: {name: array}; each becomes a float32 placeholder of that shape passed to build.
    Returns the evaluated result of build (any nested structure of tensors).
    """
    feeds = feeds or {}
    with tf.Graph().as_default():
        ph = {k: tf.placeholder(tf.float32, np.shape(v), name=k) for k, v in feeds.items()}
        out = build(**ph)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run(out, {ph[k]: v for k, v in feeds.items()})


def warp_reference(image, flow, padding='border'):
    """float64 SciPy warp: image [B,X,Y,Z,C], flow [B,X,Y,Z,3] -> image(p + flow(p))."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:4]], indexing='ij'), -1)
    out = np.zeros(image.shape, np.float64)
    kw = {'mode': 'nearest'} if padding == 'border' else {'mode': 'grid-constant', 'cval': 0.0}
    for b in range(image.shape[0]):
        coords = np.moveaxis(grid + flow[b], -1, 0)
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndi.map_coordinates(image[b, ..., c].astype(np.float64), coords, order=1, **kw)
    return out


def edge_positions(size):
    """Sample positions along an axis of ``size`` voxels: beyond, on and just inside both
    faces, and one grid point and one fraction inside (all exact in float32)."""
    last = size - 1
    return np.array([-3.5, -1, -0.25, 0, 0.25, last / 2, last - 0.25, last, last + 0.25,
                     last + 1, last + 2.75], np.float32)
