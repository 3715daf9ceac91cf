"""How a trained model copes with what users send: moving scans shifted, rotated, cut short,
stored otherwise, acquired otherwise.

    python -m bench.robustness -c weights/RUN [--lpba40 ../shared/data/LPBA40] [--pairs N] [--validation]

Each LPBA40 test scan S02..S10 (with --validation the validation scans S36..S40 instead, for
choices that must not look at the test scans) is registered to the atlas S01 through predict.py's own pipeline
(its preprocessing, network and displacement field; the model loaded once), first as it is and
then perturbed the way scans from elsewhere differ: the moving scan's content (image and label
map alike, resampled on its own grid) shifted by 10 mm, rotated by 10 degrees about the
left-right or the inferior-superior axis, or its field of view cut 25 mm short at the bottom; then
as scans from other sites and scanners differ with the same anatomy: stored with other axes
(permuted and flipped, the physical content unchanged), thick slices (3 mm along the
inferior-superior axis, each the mean of three 1 mm slices; the label map takes the middle one),
a smooth multiplicative bias field (0.8 at one corner to 1.2 at the opposite one), and Rician
noise (sigma 4 % of the scan's 99th intensity percentile; a fixed seed), another contrast (each
intensity v mapped to m (v / m)^gamma, m the scan's maximum: gamma 0.6 brightens grey matter
towards white, 1.6 darkens it). Last, both scans of the pair stored with headers that misstate
their orientation the same way (each header's physical space turned by 90 degrees about the
left-right axis, or 180 degrees about the anterior-posterior one: the arrays and the scans'
relative position unchanged, as when files are written from arrays with a wrong or default
header), so that the network sees the pair in another orientation. The table gives the
mean label Dice on S01's 1 mm grid (56 labels) per perturbation, before registration (identity)
and after, and the loss against the unperturbed scans.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402

SHIFT_MM = 10.0
ANGLE_DEG = 10.0
CUT_MM = 25.0
STORED_ORIENTATION = 'SRA'
SLICE_FACTOR = 3
BIAS = 0.2
NOISE = 0.04
TEST, VALIDATION = tuple(range(2, 11)), tuple(range(36, 41))
GAMMAS = (0.6, 1.6)
HEADER_TURNS = {'90 deg (L-R axis)': ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
                '180 deg (A-P axis)': ((-1, 0, 0), (0, 1, 0), (0, 0, -1))}


def _about_centre(image, transform):
    """The transform re-centred on the image's physical centre."""
    import SimpleITK as sitk
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    if isinstance(transform, sitk.Euler3DTransform):
        transform.SetCenter(centre)
    return transform


def _array(image):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _with_array(image, values):
    """values (array order z, y, x) on image's grid, in image's pixel type."""
    import SimpleITK as sitk
    out = sitk.Cast(sitk.GetImageFromArray(values), image.GetPixelID())
    out.CopyInformation(image)
    return out


def bias_field(shape, strength=BIAS):
    """A multiplicative field over an array of shape, linear in the index along the main
    diagonal: 1 - strength at index 0 to 1 + strength at the opposite corner."""
    ramps = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing='ij')
    return 1.0 + strength * sum(ramps) / len(shape)


def rician_noise(values, rng, level=NOISE):
    """|values + n1 + i n2|, n1 and n2 Gaussian with sigma = level x the 99th percentile of values."""
    sigma = level * np.percentile(values, 99)
    return np.hypot(values + rng.normal(0.0, sigma, values.shape), rng.normal(0.0, sigma, values.shape))


def contrast(values, gamma):
    """m (values / m)^gamma, m = the maximum of values (negative values taken as 0)."""
    top = values.max()
    return top * (np.clip(values, 0.0, None) / top) ** gamma


def turned_header(image, rotation):
    """A copy of image whose physical space is turned by rotation (3 x 3, LPS): the same array,
    direction rotation @ D, origin rotation @ origin."""
    import SimpleITK as sitk
    rotation = np.asarray(rotation, dtype=np.float64)
    out = sitk.Image(image)
    out.SetDirection((rotation @ np.reshape(image.GetDirection(), (3, 3))).ravel().tolist())
    out.SetOrigin((rotation @ np.asarray(image.GetOrigin())).tolist())
    return out


