"""predict.py: the written field against a known affine, outputs on the fixed file's grid,
LPBA40 end to end, the frozen export, and refusals of bad input."""
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import predict
import previews
import registration
from conftest import LPBA40, ROOT, error_lines, run_script

PREVIEWS = previews.FILES
CENTRE = np.array([12.0, -30.0, 45.0])
# Blobs of the phantom: (offset from CENTRE in mm, sigma in mm, amplitude); label = index + 2.
BLOBS = [((12.0, 5.0, -8.0), 6.0, 120.0), ((-14.0, -6.0, 6.0), 5.0, -60.0),
         ((2.0, 14.0, 10.0), 7.0, 80.0), ((-4.0, -12.0, -14.0), 5.5, 150.0)]
BODY_RADII = np.array([34.0, 27.0, 30.0])


def rotation(axis, angle):
    return np.reshape(sitk.VersorTransform(tuple(float(a) for a in axis), float(angle)).GetMatrix(), (3, 3))


# The known map from fixed to moving physical points: T(x) = L (x - CENTRE) + CENTRE + t.
T_LINEAR = 1.04 * rotation((0.2, 0.3, 1.0), 0.1)
T_SHIFT = np.array([5.0, -3.0, 4.0])


def true_map(points):
    return (np.asarray(points) - CENTRE) @ T_LINEAR.T + CENTRE + T_SHIFT


def phantom(points, ct):
    """Intensity and label of the phantom at physical points [k, 3] (mm)."""
    offset = np.asarray(points) - CENTRE
    radius = np.sqrt(np.sum((offset / BODY_RADII) ** 2, axis=1))
    body = 1.0 / (1.0 + np.exp((radius - 1.0) * 30.0))
    value = 100.0 * body
    labels = (radius < 1.0).astype(np.uint8)
    for k, (centre, sigma, amplitude) in enumerate(BLOBS):
        distance = np.sqrt(np.sum((offset - centre) ** 2, axis=1))
        value += amplitude * body * np.exp(-0.5 * (distance / sigma) ** 2)
        labels[distance < 1.2 * sigma] = k + 2
    if ct:
        return np.rint(value * 2.0 - 1000.0 * (1.0 - body)).astype(np.int16), labels
    return value.astype(np.float32), labels


def make_image(size, spacing, direction, centre, sample):
    """A sitk image of `size` centred on `centre` whose voxel values are sample(physical points)."""
    direction = np.asarray(direction, np.float64)
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    reference = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in origin])
    reference.SetDirection([float(d) for d in direction.flatten()])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing='ij'), -1).reshape(-1, 3)
    values = sample(physical_points(reference, index))
    images = []
    for array in values:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.reshape(size).transpose(2, 1, 0)))
        image.CopyInformation(reference)
        images.append(image)
    return images


def physical_points(image, index):
    matrix = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())[None, :]
    return np.asarray(image.GetOrigin()) + np.asarray(index, np.float64) @ matrix.T


def write_pair(directory, extension, ct):
    """Fixed and moving phantoms (+ label maps) related by the known map: moving(T(x)) = fixed(x).

    Anisotropic spacings and oblique directions, different for the two images."""
    fixed, fixed_seg = make_image((80, 72, 44), (1.1, 1.3, 2.2), rotation((1, 1, 3), 0.26), CENTRE,
                                  lambda x: phantom(x, ct))
    inverse = np.linalg.inv(T_LINEAR)
    moving, moving_seg = make_image((76, 84, 56), (1.25, 1.05, 1.8), rotation((0, 1, 0.3), -0.2),
                                    CENTRE + T_SHIFT,
                                    lambda y: phantom((y - CENTRE - T_SHIFT) @ inverse.T + CENTRE, ct))
    paths = {}
    for name, image in (('fixed', fixed), ('moving', moving), ('fixed_seg', fixed_seg), ('moving_seg', moving_seg)):
        paths[name] = str(directory / (name + extension))
        sitk.WriteImage(image, paths[name])
    return paths


