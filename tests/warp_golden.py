"""SHA-256 digests of the warp op's outputs on seeded cases: kernel changes checked bit for bit.

test_warp_op.py compares the active build's outputs with the digests stored in
tests/warp_golden.npz.

The cases: C = 1 to 5 channels, paddings 'border' and 'zeros', and three grids: [2, 9, 7, 13]
(one group of 8 voxels along z and a scalar tail of 5), [1, 24, 22, 70] (a full 64-voxel run
and a tail run of 6; 1056 runs, so on two threads the image gradient splits its scatter) and
[2, 3, 4, 1] (depth 1: no z pairs). Each case runs LdrWarp, LdrWarpGradImage and
LdrWarpGradFlow on 1 and 2 intra-op threads. The inputs come from seeds (``case_inputs``):
small displacements, with some voxels sent far outside, some onto and around the faces, and
some with a NaN or +-inf flow component. Their digests are stored too, so that a changed
input generator is told apart from a changed kernel.

A build with the CPU flags (-mavx2 -mfma) rounds differently from one without, so the file
holds one set of digests per variant, 'avx2' and 'portable', each made with g++.

TensorFlow sizes its intra-op thread pool by the first session of a process and shares it
with later ones, so the digests are computed in a child process with
TF_OVERRIDE_GLOBAL_THREADPOOL=1 (each session gets its own pool of its configured size).

Usage: ``python -m tests.warp_golden [--portable]`` recomputes this machine's variant (with
--portable: a build without the CPU flags, compiled into a temporary directory) and rewrites
its digests in tests/warp_golden.npz, keeping the other variant's. Only for a deliberate
change of the kernels' results. ``--digests LIBRARY`` (the child) prints LIBRARY's digests as
JSON.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from network.ops import build
from network.tfv1 import tf
from tests.helpers import edge_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, 'tests', 'warp_golden.npz')
GRIDS = ((2, 9, 7, 13), (1, 24, 22, 70), (2, 3, 4, 1))  # [B, X, Y, Z]
CHANNELS = (1, 2, 3, 4, 5)
PADDINGS = ('border', 'zeros')
THREADS = (1, 2)
OUTPUTS = ('output', 'grad_image', 'grad_flow')
SEED = 23


def variant(portable=False):
    """The build variant whose digests apply: 'portable' for a build without the CPU flags
    (``portable``, or a CPU without AVX2 and FMA), else 'avx2'."""
    return 'portable' if portable or not build.cpu_flags() else 'avx2'


def uniform(seed, shape):
    """float64 values in [0, 1) of ``shape`` from the raw PCG64 stream of ``seed`` (a list of
    ints); NumPy keeps the bit generators' raw streams fixed across versions."""
    raw = np.random.PCG64(seed).random_raw(int(np.prod(shape)))
    return ((raw >> np.uint64(11)) * 2.0 ** -53).reshape(shape)


def case_inputs(grid, channels):
    """(image [B,X,Y,Z,C] in [0, 1), flow [B,X,Y,Z,3] voxels, grad [B,X,Y,Z,C] in [-1, 1))
    float32 for ``grid`` [B, X, Y, Z]. Flow: 80 % of the voxels move by up to 0.6 voxel per
    axis, 12 % anywhere up to 3 voxels beyond the faces, 8 % onto edge_positions; then 4 %
    have one component NaN, +inf or -inf."""
    grid = tuple(grid)

    def draw(stream, shape):
        return uniform([SEED, stream, channels] + list(grid), shape)

    image = draw(0, grid + (channels,))
    grad = 2 * draw(1, grid + (channels,)) - 1
    flow = 1.2 * (draw(2, grid + (3,)) - 0.5)
    kind = draw(3, grid)
    far = kind < 0.12
    flow[far] = ((2 * draw(4, grid + (3,)) - 1) * (max(grid[1:]) + 3))[far]
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid[1:]], indexing='ij'), -1)
    picks = draw(5, grid + (3,))
    positions = [edge_positions(n) for n in grid[1:]]
    targets = np.stack([p[(picks[..., a] * len(p)).astype(int)] for a, p in enumerate(positions)],
                       -1)
    faces = (kind >= 0.12) & (kind < 0.2)
    flow[faces] = (targets - coords)[faces]
    bad = draw(6, grid) < 0.04
    axis = (draw(7, grid) * 3).astype(int)
    value = np.array([np.nan, np.inf, -np.inf])[(draw(8, grid) * 3).astype(int)]
    flow[bad, axis[bad]] = value[bad]
    return tuple(a.astype(np.float32) for a in (image, flow, grad))


