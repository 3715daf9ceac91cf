"""Subnets, losses and the RCN builder on analytic cases and parameter counts; TensorFlow's import."""
import subprocess
import sys

import numpy as np
import pytest

import cli
from network import layers, losses, subnets
from network.augment import (AffineRange, bspline_basis, invert_points, random_affine_flow, random_ffd, random_gamma,
                             rotation_matrices)
from network.cascade import RecursiveCascade, make_net_args
from network.module import count_parameters
from network.tfv1 import tf
from tests.conftest import ROOT
from tests.helpers import run_graph


def _params(cls, size=64):
    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [1, size, size, size, 1])
        m = cls('m')
        m(x, x)
        return count_parameters(m.trainable_variables)


@pytest.mark.parametrize('cls,expected,tol', [
    (subnets.VTN, 28.2e6, 0.03), (subnets.VTNAffineStem, 14.2e6, 0.03), (subnets.LDROriginal, 0.28e6, 0.03)])
def test_parameter_counts(cls, expected, tol):
    assert abs(_params(cls) - expected) / expected < tol


def test_tensorflow_is_imported_without_keras_which_stays_importable():
    """network.tfv1 keeps TensorFlow from importing Keras eagerly (a fresh process has no keras
    module after it), and tf.keras still loads on demand afterwards."""
    code = ('import sys; from network.tfv1 import tf; '
            'print(sum(m.split(".")[0] == "keras" for m in sys.modules)); '
            'import tensorflow; tensorflow.keras.layers.Dense; import keras.src.optimizers; print("keras ok")')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['0', 'keras', 'ok'], proc.stdout


def test_command_line_lists_every_base_network():
    assert cli.BASE_NETWORK_NAMES == tuple(subnets.BASE_NETWORKS)


def test_paper_ldr_is_an_order_of_magnitude_smaller_than_vtn():
    ldr = _params(subnets.LDR)
    print('paper LDR parameters:', ldr)
    assert 5 < _params(subnets.VTN) / ldr < 30


@pytest.mark.parametrize('head', subnets.LDR.HEADS)
def test_ldr_heads_give_a_full_resolution_flow(head):
    x = np.zeros((1, 32, 32, 32, 1))
    flow = run_graph(lambda a: subnets.LDR('ldr', head=head)(a, a)['flow'], {'a': x})
    assert flow.shape == (1, 32, 32, 32, 3) and np.all(np.isfinite(flow))


def test_linear_upsampling_matches_scipy_zoom():
    from scipy import ndimage
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 1, 2))
    y = run_graph(layers.upsample_linear2, {'x': x})
    ref = np.stack([np.stack([ndimage.zoom(x[b, ..., c], 2, order=1, grid_mode=True, mode='nearest')
                              for c in range(2)], -1) for b in range(2)])
    assert y.shape == (2, 6, 8, 2, 2) and np.abs(y - ref).max() < 1e-5


def test_linear_upsampling_gradient_matches_finite_differences():
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 4, 2)).astype(np.float32)
    with tf.Graph().as_default(), tf.Session():
        x_t = tf.constant(x)
        y = layers.upsample_linear2(x_t)
        error = tf.test.compute_gradient_error(x_t, x.shape, y, [2, 6, 4, 8, 2], delta=1e-2)
    assert error < 1e-3


def test_module_reuses_variables_on_second_call():
    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [1, 32, 32, 32, 1])
        m = subnets.LDR('ldr')
        m(x, x)
        n = len(m.trainable_variables)
        m(x, x)
        assert len(m.trainable_variables) == n == len(tf.trainable_variables())


@pytest.mark.parametrize('name', sorted(subnets.BASE_NETWORKS))
def test_size_not_divisible_by_stride_is_refused(name):
    cls = subnets.BASE_NETWORKS[name]
    with tf.Graph().as_default():
        x = tf.placeholder(tf.float32, [1, cls.stride + 8, 64, 64, 1])
        with pytest.raises(ValueError, match='not divisible'):
            cls('m')(x, x)


