"""Deployment export of a registration network: a frozen inference graph, and running one.

An export is a directory holding two files:

- ``model.pb``: a binary TensorFlow GraphDef with every variable folded into a constant
  (``tf.graph_util.convert_variables_to_constants``), pruned to what the flow needs, with
  device placements cleared. Inputs: placeholders ``voxel1:0`` (FIXED) and ``voxel2:0``
  (MOVING), float32 [B, N, N, N, 1] in 0..255 (the preprocessed uint8 volumes); output
  ``flow:0``, float32 [B, N, N, N, 3]: the final composed flow in voxels of the fixed grid,
  channel k along array axis k, warped(p) = moving(p + flow(p)) (SPEC section 2).
- ``export.json``: what a user needs to feed it: format, tensor names, image_size, the
  network (base network, cascades, repeats, net_args, parameter count), the warp
  implementation inside the graph, the source checkpoint and the TensorFlow version.

Warp: the graph contains the trilinear warps of the cascade. With warp 'tf' (the default of
predict.py --export) they are plain TensorFlow ops and the export imports into a stock
TensorFlow (the version recorded in export.json, or a newer one). With warp 'op' they are the project's compiled ``LdrWarp`` op:
faster on CPU, but importing the graph needs that op library loaded first, which
`FrozenModel` does through ``network.ops`` (and fails with a clear error where it cannot be
built). Running an export needs nothing else of the project: no network definitions, no
checkpoint, no training code. TensorFlow is imported on first use, so that `is_export` and
`read_meta` answer at once.
"""
import json
import os

import numpy as np
from google.protobuf.message import DecodeError

from errors import UserError

GRAPH_FILE = 'model.pb'
META_FILE = 'export.json'
FORMAT = 'frozen_graphdef'
INPUT_NAMES = {'fixed': 'voxel1:0', 'moving': 'voxel2:0'}
OUTPUT_NAME = 'flow:0'
WARPS = ('tf', 'op')


class ExportError(UserError):
    """An export directory that cannot be written or used; the message is one line."""


def is_export(path):
    """True when ``path`` is a directory holding an export (its export.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


def freeze(sess, flow):
    """The frozen GraphDef computing ``flow`` (a tensor of ``sess.graph``) from its inputs.

    A tf.identity named 'flow' is added to the session's graph so the output has a stable
    name; variables become constants holding their current values in ``sess``; nodes the flow
    does not need (metrics, losses, optimiser) are pruned; device fields are cleared.
    """
    from .tfv1 import tf
    with sess.graph.as_default():
        tf.identity(flow, name=OUTPUT_NAME.split(':')[0])
    graph_def = tf.graph_util.convert_variables_to_constants(
        sess, sess.graph.as_graph_def(), [OUTPUT_NAME.split(':')[0]])
    for node in graph_def.node:
        node.device = ''
    return graph_def


def write_export(directory, graph_def, meta):
    """Write ``model.pb`` and ``export.json`` (meta plus format and tensor names) into an
    existing directory. Returns the full metadata written."""
    from .tfv1 import tf
    meta = dict(meta, format=FORMAT, graph=GRAPH_FILE, inputs=dict(INPUT_NAMES),
                output=OUTPUT_NAME, tensorflow=tf.__version__)
    if meta.get('warp') not in WARPS:
        raise ExportError('export warp must be one of {}, got {!r}'.format(WARPS, meta.get('warp')))
    with open(os.path.join(directory, GRAPH_FILE), 'wb') as f:
        f.write(graph_def.SerializeToString())
    with open(os.path.join(directory, META_FILE), 'w') as f:
        json.dump(meta, f, indent=2)
        f.write('\n')
    return meta


def read_meta(directory):
    """The export.json of an export directory, checked; ExportError if unusable."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError('{}: cannot read export metadata ({})'.format(path, e))
    missing = [k for k in ('format', 'graph', 'inputs', 'output', 'image_size', 'warp') if k not in meta]
    if missing:
        raise ExportError('{}: not an export of predict.py (missing {})'.format(path, ', '.join(missing)))
    if meta['format'] != FORMAT:
        raise ExportError('{}: unknown export format {!r}'.format(path, meta['format']))
    if meta['warp'] not in WARPS:
        raise ExportError('{}: unknown warp implementation {!r}'.format(path, meta['warp']))
    return meta


class FrozenModel:
    """Runs an export: ``register(fixed, moving)`` -> flow, with its own graph and session.

    threads: intra- and inter-op thread pool sizes of the session (None = TensorFlow's choice).
    Attributes: ``meta`` (export.json), ``image_size`` (N of the N^3 input grid).
    """

    def __init__(self, directory, threads=None):
        from .tfv1 import tf
        self.meta = read_meta(directory)
        if self.meta['warp'] == 'op':
            from . import ops
            try:
                ops.load_warp_op(required=True)
            except RuntimeError as e:
                raise ExportError('{} was exported with the compiled warp op: {}'.format(directory, e))
        graph_def = tf.GraphDef()
        path = os.path.join(directory, self.meta['graph'])
        try:
            with open(path, 'rb') as f:
                graph_def.ParseFromString(f.read())
        except OSError as e:
            raise ExportError('{}: cannot read the frozen graph ({})'.format(path, e.strerror))
        except DecodeError as e:
            raise ExportError('{}: not a frozen GraphDef ({})'.format(path, e))
        self.graph = tf.Graph()
        with self.graph.as_default():
            try:
                tf.import_graph_def(graph_def, name='')
            except (ValueError, tf.errors.OpError) as e:
                raise ExportError('{}: cannot import the graph ({})'.format(path, str(e).splitlines()[0]))
        config = tf.ConfigProto()
        if threads:
            config.intra_op_parallelism_threads = threads
            config.inter_op_parallelism_threads = threads
        self.sess = tf.Session(graph=self.graph, config=config)
        self.fixed = self.graph.get_tensor_by_name(self.meta['inputs']['fixed'])
        self.moving = self.graph.get_tensor_by_name(self.meta['inputs']['moving'])
        self.flow = self.graph.get_tensor_by_name(self.meta['output'])
        self.image_size = int(self.meta['image_size'][0])

    def register(self, fixed, moving):
        """fixed, moving: [N, N, N] volumes in 0..255 -> flow [N, N, N, 3] float32 (voxels)."""
        feed = {self.fixed: np.asarray(fixed, np.float32)[None, ..., None],
                self.moving: np.asarray(moving, np.float32)[None, ..., None]}
        return self.sess.run(self.flow, feed)[0]

    def close(self):
        self.sess.close()