class KnownFlow:
    """A stand-in network whose flow is the exact known map on the two preprocessed grids."""

    image_size = 48
    info = {'kind': 'known affine (test)'}

    def __init__(self, paths, modality):
        from data_util.images import read_image
        options = registration.preprocessing_options(None, self.image_size, {'modality': modality})
        pair = registration.preprocess_pair(read_image(paths['fixed']), read_image(paths['moving']), options)
        self.fixed_geometry, self.moving_geometry = pair.fixed_geometry, pair.moving_geometry

    def flow(self, fixed, moving):
        n = self.image_size
        grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing='ij'), -1).reshape(-1, 3)
        target = self.moving_geometry.physical_to_voxel(true_map(self.fixed_geometry.voxel_to_physical(grid)))
        return (target - grid).reshape(n, n, n, 3).astype(np.float32)


class ZeroFlow:
    """A stand-in network of a fixed 60 mm field of view (its preprocessing record) returning no motion."""

    image_size = 16
    info = {'kind': 'zero flow (test)', 'preprocessing': {'field_of_view': 60.0, 'threshold': 50.0}}

    def flow(self, fixed, moving):
        return np.zeros((self.image_size,) * 3 + (3,), np.float32)


def predict_args(paths, output, *extra):
    return predict.build_parser().parse_args(
        ['-c', 'known', '--fixed', paths['fixed'], '--moving', paths['moving'], '--moving_seg', paths['moving_seg'],
         '--fixed_seg', paths['fixed_seg'], '-o', str(output)] + list(extra))


def assert_same_geometry(image, reference, exact=True):
    assert image.GetSize() == reference.GetSize()
    for key in ('GetSpacing', 'GetOrigin', 'GetDirection'):
        a, b = getattr(image, key)(), getattr(reference, key)()
        assert (a == b) if exact else np.allclose(a, b, rtol=0, atol=1e-6), (key, a, b)


def check_outputs(output, paths, report, extension):
    """Every output present, on the fixed grid, and the warped image reproduced by SimpleITK.

    NIfTI stores an oblique direction as float32 quaternion and matrix, so a re-written
    oblique NIfTI header may differ from the one read in the last bits: tolerance 1e-6 there.
    """
    fixed, moving = sitk.ReadImage(paths['fixed']), sitk.ReadImage(paths['moving'])
    names = ['warped' + extension, 'field' + extension, 'warped_seg' + extension, 'predict.json'] + PREVIEWS
    assert sorted(os.listdir(output)) == sorted(names)
    for name in PREVIEWS:
        assert np.asarray(Image.open(os.path.join(output, name))).ndim == 3
    field = sitk.ReadImage(os.path.join(output, 'field' + extension))
    if extension == '.nii.gz':  # a gzip file of stored blocks: its size is the NIfTI's plus framing
        with gzip.open(os.path.join(output, 'field' + extension)) as f:
            size = len(f.read())
        assert size == 352 + field.GetNumberOfPixels() * 3 * 8 <= os.path.getsize(os.path.join(output, 'field' + extension))
    warped = sitk.ReadImage(os.path.join(output, 'warped' + extension))
    warped_seg = sitk.ReadImage(os.path.join(output, 'warped_seg' + extension))
    assert field.GetPixelID() == sitk.sitkVectorFloat64 and field.GetNumberOfComponentsPerPixel() == 3
    assert warped.GetPixelID() == moving.GetPixelID()
    axis_aligned = np.allclose(np.abs(fixed.GetDirection()), np.eye(3).flatten())
    for image in (field, warped, warped_seg):
        assert_same_geometry(image, fixed, exact=extension != '.nii.gz' or axis_aligned)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    again = sitk.Resample(moving, fixed, transform)
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(warped))
    stages = [s for s in registration.STAGES if s != 'refine']     # no --refine here
    assert set(stages) <= set(report['seconds']) and all(report['seconds'][s] >= 0 for s in stages)
    return fixed, field, warped


