"""Cold start of one registration: predict.py in a fresh process per run, for each runtime of an
export; prints Markdown tables.

Usage: ``python -m bench.cold_start [-c models/lpba40-ldr] [--data ../shared/data/LPBA40]
[--moving S02] [--runtimes onnx tensorflow] [--repeats 3] [--warmup 1] [--outputs ...]
[--threads 2] [--network_repeats 10] [--profile RUNS]``

Each run is ``python predict.py -c MODEL --fixed S01 --moving ID (+ both label maps) -o DIR
--runtime R`` in a new process, timed from just before it is started to its exit, its outputs
written: wall (time.perf_counter) and CPU (user + system of the child, the change of
resource.getrusage(RUSAGE_CHILDREN)). The runtimes alternate, after --warmup untimed runs each
(files in the page cache, bytecode compiled); the table gives the median over --repeats, and
predict.json's wall seconds per stage ('startup' = the process's wall minus the stages' total:
interpreter, imports, exit). The LPBA40 pair is S01 (fixed.nii.gz) <- --moving (test/ or
train/), labels from label/.

Then the network alone (--network_repeats > 0): both runtimes loaded in this process on the
pair's preprocessed volumes, run alternately (one warm-up each); the median wall and process
CPU seconds of a run, and the largest difference between their flows in voxels. With
--profile, also the network's time by kind of operation in each runtime: --profile runs traced
(TensorFlow's RunMetadata, onnxruntime's profiler), each operation's fastest run (of all after
the first) summed by kind. TensorFlow runs independent operations at once, so its sum can
exceed its wall time; onnxruntime runs them one after another.
The 1-minute load average of the machine is printed before each table.
"""
import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cli  # noqa: E402
import registration  # noqa: E402

