"""The subnets of SPEC section 3. Each is a ``Module``: it owns a variable scope.

Deformable subnets map (fixed, moving) [B,X,Y,Z,1] each (0..1) to {'flow': [B,X,Y,Z,3]} in
voxels. Affine stems also return 'W' [B,3,3], 'b' [B,3], 'det_loss', 'ortho_loss'.
Each builder needs X, Y, Z divisible by its ``stride`` attribute.
"""
from errors import ConfigError

from . import losses
from .layers import conv3d, conv3d_transpose, stack_channels, upsample_linear2, upsample_nearest
from .module import Module
from .tfv1 import tf


def check_size(network, image):
    """Raise ValueError when image's spatial size is not divisible by the network's stride."""
    sizes = image.shape.as_list()[1:4]
    if any(s % network.stride for s in sizes):
        raise ConfigError('image size {} is not divisible by {} (stride of {})'.format(
            'x'.join(map(str, sizes)), network.stride, type(network).__name__))


class DeformableNet(Module):
    """Base of deformable subnets: checks the size, concatenates the pair, scales the flow."""
    stride = 1

    def __init__(self, name, flow_multiplier=1.0):
        super().__init__(name)
        self.flow_multiplier = flow_multiplier

    def _build(self, fixed, moving):
        check_size(self, fixed)
        return {'flow': self._flow(stack_channels(fixed, moving)) * self.flow_multiplier}

    def _flow(self, pair):
        raise NotImplementedError


class VTN(DeformableNet):
    """VTN deformable subnet (teacher): 10-conv encoder, FlowNet-style decoder; x20 output."""
    stride = 64

    def __init__(self, name, flow_multiplier=1.0, channels=16):
        super().__init__(name, flow_multiplier)
        self.channels = channels

    def _flow(self, pair):
        c = self.channels
        skips = vtn_encoder(pair, c)
        net = skips.pop()
        pred = conv3d('pred6', net, 3, 3)
        for level in range(5, 0, -1):
            skip = skips.pop()
            up_pred = conv3d_transpose('upsamp%dto%d' % (level + 1, level), pred, 3, 4, 2)
            up_feat = conv3d_transpose('deconv%d' % level, net, int(skip.shape[-1]), 4, 2,
                                       activation='leaky_relu')
            net = tf.concat([skip, up_feat, up_pred], axis=4)
            if level > 1:
                pred = conv3d('pred%d' % level, net, 3, 3)
        return conv3d_transpose('upsamp1to0', net, 3, 4, 2) * 20.0


def vtn_encoder(x, c=16):
    """VTN encoder: 3x3x3 LeakyReLU(0.1) convs; returns the six level outputs (strides 2..64).

    Channels: c, 2c, 4c, 8c, 16c, 32c at levels 1..6 (levels 3..6 have an extra stride-1 conv).
    """
    outs = [conv3d('conv1', x, c, 3, 2, 'leaky_relu')]
    outs.append(conv3d('conv2', outs[-1], 2 * c, 3, 2, 'leaky_relu'))
    for level, width in zip(range(3, 7), (4 * c, 8 * c, 16 * c, 32 * c)):
        net = conv3d('conv%d' % level, outs[-1], width, 3, 2, 'leaky_relu')
        outs.append(conv3d('conv%d_1' % level, net, width, 3, 1, 'leaky_relu'))
    return outs


class VoxelMorph(DeformableNet):
    """VoxelMorph base network as RCN uses it: encoder [16,32,32,32], decoder [32,32,32,32,32,16,16]."""
    stride = 16

    def __init__(self, name, flow_multiplier=1.0, encoders=(16, 32, 32, 32),
                 decoders=(32, 32, 32, 32, 32, 16, 16)):
        super().__init__(name, flow_multiplier)
        self.encoders = encoders
        self.decoders = decoders

    def _flow(self, pair):
        return unet_flow(pair, self.encoders, self.decoders)


class LDROriginal(VoxelMorph):
    """The original code's LDR: the same UNet with encoder [32,32,32,16] and decoder [32,32,32,32,16,16,16]."""

    def __init__(self, name, flow_multiplier=1.0):
        super().__init__(name, flow_multiplier, (32, 32, 32, 16), (32, 32, 32, 32, 16, 16, 16))


def unet_flow(pair, encoders, decoders):
    """VoxelMorph-style UNet: 4 stride-2 3x3x3 convs, 3x3x3 decoder convs with nearest x2
    upsampling and skip concatenation, a final 3-channel conv initialised N(0, 1e-5)."""
    skips = [pair]
    for i, width in enumerate(encoders):
        skips.append(conv3d('conv%d' % (i + 1), skips[-1], width, 3, 2, 'leaky_relu'))
    net = skips.pop()
    names = ['decode4', 'decode3', 'decode2', 'decode1', 'decode1_1', 'decode0', 'decode0_1']
    for name, width in zip(names, decoders):
        net = conv3d(name, net, width, 3, 1, 'leaky_relu')
        if name in ('decode4', 'decode3', 'decode2', 'decode1_1'):
            net = tf.concat([upsample_nearest(net), skips.pop()], axis=4)
    return conv3d('flow', net, 3, 3, init_stddev=1e-5)


