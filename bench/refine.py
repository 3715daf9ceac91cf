"""Instance optimisation after the network, against ANTs SyN: Dice, folding and seconds per pair.

    python -m bench.refine -c weights/RUN [-d datasets/lpba.json] [-v test] [--iterations 0 10 25 50 100]
                           [--diffeomorphic] [--no_ants]

Per pair of the subset (LPBA40: S02..S10 -> S01), from the dataset's preprocessed volumes as
eval.py reads them: the network's flow, then N iterations of network/refine.py for each N of
--iterations, starting from the trained network's composed flow ("network") and from its
affine stem's flow alone ("affine stem": what the deformable network's start is worth); ANTs SyN
(antspyx 'SyN', when installed) on the same volumes in the same run. Dice of the label maps on
the fixed scans' own grids (evaluation.py, as eval.py and predict.py measure it), the fraction of
folding voxels of the flow, and seconds per pair (network + refinement; ANTs: its registration
call). Prints a Markdown table; --json also writes the numbers.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cli  # noqa: E402
import runs  # noqa: E402


def main(argv=None):
    p = cli.ArgumentParser(prog='python -m bench.refine', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', required=True, help='train.py run directory (or DIR:STEP)')
    p.add_argument('-d', '--dataset', default=os.path.join(ROOT, 'datasets', 'lpba.json'))
    p.add_argument('-v', '--subset', default='test')
    p.add_argument('--iterations', type=int, nargs='+', default=[0, 10, 25, 50, 100])
    p.add_argument('--no_ants', action='store_true', help='leave ANTs SyN out')
    p.add_argument('--json', default=None, help='also write the numbers here')
    cli.add_refine_flags(p)
    args = p.parse_args(argv)
    settings = cli.refine_settings(args)
    import baselines
    from data_util.dataset import Dataset
    from evaluation import nanmean, overlap_values, pair_record
    from network.refine import Refiner
    dataset = Dataset(args.dataset, batch_size=1)
    sess, framework, run = runs.load_framework(args.checkpoint, dataset.image_size, dataset.segmentation_class_value)
    prefix = run.prefix
    affine_flow = framework.outputs['stages'][0]['agg_flow']
    refiner = Refiner(dataset.image_size, **settings)
    values = overlap_values(dataset.segmentation_class_value, framework.class_names)
    ants = not args.no_ants and baselines.missing('ants_syn') is None
    rows = {}
    batches = list(dataset.generator(args.subset, batch_size=1))
    framework.register(sess, batches[0])  # TensorFlow's one-off set-up, not timed
    for batch in batches:
        start = time.perf_counter()
        flow = framework.register(sess, batch)[0]
        network_seconds = time.perf_counter() - start
        starts = {'network': (flow, network_seconds),
                  'affine stem': (sess.run(affine_flow, framework.feed_dict(batch))[0], network_seconds)}
        fixed, moving = batch['voxel1'][0, ..., 0], batch['voxel2'][0, ..., 0]
        for start_name, (initial, seconds) in starts.items():
            for n in args.iterations:
                refined, record = refiner.refine(fixed, moving, initial, n) if n else (initial, {'seconds': 0.0})
                res = framework.evaluate_batch(sess, batch, flow=refined[None])
                entry = pair_record(dataset, batch, 0, res, refined, seconds + record['seconds'], values)
                rows.setdefault((start_name, n), []).append(entry)
        if ants:
            ants_flow, seconds = baselines.registration_function('ants_syn')(fixed, moving)
            res = framework.evaluate_batch(sess, batch, flow=ants_flow[None])
            rows.setdefault(('ANTs SyN', None), []).append(pair_record(dataset, batch, 0, res, ants_flow, seconds, values))
        print('{}: network Dice {:.4f}'.format(batch['id2'][0], rows[('network', args.iterations[0])][-1]['dice']),
              file=sys.stderr, flush=True)
    sess.close()
    table = []
    for (start_name, n), entries in rows.items():
        table.append({'start': start_name, 'iterations': n, 'dice': nanmean([e['dice'] for e in entries]),
                      'dice_std': float(np.std([e['dice'] for e in entries])),
                      'folding_percent': 100.0 * nanmean([e['folding'] for e in entries]),
                      'seconds_per_pair': float(np.median([e['seconds'] for e in entries])), 'pairs': len(entries)})
    print('{} pairs of {} ({}), model {}; refinement {}; Dice on the fixed scans\' own grids.\n'.format(
        len(batches), os.path.relpath(args.dataset), args.subset, prefix,
        ', '.join('{} {}'.format(k, v) for k, v in settings.items())))
    print('| start | iterations | Dice | folding % | s/pair |')
    print('|---|---:|---|---:|---:|')
    for row in table:
        print('| {} | {} | {:.3f} ± {:.3f} | {:.3f} | {:.2f} |'.format(
            row['start'], '-' if row['iterations'] is None else row['iterations'], row['dice'], row['dice_std'],
            row['folding_percent'], row['seconds_per_pair']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'checkpoint': prefix, 'settings': settings, 'rows': table}, f, indent=2)


if __name__ == '__main__':
    cli.run(main)
