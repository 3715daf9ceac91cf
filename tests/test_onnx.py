"""The TensorFlow-free runtime: an export's model.onnx (tf2onnx) run by onnxruntime gives
TensorFlow's flows, predict.py takes it by default without importing TensorFlow, and a runtime
that cannot run says so in one line."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk
import tf2onnx
from onnx import helper, numpy_helper

import cli
import registration
import runs
from conftest import ROOT, error_lines, run_script
from network import export

FLOW_HEADS = ('rcn/affine_stem/conv7_W/W', 'rcn/affine_stem/conv7_b/W', 'rcn/deform_stem_0/flow/W',
              'rcn/deform_stem_0/flow/b')


@pytest.fixture(scope='module')
def scaled_run(tiny_run, tmp_path_factory):
    """tiny_run (64^3) with its affine and flow heads scaled 60 times, so that its flows move by
    voxels (max ~4) instead of hundredths: a model to compare runtimes with, not to register."""
    from network.tfv1 import tf
    run_dir = tmp_path_factory.mktemp('scaled') / 'run'
    run_dir.mkdir()
    shutil.copy(tiny_run / 'args.json', run_dir)
    sess, framework, _ = runs.load_framework(str(tiny_run), [64] * 3)
    with sess.graph.as_default():
        heads = [v for v in framework.net.variables if v.op.name in FLOW_HEADS]
        assert len(heads) == len(FLOW_HEADS)
        sess.run([v.assign(60.0 * v) for v in heads])
        runs.save_checkpoint(tf.train.Saver(framework.net.variables), sess, str(run_dir), 1)
    sess.close()
    return run_dir


@pytest.fixture(scope='module')
def exported(scaled_run, tmp_path_factory):
    directory = tmp_path_factory.mktemp('onnx')
    proc = run_script('predict.py', '-c', scaled_run, '--export', 'exported', cwd=directory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'model.pb' in proc.stdout and 'model.onnx' in proc.stdout, proc.stdout
    return directory / 'exported'


def smooth_volume(seed, size=64):
    volume = ndi.gaussian_filter(np.random.default_rng(seed).random((size,) * 3), 3)
    return (volume - volume.min()) / (volume.max() - volume.min()) * 255


def write_pair(directory):
    """Two smooth random scans (1.5 mm, different shapes) as NIfTI files: {'fixed': path, 'moving': path}."""
    paths = {}
    for name, seed, shape in (('fixed', 1, (52, 48, 44)), ('moving', 2, (48, 50, 46))):
        volume = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), 2) * 1000
        paths[name] = str(directory / (name + '.nii.gz'))
        sitk.WriteImage(registration.image_from_array(volume.astype(np.float32), (1.5, 1.5, 1.5)), paths[name])
    return paths


@pytest.mark.slow
def test_export_writes_onnx_whose_flows_match_tensorflow(exported):
    meta = json.loads((exported / 'export.json').read_text())
    assert meta['onnx'] == {'file': 'model.onnx', 'opset': export.ONNX_OPSET, 'tf2onnx': tf2onnx.__version__}
    # the warp's grid of positions is not a constant of the graph: both files hold the weights alone
    assert os.path.getsize(exported / 'model.onnx') < 1.1 * os.path.getsize(exported / 'model.pb')
    ops = {node.op_type for node in onnx.load(str(exported / 'model.onnx')).graph.node}
    assert 'GatherElements' in ops and 'Gather' not in ops
    fixed, moving = smooth_volume(1), np.roll(smooth_volume(2), 4, axis=0)
    frozen = registration.ExportedNetwork(str(exported)).flow(fixed, moving)
    runtime = registration.OnnxNetwork(str(exported), threads=2)
    assert runtime.info['runtime'] == 'onnxruntime' and runtime.image_size == 64
    flow = runtime.flow(fixed, moving)
    assert flow.shape == (64, 64, 64, 3) and flow.dtype == np.float32
    assert np.abs(frozen).max() > 2.0                       # a flow that moves voxels, not a near-identity
    assert np.abs(flow - frozen).max() < 1e-3


def test_rewrites_for_onnxruntime_keep_values():
    """Gather of rows of [N, 1] and [N, 3] tables, a scalar times a tensor ending in a unit axis, a
    'same' 3-D convolution to 2 channels (rewritten) and a strided one (kept), before and after
    `fit_for_onnxruntime`."""
    rng = np.random.default_rng(0)
    constants = {'table1': np.arange(10, dtype=np.float32)[:, None] * 1.5,
                 'table3': np.arange(30, dtype=np.float32).reshape(10, 3) ** 2,
                 'scale': np.array(0.25, np.float32),
                 'kernel': rng.standard_normal((2, 4, 3, 3, 3)).astype(np.float32),
                 'bias': np.array([0.5, -2.0], np.float32)}
    nodes = [helper.make_node('Gather', ['table1', 'indices'], ['rows1'], name='g1'),
             helper.make_node('Gather', ['table3', 'indices'], ['rows3'], name='g3'),
             helper.make_node('Mul', ['rows1', 'scale'], ['scaled'], name='m'),
             helper.make_node('Conv', ['volume', 'kernel', 'bias'], ['same'], name='c', pads=[1] * 6),
             helper.make_node('Conv', ['volume', 'kernel'], ['strided'], name='s', pads=[1] * 6, strides=[2] * 3)]
    outputs = {'rows3': [2, 4, 3], 'scaled': [2, 4, 1], 'same': [1, 2, 5, 6, 7], 'strided': [1, 2, 3, 3, 4]}
    graph = helper.make_graph(
        nodes, 'rewrites', [helper.make_tensor_value_info('indices', onnx.TensorProto.INT32, [2, 4]),
                            helper.make_tensor_value_info('volume', onnx.TensorProto.FLOAT, [1, 4, 5, 6, 7])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', export.ONNX_OPSET)])
    feed = {'indices': np.array([[0, 9, 3, 3], [5, 1, 8, 2]], np.int32),
            'volume': rng.standard_normal((1, 4, 5, 6, 7)).astype(np.float32)}

    def run(m):
        return onnxruntime.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']).run(None, feed)

    before = run(model)
    fitted = export.fit_for_onnxruntime(model)
    after = run(fitted)
    ops = [n.op_type for n in fitted.graph.node]
    assert 'Gather' not in ops and ops.count('GatherElements') == 2 and ops.count('Slice') == 27
    convolutions = {n.output[0]: list(constants.get(n.input[1], np.zeros((0,) * 5)).shape)
                    for n in fitted.graph.node if n.op_type == 'Conv'}
    assert convolutions['strided'] == [2, 4, 3, 3, 3] and 'same' not in convolutions
    assert [list(i.dims) for i in fitted.graph.initializer if i.name.startswith('fit/scale')] == [[1, 1, 1]]
    np.testing.assert_array_equal(after[0], constants['table3'][feed['indices']])
    for b, a in zip(before, after):
        assert b.shape == a.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize('bias', [False, True])
def test_upsampling_transposed_convolution_rewritten_keeps_values(bias):
    """A kernel-4, stride-2, padding-1 ConvTranspose (batch 2, a box of 3 x 4 x 5, 3 -> 2 channels)
    against its rewrite as a convolution to 8 parities and their interleave, and against NumPy:
    each input voxel i adds its kernel to outputs 2i - 1 .. 2i + 2 (those inside)."""
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((3, 2, 4, 4, 4)).astype(np.float32)
    constants = {'weights': weights, 'bias': np.array([0.5, -1.5], np.float32)}
    inputs = ['volume', 'weights'] + (['bias'] if bias else [])
    nodes = [helper.make_node('ConvTranspose', inputs, ['up'], name='up', kernel_shape=[4] * 3, strides=[2] * 3,
                              pads=[1] * 6),
             helper.make_node('ConvTranspose', inputs, ['odd'], name='odd', kernel_shape=[4] * 3, strides=[2] * 3,
                              pads=[1, 1, 1, 2, 2, 2])]
    graph = helper.make_graph(
        nodes, 'upsampling', [helper.make_tensor_value_info('volume', onnx.TensorProto.FLOAT, [2, 3, 3, 4, 5])],
        [helper.make_tensor_value_info('up', onnx.TensorProto.FLOAT, [2, 2, 6, 8, 10]),
         helper.make_tensor_value_info('odd', onnx.TensorProto.FLOAT, [2, 2, 5, 7, 9])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', export.ONNX_OPSET)])
    volume = rng.standard_normal((2, 3, 3, 4, 5)).astype(np.float32)

    def run(m):
        session = onnxruntime.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
        return session.run(None, {'volume': volume})

    before = run(model)
    fitted = export.fit_for_onnxruntime(model)
    ops = [n.op_type for n in fitted.graph.node]
    assert ops.count('ConvTranspose') == 1 and ops.count('DepthToSpace') == 1   # the odd padding is kept
    after = run(fitted)
    full = np.zeros((2, 2, 8, 10, 12))                   # outputs -1 .. 2n, before the padding's crop
    for i, j, k in np.ndindex(3, 4, 5):
        full[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4, 2 * k:2 * k + 4] += np.einsum(
            'bc,cdxyz->bdxyz', volume[:, :, i, j, k].astype(np.float64), weights.astype(np.float64))
    expected = full[:, :, 1:-1, 1:-1, 1:-1] + (constants['bias'][None, :, None, None, None] if bias else 0)
    np.testing.assert_allclose(before[0], expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(after[0], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(after[1], before[1])


@pytest.mark.slow
def test_predict_runs_onnx_by_default_without_tensorflow_and_matches_it(exported, tmp_path):
    paths = write_pair(tmp_path)
    args = ['-c', str(exported), '--fixed', paths['fixed'], '--moving', paths['moving'], '-o', 'by_default',
            '--outputs', 'warped,field']
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, {root!r})
        import cli, predict
        cli.run(lambda: predict.main({args!r}))
        print('frameworks loaded:', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf2onnx', 'keras')))
        ''').format(root=ROOT, args=args)
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'frameworks loaded: []' in proc.stdout, proc.stdout
    proc = run_script('predict.py', *args[:-4], '-o', 'in_tensorflow', '--outputs', 'warped,field',
                      '--runtime', 'tensorflow', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = {name: json.loads((tmp_path / name / 'predict.json').read_text()) for name in ('by_default', 'in_tensorflow')}
    assert reports['by_default']['model']['runtime'] == 'onnxruntime'
    assert reports['in_tensorflow']['model']['runtime'] == 'tensorflow'
    fields = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / 'field.nii.gz'))) for name in reports]
    warped = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / 'warped.nii.gz'))) for name in reports]
    assert np.abs(fields[1]).max() > 2.0
    np.testing.assert_allclose(fields[0], fields[1], rtol=0, atol=1e-3)                    # mm
    np.testing.assert_allclose(warped[0], warped[1], rtol=0, atol=1e-3 * np.abs(warped[1]).max())


@pytest.mark.slow
def test_eval_of_an_export_gives_the_records_of_its_checkpoint(exported, scaled_run, synthetic_spec, tmp_path):
    """eval.py -c EXPORT (run by onnxruntime, as predict.py runs it) writes <export>-export-<subset>
    files whose per-pair metrics are eval.py's of the checkpoint it was exported from (both run
    in-process; the command line is the bad-input matrix's)."""
    import eval as eval_script
    for source in (scaled_run, exported):
        eval_script.main(['-c', str(source), '-d', synthetic_spec, '-v', 'val', '--eval_output_dir', str(tmp_path / 'ev')])
    checkpoint = json.loads((tmp_path / 'ev' / 'run-1-val.json').read_text())
    frozen = json.loads((tmp_path / 'ev' / 'exported-export-val.json').read_text())
    assert frozen['runtime'] == 'onnxruntime' and frozen['checkpoint'] == str(exported)
    assert frozen['parameters'] == checkpoint['parameters'] and frozen['rep'] == checkpoint['rep'] == 1
    assert len(frozen['pairs']) == len(checkpoint['pairs']) == 2
    for a, b in zip(frozen['pairs'], checkpoint['pairs']):
        assert (a['id1'], a['id2']) == (b['id1'], b['id2'])
        assert b['dice'] < 0.99 and b['jacobian_det'] > 1e-3      # flows that move the labels
        for key in ('dice', 'jacc', 'dice_grid', 'jacc_grid', 'folding'):
            assert a[key] == pytest.approx(b[key], abs=2e-3), key
        assert a['jacobian_det'] == pytest.approx(b['jacobian_det'], rel=1e-3)