class LDR(DeformableNet):
    """LDR as the paper describes it: four 4x4x4 stride-2 ReLU convs (16, 32, 64, 128), three
    4x4x4 stride-2 transposed convs back up, each followed by a skip concatenation.

    Head (our design, ``head``), from the half-resolution features (2c channels):
      'refine': a fourth transposed conv to full resolution (c channels, ReLU), concatenated
          with the input pair, then a 3x3x3 conv to the flow;
      'deconv': a single linear 4x4x4 stride-2 transposed conv to the flow;
      'upsample' (default): a 3x3x3 conv to the flow at half resolution (in half-resolution
          voxels), upsampled linearly by 2 (and its displacements doubled).
    'upsample' is the default: it is the cheapest of the three and registered best in our
    comparison; 'refine' is the dearest, its full-resolution transposed conv dominating the
    network (README, performance section: the comparison and the timings).
    """
    stride = 16
    HEADS = ('refine', 'deconv', 'upsample')

    def __init__(self, name, flow_multiplier=1.0, channels=16, head='upsample'):
        super().__init__(name, flow_multiplier)
        if head not in self.HEADS:
            raise ConfigError('unknown LDR head {!r} (choose from {})'.format(head, ', '.join(self.HEADS)))
        self.channels = channels
        self.head = head

    def _flow(self, pair):
        c = self.channels
        skips = [pair]
        for i, width in enumerate((c, 2 * c, 4 * c, 8 * c)):
            skips.append(conv3d('conv%d' % (i + 1), skips[-1], width, 4, 2, 'relu'))
        net = skips.pop()
        for i in range(3):
            skip = skips.pop()
            net = conv3d_transpose('deconv%d' % (3 - i), net, int(skip.shape[-1]), 4, 2, 'relu', bias=True)
            net = tf.concat([net, skip], axis=4)
        if self.head == 'deconv':
            return conv3d_transpose('flow', net, 3, 4, 2, init_stddev=1e-5)
        if self.head == 'upsample':
            # Doubled (to full-resolution voxels) before upsampling: exact in float, 8x fewer values.
            return upsample_linear2(2.0 * conv3d('flow', net, 3, 3, init_stddev=1e-5))
        net = conv3d_transpose('deconv0', net, c, 4, 2, 'relu', bias=True)
        net = tf.concat([net, skips.pop()], axis=4)
        return conv3d('flow', net, 3, 3, init_stddev=1e-5)


def affine_flow(W, b, sizes):
    """Dense flow of an affine map: flow(p) = W (p - c) + b, c = (n - 1) / 2 per axis.

    W [B,3,3], b [B,3], sizes (X, Y, Z) -> [B, X, Y, Z, 3] in voxels. Built without a grid of
    positions, as one batched matmul [B, XY, 4] x [B, 4, 3Z]: row (x, y) holds
    W[:, 0] x + W[:, 1] y + b and a 1; column (z, i) picks component i and adds W[i, 2] z.
    """
    X, Y, Z = sizes
    x, y, z = [tf.range(n, dtype=tf.float32) - (n - 1) / 2.0 for n in sizes]
    batch = tf.shape(W)[0]
    in_plane = (x[None, :, None, None] * W[:, None, None, :, 0] + b[:, None, None, :]
                + y[None, None, :, None] * W[:, None, None, :, 1])  # [B, X, Y, 3]
    rows = tf.concat([tf.reshape(in_plane, [batch, X * Y, 3]), tf.ones([batch, X * Y, 1])], 2)
    pick = tf.tile(tf.eye(3)[None], [batch, 1, Z])  # [B, 3, 3Z]
    along_z = tf.reshape(z[None, :, None] * W[:, None, :, 2], [batch, 1, 3 * Z])
    columns = tf.concat([pick, along_z], 1)  # [B, 4, 3Z]
    return tf.reshape(tf.matmul(rows, columns), [batch, X, Y, Z, 3])


class AffineStem(Module):
    """Base of affine stems: features -> 'valid' convs to W (9) and b (3), no bias; losses."""

    def __init__(self, name, flow_multiplier=1.0):
        super().__init__(name)
        self.flow_multiplier = flow_multiplier

    def _build(self, fixed, moving):
        check_size(self, fixed)
        net = self._features(stack_channels(fixed, moving))
        kernel = net.shape.as_list()[1:4]
        W = tf.reshape(conv3d('conv7_W', net, 9, kernel, padding='VALID', bias=False), [-1, 3, 3])
        b = tf.reshape(conv3d('conv7_b', net, 3, kernel, padding='VALID', bias=False), [-1, 3])
        W, b = W * self.flow_multiplier, b * self.flow_multiplier
        A = W + tf.eye(3)
        return {'flow': affine_flow(W, b, fixed.shape.as_list()[1:4]), 'W': W, 'b': b,
                'det_loss': losses.det_loss(A), 'ortho_loss': losses.ortho_loss(A)}

    def _features(self, pair):
        raise NotImplementedError


class VTNAffineStem(AffineStem):
    """VTN affine stem: the VTN encoder (16..512 channels) then the W/b heads."""
    stride = 64

    def _features(self, pair):
        return vtn_encoder(pair)[-1]


class LightAffineStem(AffineStem):
    """Student's light affine stem: four 3x3x3 stride-2 convs 16..128, a 3x3x3 stride-2 'valid'
    average pool, then the W/b heads. Needs a size divisible by 16 and at least 48."""
    stride = 16

    def _features(self, pair):
        net = pair
        for i, width in enumerate((16, 32, 64, 128)):
            net = conv3d('conv%d' % (i + 1), net, width, 3, 2, 'leaky_relu')
        if min(net.shape.as_list()[1:4]) < 3:
            raise ConfigError('LightAffineStem needs an image size of at least 48')
        return tf.nn.avg_pool3d(net, [1, 3, 3, 3, 1], [1, 2, 2, 2, 1], 'VALID')


BASE_NETWORKS = {'VTN': VTN, 'VoxelMorph': VoxelMorph, 'LDR': LDR, 'LDROriginal': LDROriginal}
AFFINE_STEMS = {'VTN': VTNAffineStem, 'light': LightAffineStem}
