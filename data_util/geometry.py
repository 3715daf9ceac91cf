"""Image geometry shared by the converter, evaluation and predict.py: where a preprocessed grid
lives in a scan's physical space, a network flow as a displacement field in mm on the fixed
file's own grid, label maps warped by such a field, and their overlap per label.

Array convention: arrays are indexed [X, Y, Z] = ITK index (i, j, k), i.e.
``sitk.GetArrayFromImage(img).transpose(2, 1, 0)``; physical points are mm in LPS, as
SimpleITK reads the files. A flow is [N, N, N, 3] voxels of the fixed preprocessed grid
(channel k along grid axis k) with moving_grid_position = p + flow(p).

`displacement_field` and `warp_labels` are THE mapping from a network flow to the scans' own
grids: predict.py writes the field, and eval.py (through `original_overlap`) measures Dice and
Jaccard with the same two functions, so the two report the same numbers for the same pair.
"""
import concurrent.futures
import dataclasses

import numpy as np
import SimpleITK as sitk

from errors import UserError

CHUNK_VOXELS = 1 << 20


def _by_slabs(work, nz, plane_voxels, threads):
    """[work(k0, k1)] over consecutive slabs [k0, k1) of nz planes of plane_voxels each (about
    CHUNK_VOXELS a slab), on ``threads`` threads (NumPy lets go of the GIL in its loops)."""
    step = max(1, CHUNK_VOXELS // plane_voxels)
    slabs = [(k0, min(k0 + step, nz)) for k0 in range(0, nz, step)]
    if threads <= 1:
        return [work(*slab) for slab in slabs]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda slab: work(*slab), slabs))


class GeometryError(UserError, ValueError):
    """Stored geometry that is missing or inconsistent; the message is a single line."""


@dataclasses.dataclass
class Geometry:
    """Where a preprocessed scan lives in its original file's physical space (mm, LPS).

    original_*: the file as read (size in voxels and spacing in mm, both in ITK axis order;
    origin in mm; direction 9 numbers row-major, as ``sitk.Image.GetDirection``).
    grid_*: the preprocessed grid (size N, N, N; isotropic spacing; origin = the centre of
    voxel [0, 0, 0]; direction), so the voxel at array index p = (i, j, k) has its centre at
    ``grid_origin + D @ (grid_spacing * p)`` with D the 3x3 grid direction.
    intensity_window: the raw intensities mapped to 0 and 255.
    """
    original_size: tuple
    original_spacing: tuple
    original_origin: tuple
    original_direction: tuple
    grid_size: tuple
    grid_spacing: tuple
    grid_origin: tuple
    grid_direction: tuple
    intensity_window: tuple

    INT_FIELDS = ('original_size', 'grid_size')

    def original_reference(self):
        """An empty uint8 sitk.Image with the original file's geometry."""
        return _reference_image(self.original_size, self.original_spacing,
                                self.original_origin, self.original_direction)

    def grid_reference(self):
        """An empty uint8 sitk.Image with the preprocessed grid's geometry."""
        return _reference_image(self.grid_size, self.grid_spacing, self.grid_origin,
                                self.grid_direction)

    def voxel_to_physical(self, voxels):
        """Continuous grid voxel coordinates [k, 3] (array order X, Y, Z) -> LPS mm [k, 3]."""
        direction = np.reshape(self.grid_direction, (3, 3))
        scaled = np.asarray(voxels, np.float64) * np.asarray(self.grid_spacing)
        return np.asarray(self.grid_origin) + scaled @ direction.T

    def physical_to_voxel(self, points):
        """LPS mm [k, 3] -> continuous grid voxel coordinates [k, 3] (array order X, Y, Z)."""
        direction = np.reshape(self.grid_direction, (3, 3))
        offset = np.asarray(points, np.float64) - np.asarray(self.grid_origin)
        return (offset @ np.linalg.inv(direction).T) / np.asarray(self.grid_spacing)

    def to_attrs(self, attrs):
        """Store every field in an h5py attribute set (groups' ``.attrs``)."""
        for field in dataclasses.fields(self):
            dtype = np.int64 if field.name in self.INT_FIELDS else np.float64
            attrs[field.name] = np.asarray(getattr(self, field.name), dtype)

    @classmethod
    def from_attrs(cls, attrs):
        """Read back what `to_attrs` stored; GeometryError if a field is missing."""
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in attrs:
                raise GeometryError('no preprocessing geometry stored (attribute {!r} missing)'
                                   .format(field.name))
            cast = int if field.name in cls.INT_FIELDS else float
            values[field.name] = tuple(cast(v) for v in np.asarray(attrs[field.name]))
        return cls(**values)


