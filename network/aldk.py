"""ALDK: adversarial learning with distilled knowledge (SPEC section 5), and a plain L2
flow-distillation baseline for the ablation.

Flows are [B, X, Y, Z, 3] float32 displacements in voxels. phi_t is the teacher's final
composed flow, phi_s the student's, phi_d = beta phi_t + (1 - beta) phi_s the distilled one.

  critic loss   L_D = mean D(phi_d) - mean D(phi_t) + lambda mean_b (||grad D(phi_hat_b)||_2 - 1)^2,
                phi_hat = phi_t + a (phi_d - phi_t), a ~ U(0, 1) per sample (WGAN-GP on flows)
  student loss  gamma L_rec + (1 - gamma) L_adv,  L_adv = -mean D(phi_d)   (method 'aldk')
                gamma L_rec + (1 - gamma) mean ||phi_s - phi_t||^2          (method 'l2')

L_rec is the unsupervised RCN loss (similarity + regularisation + affine terms). The
adversarial term is an ordinary differentiable graph term, so it reaches the student (the
original routed it through tf.py_func, which has no gradient); the critic is trained by its own
optimiser; the gradient penalty is taken w.r.t. the flows phi_hat, not the critic's logits.

Choices (not fixed by the paper):
  - Critic: five 4x4x4 stride-2 convs, channels 16, 32, 64, 128, 256, each with a bias and a
    LeakyReLU of slope 0.2 (the usual WGAN-GP critic slope; the original's lrelu default),
    no normalisation (WGAN-GP forbids batch norm in the critic), then a linear layer (no bias)
    from the flattened features to one score; see Critic for its input scaling and the units
    of the gradient penalty ('normalized': RMS displacement as a fraction of the half-extent).
  - Critic optimiser: Adam(lr, beta1=0.5, beta2=0.9), the same learning-rate schedule as the
    student; beta1 = 0.5 / beta2 = 0.9 are the usual GAN settings (WGAN-GP uses beta2 = 0.9).
  - Schedule: the student is updated at every step, the critic every ``critic_every``-th
    step (default 2: global steps 0, 2, 4, ...), before that step's student update, on the same
    batch. The spec asks for the student to be updated more often than the critic; 2 is the
    closest to the standard WGAN-GP practice (a critic kept near its optimum, n_critic >= 1
    per generator step) that satisfies it: the further the critic lags, the staler and less
    informative its gradients for the student. It was chosen a priori, not tuned. The
    critic's learning rate is ``critic_lr_factor`` (default 1) times the student's.
  - Towers: each tower's adversarial / distillation term is its own batch mean divided by the
    number of towers, so the towers' terms sum to the batch mean exactly like the summed RCN
    losses; critic terms are averaged over towers. Gradients are averaged over towers, so with
    n towers the student's gradient is 1/n of one device's and the critic's equals one
    device's (tests/test_towers.py).
  - Offline mode feeds phi_t through the placeholder ``teacher_flow`` [B, X, Y, Z, 3]; its
    flows belong to un-augmented pairs, so the framework refuses augmentation in that mode.
"""
import dataclasses

import numpy as np

from errors import ConfigError

from .aldk_config import CRITIC_UNITS, DistillSettings
from .cascade import RecursiveCascade
from .framework import Framework, Tower, average_gradients
from .layers import conv3d
from .module import Module, count_parameters
from .subnets import VTNAffineStem
from .tfv1 import tf

METHODS = ('aldk', 'l2')
CRITIC_CHANNELS = (16, 32, 64, 128, 256)
CRITIC_SLOPE = 0.2
CRITIC_ADAM = {'beta1': 0.5, 'beta2': 0.9}
DEFAULTS = DistillSettings()
GP_EPS = 1e-12