STAGES = ('read', 'load_model', 'preprocess', 'network', 'resample', 'write')
RUNTIMES = ('onnx', 'tensorflow')


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', default=registration.DEFAULT_MODEL, help='an export directory')
    p.add_argument('--data', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40'),
                   help='the LPBA40 directory (fixed.nii.gz, test/, train/, label/)')
    p.add_argument('--moving', default='S02', help='the moving subject (default S02)')
    p.add_argument('--runtimes', nargs='+', choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument('--repeats', type=cli.positive_int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--outputs', default=None, help="predict.py's --outputs (default: its default, all)")
    p.add_argument('--threads', type=cli.positive_int, default=2)
    p.add_argument('--network_repeats', type=int, default=10, help='runs of the network alone (0: none)')
    p.add_argument('--profile', type=int, default=0, metavar='RUNS',
                   help='traced runs of the network in each runtime, for its time by kind of operation (0: none)')
    args = p.parse_args(argv)
    if args.profile == 1:
        p.error('--profile 1: the first traced run is left out; give 0 or at least 2')
    return args


def lpba40_pair(data, moving):
    """(fixed, moving, fixed_seg, moving_seg) paths of S01 <- ``moving`` in the LPBA40 layout."""
    images = [os.path.join(data, d, moving + '.delineation.skullstripped.nii.gz') for d in ('test', 'train')]
    found = [path for path in images if os.path.isfile(path)]
    labels = [os.path.join(data, 'label', s + '.delineation.structure.label.nii.gz') for s in ('S01', moving)]
    missing = [p for p in [os.path.join(data, 'fixed.nii.gz')] + labels if not os.path.isfile(p)] + (
        [] if found else images[:1])
    if missing:
        raise cli.UserError('LPBA40 file missing: {}'.format(missing[0]))
    return os.path.join(data, 'fixed.nii.gz'), found[0], labels[0], labels[1]


def run_predict(args, pair, runtime, output):
    """One predict.py process: (wall s, CPU s, its predict.json)."""
    fixed, moving, fixed_seg, moving_seg = pair
    command = [sys.executable, os.path.join(ROOT, 'predict.py'), '-c', args.checkpoint, '--fixed', fixed,
               '--moving', moving, '--fixed_seg', fixed_seg, '--moving_seg', moving_seg, '-o', output,
               '--runtime', runtime, '--threads', str(args.threads)] + (
        ['--outputs', args.outputs] if args.outputs else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise cli.UserError('predict.py --runtime {} failed: {}'.format(runtime, proc.stderr.strip()[-500:]))
    with open(os.path.join(output, 'predict.json')) as f:
        report = json.load(f)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, report


def load_line():
    return 'load average (1 min) {:.2f} on {} CPUs'.format(os.getloadavg()[0], os.cpu_count())


def cold_starts(args, pair):
    """{runtime: [(wall, cpu, report), ...]} of --repeats timed runs after --warmup untimed ones."""
    runs = {runtime: [] for runtime in args.runtimes}
    with tempfile.TemporaryDirectory(prefix='cold_start.') as scratch:
        for index in range(args.warmup + args.repeats):
            for runtime in args.runtimes:
                result = run_predict(args, pair, runtime, os.path.join(scratch, '{}-{}'.format(runtime, index)))
                if index >= args.warmup:
                    runs[runtime].append(result)
                if result[2]['model']['runtime'] != {'onnx': 'onnxruntime'}.get(runtime, runtime):
                    raise cli.UserError('predict.py --runtime {} ran {}'.format(runtime, result[2]['model']['runtime']))
    return runs


def print_cold_starts(args, pair, runs):
    print('Cold start, one pair: {} <- {}; model {}; outputs {}; --threads {}; median of {} runs; {}\n'.format(
        os.path.basename(pair[0]), os.path.basename(pair[1]), os.path.relpath(args.checkpoint, ROOT),
        args.outputs or 'all', args.threads, args.repeats, load_line()))
    print('| runtime | wall s | CPU s | startup s | ' + ' | '.join(STAGES) + ' | Dice |')
    print('|---|' + '---:|' * (4 + len(STAGES)))
    for runtime, results in runs.items():
        median = {key: statistics.median(values) for key, values in {
            'wall': [r[0] for r in results], 'cpu': [r[1] for r in results],
            'startup': [r[0] - r[2]['seconds']['total'] for r in results],
            **{stage: [r[2]['seconds'].get(stage, 0.0) for r in results] for stage in STAGES}}.items()}
        dice = results[-1][2].get('dice', {}).get('mean')
        print('| {} | {:.2f} | {:.2f} | {:.2f} | {} | {} |'.format(
            results[-1][2]['model']['runtime'], median['wall'], median['cpu'], median['startup'],
            ' | '.join('{:.2f}'.format(median[stage]) for stage in STAGES), '-' if dice is None else '{:.4f}'.format(dice)))


def open_networks(args, pair):
    """({runtime: network} of both runtimes, the pair's preprocessed volumes)."""
    model = registration.load_model(args.checkpoint, threads=args.threads, runtime='tensorflow')
    volumes = registration.preprocess_pair(registration.read_image(pair[0], 'fixed'),
                                           registration.read_image(pair[1], 'moving'), model.preprocessing)[:2]
    return {'tensorflow': model.network,
            'onnxruntime': registration.load_model(args.checkpoint, threads=args.threads, runtime='onnx').network}, volumes


def network_times(networks, volumes, args):
    """{runtime: (median wall, median CPU, flow)} of the network alone on the preprocessed pair."""
    times = {name: ([], []) for name in networks}
    flows = {}
    for index in range(1 + args.network_repeats):
        for name, network in networks.items():
            wall, cpu = time.perf_counter(), time.process_time()
            flows[name] = network.flow(*volumes)
            if index:
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(walls), statistics.median(cpus), flows[name])
            for name, (walls, cpus) in times.items()}


def print_network_times(args, results):
    print('\nThe network alone on the preprocessed pair ({}^3), both runtimes in one process, alternating; '
          'median of {} runs after one warm-up; --threads {}; {}\n'.format(
              results['tensorflow'][2].shape[0], args.network_repeats, args.threads, load_line()))
    print('| runtime | wall s | CPU s | wall / TensorFlow | max abs flow difference (voxels) |')
    print('|---|---:|---:|---:|---:|')
    for name, (wall, cpu, flow) in results.items():
        print('| {} | {:.3f} | {:.3f} | {:.2f} | {:.2e} |'.format(
            name, wall, cpu, wall / results['tensorflow'][0],
            float(np.abs(flow - results['tensorflow'][2]).max())))


KINDS = (('convolution', ('Conv', 'FusedConv', '_MklNativeFusedConv3D', '_MklNativeConv3D', 'Conv3D')),
         ('transposed convolution', ('ConvTranspose', '_MklNativeConv3DBackpropInputV2', 'Conv3DBackpropInputV2')),
         ('gather (the warp)', ('Gather', 'GatherElements', 'GatherV2')),
         ('resize (flow upsampling)', ('Resize', 'ResizeBilinear')))


def kind_of(op_type):
    return next((kind for kind, types in KINDS if op_type in types), 'other')


def tensorflow_profile(network, volumes, runs):
    """{node: (op type, [seconds per traced run])} of an ExportedNetwork's graph."""
    from network.tfv1 import tf
    model = network.model
    feed = {model.fixed: np.asarray(volumes[0], np.float32)[None, ..., None],
            model.moving: np.asarray(volumes[1], np.float32)[None, ..., None]}
    nodes = collections.defaultdict(lambda: [None, []])
    for _ in range(runs):
        metadata = tf.RunMetadata()
        model.sess.run(model.flow, feed, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
                       run_metadata=metadata)
        for device in metadata.step_stats.dev_stats:
            for stats in device.node_stats:
                if ' = ' in stats.timeline_label:
                    nodes[stats.node_name][0] = stats.timeline_label.split(' = ')[1].split('(')[0]
                    nodes[stats.node_name][1].append(stats.all_end_rel_micros / 1e6)
    return nodes


def onnxruntime_profile(network, volumes, runs, threads):
    """{node: (op type, [seconds per profiled run])} of an OnnxNetwork's graph."""
    import onnxruntime
    options = network.session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix='cold_start.') as scratch:
        options.profile_file_prefix = os.path.join(scratch, 'profile')
        session = onnxruntime.InferenceSession(network.path, options, providers=['CPUExecutionProvider'])
        for _ in range(runs):
            session.run([network.output], {network.inputs['fixed']: np.asarray(volumes[0], np.float32)[None, ..., None],
                                           network.inputs['moving']: np.asarray(volumes[1], np.float32)[None, ..., None]})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = collections.defaultdict(lambda: [None, []])
    for event in events:
        if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
            nodes[event['name']][0] = event['args']['op_name']
            nodes[event['name']][1].append(event['dur'] / 1e6)
    return nodes


