"""Reading a scan and preprocessing it onto a network's grid: one path for the converter
(data_util.prepare), predict.py and the Python API (registration.py).

`preprocess` works all in SimpleITK and in physical space (mm, LPS):

1. read: a file (any format SimpleITK reads; FreeSurfer .mgz/.mgh through nibabel), or a
   directory holding a DICOM series (the largest series if several); the image must be a 3-D
   scalar volume.
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
"""
import math
import os
import re

import numpy as np
import SimpleITK as sitk

import cli
from errors import UserError
from data_util.geometry import Geometry, to_array

DEFAULT_IMAGE_SIZE = 128
DEFAULT_MARGIN = 4.0
DEFAULT_PERCENTILES = (0.5, 99.5)
DEFAULT_CT_WINDOW = (50.0, 400.0)
CT_FOREGROUND_HU = -500.0
MIN_COMPONENT_FRACTION = 0.01
COVERAGE_SPACING = 2.0   # mm: the voxel size foreground_outside measures the foreground at
SPACING_TOLERANCE = 1e-3
ORIGIN_TOLERANCE = 0.01
DIRECTION_TOLERANCE = 1e-3
MODALITIES = ('mr', 'ct')
FREESURFER_EXTENSIONS = ('.mgz', '.mgh')
ORTHOGONALITY_TOLERANCE = 1e-4
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
ARRAY_CONVENTION = 'arrays [X,Y,Z] = sitk.GetArrayFromImage(img).transpose(2,1,0); physical mm, LPS'


class PrepareError(UserError):
    """An input problem; the message is a single line."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))


def image_from_voxel_to_ras(array, affine, path):
    """A volume as nibabel gives it -> sitk.Image with the same physical geometry.

    array: [i, j, k] (voxel index order, as stored), any numeric dtype and byte order (kept,
    in native order; bool and float16 become float32); affine: 4x4 mapping a
    voxel index (i, j, k, 1) to RAS mm. ITK keeps LPS mm: spacing = the column norms of the
    affine's 3x3 part, direction = its normalised columns turned to LPS, origin = voxel (0, 0, 0)
    in LPS. PrepareError naming ``path`` if the axes are not orthogonal (ITK cannot hold a shear).
    """
    affine = np.asarray(affine, np.float64)
    matrix = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        raise PrepareError('{}: the voxel-to-world matrix has a zero-length axis'.format(path))
    direction = matrix / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > ORTHOGONALITY_TOLERANCE:
        raise PrepareError('{}: the voxel axes are not orthogonal (a sheared voxel-to-world matrix); '
                           'resample the image onto an orthogonal grid first'.format(path))
    array = np.asarray(array)
    if array.dtype.kind == 'b' or (array.dtype.kind == 'f' and array.itemsize == 2):
        array = array.astype(np.float32)
    array = array.astype(array.dtype.newbyteorder('='), copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in RAS_TO_LPS @ affine[:3, 3]])
    return image


def _read_freesurfer(path):
    """A FreeSurfer .mgz / .mgh file (read by nibabel) -> 3-D sitk.Image; PrepareError for a
    damaged file or more than one frame."""
    import zlib
    import nibabel
    from nibabel.freesurfer.mghformat import MGHError
    from nibabel.spatialimages import HeaderDataError
    try:
        loaded = nibabel.load(path)
        array = np.asanyarray(loaded.dataobj)
    except (nibabel.filebasedimages.ImageFileError, MGHError, HeaderDataError, OSError, EOFError,
            ValueError, zlib.error) as e:
        raise PrepareError('{}: cannot read image ({}: {})'.format(path, type(e).__name__, e))
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise PrepareError('{}: a 3-D volume is needed, got size {}'.format(
            path, 'x'.join(str(n) for n in array.shape)))
    return image_from_voxel_to_ras(array, loaded.affine, path)


def read_image(path):
    """Read a 3-D scalar image: a file SimpleITK reads (NIfTI, MHA/MHD, NRRD, ...), a
    FreeSurfer .mgz/.mgh file, or a directory with a DICOM series (the series with
    the most files). Returns a sitk.Image; PrepareError otherwise."""
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
                cli.progress_write('warning: {}: {} DICOM series, reading the largest ({} files)'.format(
                    path, len(series), len(files)))
            reader.SetFileNames(files)
            image = reader.Execute()
        elif path.lower().endswith(FREESURFER_EXTENSIONS):
            image = _read_freesurfer(path)
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


def label_array(label, label_name):
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
        label_image = sitk.GetImageFromArray(label_array(label, label_name))
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


def foreground_outside(image, geometry, modality='mr', threshold=None):
    """The fraction (0..1) of a scan's foreground that lies outside its preprocessed grid's cube
    (the network never sees it: its flow there is the border's, extended). The foreground is
    preprocess's (threshold or Otsu, components of at least 1 % of the largest one), found on
    the image shrunk to voxels of about COVERAGE_SPACING mm, which is cheap and plenty for a
    fraction. image: sitk.Image as given to `preprocess`; geometry: its `Geometry`."""
    factors = [max(1, int(COVERAGE_SPACING // s)) for s in image.GetSpacing()]
    coarse = sitk.Cast(sitk.Shrink(image, factors) if max(factors) > 1 else image, sitk.sitkFloat32)
    mask = _foreground_mask(coarse, modality, threshold)
    _, labels = _components(mask, MIN_COMPONENT_FRACTION)
    kept = np.isin(to_array(sitk.ConnectedComponent(mask)), labels)
    if not kept.any():
        return 0.0
    direction = np.reshape(coarse.GetDirection(), (3, 3))
    points = np.asarray(coarse.GetOrigin()) + (np.argwhere(kept) * np.asarray(coarse.GetSpacing())) @ direction.T
    voxels = geometry.physical_to_voxel(points)
    inside = np.all((voxels > -0.5) & (voxels < np.asarray(geometry.grid_size) - 0.5), axis=1)
    return float(1.0 - inside.mean())


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
