"""reproduce.py: the demo pipeline end to end at a tiny size, resuming, tables vs results.json, errors."""
import json
import os
import re
import subprocess
import sys

import pytest

import baselines
import cli
import reproduce
from conftest import ROOT, error_lines, run_script
from reproduction import plan, report, run

TINY = ['--demo', '--steps', '2', '--teacher_steps', '2', '--demo_scans', '6', '--demo_test', '2',
        '--results', 'results']
OUTPUTS = ('results.json', 'table1.md', 'table2.md', 'figure1.png', 'figure2.png', 'config.json')


def table_rows(path):
    """{(method, cascades): [cells]} of a Markdown table file."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.startswith('| ') and not line.startswith('| Method'):
                cells = [c.strip() for c in line.strip().strip('|').split('|')]
                rows[(cells[0], cells[1])] = cells
    return rows


def cascades_cell(value):
    return '-' if value is None else str(value)


def finish(ctx, stage, **record):
    """Write a stage's record as run.write_record does (its info and outputs; ``record`` overrides)."""
    os.makedirs(os.path.dirname(stage.record_path(ctx)), exist_ok=True)
    cli.write_json(stage.record_path(ctx), dict({'info': stage.info, 'outputs': stage.outputs}, **record))


@pytest.mark.slow
def test_demo_end_to_end_then_resume(tmp_path):
    ants = baselines.missing('ants_syn') is None
    args = TINY + ['--baselines'] + (['ants_syn'] if ants else ['none'])
    first = run_script('reproduce.py', *args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + '\n'.join(error_lines(first))
    out = tmp_path / 'results' / 'demo'
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / 'results.json').read_text())
    stages = ['data', 'teacher-1', 'eval-teacher-1', 'sections-teacher-1', 'ldr-1', 'eval-ldr-1', 'sections-ldr-1',
              'aldk-1', 'eval-aldk-1', 'sections-aldk-1']
    stages += ['baseline-ants_syn'] if ants else []
    assert sorted(results['stages']) == sorted(stages)
    for name, record in results['stages'].items():
        assert record['returncode'] == 0 and record['seconds'] > 0 and (out / record['log']).exists(), name
        assert record['versions']['cpu'] and record['versions']['numpy'], name   # stages may run on several machines
        for path in record['outputs']:
            assert (out / path).exists(), (name, path)
    assert results['versions']['python'] and 'numpy' in results['versions']
    assert results['command'][1].endswith('reproduce.py')

    # every method has its row, and each number of the tables is the one in results.json
    expected = ['teacher-1', 'ldr-1', 'aldk-1'] + (['ants_syn'] if ants else [])
    assert sorted(results['methods']) == sorted(expected)
    rows = table_rows(out / 'table1.md')
    assert len(rows) == len(expected)
    for row in results['table1']:
        entry = results['methods'][row['key']]
        assert entry['status'] == 'ok'
        assert len(entry['sources']) == 1
        with open(out / entry['sources'][0]) as f:
            assert json.load(f)['summary'] == entry['summary']
        assert row['dice'] == entry['summary']['dice']['mean']
        assert row['seconds_per_pair'] == entry['summary']['seconds_per_pair']
        cells = rows[(row['method'], cascades_cell(row['cascades']))]
        assert cells[2] == report.fmt(row['dice'], 3, row['dice_std'])
        assert cells[3] == report.fmt(row['jacc'], 3, row['jacc_std'])
        assert cells[-2] == report.fmt(row['seconds_per_pair'], 3)
        assert cells[-1] == report.fmt_int(row['parameters'])
    rows2 = table_rows(out / 'table2.md')
    assert [r['key'] for r in results['table2']] == ['ldr-1', 'aldk-1', 'teacher-1']
    for row in results['table2']:
        cells = rows2[(row['method'], '1')]
        assert cells[2] == report.fmt(row['dice'], 3, row['dice_std'])
        assert cells[4] == report.signed(row['dice_gain_points'])
    figure1 = results['figures']['figure1.png']
    assert figure1['aldk']['dice'] == [results['methods']['aldk-1']['summary']['dice']['mean']]
    assert results['figures']['figure2.png']['methods'] == ['LDR', 'LDR + ALDK', 'VTN + affine (teacher)']

    # a run stopped during ldr-1's last stage: finished stages are skipped, ldr-1 resumes from its
    # checkpoint (no training step is redone) and only eval-ldr-1 runs again
    kept = {name: (out / 'stages' / (name + '.json')).read_text() for name in stages}
    (out / 'stages' / 'ldr-1.json').unlink()
    (out / 'stages' / 'eval-ldr-1.json').unlink()
    second = run_script('reproduce.py', *args, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + '\n'.join(error_lines(second))
    for name in stages:
        if name in ('ldr-1', 'eval-ldr-1'):
            assert 'skip {} '.format(name) not in second.stdout
        else:
            assert 'skip {} (finished)'.format(name) in second.stdout
            assert (out / 'stages' / (name + '.json')).read_text() == kept[name]
    assert 'ldr-1: train LDR (1 cascade, 2 steps, seed 0) (resuming from step 2)' in second.stdout
    assert not re.search(r'^\s+\[[\d:]+\] step \d+/', second.stdout, re.M), 'a training step was redone'
    again = json.loads((out / 'results.json').read_text())
    assert again['stages']['ldr-1']['resumed_from_step'] == 2
    for key in ('teacher-1', 'aldk-1'):
        assert again['methods'][key]['summary'] == results['methods'][key]['summary']


def test_orchestrator_needs_no_tensorflow(tmp_path):
    """Planning, running and reporting import no TensorFlow (only the sections worker does, in its
    own process): importing them and listing the demo's stages leave it out of sys.modules."""
    code = ('import sys, reproduce; from reproduction import plan, report, run; '
            'reproduce.main(["--demo", "--list", "--results", sys.argv[1]]); '
            'loaded = [m for m in ("tensorflow", "reproduction.sections") if m in sys.modules]; '
            'assert not loaded, loaded')
    proc = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '-m reproduction.sections -d' in proc.stdout.splitlines()[-1]


def test_schedule_runs_exactly_the_steps():
    """train.py runs round(--epochs x --round) steps."""
    for steps in (1, 2, 4, 7, 300, 2000, 4000, 6000, 8000, 20000, 12345):
        args = plan.schedule(steps)
        rounds, epochs = int(args[1]), float(args[3])
        assert int(round(epochs * rounds)) == steps


def test_argument_errors(tmp_path):
    parse = lambda *a: plan.resolve_args(reproduce.build_parser().parse_args(list(a)))  # noqa: E731
    with pytest.raises(cli.UserError, match='either --demo or -d'):
        parse()
    spec = tmp_path / 'spec.json'
    spec.write_text(json.dumps({'schemes': {'test': {'test': 1.0}}}))
    with pytest.raises(cli.UserError, match='--steps is required'):
        parse('-d', str(spec))
    with pytest.raises(cli.UserError, match='add teacher'):
        parse('-d', str(spec), '--steps', '5', '--methods', 'ldr', 'aldk')
    args = parse('-d', str(spec), '--steps', '5', '--cascades', '3', '1', '--baselines', 'none')
    assert args.subset == 'test' and args.cascades == [1, 3] and args.baselines == [] and args.teacher_steps == 5
    assert args.methods == list(plan.LEARNED) and args.name == 'spec'
    demo = parse('--demo')
    assert demo.paired and demo.methods == ['teacher', 'ldr', 'aldk'] and demo.name == 'demo'


def test_missing_data_and_bad_spec_are_one_line_errors(tmp_path):
    spec = tmp_path / 'lpba.json'
    spec.write_text(json.dumps({'files': {'lpba': {'path': 'lpba.h5', 'type': 'HDF5'}}, 'image_size': [64] * 3,
                                'image_type': 'brain', 'subsets': {'test': ['lpba/S02']},
                                'schemes': {'1': {'test': 1.0}, 'test': {'test': 1.0}}}))
    proc = run_script('reproduce.py', '-d', spec, '--steps', '2', cwd=tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == ['error: {} of spec {} is missing; build it with data_util.prepare (for LPBA40: '
                                 'python reproduce.py ... --lpba40 DIR)'.format(tmp_path / 'lpba.h5', spec)]
    proc = run_script('reproduce.py', '-d', tmp_path / 'nope.json', '--steps', '2', cwd=tmp_path)
    assert error_lines(proc) == ['error: dataset spec {} not found'.format(tmp_path / 'nope.json')]


@pytest.mark.slow
def test_failed_stage_names_stage_and_log(tmp_path):
    from data_util.synthetic import make_synthetic
    spec = make_synthetic(str(tmp_path / 'data'), n_scans=6, image_size=32, seed=0)
    proc = run_script('reproduce.py', '-d', spec, '--steps', '2', '--baselines', 'none', '--methods', 'teacher',
                      cwd=tmp_path)
    assert proc.returncode == 2
    log = tmp_path / 'results' / 'synthetic' / 'stage_logs' / 'teacher-1.log'
    assert error_lines(proc) == ['error: stage teacher-1 failed (exit status 2); see its log {}'.format(log)]
    assert 'error:' in log.read_text()
    assert not (tmp_path / 'results' / 'synthetic' / 'stages' / 'teacher-1.json').exists()


def test_list_shows_stages(tmp_path, synthetic_spec):
    proc = run_script('reproduce.py', '-d', synthetic_spec, '--steps', '3', '--cascades', '1', '2',
                      '--teacher_flows', 'offline', '--baselines', 'none', '--list', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[2] for line in proc.stdout.splitlines()]
    assert names[:5] == ['teacher-1', 'eval-teacher-1', 'sections-teacher-1', 'flows-1', 'ldr-1']
    assert 'voxelmorph-1' in names and 'voxelmorph-2' not in names and 'l2-2' in names
    assert [n for n in names if n.startswith('sections')] == ['sections-teacher-1', 'sections-ldr-1', 'sections-aldk-1',
                                                               'sections-voxelmorph-1']
    assert all(line.startswith('to do') for line in proc.stdout.splitlines())
    assert '--pretrained_flow_path flows/teacher-2.h5' in proc.stdout


def test_table_marks_missing_baseline():
    methods = {'ants_syn': {'label': 'ANTs SyN', 'cascades': None, 'status': 'not installed', 'package': 'antspyx',
                            'reason': 'antspyx not installed (pip install -r requirements-baselines.txt)'}}
    rows = report.table1_rows(methods)
    text = report.render_table1(rows, {'pairs': 4, 'dataset': 'd.json', 'subset': 'test', 'pairing': 'all pairs',
                                          'threads': 2})
    assert '| ANTs SyN | - | not installed (antspyx) | - | - | - | - | - |' in text
    assert 'Landmark' not in text  # no column when no method has landmarks


def test_baseline_not_installed_keeps_its_finished_results(tmp_path, capsys):
    """A baseline whose package is missing here stays in the plan: its finished evaluation is
    reported as measured, its unfinished one is skipped (not run, not an error) and 'not installed'."""
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'ants_syn']))
    ctx = plan.Context(args)
    ctx.missing_baselines = {'ants_syn': 'antspyx not installed (pip install -r requirements-baselines.txt)'}
    stages = plan.plan(ctx)
    atlas, all_pairs = [s for s in stages if s.kind == 'baseline']
    assert (atlas.name, all_pairs.name) == ('baseline-ants_syn', 'baseline-ants_syn-all_pairs')
    finish(ctx, atlas)
    summary = {'dice': {'mean': 0.69, 'std': 0.02}, 'seconds_per_pair': 60.0}
    os.makedirs(os.path.dirname(ctx.path(atlas.outputs[0])), exist_ok=True)
    cli.write_json(ctx.path(atlas.outputs[0]), {'summary': summary, 'pairs': [{}] * 9, 'parameters': None})
    records = report.stage_records(ctx, stages)
    entry = report.method_entries(ctx, stages, records)['ants_syn']
    assert entry['status'] == 'ok' and entry['summary'] == summary and entry['pairs'] == 9
    assert entry['all_pairs']['status'] == 'not installed'
    assert not run.run_stage(ctx, all_pairs)
    assert 'skip baseline-ants_syn-all_pairs: antspyx not installed' in capsys.readouterr().out
    assert not all_pairs.finished(ctx) and not os.path.exists(ctx.path('stage_logs', all_pairs.name + '.log'))


