"""Convert real scans (NIfTI, MHA/MHD, NRRD, DICOM series) into the project's HDF5 + JSON spec.

    python -m data_util.prepare --images 'scans/*.nii.gz' [--labels 'labels/{id}_seg.nii.gz']
                                [--landmarks 'points/{id}.csv'] [--id_regex REGEX]
                                --output OUT.h5 [--spec OUT.json] [options]
    python -m data_util.prepare --list scans.csv --output OUT.h5 --spec OUT.json [options]
    python -m data_util.prepare --lpba40 ../shared/data/LPBA40 --output datasets/lpba.h5

Every scan goes through `preprocess`, all in SimpleITK and in physical space (mm, LPS):

1. read: a file, or a directory holding a DICOM series (the largest series if several);
   the image must be a 3-D scalar volume.
2. orientation: the output grid's direction D is the direction of
   ``sitk.DICOMOrient(image, 'LPS')``, i.e. the identity for every scan whose axes lie along
   the world axes (array axis 0/1/2 then runs to patient Left/Posterior/Superior); an oblique
   scan keeps its own tilted axes, permuted and flipped to come closest to L, P, S.
3. crop box, an axis-aligned box in the frame u = D^T x (x physical, mm), from the image
   alone (no label map ever decides it, so a scan is preprocessed the same whether or not its
   labels are given, exactly as predict.py must do for a user's scan). The foreground is
   intensity > threshold (MR: Otsu; CT: > -500 HU; or --threshold), keeping every connected
   component of at least 1 % of the largest one. Three choices:
   - --field_of_view L (a fixed physical field of view): the cube of side L mm centred on the
     foreground's centroid. Every scan then has the same voxel size L / image_size, and two
     scans preprocessed on their own come out aligned by their centres of mass (ANTs'
     default initialisation); this is what a model trained on such data expects.
   - default: the bounding box of the foreground grown by --margin mm on every side;
   - --roi: a given box, used as is (two opposite corners in LPS mm; the box is axis-aligned in
     the frame u, i.e. in LPS unless the scan is oblique).
4. cube: the box is padded symmetrically to a cube of side L = its longest edge; with
   --spacing S instead L = image_size * S (fixed voxel size, cube centred on the box).
5. grid: image_size^3 voxels of spacing s = L / image_size (isotropic), direction D, voxel
   centres at u = cube_min + s/2 + s * index. The scan is interpolated once, straight from
   the original file onto this grid (linear, after a Gaussian anti-aliasing blur of
   sigma = (s - s_in)/2 mm along every original axis whose spacing s_in is finer than s); the
   steps "isotropic resampling", "crop", "pad" and "resize" are thus composed exactly, with
   no repeated interpolation. Points outside the original volume get the bottom of the
   intensity window (0 after scaling).
6. intensities to uint8 0..255: MR, percentiles (default 0.5 % and 99.5 %) of the original
   voxels inside the cube's index-space bounding box are mapped linearly to 0 and 255 and
   clipped; CT, a HU window (--window LEVEL WIDTH, default 50 400, i.e. -150..250 HU, an
   abdominal soft-tissue window) mapped to 0..255.
7. label maps: nearest neighbour on the same grid, values as stored (uint8, or uint16 when a
   value exceeds 255). A label map must have its image's size, and spacing, origin and
   direction within tolerance (1e-3 relative spacing, 0.01 voxel origin, 1e-3 direction).
8. landmarks: a CSV/TXT of physical points (mm, LPS), one "x, y, z" per row (commas, spaces
   or semicolons; '#' comments and a non-numeric header row are skipped; a row of "nan"
   marks a missing point), converted to continuous voxel coordinates of the grid; missing
   points and points outside the grid become rows of -1.

Array convention: every array here is indexed [X, Y, Z] = ITK index (i, j, k), i.e.
``sitk.GetArrayFromImage(img).transpose(2, 1, 0)``; array axis k is ITK axis k, and a flow's
channel k is a displacement along array axis k. Voxel coordinates are continuous ITK indices
(0 = the centre of the first voxel).

HDF5 layout (SPEC section 6): one group per scan id with `volume` uint8 [N, N, N],
optional `segmentation` (uint8/uint16 [N, N, N]), optional `original_segmentation` (the label
map as read, on the original file's grid, [X, Y, Z] in ITK index order: evaluation measures
Dice there, see data_util/geometry.py) and optional `point` float32 [k, 3]; the
group's attributes record the geometry (see `Geometry`): original_size / _spacing / _origin /
_direction of the file as read, grid_size / _spacing / _origin / _direction of the
preprocessed grid in the same physical space (directions as 9 numbers, row-major, ITK's
GetDirection order), intensity_window (the raw values mapped to 0 and 255), modality and the
source file names. `preprocessed_grid_image` and `grid_to_original` use them to bring any
result on the grid back onto the original file's grid.

LPBA40 mode (--lpba40 DIR; DIR holds fixed.nii.gz = S01, test/S02..S10, train/S11..S40 and
label/Sxx.delineation.structure.label.nii.gz): ids S01..S40, MR, image_type "brain", atlas
S01; subsets train = S11..S35, val = S36..S40 (held out from training, for model selection),
test = S02..S10; schemes "1" = train, "2" = val, "test" = test; the 56 label values (21..182)
in segmentation_class_value; a fixed field of view of 192 mm (LPBA40_FIELD_OF_VIEW: every
brain lies within 92 mm of its centroid, 1.5 mm voxels at 128^3) unless --field_of_view,
--spacing or --roi is given. This is datasets/lpba.json.

The spec records the preprocessing (key "preprocessing": image_size, modality, percentiles,
window, threshold, margin, spacing, field_of_view, roi); train.py copies it into the run's
args.json, and predict.py preprocesses a user's pair with it.

Volumes and segmentations are stored gzip-compressed (level 1; h5py reads them transparently).
The JSON spec follows the original schema (SPEC section 6); its file path is written
relative to the spec's own directory. Every input problem stops the run with a one-line
``error: ...`` on stderr and exit status 2; the outputs are written to temporary files and
renamed into place only when everything succeeded.
"""
import contextlib
import csv
import dataclasses
import fnmatch
import glob
import json
import math
import os
import re
import signal
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

