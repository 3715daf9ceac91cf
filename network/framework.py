"""The training / evaluation graph around an RCN: placeholders, towers, optimiser, metrics.

Feeds (names as the original's): 'voxel1' (FIXED) and 'voxel2' (MOVING) [B,X,Y,Z,1] in 0..255,
'seg1', 'seg2' [B,X,Y,Z,1] (0/255 masks or label values), 'point1', 'point2' [B,K,3] (voxels,
-1 = missing), 'learningRate' scalar. The network sees images / 255.

Each tower (a device and its share of the batch) is built by ``_build_tower``, which returns
its pieces as a ``Tower``; ``_build_train`` combines them across towers. Subclasses extend
training by overriding ``_tower_inputs`` (more per-tower inputs), ``_build_tower`` (a Tower
with more terms, monitors or pieces of their own), ``_build_train`` (combining those pieces)
and ``train_step`` (extra optimisers around the network's step); ALDK does all four.
"""
import dataclasses

import numpy as np

from errors import ConfigError

from . import metrics
from .augment import augment_moving, random_gamma
from .cascade import RecursiveCascade
from .module import count_parameters
from .tfv1 import tf

FEEDS = ('voxel1', 'voxel2', 'seg1', 'seg2', 'point1', 'point2')


def session_config(devices, threads=None):
    """ConfigProto with enough logical CPU devices for CPU towers; ``threads`` caps both pools."""
    n_cpu = max([int(d.split(':')[1]) + 1 for d in devices if d.startswith('/cpu')] + [1])
    config = tf.ConfigProto(device_count={'CPU': n_cpu}, allow_soft_placement=False)
    config.gpu_options.allow_growth = True
    if threads:
        config.intra_op_parallelism_threads = threads
        config.inter_op_parallelism_threads = threads
    return config


@dataclasses.dataclass(frozen=True)
class Tower:
    """One tower's part of the training graph, built on its share of the batch.

    loss: the scalar tower loss its gradients are taken of; the towers' losses sum to the
    batch loss. terms: {name: scalar} the named parts of ``loss``, summed over towers like it.
    monitors: {name: scalar} quantities that are only watched, averaged over towers.
    """
    loss: tf.Tensor
    terms: dict
    monitors: dict = dataclasses.field(default_factory=dict)