def test_lpba40_preset_plans_seeds_and_all_pairs(tmp_path):
    """--preset lpba40: every student at 2 seeds (runs <method>-1-s<seed>), one teacher, an
    evaluation on the atlas pairs and one on all pairs per run, and CPU-hour estimates."""
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'identity', 'ants_syn']))
    assert (args.steps, args.lr, args.seeds, args.all_pairs, args.name) == (6000, 5e-4, [1, 2], True, 'lpba40')
    ctx = plan.Context(args)
    ctx.missing_baselines = {}
    names = [s.name for s in plan.plan(ctx)]
    assert 'teacher-1' in names and 'teacher-1-s1' not in names
    assert {'ldr-1-s1', 'ldr-1-s2', 'aldk-1-s2', 'eval-aldk-1-s2', 'eval-aldk-1-s2-all_pairs',
            'eval-ldr-1-s1-refine25', 'baseline-ants_syn-all_pairs'} <= set(names)
    assert 'eval-teacher-1-refine25' not in names
    assert names.index('baseline-ants_syn') < names.index('teacher-1') < names.index('baseline-ants_syn-all_pairs')
    entries = report.method_entries(ctx, plan.plan(ctx), {})
    assert entries['ldr+refine-1']['label'] == 'LDR + 25 refinement iterations' and entries['ldr-1']['refine'] == 0
    assert entries['voxelmorph-1']['label'] == 'VoxelMorph + affine (coarse-to-fine)'
    train = {s.name: s for s in plan.plan(ctx) if s.kind == 'train'}
    assert train['ldr-1-s2'].command[train['ldr-1-s2'].command.index('--seed') + 1] == '2'
    lr = {name: float(stage.command[stage.command.index('--lr') + 1]) for name, stage in train.items()}
    assert lr['teacher-1'] == lr['voxelmorph-1-s1'] == 1e-4 and lr['ldr-1-s1'] == lr['aldk-1-s2'] == 5e-4
    assert "train_pairs='all'" in train['teacher-1'].command
    assert all(s.info['cpu_hours'] > 0 for s in train.values())