import cli
from errors import UserError
from data_util.geometry import Geometry, GeometryError, grid_image, to_array

DEFAULT_IMAGE_SIZE = 128
DEFAULT_MARGIN = 4.0
DEFAULT_PERCENTILES = (0.5, 99.5)
DEFAULT_CT_WINDOW = (50.0, 400.0)
CT_FOREGROUND_HU = -500.0
MIN_COMPONENT_FRACTION = 0.01
SPACING_TOLERANCE = 1e-3
ORIGIN_TOLERANCE = 0.01
DIRECTION_TOLERANCE = 1e-3
MODALITIES = ('mr', 'ct')
IMAGE_EXTENSIONS = ('.nii.gz', '.nii', '.mha', '.mhd', '.nrrd', '.nhdr', '.dcm')
ARRAY_CONVENTION = 'arrays [X,Y,Z] = sitk.GetArrayFromImage(img).transpose(2,1,0); physical mm, LPS'

LPBA40_ATLAS = 'S01'
LPBA40_FIELD_OF_VIEW = 192.0
LPBA40_SUBSETS = {
    'train': ['S{:02d}'.format(i) for i in range(11, 36)],
    'val': ['S{:02d}'.format(i) for i in range(36, 41)],
    'test': ['S{:02d}'.format(i) for i in range(2, 11)],
}