@pytest.mark.parametrize('extension,modality', [('.nii.gz', 'mr'), ('.mha', 'ct')])
def test_known_affine_field_maps_points(tmp_path, extension, modality):
    paths = write_pair(tmp_path, extension, modality == 'ct')
    model = KnownFlow(paths, modality)
    output = tmp_path / 'out'
    report = predict.predict(predict_args(paths, output, '--modality', modality), network=model)
    fixed, field, warped = check_outputs(output, paths, report, extension)
    transform = sitk.DisplacementFieldTransform(field)

    # Points of the phantom's body (inside the fixed crop), at voxel centres and between them.
    rng = np.random.default_rng(0)
    body = np.argwhere(sitk.GetArrayViewFromImage(sitk.ReadImage(paths['fixed_seg'])) > 0)[:, ::-1]
    jitter = rng.uniform(-0.5, 0.5, (400, 3))
    jitter[::2] = 0
    index = body[rng.choice(len(body), 400, replace=False)] + jitter
    points = physical_points(fixed, index)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    voxel = min(sitk.ReadImage(paths['moving']).GetSpacing())
    error = np.linalg.norm(mapped - true_map(points), axis=1)
    assert error.max() < voxel, error.max()
    assert error.max() < 1e-3, error.max()  # trilinear sampling of an affine flow is exact

    # The warped image is the fixed phantom again; the warped labels overlap the fixed ones.
    mask = sitk.GetArrayViewFromImage(sitk.ReadImage(paths['fixed_seg'])) > 0
    fixed_values = sitk.GetArrayViewFromImage(fixed)[mask].astype(np.float64)
    warped_values = sitk.GetArrayViewFromImage(warped)[mask].astype(np.float64)
    assert np.corrcoef(fixed_values, warped_values)[0, 1] > 0.98
    assert report['dice']['mean'] > 0.9 > report['dice']['mean_before'] + 0.1
    assert set(report['dice']['per_label']) == {'1', '2', '3', '4', '5'}


def test_foreground_outside_the_field_of_view_is_reported_and_warned_of(tmp_path, capsys):
    """A scan reaching far beyond the model's field of view (a bar 140 mm long, 60 mm seen) is
    warned of in one line naming its file, and predict.json holds both images' fractions; a
    scan inside it is not."""
    paths = {}
    for name, length in (('fixed', 20), ('moving', 70)):
        intensity = np.zeros((80, 24, 24), np.float32)
        intensity[5:5 + length, 7:17, 7:17] = 100.0
        image = sitk.GetImageFromArray(intensity.transpose(2, 1, 0))
        image.SetSpacing((2.0, 2.0, 2.0))
        paths[name] = str(tmp_path / (name + '.nii.gz'))
        sitk.WriteImage(image, paths[name])
    args = predict.build_parser().parse_args(['-c', 'zero', '--fixed', paths['fixed'], '--moving', paths['moving'],
                                              '-o', str(tmp_path / 'out'), '--outputs', 'warped'])
    report = predict.predict(args, network=ZeroFlow())
    outside = report['foreground_outside_field_of_view']
    assert outside['fixed'] == 0.0 and abs(outside['moving'] - (1 - 60 / 140)) < 0.02
    assert json.loads((tmp_path / 'out' / 'predict.json').read_text())['foreground_outside_field_of_view'] == outside
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert warnings == ['warning: ' + registration.outside_warnings(report, paths)[0]]
    assert warnings[0].startswith('warning: {}: 57 % of its foreground lies outside the model\'s 60 mm field of '
                                  'view'.format(paths['moving']))


def test_failure_leaves_nothing_and_force_replaces(tmp_path, monkeypatch):
    paths = write_pair(tmp_path, '.nii.gz', ct=False)
    model = KnownFlow(paths, 'mr')
    output = tmp_path / 'out'
    before = sorted(os.listdir(tmp_path))

    def broken(*args):
        raise OSError('disk full')
    monkeypatch.setattr(previews, 'write', broken)
    with pytest.raises(OSError):
        predict.predict(predict_args(paths, output), network=model)
    assert sorted(os.listdir(tmp_path)) == before
    monkeypatch.undo()

    predict.predict(predict_args(paths, output), network=model)
    with pytest.raises(predict.cli.UserError, match='exists'):
        predict.predict(predict_args(paths, output), network=model)
    report = predict.predict(predict_args(paths, output, '--force', '--format', 'nrrd'), network=model)
    assert report['format'] == 'nrrd' and os.path.isfile(output / 'warped.nrrd')
    assert not os.path.exists(output / 'warped.nii.gz')
    assert sorted(os.listdir(tmp_path)) == sorted(before + ['out'])


