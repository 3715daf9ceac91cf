"""Kill and resume, half-written checkpoints, the non-finite loss guard of train.py, and progress output in logs."""
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cli
import runs
from tests.conftest import ROOT, error_lines, run_script


def test_half_written_checkpoint_is_ignored(tmp_path):
    for step in (5, 10):
        (tmp_path / 'model-{}.index'.format(step)).write_bytes(b'i')
        (tmp_path / 'model-{}.data-00000-of-00001'.format(step)).write_bytes(b'd')
    (tmp_path / 'model-5.complete').write_text('5\n')  # step 10 was interrupted before its marker
    assert runs.list_checkpoints(str(tmp_path)) == {5: str(tmp_path / 'model-5')}
    assert runs.resolve_checkpoint(str(tmp_path))[2] == 5


def test_unmarked_checkpoints_of_the_original_code_still_count(tmp_path):
    (tmp_path / 'model-7.index').write_bytes(b'i')
    (tmp_path / 'model-7.data-00000-of-00001').write_bytes(b'd')
    assert list(runs.list_checkpoints(str(tmp_path))) == [7]


def test_progress_into_a_log_is_plain_lines(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, 'stderr', log)
    with cli.progress(3, 'evaluating val', 'pair', log_interval=0) as bar:
        for _ in range(3):
            bar.update()
    lines = log.getvalue().splitlines()
    assert '\r' not in log.getvalue()
    assert lines[0].startswith('evaluating val:   0%') and lines[-1].startswith('evaluating val: 100%')
    assert all(line.strip() for line in lines)


def test_progress_is_silent_when_off_or_quick(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, 'stderr', log)
    with cli.progress(2, 'prepare', 'scan', enabled=False, log_interval=0) as bar:
        bar.update(2)
    with cli.progress(2, 'prepare', 'scan') as bar:  # done within the default 30 s
        bar.update(2)
    assert log.getvalue() == ''


def test_non_finite_loss_names_step_and_terms():
    sys.path.insert(0, ROOT)
    import train
    with pytest.raises(cli.UserError) as e:
        train.check_finite({'loss': float('nan'), 'similarity': float('inf'), 'det': 0.1, 'grad_norm': 1.0}, 12, None)
    message = str(e.value)
    assert 'step 12' in message and 'loss=nan' in message and 'similarity=inf' in message and 'det' not in message


