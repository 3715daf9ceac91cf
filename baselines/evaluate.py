"""Evaluate a classical baseline on a subset with eval.py's metrics and output format.

    python -m baselines.evaluate ants_syn -d datasets/lpba.json -v test --output evaluate/ants_syn-test

Writes OUTPUT.json (eval.py's schema: 'summary' {dice, jacc, landmark_dist, jacobian_det,
folding: {mean, std}, seconds_per_pair}, 'per_class', 'pairs', 'parameters' None) and
OUTPUT.txt (eval.py's text report). The metrics are network/metrics.py's, run in a small
TensorFlow graph on each pair's flow, so their definitions are eval.py's exactly; seconds per
pair is the registration call alone (median over pairs), on ITK's 2 threads, in a child
process (baselines.Isolated: Ctrl-C and SIGTERM stop at once, no file is left behind).
Finished pairs are kept in OUTPUT.partial.json, so a stopped run resumes where it stopped.
"""
import argparse
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import baselines  # noqa: E402
import cli  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('method', choices=sorted(baselines.METHODS), help='the baseline')
    p.add_argument('-d', '--dataset', required=True, help='JSON dataset spec')
    p.add_argument('-v', '--val_subset', default='2', help='scheme or subset to evaluate (default: scheme 2)')
    p.add_argument('--paired', action='store_true', help='adjacent pairs instead of all pairs (as eval.py)')
    p.add_argument('--output', required=True, help='output path without extension')
    p.add_argument('--max_pairs', type=int, default=None, help='evaluate only the first N pairs')
    p.add_argument('--all_pairs', action='store_true',
                   help='every ordered pair among the subset\'s scans, also when the spec has an atlas')
    return p


def load_partial(path, method, dataset_path, subset):
    """Records of a previous stopped run of the same evaluation, or []."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        partial = json.load(f)
    if (partial.get('method'), partial.get('dataset'), partial.get('subset')) != (method, dataset_path, str(subset)):
        return []
    return partial['pairs']


def main(argv=None):
    args = build_parser().parse_args(argv)
    reason = baselines.missing(args.method)
    if reason:
        raise cli.UserError('{}: {}'.format(args.method, reason))
    from data_util.dataset import Dataset
    from evaluation import MetricGraph, overlap_values, pair_record, report_text, summarize
    subset = int(args.val_subset) if args.val_subset.isdigit() else args.val_subset
    dataset = Dataset(args.dataset, batch_size=1, paired=args.paired, all_pairs=args.all_pairs)
    dataset.check([subset])
    metric = MetricGraph(dataset.image_size, list(dataset.segmentation_class_value.values())
                         if dataset.segmentation_class_value else None, baselines.THREADS)
    class_names = list(dataset.segmentation_class_value) if dataset.segmentation_class_value else None
    values = overlap_values(dataset.segmentation_class_value, class_names)
    partial_path = args.output + '.partial.json'
    records = load_partial(partial_path, args.method, args.dataset, subset)
    done = {(r['id1'], r['id2']) for r in records}
    total = dataset.num_pairs(subset) if args.max_pairs is None else min(args.max_pairs, dataset.num_pairs(subset))
    progress = cli.progress(total, '{} on {}'.format(args.method, subset), 'pair', initial=len(records))
    with baselines.Isolated(*baselines.target(args.method)) as register:
        for index, batch in enumerate(dataset.generator(subset, batch_size=1)):
            if index >= total:
                break
            if (str(batch['id1'][0]), str(batch['id2'][0])) in done:
                continue
            flow, seconds = register(batch['voxel1'][0, ..., 0], batch['voxel2'][0, ..., 0])
            records.append(pair_record(dataset, batch, 0, metric(batch, flow), flow, seconds, values))
            cli.write_json(partial_path, {'method': args.method, 'dataset': args.dataset, 'subset': str(subset),
                                          'pairs': records})
            progress.update(1)
            print('{} {}: Dice {:.4f}, {:.2f} s'.format(records[-1]['id1'], records[-1]['id2'], records[-1]['dice'],
                                                        seconds), flush=True)
    progress.close()
    summary, per_class = summarize(records, class_names)
    cli.write_atomic(args.output + '.txt', report_text(records, summary))
    cli.write_json(args.output + '.json', {
        'method': args.method, 'label': baselines.METHODS[args.method]['label'],
        'package': baselines.METHODS[args.method]['package'], 'version': baselines.version(args.method),
        'threads': baselines.THREADS, 'dataset': args.dataset, 'subset': subset, 'parameters': None,
        'summary': summary, 'per_class': per_class, 'pairs': records})
    os.remove(partial_path)
    print('{}: Dice {:.4f} ({:.4f}), Jacc {:.4f}, Jacobian std {:.4f}, folding {:.5f}, {:.2f} s/pair -> {}.json'.format(
        args.method, summary['dice']['mean'], summary['dice']['std'], summary['jacc']['mean'],
        summary['jacobian_det']['mean'], summary['folding']['mean'], summary['seconds_per_pair'], args.output))


if __name__ == '__main__':
    cli.run(main)