class PrepareError(UserError):
    """An input problem; the message is a single line."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))


def load_geometry(group):
    """The `Geometry` stored in an HDF5 scan group; PrepareError if it has none."""
    try:
        return Geometry.from_attrs(group.attrs)
    except GeometryError as e:
        raise PrepareError(str(e))


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


def read_image(path):
    """Read a 3-D scalar image: a file SimpleITK reads, or a directory with a DICOM series
    (the series with the most files). Returns a sitk.Image; PrepareError otherwise."""
    if not os.path.exists(path):
        raise PrepareError('{}: no such file or directory'.format(path))
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            try:
                series = reader.GetGDCMSeriesIDs(path)
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
            if not series:
                raise PrepareError('{}: directory holds no DICOM series'.format(path))
            files = max((reader.GetGDCMSeriesFileNames(path, s) for s in series), key=len)
            if len(series) > 1:
                _warn('{}: {} DICOM series, reading the largest ({} files)'.format(
                    path, len(series), len(files)))
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else 'unknown reason'
        raise PrepareError('{}: cannot read image ({})'.format(path, reason))
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise PrepareError('{}: a 3-D volume is needed, got size {}'.format(
            path, 'x'.join(str(n) for n in image.GetSize())))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise PrepareError('{}: a scalar image is needed, got {} components per voxel'.format(
            path, image.GetNumberOfComponentsPerPixel()))
    return image


def read_landmarks(path):
    """Landmarks file -> float64 [k, 3] physical points (mm, LPS); NaN rows = missing."""
    if not os.path.isfile(path):
        raise PrepareError('{}: no such landmarks file'.format(path))
    points = []
    with open(path, 'r') as f:
        for number, line in enumerate(f, 1):
            text = line.split('#', 1)[0].strip()
            if not text:
                continue
            fields = [v for v in re.split(r'[,;\s]+', text) if v]
            try:
                values = [float(v) for v in fields]
            except ValueError:
                if not points and number == 1:
                    continue
                raise PrepareError('{}:{}: not a row of numbers: {!r}'.format(path, number, text))
            if len(values) != 3:
                raise PrepareError('{}:{}: 3 coordinates expected, got {}'.format(
                    path, number, len(values)))
            points.append(values)
    return np.asarray(points, np.float64).reshape(-1, 3)


def landmarks_to_voxels(points, geometry):
    """Physical points [k, 3] (mm, LPS; NaN rows = missing) -> float32 [k, 3] continuous
    voxel coordinates of the grid (array order X, Y, Z); missing points and points outside the
    grid (beyond the outer voxels' edges) become rows of -1."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    voxels = geometry.physical_to_voxel(points)
    size = np.asarray(geometry.grid_size)
    valid = np.all(np.isfinite(voxels), axis=1)
    valid &= np.all((voxels >= -0.5) & (voxels <= size - 0.5), axis=1)
    voxels[~valid] = -1
    return voxels.astype(np.float32)


def check_label_geometry(image, label, label_name='label map'):
    """PrepareError unless the label map shares the image's voxel grid (within tolerance)."""
    if image.GetSize() != label.GetSize():
        raise PrepareError('{} has size {}, its image {}'.format(
            label_name, 'x'.join(str(n) for n in label.GetSize()),
            'x'.join(str(n) for n in image.GetSize())))
    spacing = np.asarray(image.GetSpacing())
    if np.any(np.abs(np.asarray(label.GetSpacing()) - spacing) > SPACING_TOLERANCE * spacing):
        raise PrepareError('{} has spacing {}, its image {}'.format(
            label_name, label.GetSpacing(), image.GetSpacing()))
    if np.any(np.abs(np.asarray(label.GetOrigin()) - image.GetOrigin())
              > ORIGIN_TOLERANCE * spacing.min()):
        raise PrepareError('{} has origin {}, its image {}'.format(
            label_name, label.GetOrigin(), image.GetOrigin()))
    if np.any(np.abs(np.asarray(label.GetDirection()) - image.GetDirection())
              > DIRECTION_TOLERANCE):
        raise PrepareError('{} has another direction than its image'.format(label_name))


def _label_array(label, label_name):
    """Validated label values as uint8 / uint16 numpy array in ITK's [z, y, x] order."""
    values = sitk.GetArrayFromImage(label)
    if values.dtype.kind == 'f':
        if not np.all(np.isfinite(values)) or np.any(values != np.rint(values)):
            raise PrepareError('{} holds non-integer values'.format(label_name))
    if values.min() < 0:
        raise PrepareError('{} holds negative values'.format(label_name))
    top = values.max()
    if top > np.iinfo(np.uint16).max:
        raise PrepareError('{} holds values above 65535'.format(label_name))
    return values.astype(np.uint8 if top <= 255 else np.uint16)


def _grid_direction(image):
    """The 3x3 direction of the image reoriented to LPS (identity for non-oblique scans)."""
    return np.reshape(sitk.DICOMOrient(image, 'LPS').GetDirection(), (3, 3))


def _index_box_to_frame(image, lower, upper, direction):
    """Voxel-edge box of an index range [lower, upper] (inclusive, ITK order) of `image` ->
    (lo, hi) bounds in the frame u = direction^T x (mm) enclosing its 8 corners."""
    corners = []
    for choice in np.ndindex(2, 2, 2):
        index = [lower[k] - 0.5 if choice[k] == 0 else upper[k] + 0.5 for k in range(3)]
        corners.append(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
    frame = np.asarray(corners) @ direction
    return frame.min(axis=0), frame.max(axis=0)


def _components(mask, min_fraction):
    """Shape statistics of the connected components of a uint8 mask and the labels of those
    of at least min_fraction of the largest one ([] if the mask is empty)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ConnectedComponent(mask))
    labels = stats.GetLabels()
    if not labels:
        return stats, []
    largest = max(stats.GetNumberOfPixels(k) for k in labels)
    return stats, [k for k in labels if stats.GetNumberOfPixels(k) >= min_fraction * largest]


def _mask_box(image, mask, direction, min_fraction=0.0):
    """Frame bounds of the non-zero voxels of a uint8 mask on `image`'s grid (components of
    at least min_fraction of the largest one), or None if the mask is empty."""
    stats, labels = _components(mask, min_fraction)
    if not labels:
        return None
    lower, upper = np.full(3, np.inf), np.full(3, -np.inf)
    for k in labels:
        box = stats.GetBoundingBox(k)
        lower = np.minimum(lower, box[:3])
        upper = np.maximum(upper, np.add(box[:3], box[3:]) - 1)
    return _index_box_to_frame(image, lower, upper, direction)


def _mask_centroid(mask, direction, min_fraction=0.0):
    """Centroid (frame u = direction^T x, mm) of the non-zero voxels of a uint8 mask
    (components of at least min_fraction of the largest one), or None if the mask is empty."""
    stats, labels = _components(mask, min_fraction)
    if not labels:
        return None
    counts = np.asarray([stats.GetNumberOfPixels(k) for k in labels], np.float64)
    centroids = np.asarray([stats.GetCentroid(k) for k in labels], np.float64)
    return (counts @ centroids / counts.sum()) @ direction


def _foreground_mask(image, modality, threshold):
    if threshold is None and modality == 'mr':
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.SetInsideValue(0)
        otsu.SetOutsideValue(1)
        return otsu.Execute(image)
    level = CT_FOREGROUND_HU if threshold is None else float(threshold)
    return sitk.Cast(image > level, sitk.sitkUInt8)


def _intensity_window(image, corners, modality, percentiles, window):
    """(low, high) raw intensities mapped to 0 and 255. MR: percentiles of the original
    voxels inside the index-space bounding box of the physical points `corners` [8, 3]."""
    if modality == 'ct':
        level, width = window
        return level - width / 2.0, level + width / 2.0
    index = np.asarray([image.TransformPhysicalPointToContinuousIndex([float(v) for v in c])
                        for c in corners])
    size = np.asarray(image.GetSize())
    lower = np.clip(np.floor(index.min(axis=0)).astype(int), 0, size - 1)
    upper = np.clip(np.ceil(index.max(axis=0)).astype(int), 0, size - 1)
    values = sitk.GetArrayViewFromImage(image)[lower[2]:upper[2] + 1, lower[1]:upper[1] + 1,
                                               lower[0]:upper[0] + 1]
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def _antialias(image, spacing):
    """Gaussian blur before sampling at `spacing` mm: sigma = (spacing - s_in)/2 mm per axis."""
    sigma = np.maximum(spacing - np.asarray(image.GetSpacing()), 0.0) / 2.0
    if not np.any(sigma > 0):
        return image
    blur = sitk.DiscreteGaussianImageFilter()
    blur.SetVariance([float(v) for v in sigma ** 2])
    blur.SetUseImageSpacing(True)
    blur.SetMaximumKernelWidth(64)
    return blur.Execute(image)


def preprocess(image, label=None, image_size=DEFAULT_IMAGE_SIZE, modality='mr',
               percentiles=DEFAULT_PERCENTILES, window=DEFAULT_CT_WINDOW, threshold=None,
               margin=DEFAULT_MARGIN, spacing=None, roi=None, field_of_view=None,
               label_name='label map'):
    """Preprocess one scan (see the module docstring for every step).

    image: sitk.Image (3-D scalar) or a path for `read_image`; label: optional sitk.Image or
    path of a label map on the image's grid. image_size: N of the N^3 output grid.
    modality: 'mr' (percentiles, in %) or 'ct' (window = (level, width) in HU). threshold:
    foreground intensity threshold (default Otsu for MR, -500 HU for CT). margin: mm added
    around the foreground box. spacing: fixed output voxel size in mm (default: fit the box).
    roi: ((x0, y0, z0), (x1, y1, z1)) LPS mm corners of the crop box, replacing the foreground
    box and the margin. field_of_view: side in mm of a cube centred on the foreground's
    centroid, replacing the foreground box, the margin and spacing. The label map never
    changes the grid.

    Returns (volume, segmentation, geometry): volume uint8 [N, N, N] in 0..255, indexed
    [X, Y, Z] (ITK index order); segmentation uint8/uint16 [N, N, N] label values (None
    without a label map); geometry a `Geometry` placing the grid in the original space."""
    if isinstance(image, str):
        image = read_image(image)
    if isinstance(label, str):
        label_name = label
        label = read_image(label)
    if modality not in MODALITIES:
        raise PrepareError('unknown modality {!r} (choose from {})'.format(
            modality, ', '.join(MODALITIES)))
    image_size = int(image_size)
    if image_size < 2:
        raise PrepareError('image size must be at least 2, got {}'.format(image_size))
    if field_of_view is not None and not (np.isfinite(field_of_view) and field_of_view > 0):
        raise PrepareError('the field of view must be a positive number of mm, got {}'.format(
            field_of_view))
    raw = sitk.Cast(image, sitk.sitkFloat32)
    direction = _grid_direction(raw)

    label_image = None
    if label is not None:
        check_label_geometry(raw, label, label_name)
        label_image = sitk.GetImageFromArray(_label_array(label, label_name))
        label_image.CopyInformation(raw)

    if field_of_view is not None and (roi is not None or spacing is not None):
        raise PrepareError('a field of view sets the grid alone: give no roi or spacing with it')
    if roi is not None:
        frame = np.asarray(roi, np.float64).reshape(2, 3) @ direction
        lo, hi = frame.min(axis=0), frame.max(axis=0)
    elif field_of_view is not None:
        centre = _mask_centroid(_foreground_mask(raw, modality, threshold), direction,
                                MIN_COMPONENT_FRACTION)
        if centre is None:
            raise PrepareError('no foreground found (give --threshold)')
        lo, hi = centre - field_of_view / 2.0, centre + field_of_view / 2.0
    else:
        box = _mask_box(raw, _foreground_mask(raw, modality, threshold), direction,
                        MIN_COMPONENT_FRACTION)
        if box is None:
            raise PrepareError('no foreground found (give --threshold or --roi)')
        lo, hi = box[0] - margin, box[1] + margin
    if np.any(hi <= lo):
        raise PrepareError('empty crop box')

    side = float(np.max(hi - lo)) if spacing is None else image_size * float(spacing)
    step = side / image_size
    cube_lo = (lo + hi) / 2.0 - side / 2.0
    origin = direction @ (cube_lo + step / 2.0)

    frame_corners = np.asarray([cube_lo + side * np.asarray(c) for c in np.ndindex(2, 2, 2)])
    corners = frame_corners @ direction.T
    low, high = _intensity_window(raw, corners, modality, percentiles, window)
    if not high > low:
        raise PrepareError('image intensities are constant inside the crop box')

    geometry = Geometry(
        original_size=tuple(int(n) for n in image.GetSize()),
        original_spacing=tuple(float(v) for v in image.GetSpacing()),
        original_origin=tuple(float(v) for v in image.GetOrigin()),
        original_direction=tuple(float(v) for v in image.GetDirection()),
        grid_size=(image_size,) * 3,
        grid_spacing=(step,) * 3,
        grid_origin=tuple(float(v) for v in origin),
        grid_direction=tuple(float(v) for v in direction.flatten()),
        intensity_window=(low, high))
    reference = geometry.grid_reference()

    sampled = sitk.Resample(_antialias(raw, step), reference, sitk.Transform(), sitk.sitkLinear,
                            low, sitk.sitkFloat32)
    scaled = (to_array(sampled) - low) * (255.0 / (high - low))
    volume = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)

    segmentation = None
    if label_image is not None:
        segmentation = to_array(sitk.Resample(label_image, reference, sitk.Transform(),
                                              sitk.sitkNearestNeighbor, 0,
                                              label_image.GetPixelID()))
    return volume, segmentation, geometry


@dataclasses.dataclass
class ScanEntry:
    """One scan to convert: its id (the HDF5 group name) and its files."""
    id: str
    image: str
    label: str = None
    landmarks: str = None


def write_scan(h5, entry, volume, segmentation, points, geometry, modality,
               original_segmentation=None):
    """Write one preprocessed scan as group entry.id of an open h5py.File."""
    group = h5.create_group(entry.id)
    group.create_dataset('volume', data=volume, compression='gzip', compression_opts=1)
    for key, array in (('segmentation', segmentation),
                       ('original_segmentation', original_segmentation)):
        if array is not None:
            group.create_dataset(key, data=array, compression='gzip', compression_opts=1)
    if points is not None:
        group.create_dataset('point', data=points)
    geometry.to_attrs(group.attrs)
    group.attrs['modality'] = modality
    group.attrs['convention'] = ARRAY_CONVENTION
    for key in ('image', 'label', 'landmarks'):
        if getattr(entry, key):
            group.attrs['source_' + key] = os.path.abspath(getattr(entry, key))


def convert_scan(entry, h5, options):
    """Read, preprocess and write one `ScanEntry`; returns the set of its label values."""
    image = read_image(entry.image)
    check_finite(image, entry.image)
    label = read_image(entry.label) if entry.label else None
    volume, segmentation, geometry = preprocess(image, label, label_name=entry.label, **options)
    points = None
    if entry.landmarks:
        physical = read_landmarks(entry.landmarks)
        points = landmarks_to_voxels(physical, geometry)
        lost = np.sum(np.all(np.isfinite(physical), axis=1) & np.all(points == -1, axis=1))
        if lost:
            _warn('{}: {} landmark(s) outside the preprocessed grid, stored as -1'.format(
                entry.landmarks, lost))
    original = None
    if label is not None:
        original = _label_array(label, entry.label).transpose(2, 1, 0)
    write_scan(h5, entry, volume, segmentation, points, geometry, options.get('modality', 'mr'),
               original)
    if original is None:
        return set()
    return set(int(v) for v in np.unique(original)) - {0}


def _warn(message):
    from tqdm import tqdm
    tqdm.write('warning: ' + message, file=sys.stderr)


def scan_id_from_path(path, id_regex=None):
    """The scan id of an image path: the regex's first group (or whole match) on the file
    name, else the file name without its image extension."""
    name = os.path.basename(os.path.normpath(path))
    if id_regex:
        match = re.search(id_regex, name)
        if not match:
            raise PrepareError('{}: --id_regex {!r} does not match'.format(path, id_regex))
        return match.group(1) if match.groups() else match.group(0)
    for extension in IMAGE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[:-len(extension)]
    return name


def entries_from_glob(pattern, labels=None, landmarks=None, id_regex=None):
    """ScanEntries of the images matching a glob; labels / landmarks are path templates
    with '{id}' (e.g. 'labels/{id}_seg.nii.gz')."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise PrepareError('no image matches {!r}'.format(pattern))
    return [ScanEntry(scan_id,
                      path,
                      _fill_template(labels, scan_id, '--labels'),
                      _fill_template(landmarks, scan_id, '--landmarks'))
            for path in paths for scan_id in [scan_id_from_path(path, id_regex)]]


def _fill_template(template, scan_id, option):
    """A --labels / --landmarks path template with '{id}' filled in (None stays None)."""
    if not template:
        return None
    try:
        return template.format(id=scan_id)
    except (KeyError, IndexError, ValueError) as e:
        raise PrepareError('{} {!r}: the only placeholder of a path template is {{id}} ({}: {})'.format(
            option, template, type(e).__name__, e))


def entries_from_list(path):
    """ScanEntries of a CSV list: rows 'id,image[,label[,landmarks]]' (an optional header row
    starting with 'id', '#' comment rows, empty cells = none); relative paths are taken
    relative to the list's directory."""
    if not os.path.isfile(path):
        raise PrepareError('{}: no such list file'.format(path))
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, 'r', newline='', encoding='utf-8-sig') as f:
        for number, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith('#'):
                continue
            if number == 1 and cells[0].lower() == 'id':
                continue
            if len(cells) < 2 or len(cells) > 4 or not cells[0] or not cells[1]:
                raise PrepareError('{}:{}: expected id,image[,label[,landmarks]]'.format(
                    path, number))
            files = [os.path.join(base, c) if c else None for c in cells[1:]]
            entries.append(ScanEntry(cells[0], *files))
    if not entries:
        raise PrepareError('{}: lists no scans'.format(path))
    return entries


