"""Towers on two logical CPU devices against one device, on one batch of 4 pairs at 32^3: the
loss, its terms, the monitors and the gradients, for the plain Framework and for distillation.

The scale the towers give, and why. The RCN losses are sums over the batch (network/losses.py):
each tower's loss is the sum over its half of the batch, the framework sums the towers' losses
and averages their gradients. So the loss and its terms equal one device's, and the averaged
gradient is 1/n of one device's gradient of that same loss (n = 2 towers). The distillation
terms keep that scale: a tower's adversarial or L2 term is the mean over its half divided by n,
so the towers' terms sum to the batch mean and the averaged student gradient is again 1/n of one
device's. The critic's loss is a per-tower mean (the Wasserstein estimate and the gradient
penalty are means over pairs) not divided by n, and the monitors are per-tower means averaged
over towers: both equal one device's, the critic's averaged gradient included. Adam is invariant
to a constant scale of the gradient (up to its epsilon), so the student's 1/n shows only in the
logged grad_norm.

The critic gradient is compared with lamb = 0: the penalty's interpolation weights a ~ U(0, 1)
are drawn by each tower's own random op, so two graphs cannot draw the same a for a pair; the
penalty is a mean over pairs like the Wasserstein estimate, so the same scale holds for it.
Both graphs get the same variable values (copied by name). The towers compute the same sums in
another order (convolutions on batches of 2 instead of 4), hence relative tolerances of 1e-4 for
scalars and 1e-3 for each variable's gradient (in norm); a wrong scale, e.g. tower gradients
summed instead of averaged, is off by a factor of 2.
"""
import numpy as np
import pytest

from cli import parse_devices
from network.aldk import DistillFramework
from network.cascade import make_net_args
from network.framework import Framework, session_config
from network.tfv1 import tf

SIZE = [32, 32, 32]
# no affine stem: a 32^3 volume is too small for the light stem
STUDENT = make_net_args('LDR', 1, extra={'affine': None})
BUILDERS = {
    'plain': lambda devices: Framework(STUDENT, SIZE, devices=devices, augment=False),
    'aldk': lambda devices: DistillFramework(STUDENT, SIZE, devices=devices, augment=False, method='aldk',
                                             stored_flows=True, lamb=0.0),
    'l2': lambda devices: DistillFramework(STUDENT, SIZE, devices=devices, augment=False, method='l2',
                                           stored_flows=True),
}


def _batch():
    rng = np.random.default_rng(0)
    return {'voxel1': rng.random((4, 32, 32, 32, 1)) * 255, 'voxel2': rng.random((4, 32, 32, 32, 1)) * 255,
            'teacher_flow': rng.standard_normal((4, 32, 32, 32, 3)) * 2}


def _evaluate(config, devices, batch, values=None):
    """Loss, terms, monitors and gradients {variable name: gradient} (the student's; the critic's
    under 'critic') of ``config`` on ``devices`` before any update, with the variables set to
    ``values`` {name: array} when given. Returns (results, the variable values)."""
    with tf.Graph().as_default():
        tf.set_random_seed(0)
        fw = BUILDERS[config](devices)
        fetch = {'loss': fw.loss, 'terms': fw.terms, 'monitors': fw.monitors,
                 'gradients': {v.op.name: g for g, v in fw.gradients}}
        if getattr(fw, 'critic', None) is not None:
            fetch['critic'] = {v.op.name: g for g, v in fw.critic_gradients}
        with tf.Session(config=session_config(devices)) as sess:
            sess.run(tf.global_variables_initializer())
            variables = tf.global_variables()
            if values is not None:
                for v in variables:
                    v.load(values[v.op.name], sess)
            return sess.run(fetch, fw.feed_dict(batch)), dict(zip([v.op.name for v in variables], sess.run(variables)))


def _assert_gradients(two, one, scale):
    assert set(two) == set(one)
    for name in one:
        expected = one[name] * scale
        assert np.linalg.norm(two[name] - expected) <= 1e-3 * np.linalg.norm(expected) + 1e-12, name


@pytest.mark.parametrize('config', sorted(BUILDERS))
def test_two_cpu_towers_give_the_one_device_loss_and_gradients(config):
    batch = _batch()
    one, values = _evaluate(config, parse_devices('-1'), batch)
    two, _ = _evaluate(config, parse_devices('cpu:2'), batch, values)
    scalars = [('loss', one['loss'], two['loss'])]
    scalars += [(k, one[group][k], two[group][k]) for group in ('terms', 'monitors') for k in one[group]]
    assert set(two['terms']) == set(one['terms']) and set(two['monitors']) == set(one['monitors'])
    for name, a, b in scalars:
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-7, (name, a, b)
    assert one['gradients'] and all(np.any(g != 0) for g in one['gradients'].values())
    _assert_gradients(two['gradients'], one['gradients'], 1 / 2)
    if config == 'aldk':
        # without the penalty, the biases of the deeper convs (zero at the start) can get no
        # gradient: phi_t and phi_d may share those layers' LeakyReLU sides, which cancels it
        assert one['critic'] and any(np.any(g != 0) for g in one['critic'].values())
        _assert_gradients(two['critic'], one['critic'], 1.0)


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
