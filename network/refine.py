"""Instance optimisation (SPEC section 10): a few Adam steps on one pair after the network.

The network runs once; then a residual displacement r, held on a grid coarser than the image by
``factor`` (a power of 2) and upsampled linearly, is added to the network's composed flow and
optimised for the pair:

    flow = network_flow + up(r)                      (default)
    flow = phi + warp(network_flow, phi),  phi = exp(up(r))   (diffeomorphic: r is a stationary
                                                      velocity, integrated by scaling and squaring,
                                                      composed with the network's flow as cascades are)

minimising 1 - mean LNCC(fixed, warp(moving, flow)) + weight * diffusion(up(r)). r starts at 0,
so the first iterate is the network's own flow. Everything is in voxels of the fixed grid, images
in 0..1, [B, X, Y, Z, C] like the rest of network/.

LNCC over a cubic window of w voxels: the windowed sums S(a) of F, W, F^2, W^2 and F W (box sums
by cumulative sums along each axis, zeros outside the volume) give cross = S(FW) - S(F) S(W) / n,
var_F = S(F^2) - S(F)^2 / n, var_W likewise (n = w^3), and cc = cross^2 / (var_F var_W + eps).
Diffusion: the mean of the squared forward differences of the field along the three axes.
"""
import time

import numpy as np

from .layers import upsample_linear2
from .spatial_transformer import warp
from .tfv1 import tf

DEFAULT_ITERATIONS = 50
DEFAULT_FACTOR = 2
DEFAULT_WINDOW = 7
DEFAULT_WEIGHT = 1.0
DEFAULT_LEARNING_RATE = 0.2
DEFAULT_SQUARINGS = 7
LNCC_EPS = 1e-5


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


def lncc(fixed, warped, width=DEFAULT_WINDOW, eps=LNCC_EPS):
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


def integrate_velocity(velocity, squarings=DEFAULT_SQUARINGS):
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


class Refiner:
    """The refinement graph for one image size and setting, in a graph of its own; ``refine``
    runs it on a pair. factor: coarse-grid factor (1, 2, 4, ...); window: LNCC width (odd);
    weight: diffusion weight; learning_rate: Adam's, in voxels."""

    def __init__(self, image_size, factor=DEFAULT_FACTOR, window=DEFAULT_WINDOW, weight=DEFAULT_WEIGHT,
                 learning_rate=DEFAULT_LEARNING_RATE, diffeomorphic=False, squarings=DEFAULT_SQUARINGS,
                 threads=None):
        size = [int(s) for s in image_size]
        if factor < 1 or factor & (factor - 1) or any(s % factor for s in size):
            raise ValueError('refinement factor {} must be a power of 2 dividing the image size {}'.format(
                factor, 'x'.join(map(str, size))))
        if window < 3 or window % 2 == 0:
            raise ValueError('LNCC window {} must be odd and at least 3'.format(window))
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
            field = upsample(self.residual, factor)
            if diffeomorphic:
                phi = integrate_velocity(field, squarings)
                self.flow = phi + warp(self.network_flow, phi)
            else:
                self.flow = self.network_flow + field
            warped = warp(self.moving, self.flow)
            self.similarity = 1.0 - lncc(self.fixed, warped, window)[0]
            self.loss = self.similarity + weight * diffusion(field)[0]
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
