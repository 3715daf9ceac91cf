"""Test-wide setup: the project root on sys.path, oneDNN on, and the shared data location."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')

SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
LPBA40 = os.path.join(SHARED, 'data', 'LPBA40')

import subprocess  # noqa: E402

import pytest  # noqa: E402


def run_script(script, *args, cwd, timeout=900):
    """Run one of the project's scripts (train.py, eval.py, ...) as a user would, in ``cwd``.

    Returns the CompletedProcess (text stdout/stderr).
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
    """The stderr lines a failed run printed, without TensorFlow's start-up noise."""
    return [line for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith(('WARNING: All log messages', 'I0000', 'W0000', 'network.ops: compiling',
                                                     'To enable the following instructions'))]


@pytest.fixture(scope='session')
def tiny_run(synthetic_spec, tmp_path_factory):
    """A 2-step LDR run at 64^3 on the synthetic set: a model to test plumbing with, not accuracy."""
    directory = tmp_path_factory.mktemp('tiny')
    proc = run_script('train.py', '-b', 'LDR', '-n', '1', '-d', synthetic_spec, '--round', '2', '--epochs', '1',
                      '--batch', '1', '--output', 'tiny', '--val_steps', '0', cwd=directory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return directory / 'weights' / 'tiny'


@pytest.fixture(scope='session')
def synthetic_spec(tmp_path_factory):
    """A small synthetic liver-like data set at 64^3 (8 train, 2 val, 2 test scans): spec path."""
    from data_util.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp('synthetic')), n_scans=12, image_size=64, seed=0)