@pytest.mark.slow
def test_lpba40_pair_writes_every_output(tiny_run, tmp_path):
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    paths = {'fixed': os.path.join(LPBA40, 'fixed.nii.gz'),
             'moving': os.path.join(LPBA40, 'test', 'S02.delineation.skullstripped.nii.gz'),
             'fixed_seg': os.path.join(LPBA40, 'label', 'S01.delineation.structure.label.nii.gz'),
             'moving_seg': os.path.join(LPBA40, 'label', 'S02.delineation.structure.label.nii.gz')}
    proc = run_script('predict.py', '-c', tiny_run, '--fixed', paths['fixed'], '--moving', paths['moving'],
                      '--fixed_seg', paths['fixed_seg'], '--moving_seg', paths['moving_seg'], '-o', 'out',
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / 'out' / 'predict.json').read_text())
    fixed, _, warped = check_outputs(tmp_path / 'out', paths, report, '.nii.gz')
    assert_same_geometry(warped, fixed, exact=True)
    assert report['image_size'] == 64 and report['model']['kind'] == 'checkpoint'
    assert len(report['dice']['per_label']) == 56
    assert 0 < report['dice']['mean'] <= 1 and 0 < report['dice']['mean_before'] <= 1


@pytest.mark.slow
def test_export_runs_without_network_code(tiny_run, tmp_path):
    paths = write_pair(tmp_path, '.nii.gz', ct=False)
    proc = run_script('predict.py', '-c', tiny_run, '--export', 'exported', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / 'exported' / 'export.json').read_text())
    assert meta['image_size'] == [64] * 3 and meta['warp'] == 'tf' and meta['parameters'] > 0
    assert os.path.getsize(tmp_path / 'exported' / 'model.pb') > 4 * meta['parameters']

    args = ['-c', 'exported', '--fixed', paths['fixed'], '--moving', paths['moving'], '-o', 'from_export']
    code = textwrap.dedent('''
        import sys
        sys.path.insert(0, {root!r})
        import cli, predict, registration
        cli.run(lambda: predict.main({args!r}))
        print('loaded:', sorted(m for m in sys.modules if m in (
            'network.cascade', 'network.framework', 'network.subnets', 'network.aldk', 'network.losses', 'train')))
        from data_util.images import read_image
        options = registration.preprocessing_options(None, 64)
        pair = registration.preprocess_pair(read_image({fixed!r}), read_image({moving!r}), options)
        fixed, moving = pair.fixed_volume, pair.moving_volume
        frozen = registration.ExportedNetwork('exported').flow(fixed, moving)
        restored = registration.CheckpointNetwork({run!r}, 64).flow(fixed, moving)
        print('max flow difference:', abs(frozen - restored).max(), 'max flow:', abs(restored).max())
        ''').format(root=ROOT, args=args, fixed=paths['fixed'], moving=paths['moving'], run=str(tiny_run))
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'loaded: []' in proc.stdout, proc.stdout
    difference = float(proc.stdout.split('max flow difference:')[1].split()[0])
    assert difference < 1e-3, proc.stdout
    report = json.loads((tmp_path / 'from_export' / 'predict.json').read_text())
    assert report['model']['kind'] == 'export' and 'dice' not in report
    assert sorted(os.listdir(tmp_path / 'from_export')) == sorted(['warped.nii.gz', 'field.nii.gz', 'predict.json']
                                                                  + PREVIEWS)


def bad_cases(tmp_path, run, paths):
    (tmp_path / 'garbage.nii.gz').write_bytes(b'\x1f\x8b not an image' * 50)
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkFloat32), str(tmp_path / 'flat.nii.gz'))
    sitk.WriteImage(sitk.Image(10, 12, 14, sitk.sitkUInt8), str(tmp_path / 'small_seg.nii.gz'))
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'keep.txt').write_text('mine')
    pair = ['--fixed', paths['fixed'], '--moving', paths['moving']]
    return [
        (['-c', run, '--fixed', paths['fixed'], '--moving', tmp_path / 'garbage.nii.gz', '-o', 'out'], 'garbage'),
        (['-c', run, '--fixed', tmp_path / 'flat.nii.gz', '--moving', paths['moving'], '-o', 'out'], '3-D'),
        (['-c', run] + pair + ['--moving_seg', tmp_path / 'small_seg.nii.gz', '-o', 'out'], 'size'),
        (['-c', tmp_path / 'no_such_run'] + pair + ['-o', 'out'], 'checkpoint not found'),
        (['-c', run] + pair + ['-o', 'taken'], 'exists'),
        (['-c', run] + pair + ['-o', 'taken', '--force'], 'not an output of predict.py'),
        (['-c', run, '--fixed', tmp_path / 'missing.nii.gz', '--moving', paths['moving'], '-o', 'out'], 'missing'),
    ]