def lpba40_entries(root):
    """ScanEntries S01..S40 of the LPBA40 layout: fixed.nii.gz (S01), test/ (S02..S10),
    train/ (S11..S40), label/Sxx.delineation.structure.label.nii.gz."""
    entries = []
    for i in range(1, 41):
        scan_id = 'S{:02d}'.format(i)
        if i == 1:
            image = os.path.join(root, 'fixed.nii.gz')
        else:
            folder = 'test' if i <= 10 else 'train'
            image = os.path.join(root, folder, scan_id + '.delineation.skullstripped.nii.gz')
        label = os.path.join(root, 'label', scan_id + '.delineation.structure.label.nii.gz')
        entries.append(ScanEntry(scan_id, image, label))
    return entries


def check_entries(entries):
    """PrepareError for duplicate or invalid ids and for missing input files."""
    seen = set()
    for entry in entries:
        if not entry.id or '/' in entry.id or entry.id in ('.', '..'):
            raise PrepareError('invalid scan id {!r} (no "/" allowed)'.format(entry.id))
        if entry.id in seen:
            raise PrepareError('duplicate scan id {!r}'.format(entry.id))
        seen.add(entry.id)
        for key in ('image', 'label', 'landmarks'):
            path = getattr(entry, key)
            if path and not os.path.exists(path):
                raise PrepareError('{} {}: no such file or directory: {}'.format(
                    entry.id, key, path))