def _reference_image(size, spacing, origin, direction):
    image = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction])
    return image


def to_array(image):
    """A sitk.Image -> numpy array [X, Y, Z] (or [X, Y, Z, C] for vector pixels)."""
    array = sitk.GetArrayFromImage(image)
    axes = (2, 1, 0) if array.ndim == 3 else (2, 1, 0, 3)
    return np.ascontiguousarray(array.transpose(axes))


def grid_image(array, geometry):
    """An array [X, Y, Z] or [X, Y, Z, C] on the preprocessed grid -> sitk.Image with the
    grid's physical geometry (C > 1 gives a vector image)."""
    array = np.asarray(array)
    if array.shape[:3] != tuple(geometry.grid_size):
        raise GeometryError('array of shape {} is not on the {} grid'.format(
            array.shape, 'x'.join(str(n) for n in geometry.grid_size)))
    if array.ndim == 3:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0, 3)),
                                       isVector=True)
    image.SetSpacing(geometry.grid_spacing)
    image.SetOrigin(geometry.grid_origin)
    image.SetDirection(geometry.grid_direction)
    return image


def _index_to_physical(image):
    """(A, o) with physical = o + A @ index for a sitk.Image (index in ITK order i, j, k)."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    return direction * np.asarray(image.GetSpacing())[None, :], np.asarray(image.GetOrigin())


def _grid_axes(index_to_grid):
    """For each reference axis r, the preprocessed-grid axis g[r] it runs along.

    index_to_grid: 3x3 matrix with grid position = index_to_grid @ reference index + offset.
    The converter's grid axes are the file's axes permuted and flipped (DICOMOrient), so every
    column has one non-zero entry; GeometryError otherwise.
    """
    magnitude = np.abs(index_to_grid)
    axes = np.argmax(magnitude, axis=0)
    off_axis = magnitude.copy()
    off_axis[axes, np.arange(3)] = 0
    if sorted(axes) != [0, 1, 2] or np.any(off_axis > 1e-6 * magnitude.max(axis=0)):
        raise GeometryError('the preprocessed grid\'s axes are not a permutation of the fixed file\'s axes')
    return [int(a) for a in axes]


def _interpolate_axis(array, axis, positions):
    """Linear interpolation of ``array`` along ``axis`` at ``positions`` (voxels), clamped to
    [0, n - 1] (border values beyond the ends)."""
    n = array.shape[axis]
    positions = np.clip(positions, 0.0, n - 1.0)
    lower = np.minimum(np.floor(positions).astype(np.int64), n - 2)
    weight = (positions - lower).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    low = np.take(array, lower, axis)
    result = np.take(array, lower + 1, axis)
    result -= low
    result *= weight
    result += low
    return result


def displacement_field(flow, fixed_geometry, moving_geometry, reference, threads=1):
    """The physical displacement field of a network flow on the reference (fixed original) grid.

    flow: [N, N, N, 3] voxels on the fixed preprocessed grid (channel k along grid axis k),
    moving_grid_position = p + flow(p). reference: sitk.Image with the fixed file's geometry.
    Returns float64 [nz, ny, nx, 3] (the sitk.GetArrayFromImage layout of reference) holding
    u(x) = G_moving(p(x) + flow(p(x))) - x in mm, components along physical x, y, z (LPS);
    p(x) is x's continuous position on the fixed grid, G_moving the moving grid's
    voxel-to-physical map, and flow(p) is trilinear with positions clamped into the grid.

    The grid's axes are the file's axes permuted and flipped, so p(x) is separable and the
    trilinear sampling is done as three 1-D interpolations, slab by slab (memory ~ one slab
    per thread).
    """
    flow = np.asarray(flow, np.float64)
    ref_matrix, ref_origin = _index_to_physical(reference)
    grid_direction = np.reshape(fixed_geometry.grid_direction, (3, 3))
    to_grid = np.linalg.inv(grid_direction * np.asarray(fixed_geometry.grid_spacing)[None, :])
    index_to_grid = to_grid @ ref_matrix
    grid_offset = to_grid @ (ref_origin - np.asarray(fixed_geometry.grid_origin))
    moving_direction = np.reshape(moving_geometry.grid_direction, (3, 3))
    grid_to_moving = moving_direction * np.asarray(moving_geometry.grid_spacing)[None, :]
    # u = G_moving(p) - x (affine in the index) + grid_to_moving @ flow(p)
    linear = grid_to_moving @ index_to_grid - ref_matrix
    constant = grid_to_moving @ grid_offset + np.asarray(moving_geometry.grid_origin) - ref_origin

    axes = _grid_axes(index_to_grid)
    nx, ny, nz = reference.GetSize()
    # positions[r]: grid position along grid axis axes[r] of every index along reference axis r
    positions = [index_to_grid[axes[r], r] * np.arange(n) + grid_offset[axes[r]] for r, n in enumerate((nx, ny, nz))]
    along_kji = _interpolate_axis(flow.transpose(axes[2], axes[1], axes[0], 3), 0, positions[2])
    affine_i = np.arange(nx)[:, None] * linear[:, 0]
    affine_j = np.arange(ny)[:, None] * linear[:, 1] + constant
    field = np.empty((nz, ny, nx, 3), np.float64)

    def slab(k0, k1):
        sampled = _interpolate_axis(_interpolate_axis(along_kji[k0:k1], 1, positions[1]), 2, positions[0])
        chunk = field[k0:k1]
        np.matmul(sampled, grid_to_moving.T, out=chunk)
        chunk += affine_i[None, None]
        chunk += affine_j[None, :, None]
        chunk += (np.arange(k0, k1)[:, None] * linear[:, 2])[:, None, None]
    _by_slabs(slab, nz, nx * ny, threads)
    return field


def field_image(field, reference):
    """float64 [nz, ny, nx, 3] -> sitk vector image (VectorFloat64) with the reference's geometry."""
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(reference)
    return image


