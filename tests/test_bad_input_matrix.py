"""Bad input to train.py, eval.py, predict.py and the converter (issue 7): one table of cases.

Every case must be refused with exit status 2 and exactly one stderr line ``error: ...`` naming
the culprit (TensorFlow's start-up noise aside), no traceback, and no file created, changed or
removed in the case's directory or the data it reads. All inputs live in one module directory,
which is also every run's working directory (so weights/, logs/, evaluate/ and any output land
there). Most cases must fail before TensorFlow is imported; the few marked (TF) cannot.
"""
import collections
import copy
import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, error_lines, run_script
from data_util.flow_store import FlowStoreWriter

CONVERTER = 'data_util.prepare'
TRAIN = ['-b', 'LDR', '--batch', '1', '--round', '1', '--epochs', '1', '--val_steps', '0', '--output', 'new']
EVAL = ['-c', 'weights/tiny', '-v', 'test']
PREDICT = ['-c', 'weights/tiny', '--fixed', 'fixed.nii.gz', '--moving', 'moving.nii.gz', '-o', 'out']
CONVERT = ['--images', 'fixed.nii.gz', '--output', 'new.h5', '--image_size', '16', '--quiet']

Case = collections.namedtuple('Case', 'id script args culprit')


def train(spec=None, *extra):
    """Args builder of a one-step training run on ``spec`` (a file of the module directory; None =
    the synthetic data set) plus ``extra`` (a flag given again overrides TRAIN's)."""
    return lambda inputs: TRAIN + ['-d', spec or inputs.spec] + list(extra)


def given(*args):
    """Args builder of fixed args (paths relative to the module directory, the working directory)."""
    return lambda inputs: list(args)