def match_ids(patterns, ids, what, strict=True):
    """The ids (in their order) matching any of the fnmatch patterns; PrepareError when
    strict and a pattern matches nothing."""
    for pattern in patterns:
        if strict and not any(fnmatch.fnmatchcase(i, pattern) for i in ids):
            raise PrepareError('{}: {!r} matches no scan'.format(what, pattern))
    return [i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)]


def default_schemes(subset_names):
    """Scheme "1" = subset 'train' (else the first subset), "2" = 'val' if present, and every
    other subset a scheme of its own name."""
    schemes = {}
    if 'train' not in subset_names and subset_names:
        schemes['1'] = {subset_names[0]: 1.0}
    for name in subset_names:
        key = {'train': '1', 'val': '2'}.get(name, name)
        schemes.setdefault(key, {name: 1.0})
    return schemes


def check_options(percentiles=DEFAULT_PERCENTILES, window=DEFAULT_CT_WINDOW, threshold=None,
                  margin=DEFAULT_MARGIN, field_of_view=None):
    """PrepareError naming the flag of a preprocessing option that cannot work (reversed
    percentiles, a window of no width, NaN anywhere, ...), before any image is read."""
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise PrepareError('--percentiles {:g} {:g}: need 0 <= LOW < HIGH <= 100'.format(low, high))
    if not (math.isfinite(window[0]) and math.isfinite(window[1]) and window[1] > 0):
        raise PrepareError('--window {:g} {:g}: need a finite LEVEL and a WIDTH > 0'.format(*window))
    if not (math.isfinite(margin) and margin >= 0):
        raise PrepareError('--margin {:g}: need a finite number of mm >= 0'.format(margin))
    if threshold is not None and not math.isfinite(threshold):
        raise PrepareError('--threshold {:g}: need a finite intensity'.format(threshold))
    if field_of_view is not None and not (math.isfinite(field_of_view) and field_of_view > 0):
        raise PrepareError('--field_of_view {:g}: need a positive number of mm'.format(field_of_view))


