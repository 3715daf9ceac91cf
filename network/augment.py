"""Training-time augmentation: a random free-form deformation by cubic B-splines (SPEC section 4).

A 5x5x5 grid of control displacements, each drawn as 0.4 * sign(u) |u|^3, u ~ U(-1, 1), times
(image size // 4) along its axis, is interpolated with the cubic B-spline kernel to a dense
flow [B, X, Y, Z, 3] in voxels. Control points are spaced evenly over the volume, the first and
last on its faces.
"""
import numpy as np

from .spatial_transformer import sample_points, warp, warp_nearest
from .tfv1 import tf


def cubic_bspline(t):
    """Cubic B-spline kernel B3(t), support |t| < 2, float64 NumPy."""
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def bspline_basis(size, control=5):
    """[size, control] float32 matrix of B3((x - t_i) / h), t_i = i h, h = (size - 1) / (control - 1)."""
    h = (size - 1) / (control - 1)
    x = np.arange(size)[:, None]
    t = np.arange(control)[None, :] * h
    return cubic_bspline((x - t) / h).astype(np.float32)


def random_ffd(batch, sizes, control=5, amplitude=0.4, power=3, seed=None):
    """Random dense B-spline flow [batch, X, Y, Z, 3] (voxels) for image sizes (X, Y, Z)."""
    u = tf.random_uniform(tf.stack([batch, control, control, control, 3]), -1.0, 1.0, seed=seed)
    scale = tf.constant([amplitude * (n // 4) for n in sizes], tf.float32)
    coeffs = tf.sign(u) * tf.abs(u) ** power * scale
    bx, by, bz = [tf.constant(bspline_basis(n, control)) for n in sizes]
    return tf.einsum('xi,yj,zk,bijkc->bxyzc', bx, by, bz, coeffs)


def invert_points(points, flow, iterations=5):
    """Positions p with p + flow(p) = q for moving landmarks q [B,K,3], by fixed-point iteration.

    Rows with a negative coordinate (missing landmarks) stay as they are.
    """
    p = points
    for _ in range(iterations):
        p = points - sample_points(flow, p)
    missing = tf.reduce_any(points < 0, axis=-1, keepdims=True)
    return tf.where(tf.tile(missing, [1, 1, 3]), points, p)


def augment_moving(moving, seg, points, seed=None):
    """Deform the moving image (trilinear), its segmentation (nearest) and its landmarks alike.

    moving, seg: [B,X,Y,Z,1]; points [B,K,3]. Returns the three deformed tensors.
    """
    flow = random_ffd(tf.shape(moving)[0], moving.shape.as_list()[1:4], seed=seed)
    return warp(moving, flow), warp_nearest(seg, flow), invert_points(points, flow)