def test_coarse_to_fine_trains_a_coarse_run_then_the_run_from_its_weights(tmp_path):
    """--coarse_to_fine (preset lpba40: the teacher and VoxelMorph): '<run>-coarse' trains --coarse_steps on the
    coarse spec, then '<run>' the rest on the spec with --init_from; its evaluations name the fine
    run's final step; resuming the fine run drops --init_from; the coarse HDF5, when missing, is
    built at the coarse spec's size; --coarse_steps must leave steps for the fine phase."""
    parse = lambda *a: plan.resolve_args(reproduce.build_parser().parse_args(list(a)))  # noqa: E731
    args = parse('--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'none')
    ctx = plan.Context(args)
    stages = {s.name: s for s in plan.plan(ctx)}
    coarse, fine = stages['voxelmorph-1-s2-coarse'], stages['voxelmorph-1-s2']
    names = list(stages)
    assert names.index('voxelmorph-1-s2-coarse') + 1 == names.index('voxelmorph-1-s2')
    assert 'ldr-1-s1-coarse' not in stages and 'aldk-1-s1-coarse' not in stages
    assert (stages['teacher-1-coarse'].info['steps'], stages['teacher-1'].info['steps']) == (4000, 4000)
    option = lambda stage, flag: stage.command[stage.command.index(flag) + 1]  # noqa: E731
    assert option(coarse, '-d').endswith('lpba64.json') and option(fine, '-d').endswith('lpba.json')
    assert option(fine, '--init_from') == os.path.join('weights', 'voxelmorph-1-s2-coarse')
    assert '--init_from' not in coarse.command and (coarse.info['steps'], fine.info['steps']) == (4000, 2000)
    assert fine.reads() == {'voxelmorph-1-s2-coarse'}
    assert stages['eval-voxelmorph-1-s2'].outputs == [os.path.join('evaluate', 'voxelmorph-1-s2-2000-test.json')]
    assert 0 < coarse.info['cpu_hours'] < fine.info['cpu_hours']
    checkpoint = tmp_path / 'lpba40' / 'weights' / 'voxelmorph-1-s2'
    checkpoint.mkdir(parents=True)
    (checkpoint / 'args.json').write_text('{}')
    for suffix in ('.index', '.data-00000-of-00001', '.complete'):
        (checkpoint / ('model-500' + suffix)).write_text('')
    command, resumed = run.train_command(ctx, fine)
    assert resumed == 500 and '--init_from' not in command and '--output' not in command
    assert command[-2:] == ['-c', os.path.join('weights', 'voxelmorph-1-s2')]

    spec = json.loads(open(os.path.join(ROOT, 'datasets', 'lpba64.json')).read())
    spec['files'] = {'lpba': {'path': str(tmp_path / 'missing64.h5'), 'type': 'HDF5'}}
    (tmp_path / 'coarse.json').write_text(json.dumps(spec))
    lpba40 = tmp_path / 'LPBA40'
    lpba40.mkdir()
    args = parse('--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'none', '--lpba40', str(lpba40),
                 '--coarse_dataset', str(tmp_path / 'coarse.json'), '--name', 'other')
    data = [s for s in plan.plan(plan.Context(args)) if s.kind == 'data']
    assert [s.name for s in data][-1] == 'data-coarse'
    assert data[-1].command[-4:] == ['--output', str(tmp_path / 'missing64.h5'), '--image_size', '64']
    with pytest.raises(cli.UserError, match=r'--coarse_steps must be between 0 and the steps of teacher voxelmorph '
                                            r'\(6000\), got 6000'):
        parse('--preset', 'lpba40', '--results', str(tmp_path), '--coarse_steps', '6000')
    with pytest.raises(cli.UserError, match='coarse dataset spec nope.json not found'):
        parse('--preset', 'lpba40', '--results', str(tmp_path), '--coarse_dataset', 'nope.json')


def test_training_whose_weights_are_gone_runs_again_when_a_stage_to_do_reads_them(tmp_path, monkeypatch):
    """On another machine (results/ committed, weights/ not): the teacher trains again, with its
    evaluations, because ALDK still has to read it; a student's weights that nothing to do reads
    stay gone; with the teacher's checkpoint present nothing runs again. (No shipped models here:
    figure 2 reads the runs' weights.)"""
    monkeypatch.setattr(plan, 'MODELS', str(tmp_path / 'models'))
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'identity']))
    ctx = plan.Context(args)
    ctx.missing_baselines = {}
    stages = plan.plan(ctx)
    done = {'teacher-1', 'eval-teacher-1', 'eval-teacher-1-all_pairs', 'ldr-1-s1', 'eval-ldr-1-s1',
            'eval-ldr-1-s1-all_pairs', 'eval-ldr-1-s1-refine25'}
    for stage in stages:
        if stage.name in done:
            finish(ctx, stage)
    assert next(s for s in stages if s.name == 'aldk-1-s1').reads() == {'teacher-1'}
    again = {s.name for s in run.stale_stages(ctx, stages, stages)}
    assert again == {'teacher-1', 'eval-teacher-1', 'eval-teacher-1-all_pairs', 'ldr-1-s1', 'eval-ldr-1-s1',
                     'eval-ldr-1-s1-all_pairs', 'eval-ldr-1-s1-refine25'}  # sections-ldr-1-s1 reads ldr-1-s1
    teacher = tmp_path / 'lpba40' / 'weights' / 'teacher-1'
    teacher.mkdir(parents=True)
    for suffix in ('.index', '.data-00000-of-00001', '.complete'):
        (teacher / ('model-8000' + suffix)).write_text('')
    assert {s.name for s in run.stale_stages(ctx, stages, stages)} == {'ldr-1-s1', 'eval-ldr-1-s1', 'eval-ldr-1-s1-all_pairs',
                                                             'eval-ldr-1-s1-refine25'}
    finish(ctx, next(s for s in stages if s.name == 'sections-ldr-1-s1'))
    assert run.stale_stages(ctx, stages, stages) == []