def check_finite(image, name):
    """PrepareError naming the image if it holds NaN or infinite voxels."""
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == 'f' and not np.all(np.isfinite(values)):
        raise PrepareError('{}: the image holds NaN or infinite voxels'.format(name))


def preprocessing_record(image_size=DEFAULT_IMAGE_SIZE, modality='mr',
                         percentiles=DEFAULT_PERCENTILES, window=DEFAULT_CT_WINDOW, threshold=None,
                         margin=DEFAULT_MARGIN, spacing=None, roi=None, field_of_view=None):
    """The `preprocess` options as the JSON-able record a spec (key "preprocessing"), a run's
    args.json and an export carry, so that a user's scans get what the model was trained on."""
    return {'image_size': int(image_size), 'modality': modality,
            'percentiles': [float(v) for v in percentiles], 'window': [float(v) for v in window],
            'threshold': threshold, 'margin': float(margin), 'spacing': spacing,
            'field_of_view': field_of_view,
            'roi': None if roi is None else np.asarray(roi, np.float64).reshape(6).tolist()}


def build_spec(name, h5_path, spec_path, ids, image_size, image_type, atlas=None,
               subsets=None, schemes=None, label_values=(), strict=True, preprocessing=None):
    """The JSON dataset spec (original schema) of a converted file.

    subsets: {name: [id patterns]} (default: one subset 'all'); schemes: {key: {subset:
    fraction}} (default `default_schemes`). With strict=False empty subsets are dropped
    (used by presets when only some scans were converted). preprocessing: the
    `preprocessing_record` of the conversion (key "preprocessing")."""
    prefix = name + '/'
    if subsets is None:
        subsets = {'all': ['*']}
    resolved = {}
    for subset, patterns in subsets.items():
        members = match_ids(patterns, ids, 'subset ' + subset, strict)
        if members:
            resolved[subset] = [prefix + i for i in members]
    if schemes is None:
        schemes = default_schemes(list(resolved))
    kept = {}
    for key, parts in schemes.items():
        for subset in parts:
            if subset not in subsets:
                raise PrepareError('scheme {}: unknown subset {!r}'.format(key, subset))
        parts = {s: f for s, f in parts.items() if s in resolved}
        if parts:
            kept[key] = parts
    relative = os.path.relpath(os.path.abspath(h5_path),
                               os.path.dirname(os.path.abspath(spec_path)))
    spec = {'files': {name: {'path': relative.replace(os.sep, '/'), 'type': 'HDF5'}},
            'image_size': [int(image_size)] * 3,
            'image_type': image_type}
    if atlas is not None:
        if atlas not in ids:
            raise PrepareError('atlas {!r} is not among the converted scans'.format(atlas))
        spec['atlas'] = prefix + atlas
    if label_values:
        spec['segmentation_class_value'] = {str(v): int(v) for v in sorted(label_values)}
    spec['subsets'] = resolved
    spec['schemes'] = kept
    if preprocessing is not None:
        spec['preprocessing'] = preprocessing
    return spec


