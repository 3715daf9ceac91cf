"""One truth for accuracy on real brains: eval.py and predict.py measure the same Dice.

A small LPBA40 set is converted as `--lpba40` does (fixed 192 mm field of view, no label map
deciding any crop), an LDR model is trained briefly on it, and every test pair is then
registered twice: by eval.py from the HDF5 file, and by predict.py from the original NIfTI
files, as a user would. Both must report the Dice of the label maps on the fixed scan's own
1 mm grid, within 0.005 of each other.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import LPBA40, ROOT, run_script
from data_util import prepare

SIZE = 48
TEST_IDS = ('S02', 'S03')


def _paths(scan_id):
    image = os.path.join(LPBA40, 'fixed.nii.gz') if scan_id == 'S01' else os.path.join(
        LPBA40, 'test', scan_id + '.delineation.skullstripped.nii.gz')
    return image, os.path.join(LPBA40, 'label', scan_id + '.delineation.structure.label.nii.gz')


@pytest.mark.slow
def test_eval_and_predict_agree_on_the_original_grid(tmp_path):
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    assert prepare.main(['--lpba40', LPBA40, '--ids', 'S01,S02,S03,S11,S12,S13,S36', '--image_size', str(SIZE),
                         '--output', str(tmp_path / 'lpba.h5'), '--spec', str(tmp_path / 'lpba.json'), '--quiet']) == 0
    proc = run_script('train.py', '-b', 'LDR', '-n', '1', '-d', 'lpba.json', '--batch', '1', '--round', '150',
                      '--epochs', '1', '--lr', '1e-3', '--seed', '1', '--val_steps', '0', '--output', 'brain',
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = json.loads((tmp_path / 'weights' / 'brain' / 'args.json').read_text())
    assert args['preprocessing']['field_of_view'] == 192.0

    proc = run_script('eval.py', '-c', 'weights/brain', '-v', 'test', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = json.loads((tmp_path / 'evaluate' / 'brain-150-test.json').read_text())
    by_moving = {record['id2'].split('/')[1]: record for record in evaluated['pairs']}
    assert sorted(by_moving) == list(TEST_IDS)

    fixed, fixed_seg = _paths('S01')
    for scan_id in TEST_IDS:
        moving, moving_seg = _paths(scan_id)
        proc = run_script('predict.py', '-c', 'weights/brain', '--fixed', fixed, '--moving', moving,
                          '--fixed_seg', fixed_seg, '--moving_seg', moving_seg, '-o', scan_id, '--outputs', 'seg', cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads((tmp_path / scan_id / 'predict.json').read_text())
        record = by_moving[scan_id]
        assert record['overlap_on'] == 'original'
        assert report['preprocessing']['field_of_view'] == 192.0
        # the model moved the labels: the agreement below is not that of two identities
        assert abs(report['dice']['mean'] - report['dice']['mean_before']) > 0.01, report['dice']
        assert abs(record['dice'] - report['dice']['mean']) < 0.005, (scan_id, record['dice'], report['dice'])


SHIPPED = os.path.join(ROOT, 'models', 'lpba40-ldr')


def _shipped_metrics():
    with open(os.path.join(SHIPPED, 'metrics.json')) as f:
        return json.load(f)


@pytest.mark.slow
def test_shipped_model_registers_s02_to_s01_as_committed(tmp_path):
    """predict.py without -c uses models/lpba40-ldr; on S02 -> S01 its Dice on the 1 mm grid is
    the committed figure (models/lpba40-ldr/metrics.json) within 0.01, and it folds < 0.5 %."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    fixed, fixed_seg = _paths('S01')
    moving, moving_seg = _paths('S02')
    proc = run_script('predict.py', '--fixed', fixed, '--moving', moving, '--fixed_seg', fixed_seg,
                      '--moving_seg', moving_seg, '-o', 'out', '--outputs', 'seg', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / 'out' / 'predict.json').read_text())
    assert report['model']['source'] == SHIPPED and report['model']['kind'] == 'export'
    committed = _shipped_metrics()['predict']['S02']['dice']
    assert report['dice']['mean'] >= committed - 0.01, (report['dice']['mean'], committed)
    assert report['folding'] < 0.005


@pytest.mark.slow
def test_eval_of_the_shipped_export_recomputes_the_committed_record(tmp_path):
    """eval.py -c models/lpba40-ldr on S02 -> S01, converted as the preset converts LPBA40, gives
    the pair's Dice and folding of results/lpba40's evaluation of the run it was exported from."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    assert prepare.main(['--lpba40', LPBA40, '--ids', 'S01,S02', '--output', str(tmp_path / 'lpba.h5'),
                         '--spec', str(tmp_path / 'lpba.json'), '--quiet']) == 0
    proc = run_script('eval.py', '-c', SHIPPED, '-d', 'lpba.json', '-v', 'test', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pair,) = json.loads((tmp_path / 'evaluate' / 'lpba40-ldr-export-test.json').read_text())['pairs']
    with open(os.path.join(ROOT, 'results', 'lpba40', 'evaluate', 'ldr-1-s1-6000-test.json')) as f:
        committed = {record['id2']: record for record in json.load(f)['pairs']}['lpba/S02']
    assert (pair['id1'], pair['id2']) == (committed['id1'], committed['id2']) == ('lpba/S01', 'lpba/S02')
    assert pair['overlap_on'] == 'original'
    assert pair['dice'] == pytest.approx(committed['dice'], abs=1e-3)
    assert pair['folding'] == pytest.approx(committed['folding'], abs=1e-4)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    """The README's 'From Python' block, run in a directory holding fixed.nii.gz and moving.nii.gz."""
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {} (tests/conftest.py LPBA40)'.format(LPBA40))
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    section = readme.split('### From Python', 1)[1]
    code = section.split('```python', 1)[1].split('```', 1)[0]
    os.symlink(_paths('S01')[0], tmp_path / 'fixed.nii.gz')
    os.symlink(_paths('S02')[0], tmp_path / 'moving.nii.gz')
    proc = subprocess.run([sys.executable, '-c', code + '\nprint("folding", result.report["folding"])'],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / 'warped.nii.gz').exists() and 'folding' in proc.stdout
