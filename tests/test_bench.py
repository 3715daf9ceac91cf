"""The benchmark scripts run end to end at a small size (their numbers are not checked here:
timings belong in the benchmarks' own tables, not in tests)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import LPBA40, ROOT


@pytest.mark.parametrize('module,args,rows', [
    ('bench.train_step', ['--size', '64', '--steps', '2', '--warmup', '0', '--configs', 'aldk'], 1),
    ('bench.inference', ['--size', '64', '--cascades', '1', '--repeats', '1', '--warmup', '0',
                         '--networks', 'student'], 1),
    ('bench.warp', ['--size', '16'], 8),  # 4 cases x (fwd, fwd+bwd)
])
def test_benchmark_prints_its_table(module, args, rows):
    proc = subprocess.run([sys.executable, '-m', module] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('|')]
    assert len(table) == 2 + rows, proc.stdout  # header, rule and the rows
    assert all('nan' not in row for row in table), proc.stdout


@pytest.mark.slow
def test_cold_start_benchmark_prints_its_tables():
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    proc = subprocess.run([sys.executable, '-m', 'bench.cold_start', '--repeats', '1', '--warmup', '0',
                           '--network_repeats', '1', '--profile', '2', '--outputs', 'warped'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split('|')[1].strip() for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert rows == ['runtime', 'onnxruntime', 'tensorflow', 'runtime', 'tensorflow', 'onnxruntime', 'kind',
                    'convolution', 'transposed convolution', 'gather (the warp)', 'resize (flow upsampling)', 'other',
                    'total'], proc.stdout
    totals = [float(cell) for cell in proc.stdout.splitlines()[-1].split('|')[2:4]]
    assert all(total > 0 for total in totals), proc.stdout
    assert 'nan' not in proc.stdout


def test_batch_benchmark_prints_a_row_per_outputs_choice(tmp_path):
    """Two LPBA40 pairs per choice; the rows name their choice and hold finite figures."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    proc = subprocess.run([sys.executable, '-m', 'bench.batch', '--pairs', '2', '--outputs', 'warped', 'warped,field',
                           '--json', str(tmp_path / 'rows.json')], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split('|')[1].strip() for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert rows == ['--outputs', 'warped', 'warped,field'], proc.stdout
    assert 'nan' not in proc.stdout
    assert [row['pairs'] for row in json.loads((tmp_path / 'rows.json').read_text())] == [2, 2]


def _labelled_image():
    """A 20 x 24 x 18 (x, y, z) float image with a 2 x 1.5 x 1 mm grid, a rotated direction and an
    offset origin, and an integer label map on the same grid."""
    import SimpleITK as sitk
    rng = np.random.default_rng(3)
    values = rng.uniform(0.0, 100.0, (18, 24, 20))
    image = sitk.GetImageFromArray(values)
    image.SetSpacing([2.0, 1.5, 1.0])
    image.SetOrigin([-10.0, 4.0, 7.0])
    image.SetDirection([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    labels = sitk.GetImageFromArray(rng.integers(0, 5, values.shape).astype(np.int16))
    labels.CopyInformation(image)
    return image, labels


def test_robustness_perturbations_stored_otherwise_keeps_the_physical_content():
    import SimpleITK as sitk
    from bench.robustness import STORED_ORIENTATION, perturbations
    image, labels = _labelled_image()
    moved, moved_labels = perturbations()['stored with axes {}'.format(STORED_ORIENTATION)](image, labels)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(moved.GetDirection()) == STORED_ORIENTATION
    assert moved.GetSize() != image.GetSize()
    for out, original, interpolator in ((moved, image, sitk.sitkLinear), (moved_labels, labels, sitk.sitkNearestNeighbor)):
        back = sitk.Resample(out, original, sitk.Transform(), interpolator, -1)
        np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original), atol=1e-9)


def test_robustness_perturbations_thick_slices_average_three_slices_and_keep_the_middle_label():
    import SimpleITK as sitk
    from bench.robustness import SLICE_FACTOR, perturbations
    image, labels = _labelled_image()
    thick, thick_labels = perturbations()['thick slices ({} mm, I-S axis)'.format(SLICE_FACTOR)](image, labels)
    assert thick.GetSpacing() == (2.0, 1.5, 1.0 * SLICE_FACTOR)
    values, label_values = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
    expected = values.reshape(6, SLICE_FACTOR, 24, 20).mean(axis=1)
    np.testing.assert_allclose(sitk.GetArrayFromImage(thick), expected, rtol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(thick_labels), label_values[1::SLICE_FACTOR])


def test_robustness_perturbations_bias_and_noise():
    import SimpleITK as sitk
    from bench.robustness import BIAS, NOISE, bias_field, perturbations, rician_noise
    field = bias_field((18, 24, 20))
    assert field[0, 0, 0] == pytest.approx(1 - BIAS) and field[-1, -1, -1] == pytest.approx(1 + BIAS)
    assert field[9, 12, 10] == pytest.approx(1.0, abs=0.02)
    image, labels = _labelled_image()
    biased, same = perturbations()['bias field ({:g}-{:g})'.format(1 - BIAS, 1 + BIAS)](image, labels)
    assert same is labels and biased.GetSpacing() == image.GetSpacing()
    np.testing.assert_allclose(sitk.GetArrayFromImage(biased), field * sitk.GetArrayFromImage(image))
    flat = np.full((40, 40, 40), 50.0)
    noisy = rician_noise(flat, np.random.default_rng(0))
    sigma = NOISE * 50.0
    assert noisy.min() >= 0.0
    # the Rician mean at signal A >> sigma is ~ sqrt(A^2 + sigma^2); its spread ~ sigma
    assert np.mean(noisy) == pytest.approx(np.hypot(50.0, sigma), rel=2e-3)
    assert np.std(noisy) == pytest.approx(sigma, rel=0.05)


