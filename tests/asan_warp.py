"""The warp op's kernels under AddressSanitizer; run by test_warp_op.py in a child process.

Usage: ``LD_PRELOAD=<libasan> python tests/asan_warp.py LIBRARY EXPECTED`` with LIBRARY an ASan
build of ``network/ops/warp_op.cc`` (its ops keep their names; this process loads no other
build) and EXPECTED the ``.npz`` that ``save_reference`` wrote: the pure-TF warp's results on
the same cases, computed once by the parent outside ASan, where building TensorFlow's gradient
graphs is fast. The cases (``make_cases``) run the forward op and both gradient ops on shapes
that reach every code path (channels 1-5; z lengths around the 8-voxel groups and 64-voxel
runs; batch 1 and 2, so the image gradient splits its scatter) with flows whose last voxels
sample the volume's far corner, where a read past the image would start. Each result must
match the pure-TF warp within 1e-5. ASan aborts the process on the first out-of-bounds access;
the last line printed is ``checked N cases``.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from network import ops  # noqa: E402
from network.spatial_transformer import warp_tf  # noqa: E402
from network.tfv1 import tf  # noqa: E402

SIZES = [(3, 3, 16), (2, 2, 9), (5, 4, 72), (4, 5, 150), (20, 18, 40)]
OUTPUTS = ('output', 'd image', 'd flow')


def make_cases():
    """[(description, image, flow, dy, padding)]: every channel count, size, batch and padding;
    the same arrays on every call."""
    rng = np.random.default_rng(0)
    cases = []
    for channels in (1, 2, 3, 4, 5):
        for size in SIZES:
            for batch, padding, scale in ((1, 'border', 0.3), (2, 'zeros', 0.3), (2, 'border', 2.0)):
                image = rng.random((batch,) + size + (channels,), dtype=np.float32)
                flow = rng.normal(0, scale, (batch,) + size + (3,)).astype(np.float32)
                # The last voxels of each item sample just short of the far corner.
                flow[:, -2:, -2:, -12:] = np.abs(flow[:, -2:, -2:, -12:]) + 0.3
                dy = rng.normal(size=image.shape).astype(np.float32)
                description = 'C {}, size {}, batch {}, {}'.format(channels, size, batch, padding)
                cases.append((description, image, flow, dy, padding))
    return cases


def warps_and_gradients(warp, cases):
    """Per case [output, d image, d flow] of ``warp(image, flow, padding)``: one graph, one
    run, on 2 threads."""
    with tf.Graph().as_default():
        fetches = []
        for _, image, flow, dy, padding in cases:
            image_t, flow_t = tf.constant(image), tf.constant(flow)
            out = warp(image_t, flow_t, padding)
            fetches.append([out] + tf.gradients(out, [image_t, flow_t], grad_ys=tf.constant(dy)))
        config = tf.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=2)
        with tf.Session(config=config) as sess:
            return sess.run(fetches)


def save_reference(path):
    """Write the pure-TF warp's results on ``make_cases()`` to ``path`` (.npz)."""
    results = warps_and_gradients(warp_tf, make_cases())
    np.savez(path, **{'{}/{}'.format(i, name): array for i, case in enumerate(results)
                      for name, array in zip(OUTPUTS, case)})


def main(library_path, expected_path):
    library = tf.load_op_library(library_path)
    ops._register_gradient(library)

    def op_warp(image, flow, padding):
        return library.ldr_warp(image, flow, padding=padding)

    cases = make_cases()
    got = warps_and_gradients(op_warp, cases)
    with np.load(expected_path) as expected:
        for i, ((description, *_), results) in enumerate(zip(cases, got)):
            for name, array in zip(OUTPUTS, results):
                error = np.abs(array - expected['{}/{}'.format(i, name)]).max()
                if error >= 1e-5:
                    sys.exit('{}: {} differs from the pure-TF warp by {:.2e} ({})'.format(
                        library_path, name, error, description))
    print('checked {} cases'.format(len(cases)))


if __name__ == '__main__':
    main(*sys.argv[1:])