@pytest.mark.slow
def test_load_model_runtimes(exported):
    assert registration.load_model(str(exported)).info['runtime'] == 'onnxruntime'
    assert registration.load_model(str(exported), runtime='tensorflow').info['runtime'] == 'tensorflow'
    with pytest.raises(cli.UserError, match="runtime 'tflite': choose from auto, onnx, tensorflow"):
        registration.load_model(str(exported), runtime='tflite')


@pytest.mark.slow
def test_onnx_runtime_unavailable_is_one_line(exported, scaled_run, tmp_path, monkeypatch):
    without = tmp_path / 'without_onnx'
    shutil.copytree(exported, without)
    os.remove(without / 'model.onnx')
    pair = write_pair(tmp_path)
    cases = [(['-c', without], "lacks; add it with python -m network.export --onnx"),
             (['-c', scaled_run], 'is a train.py checkpoint')]
    for model, message in cases:
        proc = run_script('predict.py', *model, '--fixed', pair['fixed'], '--moving', pair['moving'], '-o', 'out',
                          '--runtime', 'onnx', cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        assert not (tmp_path / 'out').exists()
    proc = run_script('predict.py', '-c', without, '--fixed', pair['fixed'], '--moving', pair['moving'], '-o', 'out',
                      '--outputs', 'warped', cwd=tmp_path)                       # auto: TensorFlow runs model.pb
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / 'out' / 'predict.json').read_text())['model']['runtime'] == 'tensorflow'
    broken = tmp_path / 'broken'
    shutil.copytree(exported, broken)
    (broken / 'model.onnx').write_bytes(b'not an ONNX model')
    with pytest.raises(cli.UserError, match='model.onnx: onnxruntime cannot load it'):
        registration.load_model(str(broken))
    real_find_spec = registration.importlib.util.find_spec
    monkeypatch.setattr(registration.importlib.util, 'find_spec',
                        lambda name, *rest: None if name == 'onnxruntime' else real_find_spec(name, *rest))
    with pytest.raises(cli.UserError, match='needs onnxruntime: pip install onnxruntime'):
        registration.resolve_network(str(exported), runtime='onnx')
    assert registration.load_model(str(exported)).info['runtime'] == 'tensorflow'


