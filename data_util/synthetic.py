"""Synthetic liver-like CT phantoms with known correspondences, for tests and smoke runs.

    python -m data_util.synthetic OUT_DIR [--n_scans N] [--image_size S] [--seed K]
                                          [--n_val N] [--n_test N] [--labels K]

writes OUT_DIR/synthetic.h5 (one group per scan: `volume` uint8 [S, S, S], `segmentation`
uint8 [S, S, S], `point` float32 [6, 3]) and OUT_DIR/synthetic.json, a dataset spec of the
original schema (image_type "liver"; subsets train/val/test; schemes 1 = train, 2 = val and
"test"; its file path "synthetic.h5" is relative and resolves against the spec's directory).

The phantom (one shared template, in voxel coordinates of the output grid):
  - air (0) around an elliptic body cylinder of soft tissue (~70) along the last axis, with a
    bright vertebra-like tube (~230, hollow core ~150) and a kidney-like ellipsoid (~150);
  - the organ: a smooth union of three ellipsoidal lobes with a gently perturbed boundary,
    parenchyma ~125 with a smooth texture;
  - inside the organ a vessel tree of bright tubes (~205) along smooth curves with two
    bifurcations, a bright lesion (~175) and a dark cyst (~45).
Each subject samples the template through its own pull-back map
    T(x) = c + A (x - c) + t + d(x)          (x, T(x) in voxels, c the volume centre)
with A a small rotation (up to 6 degrees per axis) times an anisotropic scale (0.93..1.07), t a
translation (up to 4 % of the size) and d a smooth random displacement (Gaussian bumps on a
5 x 5 x 5 grid, largest displacement 4..7 % of the size), then gets a gain (0.93..1.07) and
Gaussian noise (sigma 3 grey levels), rounded to uint8.

Segmentation: the organ mask as 0/255 (the liver protocol); with labels=K (1..6) instead
integer labels 1..K for the structures liver, vessel, lesion, cyst, right lobe, left lobe
(the first K of these; the lobes are parts of the organ, drawn under the internal structures)
and the spec lists them in segmentation_class_value.

Landmarks: six anatomically defined template points - the first and second vessel
bifurcations, the lesion and cyst centres, the start of the vessel trunk (the hilum) and the
end of the right vessel branch - mapped into
each subject by solving T(x) = p (fixed-point iteration), so point i of every subject marks
the same anatomy. All six lie inside the organ.
"""
import argparse
import json
import os
import secrets
import sys

import h5py
import numpy as np
from scipy import ndimage

from .dataset import DataError

STRUCTURES = ('liver', 'vessel', 'lesion', 'cyst', 'lobe_right', 'lobe_left')
LOBES = (  # (centre, radii) as fractions of the image size
    ((0.45, 0.50, 0.50), (0.28, 0.22, 0.27)),
    ((0.62, 0.44, 0.56), (0.20, 0.17, 0.20)),
    ((0.28, 0.58, 0.44), (0.15, 0.12, 0.14)),
)
HILUM, BIFURCATION1, BIFURCATION2 = (0.50, 0.64, 0.42), (0.46, 0.52, 0.48), (0.60, 0.44, 0.56)
END_LEFT, END_RIGHT, END_FRONT = (0.28, 0.57, 0.44), (0.72, 0.38, 0.64), (0.62, 0.52, 0.70)
VESSELS = (  # (start, end, bend, radius) as fractions of the image size
    (HILUM, BIFURCATION1, (0.02, 0.0, -0.02), 0.030),
    (BIFURCATION1, BIFURCATION2, (0.0, -0.03, -0.02), 0.025),
    (BIFURCATION1, END_LEFT, (0.0, -0.03, 0.02), 0.022),
    (BIFURCATION2, END_RIGHT, (0.0, 0.02, -0.02), 0.020),
    (BIFURCATION2, END_FRONT, (-0.02, 0.0, 0.0), 0.020),
)
LESION, LESION_RADIUS = (0.38, 0.40, 0.62), 0.055
CYST, CYST_RADIUS = (0.52, 0.42, 0.36), 0.045
LANDMARKS = (BIFURCATION1, BIFURCATION2, LESION, CYST, HILUM, END_RIGHT)
INTENSITY = {'body': 70.0, 'bone': 230.0, 'marrow': 150.0, 'kidney': 150.0, 'organ': 125.0,
             'vessel': 205.0, 'lesion': 175.0, 'cyst': 45.0}
