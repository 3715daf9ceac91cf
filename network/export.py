"""Deployment export of a registration network: a frozen inference graph, and running one.

An export is a directory holding these files:

- ``model.pb``: a binary TensorFlow GraphDef with every variable folded into a constant
  (``tf.graph_util.convert_variables_to_constants``), pruned to what the flow needs, with
  device placements cleared. Inputs: placeholders ``voxel1:0`` (FIXED) and ``voxel2:0``
  (MOVING), float32 [B, N, N, N, 1] in 0..255 (the preprocessed uint8 volumes); output
  ``flow:0``, float32 [B, N, N, N, 3]: the final composed flow in voxels of the fixed grid,
  channel k along array axis k, warped(p) = moving(p + flow(p)) (SPEC section 2).
- ``export.json``: what a user needs to feed it: format, tensor names, image_size, the
  network (base network, cascades, repeats, net_args, parameter count), the warp
  implementation inside the graph, the source checkpoint and the TensorFlow version.
- ``model.onnx`` (where tf2onnx was installed): the same graph in ONNX (opset ONNX_OPSET, same
  tensor names), which onnxruntime runs without TensorFlow; export.json's ``onnx`` records its
  file, opset and tf2onnx version. ``python -m network.export --onnx DIR`` adds it to an
  existing export.

Warp: the graph contains the trilinear warps of the cascade. With warp 'tf' (the default of
predict.py --export) they are plain TensorFlow ops and the export imports into a stock
TensorFlow (the version recorded in export.json, or a newer one). With warp 'op' they are the project's compiled ``LdrWarp`` op:
faster on CPU, but importing the graph needs that op library loaded first, which
`FrozenModel` does through ``network.ops`` (and fails with a clear error where it cannot be
built). Running an export needs nothing else of the project: no network definitions, no
checkpoint, no training code. TensorFlow is imported on first use, so that `is_export` and
`read_meta` answer at once. The compiled op has no ONNX form: an export with it has no
model.onnx.

The ONNX graph is tf2onnx's conversion with four rewrites for onnxruntime's CPU kernels that
compute the same values (`fit_for_onnxruntime`): the warp's row gathers become element gathers,
scalar constants of broadcasting arithmetic get the rank of the other operand, the flow head's
convolution becomes one per kernel tap, shifted and summed, and the decoder's transposed
convolutions become convolutions to their 8 output parities, interleaved.
"""
import importlib.util
import json
import os
import sys

import numpy as np

import cli
from errors import UserError

GRAPH_FILE = 'model.pb'
META_FILE = 'export.json'
FORMAT = 'frozen_graphdef'
INPUT_NAMES = {'fixed': 'voxel1:0', 'moving': 'voxel2:0'}
OUTPUT_NAME = 'flow:0'
WARPS = ('tf', 'op')
ONNX_FILE = 'model.onnx'
ONNX_OPSET = 17
BROADCASTING_OPS = ('Add', 'Sub', 'Mul', 'Div', 'Max', 'Min')


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


def write_export(directory, graph_def, meta, onnx_model=None):
    """Write ``model.pb``, ``model.onnx`` when ``onnx_model`` (of `to_onnx`) is given, and
    ``export.json`` (meta plus format and tensor names) into an existing directory. Returns the
    full metadata written."""
    from .tfv1 import tf
    meta = dict(meta, format=FORMAT, graph=GRAPH_FILE, inputs=dict(INPUT_NAMES),
                output=OUTPUT_NAME, tensorflow=tf.__version__)
    if meta.get('warp') not in WARPS:
        raise ExportError('export warp must be one of {}, got {!r}'.format(WARPS, meta.get('warp')))
    with open(os.path.join(directory, GRAPH_FILE), 'wb') as f:
        f.write(graph_def.SerializeToString())
    if onnx_model is not None:
        meta = write_onnx(directory, onnx_model, meta)
    cli.write_json(os.path.join(directory, META_FILE), meta)
    return meta


def onnx_unavailable(meta):
    """Why no model.onnx can be made for an export of this metadata here, or None."""
    if meta.get('warp') != 'tf':
        return 'the compiled warp op (LdrWarp) has no ONNX form; export with --export_warp tf'
    if importlib.util.find_spec('tf2onnx') is None:
        return 'tf2onnx is not installed (pip install tf2onnx)'
    return None