CASES = [
    Case('train-missing-hdf5', 'train.py', train('missing_hdf5.json'), 'nowhere.h5: HDF5 file not found'),
    Case('train-corrupt-hdf5', 'train.py', train('garbage_hdf5.json'), 'garbage.h5: not a readable HDF5 file'),
    Case('train-truncated-hdf5', 'train.py', train('truncated_hdf5.json'), 'truncated.h5: not a readable HDF5'),
    Case('train-string-volume', 'train.py', train('string_volume.json'), "'string_volume': 'volume' has non-numeric"),
    Case('train-wrong-shape', 'train.py', train('wrong_shape.json'), 'volume shape [32, 32, 32] does not match'),
    Case('train-nan-volume', 'train.py', train('nan_volume.json'), "'nan_volume': 'volume' has non-finite"),
    Case('train-nan-validation-scan', 'train.py', train('nan_val.json', '--val_steps', '1'),
         "'nan_volume': 'volume' has non-finite"),
    Case('train-landmark-out-of-range', 'train.py', train('landmarks.json'),
         "'landmarks': landmark row 2 [70.0, 10.0, 10.0] lies outside the volume"),
    Case('train-spec-unknown-key', 'train.py', train('unknown_key.json'), "unknown key(s) 'image_szie'"),
    Case('train-spec-missing-subset', 'train.py', train('missing_subset.json'), "missing subset 'training'"),
    Case('train-atlas-not-in-files', 'train.py', train('atlas.json'), "atlas not in files: scan entry 'atlas/s000'"),
    Case('train-augment-gamma-one', 'train.py', train(None, '--augment_gamma', '1'),
         '--augment_gamma 1: the largest power, a finite number > 1'),
    Case('train-missing-spec', 'train.py', train('no_such_spec.json'), 'no_such_spec.json: cannot read'),
    Case('train-size-not-divisible', 'train.py', train('size40.json', '-b', 'VTN'),  # imports TensorFlow
         '40x40x40 is not divisible by 64'),
    Case('train-unknown-base', 'train.py', train(None, '-b', 'ResNet'), "invalid choice: 'ResNet'"),
    Case('train-bad-gpu', 'train.py', train(None, '-g', 'zero'), "bad -g 'zero'"),
    Case('train-output-exists', 'train.py', train(None, '--output', 'tiny'), 'run directory weights/tiny exists'),
    Case('train-flow-store-of-another-shape', 'train.py',
         train(None, '--aldk', '--pretrained_flow_path', 'store32.h5'),
         'store32.h5: stored flows have shape [32, 32, 32, 3] but this run needs [64, 64, 64, 3]'),
    Case('train-unknown-flag', 'train.py', train(None, '--bogus'), 'unrecognized arguments: --bogus'),
    Case('train-non-numeric-batch', 'train.py', train(None, '--batch', 'two'), "argument --batch: invalid"),
    Case('train-batch-zero', 'train.py', train(None, '--batch', '0'), 'argument --batch: must be a positive'),
    Case('train-negative-epochs', 'train.py', train(None, '--epochs', '-1'), 'argument --epochs: must be a positive'),
    Case('train-epochs-below-one-step', 'train.py', train(None, '--epochs', '1e-9'), 'less than one step'),
    Case('train-negative-lr', 'train.py', train(None, '--lr', '-1'), '--lr -1.0: the learning rate must be'),
    Case('train-nan-lr', 'train.py', train(None, '--lr', 'nan'), '--lr nan: the learning rate must be'),
    Case('train-negative-seed', 'train.py', train(None, '--seed', '-1'), '--seed -1: a seed lies in'),
    Case('train-volume-scaled-to-one', 'train.py', train('unit_volume.json'), 'look scaled to 0..1'),
    Case('train-init-from-nowhere', 'train.py', train(None, '--init_from', 'weights/nothing'),
         'checkpoint not found: weights/nothing'),
    Case('train-init-from-and-resume', 'train.py', train(None, '-c', 'weights/tiny', '--init_from', 'weights/tiny'),
         '-c continues a run and --init_from starts a new one'),
    Case('train-init-from-another-base', 'train.py', train(None, '-b', 'VTN', '--init_from', 'weights/tiny'),
         '--base_network VTN contradicts the checkpoint run (LDR)'),

    Case('eval-other-architecture', 'eval.py',  # imports TensorFlow: the VTN stem's variables are not stored
         given(*EVAL, '-v', 'val', '--net_args', "affine='VTN'"), 'weights/tiny/model-2 does not fit this network'),
    Case('eval-empty-segmentations', 'eval.py', given(*EVAL, '-d', 'empty_seg.json', '-v', 'val'),
         "pair fixed 'bad/empty_seg1', moving 'bad/empty_seg2' of 'val': both segmentations are empty"),
    Case('eval-nan-volume', 'eval.py', given(*EVAL, '-d', 'nan_val.json', '-v', 'val'),
         "'nan_volume': 'volume' has non-finite"),
    Case('eval-unknown-subset', 'eval.py', given(*EVAL, '-v', 'nosuch'), "subset 'nosuch' is neither"),
    Case('eval-results-exist', 'eval.py', given(*EVAL), 'evaluate/tiny-2-test.txt exists'),
    Case('eval-checkpoint-not-found', 'eval.py', given('-c', 'weights/nothing'),
         'checkpoint not found: weights/nothing'),
    Case('eval-run-args-not-json', 'eval.py', given('-c', 'weights/broken'), 'args.json is not valid JSON'),
    Case('eval-bad-gpu', 'eval.py', given(*EVAL, '-g', 'zero'), "bad -g 'zero'"),
    Case('eval-batch-zero', 'eval.py', given(*EVAL, '--batch', '0'), 'argument --batch: must be a positive'),
    Case('eval-run-args-empty', 'eval.py', given('-c', 'weights/empty'), 'lacks base_network, n_cascades'),
    Case('eval-run-args-a-list', 'eval.py', given('-c', 'weights/listed'), 'holds a list, not the settings'),
    Case('eval-nan-flow-multiplier', 'eval.py', given(*EVAL, '--flow_multiplier', 'nan'), '--flow_multiplier nan'),
    Case('eval-volume-scaled-to-one', 'eval.py', given(*EVAL, '-d', 'unit_val.json', '-v', 'val'),
         'look scaled to 0..1'),
    Case('eval-export-with-repeats', 'eval.py', lambda inputs: ['-c', 'export32', '-d', inputs.spec, '-r', '2'],
         '-r/--rep: export32 is an export, frozen'),
    Case('eval-export-without-dataset', 'eval.py', given('-c', 'export32', '-v', 'test'),
         '-d/--dataset: export32 is an export, which names no dataset'),
    Case('eval-export-of-another-size', 'eval.py', lambda inputs: ['-c', 'export32', '-d', inputs.spec, '-v', 'test'],
         'export32: the export is frozen at 32^3, the dataset'),

    Case('predict-unreadable-nifti', 'predict.py', given(*PREDICT, '--moving', 'garbage.nii.gz'),
         'garbage.nii.gz: cannot read image'),
    Case('predict-damaged-mgz', 'predict.py', given(*PREDICT, '--fixed', 'damaged.mgz'),
         'damaged.mgz: cannot read image'),
    Case('predict-sheared-mgz', 'predict.py', given(*PREDICT, '--moving', 'sheared.mgz'),
         'sheared.mgz: the voxel axes are not orthogonal'),
    Case('predict-two-frame-mgz', 'predict.py', given(*PREDICT, '--moving', 'frames.mgz'),
         'frames.mgz: a 3-D volume is needed, got size 24x24x24x2'),
    Case('predict-2d-image', 'predict.py', given(*PREDICT, '--fixed', 'slice.nii.gz'),
         'slice.nii.gz: a 3-D volume is needed'),
    Case('predict-label-map-of-another-size', 'predict.py',
         given(*PREDICT, '--moving_seg', 'small_seg.nii.gz'), 'small_seg.nii.gz (--moving_seg) has size 10x10x10'),
    Case('predict-output-exists', 'predict.py', given(*PREDICT, '-o', 'taken'), 'taken exists'),
    Case('predict-missing-image', 'predict.py', given(*PREDICT, '--fixed', 'absent.nii.gz'),
         'absent.nii.gz: no such file'),
    Case('predict-threads-zero', 'predict.py', given(*PREDICT, '--threads', '0'), '--threads must be >= 1'),
    Case('predict-run-args-not-json', 'predict.py', given(*PREDICT, '-c', 'weights/broken'),
         'args.json is not valid JSON'),
    Case('predict-image-size-zero', 'predict.py', given(*PREDICT, '--image_size', '0'), '--image_size 0'),
    Case('predict-nan-voxels', 'predict.py', given(*PREDICT, '--moving', 'nan.mha'),
         'nan.mha: the image holds NaN or infinite voxels'),
    Case('predict-reversed-percentiles', 'predict.py', given(*PREDICT, '--percentiles', '99', '1'),
         '--percentiles 99 1: need 0 <= LOW < HIGH <= 100'),
    Case('predict-window-of-no-width', 'predict.py', given(*PREDICT, '--modality', 'ct', '--window', '50', '0'),
         '--window 50 0: need a finite LEVEL and a WIDTH > 0'),
    Case('predict-nan-margin', 'predict.py', given(*PREDICT, '--margin', 'nan'), '--margin nan'),
    Case('predict-refine-factor-three', 'predict.py', given(*PREDICT, '--refine', '5', '--refine_factor', '3'),
         '--refine_factor 3: a power of 2'),
    Case('eval-even-refine-window', 'eval.py', given(*EVAL, '--refine', '5', '--refine_window', '4'),
         '--refine_window 4: an odd number'),

    Case('convert-unreadable-nifti', CONVERTER, given(*CONVERT, '--images', 'garbage.nii.gz'),
         'garbage.nii.gz: cannot read image'),
    Case('convert-2d-image', CONVERTER, given(*CONVERT, '--images', 'slice.nii.gz'), 'a 3-D volume is needed'),
    Case('convert-label-map-of-another-size', CONVERTER, given(*CONVERT, '--labels', 'small_seg.nii.gz'),
         'small_seg.nii.gz has size 10x10x10'),
    Case('convert-output-exists', CONVERTER, given(*CONVERT, '--output', 'existing.h5'),
         'existing.h5 exists; refusing to overwrite it'),
    Case('convert-unknown-flag', CONVERTER, given(*CONVERT, '--bogus'), 'unrecognized arguments: --bogus'),
    Case('convert-non-numeric-size', CONVERTER, given(*CONVERT, '--image_size', 'big'),
         "argument --image_size: invalid int value: 'big'"),
    Case('convert-bad-label-template', CONVERTER, given(*CONVERT, '--labels', 'seg/{name}.nii.gz'),
         "--labels 'seg/{name}.nii.gz': the only placeholder"),
    Case('convert-empty-dicom-directory', CONVERTER, given(*CONVERT, '--images', 'empty_dicom'),
         'empty_dicom: directory holds no DICOM series'),
    Case('convert-list-with-byte-order-mark', CONVERTER,
         given('--list', 'bom.csv', '--output', 'new.h5', '--image_size', '16', '--quiet'),
         'scan_a image: no such file or directory'),
    Case('convert-nan-voxels', CONVERTER, given(*CONVERT, '--images', 'nan.mha'),
         'nan.mha: the image holds NaN or infinite voxels'),
    Case('convert-percentiles-above-100', CONVERTER, given(*CONVERT, '--percentiles', '0', '150'),
         '--percentiles 0 150: need 0 <= LOW < HIGH <= 100'),
    Case('convert-nan-spacing', CONVERTER, given(*CONVERT, '--spacing', 'nan'), '--spacing must be a positive'),
]


