"""Brains from another source: LPBA40's labels carried through a brain the model never saw.

    python -m bench.foreign [-c MODEL] [--template T1] [--lpba40 ../shared/data/LPBA40]
                            [--pairs 9] [--refine 25] [--ants]

The other brain (--template; default the MNI ICBM152 2009a symmetric T1 template that nilearn
ships, skull-stripped, 1 mm: `pip install nilearn`) differs from LPBA40 the way scans from
elsewhere do: another contrast, cerebellum and brain stem kept (LPBA40's scans have them cut
away), another size, another place in physical space, stored in RAS. It has no labels of
LPBA40's 56 structures, so each test scan S02.. is registered to it (its label map carried onto
the template's grid) and the template to the atlas S01; the label map thus carried on to S01 is
compared with S01's: the mean Dice over 56 labels on S01's own 1 mm grid, after two
registrations that each cross the gap between the sources (each carrying the labels by nearest
neighbour). Beside it the direct registration S0x -> S01, within LPBA40. Methods: identity
(direct only: the template shares no space with LPBA40), the model (default the shipped one,
through predict.py's pipeline), the model with --refine iterations of instance optimisation, and
with --ants ANTs SyN (antspyx defaults on the files' physical space, as a user would run it).
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402

LABELS = 'S{:02d}.delineation.structure.label.nii.gz'
SCANS = 'S{:02d}.delineation.skullstripped.nii.gz'


def default_template():
    """The MNI152 2009a T1 template file inside nilearn; UserError if nilearn is missing."""
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError:
        raise cli.UserError('no --template given and nilearn (which ships the MNI152 template) is not '
                            'installed: pip install nilearn, or give --template')
    return MNI152_FILE_PATH


class ModelMethod:
    """The model through `registration.Model.register`, optionally refined."""

    def __init__(self, model, refine):
        self.model = model
        self.refine = refine

    def carry(self, fixed, moving, moving_seg):
        """(moving_seg on fixed's grid, seconds of the whole call): register moving to fixed
        (sitk.Images), carry the label map along."""
        start = time.perf_counter()
        result = self.model.register(fixed, moving, moving_seg, refine=self.refine)
        return result.warped_seg, time.perf_counter() - start


class AntsMethod:
    """ANTs SyN (antspyx) on the images' physical space, its default centre-of-mass start."""

    def carry(self, fixed, moving, moving_seg):
        import ants
        import SimpleITK as sitk
        start = time.perf_counter()
        fixed_image = ants.from_sitk(fixed)
        result = ants.registration(fixed_image, ants.from_sitk(moving), 'SyN')
        carried = ants.apply_transforms(fixed_image, ants.from_sitk(moving_seg), result['fwdtransforms'],
                                        interpolator='nearestNeighbor')
        out = sitk.Cast(ants.to_sitk(carried), moving_seg.GetPixelID())
        return out, time.perf_counter() - start


def mean_dice(fixed_seg, warped_seg):
    import SimpleITK as sitk
    from data_util.geometry import dice_per_label
    return dice_per_label(sitk.GetArrayViewFromImage(fixed_seg), sitk.GetArrayViewFromImage(warped_seg))[1]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', default=None, help='model (default: the shipped models/lpba40-ldr)')
    p.add_argument('--template', default=None, help='the other brain (default: nilearn\'s MNI152 2009a T1)')
    p.add_argument('--lpba40', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40'))
    p.add_argument('--pairs', type=cli.positive_int, default=9, help='test scans S02.. to use (default all 9)')
    p.add_argument('--refine', type=int, default=25,
                   help='iterations of the refined row (default 25; 0: no refined row)')
    p.add_argument('--ants', action='store_true', help='add ANTs SyN (antspyx)')
    args = p.parse_args(argv)
    if args.refine < 0:
        raise cli.UserError('--refine {}: a number of iterations >= 0'.format(args.refine))
    template_path = args.template or default_template()
    fixed_path = os.path.join(args.lpba40, 'fixed.nii.gz')
    if not os.path.isfile(fixed_path):
        raise cli.UserError('{}: no LPBA40 atlas there (--lpba40)'.format(fixed_path))
    if args.ants:
        import baselines  # ITK's thread count set before ants loads
        if baselines.missing('ants_syn'):
            raise cli.UserError('--ants: ' + baselines.missing('ants_syn'))
    import SimpleITK as sitk
    import registration
    template = registration.read_image(template_path, 'the template')
    fixed = sitk.ReadImage(fixed_path)
    fixed_seg = sitk.ReadImage(os.path.join(args.lpba40, 'label', LABELS.format(1)))
    model = registration.load_model(args.checkpoint)
    methods = {'model': ModelMethod(model, 0)}
    if args.refine:
        methods['model, {} refinement iterations'.format(args.refine)] = ModelMethod(model, args.refine)
    if args.ants:
        methods['ANTs SyN'] = AntsMethod()
    rows = {name: {'direct': [], 'via': [], 'seconds': []} for name in ['identity'] + list(methods)}
    for i in range(2, 2 + args.pairs):
        image = sitk.ReadImage(os.path.join(args.lpba40, 'test', SCANS.format(i)))
        labels = sitk.ReadImage(os.path.join(args.lpba40, 'label', LABELS.format(i)))
        identity = sitk.Resample(labels, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        rows['identity']['direct'].append(mean_dice(fixed_seg, identity))
        for name, method in methods.items():
            direct, seconds_direct = method.carry(fixed, image, labels)
            on_template, seconds_in = method.carry(template, image, labels)
            via, seconds_out = method.carry(fixed, template, on_template)
            row = rows[name]
            row['direct'].append(mean_dice(fixed_seg, direct))
            row['via'].append(mean_dice(fixed_seg, via))
            row['seconds'] += [seconds_direct, seconds_in, seconds_out]
            print('S{:02d} {}: direct {:.4f}, via the template {:.4f}'.format(i, name, row['direct'][-1],
                                                                             row['via'][-1]), flush=True)
    print('\nModel {}, {} LPBA40 test scans to S01 directly and through {} (mean Dice of 56 labels on '
          'S01\'s 1 mm grid, mean +- std over scans; seconds per registration, median):\n'.format(
              args.checkpoint or 'models/lpba40-ldr', args.pairs, os.path.basename(template_path)))
    print('| method | S0x -> S01 | S0x -> template -> S01 | seconds |')
    print('|---|---:|---:|---:|')
    for name, row in rows.items():
        via = '{:.3f} +- {:.3f}'.format(np.mean(row['via']), np.std(row['via'])) if row['via'] else '-'
        seconds = '{:.1f}'.format(np.median(row['seconds'])) if row['seconds'] else '-'
        print('| {} | {:.3f} +- {:.3f} | {} | {} |'.format(name, np.mean(row['direct']), np.std(row['direct']),
                                                          via, seconds))


if __name__ == '__main__':
    cli.run(main)