def to_onnx(graph_def):
    """The ONNX model of a frozen graph of `freeze`: tf2onnx's conversion at ONNX_OPSET, same
    tensor names, fitted to onnxruntime (`fit_for_onnxruntime`). ExportError if it fails."""
    import tf2onnx
    try:
        model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=list(INPUT_NAMES.values()),
                                                  output_names=[OUTPUT_NAME], opset=ONNX_OPSET)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ExportError('tf2onnx cannot convert the graph: {}'.format(str(e).splitlines()[0]))
    return fit_for_onnxruntime(model)


def fit_for_onnxruntime(model):
    """Rewrite four patterns that onnxruntime's CPU kernels run far below their speed (measured
    with onnxruntime 1.32 at 128^3 on 2 threads); they compute the same values (the last up to
    the order of a sum):

    - Gather of rows of a [N, C] table (the warp's eight corner reads, ~20 ms each for 2M
      indices): a GatherElements of the flattened table (~3 ms), the element indices being
      row * C + column;
    - broadcasting arithmetic of a tensor ending in a unit axis with a scalar constant (the
      input scaling x / 255: 16 ms for 2M values, 0.4 ms with the constant as [1, 1, 1, 1, 1]):
      the constant reshaped to the other operand's rank;
    - a 3-D convolution "same", stride 1, to a few channels (the flow head, 32 -> 3 channels
      at 64^3: 52 ms, its im2col product has 3 rows): one 1x1x1 convolution to every kernel
      tap's outputs (81 channels, 30 ms with the rest), each tap's shifted by its offset and
      summed (`_conv_as_shifted_taps`);
    - a 3-D transposed convolution of kernel 4, stride 2, padding 1 (the decoder's upsampling:
      39 ms for 64 -> 16 channels from 32^3, onnxruntime's col2im being slow): one convolution
      of kernel 2 to the 8 output parities' channels (each parity sees 2 of the 4 taps per
      axis) and their interleave (26 ms; `_transposed_conv_as_parities`).

    Returns ``model``, changed in place and checked."""
    import onnx
    from onnx import helper, shape_inference
    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    values = [v for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
              if v.type.tensor_type.HasField('shape')]
    shapes = {v.name: [d.dim_value if d.HasField('dim_value') else None for d in v.type.tensor_type.shape.dim]
              for v in values}
    types = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in values}
    shapes.update({i.name: list(i.dims) for i in graph.initializer})
    types.update({i.name: helper.tensor_dtype_to_np_dtype(i.data_type) for i in graph.initializer})
    constants = _Constants(graph.initializer)
    nodes = []
    for node in graph.node:
        if node.op_type in BROADCASTING_OPS and node.output[0] in shapes:
            _scalars_to_rank(node, len(shapes[node.output[0]]), constants)
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 0)
        table = shapes.get(node.input[0]) if node.op_type == 'Gather' and axis == 0 else None
        if table is not None and len(table) == 2 and table[1] is not None:
            nodes += _gather_as_elements(node, table[1], types[node.input[1]], constants)
        elif node.op_type == 'Conv' and _few_output_same_conv(node, constants):
            nodes += _conv_as_shifted_taps(node, constants)
        elif node.op_type == 'ConvTranspose' and _upsampling_transposed_conv(node, shapes.get(node.input[0]),
                                                                              constants):
            nodes += _transposed_conv_as_parities(node, shapes[node.input[0]], constants)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in list(graph.initializer) + constants.added if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


class _Constants:
    """The initializers of a graph being rewritten, and those the rewrite adds (once per name)."""

    def __init__(self, initializers):
        self.existing = {i.name: i for i in initializers}
        self.added = []

    def add(self, name, value):
        """The name of a constant holding ``value`` (added under fit/name if new)."""
        from onnx import numpy_helper
        name = 'fit/' + name
        if name not in self.existing:
            self.existing[name] = numpy_helper.from_array(np.asarray(value), name)
            self.added.append(self.existing[name])
        return name