def test_a_revised_recipe_trains_the_stages_it_changes_again(tmp_path, capsys):
    """A results directory made before the preset's teacher went coarse-to-fine: the changed
    setting is said in one line (another learning rate is still refused); the teacher, trained
    for 8000 steps in one phase, trains again when chosen, with its evaluations and figure 2's
    sections, whose earlier files go with their records; VoxelMorph's recipe, unchanged, and the
    stages not chosen stay; --again trains a student of the earlier teacher again."""
    parse = lambda *a: plan.resolve_args(reproduce.build_parser().parse_args(  # noqa: E731
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'none'] + list(a)))
    old = plan.Context(parse('--coarse_to_fine', 'voxelmorph'))
    old_stages = plan.plan(old)
    plan.check_config(old)
    for stage in old_stages:
        finish(old, stage)
    teacher = next(s for s in old_stages if s.name == 'teacher-1')
    assert (teacher.info['steps'], teacher.info['phase']) == (8000, None)
    finish(old, teacher, info={k: v for k, v in teacher.info.items() if k != 'phase'})  # a record from before phases
    evaluation = next(s for s in old_stages if s.name == 'eval-teacher-1')
    assert evaluation.outputs == [os.path.join('evaluate', 'teacher-1-8000-test.json')]
    for suffix in ('.json', '.txt'):
        os.makedirs(old.path('evaluate'), exist_ok=True)
        open(old.path('evaluate', 'teacher-1-8000-test' + suffix), 'w').write('{}')

    ctx = plan.Context(parse())
    stages = plan.plan(ctx)
    plan.check_config(ctx)
    out = capsys.readouterr().out
    assert "the training recipe changed since {} was made (coarse_to_fine ['voxelmorph'] -> ['teacher', " \
           "'voxelmorph']): the training stages it changes run again".format(ctx.out) in out
    assert plan.read_json(ctx.path('config.json'))['coarse_to_fine'] == ['teacher', 'voxelmorph']
    other = plan.Context(parse('--teacher_lr', '3e-4'))
    plan.plan(other)
    with pytest.raises(cli.UserError, match=r'made with other settings \(teacher_lr 0.0001 -> 0.0003\)'):
        plan.check_config(other, store=False)

    by_name = {s.name: s for s in stages}
    assert by_name['teacher-1'].recipe_changed(ctx) and not by_name['voxelmorph-1-s1'].recipe_changed(ctx)
    assert not by_name['voxelmorph-1-s1-coarse'].recipe_changed(ctx) and not by_name['ldr-1-s1'].recipe_changed(ctx)
    ctx.args.only = ['teacher-1*', 'eval-teacher-1*']
    chosen = run.chosen_stages(ctx, stages)
    assert {s.name for s in run.stale_stages(ctx, stages, chosen)} == {'teacher-1', 'eval-teacher-1',
                                                                       'eval-teacher-1-all_pairs', 'sections-teacher-1'}
    ctx.args.only = ['voxelmorph-*']
    assert run.stale_stages(ctx, stages, run.chosen_stages(ctx, stages)) == []
    ctx.args.again = ['l2-1-s1']   # a student of the earlier teacher, asked for again: with its evaluations,
    l2 = {'l2-1-s1', 'eval-l2-1-s1', 'eval-l2-1-s1-all_pairs'}
    assert {s.name for s in run.stale_stages(ctx, stages, run.chosen_stages(ctx, stages))} == l2 | {
        'teacher-1', 'eval-teacher-1', 'eval-teacher-1-all_pairs', 'sections-teacher-1'}  # and its teacher, not here
    teacher = tmp_path / 'lpba40' / 'weights' / 'teacher-1'
    teacher.mkdir(parents=True)
    for suffix in ('.index', '.data-00000-of-00001', '.complete'):
        (teacher / ('model-4000' + suffix)).write_text('')
    assert {s.name for s in run.stale_stages(ctx, stages, run.chosen_stages(ctx, stages))} == l2
    ctx.args.again = ['l3-*']
    with pytest.raises(cli.UserError, match=r"--again 'l3-\*' matches no stage of this plan"):
        run.stale_stages(ctx, stages, run.chosen_stages(ctx, stages))
    run.forget(ctx, by_name['eval-teacher-1'])
    assert not by_name['eval-teacher-1'].finished(ctx) and os.listdir(ctx.path('evaluate')) == []
    run.forget(ctx, by_name['teacher-1'])
    assert not by_name['teacher-1'].finished(ctx) and by_name['teacher-1-coarse'].info['phase'] == 'coarse'