def _temporary_path(path):
    """A new empty file beside `path`, with the permissions a plain open() would give."""
    handle, temporary = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                                         suffix='.tmp', dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    cli.plain_permissions(temporary)
    return temporary


def convert(entries, output, spec_path=None, name=None, image_type='brain', atlas=None,
            subsets=None, schemes=None, strict_subsets=True, progress=True, **options):
    """Convert ScanEntries into the HDF5 `output` (and the JSON spec at spec_path if given).

    options go to `preprocess` (image_size, modality, percentiles, window, threshold, margin,
    spacing, roi, field_of_view). Refuses existing outputs; writes temporary files renamed
    into place at the end, so a failure leaves no output behind. Returns the spec dict. Both
    outputs are owned by this process while it works (cli.exclusive_output)."""
    if spec_path and os.path.abspath(spec_path) == os.path.abspath(output):
        raise PrepareError('--output and --spec are the same file')
    with contextlib.ExitStack() as owned:
        for path in (output, spec_path):
            if path:
                if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                    raise PrepareError('{}: output directory does not exist'.format(path))
                owned.enter_context(cli.exclusive_output(path))
        return _convert(entries, output, spec_path, name, image_type, atlas, subsets, schemes, strict_subsets,
                        progress, options)


def _convert(entries, output, spec_path, name, image_type, atlas, subsets, schemes, strict_subsets, progress,
             options):
    outputs = [p for p in (output, spec_path) if p]
    for path in outputs:
        if os.path.exists(path):
            raise PrepareError('{} exists; refusing to overwrite it'.format(path))
    if not entries:
        raise PrepareError('no scans to convert')
    check_entries(entries)
    if name is None:
        name = os.path.basename(output).split('.')[0]
    ids = [e.id for e in entries]
    image_size = options.get('image_size', DEFAULT_IMAGE_SIZE)
    preprocessing = preprocessing_record(**options)
    spec = build_spec(name, output, spec_path or output, ids, image_size, image_type, atlas,
                      subsets, schemes, (), strict_subsets, preprocessing)

    temporaries = []
    try:
        h5_temporary = _temporary_path(output)
        temporaries.append(h5_temporary)
        label_values = set()
        import h5py
        with h5py.File(h5_temporary, 'w') as h5:
            with cli.progress(len(entries), 'prepare', 'scan', enabled=progress) as bar:
                for entry in entries:
                    label_values |= convert_scan(entry, h5, options)
                    bar.update()
        spec = build_spec(name, output, spec_path or output, ids, image_size, image_type,
                          atlas, subsets, schemes, label_values, strict_subsets, preprocessing)
        if spec_path:
            spec_temporary = _temporary_path(spec_path)
            temporaries.append(spec_temporary)
            with open(spec_temporary, 'w') as f:
                json.dump(spec, f, indent=2)
                f.write('\n')
            os.replace(spec_temporary, spec_path)
            temporaries.remove(spec_temporary)
        os.replace(h5_temporary, output)
        temporaries.remove(h5_temporary)
    finally:
        for path in temporaries:
            if os.path.exists(path):
                os.remove(path)
    return spec


def _key_values(text, option):
    if '=' not in text:
        raise PrepareError('{} {!r}: expected NAME=VALUE[,VALUE...]'.format(option, text))
    key, values = text.split('=', 1)
    values = [v.strip() for v in values.split(',') if v.strip()]
    if not key.strip() or not values:
        raise PrepareError('{} {!r}: expected NAME=VALUE[,VALUE...]'.format(option, text))
    return key.strip(), values


