"""registration.py, the Python API: a model loaded once registers in-memory images and arrays."""
import numpy as np
import pytest
import SimpleITK as sitk

import cli
import registration


@pytest.fixture
def run(tiny_run):
    return str(tiny_run)


def _pair():
    """Two blobs on anisotropic grids of different shapes, with label maps (values 3 and 7)."""
    def scan(shape, spacing, centre):
        index = np.indices(shape).transpose(1, 2, 3, 0) * spacing
        inside = np.linalg.norm(index - centre, axis=-1) < 18.0
        core = np.linalg.norm(index - centre, axis=-1) < 8.0
        image = np.where(inside, 120.0, 10.0) + 80.0 * core
        labels = np.where(core, 7, np.where(inside, 3, 0)).astype(np.uint8)
        return (registration.image_from_array(image.astype(np.float32), spacing, (5.0, -3.0, 2.0)),
                registration.image_from_array(labels, spacing, (5.0, -3.0, 2.0)))
    fixed, fixed_seg = scan((40, 36, 30), (1.2, 1.3, 1.5), np.array([24.0, 23.0, 22.0]))
    moving, moving_seg = scan((44, 40, 28), (1.1, 1.2, 1.6), np.array([26.0, 22.0, 21.0]))
    return fixed, moving, fixed_seg, moving_seg


def test_register_in_memory_images(run):
    model = registration.load_model(run, threads=2)
    assert model.image_size == 64 and model.info['kind'] == 'checkpoint'
    fixed, moving, fixed_seg, moving_seg = _pair()
    for _ in range(2):                                   # the model is loaded once, used twice
        result = model.register(fixed, moving, moving_seg, fixed_seg)
    for image in (result.warped, result.field, result.warped_seg):
        assert image.GetSize() == fixed.GetSize() and image.GetSpacing() == fixed.GetSpacing()
        assert image.GetOrigin() == fixed.GetOrigin()
    assert result.field.GetPixelID() == sitk.sitkVectorFloat64 and result.flow.shape == (64, 64, 64, 3)
    again = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(result.field)), sitk.sitkLinear, 0.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(result.warped))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.field), result.field_array)
    report = result.report
    assert sorted(report['dice']['per_label']) == ['3', '7'] and 0 < report['dice']['mean'] <= 1
    assert 0 <= report['folding'] < 0.5 and report['seconds']['network'] > 0
    as_float32 = model.register(fixed, moving, field_dtype='float32')
    assert as_float32.field.GetPixelID() == sitk.sitkVectorFloat32 and as_float32.warped_seg is None


def test_register_refuses_what_cannot_work(run, tmp_path):
    model = registration.load_model(run)
    fixed, moving, fixed_seg, _ = _pair()
    with pytest.raises(cli.UserError, match='give both'):
        model.register(fixed, moving, fixed_seg=fixed_seg)
    with pytest.raises(cli.UserError, match='3-D scalar image'):
        model.register(sitk.Image([8, 8], sitk.sitkFloat32), moving)
    with pytest.raises(cli.UserError, match='no such file'):
        model.register(str(tmp_path / 'absent.nii.gz'), moving)
    with pytest.raises(cli.UserError, match='the moving label map has size'):
        model.register(fixed, moving, moving_seg=fixed_seg)
    with pytest.raises(cli.UserError, match='unknown preprocessing option'):
        registration.load_model(run, margins=3)
    with pytest.raises(cli.UserError, match='--percentiles 99 1'):
        registration.load_model(run, percentiles=(99, 1))