def _scalars_to_rank(node, rank, constants):
    """Give the one-element constant inputs of a broadcasting node the rank of its output."""
    from onnx import numpy_helper
    for k, name in enumerate(node.input):
        scalar = constants.existing.get(name)
        if scalar is not None and len(scalar.dims) < rank and int(np.prod(scalar.dims)) == 1:
            node.input[k] = constants.add('{}/rank{}'.format(name, rank),
                                          numpy_helper.to_array(scalar).reshape([1] * rank))


def _gather_as_elements(node, columns, index_type, constants):
    """The nodes computing Gather(table [N, columns], indices, axis=0) as a GatherElements of
    the flattened table at indices * columns + column, reshaped to indices' shape + [columns]."""
    from onnx import helper
    table, indices = node.input
    name, flat = node.name, constants.add('flat_shape', np.array([-1], np.int64))
    nodes = [helper.make_node('Reshape', [table, flat], [name + '/table']),
             helper.make_node('Reshape', [indices, flat], [name + '/elements'])]
    if columns > 1:
        nodes += [helper.make_node('Unsqueeze', [name + '/elements', constants.add('last_axis', np.array([1], np.int64))],
                                   [name + '/rows']),
                  helper.make_node('Mul', [name + '/rows', constants.add(name + '/columns', np.full((1, 1), columns, index_type))],
                                   [name + '/row_starts']),
                  helper.make_node('Add', [name + '/row_starts', constants.add(
                      name + '/column_range', np.arange(columns, dtype=index_type)[None])], [name + '/element_grid']),
                  helper.make_node('Reshape', [name + '/element_grid', flat], [name + '/row_elements'])]
    elements = name + ('/row_elements' if columns > 1 else '/elements')
    return nodes + [
        helper.make_node('GatherElements', [name + '/table', elements], [name + '/values'], axis=0),
        helper.make_node('Shape', [indices], [name + '/indices_shape']),
        helper.make_node('Concat', [name + '/indices_shape', constants.add(
            name + '/channels', np.array([columns], np.int64))], [name + '/values_shape'], axis=0),
        helper.make_node('Reshape', [name + '/values', name + '/values_shape'], node.output)]


SHIFTED_TAPS_CHANNELS = 128


def _few_output_same_conv(node, constants):
    """Whether a Conv node is 3-D, ungrouped, stride 1, undilated, zero-padded to keep its size
    ('same', odd kernel > 1), with constant weights of at most SHIFTED_TAPS_CHANNELS outputs x taps."""
    weights = constants.existing.get(node.input[1])
    if weights is None or len(weights.dims) != 5 or len(set(weights.dims[2:])) != 1 or weights.dims[2] % 2 == 0 \
            or weights.dims[2] == 1:
        return False
    half = weights.dims[2] // 2
    attributes = {a.name: (list(a.ints) if a.ints else a.i if a.type == a.INT else a.s) for a in node.attribute}
    return (weights.dims[0] * weights.dims[2] ** 3 <= SHIFTED_TAPS_CHANNELS
            and attributes.get('group', 1) == 1 and attributes.get('auto_pad', b'NOTSET') == b'NOTSET'
            and all(attributes.get(key, [1] * 3) == [1] * 3 for key in ('strides', 'dilations'))
            and attributes.get('pads') == [half] * 6
            and (len(node.input) < 3 or node.input[2] in constants.existing))


