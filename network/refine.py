"""Instance optimisation (SPEC section 10): a few Adam steps on one pair after the network.

The network runs once; then a residual displacement r, held on a grid coarser than the image by
``factor`` (a power of 2), is optimised for the pair on that coarse grid: the images are averaged
down by ``factor`` (so an iteration costs ~1/factor^3 of one at full resolution), the network's
flow likewise (and divided by factor: coarse voxels), and

    flow_c = net_c + r                                (default)
    flow_c = phi + warp(net_c, phi),  phi = exp(r)    (diffeomorphic: r is a stationary velocity,
                                                       integrated by scaling and squaring, composed
                                                       with the network's flow as cascades are)

minimises 1 - mean LNCC(fixed_c, warp(moving_c, flow_c)) + weight * diffusion(r). r starts at 0,
so the first iterate is the network's own flow. The result at full resolution is the network's
flow plus factor * up(r) (diffeomorphic: the composition with factor * up(phi)), up = linear
upsampling. Everything is in voxels, images in 0..1, [B, X, Y, Z, C] like the rest of network/.

LNCC over a cubic window of w voxels: the windowed sums S(a) of F, W, F^2, W^2 and F W (box sums
by cumulative sums along each axis, zeros outside the volume) give cross = S(FW) - S(F) S(W) / n,
var_F = S(F^2) - S(F)^2 / n, var_W likewise (n = w^3), and cc = cross^2 / (var_F var_W + eps).
Diffusion: the mean of the squared forward differences of the field along the three axes.
"""
import time

import numpy as np

from errors import ConfigError

from .layers import upsample_linear2
from .refine_config import RefineSettings
from .spatial_transformer import warp
from .tfv1 import tf

LNCC_EPS = 1e-5
DEFAULTS = RefineSettings()


def box_sum(x, width):
    """Sums over a cube of ``width`` (odd) voxels centred on each voxel, zeros outside.

    x [B, X, Y, Z, C] -> same shape; one cumulative sum and one difference per axis."""
    half = width // 2
    for axis in (1, 2, 3):
        n = x.shape.as_list()[axis]
        pad = [[0, 0]] * 5
        pad[axis] = [half + 1, half]
        total = tf.cumsum(tf.pad(x, pad), axis=axis)
        begin, size = [0] * 5, [-1] * 5
        begin[axis], size[axis] = 2 * half + 1, n
        upper = tf.slice(total, begin, size)
        begin[axis] = 0
        x = upper - tf.slice(total, begin, size)
    return x


def lncc(fixed, warped, width=DEFAULTS.window, eps=LNCC_EPS):
    """Mean local normalised cross-correlation cc in [0, 1] per sample: [B, X, Y, Z, 1] x 2 -> [B]."""
    n = float(width ** 3)
    sums = box_sum(tf.concat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], -1), width)
    s_f, s_w, s_ff, s_ww, s_fw = tf.unstack(sums, axis=-1)
    cross = s_fw - s_f * s_w / n
    var_f = s_ff - s_f * s_f / n
    var_w = s_ww - s_w * s_w / n
    cc = cross * cross / (var_f * var_w + eps)
    return tf.reduce_mean(cc, axis=[1, 2, 3])


def diffusion(field):
    """Mean squared forward difference of a field [B, X, Y, Z, C] along the three axes -> [B]."""
    terms = []
    for axis in (1, 2, 3):
        n = field.shape.as_list()[axis]
        begin, size = [0] * 5, [-1] * 5
        size[axis] = n - 1
        low = tf.slice(field, begin, size)
        begin[axis] = 1
        terms.append(tf.reduce_mean(tf.square(tf.slice(field, begin, size) - low), axis=[1, 2, 3, 4]))
    return tf.add_n(terms) / 3.0


def integrate_velocity(velocity, squarings=DEFAULTS.squarings):
    """exp(v) by scaling and squaring: u = v / 2^K, then K times u <- u + warp(u, u).
    [B, X, Y, Z, 3] voxels -> the displacement of the flow at time 1 (exactly v for a constant v)."""
    u = velocity / float(2 ** squarings)
    for _ in range(squarings):
        u = u + warp(u, u)
    return u


def upsample(field, factor):
    """Linear upsampling by a power of 2 (``factor`` 1 leaves the field as it is)."""
    while factor > 1:
        field = upsample_linear2(field)
        factor //= 2
    return field


