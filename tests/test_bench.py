"""The benchmark scripts run end to end at a small size (their numbers are not checked here:
timings belong in the benchmarks' own tables, not in tests)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import LPBA40, ROOT


@pytest.mark.parametrize('module,args,rows', [
    ('bench.train_step', ['--size', '64', '--steps', '2', '--warmup', '0', '--configs', 'aldk'], 1),
    ('bench.inference', ['--size', '64', '--cascades', '1', '--repeats', '1', '--warmup', '0',
                         '--networks', 'student'], 1),
    ('bench.warp', ['--size', '16'], 8),  # 4 cases x (fwd, fwd+bwd)
])
def test_benchmark_prints_its_table(module, args, rows):
    proc = subprocess.run([sys.executable, '-m', module] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('|')]
    assert len(table) == 2 + rows, proc.stdout  # header, rule and the rows
    assert all('nan' not in row for row in table), proc.stdout


@pytest.mark.slow
def test_cold_start_benchmark_prints_its_tables():
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    proc = subprocess.run([sys.executable, '-m', 'bench.cold_start', '--repeats', '1', '--warmup', '0',
                           '--network_repeats', '1', '--profile', '2', '--outputs', 'warped'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split('|')[1].strip() for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert rows == ['runtime', 'onnxruntime', 'tensorflow', 'runtime', 'tensorflow', 'onnxruntime', 'kind',
                    'convolution', 'transposed convolution', 'gather (the warp)', 'resize (flow upsampling)', 'other',
                    'total'], proc.stdout
    totals = [float(cell) for cell in proc.stdout.splitlines()[-1].split('|')[2:4]]
    assert all(total > 0 for total in totals), proc.stdout
    assert 'nan' not in proc.stdout


def test_batch_benchmark_prints_a_row_per_outputs_choice(tmp_path):
    """Two LPBA40 pairs per choice; the rows name their choice and hold finite figures."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    proc = subprocess.run([sys.executable, '-m', 'bench.batch', '--pairs', '2', '--outputs', 'warped', 'warped,field',
                           '--json', str(tmp_path / 'rows.json')], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split('|')[1].strip() for line in proc.stdout.splitlines() if line.startswith('| ')]
    assert rows == ['--outputs', 'warped', 'warped,field'], proc.stdout
    assert 'nan' not in proc.stdout
    assert [row['pairs'] for row in json.loads((tmp_path / 'rows.json').read_text())] == [2, 2]