class Critic(Module):
    """ALDK critic D: flow [B, X, Y, Z, 3] (voxels) -> score [B] (unbounded, a Wasserstein critic).

    The network sees each displacement as a fraction of half the image extent along its axis
    (the [-1, 1] convention of spatial transformers; values ~0.1, so that its first layer's
    weights, not its biases, carry the signal). Then len(channels) 4x4x4 stride-2 'SAME' convs
    with LeakyReLU(slope), and a linear layer on the flattened features, without bias (a
    constant cancels in both the Wasserstein estimate and the gradient penalty, so it would
    never be trained). The spatial size is fixed by the first call; each conv halves it.

    ``units`` sets the metric in which the gradient penalty makes D 1-Lipschitz (see
    ``to_units`` and ``gradient_penalty``), hence the scale of D and of the adversarial gradient:
      'normalized' (default): the L2 distance of two fields is their RMS displacement difference
          as a fraction of the half-extent, independent of the image size and resolution;
      'rms': their RMS displacement difference in voxels (n / 2 times 'normalized' along an
          axis of n voxels);
      'voxels': the raw L2 norm over all X Y Z voxels (sqrt(X Y Z) times 'rms').
    The larger the metric's distances, the more D may change along a flow, hence the larger the
    adversarial gradient: with 'voxels' or 'rms' and lamb = 0.1 it swamped the reconstruction
    loss at 64^3 and training diverged; with 'normalized' it stays a fraction of it, whatever
    the image size.
    """
    UNITS = CRITIC_UNITS

    def __init__(self, name='critic', channels=CRITIC_CHANNELS, slope=CRITIC_SLOPE, units=DEFAULTS.critic_units):
        super().__init__(name)
        if units not in self.UNITS:
            raise ConfigError('unknown critic units {!r} (choose from {})'.format(units, ', '.join(self.UNITS)))
        self.channels = tuple(channels)
        self.slope = slope
        self.units = units

    def _metric_scale(self, sizes):
        """Per-axis factor from voxels to the penalty's units."""
        if self.units == 'voxels':
            return np.ones(3)
        rms = 1.0 / np.sqrt(np.prod(sizes))
        return np.full(3, rms) if self.units == 'rms' else rms * 2.0 / np.asarray(sizes, np.float64)

    def to_units(self, flow):
        """The flow [B, X, Y, Z, 3] in the penalty's units."""
        return flow * tf.constant(self._metric_scale(flow.shape.as_list()[1:4]), tf.float32)

    def _build(self, flow, in_units=False):
        """Score of ``flow`` in voxels, or in the penalty's units when ``in_units``."""
        sizes = flow.shape.as_list()[1:4]
        scale = 2.0 / np.asarray(sizes, np.float64)
        if in_units:
            scale = scale / self._metric_scale(sizes)
        net = flow * tf.constant(scale, tf.float32)
        for i, width in enumerate(self.channels):
            net = tf.nn.leaky_relu(conv3d('conv%d' % (i + 1), net, width, 4, 2), alpha=self.slope)
        features = int(np.prod(net.shape.as_list()[1:]))
        net = tf.reshape(net, [-1, features])
        w = tf.get_variable('linear/W', [features, 1], initializer=tf.truncated_normal_initializer(stddev=0.02))
        return tf.matmul(net, w)[:, 0]


def distilled_flow(phi_t, phi_s, beta):
    """phi_d = beta phi_t + (1 - beta) phi_s."""
    return beta * phi_t + (1.0 - beta) * phi_s


def gradient_penalty(critic, phi_t, phi_d, alpha=None):
    """WGAN-GP penalty on flows: mean_b (||dD/dphi_hat (phi_hat_b)||_2 - 1)^2.

    phi_hat = phi_t + a (phi_d - phi_t) with a [B] ~ U(0, 1) per sample unless ``alpha`` [B]
    is given; the gradient and its norm are taken in the critic's penalty units (``Critic.to_units``).
    The norm runs over all X*Y*Z*3 components of a sample (the critic has no cross-sample
    terms, so the gradient of sum_b D(phi_hat_b) gives each sample's own gradient).
    Returns (penalty scalar, phi_hat in voxels).
    """
    if alpha is None:
        alpha = tf.random_uniform(tf.shape(phi_t)[:1], 0.0, 1.0)
    a = tf.reshape(alpha, [-1, 1, 1, 1, 1])
    phi_hat = phi_t + a * (phi_d - phi_t)
    x_hat = critic.to_units(phi_hat)
    grad = tf.gradients(tf.reduce_sum(critic(x_hat, in_units=True)), x_hat)[0]
    norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3, 4]) + GP_EPS)
    return tf.reduce_mean(tf.square(norm - 1.0)), phi_hat


def l2_distill_loss(phi_s, phi_t):
    """mean over samples and voxels of ||phi_s - phi_t||_2^2 (voxels^2)."""
    return tf.reduce_mean(tf.reduce_sum(tf.square(phi_s - phi_t), axis=-1))


def endpoint_error(phi_s, phi_t):
    """mean over samples and voxels of ||phi_s - phi_t||_2 (voxels): the student's flow error."""
    return tf.reduce_mean(tf.sqrt(tf.reduce_sum(tf.square(phi_s - phi_t), axis=-1) + GP_EPS))


