"""train.py -> checkpoint -> eval.py end to end, and one-line errors on bad input (resuming: test_reliability.py)."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from data_util.dataset import Dataset
from tests.conftest import error_lines, run_script


def _dice_before(spec, subset):
    ds = Dataset(spec)
    out = []
    for b in ds.generator(subset, batch_size=1):
        a, c = b['seg1'] > 128, b['seg2'] > 128
        out.append(2 * np.sum(a & c) / (np.sum(a) + np.sum(c)))
    return float(np.mean(out))


@pytest.mark.slow
def test_train_then_eval_improves_dice(synthetic_spec, tmp_path):
    run = run_script('train.py', '-b', 'LDR', '-n', '1', '-d', synthetic_spec, '--batch', '1', '--round', '200',
                     '--epochs', '1', '--lr', '1e-3', '--output', 'e2e', '--val_steps', '0', '--print_steps', '50',
                     '--save_steps', '100', '--seed', '1', cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'step 200/200' in run.stdout
    run_dir = tmp_path / 'weights' / 'e2e'
    assert (run_dir / 'model-200.index').exists() and (run_dir / 'args.json').exists()
    assert list((tmp_path / 'logs' / 'e2e').iterdir()), 'no TensorBoard events written'

    ev = run_script('eval.py', '-c', run_dir, '-v', 'val,test', cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert '\r' not in ev.stderr  # no progress bar redrawn into a pipe
    for subset in ('val', 'test'):
        result = json.loads((tmp_path / 'evaluate' / 'e2e-200-{}.json'.format(subset)).read_text())
        assert len(result['pairs']) == 2 and result['parameters'] > 0
        before = _dice_before(synthetic_spec, subset)
        after = result['summary']['dice']['mean']
        print(subset, 'Dice before', before, 'after', after)
        assert after > before + 0.02
        text = (tmp_path / 'evaluate' / 'e2e-200-{}.txt'.format(subset)).read_text()
        assert 'Summary' in text and 'Dice score:' in text

    again = run_script('eval.py', '-c', run_dir, '-v', 'val', cwd=tmp_path)
    assert again.returncode != 0 and 'exists' in error_lines(again)[-1]


def _corrupt(spec, tmp_path):
    h5 = os.path.join(os.path.dirname(spec), 'synthetic.h5')
    bad_dir = tmp_path / 'bad'
    bad_dir.mkdir()
    shutil.copy(spec, bad_dir / 'synthetic.json')
    (bad_dir / 'synthetic.h5').write_bytes(b'not an hdf5 file at all' * 100)
    return h5, str(bad_dir / 'synthetic.json')


def _bad_cases(spec, tmp_path):
    h5, corrupt_spec = _corrupt(spec, tmp_path)
    missing = json.loads(open(spec).read())
    missing['files']['synthetic']['path'] = h5
    missing['subsets']['train'].append('synthetic/s999')
    (tmp_path / 'missing_scan.json').write_text(json.dumps(missing))
    nofile = dict(missing, files={'synthetic': {'path': str(tmp_path / 'nowhere.h5'), 'type': 'HDF5'}})
    (tmp_path / 'no_file.json').write_text(json.dumps(nofile))
    small = tmp_path / 'small.h5'
    with h5py.File(small, 'w') as f:
        for i in range(3):
            f.create_dataset('s%d/volume' % i, data=np.zeros((32, 32, 32), np.uint8))
    (tmp_path / 'small.json').write_text(json.dumps({
        'files': {'s': {'path': str(small), 'type': 'HDF5'}}, 'image_size': [64, 64, 64], 'image_type': 'liver',
        'subsets': {'train': ['s/s0', 's/s1', 's/s2']}, 'schemes': {'1': {'train': 1.0}}}))
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / 'args.json').write_text('{"base_network": "LDR", "n_cascades": 1, "image_size": [64,64,64]}')
    (tmp_path / 'ckpt' / 'model-5.index').write_bytes(b'garbage')
    (tmp_path / 'ckpt' / 'model-5.data-00000-of-00001').write_bytes(b'garbage')
    common = ['--round', '1', '--epochs', '1', '--batch', '1', '--debug']
    return [
        (['-d', str(tmp_path / 'no_file.json')] + common, 'nowhere.h5'),
        (['-d', corrupt_spec] + common, 'synthetic.h5'),
        (['-d', str(tmp_path / 'missing_scan.json')] + common, 's999'),
        (['-d', str(tmp_path / 'small.json')] + common, 'shape'),
        (['-b', 'ResNet', '-d', spec] + common, 'ResNet'),
        (['-g', 'zero', '-d', spec] + common, '-g'),
        (['-c', str(tmp_path / 'ckpt'), '-d', spec] + common, 'model-5'),
        (['-d', spec, '--net_args', 'affine=__import__("os")'] + common, '--net_args'),
    ]


def test_bad_input_gives_one_line_error(synthetic_spec, tmp_path):
    for args, culprit in _bad_cases(synthetic_spec, tmp_path):
        proc = run_script('train.py', '-b', 'LDR', *args, cwd=tmp_path) if '-b' not in args else \
            run_script('train.py', *args, cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith('error: ') and culprit in lines[0], (args, lines)
        assert not (tmp_path / 'weights').exists()


def test_eval_bad_checkpoint_and_subset(synthetic_spec, tmp_path):
    proc = run_script('eval.py', '-c', tmp_path / 'nope', '-d', synthetic_spec, cwd=tmp_path)
    assert proc.returncode == 2 and error_lines(proc)[0].startswith('error: checkpoint not found')


def test_learning_rate_schedule_warm_up_then_step_decay():
    """lr x (step + 1) / warmup for the first --warmup steps, then x1 for 3 epochs and halving per
    epoch; without --warmup the first step already has the full rate."""
    import argparse
    import train
    args = argparse.Namespace(lr=1e-3, round=100, finetune=None, warmup=10)
    rates = [train.learning_rate(args, step) for step in (0, 4, 9, 10, 299, 300, 450, 10 ** 6)]
    assert np.allclose(rates, [1e-4, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4, 1e-3 / 64])
    args.warmup = None
    assert train.learning_rate(args, 0) == 1e-3