def test_runs_trained_from_a_teacher_trained_again_since_are_noted_under_the_tables(tmp_path, monkeypatch):
    """A teacher finished after its students (trained again on another machine) leaves a note, in
    results.json and under both tables, for each finished student it taught (online teacher:
    weights/teacher-1; offline: the flows stage), and none for runs finished after it or for the
    coarse phase that precedes its fine phase."""
    monkeypatch.setattr(plan, 'MODELS', str(tmp_path / 'models'))
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'identity']))
    stages = plan.plan(plan.Context(args))
    records = {s.name: {'finished': '2026-12-01T10:00:00'} for s in stages}
    assert report.earlier_trainings(stages, records) == []
    records['teacher-1']['finished'] = '2026-12-09T10:00:00'
    records['aldk-1-s1']['finished'] = '2026-12-09T12:00:00'
    notes = report.earlier_trainings(stages, records)
    assert [note.split()[0] for note in notes] == ['aldk-1-s2', 'l2-1-s1', 'l2-1-s2']
    assert all('from weights/teacher-1 as it was before stage teacher-1 made it again (finished '
               '2026-12-09T10:00:00)' in note for note in notes)
    del records['l2-1-s2']                                       # not finished: nothing to note
    assert len(report.earlier_trainings(stages, records)) == 2
    assert report.render_notes(notes[:1]) == '\nNote: {}.\n'.format(notes[0]) and report.render_notes([]) == ''

    offline = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'identity', '--teacher_flows', 'offline']))
    stages = plan.plan(plan.Context(offline))
    records = {s.name: {'finished': '2026-12-01T10:00:00'} for s in stages}
    records['flows-1']['finished'] = '2026-12-09T10:00:00'
    assert [n.split()[0] for n in report.earlier_trainings(stages, records)] == ['aldk-1-s1', 'aldk-1-s2', 'l2-1-s1',
                                                                               'l2-1-s2']


