"""ALDK: gradient flow of the alternating updates, the gradient penalty, teacher flows online and
offline, the student-only inference graph, and one-line errors for bad inputs.

A module fixture writes 6 synthetic 64^3 scans and trains a tiny VTN teacher (VTN affine stem +
one VTN cascade of width 4) for two steps with train.py; it only has to be a VTN RCN checkpoint.
The comparison "ALDK lowers the student's flow error to the teacher vs no distillation" needs a
trained teacher and hundreds of steps: ``test_aldk_lowers_flow_error_to_teacher`` (marked full).
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import cli
import runs
from conftest import ROOT
from data_util.dataset import Dataset
from data_util.flow_store import FlowStore, FlowStoreError, FlowStoreWriter, pair_key
from data_util.synthetic import make_synthetic
from network.aldk import Critic, DistillFramework, Teacher, gradient_penalty
from network.cascade import make_net_args
from network.module import count_parameters
from network.refine import Refiner
from network.tfv1 import tf

SIZE = [64, 64, 64]
TEACHER_NET = "channels=4"


def _script(name, args, cwd, wait=True, timeout=600):
    """Run a project script as a subprocess (cwd = the test's temp dir, where outputs go)."""
    cmd = [sys.executable, os.path.join(ROOT, name)] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _finish(proc, timeout) if wait else proc


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _ok(result):
    code, out, err = result
    assert code == 0, err[-3000:]
    return out


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """Temp dir with data/synthetic.json (6 scans: train 2, val 2, test 2) and weights/teacher."""
    root = tmp_path_factory.mktemp('aldk')
    spec = make_synthetic(str(root / 'data'), n_scans=6, n_val=2, n_test=2)
    _ok(_script('train.py', ['-b', 'VTN', '-n', 1, '--net_args', TEACHER_NET, '-d', spec, '--batch', 1,
                             '--round', 2, '--epochs', 1, '--output', 'teacher', '--val_steps', 0, '--seed', 0], root))
    return root


def _teacher_prefix(work):
    return runs.resolve_checkpoint(str(work / 'weights' / 'teacher'))[1]


def _batch(work, subset='val', index=0):
    dataset = Dataset(str(work / 'data' / 'synthetic.json'), batch_size=1)
    return list(dataset.generator(subset, batch_size=1))[index]


@pytest.fixture(scope='module')
def online(work):
    """An ALDK graph with gamma = 0 (the student loss is the adversarial term alone), its teacher
    restored from the fixture checkpoint, no augmentation; yields (session, framework, teacher)."""
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(0)
        teacher = Teacher(make_net_args('VTN', 1, extra={'channels': 4}), _teacher_prefix(work), SIZE)
        fw = DistillFramework(make_net_args('LDR', 1), SIZE, teacher=teacher, augment=False, gamma=0.0,
                              critic_every=2)
        sess = tf.Session(graph=graph)
        sess.run(tf.global_variables_initializer())
        teacher.restore(sess)
        yield sess, fw, teacher
        sess.close()


def _values(sess, variables):
    return dict(zip([v.op.name for v in variables], sess.run(variables)))


def _changed(before, after):
    return sorted(k for k in before if not np.array_equal(before[k], after[k]))


def test_train_parses_the_distillation_defaults_without_tensorflow():
    """train.py's distillation flags default to network.aldk_config's DistillSettings (as
    DistillFramework does), and its parser is built and run without importing TensorFlow."""
    code = ('import dataclasses, sys, train; from network.aldk_config import DistillSettings; '
            'args = vars(train.build_parser().parse_args(["--aldk"])); '
            'print({f.name: args[f.name] for f in dataclasses.fields(DistillSettings)} '
            '== dataclasses.asdict(DistillSettings()), "tensorflow" in sys.modules)')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ['True', 'False'], proc.stdout + proc.stderr[-2000:]


def test_optimisers_have_disjoint_var_lists_and_the_teacher_is_in_none(online):
    _, fw, teacher = online
    with fw.net.variables[0].graph.as_default():
        student, critic, frozen = set(fw.net.trainable_variables), set(fw.critic.trainable_variables), set(
            teacher.variables)
        assert student and critic and frozen
        assert not frozen & set(tf.trainable_variables())
        every = tf.global_variables()
        student_slots = {v for v in every if fw.optimizer.get_slot(v, 'm') is not None}
        critic_slots = {v for v in every if fw.critic_optimizer.get_slot(v, 'm') is not None}
        assert student_slots == student and critic_slots == critic
        saved = set(fw.net.variables) | set(fw.training_state)
        assert set(fw.critic.variables) <= saved and not frozen & saved


def test_student_step_moves_the_student_through_the_adversarial_term_alone(online, work):
    sess, fw, teacher = online
    groups = {'student': fw.net.trainable_variables, 'critic': fw.critic.trainable_variables,
              'teacher': teacher.variables}
    batch = _batch(work)
    before = {k: _values(sess, v) for k, v in groups.items()}
    res = fw.student_step(sess, batch, 1e-3)
    after = {k: _values(sess, v) for k, v in groups.items()}
    # gamma = 0: the loss is the adversarial term -mean D(phi_d) and nothing else
    assert res['loss'] == pytest.approx(res['adversarial'], rel=1e-6) and res['grad_norm'] > 0
    assert len(_changed(before['student'], after['student'])) == len(groups['student'])
    assert _changed(before['critic'], after['critic']) == []
    assert _changed(before['teacher'], after['teacher']) == []

    res = fw.critic_step(sess, batch, 1e-3)
    assert res['critic_grad_norm'] > 0 and np.isfinite(res['critic_loss'])
    final = {k: _values(sess, v) for k, v in groups.items()}
    assert len(_changed(after['critic'], final['critic'])) == len(groups['critic'])
    assert _changed(after['student'], final['student']) == []
    assert _changed(after['teacher'], final['teacher']) == []


def test_schedule_updates_the_critic_every_kth_step(online, work):
    sess, fw, _ = online
    batch = _batch(work)
    critic_updates = []
    for _ in range(4):
        step = int(sess.run(fw.global_step))
        before = _values(sess, fw.critic.trainable_variables)
        res = fw.train_step(sess, batch, 1e-4)
        critic_updates.append((step, bool(_changed(before, _values(sess, fw.critic.trainable_variables)))))
        assert {'loss', 'critic_loss', 'wasserstein', 'gradient_penalty', 'teacher_epe'} <= set(res)
    assert critic_updates == [(s, s % 2 == 0) for s, _ in critic_updates]
    assert [s for s, _ in critic_updates] == list(range(critic_updates[0][0], critic_updates[0][0] + 4))


def _conv_same_stride2(x, w, b):
    """NumPy float64 reference of conv3d(k=4, stride 2, 'SAME') + bias: x [B,X,Y,Z,C], w [4,4,4,C,O]."""
    pads = []
    for n in x.shape[1:4]:
        total = max((-(-n // 2) - 1) * 2 + 4 - n, 0)
        pads.append((total // 2, total - total // 2))
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    win = np.lib.stride_tricks.sliding_window_view(xp, (4, 4, 4), axis=(1, 2, 3))[:, ::2, ::2, ::2]
    return np.einsum('bxyzcijk,ijkco->bxyzo', win, w) + b


def _critic_reference(x, weights, channels, slope):
    for i in range(len(channels)):
        x = _conv_same_stride2(x, weights['critic/conv%d/W' % (i + 1)], weights['critic/conv%d/b' % (i + 1)])
        x = np.where(x > 0, x, slope * x)
    return x.reshape(len(x), -1) @ weights['critic/linear/W'][:, 0]


def test_gradient_penalty_matches_numpy_finite_differences():
    rng = np.random.default_rng(0)
    shape, channels = (2, 8, 16, 8, 3), (2, 3)
    phi_t, phi_d = rng.standard_normal(shape), rng.standard_normal(shape) * 2
    alpha = np.array([0.3, 0.8])
    with tf.Graph().as_default():
        tf.set_random_seed(1)
        critic = Critic('critic', channels)  # default units: 'normalized'
        assert critic.units == 'normalized'
        ph = [tf.placeholder(tf.float32, shape) for _ in range(2)] + [tf.placeholder(tf.float32, [2])]
        gp, _ = gradient_penalty(critic, ph[0], ph[1], alpha=ph[2])
        weights = critic.trainable_variables
        grads = tf.gradients(gp, weights)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            for v in weights:  # larger weights than the init: gradient norms far from 1
                sess.run(v.assign(v * 3.0))
            feed = dict(zip(ph, [phi_t, phi_d, alpha]))
            gp_tf, grads_tf = sess.run([gp, grads], feed)
            values = _values(sess, weights)
            # second order (d GP / d weights, through the conv3d input gradient): directional derivative
            # along relative changes of the kernels (biases fixed), small enough that no LeakyReLU
            # changes side (the penalty jumps where one does)
            direction = [rng.standard_normal(v.shape.as_list()) * values[v.op.name] * v.op.name.endswith('/W')
                         for v in weights]
            eps = 1e-4
            probes = []
            for sign in (1, -1):
                sess.run([v.assign(values[v.op.name] + sign * eps * d) for v, d in zip(weights, direction)])
                probes.append(sess.run(gp, feed))
    slope = critic.slope
    # penalty units ('normalized'): displacement / half the extent of its axis / sqrt(X Y Z); the
    # network itself sees displacement / half the extent, i.e. the penalty units x sqrt(X Y Z)
    units = np.array([2 / 8, 2 / 16, 2 / 8]) / np.sqrt(8 * 16 * 8)
    phi_hat = (phi_t + alpha[:, None, None, None, None] * (phi_d - phi_t)) * units
    to_input = np.sqrt(8 * 16 * 8)
    ref = {k: v.astype(np.float64) for k, v in values.items()}
    h = 1e-5
    penalties = []
    for b in range(2):  # central differences of every input component, all in one batch
        steps = (np.eye(phi_hat[b].size) * h).reshape((-1,) + shape[1:])
        grad = (_critic_reference((phi_hat[b] + steps) * to_input, ref, channels, slope) -
                _critic_reference((phi_hat[b] - steps) * to_input, ref, channels, slope)) / (2 * h)
        penalties.append((np.linalg.norm(grad) - 1.0) ** 2)
    gp_ref = np.mean(penalties)
    assert gp_ref > 0.05 and abs(gp_tf - gp_ref) < 1e-4 * max(1.0, gp_ref)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(grads_tf, direction))
    numeric = (probes[0] - probes[1]) / (2 * eps)
    assert abs(analytic) > 1e-3 and abs(analytic - numeric) < 0.02 * abs(analytic)


def _in_process(script, argv, cwd, capsys):
    """Run ``script.main(argv)`` in a fresh graph with cwd = ``cwd``; returns its stdout."""
    previous = os.getcwd()
    os.chdir(str(cwd))
    try:
        capsys.readouterr()
        with tf.Graph().as_default():
            script.main([str(a) for a in argv])
        return capsys.readouterr().out
    finally:
        os.chdir(previous)


@pytest.fixture
def store(work, capsys):
    """eval.py --writing_flow of the teacher on scheme 1 (train, 2 pairs) and val (2 pairs),
    run in-process (the CLI contract of eval.py is checked by the bad-input test)."""
    import eval as eval_script
    path = work / 'flows.h5'
    if not path.exists():
        out = _in_process(eval_script, ['-c', 'weights/teacher', '--writing_flow', 'flows.h5', '-v', '1,val'], work,
                          capsys)
        assert '1: 2 teacher flows written, 0 already stored' in out
        assert 'val: 2 teacher flows written, 0 already stored' in out
    return str(path)


def test_writing_flow_round_trip_resume_and_online_agreement(work, store, online, capsys):
    import eval as eval_script
    batch = _batch(work, 'val', 1)
    pair = (batch['id1'][0], batch['id2'][0])
    sess, fw, _ = runs.load_framework(str(work / 'weights' / 'teacher'), SIZE)
    teacher_flow = fw.register(sess, batch)[0]
    sess.close()
    with FlowStore(store, SIZE) as flows:
        assert len(flows) == 4 and flows.has(*pair)
        stored = flows.flow(*pair)
    assert np.abs(teacher_flow).max() > 0.05
    assert np.all(np.abs(stored - teacher_flow) <= np.abs(teacher_flow) * 2.0 ** -10 + 1e-5)

    sess, fw_online, _ = online  # the online teacher's phi_t of the same un-augmented pair
    online_flow = sess.run(fw_online.tower_flows[0]['teacher'], fw_online.feed_dict(batch))[0]
    assert np.all(np.abs(stored - online_flow) <= np.abs(online_flow) * 2.0 ** -10 + 1e-5)

    # resume: a second run finds every pair stored and writes nothing
    out = _in_process(eval_script, ['-c', 'weights/teacher', '--writing_flow', 'flows.h5', '-v', 'val'], work, capsys)
    assert 'val: 0 teacher flows written, 2 already stored' in out


def test_writing_flow_with_refinement_stores_the_refined_flows(work, store, capsys):
    """--writing_flow --refine N stores each pair's teacher flow after N refinement iterations
    (the flow network.refine.Refiner gives from the teacher's), names them in the store's
    teacher, and refuses to add them to a store of unrefined flows."""
    import eval as eval_script
    out = _in_process(eval_script, ['-c', 'weights/teacher', '--writing_flow', 'refined.h5', '-v', 'val',
                                    '--refine', 5], work, capsys)
    assert 'val: 2 teacher flows written, 0 already stored' in out
    batch = _batch(work, 'val', 1)
    sess, fw, _ = runs.load_framework(str(work / 'weights' / 'teacher'), SIZE)
    network_flow = fw.register(sess, batch)[0]
    sess.close()
    args = eval_script.build_parser().parse_args(['-c', 'x', '--refine', '5'])
    refiner = Refiner(SIZE, **cli.refine_settings(args))
    refined, _ = refiner.refine(batch['voxel1'][0, ..., 0], batch['voxel2'][0, ..., 0], network_flow, 5)
    with FlowStore(str(work / 'refined.h5'), SIZE) as flows:
        assert 'refine=5(' in flows.teacher and 'factor=' in flows.teacher
        stored = flows.flow(batch['id1'][0], batch['id2'][0])
    assert np.abs(refined - network_flow).max() > 1e-3
    assert np.all(np.abs(stored - refined) <= np.abs(refined) * 2.0 ** -10 + 1e-4)
    with pytest.raises(FlowStoreError, match='holds flows of teacher'):
        _in_process(eval_script, ['-c', 'weights/teacher', '--writing_flow', 'flows.h5', '-v', 'val',
                                  '--refine', 5], work, capsys)


@pytest.fixture(scope='module')
def aldk_run(work):
    """A 2-step online ALDK run of a paper LDR student (its stdout)."""
    return _ok(_script('train.py', ['-b', 'LDR', '-d', 'data/synthetic.json', '--batch', 1, '--round', 2, '--epochs', 1,
                                    '--output', 'student', '--val_steps', 0, '--print_steps', 1, '--seed', 0,
                                    '--aldk', '--teacher', 'weights/teacher'], work))


def test_aldk_run_logs_both_losses_and_saves_no_teacher(work, aldk_run):
    progress = [line for line in aldk_run.splitlines() if line.startswith('step ')]
    assert len(progress) == 2
    for key in ('loss', 'adversarial', 'critic_loss', 'wasserstein', 'gradient_penalty', 'teacher_epe'):
        assert ' {} '.format(key) in progress[-1] or '({} '.format(key) in progress[-1], key
    prefix = runs.resolve_checkpoint(str(work / 'weights' / 'student'))[1]
    scopes = {name.split('/')[0] for name in tf.train.load_checkpoint(prefix).get_variable_to_shape_map()}
    assert {'rcn', 'critic', 'critic_optimizer', 'global_step'} <= scopes and 'teacher' not in scopes
    tags = set()
    for path in glob.glob(str(work / 'logs' / 'student' / 'events.*')):
        for event in tf.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {'loss', 'loss_adversarial', 'critic_loss', 'wasserstein', 'gradient_penalty', 'teacher_epe'} <= tags


def test_student_inference_graph_holds_only_the_student(work, aldk_run):
    sess, fw, _ = runs.load_framework(str(work / 'weights' / 'student'))
    with sess.graph.as_default():
        names = [v.op.name for v in tf.global_variables()]
    sess.close()
    assert 'global_step' in names and all(n.startswith('rcn/') for n in names if n != 'global_step')
    assert fw.parameter_count == count_parameters(fw.net.trainable_variables) < 3e6


def test_offline_run_skips_pairs_without_a_flow_and_turns_augmentation_off(work, store, capsys):
    import train as train_script
    partial = str(work / 'partial.h5')
    shutil.copy(store, partial)
    train_pairs = Dataset(str(work / 'data' / 'synthetic.json')).pairs(1)
    with h5py.File(partial, 'a') as f:
        del f[pair_key(*train_pairs[0])]
    out = _in_process(train_script, ['-b', 'LDR', '-d', 'data/synthetic.json', '--batch', 1, '--round', 2, '--epochs', 1,
                                     '--output', 'offline', '--val_steps', 0, '--print_steps', 1,
                                     '--distill', 'l2', '--pretrained_flow_path', partial], work, capsys)
    assert 'Teacher flows: 1 of 2 training pairs stored in {}; 1 pairs without a flow are skipped'.format(partial) in out
    assert 'augmentation off' in out and ' distill ' in out
    with open(str(work / 'weights' / 'offline' / 'args.json')) as f:
        assert json.load(f)['no_augment'] is True


def test_teacher_of_another_width_is_refused_at_restore(work):
    with tf.Graph().as_default():
        teacher = Teacher(make_net_args('VTN', 1, extra={'channels': 8}), _teacher_prefix(work), SIZE)
        x = tf.placeholder(tf.float32, [1] + SIZE + [1])
        teacher(x, x)
        with tf.Session() as sess:
            with pytest.raises(ValueError, match='does not fit a VTN RCN of its args.json: .* of another shape'):
                teacher.restore(sess)


def test_bad_inputs_end_in_one_error_line(work, aldk_run):
    bad_store = str(work / 'small.h5')
    with FlowStoreWriter(bad_store, [32, 32, 32, 3], 'x') as w:
        w.write('synthetic/s000', 'synthetic/s001', np.zeros([32, 32, 32, 3]))
    liar = work / 'weights' / 'liar'  # an LDR checkpoint whose args.json claims a VTN RCN
    shutil.copytree(str(work / 'weights' / 'student'), str(liar))
    with open(str(liar / 'args.json')) as f:
        args = json.load(f)
    args.update(base_network='VTN', net_args='')
    with open(str(liar / 'args.json'), 'w') as f:
        json.dump(args, f)
    train = ['train.py', '-b', 'LDR', '-d', 'data/synthetic.json', '--round', 1, '--epochs', 1, '--debug']
    cases = [
        (train + ['--aldk'], 'needs exactly one teacher source'),
        (train + ['--aldk', '--teacher', 'weights/student'], 'is not a VTN RCN'),
        (train + ['--aldk', '--teacher', 'weights/liar'], 'does not fit a VTN RCN'),
        (train + ['--aldk', '--pretrained_flow_path', bad_store],
         r'stored flows have shape [32, 32, 32, 3] but this run needs [64, 64, 64, 3]'),
        (['eval.py', '-c', 'weights/student', '--writing_flow', 'x.h5'], 'is not a VTN RCN'),
    ]
    procs = [_script(c[0], c[1:], work, wait=False) for c, _ in cases]
    for proc, (cmd, message) in zip(procs, cases):
        code, _, err = _finish(proc)
        errors = [line for line in err.splitlines() if line.startswith('error:')]
        assert code != 0 and len(errors) == 1 and message in errors[0], (cmd, err[-2000:])
        assert 'Traceback' not in err


def _flow_error(run, dataset, store, subsets):
    """Mean end-point error (voxels) of a student run's flows to the stored teacher flows."""
    errors = []
    sess, fw, _ = runs.load_framework(run)
    for subset in subsets:
        for batch in dataset.generator(subset, batch_size=1):
            teacher = store.flow(batch['id1'][0], batch['id2'][0])
            errors.append(np.mean(np.linalg.norm(fw.register(sess, batch)[0] - teacher, axis=-1)))
    sess.close()
    return float(np.mean(errors))


def test_alignment_table_reports_each_students_pairs_and_its_flow_error(work, aldk_run, store, capsys):
    """bench.aldk_alignment on the fixture's ALDK student and its own critic: one row with the val
    pairs, cosines in [-1, 1], and the end-point error that eval's registration path gives."""
    from bench import aldk_alignment
    out = _in_process(aldk_alignment, ['--critic', 'weights/student', '-d', 'data/synthetic.json', '--flows',
                                       'flows.h5', '-v', 'val', 'weights/student'], work, capsys)
    rows = [line.strip('|').split('|') for line in out.splitlines() if line.startswith('| weights/student')]
    assert len(rows) == 1, out
    cells = [c.strip() for c in rows[0]]
    assert cells[1] == '2'
    for cell in cells[2:4]:
        mean, std = (float(v) for v in cell.split('+-'))
        assert -1 <= mean <= 1 and 0 <= std <= 1, cell
    assert float(cells[4]) > 0
    with FlowStore(store, SIZE) as flows:
        expected = _flow_error(str(work / 'weights' / 'student'), Dataset(str(work / 'data' / 'synthetic.json')),
                               flows, ['val'])
    assert float(cells[5]) == pytest.approx(expected, abs=1.5e-3)

    code, _, err = _script('bench/aldk_alignment.py', ['--critic', 'weights/teacher', '-d', 'data/synthetic.json',
                                                       '--flows', 'flows.h5', 'weights/student'], work)
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert code != 0 and len(errors) == 1 and 'is not an ALDK run' in errors[0], err[-2000:]


@pytest.mark.full
def test_aldk_lowers_flow_error_to_teacher(tmp_path):
    """16 synthetic 64^3 scans (train 10: 90 pairs; held out val 2 + test 4: 14 pairs); a VTN
    teacher (VTN affine + 1 VTN cascade) trained 600 steps at lr 1e-4 (at 1e-3 its affine stem
    diverged); paper-LDR students trained 300 steps at lr 1e-3 with the same flags and seed, without and with --aldk (online teacher, default beta / gamma /
    lamb / schedule). The held-out end-point error to the teacher's flows must drop with ALDK.
    Logs go to tmp_path/<run>.log; ~30 min on 2 idle cores."""
    spec = make_synthetic(str(tmp_path / 'data'), n_scans=16, n_val=2, n_test=4)
    common = ['-d', spec, '--batch', 2, '--epochs', 1, '--val_steps', 100, '--print_steps', 25]
    logs = {}

    def train(name, args):
        code, out, err = _script('train.py', args + common + ['--output', name], tmp_path, timeout=3600)
        logs[name] = str(tmp_path / (name + '.log'))
        with open(logs[name], 'w') as f:
            f.write(out + err)
        assert code == 0, err[-3000:]

    train('teacher', ['-b', 'VTN', '-n', 1, '--round', 600, '--lr', 1e-4, '--seed', 1])
    _ok(_script('eval.py', ['-c', 'weights/teacher', '--writing_flow', 'heldout.h5', '-v', 'val,test'], tmp_path))
    student = ['-b', 'LDR', '-n', 1, '--round', 300, '--lr', 1e-3, '--seed', 3]
    train('plain', student)
    train('aldk', student + ['--aldk', '--teacher', 'weights/teacher'])
    dataset = Dataset(spec, batch_size=1)
    with FlowStore(str(tmp_path / 'heldout.h5'), SIZE) as store:
        error = {name: _flow_error(str(tmp_path / 'weights' / name), dataset, store, ['val', 'test'])
                 for name in ('plain', 'aldk')}
    print('held-out EPE to the teacher (voxels): {} (logs: {})'.format(error, logs))
    assert error['aldk'] < error['plain']
