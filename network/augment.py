"""Training-time augmentation of the moving image: a random free-form deformation by cubic
B-splines (SPEC section 4), optionally plus a random affine map (beyond the paper).

B-splines: a 5x5x5 grid of control displacements, each drawn as 0.4 * sign(u) |u|^3,
u ~ U(-1, 1), times (image size // 4) along its axis, is interpolated with the cubic B-spline
kernel to a dense flow [B, X, Y, Z, 3] in voxels. Control points are spaced evenly over the
volume, the first and last on its faces.

Affine (`AffineRange`): rotations about the three axes, per-axis scales and a shift, each drawn
uniformly per sample, as the flow (A - I)(p - c) + t about the volume centre c. It stands for
what differs between a user's scans and the training pairs beyond anatomy: head tilt, size,
position within the field of view. Its flow is added to the B-spline flow.

Contrast (`random_gamma`, beyond the paper): an image in 0..1 raised to a random power gamma,
log gamma uniform in (-log G, log G), drawn per sample and image, for the fixed and the moving
image independently: the intensities of another sequence or scanner (gamma > 1 darkens the mid
intensities, grey matter against white in a T1 brain), with black and white kept.
"""
import collections

import numpy as np

from .spatial_transformer import sample_points, warp, warp_nearest
from .subnets import affine_flow
from .tfv1 import tf

AffineRange = collections.namedtuple('AffineRange', 'degrees scale shift')
AffineRange.__doc__ = """Ranges of the random affine map: rotation angles in U(-degrees, degrees)
about each axis, scale factors exp(U(-scale, scale)) per axis, shifts in U(-shift, shift) voxels."""


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


def uniform(shape, seed=None, key=None, draw=0):
    """U(-1, 1) of a shape tensor: stateless from ``key`` (int64 [2]) and ``draw`` (so that the
    same key gives the same numbers in any session, e.g. after a resume), else TensorFlow's
    stateful draw with the op seed ``seed``."""
    if key is None:
        return tf.random_uniform(shape, -1.0, 1.0, seed=seed)
    return tf.random.stateless_uniform(shape, key + tf.constant([0, draw], tf.int64), minval=-1.0, maxval=1.0)


def random_ffd(batch, sizes, control=5, amplitude=0.4, power=3, seed=None, key=None):
    """Random dense B-spline flow [batch, X, Y, Z, 3] (voxels) for image sizes (X, Y, Z); key: see `uniform`."""
    u = uniform(tf.stack([batch, control, control, control, 3]), seed, key)
    scale = tf.constant([amplitude * (n // 4) for n in sizes], tf.float32)
    coeffs = tf.sign(u) * tf.abs(u) ** power * scale
    bx, by, bz = [tf.constant(bspline_basis(n, control)) for n in sizes]
    return tf.einsum('xi,yj,zk,bijkc->bxyzc', bx, by, bz, coeffs)


def rotation_matrices(angles):
    """[B, 3] angles (radians) about array axes 0, 1, 2 -> [B, 3, 3] rotations R0 R1 R2."""
    cos, sin = tf.cos(angles), tf.sin(angles)
    zero, one = tf.zeros_like(angles[:, 0]), tf.ones_like(angles[:, 0])

    def rotation(axis):
        a, b = [k for k in range(3) if k != axis]
        rows = [[one if i == j else zero for j in range(3)] for i in range(3)]
        rows[a][a], rows[a][b], rows[b][a], rows[b][b] = cos[:, axis], -sin[:, axis], sin[:, axis], cos[:, axis]
        return tf.stack([tf.stack(row, -1) for row in rows], -2)

    return tf.matmul(tf.matmul(rotation(0), rotation(1)), rotation(2))


def random_affine_flow(batch, sizes, ranges, seed=None, key=None):
    """Random affine flow [batch, X, Y, Z, 3] (voxels): (R S - I)(p - c) + t with R of
    `rotation_matrices`, S = diag(scales), t the shift; ranges an `AffineRange`; key: see `uniform`."""
    shape = tf.stack([batch, 3])
    angles = uniform(shape, seed, key, 1) * np.deg2rad(ranges.degrees)
    scales = tf.exp(uniform(shape, None if seed is None else seed + 1, key, 2) * ranges.scale)
    shift = uniform(shape, None if seed is None else seed + 2, key, 3) * ranges.shift
    matrix = rotation_matrices(angles) * scales[:, None, :] - tf.eye(3)[None]
    return affine_flow(matrix, shift, sizes)


def random_gamma(images, max_gamma, seed=None, key=None, draw=4):
    """images [B, X, Y, Z, C] in 0..1 -> images ** gamma, one gamma per sample, log gamma ~
    U(-log max_gamma, log max_gamma) (max_gamma >= 1); key, draw: see `uniform`."""
    gamma = tf.exp(uniform(tf.shape(images)[:1], seed, key, draw) * float(np.log(max_gamma)))
    return tf.pow(tf.maximum(images, 0.0), gamma[:, None, None, None, None])


def invert_points(points, flow, iterations=5):
    """Positions p with p + flow(p) = q for moving landmarks q [B,K,3], by fixed-point iteration.

    Rows with a negative coordinate (missing landmarks) stay as they are.
    """
    p = points
    for _ in range(iterations):
        p = points - sample_points(flow, p)
    missing = tf.reduce_any(points < 0, axis=-1, keepdims=True)
    return tf.where(tf.tile(missing, [1, 1, 3]), points, p)


def augment_moving(moving, seg, points, affine=None, seed=None, key=None):
    """Deform the moving image (trilinear), its segmentation (nearest) and its landmarks alike.

    moving, seg: [B,X,Y,Z,1]; points [B,K,3]; affine: an `AffineRange` to add a random affine
    map to the B-spline deformation, or None; key: int64 [2] for stateless draws (see `uniform`).
    Returns the three deformed tensors.
    """
    batch, sizes = tf.shape(moving)[0], moving.shape.as_list()[1:4]
    flow = random_ffd(batch, sizes, seed=seed, key=key)
    if affine is not None:
        flow += random_affine_flow(batch, sizes, affine, seed=seed, key=key)
    return warp(moving, flow), warp_nearest(seg, flow), invert_points(points, flow)