def test_figure2_draws_a_run_from_the_shipped_export_of_its_last_weights(tmp_path, monkeypatch):
    """A run whose final checkpoint is frozen in models/ (export.json's checkpoint and step) is drawn
    from that export: its sections stage reads no weights, so nothing trains again for it on a
    machine without them; an export of another step, run or results directory is not used."""
    models = tmp_path / 'models'
    monkeypatch.setattr(plan, 'MODELS', str(models))

    def ship(name, checkpoint, step):
        (models / name).mkdir(parents=True)
        (models / name / 'export.json').write_text(json.dumps({'checkpoint': checkpoint, 'step': step}))

    ship('early', '/elsewhere/results/lpba40/weights/ldr-1-s1/model-5500', 5500)
    ship('other-results', '/elsewhere/results/lpba40-old/weights/ldr-1-s1/model-6000', 6000)
    ship('seed-2', '/elsewhere/results/lpba40/weights/ldr-1-s2/model-6000', 6000)
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path / 'results'), '--baselines', 'none']))
    ctx = plan.Context(args)
    ctx.missing_baselines = {}

    def sections_model():
        stage = next(s for s in plan.plan(ctx) if s.name == 'sections-ldr-1-s1')
        return stage.command[stage.command.index('--run') + 1]

    assert sections_model() == 'LDR=' + os.path.join('weights', 'ldr-1-s1')
    ship('shipped', '/elsewhere/results/lpba40/weights/ldr-1-s1/model-6000', 6000)
    assert sections_model() == 'LDR=' + str(models / 'shipped')
    stages = plan.plan(ctx)
    for stage in stages:
        if stage.name in ('ldr-1-s1', 'eval-ldr-1-s1'):
            finish(ctx, stage)
    assert run.stale_stages(ctx, stages, [s for s in stages if s.name == 'sections-ldr-1-s1']) == []