def _parse_schemes(texts):
    schemes = {}
    for text in texts:
        key, parts = _key_values(text, '--scheme')
        schemes[key] = {}
        for part in parts:
            subset, _, fraction = part.partition(':')
            try:
                schemes[key][subset] = float(fraction) if fraction else 1.0
            except ValueError:
                raise PrepareError('--scheme {!r}: bad fraction {!r}'.format(text, fraction))
    return schemes


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        prog='python -m data_util.prepare',
        description='Convert scans (+ label maps, + landmarks) into the HDF5 + JSON dataset '
                    'format: reorient to LPS, crop to the foreground, pad to a cube, resample '
                    'to image_size^3, intensities to uint8 0..255.')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--images', metavar='GLOB',
                        help="image files or DICOM directories, e.g. 'scans/*.nii.gz'")
    source.add_argument('--list', metavar='CSV', help='rows id,image[,label[,landmarks]]')
    source.add_argument('--lpba40', metavar='DIR',
                        help='the LPBA40 layout (fixed.nii.gz, test/, train/, label/): ids '
                             'S01..S40, atlas S01, train S11..S35, val S36..S40, test S02..S10')
    parser.add_argument('--labels', metavar='TEMPLATE',
                        help="with --images: label map path with {id}, e.g. 'seg/{id}.nii.gz'")
    parser.add_argument('--landmarks', metavar='TEMPLATE',
                        help='with --images: landmarks file path with {id} (x,y,z mm LPS rows)')
    parser.add_argument('--id_regex', metavar='REGEX',
                        help='with --images: scan id = first group of REGEX on the file name')
    parser.add_argument('--output', required=True, metavar='OUT.h5')
    parser.add_argument('--spec', metavar='OUT.json', help='also write the JSON dataset spec')
    parser.add_argument('--name', help='the spec\'s file key (default: output name stem)')
    parser.add_argument('--image_type', choices=('brain', 'liver'),
                        help='default: brain for mr, liver for ct')
    parser.add_argument('--ids', metavar='PATTERNS', help='convert only these ids (a,b*,...)')
    parser.add_argument('--atlas', metavar='ID')
    parser.add_argument('--subset', action='append', default=[], metavar='NAME=PATTERNS',
                        help='a subset of ids by fnmatch patterns, e.g. train=S1*,S2* '
                             '(repeatable; default one subset "all")')
    parser.add_argument('--scheme', action='append', default=[],
                        metavar='KEY=SUBSET[:FRACTION],...',
                        help='(repeatable) default: 1=train, 2=val, other subsets by name')
    parser.add_argument('--image_size', type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument('--modality', choices=MODALITIES, default='mr')
    parser.add_argument('--percentiles', type=float, nargs=2, default=DEFAULT_PERCENTILES,
                        metavar=('LOW', 'HIGH'), help='mr: intensity percentiles to 0 and 255')
    parser.add_argument('--window', type=float, nargs=2, default=DEFAULT_CT_WINDOW,
                        metavar=('LEVEL', 'WIDTH'), help='ct: HU window to 0..255')
    parser.add_argument('--threshold', type=float,
                        help='foreground = intensity > THRESHOLD (default Otsu / -500 HU)')
    parser.add_argument('--margin', type=float, default=DEFAULT_MARGIN, help='mm')
    parser.add_argument('--spacing', type=float,
                        help='fixed output voxel size in mm (default: fit the crop box)')
    parser.add_argument('--roi', type=float, nargs=6, metavar=('X0', 'Y0', 'Z0', 'X1', 'Y1', 'Z1'),
                        help='crop box corners in LPS mm instead of the foreground box')
    parser.add_argument('--field_of_view', type=float, metavar='MM',
                        help='a cube of MM mm centred on the foreground centroid instead of the '
                             'foreground box (--lpba40: {:g} unless --spacing or --roi)'.format(
                                 LPBA40_FIELD_OF_VIEW))
    parser.add_argument('--quiet', action='store_true',
                        help='no progress output')
    return parser.parse_args(argv)


def run(args):
    """Carry out parsed command-line arguments; returns the spec dict."""
    if (args.labels or args.landmarks or args.id_regex) and not args.images:
        raise PrepareError('--labels, --landmarks and --id_regex go with --images')
    if args.image_size < 2:
        raise PrepareError('--image_size must be at least 2')
    check_options(args.percentiles, args.window, args.threshold, args.margin, args.field_of_view)
    if args.spacing is not None and not args.spacing > 0:
        raise PrepareError('--spacing must be a positive number of mm')
    if args.field_of_view is not None and (args.spacing is not None or args.roi is not None):
        raise PrepareError('--field_of_view sets the grid alone: give no --spacing or --roi with it')
    if args.lpba40:
        if not os.path.isdir(args.lpba40):
            raise PrepareError('{}: no such directory'.format(args.lpba40))
        entries = lpba40_entries(args.lpba40)
    elif args.list:
        entries = entries_from_list(args.list)
    else:
        entries = entries_from_glob(args.images, args.labels, args.landmarks, args.id_regex)
    if args.ids:
        patterns = [p.strip() for p in args.ids.split(',') if p.strip()]
        keep = set(match_ids(patterns, [e.id for e in entries], '--ids'))
        entries = [e for e in entries if e.id in keep]

    subsets = dict(_key_values(text, '--subset') for text in args.subset) or None
    schemes = _parse_schemes(args.scheme) or None
    atlas, name, strict = args.atlas, args.name, True
    image_type = args.image_type or ('liver' if args.modality == 'ct' else 'brain')
    if args.lpba40:
        atlas = atlas or LPBA40_ATLAS
        name = name or 'lpba'
        strict = subsets is not None
        subsets = subsets or LPBA40_SUBSETS
        if args.field_of_view is None and args.spacing is None and args.roi is None:
            args.field_of_view = LPBA40_FIELD_OF_VIEW
    roi = None if args.roi is None else (args.roi[:3], args.roi[3:])
    return convert(entries, args.output, args.spec, name, image_type, atlas, subsets, schemes,
                   strict_subsets=strict, progress=not args.quiet,
                   image_size=args.image_size, modality=args.modality,
                   percentiles=tuple(args.percentiles), window=tuple(args.window),
                   threshold=args.threshold, margin=args.margin, spacing=args.spacing, roi=roi,
                   field_of_view=args.field_of_view)


def main(argv=None):
    """Command-line entry; returns the exit status (0, or 2 with a one-line error). SIGTERM is
    taken like Ctrl-C: the temporary outputs are removed and one line says so."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, cli._terminate)
    try:
        spec = run(args)
    except (PrepareError, cli.UserError) as e:
        print('error: {}'.format(' '.join(str(e).split())), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('error: interrupted; nothing was written', file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print('error: {}'.format(' '.join(str(e).split())), file=sys.stderr)
        return 2
    count = sum(len(v) for v in spec['subsets'].values())
    print('wrote {} ({} subsets, {} scans in subsets){}'.format(
        args.output, len(spec['subsets']), count,
        ', spec ' + args.spec if args.spec else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
