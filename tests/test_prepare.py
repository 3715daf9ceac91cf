"""data_util.prepare: scans -> HDF5 + JSON spec, geometry round trips, refusals, LPBA40."""
import json
import os
import subprocess
import sys
from unittest import mock

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import LPBA40, ROOT
from data_util import geometry, images, prepare
from data_util.geometry import grid_to_original, load_geometry, preprocessed_grid_image, to_array

SIZE = 32
SPACING = (0.9, 1.3, 2.2)
ORIGIN = (12.0, -30.0, 45.0)
ANGLE = np.deg2rad(25.0)
# A flip of the first axis times a rotation of 25 degrees about z: oblique, not a permutation.
DIRECTION = np.diag([-1.0, 1.0, 1.0]) @ np.array([[np.cos(ANGLE), -np.sin(ANGLE), 0.0],
                                                 [np.sin(ANGLE), np.cos(ANGLE), 0.0],
                                                 [0.0, 0.0, 1.0]])
SHAPE = (48, 40, 22)                       # ITK size (i, j, k)
BLOB_INDEX = np.array([30.0, 14.0, 12.0])  # ITK continuous index of the small blob's centre
BLOB_RADIUS = 5.0                          # mm
LPBA_LABELS = (list(range(21, 35)) + list(range(41, 51)) + list(range(61, 69))
               + list(range(81, 93)) + [101, 102, 121, 122] + list(range(161, 167)) + [181, 182])


def _physical(index):
    """ITK continuous indices [..., 3] -> physical points (mm) of the synthetic geometry."""
    return np.asarray(ORIGIN) + (np.asarray(index) * SPACING) @ DIRECTION.T


def _image(array_xyz, pixel_type=None):
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION.flatten().tolist())
    return image if pixel_type is None else sitk.Cast(image, pixel_type)