@pytest.mark.slow
def test_onnx_added_to_an_existing_export_and_refused_where_impossible(exported, tmp_path):
    older = tmp_path / 'older'
    shutil.copytree(exported, older)
    os.remove(older / 'model.onnx')
    meta = json.loads((older / 'export.json').read_text())
    del meta['onnx']
    (older / 'export.json').write_text(json.dumps(meta))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, '-m', 'network.export', '--onnx', str(older)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Wrote {}'.format(older / 'model.onnx') in proc.stdout
    assert json.loads((older / 'export.json').read_text())['onnx']['file'] == 'model.onnx'
    fixed, moving = smooth_volume(3), smooth_volume(4)
    np.testing.assert_allclose(registration.OnnxNetwork(str(older)).flow(fixed, moving),
                               registration.ExportedNetwork(str(older)).flow(fixed, moving), rtol=0, atol=1e-3)
    with_op = tmp_path / 'with_op'
    shutil.copytree(older, with_op)
    os.remove(with_op / 'model.onnx')
    (with_op / 'export.json').write_text(json.dumps(dict(meta, warp='op')))
    for target, message in ((with_op, 'the compiled warp op (LdrWarp) has no ONNX form'),
                            (tmp_path, 'is not an export directory')):
        proc = subprocess.run([sys.executable, '-m', 'network.export', '--onnx', str(target)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (with_op / 'model.onnx').exists()