def folding_fraction(field, reference, threads=1):
    """Fraction of the reference's voxels where x -> x + u(x) folds: det(I + du/dx) <= 0.

    field: float64 [nz, ny, nx, 3] from `displacement_field` (mm, components along physical
    x, y, z); du/dx = D A^-1, with D the derivatives along the index axes by central
    differences (one-sided at the faces) and A the reference's index-to-physical matrix, so
    det(I + du/dx) = det(A + D) / det(A). Computed slab by slab (memory ~ one slab per thread).
    """
    matrix, _ = _index_to_physical(reference)
    sign = np.sign(np.linalg.det(matrix))
    nz, ny, nx = field.shape[:3]

    def folded(k0, k1):
        lo, hi = max(k0 - 1, 0), min(k1 + 1, nz)
        components = np.moveaxis(field[lo:hi], -1, 0)    # [3, k, j, i]
        keep = slice(k0 - lo, k0 - lo + (k1 - k0))
        inner = components[:, keep]
        # d[a][c]: derivative of component c along index axis a (i, j, k = array axes 3, 2, 1)
        d = [np.gradient(inner, axis=3), np.gradient(inner, axis=2),
             np.gradient(components, axis=1)[:, keep] if hi - lo > 1 else np.zeros_like(inner)]
        (a00, a01, a02), (a10, a11, a12), (a20, a21, a22) = [
            [d[a][c] + matrix[c, a] if matrix[c, a] else d[a][c] for a in range(3)] for c in range(3)]
        det = a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) + a02 * (a10 * a21 - a11 * a20)
        return int(np.count_nonzero(det * sign <= 0))
    return sum(_by_slabs(folded, nz, ny * nx, threads)) / float(nz * ny * nx)


def field_transform(field, reference):
    """The sitk.DisplacementFieldTransform of a field from `displacement_field`."""
    return sitk.DisplacementFieldTransform(field_image(field, reference))


