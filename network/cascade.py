"""Recursive cascaded networks (SPEC section 4): an affine stem, then n deformable cascades,
each repeated ``rep`` times with shared weights.

Composition: agg_k = warp(agg_{k-1}, flow_k) + flow_k and warped_k = warp(moving, agg_k).
After the affine stem the composition is taken exactly, agg = A flow + affine_flow, which is
what warp(affine_flow, flow) + flow equals for a linear field (no interpolation, no clamping).
"""
import inspect

from errors import ConfigError

from . import losses
from .layers import transform_vectors
from .module import Module
from .spatial_transformer import warp
from .subnets import AFFINE_STEMS, BASE_NETWORKS
from .tfv1 import tf

DET_FACTOR = 0.1
ORTHO_FACTOR = 0.1
REG_FACTOR = 1.0


class RecursiveCascade(Module):
    """An RCN: ``affine`` stem ('VTN', 'light' or None) + ``n_cascades`` x ``rep`` stages of
    ``base_network`` (a key of BASE_NETWORKS), each cascade's flow scaled by
    flow_multiplier / n_cascades. ``base_args`` go to the base network's constructor.

    Called on (fixed, moving) [B,X,Y,Z,1] in 0..1 it returns a dict with
    'stages': per stage {'flow', 'agg_flow', 'warped'} (+ 'W', 'b' for the affine stem),
    'flow' (the final composed flow [B,X,Y,Z,3], voxels), 'warped' (final warped moving image),
    'terms' (named scalar losses: similarity, regularization, det, ortho) and 'loss' (their sum).
    """

    def __init__(self, name='rcn', base_network='VTN', n_cascades=1, rep=1, affine='VTN',
                 flow_multiplier=1.0, warp_padding='border', base_args=None):
        super().__init__(name)
        if base_network not in BASE_NETWORKS:
            raise ConfigError('unknown base network {!r} (choose from {})'.format(
                base_network, ', '.join(BASE_NETWORKS)))
        if affine is not None and affine not in AFFINE_STEMS:
            raise ConfigError('unknown affine stem {!r} (choose from {}, or None)'.format(
                affine, ', '.join(AFFINE_STEMS)))
        if n_cascades < 1 or rep < 1:
            raise ConfigError('n_cascades and rep must be >= 1')
        self.base_network = base_network
        self.n_cascades = n_cascades
        self.rep = rep
        self.warp_padding = warp_padding
        self.affine = None if affine is None else AFFINE_STEMS[affine]('affine_stem')
        net = BASE_NETWORKS[base_network]
        self.cascades = [net('deform_stem_%d' % i, flow_multiplier=flow_multiplier / n_cascades,
                             **(base_args or {})) for i in range(n_cascades)]

    @property
    def stride(self):
        """The image size must be divisible by this."""
        stems = self.cascades + ([self.affine] if self.affine else [])
        return max(stem.stride for stem in stems)

    def _build(self, fixed, moving):
        stages = []
        terms = {}
        if self.affine is not None:
            out = self.affine(fixed, moving)
            out['agg_flow'] = out['flow']
            out['warped'] = warp(moving, out['flow'], self.warp_padding)
            stages.append(out)
            terms['det'] = DET_FACTOR * out['det_loss']
            terms['ortho'] = ORTHO_FACTOR * out['ortho_loss']
        reg = []
        for cascade in self.cascades:
            for _ in range(self.rep):
                prev = stages[-1] if stages else None
                out = cascade(fixed, prev['warped'] if prev else moving)
                out['agg_flow'] = self._compose(prev, out['flow'])
                out['warped'] = warp(moving, out['agg_flow'], self.warp_padding)
                stages.append(out)
                reg.append(losses.regularization_loss(out['flow']))
        terms['similarity'] = losses.similarity_loss(fixed, stages[-1]['warped'])
        terms['regularization'] = REG_FACTOR * tf.add_n(reg)
        return {'stages': stages, 'flow': stages[-1]['agg_flow'], 'warped': stages[-1]['warped'],
                'terms': terms, 'loss': tf.add_n(list(terms.values()))}

    def _compose(self, prev, flow):
        """Composed flow after applying ``prev`` (a stage dict or None) then ``flow``."""
        if prev is None:
            return flow
        if 'W' in prev:
            return transform_vectors(prev['W'] + tf.eye(3), flow) + prev['agg_flow']
        return warp(prev['agg_flow'], flow, self.warp_padding) + flow


DEFAULT_AFFINE = {'VTN': 'VTN', 'VoxelMorph': 'VTN', 'LDR': 'light', 'LDROriginal': 'light'}
RCN_KEYS = ('affine', 'flow_multiplier', 'warp_padding')


def make_net_args(base_network, n_cascades, rep=1, extra=None):
    """RecursiveCascade kwargs from train.py's -b/-n/-r and the --net_args dict.

    --net_args keys 'affine' ('VTN', 'light' or None; default VTN for the teacher-side bases,
    light for LDR), 'flow_multiplier' and 'warp_padding' configure the cascade; any other key
    is a constructor argument of the base network (e.g. channels=16, head='deconv').
    """
    extra = dict(extra or {})
    if base_network not in BASE_NETWORKS:
        raise ConfigError('unknown base network {!r} (choose from {})'.format(
            base_network, ', '.join(BASE_NETWORKS)))
    args = {'base_network': base_network, 'n_cascades': int(n_cascades), 'rep': int(rep),
            'affine': DEFAULT_AFFINE[base_network]}
    args.update({k: extra.pop(k) for k in RCN_KEYS if k in extra})
    if args['affine'] in ('none', 'None'):
        args['affine'] = None
    accepted = inspect.signature(BASE_NETWORKS[base_network].__init__).parameters
    unknown = [k for k in extra if k not in accepted or k in ('self', 'name')]
    if unknown:
        raise ConfigError('unknown --net_args key(s) for {}: {}'.format(base_network, ', '.join(unknown)))
    args['base_args'] = extra
    return args
