"""Batch throughput of predict.py: pairs per minute for each choice of --outputs.

    python -m bench.batch [--lpba40 ../shared/data/LPBA40] [--pairs 39] [-c MODEL]
                          [--outputs CHOICE ...] [--runtime auto|onnx|tensorflow]

Registers the LPBA40 scans S02..S40 (160x192x160 at 1 mm; the first --pairs of them) to S01
with predict.py's batch mode (``--pairs CSV``), once per --outputs choice, each in a fresh
process and a fresh output folder, the field written as float32. Prints one row per choice:
pairs per minute over the batch (model loading excluded, as summary.json counts it); the
process's CPU seconds per pair (all threads, start-up included: with C idle cores, 60 C / this
bounds the pairs per minute, whatever else shares the machine while it is measured); the
model's load time; and the median seconds per stage of a pair (reading and preprocessing
overlap the previous pair's registration, writing the next pair's).
"""
import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LPBA40 = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40')
STAGES = ('read', 'preprocess', 'network', 'resample', 'write')


def lpba40_pairs(root, count):
    """[(id, moving path)] of S02..S40 in id order, the first ``count``; one line and exit if ``root`` is not LPBA40."""
    scans = []
    for folder in ('test', 'train'):
        directory = os.path.join(root, folder)
        if os.path.isdir(directory):
            scans += [(name.split('.')[0], os.path.join(directory, name)) for name in os.listdir(directory)
                      if name.endswith('.nii.gz')]
    if not scans or not os.path.exists(os.path.join(root, 'fixed.nii.gz')):
        sys.exit('error: {} does not hold LPBA40 (fixed.nii.gz, test/, train/)'.format(root))
    return sorted(scans)[:count]


def run_choice(outputs, pairs_csv, directory, model, runtime):
    """One batch in a fresh process: (summary.json, wall seconds, CPU seconds of the process)."""
    output = os.path.join(directory, 'out-' + outputs.replace(',', '-'))
    command = [sys.executable, os.path.join(ROOT, 'predict.py'), '--pairs', pairs_csv, '-o', output,
               '--outputs', outputs, '--field_dtype', 'float32']
    if model:
        command += ['-c', model]
    if runtime:
        command += ['--runtime', runtime]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        sys.exit('error: predict.py --outputs {} failed: {}'.format(outputs, proc.stderr.strip().splitlines()[-1]))
    with open(os.path.join(output, 'summary.json')) as f:
        return json.load(f), wall, cpu


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench.batch', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lpba40', default=DEFAULT_LPBA40, help='LPBA40 folder (default ../shared/data/LPBA40)')
    p.add_argument('--pairs', type=int, default=39, help='how many of S02..S40 (default all 39)')
    p.add_argument('-c', '--checkpoint', default=None, help='model (default: predict.py\'s, the shipped one)')
    p.add_argument('--outputs', nargs='+', default=['warped,field', 'warped', 'field', 'warped,field,seg,preview'],
                   help='--outputs choices to time (default: warped,field; warped; field; everything)')
    p.add_argument('--runtime', default=None, help='predict.py --runtime (default: its own choice)')
    p.add_argument('--json', default=None, help='also write the rows as JSON')
    args = p.parse_args(argv)
    scans = lpba40_pairs(args.lpba40, args.pairs)
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench-batch-') as directory:
        pairs_csv = os.path.join(directory, 'pairs.csv')
        with open(pairs_csv, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['id', 'fixed', 'moving'])
            writer.writerows([scan_id, os.path.join(args.lpba40, 'fixed.nii.gz'), path] for scan_id, path in scans)
        for outputs in args.outputs:
            summary, wall, cpu = run_choice(outputs, pairs_csv, directory, args.checkpoint, args.runtime)
            seconds = {s: statistics.median(r['seconds'][s] for r in summary['pairs']) for s in STAGES}
            rows.append({'outputs': outputs, 'pairs': summary['registered'],
                         'pairs_per_minute': summary['pairs_per_minute'], 'load_model_seconds':
                         summary['load_model_seconds'], 'process_seconds': round(wall, 2),
                         'cpu_seconds_per_pair': round(cpu / max(summary['registered'], 1), 2),
                         'model': (summary['model'] or {}).get('kind'), 'median_seconds': seconds})
            print('.', end='', flush=True, file=sys.stderr)
    print(file=sys.stderr)
    print('LPBA40 S02.. -> S01, {} pairs, 160x192x160 at 1 mm, field float32, {} CPUs'.format(len(scans), os.cpu_count()))
    print()
    print('| --outputs | pairs/min | CPU s/pair | model load s | process s | ' + ' | '.join('median {} s'.format(s) for s in STAGES)
          + ' |')
    print('|---' * (5 + len(STAGES)) + '|')
    for row in rows:
        print('| {} | {:.1f} | {:.2f} | {:.1f} | {:.0f} | '.format(
            row['outputs'], row['pairs_per_minute'], row['cpu_seconds_per_pair'], row['load_model_seconds'],
            row['process_seconds'])
              + ' | '.join('{:.2f}'.format(row['median_seconds'][s]) for s in STAGES) + ' |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