def test_similarity_and_regularization_analytic():
    rng = np.random.default_rng(0)
    img = rng.random((2, 8, 8, 8, 1))
    flow = np.ones((2, 8, 8, 8, 3)) * np.array([1.5, -2.0, 0.25])
    sim_same, sim_neg, reg_const = run_graph(lambda a, f: (
        losses.similarity_loss(a, a), losses.similarity_loss(a, -a), losses.regularization_loss(f)),
        {'a': img, 'f': flow})
    assert abs(sim_same) < 1e-4 and abs(sim_neg - 4.0) < 1e-4 and reg_const == 0.0
    ramp = np.zeros((1, 4, 5, 6, 3))
    ramp[..., 0] = np.arange(4)[:, None, None] * 2.0  # forward difference 2 along X, 3*5*6 pairs
    reg = run_graph(lambda f: losses.regularization_loss(f), {'f': ramp})
    assert abs(reg - (3 * 5 * 6 * 4 / 2) / (4 * 5 * 6 * 3)) < 1e-6


def test_regularization_loss_and_gradient_against_numpy():
    f = np.random.default_rng(6).standard_normal((2, 4, 5, 6, 3))
    diffs = [np.diff(f, axis=axis) for axis in (1, 2, 3)]
    expected = sum((d ** 2).sum() / 2 for d in diffs) / (4 * 5 * 6 * 3)
    expected_grad = sum(np.pad(d, [(1, 0) if a == axis else (0, 0) for a in range(5)])
                        - np.pad(d, [(0, 1) if a == axis else (0, 0) for a in range(5)])
                        for axis, d in zip((1, 2, 3), diffs)) / (4 * 5 * 6 * 3)
    loss, grad = run_graph(lambda f: (losses.regularization_loss(f), tf.gradients(losses.regularization_loss(f), f)[0]),
                           {'f': f})
    assert abs(loss - expected) < 1e-5 * expected
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_det_and_ortho_losses_against_numpy():
    rng = np.random.default_rng(1)
    A = np.eye(3) + rng.normal(0, 0.2, (3, 3, 3))
    det, ortho = run_graph(lambda a: (losses.det_loss(a), losses.ortho_loss(a)), {'a': A})
    assert abs(det - np.sum((np.linalg.det(A) - 1) ** 2) / 2) < 1e-4
    e = losses.ORTHO_EPS
    ref = 0.0
    for a in A:
        k = np.linalg.eigvalsh(a.T @ a + e * np.eye(3))
        ref += np.sum(k + (1 + e) ** 2 / k) - 6 * (1 + e)  # s1 + (1+e)^2 s2/s3 = sum k + (1+e)^2 sum 1/k
    assert abs(ortho - ref) < 1e-3 * max(1, abs(ref))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert abs(run_graph(lambda a: losses.ortho_loss(a), {'a': q[None]})) < 1e-4


def test_affine_flow_of_known_W_b():
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3)) * 5
    sizes = (5, 6, 7)
    flow = run_graph(lambda W, b: subnets.affine_flow(W, b, sizes), {'W': W, 'b': b})
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in sizes], indexing='ij'), -1)
    np.testing.assert_allclose(flow, np.einsum('bij,xyzj->bxyzi', W, grid) + b[:, None, None, None], atol=1e-5)


def test_affine_flow_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    W, b = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3))
    with tf.Graph().as_default(), tf.Session():
        W_t, b_t = tf.constant(W), tf.constant(b)
        flow = subnets.affine_flow(tf.cast(W_t, tf.float32), tf.cast(b_t, tf.float32), (3, 4, 5))
        error = tf.test.compute_gradient_error([W_t, b_t], [W.shape, b.shape], tf.cast(flow, tf.float64),
                                               [2, 3, 4, 5, 3], delta=1e-2)
    assert error < 2e-3


def test_transform_vectors_and_stack_channels_match_numpy():
    rng = np.random.default_rng(5)
    M, v, a, c = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3, 4, 5, 3)), \
        rng.normal(size=(2, 3, 4, 5, 2)), rng.normal(size=(2, 3, 4, 5, 2))
    out = run_graph(lambda M, v: layers.transform_vectors(M, v), {'M': M, 'v': v})
    np.testing.assert_allclose(out, np.einsum('bij,bxyzj->bxyzi', M, v), atol=1e-5)
    pair = run_graph(lambda a, c: layers.stack_channels(a, c), {'a': a, 'c': c})
    np.testing.assert_array_equal(pair, np.concatenate([a, c], 4).astype(np.float32))


