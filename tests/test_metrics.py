"""Dice, Jaccard, landmark distance and Jacobian statistics on hand-made masks and fields."""
import numpy as np

from network import metrics
from tests.helpers import run_graph


def test_dice_jaccard_binary_masks():
    a = np.zeros((1, 8, 8, 8, 1))
    b = np.zeros((1, 8, 8, 8, 1))
    a[0, :4] = 255  # 256 voxels
    b[0, 2:6] = 255  # 256 voxels, 128 shared
    zero = np.zeros((1, 8, 8, 8, 3))
    dice, jacc = run_graph(lambda a, b, f: metrics.segmentation_overlap(a, b, f), {'a': a, 'b': b, 'f': zero})
    assert abs(dice[0, 0] - 0.5) < 1e-6 and abs(jacc[0, 0] - 128 / 384) < 1e-6


def test_dice_after_a_flow_that_aligns_the_masks():
    a = np.zeros((1, 8, 8, 8, 1))
    b = np.zeros((1, 8, 8, 8, 1))
    a[0, 1:4, 2:5, 2:5] = 255
    b[0, 3:6, 2:5, 2:5] = 255
    shift = np.zeros((1, 8, 8, 8, 3))
    shift[..., 0] = 2.0  # warped(p) = b(p + 2): b's block lands on a's
    dice, _ = run_graph(lambda a, b, f: metrics.segmentation_overlap(a, b, f), {'a': a, 'b': b, 'f': shift})
    assert abs(dice[0, 0] - 1.0) < 1e-6


def test_per_class_values_and_absent_class():
    a = np.zeros((1, 6, 6, 6, 1))
    a[0, :3] = 21
    a[0, 3:] = 22
    b = a.copy()
    b[0, 2] = 22  # class 21 loses one slab to 22
    dice, jacc = run_graph(lambda a, b, f: metrics.segmentation_overlap(a, b, f, [21, 22, 99]),
                           {'a': a, 'b': b, 'f': np.zeros((1, 6, 6, 6, 3))})
    assert abs(dice[0, 0] - 2 * 2 / 5) < 1e-6      # |A|=3 slabs, |B|=2, shared 2
    assert abs(dice[0, 1] - 2 * 3 / 7) < 1e-6      # |A|=3, |B|=4, shared 3
    assert abs(jacc[0, 1] - 3 / 4) < 1e-6
    assert np.isnan(dice[0, 2]) and np.isnan(jacc[0, 2])


def test_landmark_distances():
    flow = np.zeros((1, 8, 8, 8, 3))
    flow[..., 2] = 1.0
    p1 = np.array([[[2.0, 3, 4], [1, 1, 1], [-1, -1, -1]]])
    p2 = np.array([[[2.0, 3, 5], [4, 5, 2], [3, 3, 3]]])
    d = run_graph(lambda f, a, b: metrics.landmark_distances(a, b, f), {'f': flow, 'a': p1, 'b': p2})
    assert abs(d[0, 0]) < 1e-6 and abs(d[0, 1] - 5.0) < 1e-5 and np.isnan(d[0, 2])


def test_jacobian_identity_affine_and_folding():
    x = np.arange(6, dtype=np.float64)
    zero = np.zeros((1, 6, 6, 6, 3))
    scale = zero.copy()
    scale[..., 0] = 0.5 * x[:, None, None]  # det = 1.5 everywhere
    fold = zero.copy()
    fold[..., 1] = -2.0 * x[None, :, None]  # det = -1 everywhere
    (s0, f0), det, (s2, f2) = run_graph(lambda a, b, c: (metrics.jacobian_stats(a), metrics.jacobian_determinant(b),
                                                         metrics.jacobian_stats(c)),
                                        {'a': zero, 'b': scale, 'c': fold})
    assert abs(s0[0]) < 1e-6 and f0[0] == 0
    np.testing.assert_allclose(det, 1.5, atol=1e-5)
    assert f2[0] == 1.0