def _write_scan(directory, name, shift, image_ext, label_ext):
    """A body ellipsoid (~100) with a bright blob (label 5) and a large second structure
    (label 300, forcing uint16) on an anisotropic oblique grid. Returns (image path, label path,
    blob centre in mm)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij'), -1)
    points = _physical(index)
    centre = _physical((np.asarray(SHAPE) - 1) / 2.0)
    blob = _physical(BLOB_INDEX + shift)
    body_radii = np.asarray(SHAPE) * SPACING * [0.3, 0.4, 0.35]
    body = np.sum((((index - (np.asarray(SHAPE) - 1) / 2.0) * SPACING) / body_radii) ** 2, -1) <= 1
    in_blob = np.linalg.norm(points - blob, axis=-1) <= BLOB_RADIUS
    second = body & (np.linalg.norm(points - centre, axis=-1) <= 9.0) & ~in_blob
    rng = np.random.RandomState(len(name))
    intensity = np.where(body, 100.0, 0.0) + 100.0 * in_blob + 40.0 * second
    intensity += rng.normal(0, 2.0, intensity.shape)
    label = np.where(in_blob, 5, np.where(second, 300, 0)).astype(np.uint16)
    image_path = os.path.join(directory, name + image_ext)
    label_path = os.path.join(directory, name + '_seg' + label_ext)
    sitk.WriteImage(_image(intensity.astype(np.float32)), image_path)
    sitk.WriteImage(_image(label), label_path)
    return image_path, label_path, blob


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """Two synthetic scans (NIfTI and MHA) with label maps and landmarks, converted by the CLI."""
    directory = str(tmp_path_factory.mktemp('prepare'))
    first = _write_scan(directory, 'a', np.zeros(3), '.nii.gz', '.mha')
    second = _write_scan(directory, 'b', np.array([-4.0, 3.0, -2.0]), '.mha', '.nii.gz')
    landmarks = os.path.join(directory, 'a_points.csv')
    with open(landmarks, 'w') as f:
        f.write('x,y,z\n{},{},{}\nnan,nan,nan\n# far outside\n900 900 900\n'.format(*first[2]))
    listing = os.path.join(directory, 'list.csv')
    with open(listing, 'w') as f:
        f.write('id,image,label,landmarks\n')
        f.write('a,a.nii.gz,a_seg.mha,a_points.csv\n')
        f.write('b,b.mha,b_seg.nii.gz,\n')
    output = os.path.join(directory, 'out.h5')
    spec = os.path.join(directory, 'out.json')
    result = subprocess.run(
        [sys.executable, '-m', 'data_util.prepare', '--list', listing, '--output', output,
         '--spec', spec, '--image_size', str(SIZE), '--atlas', 'a', '--subset', 'train=b',
         '--subset', 'test=a,b'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {'dir': directory, 'output': output, 'spec': spec, 'scans': {'a': first, 'b': second},
            'listing': listing}


def _centroid(mask):
    return np.mean(np.argwhere(mask), axis=0)


def test_hdf5_layout_and_spec(converted):
    with h5py.File(converted['output'], 'r') as h5:
        assert sorted(h5.keys()) == ['a', 'b']
        for scan_id in ('a', 'b'):
            group = h5[scan_id]
            volume, segmentation = group['volume'][...], group['segmentation'][...]
            assert volume.shape == (SIZE,) * 3 and volume.dtype == np.uint8
            assert volume.min() == 0 and volume.max() == 255
            assert segmentation.shape == (SIZE,) * 3 and segmentation.dtype == np.uint16
            assert set(np.unique(segmentation)) == {0, 5, 300}
            geometry = load_geometry(group)
            assert geometry.original_size == SHAPE
            np.testing.assert_allclose(geometry.original_spacing, SPACING, rtol=1e-5)
            np.testing.assert_allclose(geometry.original_origin, ORIGIN, atol=1e-4)
            np.testing.assert_allclose(geometry.original_direction, DIRECTION.flatten(), atol=1e-5)
            assert geometry.grid_size == (SIZE,) * 3
            assert len(set(np.round(geometry.grid_spacing, 9))) == 1
            direction = np.reshape(geometry.grid_direction, (3, 3))
            np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)
            # the LPS reorientation: each grid axis is the nearest world axis, positively
            np.testing.assert_array_equal(np.argmax(np.abs(direction), 0), [0, 1, 2])
            assert np.all(np.diag(direction) > 0)
            # the crop: the whole body lies inside the grid, which spans its longest side
            # plus the margins (to within the voxel discretisation)
            source = sitk.ReadImage(group.attrs['source_image'])
            body = np.argwhere(to_array(source) > 50)
            inside = images.landmarks_to_voxels(_physical(body), geometry)
            assert np.all(inside >= 0)
            step = geometry.grid_spacing[0]
            longest = np.max(inside.max(axis=0) - inside.min(axis=0)) * step
            assert abs(longest + 2 * images.DEFAULT_MARGIN - SIZE * step) < 3.0
        assert 'point' not in h5['b'] and h5['a']['point'].shape == (3, 3)
    with open(converted['spec']) as f:
        spec = json.load(f)
    assert spec['files'] == {'out': {'path': 'out.h5', 'type': 'HDF5'}}
    assert spec['image_size'] == [SIZE] * 3 and spec['image_type'] == 'brain'
    assert spec['atlas'] == 'out/a'
    assert spec['segmentation_class_value'] == {'5': 5, '300': 300}
    assert spec['subsets'] == {'train': ['out/b'], 'test': ['out/a', 'out/b']}
    assert spec['schemes'] == {'1': {'train': 1.0}, 'test': {'test': 1.0}}


def test_physical_point_maps_to_blob_voxel(converted):
    with h5py.File(converted['output'], 'r') as h5:
        for scan_id, (_, _, blob_mm) in converted['scans'].items():
            group = h5[scan_id]
            geometry = load_geometry(group)
            voxel = images.landmarks_to_voxels(blob_mm[None], geometry)[0]
            segmentation = group['segmentation'][...]
            assert np.linalg.norm(_centroid(segmentation == 5) - voxel) < 1.0
            # the blob is bright in the volume too, and sitk agrees on the grid geometry
            grid = preprocessed_grid_image(group)
            index = grid.TransformPhysicalPointToIndex(blob_mm.tolist())
            assert grid.GetPixel(index) > 200
            np.testing.assert_allclose(grid.TransformPhysicalPointToContinuousIndex(
                blob_mm.tolist()), voxel, atol=1e-3)
        points = h5['a']['point'][...]
        blob_voxel = images.landmarks_to_voxels(converted['scans']['a'][2][None], load_geometry(h5['a']))[0]
        np.testing.assert_allclose(points[0], blob_voxel, atol=1e-4)
        np.testing.assert_array_equal(points[1:], -1)


def test_grid_result_maps_back_to_original(converted):
    with h5py.File(converted['output'], 'r') as h5:
        for scan_id, (_, label_path, _) in converted['scans'].items():
            group = h5[scan_id]
            geometry = load_geometry(group)
            grid = preprocessed_grid_image(group, group['segmentation'][...])
            back = grid_to_original(grid, geometry, nearest=True)
            assert back.GetSize() == SHAPE
            np.testing.assert_allclose(back.GetOrigin(), geometry.original_origin)
            np.testing.assert_allclose(back.GetDirection(), geometry.original_direction)
            mapped = to_array(back) == 5
            original = to_array(sitk.ReadImage(label_path)) == 5
            # blob centroids in original voxels (one voxel of 0.9..2.2 mm)
            assert np.all(np.abs(_centroid(mapped) - _centroid(original)) < 1.0)
            dice = 2 * np.sum(mapped & original) / (mapped.sum() + original.sum())
            assert dice > 0.7


def test_displacement_field_between_grids(converted):
    """A flow on scan a's grid -> mm on a's original grid (data_util.geometry.displacement_field)."""
    with h5py.File(converted['output'], 'r') as h5:
        fixed, moving = load_geometry(h5['a']), load_geometry(h5['b'])
    reference = fixed.original_reference()
    index = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing='ij'), -1).astype(np.float64)
    # the flow that sends every fixed voxel to the same physical point of the moving grid
    same_point = moving.physical_to_voxel(fixed.voxel_to_physical(index.reshape(-1, 3)))
    flow = same_point.reshape(index.shape) - index
    np.testing.assert_allclose(geometry.displacement_field(flow, fixed, moving, reference), 0, atol=1e-6)
    shift = geometry.displacement_field(np.ones((SIZE,) * 3 + (3,)), fixed, fixed, reference)
    expected = np.reshape(fixed.grid_direction, (3, 3)) @ np.asarray(fixed.grid_spacing)
    np.testing.assert_allclose(shift[3, 4, 5], expected, atol=1e-9)
    # slabs on two threads: the same field to the bit
    rough = np.random.default_rng(1).normal(0, 2, flow.shape)
    single = geometry.displacement_field(rough, fixed, moving, reference)
    with mock.patch.object(geometry, 'CHUNK_VOXELS', 3 * np.prod(reference.GetSize()[:2])):
        np.testing.assert_array_equal(geometry.displacement_field(rough, fixed, moving, reference, threads=2), single)


def test_preprocess_on_single_file_matches_converter(converted):
    image_path, label_path, _ = converted['scans']['b']
    volume, segmentation, geometry = images.preprocess(image_path, label_path, image_size=SIZE)
    with h5py.File(converted['output'], 'r') as h5:
        np.testing.assert_array_equal(volume, h5['b']['volume'][...])
        np.testing.assert_array_equal(segmentation, h5['b']['segmentation'][...])
        assert geometry == load_geometry(h5['b'])


def test_ct_window_roi_and_spacing(converted):
    image_path = converted['scans']['a'][0]
    with h5py.File(converted['output'], 'r') as h5:
        direction = np.reshape(load_geometry(h5['a']).grid_direction, (3, 3))
    # an ROI box of 20 mm sides, axis-aligned in the grid frame (this scan is oblique)
    centre = _physical((np.asarray(SHAPE) - 1) / 2.0)
    roi = (centre + direction @ np.full(3, -10.0), centre + direction @ np.full(3, 10.0))
    volume, segmentation, geometry = images.preprocess(
        image_path, image_size=16, modality='ct', window=(100.0, 200.0), roi=roi)
    assert segmentation is None and geometry.intensity_window == (0.0, 200.0)
    np.testing.assert_allclose(geometry.grid_spacing, 20.0 / 16)
    np.testing.assert_allclose(geometry.voxel_to_physical([[7.5, 7.5, 7.5]])[0], centre, atol=1e-6)
    _, _, fixed = images.preprocess(image_path, image_size=16, spacing=3.0)
    np.testing.assert_allclose(fixed.grid_spacing, 3.0)


@pytest.mark.parametrize('dtype', [np.uint8, np.int16, np.int32, np.float32])
def test_freesurfer_mgz_reads_as_its_nifti_twin(tmp_path, dtype):
    """A FreeSurfer .mgz (big-endian, FreeSurfer's own header fields) is read with the geometry
    and voxels that SimpleITK's NIfTI reader gives the same array and voxel-to-RAS matrix
    (both files written by nibabel): an oblique, flipped, anisotropic grid, and FreeSurfer's
    conformed LIA orientation."""
    import nibabel
    rng = np.random.default_rng(3)
    array = (rng.random((12, 9, 7)) * 100).astype(dtype)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    oblique = np.eye(4)
    oblique[:3, :3] = lps_to_ras @ DIRECTION @ np.diag(SPACING)
    oblique[:3, 3] = lps_to_ras @ np.asarray(ORIGIN)
    conformed = np.array([[-1.0, 0, 0, 6], [0, 0, 1, -4], [0, -1, 0, 5], [0, 0, 0, 1]])
    for name, affine in (('oblique', oblique), ('conformed', conformed)):
        nibabel.save(nibabel.MGHImage(array, affine), str(tmp_path / (name + '.mgz')))
        nibabel.save(nibabel.Nifti1Image(array, affine), str(tmp_path / (name + '.nii.gz')))
        ours = images.read_image(str(tmp_path / (name + '.mgz')))
        twin = sitk.ReadImage(str(tmp_path / (name + '.nii.gz')))
        assert ours.GetSize() == twin.GetSize() == array.shape
        np.testing.assert_allclose(ours.GetSpacing(), twin.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(ours.GetOrigin(), twin.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ours.GetDirection(), twin.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(twin))
    np.testing.assert_allclose(ours.TransformIndexToPhysicalPoint((2, 3, 4)), (-6 + 2, -(-4 + 4), 5 - 3))
    assert prepare.scan_id_from_path('scans/sub01.mgz') == 'sub01'


def test_label_map_never_changes_the_grid():
    """The crop comes from the image alone (as predict.py must do): a label outside the
    foreground changes neither the grid nor the volume; it is kept on the original grid."""
    intensity = np.zeros((40, 30, 30), np.float32)
    intensity[10:30, 10:20, 10:20] = 100.0
    label = np.zeros(intensity.shape, np.uint8)
    label[1:6, 12:18, 12:18] = 7
    image = sitk.GetImageFromArray(intensity.transpose(2, 1, 0))
    label_image = sitk.GetImageFromArray(label.transpose(2, 1, 0))
    volume, segmentation, geometry = images.preprocess(image, label_image, image_size=16)
    alone, _, geometry_alone = images.preprocess(image, None, image_size=16)
    assert geometry == geometry_alone
    np.testing.assert_array_equal(volume, alone)
    # x over the body alone, plus 4 mm margins
    np.testing.assert_allclose(geometry.grid_spacing, (20 + 8) / 16.0)
    assert not np.any(segmentation == 7)


def test_field_of_view_centres_on_the_centroid():
    """--field_of_view: a cube of the given side around the foreground's centroid, so the same
    anatomy moved in space gives the same volume on a grid moved with it."""
    intensity = np.zeros((40, 36, 30), np.float32)
    intensity[8:30, 10:20, 6:20] = 100.0
    intensity[8:12, 10:14, 6:9] = 180.0
    image = sitk.GetImageFromArray(intensity.transpose(2, 1, 0))
    image.SetSpacing((1.2, 1.0, 1.5))
    shifted = sitk.Image(image)
    shift = np.array([7.3, -4.0, 11.5])
    shifted.SetOrigin(tuple(np.asarray(image.GetOrigin()) + shift))
    volume, _, geometry = images.preprocess(image, image_size=16, field_of_view=48.0)
    moved, _, moved_geometry = images.preprocess(shifted, image_size=16, field_of_view=48.0)
    np.testing.assert_allclose(geometry.grid_spacing, 3.0)
    centroid = (np.array([8 + 29, 10 + 19, 6 + 19]) / 2.0) * image.GetSpacing()
    centre = np.asarray(geometry.grid_origin) + 1.5 * 15
    np.testing.assert_allclose(centre, centroid, atol=1e-6)
    np.testing.assert_allclose(np.subtract(moved_geometry.grid_origin, geometry.grid_origin), shift, atol=1e-6)
    np.testing.assert_array_equal(volume, moved)
    with pytest.raises(images.PrepareError, match='field of view'):
        images.preprocess(image, image_size=16, field_of_view=48.0, spacing=2.0)
    with pytest.raises(images.PrepareError, match='field of view'):
        images.preprocess(image, image_size=16, field_of_view=float('nan'))


def test_foreground_outside_the_field_of_view_against_numpy():
    """images.foreground_outside: the fraction of the foreground voxels (components of at least
    1 % of the largest) whose centres fall outside the preprocessed cube, as counted voxel by
    voxel in NumPy from the grid's geometry; exact at 2 mm voxels, close at 1 mm (measured on
    the image shrunk to 2 mm); 0 when the cube holds the whole foreground."""
    def bar(spacing, speck):
        scale = int(2 / spacing)
        intensity = np.zeros((80 * scale, 30 * scale, 30 * scale), np.float32)
        intensity[5 * scale:75 * scale, 10 * scale:20 * scale, 10 * scale:20 * scale] = 100.0   # 140 mm long
        intensity[2 * scale, 2 * scale, 2 * scale] = 100.0 * speck   # below 1 % of the bar: not foreground
        image = sitk.GetImageFromArray(intensity.transpose(2, 1, 0))
        image.SetSpacing((spacing,) * 3)
        image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        image.SetOrigin((3.0, -7.0, 11.0))
        return image

    def reference(image, geometry):
        mask = sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 50
        direction = np.reshape(image.GetDirection(), (3, 3))
        points = np.asarray(image.GetOrigin()) + (np.argwhere(mask) * np.asarray(image.GetSpacing())) @ direction.T
        voxels = geometry.physical_to_voxel(points)
        return 1.0 - np.all((voxels > -0.5) & (voxels < 15.5), axis=1).mean()

    for spacing, tolerance in ((2.0, 1e-12), (1.0, 0.02)):
        image = bar(spacing, speck=True)
        _, _, geometry = images.preprocess(image, image_size=16, field_of_view=60.0, threshold=50.0)
        outside = images.foreground_outside(image, geometry, threshold=50.0)
        expected = reference(bar(spacing, speck=False), geometry)
        assert abs(expected - (1 - 60.0 / 140.0)) < 0.02
        assert abs(outside - expected) <= tolerance, (spacing, outside, expected)
        _, _, whole = images.preprocess(image, image_size=16, field_of_view=200.0, threshold=50.0)
        assert images.foreground_outside(image, whole, threshold=50.0) == 0.0


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, '-m', 'data_util.prepare'] + args, cwd=cwd,
                          capture_output=True, text=True)


def _assert_refused(code, stderr, output_dir, fragment):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], stderr
    assert 'Traceback' not in stderr
    assert not [n for n in os.listdir(output_dir) if n.startswith('.') or n.startswith('new')]


def test_refuses_to_overwrite(converted, capsys):
    before = os.path.getmtime(converted['output'])
    code = prepare.main(['--list', converted['listing'], '--output', converted['output'],
                         '--image_size', '8', '--quiet'])
    assert code == 2
    assert 'refusing to overwrite' in capsys.readouterr().err
    assert os.path.getmtime(converted['output']) == before


@pytest.mark.parametrize('case', ['unreadable', 'two_d', 'label_size', 'missing'])
def test_bad_inputs_exit_2_without_output(converted, tmp_path, capsys, case):
    directory = converted['dir']
    good_image, good_label, _ = converted['scans']['a']
    rows = ['good,{},{}'.format(good_image, good_label)]
    if case == 'unreadable':
        bad = tmp_path / 'junk.nii.gz'
        bad.write_text('not an image\n')
        rows.append('bad,{}'.format(bad))
        fragment = 'cannot read image'
    elif case == 'two_d':
        bad = str(tmp_path / 'slice.mha')
        sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), bad)
        rows.append('bad,{}'.format(bad))
        fragment = 'a 3-D volume is needed'
    elif case == 'label_size':
        bad = str(tmp_path / 'small_seg.mha')
        sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkUInt8), bad)
        rows.append('bad,{},{}'.format(good_image, bad))
        fragment = 'has size 10x10x10'
    else:
        rows.append('bad,{}'.format(os.path.join(directory, 'absent.nii.gz')))
        fragment = 'no such file'
    listing = tmp_path / 'list.csv'
    listing.write_text('\n'.join(rows) + '\n')
    output_dir = tmp_path / 'out'
    output_dir.mkdir()
    args = ['--list', str(listing), '--output', str(output_dir / 'new.h5'),
            '--spec', str(output_dir / 'new.json'), '--image_size', '8']
    if case == 'unreadable':
        result = _run_cli(args, ROOT)
        _assert_refused(result.returncode, result.stderr, str(output_dir), fragment)
    else:
        code = prepare.main(args + ['--quiet'])
        _assert_refused(code, capsys.readouterr().err, str(output_dir), fragment)
    assert os.listdir(str(output_dir)) == []


def test_lpba_spec_matches_builder():
    """datasets/lpba.json is exactly what the --lpba40 mode writes for all 40 scans."""
    path = os.path.join(ROOT, 'datasets', 'lpba.json')
    ids = ['S{:02d}'.format(i) for i in range(1, 41)]
    expected = prepare.build_spec('lpba', os.path.join(ROOT, 'datasets', 'lpba.h5'), path, ids,
                                  128, 'brain', prepare.LPBA40_ATLAS, prepare.LPBA40_SUBSETS,
                                  label_values=LPBA_LABELS, strict=False,
                                  preprocessing=images.preprocessing_record(
                                      field_of_view=prepare.LPBA40_FIELD_OF_VIEW))
    with open(path) as f:
        assert json.load(f) == expected
    assert len(expected['segmentation_class_value']) == 56
    assert expected['subsets']['train'] == ['lpba/S{:02d}'.format(i) for i in range(11, 36)]
    assert expected['subsets']['val'] == ['lpba/S{:02d}'.format(i) for i in range(36, 41)]
    assert expected['subsets']['test'] == ['lpba/S{:02d}'.format(i) for i in range(2, 11)]


@pytest.mark.slow
def test_lpba40_subset(tmp_path, capsys):
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {}'.format(LPBA40))
    output, spec_path = str(tmp_path / 'lpba.h5'), str(tmp_path / 'lpba.json')
    code = prepare.main(['--lpba40', LPBA40, '--ids', 'S01,S02,S11', '--image_size', '64',
                         '--output', output, '--spec', spec_path, '--quiet'])
    assert code == 0, capsys.readouterr().err
    with open(spec_path) as f:
        spec = json.load(f)
    assert spec['atlas'] == 'lpba/S01'
    assert spec['subsets'] == {'train': ['lpba/S11'], 'test': ['lpba/S02']}
    assert spec['segmentation_class_value'] == {str(v): v for v in LPBA_LABELS}
    with h5py.File(output, 'r') as h5:
        assert sorted(h5.keys()) == ['S01', 'S02', 'S11']
        for scan_id in h5:
            group = h5[scan_id]
            volume, segmentation = group['volume'][...], group['segmentation'][...]
            assert volume.shape == segmentation.shape == (64, 64, 64)
            assert volume.dtype == segmentation.dtype == np.uint8
            assert volume.min() == 0 and volume.max() == 255
            # The smallest LPBA40 structure has ~3,100 mm^3; a 64^3 voxel here is ~2.7 mm
            # wide (~20 mm^3), so every one of the 56 structures keeps ~100+ voxels.
            values, counts = np.unique(segmentation, return_counts=True)
            assert list(values[1:]) == LPBA_LABELS and counts[1:].min() > 30
            geometry = load_geometry(group)
            assert geometry.original_size == (160, 192, 160)
            assert geometry.original_spacing == (1.0, 1.0, 1.0)
            assert geometry.grid_direction == tuple(np.eye(3).flatten())
            # labels mapped back onto the 1 mm grid agree with the source on most voxels
            back = grid_to_original(
                preprocessed_grid_image(group, segmentation), geometry, nearest=True)
            source_image = sitk.ReadImage(group.attrs['source_label'])
            source = to_array(source_image)
            assert np.mean(to_array(back) == source) > 0.95
            np.testing.assert_array_equal(group['original_segmentation'][...], source)
            assert geometry.grid_spacing == (3.0,) * 3    # the 192 mm field of view at 64^3
            # LPBA40 labels reach below the skull-stripped image (brainstem, cerebellum): the
            # crop covers them too
            labelled = np.argwhere(source > 0)
            corners = [source_image.TransformIndexToPhysicalPoint([int(v) for v in c])
                       for c in (labelled.min(axis=0), labelled.max(axis=0))]
            assert np.all(images.landmarks_to_voxels(corners, geometry) >= 0)
