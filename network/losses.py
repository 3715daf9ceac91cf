"""Unsupervised registration losses (SPEC sections 3-4). Every loss is summed over the batch.

Images are [B, X, Y, Z, C] in 0..1; flows [B, X, Y, Z, 3] in voxels; affine A = I + W is [B, 3, 3].
"""
import numpy as np

from .tfv1 import tf

ORTHO_EPS = 1e-5


def similarity_loss(fixed, warped):
    """Sum over the batch of 1 - Pearson correlation over each whole volume. Scalar."""
    size = int(np.prod(fixed.shape.as_list()[1:]))
    a = tf.reshape(fixed, [-1, size])
    b = tf.reshape(warped, [-1, size])
    a = a - tf.reduce_mean(a, axis=1, keepdims=True)
    b = b - tf.reduce_mean(b, axis=1, keepdims=True)
    var_a = tf.reduce_mean(tf.square(a), axis=1)
    var_b = tf.reduce_mean(tf.square(b), axis=1)
    cov = tf.reduce_mean(a * b, axis=1)
    pearson = cov / tf.sqrt((var_a + 1e-6) * (var_b + 1e-6))
    return tf.reduce_sum(1.0 - pearson)


def regularization_loss(flow):
    """l2 (sum of squares / 2) of forward differences along X, Y, Z, divided by X*Y*Z*3. Scalar.

    The neighbours are cut with tf.slice, not flow[:, 1:]: a strided slice's gradient
    (StridedSliceGrad) is a general strided scatter, where a slice's gradient is a pad, and on
    full-resolution flows it was a large share of a student's training step.
    """
    shape = flow.shape.as_list()
    diffs = []
    for axis in (1, 2, 3):
        size = [-1] * 5
        size[axis] = shape[axis] - 1
        ahead = [0] * 5
        ahead[axis] = 1
        diffs.append(tf.slice(flow, ahead, size) - tf.slice(flow, [0] * 5, size))
    return tf.add_n([tf.nn.l2_loss(d) for d in diffs]) / float(np.prod(shape[1:5]))


def _entries(m):
    return [[m[:, i, j] for j in range(3)] for i in range(3)]


def det3x3(m):
    """Determinants of a batch of 3x3 matrices [B, 3, 3] -> [B]."""
    m = _entries(m)
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def det_loss(A):
    """l2(det(A) - 1) summed over the batch. Scalar."""
    return tf.nn.l2_loss(det3x3(A) - 1.0)


def ortho_loss(A, eps=ORTHO_EPS):
    """Sum over the batch of s1 + (1+e)^2 s2/s3 - 6(1+e) for C = A^T A + eI.

    s1, s2, s3 are the elementary symmetric polynomials of C's eigenvalues (trace, sum of
    principal 2x2 minors, determinant); the term is 0 exactly when A is orthogonal.
    """
    C = tf.matmul(A, A, transpose_a=True) + eps * tf.eye(3)
    c = _entries(C)
    s1 = c[0][0] + c[1][1] + c[2][2]
    s2 = (c[0][0] * c[1][1] - c[0][1] * c[1][0] + c[1][1] * c[2][2] - c[1][2] * c[2][1]
          + c[0][0] * c[2][2] - c[0][2] * c[2][0])
    s3 = det3x3(C)
    return tf.reduce_sum(s1 + (1 + eps) ** 2 * s2 / s3 - 6 * (1 + eps))