@pytest.mark.slow
def test_bad_input_one_line_error_nothing_written(tiny_run, tmp_path):
    paths = write_pair(tmp_path, '.mha', ct=True)
    cases = bad_cases(tmp_path, tiny_run, paths)
    before = sorted(os.listdir(tmp_path))
    for args, culprit in cases:
        proc = run_script('predict.py', *args, cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith('error: ') and culprit in lines[0], (args, lines)
        assert sorted(os.listdir(tmp_path)) == before, args
        assert os.listdir(tmp_path / 'taken') == ['keep.txt']


def _blob(path, shift, seg_path=None):
    index = np.indices((40, 36, 32)).transpose(1, 2, 3, 0) * 1.5
    inside = np.linalg.norm(index - np.array([30.0, 27.0, 24.0]) - shift, axis=-1) < 15.0
    image = sitk.GetImageFromArray(np.where(inside, 150.0, 10.0).astype(np.float32).transpose(2, 1, 0))
    image.SetSpacing([1.5] * 3)
    sitk.WriteImage(image, str(path))
    if seg_path:
        seg = sitk.GetImageFromArray(inside.astype(np.uint8).transpose(2, 1, 0) * 4)
        seg.CopyInformation(image)
        sitk.WriteImage(seg, str(seg_path))


@pytest.mark.slow
def test_batch_mode_loads_once_skips_done_pairs_and_reports_failures(tiny_run, tmp_path):
    (tmp_path / 'scans').mkdir()
    _blob(tmp_path / 'atlas.nii.gz', 0, tmp_path / 'atlas_seg.nii.gz')
    for i, shift in enumerate((2.0, -3.0, 4.0)):
        _blob(tmp_path / 'scans' / 'case{}.nii.gz'.format(i), shift, tmp_path / 'scans' / 'case{}_seg.nii.gz'.format(i))
    (tmp_path / 'scans' / 'broken.nii.gz').write_bytes(b'\x1f\x8b not an image')
    args = ['-c', tiny_run, '--fixed', 'atlas.nii.gz', '--fixed_seg', 'atlas_seg.nii.gz', '--moving',
            'scans/*[0-9].nii.gz', '--moving_seg', 'scans/{id}_seg.nii.gz', '-o', 'cohort']
    proc = run_script('predict.py', *args, '--outputs', 'warped,seg', '--field_dtype', 'float32', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / 'cohort' / 'summary.json').read_text())
    assert [r['id'] for r in summary['pairs']] == ['case0', 'case1', 'case2'] and summary['registered'] == 3
    assert all(0 <= r['dice'] <= 1 and r['seconds']['network'] > 0 for r in summary['pairs'])
    assert sorted(os.listdir(tmp_path / 'cohort' / 'case1')) == ['predict.json', 'warped.nii.gz', 'warped_seg.nii.gz']
    rows = (tmp_path / 'cohort' / 'summary.csv').read_text().splitlines()
    assert rows[0].startswith('id,status,fixed,moving,dice') and len(rows) == 4 and 'dice_4' in rows[0]

    # a re-run skips what is done; a pair that fails is reported, the others still run
    (tmp_path / 'pairs.csv').write_text('id,fixed,moving\nagain,atlas.nii.gz,scans/case2.nii.gz\n'
                                        'bad,atlas.nii.gz,scans/broken.nii.gz\n')
    shutil.rmtree(tmp_path / 'cohort' / 'case2')
    proc = run_script('predict.py', *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / 'cohort' / 'summary.json').read_text())
    assert (summary['registered'], summary['skipped']) == (1, 2)
    assert [r['status'] for r in summary['pairs']] == ['done before', 'done before', 'registered']
    assert all(0 <= r['dice'] <= 1 for r in summary['pairs'])     # the summary covers the pairs done before
    proc = run_script('predict.py', '-c', tiny_run, '--pairs', 'pairs.csv', '-o', 'listed', cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 2 and lines[0].startswith('bad: failed: ') and len(lines) == 2, proc.stderr
    assert lines[1].startswith('error: 1 of 2 pairs failed (first: bad') and 'Traceback' not in proc.stderr
    summary = json.loads((tmp_path / 'listed' / 'summary.json').read_text())
    assert [r['status'] for r in summary['pairs']] == ['registered', 'failed']
    assert 'cannot read image' in summary['pairs'][1]['error'] and not (tmp_path / 'listed' / 'bad').exists()


@pytest.mark.slow
def test_batch_on_a_local_dask_cluster_matches_the_serial_run(tiny_run, tmp_path):
    pytest.importorskip('distributed')
    (tmp_path / 'scans').mkdir()
    _blob(tmp_path / 'atlas.nii.gz', 0, tmp_path / 'atlas_seg.nii.gz')
    for i, shift in enumerate((2.0, -3.0, 4.0)):
        _blob(tmp_path / 'scans' / 'case{}.nii.gz'.format(i), shift, tmp_path / 'scans' / 'case{}_seg.nii.gz'.format(i))
    args = ['-c', tiny_run, '--fixed', 'atlas.nii.gz', '--fixed_seg', 'atlas_seg.nii.gz', '--moving',
            'scans/*[0-9].nii.gz', '--moving_seg', 'scans/{id}_seg.nii.gz', '--outputs', 'warped,field']
    for name, extra in (('serial', []), ('dask', ['--workers', '2'])):
        proc = run_script('predict.py', *args, '-o', name, *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    serial, spread = [json.loads((tmp_path / name / 'summary.json').read_text()) for name in ('serial', 'dask')]
    assert spread['workers'] == 2 and spread['registered'] == 3
    for a, b in zip(serial['pairs'], spread['pairs']):
        assert a['id'] == b['id'] and abs(a['dice'] - b['dice']) < 1e-6
        for output in ('warped.nii.gz', 'field.nii.gz'):
            first, second = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / a['id'] / output)))
                             for name in ('serial', 'dask')]
            np.testing.assert_allclose(first, second, atol=1e-4)