MAX_ROTATION_DEG = 6.0
MAX_SCALE = 0.07
MAX_TRANSLATION = 0.04
DISPLACEMENT_RANGE = (0.04, 0.07)
DEFORMATION_GRID = 5
NOISE_SIGMA = 3.0
MAX_GAIN = 0.07


def _gaussian_basis(coord, n, grid):
    """Gaussian bumps [len(coord), grid] at voxel coordinates `coord` of an axis of n voxels;
    centres spread evenly over the axis, width one grid spacing."""
    centres = np.linspace(0.0, 1.0, grid)
    sigma = 1.0 / (grid - 1)
    frac = np.asarray(coord, np.float64)[:, None] / max(n - 1, 1)
    return np.exp(-0.5 * ((frac - centres[None, :]) / sigma) ** 2)


class _SmoothField:
    """A smooth random field: coefficients [C, g, g, g] on Gaussian bumps along each axis."""

    def __init__(self, shape, coefficients):
        self.shape = shape
        self.coefficients = coefficients

    def grid(self):
        """The field on the full voxel grid, float32 [C, X, Y, Z]."""
        g = self.coefficients.shape[1]
        bx, by, bz = (_gaussian_basis(np.arange(n), n, g) for n in self.shape)
        out = np.einsum('cabd,xa,yb,zd->cxyz', self.coefficients, bx, by, bz, optimize=True)
        return out.astype(np.float32)

    def at(self, point):
        """The field at one voxel-coordinate point [3], float64 [C]."""
        g = self.coefficients.shape[1]
        bx, by, bz = (_gaussian_basis([p], n, g)[0] for p, n in zip(point, self.shape))
        return np.einsum('cabd,a,b,d->c', self.coefficients, bx, by, bz)


