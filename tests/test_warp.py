"""The pure-TF warp against SciPy, and its gradients against finite differences."""
import numpy as np
import pytest

from network import spatial_transformer as st
from network.tfv1 import tf
from tests.helpers import run_graph, warp_reference


@pytest.fixture(autouse=True)
def pure_tf():
    st.set_warp_impl('tf')
    yield
    st.set_warp_impl('auto')


@pytest.mark.parametrize('padding', ['border', 'zeros'])
def test_warp_matches_map_coordinates(padding):
    rng = np.random.default_rng(1)
    image = rng.random((2, 10, 9, 8, 3))
    flow = rng.normal(0, 4, (2, 10, 9, 8, 3))  # many samples fall outside the volume
    out = run_graph(lambda image, flow: st.warp(image, flow, padding), {'image': image, 'flow': flow})
    assert np.abs(out - warp_reference(image, flow, padding)).max() < 1e-4


def test_zero_flow_is_identity_and_integer_shift_moves():
    rng = np.random.default_rng(2)
    image = rng.random((1, 6, 7, 8, 1))
    shift = np.zeros((1, 6, 7, 8, 3))
    shift[..., 1] = 2.0
    ident, moved = run_graph(lambda image, flow: (st.warp(image, flow * 0), st.warp(image, flow)),
                             {'image': image, 'flow': shift})
    np.testing.assert_allclose(ident, image, atol=1e-6)
    np.testing.assert_allclose(moved[:, :, :5], image[:, :, 2:7], atol=1e-6)


def _numeric_grad(f, x, index, eps=1e-3):
    xp, xm = x.copy(), x.copy()
    xp[index] += eps
    xm[index] -= eps
    return (f(xp) - f(xm)) / (2 * eps)


@pytest.mark.parametrize('padding', ['border', 'zeros'])
def test_gradients_match_finite_differences(padding):
    rng = np.random.default_rng(3)
    image = rng.random((2, 6, 5, 4, 2))
    # fractional parts kept away from voxel boundaries, where trilinear interpolation has kinks
    flow = np.round(rng.normal(0, 2, (2, 6, 5, 4, 3))) + rng.uniform(0.2, 0.8, (2, 6, 5, 4, 3))
    weights = rng.random(image.shape)

    def loss_np(img, flw):
        return float(np.sum(warp_reference(img, flw, padding) * weights))

    gi, gf = run_graph(lambda image, flow: tf.gradients(tf.reduce_sum(st.warp(image, flow, padding) * weights),
                                                        [image, flow]), {'image': image, 'flow': flow})
    for _ in range(6):
        idx = tuple(rng.integers(0, n) for n in image.shape)
        assert abs(gi[idx] - _numeric_grad(lambda x: loss_np(x, flow), image, idx)) < 1e-3
        idx = tuple(rng.integers(0, n) for n in flow.shape)
        assert abs(gf[idx] - _numeric_grad(lambda x: loss_np(image, x), flow, idx)) < 1e-3


def test_nearest_warp_keeps_label_values():
    labels = np.zeros((1, 8, 8, 8, 1))
    labels[0, 2:5, 2:5, 2:5] = 7
    labels[0, 5:7, 5:7, 5:7] = 3
    flow = np.random.default_rng(4).uniform(-1.5, 1.5, (1, 8, 8, 8, 3))
    out = run_graph(lambda image, flow: st.warp_nearest(image, flow), {'image': labels, 'flow': flow})
    assert set(np.unique(out)) <= {0.0, 3.0, 7.0}


def test_bad_padding_and_impl_rejected():
    with pytest.raises(ValueError, match='padding'):
        st.warp(tf.zeros([1, 2, 2, 2, 1]), tf.zeros([1, 2, 2, 2, 3]), 'reflect')
    with pytest.raises(ValueError, match='implementation'):
        st.set_warp_impl('cuda')

