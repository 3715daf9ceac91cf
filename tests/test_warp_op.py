"""The compiled warp op (network.ops) against the pure-TF warp and finite differences.

With env LDR_REQUIRE_WARP_OP=1 (CI) the op must be the active warp; without it the op is
still tested whenever it builds, and the op tests are skipped (with the reason) if not.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from network import ops
from network import spatial_transformer as st
from network.ops import build
from network.tfv1 import tf
from tests import asan_warp, warp_golden
from tests.helpers import edge_positions, warp_reference

PADDINGS = ('border', 'zeros')


@pytest.fixture(scope='module')
def library():
    lib = ops.load_warp_op()
    if lib is None:
        pytest.skip('the compiled warp op did not build here: {}'.format(ops._failure))
    return lib


def run(build_fn, feeds, threads=2):
    """Build ``build_fn(*placeholders)`` in a fresh graph, run it once; ``feeds``: arrays."""
    with tf.Graph().as_default():
        placeholders = [tf.placeholder(tf.float32, np.shape(value)) for value in feeds]
        fetches = build_fn(*placeholders)
        config = tf.ConfigProto(intra_op_parallelism_threads=threads,
                                inter_op_parallelism_threads=threads)
        with tf.Session(config=config) as sess:
            return sess.run(fetches, dict(zip(placeholders, feeds)))


def forward_and_gradients(warp_fn, image, flow, dy, padding):
    """[warp, d(sum(warp * dy))/d image, .../d flow] for one warp implementation."""
    def graph(image, flow):
        out = warp_fn(image, flow, padding)
        return [out] + tf.gradients(out, [image, flow], grad_ys=tf.constant(dy))
    return run(graph, [image, flow])


def assert_op_matches_pure_tf(image, flow, dy, padding):
    """The op's output and both gradients equal the pure-TF warp's within 1e-5."""
    got = forward_and_gradients(ops.warp_op, image, flow, dy, padding)
    want = forward_and_gradients(st.warp_tf, image, flow, dy, padding)
    for name, a, b in zip(['output', 'd image', 'd flow'], got, want):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() < 1e-5, name


def warp_numpy(image, flow, padding):
    """float64 trilinear warp, image [B,X,Y,Z,C], flow [B,X,Y,Z,3] (voxels)."""
    sizes = image.shape[1:4]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in sizes], indexing='ij'), -1)
    pos = grid[None] + flow
    if padding == 'border':
        pos = np.clip(pos, 0, np.array(sizes) - 1)
    lo = np.floor(pos).astype(int)
    frac = pos - lo
    out = np.zeros(image.shape)
    batch = np.arange(image.shape[0])[:, None, None, None]
    for corner in np.ndindex(2, 2, 2):
        index = lo + np.array(corner)
        weight = np.prod(np.where(np.array(corner) == 1, frac, 1 - frac), axis=-1)
        inside = np.all((index >= 0) & (index <= np.array(sizes) - 1), axis=-1)
        if padding == 'zeros':
            weight = weight * inside
        index = np.clip(index, 0, np.array(sizes) - 1)
        out += image[batch, index[..., 0], index[..., 1], index[..., 2]] * weight[..., None]
    return out


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('batch,size,channels', [(2, (12, 13, 14), 1), (2, (12, 13, 14), 3),
                                                 (1, (32, 32, 32), 3), (3, (9, 8, 7), 2),
                                                 (2, (4, 5, 150), 1)])  # 64-voxel runs along z
def test_matches_pure_tf(library, padding, batch, size, channels):
    rng = np.random.default_rng(sum(size) + channels + batch)
    image = rng.random((batch,) + size + (channels,), dtype=np.float32)
    flow = rng.normal(0, 4, (batch,) + size + (3,)).astype(np.float32)  # many samples outside
    dy = rng.normal(size=image.shape).astype(np.float32)
    assert_op_matches_pure_tf(image, flow, dy, padding)


@pytest.mark.parametrize('padding', PADDINGS)
def test_matches_pure_tf_at_grid_points_and_edges(library, padding):
    """Integer positions, exactly on the volume's faces and beyond: the reference's kinks."""
    rng = np.random.default_rng(7)
    image = rng.random((2, 6, 7, 5, 2), dtype=np.float32)
    flow = rng.integers(-7, 8, (2, 6, 7, 5, 3)).astype(np.float32)
    flow[0, :, :, :, 0] = 5 - np.arange(6)[:, None, None]  # every x lands on the last face
    flow[1, :, :, :, 2] = -np.arange(5)[None, None, :]  # every z lands on the first face
    dy = rng.normal(size=image.shape).astype(np.float32)
    assert_op_matches_pure_tf(image, flow, dy, padding)


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('channels', (1, 2, 3, 4))
def test_matches_pure_tf_with_small_displacements(library, padding, channels):
    """Small displacements, as a registration's: inside the volume nearly every group of 8
    voxels has all upper x and y neighbours one stride above the lower ones (the pair
    paths' shortcut), at the faces not."""
    rng = np.random.default_rng(40 + channels)
    size = (20, 18, 40)
    image = rng.random((2,) + size + (channels,), dtype=np.float32)
    flow = rng.normal(0, 0.4, (2,) + size + (3,)).astype(np.float32)
    dy = rng.normal(size=image.shape).astype(np.float32)
    assert_op_matches_pure_tf(image, flow, dy, padding)


def edge_flow(rng, batch, size):
    """[batch, *size, 3] flow sending each voxel, per axis, to a random edge_positions entry."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing='ij'), -1)
    targets = [rng.choice(edge_positions(n), (batch,) + size) for n in size]
    return (np.stack(targets, -1) - grid).astype(np.float32)


# Z lengths around the 8-voxel setup vectors: depth 1 (no z pair), 2 (one pair), 8 (one
# full vector), 13 and 21 (vectors plus scalar remainders).
PAIR_Z = (1, 2, 8, 13, 21)
# Channel counts: 1 (pair path), 2-4 (channel-pair path), 5 (4-channel vectors).
PATH_CHANNELS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('nz', PAIR_Z)
@pytest.mark.parametrize('channels', PATH_CHANNELS)
def test_faces_and_outside(library, padding, nz, channels):
    """Every forward path and its scalar remainder at positions on, just inside and beyond
    the faces along every axis, against the pure-TF warp."""
    rng = np.random.default_rng(100 + nz + 10 * channels)
    size = (3, 4, nz)
    image = rng.random((2,) + size + (channels,), dtype=np.float32)
    flow = edge_flow(rng, 2, size)
    dy = rng.normal(size=image.shape).astype(np.float32)
    assert_op_matches_pure_tf(image, flow, dy, padding)


def clamp_bound_flow(flow, padding):
    """``flow`` with each non-finite component replaced by the displacement to the bound the
    op clamps that position to: NaN and -inf to the lower bound, +inf to the upper one;
    the bounds are [0, n - 1] with 'border' padding and [-2, n + 1] with 'zeros'."""
    sizes = flow.shape[1:4]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in sizes], indexing='ij'), -1)
    margin = 0 if padding == 'border' else 2
    lower = np.broadcast_to(-margin - grid, flow.shape)
    upper = np.broadcast_to(np.array(sizes) - 1 + margin - grid, flow.shape)
    out = np.where(np.isnan(flow) | (flow == -np.inf), lower, flow)
    return np.where(flow == np.inf, upper, out).astype(np.float32)


@pytest.mark.parametrize('padding', PADDINGS)
@pytest.mark.parametrize('nz', PAIR_Z)
@pytest.mark.parametrize('channels', PATH_CHANNELS)
def test_non_finite_flow(library, padding, nz, channels):
    """NaN and +-inf flow components (one per voxel, in vectors and remainders alike).

    The pure-TF warp returns NaN there (and for +-inf with 'zeros' padding); the op instead
    clamps such a position like a finite one beyond the bound (NaN to the lower bound) and
    returns a finite value: the pure-TF warp's value at that bound.
    """
    rng = np.random.default_rng(200 + nz + 10 * channels)
    size = (3, 4, nz)
    image = rng.random((2,) + size + (channels,), dtype=np.float32)
    flow = rng.normal(0, 2, (2,) + size + (3,)).astype(np.float32)
    bad = rng.random((2,) + size) < 0.4
    axis = rng.integers(0, 3, bad.sum())
    flow[bad, axis] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), bad.sum())
    got = run(lambda i, f: ops.warp_op(i, f, padding), [image, flow])
    want = run(lambda i, f: st.warp_tf(i, f, padding), [image, clamp_bound_flow(flow, padding)])
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize('padding', PADDINGS)
def test_gradients_match_finite_differences(library, padding):
    rng = np.random.default_rng(11)
    image = rng.random((2, 6, 5, 7, 3))
    # fractional parts kept away from voxel boundaries, where trilinear interpolation has kinks
    flow = np.round(rng.normal(0, 2.5, (2, 6, 5, 7, 3))) + rng.uniform(0.2, 0.8, (2, 6, 5, 7, 3))
    weights = rng.normal(size=image.shape)
    _, grad_image, grad_flow = forward_and_gradients(
        ops.warp_op, image.astype(np.float32), flow.astype(np.float32), weights.astype(np.float32),
        padding)

    def loss(image, flow):
        return np.sum(warp_numpy(image, flow, padding) * weights)

    eps = 1e-4
    for _ in range(6):
        for array, grad in ((image, grad_image), (flow, grad_flow)):
            index = tuple(rng.integers(0, n) for n in array.shape)
            plus, minus = array.copy(), array.copy()
            plus[index] += eps
            minus[index] -= eps
            args = (plus, flow) if array is image else (image, plus)
            args_minus = (minus, flow) if array is image else (image, minus)
            numeric = (loss(*args) - loss(*args_minus)) / (2 * eps)
            assert abs(grad[index] - numeric) < 1e-4


def test_numpy_reference_matches_pure_tf():
    """Guards the finite-difference test's float64 reference itself."""
    rng = np.random.default_rng(5)
    image = rng.random((1, 6, 5, 7, 2), dtype=np.float32)
    flow = rng.normal(0, 3, (1, 6, 5, 7, 3)).astype(np.float32)
    for padding in PADDINGS:
        tf_out = run(lambda i, f: st.warp_tf(i, f, padding), [image, flow])
        assert np.abs(tf_out - warp_numpy(image, flow, padding)).max() < 1e-5


def test_image_gradient_is_deterministic(library):
    rng = np.random.default_rng(13)
    image = rng.random((1, 32, 32, 32, 1), dtype=np.float32)
    flow = rng.normal(0, 3, (1, 32, 32, 32, 3)).astype(np.float32)

    def graph(image, flow):
        return tf.gradients(ops.warp_op(image, flow), image)[0]
    first, second = run(graph, [image, flow]), run(graph, [image, flow])
    assert np.array_equal(first, second)


def test_outputs_are_bit_identical_to_the_stored_digests(library):
    """Forward and both gradients of every tests/warp_golden.py case (channels 1-5, both
    paddings, groups of 8 and scalar tails, faces, far and non-finite flows, 1 and 2 threads)
    have exactly the bytes recorded for this build variant (avx2 or portable)."""
    variant = warp_golden.variant()
    want = warp_golden.load(variant)
    assert want, 'tests/warp_golden.npz holds no digests for the {} build'.format(variant)
    got = warp_golden.digests_of(build.library_path())
    assert set(got) == set(want)
    changed_inputs = [key for key in want if key.endswith('/inputs') and got[key] != want[key]]
    assert not changed_inputs, 'the input generator changed, not the op: {}'.format(changed_inputs)
    changed = sorted(key for key in want if got[key] != want[key])
    assert not changed, '{} of {} outputs differ ({}): {}'.format(
        len(changed), len(want), variant, ', '.join(changed[:10]))


def test_zero_channels(library):
    """An image of no channels warps to an empty output and image gradient; the flow gradient
    is zero."""
    image = np.zeros((1, 4, 4, 16, 0), np.float32)
    flow = np.random.default_rng(17).normal(0, 2, (1, 4, 4, 16, 3)).astype(np.float32)

    def graph(image, flow):
        return [library.ldr_warp(image, flow), library.ldr_warp_grad_image(image, flow, image),
                library.ldr_warp_grad_flow(image, flow, image)]
    output, grad_image, grad_flow = run(graph, [image, flow])
    assert output.shape == grad_image.shape == image.shape
    np.testing.assert_array_equal(grad_flow, np.zeros_like(flow))


def test_dynamic_shapes_and_shape_errors(library):
    image = np.random.default_rng(3).random((2, 5, 6, 7, 1), dtype=np.float32)
    flow = np.zeros((2, 5, 6, 7, 3), np.float32)
    with tf.Graph().as_default():
        image_ph = tf.placeholder(tf.float32, [None, None, None, None, 1])
        flow_ph = tf.placeholder(tf.float32, [None, None, None, None, 3])
        out = ops.warp_op(image_ph, flow_ph)
        assert out.shape.as_list() == [None, None, None, None, 1]
        with tf.Session() as sess:
            np.testing.assert_array_equal(sess.run(out, {image_ph: image, flow_ph: flow}), image)
        with pytest.raises(ValueError):
            ops.warp_op(tf.zeros([1, 4, 4, 4, 2]), tf.zeros([1, 4, 4, 5, 3]))
        with pytest.raises(ValueError):
            ops.warp_op(tf.zeros([1, 4, 4, 4, 2]), tf.zeros([1, 4, 4, 4, 2]))
        with pytest.raises(ValueError, match='padding'):
            ops.warp_op(tf.zeros([1, 4, 4, 4, 2]), tf.zeros([1, 4, 4, 4, 3]), 'reflect')


@pytest.mark.skipif(os.environ.get('LDR_REQUIRE_WARP_OP') != '1',
                    reason='LDR_REQUIRE_WARP_OP=1 is not set (CI sets it)')
def test_required_op_is_active():
    assert st.warp_impl() == 'op'


def test_build_is_cached(library, monkeypatch):
    path = build.library_path()
    assert os.path.exists(path)

    def no_compiling(output):
        raise AssertionError('the cached library was rebuilt')
    monkeypatch.setattr(build, '_compile', no_compiling)
    assert build.build() == path
    assert ops.load_warp_op() is library


def test_library_path_follows_the_kernel_headers(library, monkeypatch, tmp_path):
    """Editing a kernel header, not only warp_op.cc, gives a new library path: a rebuild."""
    names = [os.path.basename(path) for path in build.sources()]
    assert 'warp_gradients.h' in names
    for path in build.sources():
        shutil.copy(path, str(tmp_path))
    monkeypatch.setattr(build, 'SOURCE', str(tmp_path / 'warp_op.cc'))
    assert [os.path.basename(path) for path in build.sources()] == names
    before = build.library_path()
    with open(str(tmp_path / 'warp_gradients.h'), 'a') as f:
        f.write('\n')
    assert build.library_path() != before


def test_set_warp_impl_selects_the_implementation(library, monkeypatch):
    monkeypatch.setattr(st, '_impl', st._impl)

    def op_types(impl):
        st.set_warp_impl(impl)
        with tf.Graph().as_default() as graph:
            st.warp(tf.zeros([1, 4, 4, 4, 1]), tf.zeros([1, 4, 4, 4, 3]))
            return {op.type for op in graph.get_operations()}

    assert 'LdrWarp' not in op_types('tf')
    assert st.warp_impl() == 'tf'
    assert 'LdrWarp' in op_types('op')
    assert 'LdrWarp' in op_types('auto')


def test_unavailable_op_falls_back_with_one_warning(monkeypatch, capsys):
    def failing_build():
        raise build.BuildError('no C++ compiler found (test)')
    monkeypatch.setattr(build, 'build', failing_build)
    monkeypatch.setattr(ops, '_library', None)
    monkeypatch.setattr(ops, '_failure', None)
    monkeypatch.setattr(ops, '_warned', False)
    monkeypatch.setattr(st, '_impl', 'auto')
    monkeypatch.delenv('LDR_REQUIRE_WARP_OP', raising=False)
    assert ops.load_warp_op() is None
    assert ops.load_warp_op() is None
    assert st.warp_impl() == 'tf'
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and 'pure-TF' in lines[0] and 'no C++ compiler' in lines[0]
    with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
        ops.load_warp_op(required=True)
    monkeypatch.setenv('LDR_REQUIRE_WARP_OP', '1')
    with pytest.raises(RuntimeError):
        ops.load_warp_op()
    with pytest.raises(RuntimeError):
        st.warp_impl()


def runtime_library(compiler, name):
    """Absolute path of the compiler's runtime library ``name`` (e.g. libasan.so), or None."""
    found = subprocess.run([compiler, '-print-file-name=' + name], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


@pytest.fixture(scope='module')
def asan_runtime():
    """[libasan, libstdc++] of the compiler, to preload; skips where it has no ASan runtime."""
    compiler = build.compiler()
    runtime = [runtime_library(compiler, name) for name in ('libasan.so', 'libstdc++.so.6')]
    if None in runtime:
        pytest.skip('{} has no AddressSanitizer runtime (libasan.so)'.format(compiler))
    return runtime


@pytest.fixture(scope='module')
def asan_expected(asan_runtime, tmp_path_factory):
    """The pure-TF warp's results on tests/asan_warp.py's cases (.npz), for both ASan builds."""
    path = str(tmp_path_factory.mktemp('asan') / 'expected.npz')
    asan_warp.save_reference(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize('portable', [False, pytest.param(True, marks=pytest.mark.full)], ids=['cpu_flags', 'portable'])
def test_kernels_stay_inside_their_tensors_under_address_sanitizer(library, asan_runtime, asan_expected, tmp_path,
                                                                   portable):
    """An AddressSanitizer build of the op runs forward and both gradients on shapes that reach
    every code path, with samples at the far corner, and matches the pure-TF warp
    (tests/asan_warp.py, in a child process with ASan preloaded). ASan aborts on any read or
    write outside a tensor. The portable build (no AVX2 flags) checks the code that other
    CPUs run; it is in the full set (-m full), the default run checks the build of this CPU."""
    sanitized = str(tmp_path / 'warp_op_asan.so')
    flags = ['-fsanitize=address', '-fno-omit-frame-pointer']
    compiled = subprocess.run(build.command(sanitized, flags, portable), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True)
    assert compiled.returncode == 0, compiled.stdout[-2000:]
    # ASan's interceptors need libstdc++ loaded before TensorFlow; Python's own leaks are no finding.
    env = dict(os.environ, LD_PRELOAD=' '.join(asan_runtime), ASAN_OPTIONS='detect_leaks=0')
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'asan_warp.py')
    result = subprocess.run([sys.executable, script, sanitized, asan_expected], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=1200)
    findings = [line for line in result.stderr.splitlines() if 'AddressSanitizer' in line]
    assert not findings, '\n'.join(findings + result.stderr.splitlines()[-30:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == 'checked 75 cases'


def test_gpu_placed_warp_falls_back_to_pure_tensorflow(library):
    """The compiled op is CPU-only: under a GPU device scope the warp is built from TensorFlow
    ops (and runs, with soft placement, on this CPU-only machine); under a CPU scope, the op."""
    st.set_warp_impl('op')
    rng = np.random.default_rng(0)
    image, flow = rng.random((1, 8, 8, 8, 1)), rng.normal(0, 1.5, (1, 8, 8, 8, 3))
    results = {}
    for device in ('/cpu:0', '/gpu:0'):
        with tf.Graph().as_default() as graph:
            with tf.device(device):
                warped = st.warp(tf.constant(image, tf.float32), tf.constant(flow, tf.float32))
            types = {op.type for op in graph.get_operations()}
            with tf.Session(config=tf.ConfigProto(allow_soft_placement=True)) as sess:
                results[device] = sess.run(warped)
        assert ('LdrWarp' in types) == (device == '/cpu:0'), (device, sorted(types))
    np.testing.assert_allclose(results['/gpu:0'], results['/cpu:0'], atol=1e-5)
    np.testing.assert_allclose(results['/cpu:0'], warp_reference(image, flow), atol=1e-4)
    st.set_warp_impl('auto')