def _axes(shape):
    """Broadcastable voxel coordinate arrays (float32) of a grid."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
            for k, n in enumerate(shape)]


def _voxels(frac, shape):
    """Fractions of the image size -> voxel coordinates, float64 [3]."""
    return np.asarray(frac, np.float64) * (np.asarray(shape, np.float64) - 1)


def _ellipsoid_distance(axes, shape, centre, radii):
    """Approximate signed distance (voxels, negative inside) to an ellipsoid given in fractions."""
    c = _voxels(centre, shape)
    r = np.asarray(radii, np.float64) * (np.asarray(shape, np.float64) - 1)
    q = sum(((a - ck) / rk) ** 2 for a, ck, rk in zip(axes, c, r))
    return ((np.sqrt(q) - 1.0) * np.mean(r)).astype(np.float32)


def _soft(distance, width):
    """Smooth inside-indicator of a signed distance field, edge width in voxels."""
    return (0.5 * (1.0 - np.tanh(distance / width))).astype(np.float32)


def _smooth_min(a, b, k):
    """Smooth union of two signed distance fields (k in voxels)."""
    m = np.minimum(a, b)
    return m - k * np.log1p(np.exp(-np.abs(a - b) / k))


def _tube_distance(shape, start, end, bend, radius):
    """Signed distance (voxels, negative inside) to a tube along a quadratic curve.

    The curve is start + s (end - start) + 4 s (1 - s) bend, s in [0, 1], all in fractions of
    the image size; the distance is computed in a band around the curve (elsewhere +inf).
    """
    p0, p1, b = (_voxels(v, shape) for v in (start, end, bend))
    r = radius * (min(shape) - 1)
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(b)
    s = np.linspace(0.0, 1.0, max(int(np.ceil(2 * length)), 2))[:, None]
    samples = p0 + s * (p1 - p0) + 4 * s * (1 - s) * b
    distance = np.full(shape, np.inf, np.float32)
    reach = int(np.ceil(r + 3))
    for q in samples:
        lo = np.maximum(np.floor(q).astype(int) - reach, 0)
        hi = np.minimum(np.floor(q).astype(int) + reach + 2, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(l, h) for l, h in zip(lo, hi))
        local = [np.arange(l, h, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
                 - q[k] for k, (l, h) in enumerate(zip(lo, hi))]
        d = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) - r
        np.minimum(distance[box], d, out=distance[box])
    return distance


class _Template:
    """The shared phantom on the output grid: intensity, organ distance and label volumes."""

    def __init__(self, shape, rng):
        self.shape = tuple(shape)
        axes = _axes(shape)
        edge = 0.6
        size = min(shape) - 1

        organ = None
        lobes = []
        for centre, radii in LOBES:
            d = _ellipsoid_distance(axes, shape, centre, radii)
            lobes.append(d)
            organ = d if organ is None else _smooth_min(organ, d, 0.03 * size)
        bumps = _SmoothField(shape, rng.standard_normal((1, 6, 6, 6))).grid()[0]
        organ = organ + 0.025 * size * bumps / np.abs(bumps).max()
        self.organ = organ.astype(np.float32)

        body_q = ((axes[0] / (shape[0] - 1) - 0.5) / 0.47) ** 2 \
            + ((axes[1] / (shape[1] - 1) - 0.5) / 0.43) ** 2
        body = np.broadcast_to((np.sqrt(body_q) - 1.0) * 0.45 * size, shape)
        spine_q = ((axes[0] / (shape[0] - 1) - 0.5) / 0.07) ** 2 \
            + ((axes[1] / (shape[1] - 1) - 0.86) / 0.06) ** 2
        spine = np.broadcast_to((np.sqrt(spine_q) - 1.0) * 0.065 * size, shape)
        kidney = _ellipsoid_distance(axes, shape, (0.74, 0.72, 0.40), (0.07, 0.05, 0.10))
        vessel = None
        for start, end, bend, radius in VESSELS:
            d = _tube_distance(shape, start, end, bend, radius)
            vessel = d if vessel is None else np.minimum(vessel, d)
        lesion = _ellipsoid_distance(axes, shape, LESION, [LESION_RADIUS] * 3)
        cyst = _ellipsoid_distance(axes, shape, CYST, [CYST_RADIUS] * 3)

        texture = _SmoothField(shape, rng.standard_normal((1, 9, 9, 9))).grid()[0]
        texture /= np.abs(texture).max()
        inside_organ = _soft(self.organ, edge)
        image = INTENSITY['body'] * (1 + 0.05 * texture) * _soft(body, edge)
        for distance, value in ((kidney, INTENSITY['kidney']), (spine, INTENSITY['bone']),
                                (spine + 0.03 * size, INTENSITY['marrow'])):
            w = _soft(distance, edge)
            image = image * (1 - w) + value * w
        image = image * (1 - inside_organ) + INTENSITY['organ'] * (1 + 0.08 * texture) \
            * inside_organ
        for distance, value in ((vessel, INTENSITY['vessel']), (lesion, INTENSITY['lesion']),
                                (cyst, INTENSITY['cyst'])):
            w = _soft(distance, edge) * inside_organ
            image = image * (1 - w) + value * w
        self.image = image.astype(np.float32)

        in_organ = self.organ < 0
        nearest_lobe = np.argmin(np.stack(lobes), axis=0)
        self.structures = {
            'liver': in_organ,
            'vessel': in_organ & (vessel < 0),
            'lesion': in_organ & (lesion < 0),
            'cyst': in_organ & (cyst < 0),
            'lobe_right': in_organ & (nearest_lobe == 1),
            'lobe_left': in_organ & (nearest_lobe == 2),
        }
        self.landmarks = np.stack([_voxels(p, shape) for p in LANDMARKS])
        depth = ndimage.map_coordinates(self.organ, self.landmarks.T, order=1)
        if np.any(depth > -1.0):
            raise RuntimeError('synthetic template: a landmark lies outside the organ')

    def labels(self, n_labels):
        """Integer label volume (uint8) of the first n_labels STRUCTURES; the lobes are drawn
        first and the internal structures over them."""
        names = STRUCTURES[:n_labels]
        out = np.zeros(self.shape, np.uint8)
        order = [n for n in ('liver', 'lobe_right', 'lobe_left') if n in names] \
            + [n for n in ('vessel', 'lesion', 'cyst') if n in names]
        for name in order:
            out[self.structures[name]] = STRUCTURES.index(name) + 1
        return out


class _Subject:
    """One subject's pull-back map T(x) = c + A (x - c) + t + d(x) (voxels)."""

    def __init__(self, shape, rng):
        self.shape = tuple(shape)
        self.centre = (np.asarray(shape, np.float64) - 1) / 2
        angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
        rotation = np.eye(3)
        for axis, angle in enumerate(angles):
            i, j = [k for k in range(3) if k != axis]
            r = np.eye(3)
            r[i, i] = r[j, j] = np.cos(angle)
            r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
            rotation = rotation @ r
        self.matrix = rotation @ np.diag(1 + rng.uniform(-MAX_SCALE, MAX_SCALE, 3))
        self.translation = rng.uniform(-MAX_TRANSLATION, MAX_TRANSLATION, 3) \
            * (np.asarray(shape) - 1)
        coefficients = rng.standard_normal((3,) + (DEFORMATION_GRID,) * 3)
        field = _SmoothField(shape, coefficients)
        self.displacement = field.grid()
        target = rng.uniform(*DISPLACEMENT_RANGE) * (min(shape) - 1)
        scale = target / np.sqrt((self.displacement ** 2).sum(axis=0)).max()
        self.displacement *= scale
        self.field = _SmoothField(shape, coefficients * scale)

    def coordinates(self):
        """T(x) on the full grid: template voxel coordinates, float32 [3, X, Y, Z]."""
        axes = _axes(self.shape)
        out = self.displacement.copy()
        for k in range(3):
            out[k] += self.centre[k] + self.translation[k]
            for m in range(3):
                out[k] += self.matrix[k, m] * (axes[m] - self.centre[m])
        return out

    def locate(self, point, iterations=200, tolerance=1e-6):
        """The subject voxel x with T(x) = point (template voxels), float64 [3]."""
        inverse = np.linalg.inv(self.matrix)
        base = np.asarray(point, np.float64) - self.centre - self.translation
        x = self.centre + inverse @ base
        for _ in range(iterations):
            new = self.centre + inverse @ (base - self.field.at(x))
            if np.max(np.abs(new - x)) < tolerance:
                return new
            x = new
        raise RuntimeError('synthetic subject: landmark inversion did not converge')


