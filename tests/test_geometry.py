"""data_util.geometry: overlap per label and folding of a physical displacement field, against NumPy."""
import numpy as np
import SimpleITK as sitk

from data_util import geometry


def _reference(size, spacing, direction):
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -7.0, 11.0))
    image.SetDirection(np.asarray(direction, np.float64).flatten().tolist())
    return image


def _linear_field(reference, matrix):
    """u(x) = (matrix - I)(x - x0) on the reference's voxel centres, [nz, ny, nx, 3] mm."""
    nx, ny, nz = reference.GetSize()
    index = np.stack(np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing='ij'), -1)[..., ::-1]
    scaled = np.reshape(reference.GetDirection(), (3, 3)) * np.asarray(reference.GetSpacing())[None]
    points = index @ scaled.T
    return points @ (np.asarray(matrix) - np.eye(3)).T


def test_folding_fraction_of_linear_maps_on_an_oblique_grid():
    flip_permute = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    reference = _reference((9, 7, 30), (1.0, 2.0, 0.5), flip_permute)
    stretch = np.diag([1.3, 0.8, 1.1]) + np.array([[0, 0.2, 0], [0, 0, 0.1], [0.1, 0, 0]])
    assert np.linalg.det(stretch) > 0
    assert geometry.folding_fraction(_linear_field(reference, stretch), reference) == 0.0
    mirrored = stretch @ np.diag([1.0, -1.0, 1.0])       # det < 0 everywhere: every voxel folds
    assert geometry.folding_fraction(_linear_field(reference, mirrored), reference) == 1.0
    # a fold in one half only (x beyond the mid plane is mirrored)
    field = _linear_field(reference, np.eye(3))
    field[:, :, 5:] = _linear_field(reference, mirrored)[:, :, 5:]
    assert 0.3 < geometry.folding_fraction(field, reference) < 0.7


def test_folding_fraction_against_numpy_determinants_slab_by_slab(monkeypatch):
    """A rough random field on a rotated, anisotropic grid, in slabs of 2 planes: the count of
    det(I + du/dx) <= 0 equals np.linalg.det of the physical Jacobian from np.gradient."""
    angle = 0.4
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
    reference = _reference((11, 9, 7), (0.7, 1.2, 2.0), rotation @ np.diag([1.0, -1.0, 1.0]))
    field = np.random.default_rng(3).normal(0, 0.8, (7, 9, 11, 3))
    matrix = np.reshape(reference.GetDirection(), (3, 3)) * np.asarray(reference.GetSpacing())[None]
    # d[..., c, a]: derivative of component c along index axis a (i, j, k = array axes 2, 1, 0)
    d = np.stack([np.gradient(field, axis=2), np.gradient(field, axis=1), np.gradient(field, axis=0)], -1)
    jacobian = np.eye(3) + d @ np.linalg.inv(matrix)
    expected = np.mean(np.linalg.det(jacobian) <= 0)
    assert 0.05 < expected < 0.95
    monkeypatch.setattr(geometry, 'CHUNK_VOXELS', 2 * 9 * 11)
    assert geometry.folding_fraction(field, reference) == expected
    assert geometry.folding_fraction(field, reference, threads=2) == expected


def test_label_overlap_against_direct_counts():
    rng = np.random.RandomState(0)
    fixed = rng.randint(0, 4, (20, 10, 6))
    warped = np.where(rng.rand(*fixed.shape) < 0.7, fixed, rng.randint(0, 4, fixed.shape))
    dice, jaccard = geometry.label_overlap(fixed, warped, [1, 2, 3, 9])
    for v in (1, 2, 3):
        a, b = fixed == v, warped == v
        assert np.isclose(dice[str(v)], 2 * np.sum(a & b) / (a.sum() + b.sum()))
        assert np.isclose(jaccard[str(v)], np.sum(a & b) / np.sum(a | b))
    assert np.isnan(dice['9']) and np.isnan(jaccard['9'])     # absent from both maps
    per_label, mean = geometry.dice_per_label(fixed, warped)
    assert sorted(per_label) == ['1', '2', '3'] and np.isclose(mean, np.mean([dice[k] for k in '123']))