def check_teacher_net(rcn, name):
    """ValueError (one line) unless ``rcn`` is a VTN RCN: VTN cascades after the VTN affine stem."""
    affine = type(rcn.affine).__name__ if rcn.affine is not None else None
    if rcn.base_network != 'VTN' or not isinstance(rcn.affine, VTNAffineStem):
        raise ConfigError('teacher {} is not a VTN RCN (base network {}, affine stem {}); ALDK needs VTN cascades '
                         'after the VTN affine stem'.format(name, rcn.base_network, affine))


class Teacher:
    """A frozen teacher RCN (VTN affine stem + n VTN cascades) built under its own scope.

    net_args: RecursiveCascade kwargs of the teacher run (``make_net_args`` of its args.json);
    checkpoint: its train.py checkpoint prefix, whose variables live under ``stored_scope``
    ('rcn', the training Framework's scope); image_size: the image size it was trained at.
    Its variables are removed from the trainable collection, its flow is wrapped in
    tf.stop_gradient, and ``restore`` loads it through a name map {stored name: variable}.
    The constructor already refuses (ValueError, one line) a checkpoint that cannot be read or
    lacks the VTN-only variables (the affine stem's conv6_1, each cascade's pred6), so a wrong
    teacher fails before any graph is built; ``restore`` then checks every variable's shape.
    checkpoint=None gives a teacher without weights to restore (its initialisers' random
    weights; for benchmarks), whose ``restore`` raises ValueError.
    """

    def __init__(self, net_args, checkpoint, image_size, name='teacher', stored_scope='rcn'):
        self.checkpoint = checkpoint
        self.image_size = [int(s) for s in image_size]
        self.stored_scope = stored_scope
        self.net = RecursiveCascade(name, **net_args)
        check_teacher_net(self.net, checkpoint)
        if checkpoint is None:
            return
        stored = self._stored_shapes()
        signature = ['affine_stem/conv6_1/W'] + ['deform_stem_%d/pred6/W' % i for i in range(self.net.n_cascades)]
        missing = [k for k in signature if '{}/{}'.format(stored_scope, k) not in stored]
        if missing:
            raise ConfigError('teacher checkpoint {} does not fit a VTN RCN of its args.json: no {}/{}'.format(
                checkpoint, stored_scope, missing[0]))

    def _stored_shapes(self):
        try:
            return tf.train.load_checkpoint(self.checkpoint).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError) as e:
            raise ConfigError('cannot read teacher checkpoint {}: {}'.format(self.checkpoint, str(e).splitlines()[0]))

    def __call__(self, fixed, moving):
        """phi_t [B, X, Y, Z, 3] of (fixed, moving) in 0..1, without gradient."""
        first = self.net.scope_name is None
        flow = self.net(fixed, moving)['flow']
        if first:
            trainable = tf.get_collection_ref(tf.GraphKeys.TRAINABLE_VARIABLES)
            for v in self.net.variables:
                if v in trainable:
                    trainable.remove(v)
        return tf.stop_gradient(flow)

    @property
    def variables(self):
        return self.net.variables

    @property
    def parameter_count(self):
        return count_parameters(self.net.variables)

    def stored_name(self, variable):
        """Checkpoint name of a teacher variable: 'teacher/x' -> 'rcn/x'."""
        return self.stored_scope + variable.op.name[len(self.net.scope_name):]

    def restore(self, sess):
        """Load the teacher's weights; ValueError (one line) if the checkpoint does not fit."""
        if self.checkpoint is None:
            raise ConfigError('this teacher has no checkpoint to restore')
        stored = self._stored_shapes()
        mapping = {self.stored_name(v): v for v in self.variables}
        bad = [k for k, v in mapping.items() if stored.get(k) != v.shape.as_list()]
        if bad:
            raise ConfigError('teacher checkpoint {} does not fit a VTN RCN of its args.json: {} of {} variables '
                             'missing or of another shape (e.g. {})'.format(self.checkpoint, len(bad), len(mapping),
                                                                            bad[0]))
        tf.train.Saver(mapping).restore(sess, self.checkpoint)


@dataclasses.dataclass(frozen=True)
class DistillTower(Tower):
    """A Tower of DistillFramework: besides the student's loss, terms and monitors, its flows
    {'student': phi_s, 'teacher': phi_t} [b, X, Y, Z, 3] (voxels) and, for ALDK, the critic's
    [(gradient, variable)] of its loss on this tower (None for 'l2')."""
    flows: dict = None
    critic_gradients: list = None