def _sizes(image_size):
    if np.isscalar(image_size):
        image_size = [image_size] * 3
    sizes = [int(s) for s in image_size]
    if len(sizes) != 3 or min(sizes) < 16:
        raise DataError('image_size must be an int or 3 ints >= 16, got {!r}'.format(image_size))
    return sizes


def _subject_volumes(template, shape, rng, n_labels):
    """Draws one subject: (volume uint8, segmentation uint8, points float32 [6, 3])."""
    for _ in range(20):
        subject = _Subject(shape, rng)
        points = np.stack([subject.locate(p) for p in template.landmarks])
        if np.all(points >= 1) and np.all(points <= np.asarray(shape) - 2):
            break
    else:
        raise RuntimeError('synthetic subject: landmarks keep leaving the volume')
    coords = subject.coordinates()
    image = ndimage.map_coordinates(template.image, coords, order=1, mode='nearest')
    gain = 1 + rng.uniform(-MAX_GAIN, MAX_GAIN)
    image = image * gain + rng.normal(0.0, NOISE_SIGMA, shape).astype(np.float32)
    volume = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if n_labels:
        segmentation = ndimage.map_coordinates(template.labels(n_labels), coords, order=0,
                                               mode='constant', cval=0).astype(np.uint8)
    else:
        organ = ndimage.map_coordinates(template.organ, coords, order=1, mode='nearest')
        segmentation = np.where(organ < 0, 255, 0).astype(np.uint8)
    return volume, segmentation, points.astype(np.float32)


