"""Benchmark the compiled warp op against the pure-TF warp at 128^3; prints a Markdown table.

Usage: ``python -m bench.warp [--size 128] [--threads 2]``

For batch 1 and 4 and C = 1 and 3 it times, in one process with one TF session per case and
implementation (intra- and inter-op threads = --threads), the forward pass and the forward +
backward pass (gradients w.r.t. image and flow) of ``network.ops.warp_op`` and of
``network.spatial_transformer.warp_tf``: the median of 5-45 runs after one warm-up (as many as
fit 12 s per pass), the two implementations' runs alternating, so that load from other
processes falls on both alike. Slow spells of these shared machines last tens of seconds and
can slow the op more than pure TF; a longer series lets one move the medians less.
Inputs live in TF variables, so no feeding or fetching is timed. Flows are smooth random
fields like registration output (a 5^3 grid of N(0, 3^2)-voxel displacements, upsampled
trilinearly), so some samples fall outside the volume; padding 'border'.

Effective bandwidth of the op = bytes it must at least read and write per call / time,
with N = B * size^3 voxels and 4-byte floats:
  forward:            image + flow in, output out        = (2C + 3) * 4N bytes
  forward + backward: forward, then d image (flow, dy in; d image out) and
                      d flow (image, flow, dy in; d flow out) = (6C + 12) * 4N bytes.
It is printed beside a plain memory-copy rate (numpy copy of 256 MB, single thread;
counted as read + write) measured in the same run. The CPU-time ratio (pure TF / op, process
CPU time per call) is the comparison to trust when other processes load the machine.
"""
import argparse
import os
import statistics
import time

import numpy as np

from network.tfv1 import tf
from network import ops
from network.spatial_transformer import warp_tf

CASES = [(1, 1), (1, 3), (4, 1), (4, 3)]  # (batch, channels)


