"""network/refine.py: LNCC and its gradient, scaling and squaring, and refinement on a known pair."""
import numpy as np
import scipy.ndimage as ndi

from helpers import run_graph, warp_reference
from network.refine import Refiner, box_sum, integrate_velocity, lncc
from network.tfv1 import tf


def lncc_reference(fixed, warped, width, eps=1e-5):
    """float64 NumPy LNCC of two [X, Y, Z] volumes: box sums with zeros outside (SPEC section 10)."""
    def box(x):
        return ndi.uniform_filter(x, width, mode='constant', cval=0.0) * width ** 3
    n = float(width ** 3)
    s_f, s_w, s_ff, s_ww, s_fw = [box(v) for v in (fixed, warped, fixed * fixed, warped * warped, fixed * warped)]
    cross = s_fw - s_f * s_w / n
    cc = cross ** 2 / ((s_ff - s_f ** 2 / n) * (s_ww - s_w ** 2 / n) + eps)
    return cc.mean()


def test_box_sum_and_lncc_against_numpy():
    rng = np.random.default_rng(0)
    fixed = ndi.gaussian_filter(rng.random((12, 10, 14)), 1.5)
    warped = 0.6 * fixed + 0.4 * ndi.gaussian_filter(rng.random((12, 10, 14)), 1.0)
    x = rng.random((1, 12, 10, 14, 2))
    boxed = run_graph(lambda x: box_sum(x, 5), {'x': x})
    expected = ndi.uniform_filter(x, (1, 5, 5, 5, 1), mode='constant', cval=0.0) * 125
    np.testing.assert_allclose(boxed, expected, rtol=1e-4, atol=1e-4)
    for width in (3, 5):
        value = run_graph(lambda f, w: lncc(f, w, width), {'f': fixed[None, ..., None], 'w': warped[None, ..., None]})
        np.testing.assert_allclose(value[0], lncc_reference(fixed, warped, width), rtol=1e-4)


def test_lncc_gradient_against_finite_differences():
    rng = np.random.default_rng(1)
    fixed = ndi.gaussian_filter(rng.random((8, 8, 8)), 1.0)[None, ..., None]
    warped = ndi.gaussian_filter(rng.random((8, 8, 8)), 1.0)[None, ..., None]
    with tf.Graph().as_default():
        f = tf.constant(fixed, tf.float64)
        w = tf.placeholder(tf.float64, warped.shape)
        value = lncc(f, w, 3)[0]
        gradient = tf.gradients(value, w)[0]
        with tf.Session() as sess:
            analytic = sess.run(gradient, {w: warped})
            for index in [(0, 1, 2, 3, 0), (0, 4, 4, 4, 0), (0, 7, 0, 5, 0)]:
                step = np.zeros_like(warped)
                step[index] = 1e-5
                numeric = (sess.run(value, {w: warped + step}) - sess.run(value, {w: warped - step})) / 2e-5
                np.testing.assert_allclose(analytic[index], numeric, rtol=1e-4, atol=1e-9)


def _integrate_reference(velocity, squarings):
    """NumPy float64 scaling and squaring of [X, Y, Z, 3] (border padding, as the warp)."""
    u = velocity / 2.0 ** squarings
    for _ in range(squarings):
        u = u + warp_reference(u[None], u[None])[0]
    return u


def test_scaling_and_squaring_against_numpy_and_exact_for_a_constant():
    constant = np.zeros((1, 10, 10, 10, 3))
    constant[..., :] = [0.7, -1.3, 2.1]
    np.testing.assert_allclose(run_graph(lambda v: integrate_velocity(v, 7), {'v': constant}), constant, atol=1e-5)
    rng = np.random.default_rng(2)
    velocity = np.stack([ndi.gaussian_filter(rng.normal(0, 3.0, (12, 12, 12)), 2.5) for _ in range(3)], -1)
    integrated = run_graph(lambda v: integrate_velocity(v, 5), {'v': velocity[None]})[0]
    np.testing.assert_allclose(integrated, _integrate_reference(velocity, 5), atol=1e-4)
    assert np.abs(integrated - velocity).max() > 0.01        # not the identity: the flow of v


def test_refinement_lowers_the_loss_and_the_error_to_a_known_field():
    """A smooth blob image and its version moved by a known smooth field: starting from a zero
    'network' flow, refinement lowers the loss and the end-point error to that field."""
    size = 32
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij'), -1).astype(np.float64)
    fixed = 255.0 * ndi.gaussian_filter(rng.random((size,) * 3), 2.0)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min()) * 255.0
    truth = np.stack([ndi.zoom(rng.normal(0, 2.0, (4, 4, 4)), size / 4, order=3) for _ in range(3)], -1)
    # moving(p + truth(p)) = fixed(p): moving = fixed pulled back by the inverse map, approximately
    inverse = -truth
    for _ in range(10):
        inverse = -warp_reference(truth[None], inverse[None])[0]
    moving = ndi.map_coordinates(fixed, np.moveaxis(grid + inverse, -1, 0), order=1, mode='nearest')
    for diffeomorphic in (False, True):
        refiner = Refiner([size] * 3, factor=2, window=5, weight=0.1, learning_rate=0.2, diffeomorphic=diffeomorphic)
        flow, record = refiner.refine(fixed, moving, np.zeros((size,) * 3 + (3,)), 60)
        inner = (slice(4, -4),) * 3
        error_before = np.linalg.norm(truth[inner], axis=-1).mean()
        error_after = np.linalg.norm((flow - truth)[inner], axis=-1).mean()
        assert record["loss"] < 0.8 * record["loss_before"], record
        assert error_after < 0.7 * error_before, (diffeomorphic, error_before, error_after)