def test_robustness_perturbations_contrast_maps_each_intensity_by_a_power():
    import SimpleITK as sitk
    from bench.robustness import GAMMAS, perturbations
    image, labels = _labelled_image()
    values = sitk.GetArrayFromImage(image)
    for gamma in GAMMAS:
        out, same = perturbations()['contrast (gamma {:g})'.format(gamma)](image, labels)
        assert same is labels and out.GetSpacing() == image.GetSpacing()
        expected = [values.max() * (v / values.max()) ** gamma for v in values.ravel()[:50]]
        np.testing.assert_allclose(sitk.GetArrayFromImage(out).ravel()[:50], expected, rtol=1e-12)


def test_robustness_pair_perturbations_turn_both_headers_and_keep_the_pair_as_it_was():
    """Each scan keeps its array; its physical space is the original turned by the rotation; the
    moving label map resampled onto the fixed grid is the same before and after the turn."""
    import SimpleITK as sitk
    from bench.robustness import HEADER_TURNS, pair_perturbations
    fixed, fixed_labels = _labelled_image()
    moving, moving_labels = (sitk.Image(x) for x in _labelled_image())
    for x in (moving, moving_labels):
        x.SetOrigin([-13.0, 5.5, 9.0])
    resampled = sitk.Resample(moving_labels, fixed_labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    for name, rotation in HEADER_TURNS.items():
        turn = pair_perturbations()['both scans, headers turned ' + name]
        (f, f_labels), (m, m_labels) = turn(fixed, fixed_labels), turn(moving, moving_labels)
        for out, original in ((f, fixed), (f_labels, fixed_labels), (m, moving), (m_labels, moving_labels)):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(original))
            for index in ((0, 0, 0), (19, 0, 5), (3, 23, 17)):
                np.testing.assert_allclose(out.TransformIndexToPhysicalPoint(index),
                                           np.asarray(rotation) @ original.TransformIndexToPhysicalPoint(index),
                                           atol=1e-12)
        assert f.GetDirection() != fixed.GetDirection()
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.Resample(m_labels, f_labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)),
            sitk.GetArrayFromImage(resampled))


@pytest.mark.slow
def test_foreign_benchmark_carries_labels_through_another_brain(tmp_path):
    """The shipped model through bench.foreign with another LPBA40 scan (S05) stored as a
    FreeSurfer .mgz in RAS as the 'other brain': labels carried S02 -> S05 -> S01 overlap S01's
    better than the unregistered S02's do, and the table has one row per method."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    import nibabel
    import SimpleITK as sitk
    image = sitk.DICOMOrient(sitk.ReadImage(os.path.join(LPBA40, 'test', 'S05.delineation.skullstripped.nii.gz')),
                             'RAS')
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin())
    nibabel.save(nibabel.MGHImage(sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32), affine), str(tmp_path / 'other.mgz'))
    proc = subprocess.run([sys.executable, '-m', 'bench.foreign', '--pairs', '1', '--refine', '0',
                           '--template', str(tmp_path / 'other.mgz')], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split('|')[1].strip(): line.split('|')[2:4] for line in proc.stdout.splitlines() if line.startswith('| ')}
    assert list(rows) == ['method', 'identity', 'model'], proc.stdout
    identity = float(rows['identity'][0].split()[0])
    assert float(rows['model'][0].split()[0]) > identity + 0.05, proc.stdout
    assert float(rows['model'][1].split()[0]) > identity, proc.stdout


def test_foreign_benchmark_ants_carries_a_label_map_in_physical_space():
    """bench.foreign's ANTs row: a labelled ball, shifted 8 mm and stored with another origin and
    axis order, carried back onto the fixed grid overlaps the fixed label far better than before."""
    from baselines import missing
    if missing('ants_syn'):
        pytest.skip(missing('ants_syn'))
    import SimpleITK as sitk
    from bench.foreign import AntsMethod, mean_dice
    index = np.indices([32] * 3).astype(np.float64)

    def ball(centre):
        inside = np.sum((index - np.reshape(centre, (3, 1, 1, 1))) ** 2, axis=0) < 81
        image = sitk.GetImageFromArray((200.0 * inside + 20.0 + 10 * np.sin(index[0] / 3)).astype(np.float32))
        labels = sitk.GetImageFromArray(inside.astype(np.uint8) * 3)
        image.SetSpacing([2.0] * 3)
        labels.CopyInformation(image)
        return image, labels

    fixed, fixed_seg = ball([15.5, 15.5, 15.5])
    moving, moving_seg = ball([11.5, 15.5, 15.5])
    moving, moving_seg = (sitk.DICOMOrient(x, 'RAS') for x in (moving, moving_seg))
    carried, seconds = AntsMethod().carry(fixed, moving, moving_seg)
    before = sitk.Resample(moving_seg, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving_seg.GetPixelID())
    assert carried.GetSize() == fixed.GetSize() and carried.GetPixelID() == moving_seg.GetPixelID()
    assert mean_dice(fixed_seg, carried) > 0.95 > mean_dice(fixed_seg, before) + 0.1
    assert seconds > 0