def test_composition_of_two_translations_is_their_sum():
    """With translation stems, the composed flow of the cascade equals t1 + t2."""
    class Translate(subnets.DeformableNet):
        def __init__(self, name, t, flow_multiplier=1.0):
            super().__init__(name, flow_multiplier)
            self.t = t

        def _flow(self, pair):
            return tf.zeros_like(tf.concat([pair, pair[..., :1]], axis=4)) + self.t

    def build(img):
        rcn = RecursiveCascade('rcn', 'VTN', n_cascades=2, affine=None)
        rcn.cascades = [Translate('a', [1.0, 0.5, 0.0]), Translate('b', [0.0, 1.0, -2.0])]
        return rcn(img, img)['flow']
    flow = run_graph(build, {'img': np.zeros((1, 8, 8, 8, 1))})
    np.testing.assert_allclose(flow[0, 3:5, 3:5, 3:5], np.broadcast_to([1.0, 1.5, -2.0], (2, 2, 2, 3)), atol=1e-5)


def test_rcn_outputs_and_loss_terms():
    rng = np.random.default_rng(2)
    pair = rng.random((2, 64, 64, 64, 1)).astype(np.float32)

    def build(a):
        rcn = RecursiveCascade('rcn', **make_net_args('LDR', 2, rep=2))
        return rcn(a, a[::-1])
    out = run_graph(build, {'a': pair})
    assert len(out['stages']) == 1 + 2 * 2
    assert set(out['terms']) == {'det', 'ortho', 'similarity', 'regularization'}
    assert out['flow'].shape == (2, 64, 64, 64, 3)
    assert abs(out['loss'] - sum(out['terms'].values())) < 1e-5


def test_make_net_args_rejects_unknown_keys():
    with pytest.raises(ValueError, match='unknown base network'):
        make_net_args('ResNet', 1)
    with pytest.raises(ValueError, match='bogus'):
        make_net_args('LDR', 1, extra={'bogus': 1})
    assert make_net_args('LDR', 1, extra={'head': 'deconv'})['base_args'] == {'head': 'deconv'}


def test_bspline_augmentation_field_and_landmark_inverse():
    basis = bspline_basis(33)
    np.testing.assert_allclose(basis.sum(axis=1)[8:25], 1.0, atol=1e-5)  # partition of unity inside

    def build(points):
        flow = random_ffd(2, (32, 32, 32), seed=3)
        p = invert_points(points, flow)
        from network.spatial_transformer import sample_points
        return flow, p, p + sample_points(flow, p)
    pts = np.array([[[10.0, 12, 14], [20, 8, 16], [-1, -1, -1]]] * 2)
    flow, p, back = run_graph(build, {'points': pts})
    assert 0.2 < np.abs(flow).max() < 0.4 * 8 * 1.01
    np.testing.assert_allclose(back[:, :2], pts[:, :2], atol=0.05)
    np.testing.assert_array_equal(p[:, 2], pts[:, 2])


def _rotation_reference(angles):
    """NumPy float64 R0 R1 R2 for angles about array axes 0, 1, 2."""
    def about(axis, angle):
        a, b = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
        return r
    return about(0, angles[0]) @ about(1, angles[1]) @ about(2, angles[2])


def test_random_affine_augmentation_is_a_bounded_affine_map():
    angles = np.array([[0.3, -0.2, 0.1], [-0.05, 0.4, -0.3]])
    rotations = run_graph(lambda angles: rotation_matrices(angles), {'angles': angles})
    for r, a in zip(rotations, angles):
        np.testing.assert_allclose(r, _rotation_reference(a), atol=1e-6)

    ranges = AffineRange(degrees=10.0, scale=0.05, shift=4.0)
    sizes = (16, 12, 20)
    flow = run_graph(lambda: random_affine_flow(3, sizes, ranges, seed=5))
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in sizes], indexing='ij'), -1).reshape(-1, 3)
    design = np.concatenate([grid, np.ones((len(grid), 1))], 1)
    for sample in flow:
        coefficients, _, _, _ = np.linalg.lstsq(design, sample.reshape(-1, 3), rcond=None)
        np.testing.assert_allclose(design @ coefficients, sample.reshape(-1, 3), atol=1e-4)  # affine
        matrix = coefficients[:3].T + np.eye(3)              # R S
        shift = coefficients[3]
        assert np.all(np.abs(shift) <= 4.0 + 1e-5) and np.abs(shift).max() > 0.1
        scales = np.linalg.norm(matrix, axis=0)               # columns of R S have norms S
        assert np.all(np.abs(np.log(scales)) <= 0.05 + 1e-5)
        rotation = matrix / scales
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-5)
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert 0.1 < angle <= np.sqrt(3) * 10.0 + 1e-3
    zero = run_graph(lambda: random_affine_flow(1, sizes, AffineRange(0.0, 0.0, 0.0)))
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)