@pytest.mark.slow
def test_exploding_training_stops_with_one_line_and_keeps_checkpoints(synthetic_spec, tmp_path):
    proc = run_script('train.py', '-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '40', '--epochs', '1',
                      '--lr', '1e30', '--output', 'boom', '--val_steps', '0', '--save_steps', '1', cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and 'non-finite' in lines[0], proc.stderr[-2000:]
    kept = runs.list_checkpoints(str(tmp_path / 'weights' / 'boom'))
    assert 'last good checkpoint' in lines[0] and kept and max(kept) < 40


def _train_then_kill(tmp_path, run, step, flags):
    """Start train.py --output RUN with flags, SIGKILL it once model-STEP is complete; the run dir."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--output', run] + flags
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = tmp_path / 'weights' / run
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / 'model-{}.complete'.format(step)).exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run_dir


@pytest.mark.slow
def test_kill_9_then_resume_continues_from_the_newest_complete_checkpoint(synthetic_spec, tmp_path):
    run_dir = _train_then_kill(tmp_path, 'killed', 6, [
        '-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '1000', '--epochs', '1', '--val_steps', '0',
        '--save_steps', '3', '--print_steps', '1', '--seed', '2'])
    kept = runs.list_checkpoints(str(run_dir))
    assert kept and min(kept) >= 3, 'no complete checkpoint before the kill'
    newest = max(kept)
    resumed = run_script('train.py', '-c', run_dir, '--epochs', str((newest + 2) / 1000), '--round', '1000',
                         '--val_steps', '0', '--print_steps', '1', '--save_steps', '1000', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'at step {}'.format(newest) in resumed.stdout
    assert 'step {}/{}'.format(newest + 1, newest + 2) in resumed.stdout
    assert (run_dir / 'model-{}.complete'.format(newest + 2)).exists()


@pytest.mark.slow
def test_bare_resume_keeps_every_setting_of_the_run(synthetic_spec, tmp_path):
    """A run started with non-default flags, killed, and resumed with -c alone goes on with its
    own batch, schedule, learning rate and its warm-up, seed and checkpoint interval (not train.py's
    defaults)."""
    run_dir = _train_then_kill(tmp_path, 'settings', 4, [
        '-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '200', '--epochs', '0.05', '--lr', '5e-4',
        '--warmup', '20',
        '--val_steps', '0', '--save_steps', '4', '--print_steps', '1', '--seed', '3', '--no_augment'])
    env = dict(os.environ, PYTHONPATH=ROOT)
    newest = max(runs.list_checkpoints(str(run_dir)))
    assert newest in (4, 8), newest
    resumed = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '-c', str(run_dir)], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in resumed.stdout:
        lines.append(line)
        if line.startswith('step '):
            break
    if resumed.poll() is None and 'step {}/10 '.format(newest + 1) not in lines[-1]:
        resumed.kill()          # the defaults would train for 100,000 steps
    resumed.wait(timeout=300)
    assert 'step {}/10 '.format(newest + 1) in lines[-1], lines
    assert 'lr {:.2e}'.format(5e-4 * (newest + 1) / 20) in lines[-1], lines[-1]   # still warming up
    assert resumed.returncode == 0
    stored = json.loads((run_dir / 'args.json').read_text())
    assert (stored['batch'], stored['round'], stored['epochs'], stored['save_steps'], stored['seed'],
            stored['lr'], stored['warmup'], stored['no_augment']) == (1, 200, 0.05, 4, 3, 5e-4, 20, True)
    assert sorted(runs.list_checkpoints(str(run_dir)))[-1] == 10


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_in_training_and_is_named_elsewhere(synthetic_spec, tmp_path):
    proc = run_script('train.py', '-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '4', '--epochs', '1',
                      '--output', 'damaged', '--val_steps', '0', '--save_steps', '2', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / 'weights' / 'damaged'
    data = next(run_dir.glob('model-4.data-*'))
    data.write_bytes(data.read_bytes()[:100])                          # truncated
    for script, args in (('eval.py', ['-v', 'test']), ('predict.py', ['--export', 'exported'])):
        failed = run_script(script, '-c', run_dir, *args, cwd=tmp_path)
        lines = error_lines(failed)
        assert failed.returncode == 2 and len(lines) == 1, failed.stderr[-2000:]
        assert 'model-4 is damaged' in lines[0] and 'Traceback' not in failed.stderr
    resumed = run_script('train.py', '-c', run_dir, '--epochs', '1.5', '--print_steps', '1', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'model-4 is damaged' in resumed.stderr and 'trying the one before' in resumed.stderr
    assert 'model-2 at step 2' in resumed.stdout and 'Read less bytes than requested' in resumed.stderr
    assert 'step 3/6' in resumed.stdout
    assert (run_dir / 'model-6.complete').exists()


def _hold_lock(path):
    """A child process owning ``path`` through cli.exclusive_output until killed; returns it once it owns it."""
    code = ('import sys, time; sys.path.insert(0, {root!r}); import cli\n'
            'with cli.exclusive_output({path!r}):\n'
            '    print("owned", flush=True)\n'
            '    time.sleep(600)\n').format(root=ROOT, path=str(path))
    child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == 'owned'
    return child


def test_an_output_has_one_owner_and_a_dead_owner_does_not_block(tmp_path):
    child = _hold_lock(tmp_path / 'out')
    try:
        with pytest.raises(cli.UserError, match='in use by another process \\(pid {}\\)'.format(child.pid)):
            with cli.exclusive_output(str(tmp_path / 'out')):
                pass
    finally:
        child.kill()
        child.wait()
    with cli.exclusive_output(str(tmp_path / 'out')):     # the kernel released the dead owner's lock
        assert (tmp_path / '.out.lock').read_text().strip() == str(os.getpid())
    assert not (tmp_path / '.out.lock').exists()


@pytest.mark.slow
@pytest.mark.parametrize('script', ['train.py', 'predict.py', 'prepare'])
def test_second_process_on_the_same_output_is_refused_naming_the_owner(script, synthetic_spec, tmp_path):
    target = {'train.py': tmp_path / 'weights' / 'same', 'predict.py': tmp_path / 'out',
              'prepare': tmp_path / 'new.h5'}[script]
    target.parent.mkdir(exist_ok=True)
    child = _hold_lock(target)
    try:
        if script == 'train.py':
            proc = run_script('train.py', '-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '1',
                              '--epochs', '1', '--output', 'same', cwd=tmp_path)
        elif script == 'predict.py':
            proc = run_script('predict.py', '-c', 'none', '--fixed', 'a.nii.gz', '--moving', 'b.nii.gz',
                              '-o', 'out', cwd=tmp_path)
        else:
            import SimpleITK as sitk
            image = np.zeros((12, 12, 12), np.float32)
            image[3:9, 3:9, 3:9] = 100
            sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / 'scan.nii.gz'))
            proc = subprocess.run([sys.executable, '-m', 'data_util.prepare', '--images', str(tmp_path / 'scan.nii.gz'),
                                   '--output', str(target), '--image_size', '8'], cwd=ROOT, capture_output=True,
                                  text=True)
    finally:
        child.kill()
        child.wait()
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert 'in use by another process (pid {})'.format(child.pid) in lines[0], lines
    assert not (tmp_path / 'logs').exists() and not any(p.name == 'same' for p in tmp_path.rglob('same'))


@pytest.mark.slow
def test_sigterm_stops_training_at_a_step_boundary_with_a_checkpoint(synthetic_spec, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '-b', 'LDR', '-d', synthetic_spec, '--batch', '1',
           '--round', '100000', '--epochs', '1', '--output', 'term', '--val_steps', '0', '--print_steps', '1',
           '--save_steps', '100000']
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith('step 3/'):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith('error')]
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in err, err[-2000:]
    step = int(lines[0].split('stopped by SIGTERM at step ')[1].split(';')[0])
    assert step >= 3 and 'checkpoint saved, resume with python train.py -c' in lines[0]
    assert max(runs.list_checkpoints(str(tmp_path / 'weights' / 'term'))) == step


@pytest.mark.slow
def test_sigterm_during_conversion_leaves_nothing_behind(tmp_path):
    from conftest import LPBA40
    if not os.path.isdir(LPBA40):
        pytest.skip('LPBA40 data absent at {}'.format(LPBA40))
    proc = subprocess.Popen([sys.executable, '-m', 'data_util.prepare', '--lpba40', LPBA40, '--output',
                             str(tmp_path / 'lpba.h5'), '--spec', str(tmp_path / 'lpba.json')], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob('.lpba.h5.*.tmp')):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines() == ['error: interrupted; nothing was written'], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _logged_losses(log_dir):
    """{step: loss} of a run's TensorBoard events; a step logged twice (before and after a kill)
    keeps its later value."""
    from network.tfv1 import tf
    losses = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), 'events.*'))):
        for event in tf.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == 'loss':
                    losses[event.step] = value.simple_value
    return losses


@pytest.mark.slow
def test_resumed_run_follows_the_uninterrupted_loss_curve(synthetic_spec, tmp_path):
    """Killed at step 6 and resumed with -c alone, a run with augmentation (deformations and
    contrast) draws the pairs, deformations and contrasts the uninterrupted run drew (data order
    and augmentation replayed from the seed and the step): the losses of steps 7..12 agree within
    float tolerance."""
    flags = ['-b', 'LDR', '-d', synthetic_spec, '--batch', '1', '--round', '12', '--epochs', '1', '--val_steps', '0',
             '--save_steps', '6', '--print_steps', '1', '--seed', '5', '--lr', '3e-4', '--augment_gamma', '1.5']
    straight = run_script('train.py', *flags, '--output', 'straight', cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    run_dir = _train_then_kill(tmp_path, 'cut', 6, flags)
    assert max(runs.list_checkpoints(str(run_dir))) in (6, 12)
    if max(runs.list_checkpoints(str(run_dir))) == 6:
        resumed = run_script('train.py', '-c', run_dir, cwd=tmp_path)
        assert resumed.returncode == 0 and 'at step 6' in resumed.stdout, resumed.stderr[-2000:]
    expected, got = _logged_losses(tmp_path / 'logs' / 'straight'), _logged_losses(tmp_path / 'logs' / 'cut')
    assert sorted(expected) == sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(7, 13)], [expected[s] for s in range(7, 13)], rtol=2e-3)
    assert len({round(expected[s], 4) for s in range(7, 13)}) > 1      # the steps differ: a real curve


def test_results_get_the_permissions_of_a_plain_write(tmp_path):
    """Written through a temp file (mkstemp: 0600) but left as open() would leave them under the umask."""
    previous = os.umask(0o022)
    try:
        cli.write_json(str(tmp_path / 'result.json'), {'dice': 0.7})
    finally:
        os.umask(previous)
    assert (tmp_path / 'result.json').stat().st_mode & 0o777 == 0o644