def digest(*arrays):
    """SHA-256 (hex) of the arrays' bytes, in order."""
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def case_name(grid, channels):
    """'<B>x<X>x<Y>x<Z>x<C>', the name of a case."""
    return 'x'.join(str(n) for n in tuple(grid) + (channels,))


def digests(library):
    """{name: SHA-256 hex} of every case's inputs ('<B>x<X>x<Y>x<Z>x<C>/inputs') and outputs
    ('<B>x..x<C>/<padding>/t<threads>/<output>') on the loaded op ``library``. Each thread
    count holds only in a process with TF_OVERRIDE_GLOBAL_THREADPOOL=1 (see digests_of)."""
    result, feeds, fetches = {}, {}, {}
    with tf.Graph().as_default():
        for grid in GRIDS:
            for channels in CHANNELS:
                arrays = case_inputs(grid, channels)
                image, flow, grad = [tf.placeholder(tf.float32, a.shape) for a in arrays]
                feeds.update(zip((image, flow, grad), arrays))
                name = case_name(grid, channels)
                result[name + '/inputs'] = digest(*arrays)
                for padding in PADDINGS:
                    fetches[name + '/' + padding] = [
                        library.ldr_warp(image, flow, padding=padding),
                        library.ldr_warp_grad_image(image, flow, grad, padding=padding),
                        library.ldr_warp_grad_flow(image, flow, grad, padding=padding)]
        for threads in THREADS:
            config = tf.ConfigProto(intra_op_parallelism_threads=threads,
                                    inter_op_parallelism_threads=threads)
            with tf.Session(config=config) as sess:
                values = sess.run(fetches, feeds)
            for key, outputs in values.items():
                for output, value in zip(OUTPUTS, outputs):
                    result['{}/t{}/{}'.format(key, threads, output)] = digest(value)
    return result


def load(name):
    """The stored {name: SHA-256 hex} of build variant ``name`` ({} if none is stored)."""
    if not os.path.exists(PATH):
        return {}
    with np.load(PATH) as stored:
        if name + '_keys' not in stored:
            return {}
        return {str(key): bytes(sha).hex()
                for key, sha in zip(stored[name + '_keys'], stored[name + '_sha256'])}


def save(name, table):
    """Store ``table`` ({name: SHA-256 hex}) as build variant ``name``'s, keeping the others."""
    arrays = {}
    if os.path.exists(PATH):
        with np.load(PATH) as stored:
            arrays = {key: stored[key] for key in stored.files}
    keys = sorted(table)
    arrays[name + '_keys'] = np.array(keys)
    arrays[name + '_sha256'] = np.array([np.frombuffer(bytes.fromhex(table[k]), np.uint8)
                                         for k in keys])
    np.savez_compressed(PATH, **arrays)


def digests_of(library_path):
    """``digests`` of the op library at ``library_path``, computed in a child process."""
    env = dict(os.environ, TF_OVERRIDE_GLOBAL_THREADPOOL='1')
    child = subprocess.run([sys.executable, '-m', 'tests.warp_golden', '--digests', library_path],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    if child.returncode != 0:
        raise RuntimeError('computing the digests failed:\n' + child.stderr[-3000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


def portable_library(directory):
    """Path of a build without the CPU flags, compiled into ``directory``."""
    path = os.path.join(directory, 'warp_op_portable.so')
    compiled = subprocess.run(build.command(path, portable=True), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True)
    if compiled.returncode != 0:
        raise build.BuildError('compiling the portable build failed:\n' + compiled.stdout[-3000:])
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--portable', action='store_true',
                        help='digests of a build without the CPU flags (compiled here)')
    parser.add_argument('--digests', metavar='LIBRARY',
                        help='print the digests of this op library as JSON (the child process)')
    args = parser.parse_args()
    if args.digests:
        print(json.dumps(digests(tf.load_op_library(args.digests))))
        return
    with tempfile.TemporaryDirectory() as directory:
        table = digests_of(portable_library(directory) if args.portable else build.build())
    name = variant(args.portable)
    save(name, table)
    print('{}: {} digests -> {}'.format(name, len(table), PATH))


if __name__ == '__main__':
    main()
