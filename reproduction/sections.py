"""Figure 2's worker, run by the sections stage: ``python -m reproduction.sections``.

Warps up to --pairs moving scans of a subset to its first fixed scan with one model (a train.py
run or an export, as predict.py's -c takes them) and saves the central sections (images, label
maps, the warped ones) to an npz file; reproduction.report draws the files of the figure's runs
as figure2.png. The only module of the package that loads TensorFlow (through the model); the
orchestrator runs it as a subprocess and never imports it.
"""
import os
import sys

import numpy as np
from scipy import ndimage

import cli
import registration
from data_util.dataset import Dataset
from reproduction.plan import FIGURE_PAIRS


def warp_section(volume, flow, index, order):
    """Section z = index of volume [X, Y, Z] warped by flow [X, Y, Z, 3] (voxels, warped(p) =
    volume(p + flow(p))), sampled with spline ``order`` (1 linear, 0 nearest), positions outside
    clamped to the border -> [X, Y] float32."""
    x, y = np.meshgrid(np.arange(volume.shape[0]), np.arange(volume.shape[1]), indexing='ij')
    position = np.stack([x, y, np.full_like(x, index)]).astype(np.float64) + np.moveaxis(flow[:, :, index], -1, 0)
    return ndimage.map_coordinates(volume.astype(np.float64), position, order=order, mode='nearest').astype(np.float32)


def central_index(seg):
    """The slice along the last axis at the centroid of seg's labelled voxels (the middle if none)."""
    weights = (seg > 0).sum(axis=(0, 1))
    if not weights.sum():
        return seg.shape[2] // 2
    return int(round(float((weights * np.arange(len(weights))).sum() / weights.sum())))


def main(argv=None):
    """Warp a few test pairs with one model; save their central sections (npz)."""
    p = cli.ArgumentParser(prog='python -m reproduction.sections', description=main.__doc__)
    p.add_argument('-d', '--dataset', required=True)
    p.add_argument('-v', '--val_subset', required=True)
    p.add_argument('--run', required=True, metavar='LABEL=MODEL',
                   help='the row\'s label and its model: a train.py run directory or an export')
    p.add_argument('--pairs', type=int, default=FIGURE_PAIRS)
    p.add_argument('--output', required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    label, _, source = args.run.partition('=')
    subset = int(args.val_subset) if args.val_subset.isdigit() else args.val_subset
    dataset = Dataset(args.dataset, batch_size=1)
    size, open_network, _ = registration.resolve_network(source)
    if [size] * 3 != dataset.image_size:
        raise cli.UserError('{} registers {}^3 volumes; {} holds {}'.format(
            source, size, args.dataset, 'x'.join(map(str, dataset.image_size))))
    pairs = dataset.pairs(subset)
    fixed_id = pairs[0][0]
    chosen = [pair for pair in pairs if pair[0] == fixed_id][:args.pairs]
    picked = [b for b in dataset.generator(subset, batch_size=1) if (str(b['id1'][0]), str(b['id2'][0])) in chosen]
    fixed, fixed_seg = picked[0]['voxel1'][0, ..., 0], picked[0]['seg1'][0, ..., 0]
    index = central_index(fixed_seg)
    network = open_network()
    warped, warped_seg = [], []
    for b in picked:
        flow = network.flow(fixed, b['voxel2'][0, ..., 0])
        warped.append(warp_section(b['voxel2'][0, ..., 0], flow, index, order=1))
        warped_seg.append(warp_section(b['seg2'][0, ..., 0], flow, index, order=0))
    print('sections of {} ({}) at slice {}'.format(label, source, index), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + '.tmp.npz'
    np.savez_compressed(tmp, label=np.array(label), source=np.array(source),
                        pair_ids=np.array(['{} {}'.format(b['id1'][0], b['id2'][0]) for b in picked]),
                        fixed=fixed[..., index], fixed_seg=fixed_seg[..., index],
                        moving=np.stack([b['voxel2'][0, ..., index, 0] for b in picked]),
                        moving_seg=np.stack([b['seg2'][0, ..., index, 0] for b in picked]),
                        warped=np.stack(warped), warped_seg=np.stack(warped_seg), axis=2, index=index)
    os.replace(tmp, args.output)
    print('wrote {}'.format(args.output))


if __name__ == '__main__':
    cli.run(main)