def print_profiles(args, networks, volumes):
    profiles = {'tensorflow': tensorflow_profile(networks['tensorflow'], volumes, args.profile),
                'onnxruntime': onnxruntime_profile(networks['onnxruntime'], volumes, args.profile, args.threads)}
    totals = {}
    for runtime, nodes in profiles.items():
        totals[runtime] = collections.Counter()
        for op_type, seconds in nodes.values():
            totals[runtime][kind_of(op_type)] += min(seconds[1:])
    print('\nThe network by kind of operation: each operation\'s fastest of {} traced runs after the first, '
          'summed, ms; {}\n'.format(args.profile - 1, load_line()))
    print('| kind | ' + ' | '.join(profiles) + ' |')
    print('|---|' + '---:|' * len(profiles))
    for kind in [k for k, _ in KINDS] + ['other', 'total']:
        print('| {} | {} |'.format(kind, ' | '.join('{:.1f}'.format(1e3 * (
            sum(totals[r].values()) if kind == 'total' else totals[r][kind])) for r in profiles)))


def main(argv=None):
    args = parse_args(argv)
    pair = lpba40_pair(args.data, args.moving)
    print_cold_starts(args, pair, cold_starts(args, pair))
    if args.network_repeats > 0 or args.profile > 0:
        networks, volumes = open_networks(args, pair)
        if args.network_repeats > 0:
            print_network_times(args, network_times(networks, volumes, args))
        if args.profile > 0:
            print_profiles(args, networks, volumes)
    return 0


if __name__ == '__main__':
    cli.run(main)
