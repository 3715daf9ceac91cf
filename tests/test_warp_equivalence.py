"""A short training run gives the same losses with the compiled warp op and the pure-TF warp."""
import numpy as np
import pytest

from network import spatial_transformer as st
from network.cascade import make_net_args
from network.framework import Framework, session_config
from network.tfv1 import tf


def _losses(impl, batch, steps=5):
    st.set_warp_impl(impl)
    try:
        with tf.Graph().as_default():
            tf.set_random_seed(0)
            fw = Framework(make_net_args('LDR', 2, extra={'affine': None}), [32, 32, 32], augment=False)
            with tf.Session(config=session_config(fw.devices)) as sess:
                sess.run(tf.global_variables_initializer())
                return [fw.train_step(sess, batch, 1e-3)['loss'] for _ in range(steps)]
    finally:
        st.set_warp_impl('auto')


def test_training_losses_agree_between_warp_implementations():
    from network import ops
    if ops.load_warp_op() is None:
        pytest.skip('the compiled warp op is unavailable here (no compiler); nothing to compare')
    rng = np.random.default_rng(0)
    volume = rng.random((1, 32, 32, 32, 1))
    batch = {'voxel1': volume * 255, 'voxel2': np.roll(volume, 2, axis=1) * 255}
    op, pure = _losses('op', batch), _losses('tf', batch)
    print('op', op, 'tf', pure)
    assert op[-1] < op[0]
    np.testing.assert_allclose(op, pure, rtol=1e-4, atol=1e-6)
