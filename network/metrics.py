"""Registration metrics in the graph (SPEC section 4). Per sample; NaN marks 'undefined'.

- Dice 2|A n B| / (|A| + |B|) and Jaccard |A n B| / |A u B| between the fixed segmentation and
  the moving one warped by the final flow: each class as a 0/255 mask, warped trilinearly,
  foreground where > 128. A class absent from both gives NaN (averaged with nanmean).
- Landmark distance: fixed landmark p moves to p + flow(p) (trilinear sample); Euclidean
  distance in voxels to the matching moving landmark; NaN where either row is missing (< 0).
- Jacobian: det of grad(p + flow(p)) by forward differences; its std and the fraction <= 0.
"""
import numpy as np

from .spatial_transformer import sample_points, warp
from .tfv1 import tf


def class_masks(seg, class_values=None):
    """[B,X,Y,Z,1] segmentation -> [B,X,Y,Z,K] float masks in 0/255.

    Without class values the segmentation is a 0/255 mask (K = 1, foreground > 128);
    with them, channel k is 255 where seg equals class_values[k].
    """
    if class_values is None:
        return tf.cast(seg > 128, tf.float32) * 255.0
    values = tf.constant(np.asarray(class_values, np.float32))
    return tf.cast(tf.abs(seg - values) < 0.5, tf.float32) * 255.0


def overlap(fixed_masks, warped_masks):
    """Dice and Jaccard [B,K] of masks [B,X,Y,Z,K] in 0..255 thresholded at 128."""
    a = tf.cast(fixed_masks > 128, tf.float32)
    b = tf.cast(warped_masks > 128, tf.float32)
    inter = tf.reduce_sum(a * b, axis=[1, 2, 3])
    total = tf.reduce_sum(a, axis=[1, 2, 3]) + tf.reduce_sum(b, axis=[1, 2, 3])
    union = total - inter
    nan = tf.fill(tf.shape(total), np.nan)
    dice = tf.where(total > 0, 2.0 * inter / tf.maximum(total, 1.0), nan)
    jacc = tf.where(union > 0, inter / tf.maximum(union, 1.0), nan)
    return dice, jacc


def segmentation_overlap(seg1, seg2, flow, class_values=None):
    """Dice, Jaccard [B,K] of fixed seg1 vs moving seg2 warped by flow (all [B,X,Y,Z,·])."""
    return overlap(class_masks(seg1, class_values), warp(class_masks(seg2, class_values), flow))


def landmark_distances(point1, point2, flow):
    """[B,K] distances (voxels) between p + flow(p), p in point1 (fixed), and point2; NaN if missing."""
    valid = tf.reduce_all(point1 >= 0, axis=-1) & tf.reduce_all(point2 >= 0, axis=-1)
    p = tf.maximum(point1, 0.0)
    moved = p + sample_points(flow, p)
    dist = tf.sqrt(tf.reduce_sum(tf.square(moved - point2), axis=-1))
    return tf.where(valid, dist, tf.fill(tf.shape(dist), np.nan))


def jacobian_determinant(flow):
    """[B, X-1, Y-1, Z-1] determinant of the Jacobian of p + flow(p) (forward differences)."""
    base = flow[:, :-1, :-1, :-1]
    cols = [flow[:, 1:, :-1, :-1] - base + tf.constant([1.0, 0, 0]),
            flow[:, :-1, 1:, :-1] - base + tf.constant([0, 1.0, 0]),
            flow[:, :-1, :-1, 1:] - base + tf.constant([0, 0, 1.0])]
    return tf.linalg.det(tf.stack(cols, axis=-1))


def jacobian_stats(flow):
    """Per sample: (std of the Jacobian determinant, fraction of voxels with det <= 0), each [B]."""
    det = jacobian_determinant(flow)
    _, var = tf.nn.moments(det, axes=[1, 2, 3])
    folding = tf.reduce_mean(tf.cast(det <= 0, tf.float32), axis=[1, 2, 3])
    return tf.sqrt(var), folding