def _powers(images, out):
    """Per sample the power p with out = images ** p, fitted on the voxels strictly inside (0, 1)."""
    powers = []
    for x, y in zip(images, out):
        inside = (x > 0.05) & (x < 0.95)
        ratio = np.log(y[inside]) / np.log(x[inside])
        np.testing.assert_allclose(ratio, ratio.mean(), rtol=1e-4)      # one power per sample
        powers.append(ratio.mean())
    return np.array(powers)


def test_random_gamma_raises_each_sample_to_its_own_bounded_power():
    images = np.random.default_rng(2).uniform(0.0, 1.0, (6, 8, 7, 5, 1))
    images[:, 0, 0, 0, 0], images[:, 0, 0, 1, 0] = 0.0, 1.0
    key = np.array([7, 300], np.int64)
    out = run_graph(lambda x: random_gamma(x, 1.6, key=tf.constant(key)), {'x': images})
    powers = _powers(images, out)
    assert np.all(np.abs(np.log(powers)) <= np.log(1.6) + 1e-5) and np.ptp(powers) > 0.05
    assert np.all(out[:, 0, 0, 0, 0] == 0.0) and np.allclose(out[:, 0, 0, 1, 0], 1.0)
    again = run_graph(lambda x: random_gamma(x, 1.6, key=tf.constant(key)), {'x': images})
    np.testing.assert_array_equal(again, out)                           # stateless: the key decides
    other = run_graph(lambda x: random_gamma(x, 1.6, key=tf.constant(key), draw=5), {'x': images})
    assert np.abs(_powers(images, other) - powers).max() > 0.01


def test_framework_gives_fixed_and_moving_their_own_contrast():
    """With gamma_augment and no deformation, a tower's fixed and moving inputs are the fed
    images / 255 raised to powers within [1/G, G], drawn apart for the two images."""
    from network.framework import Framework
    rng = np.random.default_rng(3)
    feed = {k: rng.uniform(0.0, 255.0, (2, 16, 16, 16, 1)) for k in ('voxel1', 'voxel2')}
    with tf.Graph().as_default():
        fw = Framework(make_net_args('LDR', 1, extra={'affine': None}), [16] * 3, augment=False, augment_seed=4,
                       gamma_augment=2.0)
        (fixed, moving), = fw._tower_inputs()
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            f, m = sess.run([fixed, moving], {fw.feeds[k]: v for k, v in feed.items()})
    fixed_powers, moving_powers = _powers(feed['voxel1'] / 255.0, f), _powers(feed['voxel2'] / 255.0, m)
    for powers in (fixed_powers, moving_powers):
        assert np.all(np.abs(np.log(powers)) <= np.log(2.0) + 1e-5)
    assert np.abs(fixed_powers - moving_powers).min() > 1e-3


def test_multiply_accumulate_count_of_convolutions():
    from bench.inference import multiply_accumulates
    with tf.Graph().as_default() as graph:
        x = tf.placeholder(tf.float32, [None, 8, 8, 8, 2])
        y = tf.nn.conv3d(x, tf.zeros([3, 3, 3, 2, 4]), [1, 1, 1, 1, 1], 'SAME')            # 8^3 x 27 x 2 x 4
        small = tf.placeholder(tf.float32, [1, 4, 4, 4, 4])
        tf.nn.conv3d_transpose(small, tf.zeros([4, 4, 4, 2, 4]), [1, 8, 8, 8, 2], [1, 2, 2, 2, 1])  # 4^3 x 64 x 4 x 2
        tf.matmul(tf.zeros([5, 3]), tf.zeros([3, 7]))                                               # 5 x 3 x 7
        assert y.shape.as_list()[1:] == [8, 8, 8, 4]
    assert multiply_accumulates(graph) == 8 ** 3 * 27 * 2 * 4 + 4 ** 3 * 64 * 4 * 2 + 5 * 3 * 7