@pytest.mark.parametrize('direction', [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])])
def test_previews_are_radiological_whatever_the_file_axes(tmp_path, direction):
    """A block at the patient's left-anterior shows in the axial view's top right (radiological:
    the patient's left on the viewer's right, anterior up), whatever the file's axes."""
    image = sitk.Image([40, 36, 12], sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.5, 3.0))
    image.SetDirection(direction.flatten().tolist())
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()[::-1]], indexing='ij'), -1)[..., ::-1]
    physical = index @ (direction * np.asarray(image.GetSpacing())[None]).T     # [z, y, x, LPS]
    centre = physical.reshape(-1, 3).mean(0)
    left, anterior = physical[..., 0] - centre[0], centre[1] - physical[..., 1]
    array = np.where((left > 5) & (left < 15) & (anterior > 4) & (anterior < 14), 100.0, 0.0).astype(np.float32)
    volume = sitk.GetImageFromArray(array)
    volume.CopyInformation(image)
    field = np.zeros(array.shape + (3,))
    previews.write(str(tmp_path), volume, volume, volume, field, volume, {'modality': 'mr', 'percentiles': (0.5, 99.5),
                                                                          'window': (40.0, 400.0)})
    assert sorted(os.listdir(tmp_path)) == sorted(previews.FILES)
    pixels = np.asarray(Image.open(tmp_path / 'preview_fixed.png').convert('L')).astype(int)
    top, x0 = previews.TITLE_HEIGHT, previews.GAP
    width = int(np.argmax(pixels[top + 1, x0:] == 255))        # the axial view: black, white beyond
    height = int(np.argmax(np.append(pixels[top:, x0], 255) == 255))
    axial = pixels[top:top + height, x0:x0 + width]
    assert axial.shape[0] > 10 and axial.shape[1] > 10
    rows, cols = np.nonzero(axial > 128)
    assert len(rows) > 0
    assert cols.min() > width / 2 and rows.max() < height / 2, (rows.min(), rows.max(), cols.min(), cols.max())
