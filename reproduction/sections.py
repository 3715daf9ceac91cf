"""Figure 2's worker, run by the sections stage: ``python -m reproduction.sections``.

Warps up to --pairs moving scans of a subset to its first fixed scan with one trained run and
saves the central sections (images, label maps, the warped ones) to an npz file; reproduction.report
draws the files of the figure's runs as figure2.png. The only module of the package that uses TensorFlow;
the orchestrator runs it as a subprocess and never imports it.
"""
import os
import sys

import numpy as np

import cli
import runs
from data_util.dataset import Dataset
from network.spatial_transformer import warp_nearest
from network.tfv1 import tf
from reproduction.plan import FIGURE_PAIRS


def main(argv=None):
    """Warp a few test pairs with one run; save their central sections (npz)."""
    p = cli.ArgumentParser(prog='python -m reproduction.sections', description=main.__doc__)
    p.add_argument('-d', '--dataset', required=True)
    p.add_argument('-v', '--val_subset', required=True)
    p.add_argument('--run', required=True, metavar='LABEL=RUN_DIR')
    p.add_argument('--pairs', type=int, default=FIGURE_PAIRS)
    p.add_argument('--output', required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    subset = int(args.val_subset) if args.val_subset.isdigit() else args.val_subset
    dataset = Dataset(args.dataset, batch_size=1)
    pairs = dataset.pairs(subset)
    fixed_id = pairs[0][0]
    chosen = [pair for pair in pairs if pair[0] == fixed_id][:args.pairs]
    picked = [b for b in dataset.generator(subset, batch_size=1) if (str(b['id1'][0]), str(b['id2'][0])) in chosen]
    batch = {k: np.concatenate([b[k] for b in picked]) for k in picked[0]}
    fixed_seg = batch['seg1'][0, ..., 0]
    axis = 2
    weights = (fixed_seg > 0).sum(axis=(0, 1))
    index = int(round(float((weights * np.arange(len(weights))).sum() / weights.sum()))) if weights.sum() \
        else fixed_seg.shape[axis] // 2
    label, _, run_dir = args.run.partition('=')
    sess, framework, _ = runs.load_framework(run_dir, dataset.image_size, dataset.segmentation_class_value)
    with sess.graph.as_default():
        seg = tf.placeholder(tf.float32, [None] + dataset.image_size + [1])
        seg_warp = warp_nearest(seg, framework.outputs['flow'])
        feed = framework.feed_dict(batch)
        feed[seg] = batch['seg2']
        out = sess.run({'warped': framework.outputs['warped'], 'seg': seg_warp}, feed)
        sess.close()
    print('sections of {} ({}) at slice {}'.format(label, run_dir, index), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + '.tmp.npz'
    np.savez_compressed(tmp, label=np.array(label), pair_ids=np.array(['{} {}'.format(*c) for c in chosen]),
                        fixed=batch['voxel1'][0, ..., index, 0], fixed_seg=fixed_seg[..., index],
                        moving=batch['voxel2'][..., index, 0], moving_seg=batch['seg2'][..., index, 0],
                        warped=out['warped'][..., index, 0], warped_seg=np.round(out['seg'][..., index, 0]), axis=axis,
                        index=index)
    os.replace(tmp, args.output)
    print('wrote {}'.format(args.output))


if __name__ == '__main__':
    cli.run(main)