def test_sections_worker_draws_a_checkpoint_and_its_export_alike(tiny_run, synthetic_spec, tmp_path):
    """python -m reproduction.sections on a train.py run and on its export: the same pairs and
    slice, warped sections equal within float error; a model of another size is one error line."""
    import numpy as np
    proc = run_script('predict.py', '-c', tiny_run, '--export', 'exported', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arrays = {}
    for name, model in (('run', str(tiny_run)), ('export', 'exported')):
        proc = subprocess.run([sys.executable, '-m', 'reproduction.sections', '-d', synthetic_spec, '-v', 'test',
                               '--pairs', '2', '--run', 'LDR=' + model, '--output', name + '.npz'],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-2000:]
        with np.load(tmp_path / (name + '.npz')) as data:
            arrays[name] = {k: data[k] for k in data.files}
    run_arrays, export_arrays = arrays['run'], arrays['export']
    assert run_arrays['warped'].shape == (1, 64, 64)   # 2 test scans: one pair to the first fixed scan
    for key in ('pair_ids', 'index', 'fixed', 'moving', 'moving_seg'):
        assert np.array_equal(run_arrays[key], export_arrays[key]), key
    assert np.abs(run_arrays['warped'] - export_arrays['warped']).max() < 0.05
    assert np.mean(run_arrays['warped_seg'] != export_arrays['warped_seg']) < 0.001
    small = tmp_path / 'small.json'
    spec = json.loads(open(synthetic_spec).read())
    small.write_text(json.dumps(dict(spec, image_size=[32, 32, 32])))
    proc = subprocess.run([sys.executable, '-m', 'reproduction.sections', '-d', str(small), '-v', 'test',
                           '--run', 'LDR=exported', '--output', 'small.npz'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and error_lines(proc) == [
        'error: exported registers 64^3 volumes; {} holds 32x32x32'.format(small)]
    assert not (tmp_path / 'small.npz').exists()


def test_warp_section_is_the_warp_ops_section():
    """reproduction.sections.warp_section (SciPy) against the project's warp op and its nearest
    warp on a random volume and flow: the same section, inside and beyond the border."""
    import numpy as np
    from network.spatial_transformer import warp, warp_nearest
    from network.tfv1 import tf
    from reproduction.sections import warp_section
    rng = np.random.default_rng(3)
    volume = rng.uniform(0, 255, (12, 10, 8)).astype(np.float32)
    labels = rng.integers(0, 5, (12, 10, 8)).astype(np.float32)
    flow = rng.normal(0, 2.5, (12, 10, 8, 3)).astype(np.float32)
    with tf.Graph().as_default(), tf.Session() as sess:
        flow_t = tf.constant(flow[None])
        linear, nearest = sess.run([warp(tf.constant(volume[None, ..., None]), flow_t),
                                    warp_nearest(tf.constant(labels[None, ..., None]), flow_t)])
    for index in (0, 5, 7):
        assert np.allclose(warp_section(volume, flow, index, order=1), linear[0, :, :, index, 0], atol=1e-3)
        differ = warp_section(labels, flow, index, order=0) != nearest[0, :, :, index, 0]
        assert differ.mean() < 0.02   # only positions at a rounding tie may go either way


def test_only_runs_the_chosen_stages_and_what_they_need_again(tmp_path):
    """--only picks stages by name pattern; a chosen stage that reads gone weights pulls in their
    training again, and a student trained again pulls in its teacher; a pattern that matches
    nothing is one error line; --list marks the stages left out 'not now'."""
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'identity',
         '--only', 'sections-aldk-1-s1']))
    ctx = plan.Context(args)
    ctx.missing_baselines = {}
    stages = plan.plan(ctx)
    done = {'teacher-1', 'eval-teacher-1', 'sections-teacher-1', 'aldk-1-s1', 'eval-aldk-1-s1'}
    for stage in stages:
        if stage.name in done:
            finish(ctx, stage)
    data = [s.name for s in stages if s.kind == 'data']  # ['data'] where datasets/lpba.h5 is not built yet
    chosen = run.chosen_stages(ctx, stages)
    assert [s.name for s in chosen] == data + ['sections-aldk-1-s1']
    assert {s.name for s in run.stale_stages(ctx, stages, chosen)} == done
    ctx.args.only = ['baseline-*', 'voxelmorph-1-s?']
    assert [s.name for s in run.chosen_stages(ctx, stages)] == data + [
        'baseline-identity', 'voxelmorph-1-s1', 'voxelmorph-1-s2', 'baseline-identity-all_pairs']
    ctx.args.only = ['teacher-2']
    with pytest.raises(cli.UserError, match="--only 'teacher-2' matches no stage"):
        run.chosen_stages(ctx, stages)
    proc = run_script('reproduce.py', '--preset', 'lpba40', '--results', str(tmp_path / 'listed'), '--baselines',
                      'identity', '--only', 'baseline-*', '--list', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith('to do') and ' baseline-identity ' in line for line in lines)
    assert not any(line.startswith('not now') and ' data ' in line for line in lines)  # the data stage always runs
    assert any(line.startswith('not now') and ' teacher-1 ' in line for line in lines)
    assert 'training still to do' not in proc.stdout


