"""The benchmark scripts run end to end at a small size (their numbers are not checked here:
timings belong in the benchmarks' own tables, not in tests)."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize('module,args', [
    ('bench.train_step', ['--size', '64', '--steps', '2', '--warmup', '0', '--configs', 'aldk']),
    ('bench.inference', ['--size', '64', '--cascades', '1', '--repeats', '1', '--warmup', '0',
                         '--networks', 'student']),
    ('bench.warp', ['--size', '16']),
])
def test_benchmark_prints_its_table(module, args):
    proc = subprocess.run([sys.executable, '-m', module] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('|')]
    rows = 8 if module == 'bench.warp' else 1  # warp: 4 cases x (fwd, fwd+bwd); else the configuration's
    assert len(table) == 2 + rows, proc.stdout  # header, rule and the rows
    assert all('nan' not in row for row in table), proc.stdout