def _conv_as_shifted_taps(node, constants):
    """The nodes computing a `_few_output_same_conv` Conv as a 1x1x1 convolution to every tap's
    outputs, padded by half the kernel, each tap's channels sliced at its offset, summed (+ bias)."""
    from onnx import helper, numpy_helper
    name, weights = node.name, numpy_helper.to_array(constants.existing[node.input[1]])
    outputs, kernel = weights.shape[0], weights.shape[2]
    half, taps = kernel // 2, kernel ** 3
    per_tap = np.ascontiguousarray(weights.transpose(2, 3, 4, 0, 1).reshape(taps * outputs, -1, 1, 1, 1))
    nodes = [helper.make_node('Conv', [node.input[0], constants.add(name + '/tap_weights', per_tap)], [name + '/taps']),
             helper.make_node('Pad', [name + '/taps', constants.add(name + '/pads', np.array(
                 [0, 0] + [half] * 3 + [0, 0] + [half] * 3, np.int64))], [name + '/padded'])]
    axes = constants.add('slice_axes', np.array([1, 2, 3, 4], np.int64))
    shifted = []
    for tap, offset in enumerate(np.ndindex(kernel, kernel, kernel)):
        # output voxel p takes tap (i, j, k) from input voxel p + (i, j, k) - half: padded p + (i, j, k)
        ends = [outputs * (tap + 1)] + [o - 2 * half if o < 2 * half else np.iinfo(np.int64).max for o in offset]
        nodes.append(helper.make_node('Slice', [name + '/padded', constants.add(
            '{}/starts{}'.format(name, tap), np.array([outputs * tap] + list(offset), np.int64)), constants.add(
            '{}/ends{}'.format(name, tap), np.array(ends, np.int64)), axes], ['{}/tap{}'.format(name, tap)]))
        shifted.append('{}/tap{}'.format(name, tap))
    if len(node.input) < 3:
        return nodes + [helper.make_node('Sum', shifted, node.output)]
    bias = numpy_helper.to_array(constants.existing[node.input[2]]).reshape(1, outputs, 1, 1, 1)
    return nodes + [helper.make_node('Sum', shifted, [name + '/sum']),
                    helper.make_node('Add', [name + '/sum', constants.add(name + '/bias', bias)], node.output)]


def _upsampling_transposed_conv(node, input_shape, constants):
    """Whether a ConvTranspose node is 3-D, ungrouped, kernel 4, stride 2, padding 1, undilated,
    with constant weights (and bias) and an input of known channels and spatial size."""
    weights = constants.existing.get(node.input[1])
    if weights is None or list(weights.dims[2:]) != [4, 4, 4] or input_shape is None or len(input_shape) != 5 \
            or None in input_shape[1:]:
        return False
    attributes = {a.name: (list(a.ints) if a.ints else a.i if a.type == a.INT else a.s) for a in node.attribute}
    return (attributes.get('group', 1) == 1 and attributes.get('auto_pad', b'NOTSET') == b'NOTSET'
            and attributes.get('strides') == [2] * 3 and attributes.get('dilations', [1] * 3) == [1] * 3
            and attributes.get('pads') == [1] * 6
            and not any(key in attributes for key in ('output_padding', 'output_shape'))
            and (len(node.input) < 3 or node.input[2] in constants.existing))