def test_refined_rows_count_the_refinement_in_their_seconds():
    plain = {'dice': {'mean': 0.69, 'std': 0.01}, 'seconds_per_pair': 0.09}
    assert report.with_refinement_seconds(plain) is plain
    refined = report.with_refinement_seconds(dict(plain, seconds_refine_per_pair=1.25))
    assert refined['seconds_per_pair'] == pytest.approx(1.34) and refined['seconds_network_per_pair'] == 0.09
    assert refined['dice'] == plain['dice']


def test_seeds_combine_into_mean_and_spread():
    summaries = [{'dice': {'mean': 0.70, 'std': 0.02}, 'seconds_per_pair': 0.2},
                 {'dice': {'mean': 0.66, 'std': 0.03}, 'seconds_per_pair': 0.4}]
    combined = report.combine_seeds(summaries)
    assert combined['dice'] == {'mean': pytest.approx(0.68), 'std': pytest.approx(0.02)}
    assert combined['seconds_per_pair'] == pytest.approx(0.3) and combined['std_over'] == 'seeds'
    assert report.combine_seeds(summaries[:1]) is summaries[0]


def test_figure2_draws_the_runs_whose_sections_exist_in_figure_order(tmp_path):
    """Each figure run's sections stage writes its own file right after the run's evaluations;
    figure 2 draws those that exist (teacher trained first, drawn last) and refuses files of
    other pairs."""
    import numpy as np
    args = plan.resolve_args(reproduce.build_parser().parse_args(
        ['--preset', 'lpba40', '--results', str(tmp_path), '--baselines', 'none']))
    ctx = plan.Context(args)
    ctx.missing_baselines = {}
    stages = plan.plan(ctx)
    sections = {s.info['method']: s for s in stages if s.kind == 'sections'}
    assert sorted(sections) == ['aldk', 'ldr', 'teacher', 'voxelmorph'] and sections['ldr'].info['run'] == 'ldr-1-s1'
    names = [s.name for s in stages]
    assert names.index('eval-teacher-1-all_pairs') < names.index('sections-teacher-1') < names.index('ldr-1-s1')
    rng = np.random.default_rng(0)

    def write(method, pair_ids):
        path = ctx.path(sections[method].outputs[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, label=np.array(plan.LEARNED[method][0]), source=np.array('weights/' + method),
                 pair_ids=np.array(pair_ids),
                 fixed=rng.uniform(0, 255, (8, 8)), fixed_seg=rng.integers(0, 3, (8, 8)),
                 moving=rng.uniform(0, 255, (2, 8, 8)), moving_seg=rng.integers(0, 3, (2, 8, 8)),
                 warped=rng.uniform(0, 255, (2, 8, 8)), warped_seg=rng.integers(0, 3, (2, 8, 8)), axis=2, index=4)

    assert report.figure2(ctx, stages) is None
    write('teacher', ['S01 S02', 'S01 S03'])
    write('ldr', ['S01 S02', 'S01 S03'])
    drawn = report.figure2(ctx, stages)
    assert drawn['methods'] == ['LDR', 'VTN + affine (teacher)'] and drawn['pairs'] == ['S01 S02', 'S01 S03']
    assert drawn['models'] == ['weights/ldr', 'weights/teacher']
    assert os.path.getsize(ctx.path('figure2.png')) > 0
    write('aldk', ['S01 S04', 'S01 S05'])
    with pytest.raises(ValueError, match='other pairs'):
        report.figure2(ctx, stages)


def test_table1_names_the_machines_when_several_timed_it():
    """Timings from several machines (each evaluation record's CPU; 'not recorded' for old records)
    get a note under table 1 naming which rows each timed; from one machine, none. A qualifier
    joins a label's trailing parenthesis."""
    methods = {'a': {'status': 'ok', 'label': 'A', 'eval_stages': ['e-a']},
               'b': {'status': 'ok', 'label': 'B', 'eval_stages': ['e-b1', 'e-b2']},
               'c': {'status': 'pending', 'label': 'C', 'eval_stages': ['e-c']}}
    records = {'e-a': {'versions': {'cpu': 'Intel'}}, 'e-b1': {'versions': {'cpu': 'AMD'}}, 'e-b2': {}}
    machines = report.timing_machines(methods, records)
    assert machines == {'Intel': ['A'], 'AMD': ['B'], 'not recorded': ['B']}
    assert report.render_machines(machines) == ('\nNote: CPU s/pair were measured on 3 machines, which compare only '
                                                'within one: Intel: A; AMD: B; not recorded: B.\n')
    records['e-b1'] = records['e-b2'] = {'versions': {'cpu': 'Intel'}}
    assert report.timing_machines(methods, records) == {} and report.render_machines({}) == ''
    assert report.qualified('VTN + affine (teacher)', 'coarse-to-fine') == 'VTN + affine (teacher, coarse-to-fine)'
    assert report.qualified('VoxelMorph + affine', 'coarse-to-fine') == 'VoxelMorph + affine (coarse-to-fine)'
