"""Towers on two logical CPU devices give the loss of one device."""
import numpy as np

from network.cascade import make_net_args
from cli import parse_devices
from network.framework import Framework, session_config
from network.tfv1 import tf


def _loss_and_grad_norm(devices, batch):
    with tf.Graph().as_default():
        tf.set_random_seed(0)
        # no affine stem: a 32^3 volume is too small for the light stem
        fw = Framework(make_net_args('LDR', 1, extra={'affine': None}), [32, 32, 32], devices=devices,
                       augment=False)
        with tf.Session(config=session_config(devices)) as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run(fw.loss, fw.feed_dict(batch))


def test_two_cpu_towers_give_the_one_device_loss():
    rng = np.random.default_rng(0)
    batch = {'voxel1': rng.random((4, 32, 32, 32, 1)) * 255, 'voxel2': rng.random((4, 32, 32, 32, 1)) * 255}
    one = _loss_and_grad_norm(parse_devices('-1'), batch)
    two = _loss_and_grad_norm(parse_devices('cpu:2'), batch)
    assert abs(one - two) < 1e-4 * abs(one)


def test_parse_devices():
    assert parse_devices('-1') == ['/cpu:0']
    assert parse_devices('cpu:2') == ['/cpu:0', '/cpu:1']
    assert parse_devices('0,1') == ['/gpu:0', '/gpu:1']
    for bad in ('x', 'cpu:0', '0,,1', 'cpu:two'):
        try:
            parse_devices(bad)
        except ValueError as e:
            assert 'bad -g' in str(e)
        else:
            raise AssertionError(bad)
