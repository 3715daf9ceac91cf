"""Seconds per training step: teacher, student, student + ALDK (and + L2); prints a Markdown table.

Usage: ``python -m bench.train_step [--size 128] [--batch 1] [--cascades 1] [--steps 6] [--threads 2]
[--configs teacher student aldk l2 aldk_offline] [--json OUT]``

Per configuration, in a fresh graph with random weights and a session of --threads intra- and
inter-op threads (oneDNN on unless TF_ENABLE_ONEDNN_OPTS says otherwise), train.py's step
``framework.train_step`` on random 0..255 volumes [batch, S, S, S, 1] is run --warmup times,
then --steps times; the mean and median seconds per step are reported. --steps should be even:
ALDK updates its critic every second step (train.py's default --critic_every 2), so the mean
over an even number of steps is the cost of a training step in the long run.

Configurations (n = --cascades):
  teacher       VTN affine + n VTN, reconstruction loss, augmentation on (train.py -b VTN)
  student       light affine + n LDR, reconstruction loss, augmentation on (train.py -b LDR)
  aldk          the student + ALDK with the online teacher (train.py --aldk --teacher RUN): the
                frozen teacher (VTN affine + n VTN) runs in the graph on every step, critic every 2nd
  l2            the student + plain L2 flow distillation, online teacher (train.py --distill l2)
  aldk_offline  the student + ALDK from stored flows (--pretrained_flow_path; no augmentation)
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.environment import environment  # noqa: E402
from network.tfv1 import tf  # noqa: E402

CONFIGS = {
    'teacher': 'VTN + affine (teacher)',
    'student': 'LDR + light affine (student)',
    'aldk': 'student + ALDK (online teacher)',
    'l2': 'student + L2 distillation (online teacher)',
    'aldk_offline': 'student + ALDK (stored teacher flows)',
}


def build(config, n, size):
    """The training Framework of one configuration in the current graph."""
    from network.aldk import DistillFramework, Teacher
    from network.cascade import make_net_args
    from network.framework import Framework
    image_size = [size] * 3
    if config == 'teacher':
        return Framework(make_net_args('VTN', n), image_size)
    student = make_net_args('LDR', n)
    if config == 'student':
        return Framework(student, image_size)
    if config == 'aldk_offline':
        return DistillFramework(student, image_size, augment=False, method='aldk', stored_flows=True)
    teacher = Teacher(make_net_args('VTN', n), None, image_size)
    return DistillFramework(student, image_size, method='aldk' if config == 'aldk' else 'l2', teacher=teacher)


def time_steps(config, n, size, batch_size, threads, warmup, steps, seed=0):
    """(mean seconds, median seconds, all seconds, trainable parameters) of training steps."""
    from network.framework import session_config
    with tf.Graph().as_default():
        tf.set_random_seed(seed)
        framework = build(config, n, size)
        rng = np.random.default_rng(seed)
        shape = [batch_size, size, size, size, 1]
        batch = {k: rng.uniform(0, 255, shape).astype(np.float32) for k in ('voxel1', 'voxel2')}
        batch.update({k: (rng.uniform(0, 1, shape) > 0.5).astype(np.float32) * 255 for k in ('seg1', 'seg2')})
        batch.update({k: rng.uniform(0, size - 1, [batch_size, 6, 3]).astype(np.float32) for k in ('point1', 'point2')})
        if config == 'aldk_offline':
            batch['teacher_flow'] = rng.normal(0, 2, shape[:4] + [3]).astype(np.float32)
        with tf.Session(config=session_config(framework.devices, threads)) as sess:
            sess.run(tf.global_variables_initializer())
            for _ in range(warmup):
                framework.train_step(sess, batch, 1e-4)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                framework.train_step(sess, batch, 1e-4)
                times.append(time.perf_counter() - start)
        return statistics.mean(times), statistics.median(times), times, framework.parameter_count


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench.train_step', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=128, help='volume side (multiple of 64; default 128)')
    p.add_argument('--batch', type=int, default=1, help='pairs per step (default 1)')
    p.add_argument('--cascades', type=int, default=1)
    p.add_argument('--configs', nargs='+', choices=list(CONFIGS), default=['teacher', 'student', 'aldk'])
    p.add_argument('--steps', type=int, default=6, help='timed steps (even: ALDK alternates)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=None, help='also write the numbers to this JSON file')
    args = p.parse_args(argv)
    if args.size % 64 or args.cascades < 1 or args.steps < 1 or args.batch < 1:
        p.error('--size must be a multiple of 64; cascades, steps and batch positive')

    rows = []
    for config in args.configs:
        mean, median, times, params = time_steps(config, args.cascades, args.size, args.batch, args.threads,
                                                 args.warmup, args.steps)
        rows.append({'config': config, 'label': CONFIGS[config], 'parameters': params, 'mean': mean,
                     'median': median, 'times': times})
        print('  {}: {:.3f} s/step'.format(config, mean), file=sys.stderr, flush=True)
    settings = environment(args.threads, args.size).replace('batch 1', 'batch {}'.format(args.batch))
    print('Seconds per training step: mean (and median) of {} steps after {} warm-up; {} cascade(s); {}'.format(
        args.steps, args.warmup, args.cascades, settings))
    print()
    print('| Configuration | Trained parameters | s/step (mean) | s/step (median) | x student |')
    print('|---|---|---|---|---|')
    reference = next((r['mean'] for r in rows if r['config'] == 'student'), None)
    for r in rows:
        r['ratio_to_student'] = r['mean'] / reference if reference else None
        print('| {} | {:,} | {:.3f} | {:.3f} | {} |'.format(
            r['label'], r['parameters'], r['mean'], r['median'],
            '{:.2f}'.format(r['ratio_to_student']) if reference else '-'))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'settings': settings, 'cascades': args.cascades, 'batch': args.batch, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
    main()