def perturbations():
    """{name: function(image, labels) -> (image, labels)} of the moving scan."""
    import SimpleITK as sitk

    def resampled(transform):
        def apply(image, labels):
            t = _about_centre(image, transform)
            return (sitk.Resample(image, image, t, sitk.sitkLinear, 0.0),
                    sitk.Resample(labels, labels, t, sitk.sitkNearestNeighbor, 0))
        return apply

    def rotation(axis):
        angles = [0.0, 0.0, 0.0]
        angles[axis] = np.deg2rad(ANGLE_DEG)
        return sitk.Euler3DTransform([0.0] * 3, *angles)

    def cut(image, labels):
        """Drop the inferior CUT_MM of both (array axis 2 runs inferior -> superior when the
        direction's z component of that axis is positive, as in LPS files)."""
        rows = int(round(CUT_MM / image.GetSpacing()[2]))
        size = list(image.GetSize())
        size[2] -= rows
        start = [0, 0, rows if image.GetDirection()[8] > 0 else 0]
        return sitk.RegionOfInterest(image, size, start), sitk.RegionOfInterest(labels, size, start)

    def stored_otherwise(image, labels):
        return sitk.DICOMOrient(image, STORED_ORIENTATION), sitk.DICOMOrient(labels, STORED_ORIENTATION)

    def thick_slices(image, labels):
        thick = sitk.BinShrink(image, [1, 1, SLICE_FACTOR])
        return thick, sitk.Resample(labels, thick, sitk.Transform(), sitk.sitkNearestNeighbor, 0)

    def biased(image, labels):
        return _with_array(image, bias_field(image.GetSize()[::-1]) * _array(image)), labels

    def noisy(image, labels):
        return _with_array(image, rician_noise(_array(image), np.random.default_rng(0))), labels

    def contrasted(gamma):
        return lambda image, labels: (_with_array(image, contrast(_array(image), gamma)), labels)

    rows = {'as given': lambda image, labels: (image, labels),
            'shifted {:g} mm'.format(SHIFT_MM): resampled(sitk.TranslationTransform(3, [SHIFT_MM, -SHIFT_MM / 2, SHIFT_MM / 2])),
            'rotated {:g} deg (L-R axis)'.format(ANGLE_DEG): resampled(rotation(0)),
            'rotated {:g} deg (I-S axis)'.format(ANGLE_DEG): resampled(rotation(2)),
            'field of view {:g} mm short'.format(CUT_MM): cut,
            'stored with axes {}'.format(STORED_ORIENTATION): stored_otherwise,
            'thick slices ({} mm, I-S axis)'.format(SLICE_FACTOR): thick_slices,
            'bias field ({:g}-{:g})'.format(1 - BIAS, 1 + BIAS): biased,
            'Rician noise ({:g} %)'.format(100 * NOISE): noisy}
    rows.update(('contrast (gamma {:g})'.format(gamma), contrasted(gamma)) for gamma in GAMMAS)
    return rows


def pair_perturbations():
    """{name: function(image, labels) -> (image, labels)}, applied to the fixed and the moving scan
    alike."""
    def turned(rotation):
        return lambda image, labels: (turned_header(image, rotation), turned_header(labels, rotation))
    return {'both scans, headers turned ' + name: turned(rotation) for name, rotation in HEADER_TURNS.items()}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', required=True, help='train.py run directory (or DIR:STEP) or export')
    p.add_argument('--lpba40', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40'))
    p.add_argument('--pairs', type=cli.positive_int, default=None, help='the first N scans only (default all)')
    p.add_argument('--validation', action='store_true',
                   help='register the validation scans S36..S40 instead of the test scans S02..S10')
    args = p.parse_args(argv)
    import SimpleITK as sitk
    import registration
    root = args.lpba40

    def label(i):
        return sitk.ReadImage(os.path.join(root, 'label', 'S{:02d}.delineation.structure.label.nii.gz'.format(i)))

    fixed_path = os.path.join(root, 'fixed.nii.gz')
    if not os.path.isfile(fixed_path):
        raise cli.UserError('{}: no LPBA40 atlas there (--lpba40)'.format(fixed_path))
    model = registration.load_model(args.checkpoint)
    fixed, fixed_seg = sitk.ReadImage(fixed_path), label(1)
    rows = {}

    def record(i, name, target, target_seg, moving, moving_seg):
        dice = model.register(target, moving, moving_seg, target_seg).report['dice']
        rows.setdefault(name, []).append((dice['mean_before'], dice['mean']))
        print('S{:02d} {}: Dice {:.4f} (before {:.4f})'.format(i, name, dice['mean'], dice['mean_before']),
              flush=True)

    folder, ids = ('train', VALIDATION) if args.validation else ('test', TEST)
    ids = ids[:args.pairs]
    for i in ids:
        image = sitk.ReadImage(os.path.join(root, folder, 'S{:02d}.delineation.skullstripped.nii.gz'.format(i)))
        labels = label(i)
        for name, perturb in perturbations().items():
            record(i, name, fixed, fixed_seg, *perturb(image, labels))
        for name, perturb in pair_perturbations().items():
            record(i, name, *perturb(fixed, fixed_seg), *perturb(image, labels))
    base = np.mean([after for _, after in rows['as given']])
    print('\nModel {} ({}^3), LPBA40 {} scans S{:02d}..S{:02d} to S01, Dice on S01\'s 1 mm grid:\n'.format(
        args.checkpoint, model.image_size, 'validation' if args.validation else 'test', ids[0], ids[-1]))
    print('| perturbation | Dice before | Dice after | change vs as given |')
    print('|---|---:|---:|---:|')
    for name, values in rows.items():
        before, after = np.mean(values, axis=0)
        print('| {} | {:.3f} | {:.3f} | {:+.3f} |'.format(name, before, after, after - base))


if __name__ == '__main__':
    cli.run(main)