def _transposed_conv_as_parities(node, input_shape, constants):
    """The nodes computing an `_upsampling_transposed_conv` ConvTranspose as a convolution and
    an interleave.

    Along an axis, output o = 2m + p takes taps k = 3 - p - 2t (t = 0, 1) of inputs m - 1 + p + t:
    a kernel-2 convolution over the input padded by 1, window s = m + p. The convolution gives
    the 8 parities' outputs as channel groups, ordered by q = 1 - p; interleaved as 2s + q they
    are output o + 1, so the interleave of all n + 1 windows, cropped by 1 at both ends, is the
    output. The interleave: depth into the batch axis (block transposes), height and width by
    DepthToSpace, depth back.
    """
    from onnx import helper, numpy_helper
    name = node.name
    weights = numpy_helper.to_array(constants.existing[node.input[1]])      # [in, out, 4, 4, 4]
    outputs = weights.shape[1]
    depth, height, width = (n + 1 for n in input_shape[2:])

    def taps(q):
        return [2 + q, q]
    groups = [weights[:, :, taps(qd)][:, :, :, taps(qh)][:, :, :, :, taps(qw)].transpose(1, 0, 2, 3, 4)
              for qd, qh, qw in np.ndindex(2, 2, 2)]
    inputs = [node.input[0], constants.add(name + '/parity_weights', np.ascontiguousarray(np.concatenate(groups)))]
    if len(node.input) > 2:
        inputs.append(constants.add(name + '/parity_bias', np.tile(
            numpy_helper.to_array(constants.existing[node.input[2]]), 8)))

    def shape(key, value):
        return constants.add('{}/{}'.format(name, key), np.array(value, np.int64))
    return [
        helper.make_node('Conv', inputs, [name + '/parities'], kernel_shape=[2] * 3, pads=[1] * 6),
        helper.make_node('Reshape', [name + '/parities', shape('by_depth_parity', [0, 2, 4 * outputs, depth, height,
                                                                                   width])], [name + '/split']),
        helper.make_node('Transpose', [name + '/split'], [name + '/depth_major'], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node('Reshape', [name + '/depth_major', shape('slices', [-1, 4 * outputs, height, width])],
                         [name + '/slices']),
        helper.make_node('DepthToSpace', [name + '/slices'], [name + '/planes'], blocksize=2, mode='DCR'),
        helper.make_node('Reshape', [name + '/planes', shape('planes_shape', [-1, 2, depth, outputs, 2 * height,
                                                                              2 * width])], [name + '/planes6']),
        helper.make_node('Transpose', [name + '/planes6'], [name + '/interleaved6'], perm=[0, 3, 2, 1, 4, 5]),
        helper.make_node('Reshape', [name + '/interleaved6', shape('interleaved', [0, outputs, 2 * depth, 2 * height,
                                                                                   2 * width])], [name + '/interleaved']),
        helper.make_node('Slice', [name + '/interleaved', shape('crop_starts', [1, 1, 1]),
                                   shape('crop_ends', [2 * depth - 1, 2 * height - 1, 2 * width - 1]),
                                   shape('crop_axes', [2, 3, 4])], node.output)]


def write_onnx(directory, model, meta):
    """Write ``model`` (of `to_onnx`) as model.onnx into ``directory`` (atomically); returns
    ``meta`` with its record."""
    import tf2onnx
    cli.write_atomic(os.path.join(directory, ONNX_FILE), model.SerializeToString(), 'wb')
    return dict(meta, onnx={'file': ONNX_FILE, 'opset': ONNX_OPSET, 'tf2onnx': tf2onnx.__version__})


def add_onnx(directory):
    """Convert the frozen graph of an existing export to model.onnx beside it and record it in
    its export.json. Returns the updated metadata; ExportError when it cannot be made."""
    meta = read_meta(directory)
    reason = onnx_unavailable(meta)
    if reason:
        raise ExportError('{}: no ONNX model can be made: {}'.format(directory, reason))
    meta = write_onnx(directory, to_onnx(read_graph(directory, meta)), meta)
    cli.write_json(os.path.join(directory, META_FILE), meta)
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


def read_graph(directory, meta):
    """The frozen GraphDef of an export; ExportError if the file cannot be read or parsed."""
    from google.protobuf.message import DecodeError

    from .tfv1 import tf
    graph_def = tf.GraphDef()
    path = os.path.join(directory, meta['graph'])
    try:
        with open(path, 'rb') as f:
            graph_def.ParseFromString(f.read())
    except OSError as e:
        raise ExportError('{}: cannot read the frozen graph ({})'.format(path, e.strerror))
    except DecodeError as e:
        raise ExportError('{}: not a frozen GraphDef ({})'.format(path, e))
    return graph_def


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
        graph_def = read_graph(directory, self.meta)
        path = os.path.join(directory, self.meta['graph'])
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


def main(argv=None):
    """``python -m network.export --onnx DIR``: add model.onnx to the export DIR."""
    parser = cli.ArgumentParser(prog='python -m network.export', description=main.__doc__)
    parser.add_argument('--onnx', metavar='DIR', required=True,
                        help='an export directory of predict.py --export (pure-TensorFlow warp) to add model.onnx to')
    args = parser.parse_args(argv)
    if not is_export(args.onnx):
        raise ExportError('{} is not an export directory (no {})'.format(args.onnx, META_FILE))
    with cli.exclusive_output(args.onnx, 'export directory'):
        meta = add_onnx(args.onnx)
    size = os.path.getsize(os.path.join(args.onnx, ONNX_FILE))
    print('Wrote {} ({:.2f} MB, opset {}, tf2onnx {})'.format(
        os.path.join(args.onnx, ONNX_FILE), size / 1e6, meta['onnx']['opset'], meta['onnx']['tf2onnx']))
    return 0


if __name__ == '__main__':
    sys.exit(cli.run(main))