def run(script, args, cwd):
    if script == CONVERTER:
        return subprocess.run([sys.executable, '-m', CONVERTER] + [str(a) for a in args], cwd=cwd,
                              env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    return run_script(script, *args, cwd=cwd, timeout=300)


def snapshot(roots):
    """{path: sha1 of the content} of every file and {path: None} of every directory under roots."""
    state = {}
    for top in roots:
        for directory, _, names in os.walk(top):
            state[directory] = None
            for name in names:
                path = os.path.join(directory, name)
                with open(path, 'rb') as f:
                    state[path] = hashlib.sha1(f.read()).hexdigest()
    return state


def write_scans(path, scans):
    """An HDF5 file of {group: {field: array}} (gzip: most arrays here are constant)."""
    with h5py.File(path, 'w') as f:
        for group, fields in scans.items():
            for field, array in fields.items():
                options = {'compression': 'gzip'} if np.ndim(array) == 3 else {}
                f.create_dataset('{}/{}'.format(group, field), data=array, **options)


def make_specs(directory, spec_path):
    """Variants of the synthetic spec (its HDF5 by absolute path) and the HDF5 files they need."""
    with open(spec_path) as f:
        base = json.load(f)
    h5_path = os.path.join(os.path.dirname(spec_path), base['files']['synthetic']['path'])
    base['files']['synthetic']['path'] = h5_path
    zeros = np.zeros([64] * 3, np.uint8)
    nan = np.full([64] * 3, 100, np.float32)
    nan[5, 6, 7] = np.nan
    write_scans(os.path.join(directory, 'bad.h5'), {
        'string_volume': {'volume': np.array([b'abc', b'def'])},
        'wrong_shape': {'volume': np.zeros([32] * 3, np.uint8)},
        'nan_volume': {'volume': nan},
        'unit_volume': {'volume': np.full([64] * 3, 0.5, np.float32)},
        'landmarks': {'volume': zeros, 'point': np.array([[10, 10, 10], [-1, -1, -1], [70, 10, 10]], np.float32)},
        'empty_seg1': {'volume': zeros, 'segmentation': zeros},
        'empty_seg2': {'volume': zeros, 'segmentation': zeros}})
    with open(os.path.join(directory, 'garbage.h5'), 'wb') as f:
        f.write(b'not an HDF5 file at all\n' * 100)
    write_scans(os.path.join(directory, 'whole.h5'), {'s000': {'volume': np.full([64] * 3, 7, np.uint8)}})
    with open(os.path.join(directory, 'whole.h5'), 'rb') as f:
        data = f.read()
    with open(os.path.join(directory, 'truncated.h5'), 'wb') as f:
        f.write(data[:len(data) // 2])
    os.remove(os.path.join(directory, 'whole.h5'))
    rng = np.random.default_rng(0)
    write_scans(os.path.join(directory, 'size40.h5'),
                {'s%d' % i: {'volume': rng.integers(0, 256, [40] * 3, np.uint8)} for i in range(3)})

    train, val = base['subsets']['train'], base['subsets']['val']

    def with_bad(**subsets):
        spec = copy.deepcopy(base)
        spec['files']['bad'] = {'path': 'bad.h5', 'type': 'HDF5'}
        spec['subsets'].update(subsets)
        return spec

    def with_file(path):
        spec = copy.deepcopy(base)
        spec['files']['synthetic']['path'] = path
        return spec

    specs = {
        'missing_hdf5': with_file(os.path.join(directory, 'nowhere.h5')),
        'garbage_hdf5': with_file('garbage.h5'),
        'truncated_hdf5': with_file('truncated.h5'),
        'string_volume': with_bad(train=train + ['bad/string_volume']),
        'wrong_shape': with_bad(train=train + ['bad/wrong_shape']),
        'nan_volume': with_bad(train=train + ['bad/nan_volume']),
        'nan_val': with_bad(val=val + ['bad/nan_volume']),
        'unit_volume': with_bad(train=train + ['bad/unit_volume']),
        'unit_val': with_bad(val=val + ['bad/unit_volume']),
        'landmarks': with_bad(train=train + ['bad/landmarks']),
        'empty_seg': with_bad(val=['bad/empty_seg1', 'bad/empty_seg2']),
        'unknown_key': dict(base, image_szie=[64, 64, 64]),
        'missing_subset': dict(base, schemes={'1': {'training': 1.0}}),
        'atlas': dict(base, atlas='atlas/s000'),
        'size40': {'files': {'s': {'path': 'size40.h5', 'type': 'HDF5'}}, 'image_size': [40] * 3,
                   'image_type': 'liver', 'subsets': {'train': ['s/s0', 's/s1', 's/s2']},
                   'schemes': {'1': {'train': 1.0}}},
    }
    for name, spec in specs.items():
        with open(os.path.join(directory, name + '.json'), 'w') as f:
            json.dump(spec, f)


def make_images(directory):
    """Image inputs of predict.py and the converter: a good NIfTI pair, garbage, a 2-D slice, a small
    label map, a NaN voxel, and FreeSurfer files that are damaged, sheared or of two frames."""
    index = np.indices([24] * 3).astype(np.float32)
    ball = 200.0 * (np.sum((index - 11.5) ** 2, axis=0) < 64) + 20.0
    for name in ('fixed', 'moving'):
        image = sitk.GetImageFromArray(ball.astype(np.float32))
        image.SetSpacing([2.0] * 3)
        sitk.WriteImage(image, os.path.join(directory, name + '.nii.gz'))
    with open(os.path.join(directory, 'garbage.nii.gz'), 'wb') as f:
        f.write(b'\x1f\x8b not an image' * 50)
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), os.path.join(directory, 'slice.nii.gz'))
    sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkUInt8), os.path.join(directory, 'small_seg.nii.gz'))
    import nibabel
    sheared = np.diag([2.0, 2.0, 2.0, 1.0])
    sheared[0, 1] = 0.5
    nibabel.save(nibabel.MGHImage(ball.astype(np.float32), sheared), os.path.join(directory, 'sheared.mgz'))
    nibabel.save(nibabel.MGHImage(np.stack([ball, ball], -1).astype(np.float32), np.eye(4)),
                 os.path.join(directory, 'frames.mgz'))
    nibabel.save(nibabel.MGHImage(ball.astype(np.float32), np.eye(4)), os.path.join(directory, 'damaged.mgz'))
    with open(os.path.join(directory, 'damaged.mgz'), 'r+b') as f:
        f.truncate(os.path.getsize(os.path.join(directory, 'damaged.mgz')) // 2)
    holed = ball.astype(np.float32)
    holed[3, 4, 5] = np.nan
    image = sitk.GetImageFromArray(holed)
    image.SetSpacing([2.0] * 3)
    sitk.WriteImage(image, os.path.join(directory, 'nan.mha'))


@pytest.fixture(scope='module')
def inputs(synthetic_spec, tmp_path_factory):
    """The module directory: a tiny trained LDR run (weights/tiny), an export's metadata at 32^3
    (export32), bad data sets and images,
    and outputs that already exist. Returns a namespace with root and spec (the synthetic spec)."""
    root = str(tmp_path_factory.mktemp('bad_input'))
    proc = run_script('train.py', '-b', 'LDR', '-n', '1', '-d', synthetic_spec, '--batch', '1', '--round', '2',
                      '--epochs', '1', '--output', 'tiny', '--val_steps', '0', cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    make_specs(root, synthetic_spec)
    make_images(root)
    with FlowStoreWriter(os.path.join(root, 'store32.h5'), [32, 32, 32, 3], 'another teacher') as store:
        store.write('synthetic/s000', 'synthetic/s001', np.zeros([32, 32, 32, 3], np.float32))
    for run, args_text in (('broken', '{"base_network": "LDR",'), ('empty', '{}'), ('listed', '[]')):
        os.makedirs(os.path.join(root, 'weights', run))
        for name, text in (('args.json', args_text), ('model-1.index', 'x'), ('model-1.data-00000-of-00001', 'x')):
            with open(os.path.join(root, 'weights', run, name), 'w') as f:
                f.write(text)
    os.makedirs(os.path.join(root, 'export32'))
    with open(os.path.join(root, 'export32', 'export.json'), 'w') as f:   # its metadata alone: refused before use
        json.dump({'format': 'frozen_graphdef', 'graph': 'model.pb', 'inputs': {'fixed': 'voxel1:0', 'moving': 'voxel2:0'},
                   'output': 'flow:0', 'image_size': [32, 32, 32], 'warp': 'tf'}, f)
    os.makedirs(os.path.join(root, 'empty_dicom'))
    with open(os.path.join(root, 'bom.csv'), 'w', encoding='utf-8-sig') as f:
        f.write('id,image\nscan_a,absent.nii.gz\n')
    os.makedirs(os.path.join(root, 'evaluate'))
    for path, text in (('evaluate/tiny-2-test.txt', 'an earlier result\n'), ('taken/keep.txt', 'mine\n'),
                       ('existing.h5', 'an earlier conversion\n')):
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        with open(os.path.join(root, path), 'w') as f:
            f.write(text)
    return collections.namedtuple('Inputs', 'root spec')(root, synthetic_spec)


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_in_one_line(inputs, case):
    roots = [inputs.root, os.path.dirname(inputs.spec)]
    before = snapshot(roots)
    proc = run(case.script, case.args(inputs), inputs.root)
    lines = error_lines(proc)
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    assert case.culprit in lines[0], lines[0]
    after = snapshot(roots)
    assert after == before, {'new': sorted(set(after) - set(before)), 'removed': sorted(set(before) - set(after)),
                             'changed': sorted(p for p in before if p in after and before[p] != after[p])}