def timed_call(run):
    """(wall seconds, process CPU seconds) of one call of ``run()``.

    CPU time sums all threads of this process; unlike wall time it barely grows when other
    processes compete for the cores.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - start_cpu


def medians(samples):
    """(median wall, median CPU) of a list of timed_call results."""
    walls, cpus = zip(*samples)
    return statistics.median(walls), statistics.median(cpus)


def alternating_times(runs, budget, min_rounds, max_rounds):
    """Per callable of ``runs``, the medians of its timed_calls over rounds that call each
    once in turn.

    One warm-up call each first (it holds TF's one-time set-up, so it is not timed); then as
    many rounds as fit ``budget`` seconds at the pace of the first timed round, within
    [min_rounds, max_rounds]. Alternating keeps a burst of load on the shared machine from
    falling on one implementation only, so the ratios of the medians are steadier than
    those of back-to-back series.
    """
    for run in runs:
        run()
    samples = [[timed_call(run)] for run in runs]
    first_round = sum(taken[0][0] for taken in samples)
    count = int(min(max_rounds, max(min_rounds, budget // max(first_round, 1e-6))))
    for _ in range(count - 1):
        for run, taken in zip(runs, samples):
            taken.append(timed_call(run))
    return [medians(taken) for taken in samples]


def memcpy_rate():
    """Bytes/s of a numpy copy of 256 MB (read + write counted)."""
    src = np.ones(64 * 2 ** 20, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    seconds, _ = medians([timed_call(lambda: np.copyto(dst, src)) for _ in range(10)])
    return 2 * src.nbytes / seconds


def smooth_flow(rng, batch, size):
    """[batch, size, size, size, 3] float32 smooth random displacements (voxels).

    A 5^3 grid of N(0, 3^2) displacements, upsampled linearly along each axis in turn.
    """
    flow = rng.normal(0, 3, (batch, 5, 5, 5, 3))
    pos = np.linspace(0, 4, size)
    lo = np.minimum(pos.astype(int), 3)
    for axis in (1, 2, 3):
        shape = [1] * 5
        shape[axis] = size
        t = (pos - lo).reshape(shape)
        flow = np.take(flow, lo, axis) * (1 - t) + np.take(flow, lo + 1, axis) * t
    return flow.astype(np.float32)


def open_case(warp_fn, batch, channels, size, threads):
    """A TF session holding ``warp_fn``'s graph for one case, and its forward and forward +
    backward (gradients w.r.t. image and flow) as zero-argument callables."""
    rng = np.random.RandomState(0)
    shape = (batch, size, size, size)
    image = rng.rand(*shape, channels).astype(np.float32)
    flow = smooth_flow(rng, batch, size)
    dy = rng.randn(*shape, channels).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        values = {tf.placeholder(tf.float32, value.shape): value for value in (image, flow, dy)}
        variables = [tf.Variable(placeholder, trainable=False) for placeholder in values]
        image_var, flow_var, dy_var = variables
        output = warp_fn(image_var, flow_var, 'border')
        grads = tf.gradients(output, [image_var, flow_var], grad_ys=dy_var)
        forward = output.op
        backward = [grad.op for grad in grads]  # (a tf.group of them gets pruned away)
        init = tf.variables_initializer(variables)
    config = tf.ConfigProto(intra_op_parallelism_threads=threads,
                            inter_op_parallelism_threads=threads)
    sess = tf.Session(graph=graph, config=config)
    sess.run(init, feed_dict=values)
    return sess, (lambda: sess.run(forward)), (lambda: sess.run(backward))


def time_case(batch, channels, size, threads):
    """Median (wall, CPU) seconds of the op's and the pure-TF warp's forward and forward +
    backward passes, each pass timed in alternating rounds: ((op fwd, tf fwd), (op both,
    tf both))."""
    op_sess, op_fwd, op_both = open_case(ops.warp_op, batch, channels, size, threads)
    tf_sess, tf_fwd, tf_both = open_case(warp_tf, batch, channels, size, threads)
    try:
        return (alternating_times([op_fwd, tf_fwd], budget=12.0, min_rounds=5, max_rounds=45),
                alternating_times([op_both, tf_both], budget=12.0, min_rounds=5, max_rounds=45))
    finally:
        op_sess.close()
        tf_sess.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=128, help='volume edge (voxels)')
    parser.add_argument('--threads', type=int, default=2, help='TF intra/inter-op threads')
    args = parser.parse_args()

    ops.load_warp_op(required=True)
    copy = memcpy_rate()
    rows = []
    for batch, channels in CASES:
        (op_fwd, tf_fwd), (op_both, tf_both) = time_case(batch, channels, args.size, args.threads)
        voxels = batch * args.size ** 3
        for name, op_t, tf_t, floats in (('fwd', op_fwd, tf_fwd, 2 * channels + 3),
                                         ('fwd+bwd', op_both, tf_both, 6 * channels + 12)):
            rows.append((batch, channels, name, op_t, tf_t, floats * 4 * voxels / op_t[0]))

    print('warp at {}^3, {} threads, TF {}, {} CPUs, load average {:.1f} at the end; '
          'numpy copy rate: {:.1f} GB/s\n'.format(args.size, args.threads, tf.VERSION, os.cpu_count(),
                                                  os.getloadavg()[0], copy / 1e9))
    print('| B | C | pass | op (ms) | pure TF (ms) | speed-up | CPU-time ratio '
          '| op effective GB/s | vs copy |')
    print('|---|---|------|--------:|-------------:|---------:|---------------:'
          '|------------------:|--------:|')
    for batch, channels, name, op_t, tf_t, rate in rows:
        print('| {} | {} | {} | {:.1f} | {:.0f} | {:.1f}x | {:.1f}x | {:.2f} | {:.0%} |'.format(
            batch, channels, name, op_t[0] * 1e3, tf_t[0] * 1e3, tf_t[0] / op_t[0],
            tf_t[1] / op_t[1], rate / 1e9, rate / copy))


if __name__ == '__main__':
    main()