class DistillFramework(Framework):
    """A training Framework for a student RCN distilled from a VTN teacher.

    method: 'aldk' (critic + adversarial term) or 'l2' (plain flow distillation).
    Teacher source, exactly one of: ``teacher`` (a Teacher: online, phi_t computed on the very
    (augmented) pair the student sees) or ``stored_flows=True`` (offline: phi_t fed through
    ``teacher_flow`` from a flow store; requires augment=False).
    beta, gamma, lamb: as in the module docstring; critic_every: critic update period in steps;
    critic_lr_factor: critic / student learning-rate ratio; critic_units: see Critic.

    ``tower_flows``: per tower {'student': phi_s, 'teacher': phi_t} (for inspection and tests).
    ``critic_gradients``: the critic's [(gradient, variable)] averaged over towers (ALDK).
    Optimisers: ``optimizer`` (the base Framework's Adam) on ``net.trainable_variables`` only;
    ``critic_optimizer`` on ``critic.trainable_variables`` only; the teacher is in neither.
    ``training_state`` (what a resumable checkpoint holds besides the student) is the student's
    optimiser state plus the critic and its optimiser state, never the teacher.
    """

    def __init__(self, net_args, image_size, segmentation_class_value=None, devices=('/cpu:0',),
                 augment=True, method='aldk', teacher=None, stored_flows=False, beta=DEFAULTS.beta,
                 gamma=DEFAULTS.gamma, lamb=DEFAULTS.lamb, critic_every=DEFAULTS.critic_every,
                 critic_lr_factor=DEFAULTS.critic_lr_factor, critic_units=DEFAULTS.critic_units,
                 critic_channels=CRITIC_CHANNELS, scope='rcn', affine_augment=None, augment_seed=None,
                 gamma_augment=None):
        if method not in METHODS:
            raise ConfigError('unknown distillation method {!r} (choose from {})'.format(method, ', '.join(METHODS)))
        if (teacher is None) == (not stored_flows):
            raise ConfigError('give exactly one teacher source: a Teacher (online) or stored_flows=True (offline)')
        if stored_flows and (augment or affine_augment):
            raise ConfigError('stored teacher flows belong to un-augmented pairs: turn augmentation off')
        if teacher is not None and list(teacher.image_size) != list(image_size):
            raise ConfigError('teacher image size {} differs from the student\'s {}'.format(
                'x'.join(map(str, teacher.image_size)), 'x'.join(map(str, image_size))))
        if not 0.0 <= beta <= 1.0 or not 0.0 <= gamma <= 1.0 or lamb < 0:
            raise ConfigError('need 0 <= beta <= 1, 0 <= gamma <= 1 and lamb >= 0 (got {}, {}, {})'.format(
                beta, gamma, lamb))
        if int(critic_every) < 1:
            raise ConfigError('critic_every must be >= 1, got {}'.format(critic_every))
        self.method = method
        self.teacher = teacher
        self.beta, self.gamma, self.lamb = float(beta), float(gamma), float(lamb)
        self.critic_every = int(critic_every)
        self.critic_lr_factor = float(critic_lr_factor)
        self.critic = Critic('critic', critic_channels, units=critic_units) if method == 'aldk' else None
        self.teacher_flow_feed = (tf.placeholder(tf.float32, [None] + list(image_size) + [3], name='teacher_flow')
                                  if stored_flows else None)
        super().__init__(net_args, image_size, segmentation_class_value=segmentation_class_value, devices=devices,
                         augment=augment, validation=False, scope=scope, affine_augment=affine_augment,
                         augment_seed=augment_seed, gamma_augment=gamma_augment)

    @property
    def training_state(self):
        state = self.optimizer.variables()
        if self.critic is not None:
            state = state + self.critic.variables + self.critic_optimizer.variables()
        return state

    def _build_train(self):
        """The base Framework's training graph on DistillTowers, then the critic's optimiser on
        their averaged critic gradients (ALDK). Returns the towers."""
        if self.critic is not None:
            self.critic_optimizer = tf.train.AdamOptimizer(self.learning_rate * self.critic_lr_factor,
                                                           name='CriticAdam', **CRITIC_ADAM)
        towers = super()._build_train()
        self.tower_flows = [t.flows for t in towers]
        if self.critic is not None:
            self.critic_gradients = average_gradients([t.critic_gradients for t in towers])
            self.critic_grad_norm = tf.global_norm([g for g, _ in self.critic_gradients])
            with tf.variable_scope('critic_optimizer'):  # its slots and beta powers get their own names
                self.critic_train_op = self.critic_optimizer.apply_gradients(self.critic_gradients)
        return towers

    def _tower_inputs(self):
        """Per tower (fixed, moving, stored): the base Framework's pair and, offline, this tower's
        share [b, X, Y, Z, 3] of the fed ``teacher_flow`` (None when the teacher runs online)."""
        n = len(self.devices)
        stored = tf.split(self.teacher_flow_feed, n) if self.teacher_flow_feed is not None else [None] * n
        return [pair + (flow,) for pair, flow in zip(super()._tower_inputs(), stored)]

    def _build_tower(self, fixed, moving, stored):
        """The DistillTower of one share of the batch, phi_t being ``stored`` or, online, the
        teacher's flow of (fixed, moving).

        loss gamma L_rec + (1 - gamma) L_distill, L_distill the term 'distill' (l2) or
        'adversarial' (aldk), that tower's batch mean / the number of towers (see the module
        docstring); monitors 'teacher_epe' (+ for ALDK the critic's 'critic_loss',
        'gradient_penalty' and 'wasserstein' = mean D(phi_t) - mean D(phi_d)); for ALDK the
        critic's gradients of its loss on this tower.
        """
        n = len(self.devices)
        out = self.net(fixed, moving)
        phi_s = out['flow']
        phi_t = stored if stored is not None else self.teacher(fixed, moving)
        terms = dict(out['terms'])
        monitors = {'teacher_epe': endpoint_error(phi_s, phi_t)}
        critic_gradients = None
        if self.method == 'l2':
            terms['distill'] = l2_distill_loss(phi_s, phi_t) / n
            extra = terms['distill']
        else:
            phi_d = distilled_flow(phi_t, phi_s, self.beta)
            d_d, d_t = self.critic(phi_d), self.critic(phi_t)
            terms['adversarial'] = -tf.reduce_mean(d_d) / n
            extra = terms['adversarial']
            gp, _ = gradient_penalty(self.critic, phi_t, tf.stop_gradient(phi_d))
            wasserstein = tf.reduce_mean(d_t) - tf.reduce_mean(d_d)
            critic_loss = -wasserstein + self.lamb * gp
            critic_gradients = self.critic_optimizer.compute_gradients(critic_loss, self.critic.trainable_variables)
            monitors.update({'critic_loss': critic_loss, 'gradient_penalty': gp, 'wasserstein': wasserstein})
        return DistillTower(self.gamma * out['loss'] + (1.0 - self.gamma) * extra, terms, monitors,
                            flows={'student': phi_s, 'teacher': phi_t}, critic_gradients=critic_gradients)

    def feed_dict(self, batch, **extra):
        """The base Framework's feed plus, offline, the batch's 'teacher_flow' [B, X, Y, Z, 3]."""
        fd = super().feed_dict(batch, **extra)
        if self.teacher_flow_feed is not None and 'teacher_flow' in batch:
            fd[self.teacher_flow_feed] = batch['teacher_flow']
        return fd

    def is_critic_step(self, step):
        """Whether the critic is updated at global step ``step`` (0-based): every critic_every-th."""
        return self.critic is not None and step % self.critic_every == 0

    def train_step(self, sess, batch, learning_rate, with_summary=False):
        """One training step: a critic update first when ``is_critic_step``, then a student update.

        Returns the student step's scalars (see ``student_step``).
        """
        if self.is_critic_step(int(sess.run(self.global_step))):
            self.critic_step(sess, batch, learning_rate)
        return self.student_step(sess, batch, learning_rate, with_summary)

    def student_step(self, sess, batch, learning_rate, with_summary=False):
        """One student update alone (critic and teacher untouched): the base Framework's
        ``train_step``, whose scalars include the monitors of ``_build_tower``."""
        return super().train_step(sess, batch, learning_rate, with_summary)

    def critic_step(self, sess, batch, learning_rate):
        """One critic update (student and teacher untouched). Returns floats 'critic_loss',
        'gradient_penalty', 'wasserstein', 'critic_grad_norm' measured before the update."""
        fetch = {k: self.monitors[k] for k in ('critic_loss', 'gradient_penalty', 'wasserstein')}
        fetch.update({'critic_grad_norm': self.critic_grad_norm, 'train': self.critic_train_op})
        res = sess.run(fetch, self.feed_dict(batch, learning_rate=learning_rate))
        res.pop('train')
        return {k: float(v) for k, v in res.items()}