class Framework:
    """Builds one RCN into the default graph for training (``validation=False``) and evaluation.

    net_args: keyword arguments of ``RecursiveCascade``; image_size: [X, Y, Z];
    segmentation_class_value: {name: value} or None (binary 0/255 masks);
    devices: tower devices (the batch is split evenly across them); augment: random B-spline
    deformation of the moving image during training; affine_augment: an
    ``augment.AffineRange`` adding a random affine map to it, or None; gamma_augment: the
    largest contrast power G of ``augment.random_gamma``, applied to the fixed and to the
    moving image, each with its own draw, or None; augment_seed: an int
    making the augmentation a function of (augment_seed, global step), so that a resumed run
    draws what the uninterrupted one would have drawn (None: TensorFlow's stateful draws).

    Training graph: ``loss`` and ``terms`` (summed over towers), ``monitors`` (averaged),
    ``gradients`` (the towers' [(gradient, variable)] averaged: with n towers 1/n of one
    device's gradient of ``loss``, the RCN losses being sums over the batch), ``grad_norm``,
    ``train_op`` and ``summary``.
    """

    def __init__(self, net_args, image_size, segmentation_class_value=None, devices=('/cpu:0',),
                 augment=True, validation=False, scope='rcn', affine_augment=None, augment_seed=None,
                 gamma_augment=None):
        self.image_size = list(image_size)
        self.devices = list(devices)
        self.class_names = list(segmentation_class_value) if segmentation_class_value else None
        self.class_values = list(segmentation_class_value.values()) if segmentation_class_value else None
        self.augment = augment
        self.affine_augment = affine_augment
        self.gamma_augment = gamma_augment
        self.augment_seed = augment_seed
        self.net = RecursiveCascade(scope, **net_args)
        if any(s % self.net.stride for s in self.image_size):
            raise ConfigError('image size {} is not divisible by {}, the stride of this network'.format(
                'x'.join(map(str, self.image_size)), self.net.stride))
        shape = [None] + self.image_size + [1]
        self.feeds = {k: tf.placeholder(tf.float32, shape, name=k) for k in FEEDS[:4]}
        self.feeds.update({k: tf.placeholder(tf.float32, [None, None, 3], name=k) for k in FEEDS[4:]})
        self.learning_rate = tf.placeholder(tf.float32, [], name='learningRate')
        self.global_step = tf.train.get_or_create_global_step()
        with tf.device(self.devices[0]):
            self.outputs = self._build_eval()
        if not validation:
            self._build_train()

    @property
    def trainable_variables(self):
        return self.net.trainable_variables

    @property
    def parameter_count(self):
        """Parameters of the registration network alone (what inference needs)."""
        return count_parameters(self.net.trainable_variables)

    @property
    def training_state(self):
        """Variables a resumable checkpoint holds besides the network and the global step:
        the optimiser's (subclasses add theirs, e.g. ALDK's critic)."""
        return self.optimizer.variables()

    def _build_eval(self):
        """Un-augmented forward pass and metrics on the whole fed batch."""
        f = self.feeds
        out = self.net(f['voxel1'] / 255.0, f['voxel2'] / 255.0)
        flow = out['flow']
        dice, jacc = metrics.segmentation_overlap(f['seg1'], f['seg2'], flow, self.class_values)
        jac_std, folding = metrics.jacobian_stats(flow)
        return {'flow': flow, 'warped': out['warped'] * 255.0, 'loss': out['loss'],
                'dices': dice, 'jaccs': jacc,
                'landmark_dists': metrics.landmark_distances(f['point1'], f['point2'], flow),
                'jacobian_det': jac_std, 'folding': folding,
                'terms': out['terms'], 'stages': out['stages']}

    def _tower_inputs(self):
        """Per tower the arguments of ``_build_tower``: (fixed, moving) [b, X, Y, Z, 1] in 0..1,
        the moving one deformed and both given another contrast when enabled."""
        n = len(self.devices)
        fixed = tf.split(self.feeds['voxel1'] / 255.0, n)
        moving = tf.split(self.feeds['voxel2'] / 255.0, n)
        seg = tf.split(self.feeds['seg2'], n)
        pts = tf.split(self.feeds['point2'], n)
        towers = []
        for i in range(n):
            f, m = fixed[i], moving[i]
            key = None
            if self.augment_seed is not None:
                key = tf.stack([tf.constant(self.augment_seed, tf.int64),
                                tf.cast(self.global_step, tf.int64) * 64 + 8 * i])
            with tf.device(self.devices[i]):
                if self.augment:
                    m, _, _ = augment_moving(m, seg[i], pts[i], self.affine_augment, key=key)
                if self.gamma_augment:
                    f = random_gamma(f, self.gamma_augment, key=key, draw=4)
                    m = random_gamma(m, self.gamma_augment, key=key, draw=5)
            towers.append((f, m))
        return towers

    def _build_tower(self, fixed, moving):
        """The Tower of one share of the batch: the RCN's loss (summed over its pairs) and terms."""
        out = self.net(fixed, moving)
        return Tower(out['loss'], dict(out['terms']))

    def _build_train(self):
        """Towers and their combination: the summed loss and terms, the averaged monitors, Adam
        on the RCN's variables with the towers' gradients averaged (``gradients``), summaries.
        Returns the towers (for subclasses to combine what their towers add)."""
        self.optimizer = tf.train.AdamOptimizer(self.learning_rate)
        towers, tower_grads = [], []
        for i, inputs in enumerate(self._tower_inputs()):
            with tf.device(self.devices[i]), tf.name_scope('tower%d' % i):
                towers.append(self._build_tower(*inputs))
                tower_grads.append(self.optimizer.compute_gradients(towers[-1].loss, self.trainable_variables))
        self.gradients = average_gradients(tower_grads)
        self.loss = tf.add_n([t.loss for t in towers])
        self.terms = {k: tf.add_n([t.terms[k] for t in towers]) for k in towers[0].terms}
        self.monitors = {k: tf.add_n([t.monitors[k] for t in towers]) / len(towers) for k in towers[0].monitors}
        self.grad_norm = tf.global_norm([g for g, _ in self.gradients])
        with tf.control_dependencies(tf.get_collection(tf.GraphKeys.UPDATE_OPS)):
            self.train_op = self.optimizer.apply_gradients(self.gradients, global_step=self.global_step)
        scalars = [tf.summary.scalar('loss', self.loss), tf.summary.scalar('grad_norm', self.grad_norm)]
        scalars += [tf.summary.scalar('loss_' + k, v) for k, v in self.terms.items()]
        scalars += [tf.summary.scalar(k, v) for k, v in self.monitors.items()]
        self.summary = tf.summary.merge(scalars)
        return towers

    def feed_dict(self, batch, **extra):
        """Placeholder feed from a data batch (dict of arrays keyed as FEEDS) plus named extras."""
        fd = {self.feeds[k]: batch[k] for k in FEEDS if k in batch}
        if 'learning_rate' in extra:
            fd[self.learning_rate] = extra['learning_rate']
        return fd

    def train_step(self, sess, batch, learning_rate, with_summary=False):
        """One step of ``optimizer`` (the network's), fed by ``feed_dict``. Returns floats 'loss',
        'grad_norm', the terms and the monitors, all measured before the update; ['summary']."""
        fetch = {'loss': self.loss, 'grad_norm': self.grad_norm, 'terms': self.terms, 'monitors': self.monitors,
                 'train': self.train_op}
        if with_summary:
            fetch['summary'] = self.summary
        res = sess.run(fetch, self.feed_dict(batch, learning_rate=learning_rate))
        scalars = {'loss': float(res['loss']), 'grad_norm': float(res['grad_norm'])}
        scalars.update({k: float(v) for k, v in res['terms'].items()})
        scalars.update({k: float(v) for k, v in res['monitors'].items()})
        if with_summary:
            scalars['summary'] = res['summary']
        return scalars

    def register(self, sess, batch):
        """Final composed flow [B,X,Y,Z,3] (voxels) of a batch: the network alone, for timing."""
        return sess.run(self.outputs['flow'], self.feed_dict(batch))

    def evaluate_batch(self, sess, batch, keys=('dices', 'jaccs', 'landmark_dists', 'jacobian_det', 'folding'),
                       flow=None):
        """Metrics of one batch as NumPy arrays keyed like ``self.outputs``.

        With ``flow`` (from ``register``) the network is not run again: the flow is fed.
        """
        fd = self.feed_dict(batch)
        if flow is not None:
            fd[self.outputs['flow']] = flow
        return sess.run({k: self.outputs[k] for k in keys}, fd)

    def validate(self, sess, generator):
        """Mean metrics over a finite generator of batches (NaNs ignored)."""
        acc = {'dice': [], 'jacc': [], 'landmark_dist': [], 'jacobian_det': [], 'folding': []}
        for batch in generator:
            res = self.evaluate_batch(sess, batch)
            acc['dice'].extend(np.nanmean(res['dices'], axis=1))
            acc['jacc'].extend(np.nanmean(res['jaccs'], axis=1))
            acc['landmark_dist'].extend(_nanmean_rows(res['landmark_dists']))
            acc['jacobian_det'].extend(res['jacobian_det'])
            acc['folding'].extend(res['folding'])
        return {k: float(np.nanmean(v)) if len(v) and not np.all(np.isnan(v)) else float('nan')
                for k, v in acc.items()}


def _nanmean_rows(a):
    """Row means ignoring NaN; NaN for all-NaN rows (no warnings)."""
    a = np.asarray(a, np.float64)
    count = np.sum(~np.isnan(a), axis=1)
    total = np.nansum(a, axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def average_gradients(tower_grads):
    """Average per-variable gradients over towers: list of [(grad, var)] -> [(grad, var)]."""
    if len(tower_grads) == 1:
        return tower_grads[0]
    out = []
    for pairs in zip(*tower_grads):
        grads = [g for g, _ in pairs if g is not None]
        out.append((tf.add_n(grads) / len(grads) if grads else None, pairs[0][1]))
    return out