def make_synthetic(out_dir, n_scans=12, image_size=64, seed=0, n_val=None, n_test=None,
                   labels=0):
    """Writes OUT_DIR/synthetic.h5 and OUT_DIR/synthetic.json; returns the spec path.

    Args:
        out_dir: output directory (created if missing); existing outputs are never overwritten.
        n_scans: total number of subjects.
        image_size: int or 3 ints (voxels per axis, >= 16).
        seed: random seed; the same arguments give identical files.
        n_val, n_test: scans in the val and test subsets (default max(2, n_scans // 6) each);
            the rest is train. Every subset needs at least 2 scans.
        labels: 0 for a 0/255 organ mask; K in 1..6 for integer labels 1..K (see module doc).
    """
    shape = _sizes(image_size)
    n_val = max(2, n_scans // 6) if n_val is None else int(n_val)
    n_test = max(2, n_scans // 6) if n_test is None else int(n_test)
    n_train = n_scans - n_val - n_test
    if min(n_train, n_val, n_test) < 2:
        raise DataError('need at least 2 scans per subset, got train {} / val {} / test {}'
                        .format(n_train, n_val, n_test))
    if not 0 <= labels <= len(STRUCTURES):
        raise DataError('labels must be 0..{}, got {}'.format(len(STRUCTURES), labels))
    os.makedirs(out_dir, exist_ok=True)
    h5_path = os.path.join(out_dir, 'synthetic.h5')
    spec_path = os.path.join(out_dir, 'synthetic.json')
    for path in (h5_path, spec_path):
        if os.path.exists(path):
            raise DataError('{}: already exists, refusing to overwrite'.format(path))

    rng = np.random.default_rng(seed)
    template = _Template(shape, rng)
    ids = ['s{:03d}'.format(i) for i in range(n_scans)]
    entries = ['synthetic/' + i for i in ids]
    spec = {
        'description': 'synthetic liver-like phantoms (data_util.synthetic): {} scans, size {}, '
                       'seed {}, labels {}'.format(n_scans, shape, seed, labels),
        'files': {'synthetic': {'path': 'synthetic.h5', 'type': 'HDF5'}},
        'image_size': shape,
        'image_type': 'liver',
        'subsets': {'train': entries[:n_train], 'val': entries[n_train:n_train + n_val],
                    'test': entries[n_train + n_val:]},
        'schemes': {'1': {'train': 1.0}, '2': {'val': 1.0}, 'test': {'test': 1.0}},
    }
    if labels:
        spec['segmentation_class_value'] = {name: i + 1 for i, name in
                                            enumerate(STRUCTURES[:labels])}

    token = '{}.{}'.format(os.getpid(), secrets.token_hex(4))
    h5_tmp = os.path.join(out_dir, '.synthetic.h5.{}.tmp'.format(token))
    spec_tmp = os.path.join(out_dir, '.synthetic.json.{}.tmp'.format(token))
    try:
        with h5py.File(h5_tmp, 'x') as f:
            for scan_id in ids:
                volume, segmentation, points = _subject_volumes(template, shape, rng, labels)
                group = f.create_group(scan_id)
                group['volume'] = volume
                group['segmentation'] = segmentation
                group['point'] = points
        with open(spec_tmp, 'x') as f:
            json.dump(spec, f, indent=2)
            f.write('\n')
        os.replace(h5_tmp, h5_path)
        os.replace(spec_tmp, spec_path)
    finally:
        for path in (h5_tmp, spec_tmp):
            if os.path.exists(path):
                os.remove(path)
    return spec_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m data_util.synthetic',
        description='Write synthetic liver-like phantoms (HDF5 + dataset spec) to OUT_DIR.')
    parser.add_argument('out_dir')
    parser.add_argument('--n_scans', type=int, default=12)
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--n_val', type=int, default=None)
    parser.add_argument('--n_test', type=int, default=None)
    parser.add_argument('--labels', type=int, default=0,
                        help='0: 0/255 organ mask; K: integer labels 1..K (K <= 6)')
    args = parser.parse_args(argv)
    try:
        spec_path = make_synthetic(args.out_dir, n_scans=args.n_scans,
                                   image_size=args.image_size, seed=args.seed,
                                   n_val=args.n_val, n_test=args.n_test, labels=args.labels)
    except DataError as e:
        print('error: {}'.format(e), file=sys.stderr)
        return 2
    with open(spec_path) as f:
        subsets = json.load(f)['subsets']
    print('wrote {} scans of {}^3 (train {} / val {} / test {}) to {}'.format(
        args.n_scans, args.image_size, len(subsets['train']), len(subsets['val']),
        len(subsets['test']), spec_path))
    return 0


if __name__ == '__main__':
    sys.exit(main())
