"""Classical baselines (baselines/): flow convention and recovery of a known deformation.

A textured 48^3 phantom is the fixed image; the moving image is it pulled back through a
known field u = t + smooth bump (moving(p) = fixed(p - u(p)) to first order, so the ideal
registration flow is about +u). Each baseline must bring the moving image closer to the fixed
one under our warp, and return the translation with the right sign on the right axis.
The tests skip, saying which package is missing, when antspyx / itk-elastix are not installed
(pip install -r requirements-baselines.txt).
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import scipy.ndimage as ndi

import baselines
from conftest import ROOT
from helpers import warp_reference

SIZE = 48
SHIFT = np.array([3.0, -2.0, 1.0])


def phantom():
    """(fixed, moving, body mask, true field [X,Y,Z,3]) of a textured ellipsoid, 0..255 floats."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE, dtype=np.float64)] * 3, indexing='ij'), -1)
    texture = ndi.gaussian_filter(rng.standard_normal((SIZE,) * 3), 2.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    centre = (SIZE - 1) / 2
    body = np.sum(((grid - centre) / np.array([19.0, 17.0, 20.0])) ** 2, -1) < 1
    fixed = ndi.gaussian_filter(body.astype(np.float64), 1.0) * (60 + 160 * texture)
    bump = np.exp(-np.sum((grid - [26, 22, 24]) ** 2, -1) / (2 * 7.0 ** 2))
    field = SHIFT + bump[..., None] * np.array([0.0, 1.5, -1.5])
    moving = warp_reference(fixed[None, ..., None], -field[None])[0, ..., 0]
    return fixed.astype(np.float32), moving.astype(np.float32), body, field


def check_recovery(flow, fixed, moving, body, field):
    """The flow improves the match under our warp and carries the shift on the right axes."""
    assert flow.shape == fixed.shape + (3,) and flow.dtype == np.float32
    warped = warp_reference(moving[None, ..., None], flow[None])[0, ..., 0]
    before = np.abs(fixed - moving)[body].mean()
    after = np.abs(fixed - warped)[body].mean()
    assert after < 0.5 * before, (before, after)
    inner = ndi.binary_erosion(body, iterations=4)
    mean_flow = flow[inner].mean(axis=0)
    np.testing.assert_allclose(mean_flow, field[inner].mean(axis=0), atol=0.6)


def require(method):
    reason = baselines.missing(method)
    if reason:
        pytest.skip('{}: {}'.format(method, reason))


def private_dirs(tmp_path, monkeypatch):
    """(working directory, temp directory) of this test alone, both empty and in use.

    Another test process may run a baseline at the same time (reproduce.py's), so leftovers
    are looked for in a temp directory no other process uses.
    """
    work, tmp = tmp_path / 'work', tmp_path / 'tmp'
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv('TMPDIR', str(tmp))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp))
    return work, tmp


@pytest.mark.slow
def test_ants_syn_recovers_shift_and_bump_and_cleans_up(tmp_path, monkeypatch):
    require('ants_syn')
    from baselines import ants
    work, tmp = private_dirs(tmp_path, monkeypatch)
    fixed, moving, body, field = phantom()
    flow, seconds = ants.register_timed(fixed, moving)
    check_recovery(flow, fixed, moving, body, field)
    assert seconds > 0
    assert os.listdir(tmp) == [], 'ANTs left temp files behind'
    assert os.listdir(work) == [], 'ANTs wrote into the working directory'


@pytest.mark.slow
@pytest.mark.parametrize('affine', [False, True])
def test_elastix_recovers_shift_and_bump_and_cleans_up(affine, tmp_path, monkeypatch):
    require('elastix_affine_bspline' if affine else 'elastix_bspline')
    from baselines import elastix
    work, tmp = private_dirs(tmp_path, monkeypatch)
    fixed, moving, body, field = phantom()
    flow, seconds = elastix.register_timed(fixed, moving, affine=affine, max_iterations=64)
    check_recovery(flow, fixed, moving, body, field)
    assert seconds > 0
    assert os.listdir(tmp) == [], 'elastix left temp files behind'
    assert os.listdir(work) == [], 'elastix wrote into the working directory'


def test_registration_function_and_missing_report():
    assert set(baselines.METHODS) == {'identity', 'ants_syn', 'ants_syncc', 'elastix_bspline', 'elastix_affine_bspline'}
    assert baselines.missing('identity') is None
    flow, seconds = baselines.registration_function('identity')(np.zeros((4, 5, 6)), np.ones((4, 5, 6)))
    assert flow.shape == (4, 5, 6, 3) and flow.dtype == np.float32 and not flow.any() and seconds >= 0
    with pytest.raises(ValueError, match='unknown baseline'):
        baselines.missing('demons')
    for method in baselines.METHODS:
        reason = baselines.missing(method)
        assert reason is None or 'not installed' in reason


def test_isolated_registration_gives_the_in_process_result():
    fixed, moving = np.zeros((4, 5, 6), np.float32), np.ones((4, 5, 6), np.float32)
    with baselines.Isolated(*baselines.target('identity')) as register:
        flow, seconds = register(fixed, moving)
        again, _ = register(fixed, moving)
    expected, _ = baselines.registration_function('identity')(fixed, moving)
    np.testing.assert_array_equal(flow, expected)
    np.testing.assert_array_equal(again, expected)
    assert flow.dtype == np.float32 and seconds >= 0


def test_sigterm_during_a_registration_stops_at_once_and_leaves_no_file(tmp_path):
    """A library call that does not return (ANTs SyNCC takes ~20 minutes per pair) no longer
    holds a SIGTERM back: the script ends with one line within seconds, the child process is
    gone and the temporary file it wrote is removed with its directory."""
    code = ('import sys, numpy as np, cli, baselines; sys.path.insert(0, "tests")\n'
            'def main():\n'
            '    with baselines.Isolated("stalled_registration", {}) as register:\n'
            '        register(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))\n'
            'cli.run(main)\n')
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, TMPDIR=str(tmp_path)))
    line = proc.stdout.readline()
    assert line.startswith('pid '), line + proc.stderr.read()
    _, pid, _, _, temp_file = line.split(' ', 4)
    temp_file = temp_file.strip()
    assert int(pid) != proc.pid
    assert os.path.exists(temp_file) and temp_file.startswith(str(tmp_path))
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == 'error: interrupted', err
    assert not os.path.exists(temp_file) and os.listdir(tmp_path) == []


def test_missing_package_is_reported(monkeypatch):
    monkeypatch.setattr(baselines, 'installed', lambda package: False)
    assert baselines.missing('ants_syn') == 'antspyx not installed (pip install -r requirements-baselines.txt)'
    assert baselines.missing('elastix_bspline') == 'itk-elastix not installed (pip install -r requirements-baselines.txt)'


def test_shape_mismatch_is_refused():
    require('ants_syn')
    from baselines import ants
    with pytest.raises(ValueError, match='one shape'):
        ants.register(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))
