"""CPU inference time per registration pair: teacher vs student at 1..3 cascades; prints a Markdown table.

Usage: ``python -m bench.inference [--size 128] [--cascades 1 2 3] [--repeats 10] [--threads 2]
[--networks teacher student] [--baselines] [--json OUT]``

Per network and cascade count, in a fresh graph and a session of --threads intra- and inter-op
threads (oneDNN on, TF_ENABLE_ONEDNN_OPTS=1 unless set otherwise): a Framework with
``validation=True`` (the registration network and its metrics, no optimiser) with random
weights, one pair of random 0..255 volumes [1, S, S, S, 1]; ``Framework.register`` (the final
composed flow, fetched to NumPy, as eval.py times it) is run --warmup times, then --repeats
times; the median is reported, with the ratio to the 1-cascade student of the same run and the
parameter count at inference.

Networks: teacher = VTN affine stem + n VTN cascades; student = light affine stem + n LDR
(the paper's architecture, default 'upsample' head); student_refine / student_deconv = the same
with the 'refine' / 'deconv' head; student_original = light affine + n LDROriginal (the original code's 3x3x3 UNet);
voxelmorph = VTN affine + n VoxelMorph.
--baselines also times ANTs SyN and Elastix B-spline (with and without an affine stage) once
each on a synthetic liver-like pair of the same size (data_util.synthetic), when installed.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.environment import environment  # noqa: E402
from network.tfv1 import tf  # noqa: E402

NETWORKS = {  # name: (label, base network, base network options)
    'teacher': ('VTN + affine (teacher)', 'VTN', {}),
    'student': ('LDR + light affine (student)', 'LDR', {}),
    'student_refine': ('LDR (refine head) + light affine', 'LDR', {'head': 'refine'}),
    'student_deconv': ('LDR (deconv head) + light affine', 'LDR', {'head': 'deconv'}),
    'student_original': ('LDROriginal + light affine', 'LDROriginal', {}),
    'voxelmorph': ('VoxelMorph + affine', 'VoxelMorph', {}),
}


MAC_OPS = ('Conv3D', 'Conv3DBackpropInputV2', 'MatMul', 'BatchMatMulV2')


def multiply_accumulates(graph):
    """Multiply-accumulates of one forward pass at batch 1: every 3-D convolution (output
    voxels x kernel volume x input x output channels), transposed convolution (input voxels x the
    same) and matrix product of the graph, from static shapes."""
    total = 0
    for op in graph.get_operations():
        if op.type not in MAC_OPS:
            continue
        shapes = [[d or 1 for d in t.shape.as_list()] for t in op.inputs]     # an unknown batch counts 1
        if op.type == 'Conv3D':
            total += int(np.prod([d or 1 for d in op.outputs[0].shape.as_list()[1:4]])) * int(np.prod(shapes[1]))
        elif op.type == 'Conv3DBackpropInputV2':
            total += int(np.prod(shapes[2][1:4])) * int(np.prod(shapes[1]))
        else:
            a, b = shapes
            rows = a[-1] if op.get_attr('adj_x' if op.type == 'BatchMatMulV2' else 'transpose_a') else a[-2]
            total += int(np.prod(a[1:-2])) * rows * int(np.prod(b[-2:]))
    return total


def time_network(base, n, size, threads, warmup, repeats, options=None, seed=0):
    """(median seconds, all seconds, parameters, multiply-accumulates) of Framework.register for
    one network, batch 1."""
    from network.cascade import make_net_args
    from network.framework import Framework, session_config
    with tf.Graph().as_default():
        tf.set_random_seed(seed)
        framework = Framework(make_net_args(base, n, extra=options), [size] * 3, validation=True)
        rng = np.random.default_rng(seed)
        batch = {k: rng.uniform(0, 255, [1, size, size, size, 1]).astype(np.float32) for k in ('voxel1', 'voxel2')}
        with tf.Session(config=session_config(framework.devices, threads)) as sess:
            sess.run(tf.global_variables_initializer())
            for _ in range(warmup):
                framework.register(sess, batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                framework.register(sess, batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times), times, framework.parameter_count, multiply_accumulates(tf.get_default_graph())


def time_baselines(size, seed=0):
    """{method: seconds of one registration call} on a synthetic pair of size^3 (installed baselines only)."""
    import baselines
    from data_util.dataset import Dataset
    from data_util.synthetic import make_synthetic
    out = {}
    available = [m for m in baselines.METHODS if baselines.missing(m) is None]
    if not available:
        return out
    with tempfile.TemporaryDirectory(prefix='bench_baselines_') as tmp:
        spec = make_synthetic(tmp, n_scans=6, image_size=size, seed=seed)
        batch = next(Dataset(spec, batch_size=1).generator('test', batch_size=1))
        fixed, moving = batch['voxel1'][0, ..., 0], batch['voxel2'][0, ..., 0]
        for method in available:
            _, seconds = baselines.registration_function(method)(fixed, moving)
            out[method] = seconds
            print('  {}: {:.2f} s'.format(method, seconds), file=sys.stderr, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench.inference', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=128, help='volume side (multiple of 64; default 128)')
    p.add_argument('--cascades', type=int, nargs='+', default=[1, 2, 3])
    p.add_argument('--networks', nargs='+', choices=list(NETWORKS), default=['teacher', 'student'])
    p.add_argument('--repeats', type=int, default=10, help='timed runs per network (median reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed runs first')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--baselines', action='store_true', help='also time the installed classical baselines once')
    p.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    args = p.parse_args(argv)
    if args.size % 64 or min(args.cascades) < 1 or args.repeats < 1:
        p.error('--size must be a multiple of 64, cascades and repeats positive')

    rows = []
    for name in args.networks:
        label, base, options = NETWORKS[name]
        for n in sorted(set(args.cascades) | ({1} if name == 'student' else set())):
            median, times, params, macs = time_network(base, n, args.size, args.threads, args.warmup,
                                                       args.repeats, options)
            rows.append({'network': name, 'label': label, 'cascades': n, 'parameters': params, 'macs': macs,
                         'seconds': median, 'min': min(times), 'max': max(times), 'times': times})
            print('  {} x{}: {:.3f} s'.format(name, n, median), file=sys.stderr, flush=True)
    if 'student' not in args.networks:
        reference = time_network('LDR', 1, args.size, args.threads, args.warmup, args.repeats)[0]
    else:
        reference = next(r['seconds'] for r in rows if r['network'] == 'student' and r['cascades'] == 1)
    if args.baselines:
        for method, seconds in time_baselines(args.size).items():
            import baselines
            rows.append({'network': method, 'label': baselines.METHODS[method]['label'], 'cascades': None,
                         'parameters': None, 'macs': None, 'seconds': seconds, 'min': seconds, 'max': seconds, 'times': [seconds]})

    settings = environment(args.threads, args.size)
    print('CPU seconds per pair: median of {} runs after {} warm-up; {}'.format(args.repeats, args.warmup, settings))
    if args.baselines:
        print('Classical baselines: one registration call each (the call alone) on a synthetic pair of that size.')
    print()
    print('| Network | Cascades | Parameters | GMACs | CPU s/pair | min - max | x 1-cas student |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        r['ratio_to_student_1'] = r['seconds'] / reference
        print('| {} | {} | {} | {} | {:.3f} | {:.3f} - {:.3f} | {:.2f} |'.format(
            r['label'], r['cascades'] or '-', '{:,}'.format(r['parameters']) if r['parameters'] else '-',
            '{:.1f}'.format(r['macs'] / 1e9) if r['macs'] else '-', r['seconds'], r['min'], r['max'],
            r['ratio_to_student_1']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'settings': settings, 'repeats': args.repeats, 'warmup': args.warmup, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