def warp_labels(labels, reference, transform):
    """A label map (sitk.Image on its own file's grid) pulled onto the reference grid by a
    displacement-field transform (`field_transform`, or the field as predict.py wrote it):
    nearest neighbour, 0 outside, the label map's pixel type."""
    return sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def label_overlap(fixed_labels, warped_labels, values=None):
    """Dice 2|A n B| / (|A| + |B|) and Jaccard |A n B| / |A u B| per label value.

    fixed_labels, warped_labels: integer arrays of one shape (values 0..65535). values: the
    label values to measure (default: every non-zero value present in either map); a value
    absent from both gets NaN. Returns (dice, jaccard): {str(value): float}.
    """
    fixed_labels = np.asarray(fixed_labels).ravel().astype(np.int64)
    warped_labels = np.asarray(warped_labels).ravel().astype(np.int64)
    length = int(max(fixed_labels.max(), warped_labels.max(), max(values or [0]))) + 1
    sizes_fixed = np.bincount(fixed_labels, minlength=length)
    sizes_warped = np.bincount(warped_labels, minlength=length)
    overlap = np.bincount(fixed_labels[fixed_labels == warped_labels], minlength=length)
    if values is None:
        values = [v for v in range(1, length) if sizes_fixed[v] + sizes_warped[v] > 0]
    dice, jaccard = {}, {}
    for v in values:
        total = sizes_fixed[v] + sizes_warped[v]
        dice[str(v)] = float(2.0 * overlap[v] / total) if total else float('nan')
        jaccard[str(v)] = float(overlap[v] / (total - overlap[v])) if total else float('nan')
    return dice, jaccard


def dice_per_label(fixed_labels, warped_labels):
    """Dice per non-zero label value present in either map (`label_overlap`).

    Returns ({str(label): dice}, mean over those labels or None when there are none).
    """
    dice, _ = label_overlap(fixed_labels, warped_labels)
    return dice, (float(np.mean(list(dice.values()))) if dice else None)


def labels_image(array, geometry):
    """A label array [X, Y, Z] on the ORIGINAL grid of `geometry` -> sitk.Image there."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.CopyInformation(geometry.original_reference())
    return image


def original_overlap(flow, fixed, moving, values):
    """Dice and Jaccard of a pair on the FIXED scan's original grid, as predict.py measures them.

    flow: [N, N, N, 3] network flow of the pair; fixed, moving: (Geometry, original label
    array [X, Y, Z]) of each scan; values: label values to measure. The moving label map is
    pulled through `displacement_field` by `warp_labels`. Returns (dice, jaccard) lists in the
    order of `values` (NaN for a value absent from both maps).
    """
    fixed_geometry, fixed_labels = fixed
    moving_geometry, moving_labels = moving
    reference = labels_image(fixed_labels, fixed_geometry)
    field = displacement_field(flow, fixed_geometry, moving_geometry, reference)
    warped = warp_labels(labels_image(moving_labels, moving_geometry), reference, field_transform(field, reference))
    dice, jaccard = label_overlap(sitk.GetArrayViewFromImage(reference),
                                  sitk.GetArrayViewFromImage(warped), values)
    return [dice[str(v)] for v in values], [jaccard[str(v)] for v in values]


def load_geometry(group):
    """The `Geometry` stored in an HDF5 scan group; GeometryError if it has none."""
    return Geometry.from_attrs(group.attrs)


def preprocessed_grid_image(group, array=None):
    """The preprocessed grid of an HDF5 scan group as a sitk.Image in the original physical
    space: its `volume` (default) or the given array [X, Y, Z] / [X, Y, Z, C] on that grid
    (e.g. a warped segmentation). Resample it onto ``load_geometry(group).original_reference()``
    (see `grid_to_original`) to get the result on the original file's grid."""
    if array is None:
        array = group['volume'][...]
    return grid_image(array, load_geometry(group))


def grid_to_original(image, geometry, nearest=False, default_value=0.0):
    """Resample a sitk.Image on the preprocessed grid back onto the original file's grid.

    nearest=True for label maps, else linear (vector images component-wise). Points of the
    original grid outside the preprocessed cube get default_value. Returns a sitk.Image with
    the original size, spacing, origin and direction and the input's pixel type."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, geometry.original_reference(), sitk.Transform(), interpolator,
                         float(default_value), image.GetPixelID())