def downsample(volume, factor):
    """Means over blocks of factor^3 voxels: [B, X, Y, Z, C] -> [B, X/f, Y/f, Z/f, C]."""
    if factor == 1:
        return volume
    window = [1, factor, factor, factor, 1]
    return tf.nn.avg_pool3d(volume, window, window, 'VALID')


class Refiner:
    """The refinement graph for one image size and `RefineSettings`, in a graph of its own;
    ``refine`` runs it on a pair."""

    def __init__(self, image_size, factor=DEFAULTS.factor, window=DEFAULTS.window, weight=DEFAULTS.weight,
                 learning_rate=DEFAULTS.learning_rate, diffeomorphic=DEFAULTS.diffeomorphic,
                 squarings=DEFAULTS.squarings, threads=None):
        size = [int(s) for s in image_size]
        if factor < 1 or factor & (factor - 1) or any(s % factor for s in size):
            raise ConfigError('refinement factor {} must be a power of 2 dividing the image size {}'.format(
                factor, 'x'.join(map(str, size))))
        if window < 3 or window % 2 == 0:
            raise ConfigError('LNCC window {} must be odd and at least 3'.format(window))
        self.settings = {'factor': factor, 'window': window, 'weight': weight, 'learning_rate': learning_rate,
                         'diffeomorphic': diffeomorphic, 'squarings': squarings if diffeomorphic else None}
        self.graph = tf.Graph()
        with self.graph.as_default():
            shape = [1] + size
            self.fixed = tf.placeholder(tf.float32, shape + [1], name='fixed')
            self.moving = tf.placeholder(tf.float32, shape + [1], name='moving')
            self.network_flow = tf.placeholder(tf.float32, shape + [3], name='network_flow')
            coarse = [1] + [s // factor for s in size] + [3]
            self.residual = tf.Variable(tf.zeros(coarse), name='residual')
            network_coarse = downsample(self.network_flow, factor) / float(factor)
            if diffeomorphic:
                phi = integrate_velocity(self.residual, squarings)
                flow_coarse = phi + warp(network_coarse, phi)
                phi_full = upsample(phi, factor) * float(factor)
                self.flow = phi_full + warp(self.network_flow, phi_full)
            else:
                flow_coarse = network_coarse + self.residual
                self.flow = self.network_flow + upsample(self.residual, factor) * float(factor)
            warped = warp(downsample(self.moving, factor), flow_coarse)
            self.similarity = 1.0 - lncc(downsample(self.fixed, factor), warped, window)[0]
            self.loss = self.similarity + weight * diffusion(self.residual)[0]
            optimizer = tf.train.AdamOptimizer(learning_rate)
            self.step = optimizer.minimize(self.loss, var_list=[self.residual])
            self.reset = tf.variables_initializer([self.residual] + optimizer.variables())
            config = tf.ConfigProto(intra_op_parallelism_threads=threads or 0,
                                    inter_op_parallelism_threads=threads or 0)
            self.session = tf.Session(graph=self.graph, config=config)

    def refine(self, fixed, moving, network_flow, iterations, progress=None):
        """Refine a network flow on one pair.

        fixed, moving: [N, N, N] in 0..255 (the preprocessed volumes); network_flow: [N, N, N, 3]
        voxels. Returns (flow [N, N, N, 3] float32, record): record holds the iterations, the loss
        and similarity before and after, and the seconds per iteration. progress(i) is called
        after each iteration.
        """
        feed = {self.fixed: np.asarray(fixed, np.float32)[None, ..., None] / 255.0,
                self.moving: np.asarray(moving, np.float32)[None, ..., None] / 255.0,
                self.network_flow: np.asarray(network_flow, np.float32)[None]}
        self.session.run(self.reset)
        before = self.session.run([self.loss, self.similarity], feed)
        start = time.perf_counter()
        for i in range(iterations):
            self.session.run(self.step, feed)
            if progress:
                progress(i + 1)
        seconds = time.perf_counter() - start
        flow, loss, similarity = self.session.run([self.flow, self.loss, self.similarity], feed)
        record = dict(self.settings, iterations=iterations, loss_before=float(before[0]), loss=float(loss),
                      similarity_before=float(before[1]), similarity=float(similarity),
                      seconds=seconds, seconds_per_iteration=seconds / iterations if iterations else 0.0)
        return flow[0], record
