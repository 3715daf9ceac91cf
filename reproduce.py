"""Reproduce the paper's experiments: teacher -> teacher flows -> students -> baselines -> tables.

    python reproduce.py --demo                     # synthetic liver-like data, ~10 min on 2 cores
    python reproduce.py -d datasets/lpba.json --lpba40 ../shared/data/LPBA40 --cascades 1 \\
        --steps 20000 --teacher_steps 20000        # the LPBA40 protocol, 1 cascade
    python reproduce.py -d SPEC --cascades 1 2 3 --steps N --list   # show the stages and their state

Stages (each a subprocess of the project's own command-line tools, run with cwd results/<name>/):
  data            demo: python -m data_util.synthetic; LPBA40 (--lpba40 DIR, HDF5 missing):
                  python -m data_util.prepare --lpba40 DIR
  teacher-N       train.py -b VTN -n N                     VTN affine + N VTN cascades
  flows-N         eval.py --writing_flow (only with --teacher_flows offline)
  ldr-N           train.py -b LDR -n N                     light affine + N LDR, L_rec only
  aldk-N          train.py -b LDR -n N --aldk --teacher weights/teacher-N   (or the flow store)
  l2-N            train.py -b LDR -n N --distill l2 ...    plain flow distillation (ablation)
  voxelmorph-N    train.py -b VoxelMorph -n N              (VTN affine + VoxelMorph), smallest N only
  eval-<run>      eval.py -c weights/<run> -v SUBSET       metrics + network-only CPU seconds per pair
  baseline-<m>    python -m baselines.evaluate <m>         no registration, ANTs SyN, Elastix B-spline (+ affine)
  sections        python reproduce.py sections ...         warped sections of figure 2

A stage is finished when its record stages/<stage>.json exists (written atomically after the
command succeeded); a re-run skips finished stages, and a training stage stopped half-way
resumes from its last checkpoint (train.py -c). A failed stage stops the run with one line
naming the stage and its log (stage_logs/<stage>.log). After every stage results.json,
table1.md and table2.md are rewritten from the stage records and the evaluation JSON files;
figure1.png and figure2.png at the end. Every table number is a number of results.json,
which also holds each stage's command line, return code, wall time and outputs, and the
versions of Python, TensorFlow and the baseline packages.

Choices:
  - Timing (table 1, "CPU s/pair"): eval.py's median network-only seconds per pair at batch 1;
    the baselines' registration call alone (median). Every stage runs with TF_NUM_INTRAOP_THREADS,
    TF_NUM_INTEROP_THREADS and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS set to --threads (2).
  - Learning rate: Adam --lr (students) and --teacher_lr (teachers) with the original's step
    decay: --round = steps / 5, five epochs, so the last 40 % of the steps run at 1/2 and 1/4
    of the rate.
  - Intermediate checkpoints of a finished training stage are deleted (the final one stays);
    a teacher checkpoint with optimiser state is ~0.5 GB per cascade.
  - The demo (64^3, 16 scans: 11 train / 2 val / 3 test) evaluates the 2 adjacent test pairs
    (--paired; figure 2 shows the 2 other test scans warped to the first), so that the classical
    baselines (~1 min per 64^3 pair for both Elastix runs together) fit in its ~10 minutes; it
    trains 240 teacher steps at the paper's learning rate 1e-4 (at 1e-3 the VTN affine stem
    diverged within 200 steps) and 200 student steps at 1e-3 (at 1e-4 the students barely left
    the identity in 200 steps), all of 2 pairs. A demo this short leaves every learned method
    far from converged; its table shows the pipeline, not the paper's accuracy.
  - "No registration (identity)" is a baseline row (the zero flow) so every number can be read
    against the overlap before registration.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import cli
import runs

ROOT = os.path.dirname(os.path.abspath(__file__))
LEARNED = {  # key: (label, train.py arguments, uses the teacher)
    'teacher': ('VTN + affine (teacher)', ['-b', 'VTN'], False),
    'ldr': ('LDR', ['-b', 'LDR'], False),
    'aldk': ('LDR + ALDK', ['-b', 'LDR', '--aldk'], True),
    'l2': ('LDR + L2 distillation', ['-b', 'LDR', '--distill', 'l2'], True),
    'voxelmorph': ('VoxelMorph + affine', ['-b', 'VoxelMorph'], False),
}
PAPER_LR = 1e-4  # Adam learning rate of the paper and the original code
BASELINES = ('identity', 'ants_syn', 'ants_syncc', 'elastix_bspline', 'elastix_affine_bspline')
DEMO = {'n_scans': 16, 'n_val': 2, 'n_test': 3, 'image_size': 64, 'steps': 200, 'teacher_steps': 240,
        'batch': 2, 'lr': 1e-3, 'teacher_lr': PAPER_LR, 'methods': ['teacher', 'ldr', 'aldk'], 'paired': True,
        'baselines': [b for b in BASELINES if b != 'ants_syncc']}
LPBA40_DIR = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40')
PRESETS = {
    # The LPBA40 protocol as measured here (README "LPBA40"): 128^3, 1 cascade, batch 1; students at
    # lr 5e-4 (an LDR student with the affine augmentation below diverged at 1e-3 after 1700 steps:
    # its light affine stem's determinant loss jumped from 1e-5 to 1e3; without that augmentation
    # 1e-3 trained stably), the VTN teacher at 1e-4 (its affine stem diverged at 1e-3 in the demo), training on every
    # ordered pair of the training scans and the atlas; 2 seeds per student; every test pair and the 72
    # inter-subject pairs; a random affine map added to the B-spline augmentation (rotations up to 10
    # degrees, scales exp(+-0.05), shifts up to 4 voxels = 6 mm) so that models take scans as users send
    # them (bench/robustness.py measures it). seconds_per_step: one step on 2 cores (ldr measured at 3.3 steps/s on an idle
    # 2-core AMD EPYC; the others scaled by bench.train_step's ratios to the student), for --list's CPU-hours.
    'lpba40': {'dataset': os.path.join(ROOT, 'datasets', 'lpba.json'),
               'lpba40': LPBA40_DIR if os.path.isdir(LPBA40_DIR) else None, 'name': 'lpba40',
               'steps': 6000, 'teacher_steps': 8000, 'batch': 1, 'lr': 5e-4, 'teacher_lr': 1e-4, 'val_steps': 500,
               'seeds': [1, 2], 'seed': 1, 'all_pairs': True, 'refine': 25,
               'train_flags': ['--data_args', "train_pairs='all'", '--augment_affine', '10', '0.05', '4'],
               'seconds_per_step': {'ldr': 0.30, 'teacher': 0.49, 'aldk': 0.95, 'l2': 0.75, 'voxelmorph': 0.45}},
}
ECHO_PREFIXES = ('step ', 'validation at', 'Finished', 'Graph built', 'Distillation', 'Teacher flows', 'wrote ',
                 'Evaluating', 'Restored', 'warning', 'error')
FIGURE_PAIRS = 4
SAVE_STEPS = 500          # a training stage cut off by the end of a session loses at most this many steps
ALL_PAIRS_BASELINES = ('identity', 'ants_syn')   # ANTs SyNCC and Elastix would take hours on 72 pairs
REFINED = ('ldr', 'aldk')                           # the students --refine evaluates with refinement too


class Context:
    """Paths, settings and the clock of one reproduction run (results/<name>/)."""

    def __init__(self, args):
        self.args = args
        self.preset = PRESETS.get(args.preset, {})
        self.out = os.path.abspath(os.path.join(args.results, args.name))
        self.started = time.time()
        self.spec = None

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def rel(self, path):
        return os.path.relpath(path, self.out)

    def elapsed(self):
        seconds = int(time.time() - self.started)
        return '{:d}:{:02d}'.format(seconds // 60, seconds % 60)

    def say(self, message):
        print('[{}] {}'.format(self.elapsed(), message), flush=True)

    def env(self):
        """The environment of every stage: the project on PYTHONPATH, oneDNN on, fixed thread counts."""
        threads = str(self.args.threads)
        env = dict(os.environ)
        env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
        env.update({'TF_ENABLE_ONEDNN_OPTS': env.get('TF_ENABLE_ONEDNN_OPTS', '1'),
                    'TF_NUM_INTRAOP_THREADS': threads, 'TF_NUM_INTEROP_THREADS': threads,
                    'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS': threads, 'OMP_NUM_THREADS': threads,
                    'PYTHONUNBUFFERED': '1'})
        return env


class Stage:
    """One resumable step: a command (list of str) run in results/<name>/.

    kind: 'data', 'train', 'flows', 'eval', 'baseline' or 'sections'; outputs: paths it
    produces (relative to results/<name>/); info: what the report needs (method, cascades...).
    """

    def __init__(self, name, kind, command, outputs, description, **info):
        self.name = name
        self.kind = kind
        self.command = command
        self.outputs = outputs
        self.description = description
        self.info = info

    def record_path(self, ctx):
        return ctx.path('stages', self.name + '.json')

    def finished(self, ctx):
        return os.path.exists(self.record_path(ctx))


def python(*args):
    return [sys.executable] + [str(a) for a in args]


def script(name, *args):
    return python(os.path.join(ROOT, name), *args)


def schedule(steps):
    """train.py --round/--epochs running exactly ``steps`` steps, decaying over the last 2 of 5 epochs."""
    rounds = max(1, steps // 5)
    return ['--round', str(rounds), '--epochs', repr((steps + 0.5) / rounds)]


def run_name(ctx, method, n, seed):
    """A training run's name: method-n, with -s<seed> when the students train at several seeds
    (the teacher, one per cascade count, never has it)."""
    if method == 'teacher' or len(ctx.args.seeds) == 1:
        return '{}-{}'.format(method, n)
    return '{}-{}-s{}'.format(method, n, seed)


def seeds_of(ctx, method):
    """The seeds a method trains at: the first one for the teacher, all of --seeds for students."""
    return ctx.args.seeds[:1] if method == 'teacher' else ctx.args.seeds


def train_stage(ctx, method, n, seed):
    """The training stage of a learned method at n cascades and one seed."""
    a = ctx.args
    label, flags, needs_teacher = LEARNED[method]
    steps = a.teacher_steps if method == 'teacher' else a.steps
    run = run_name(ctx, method, n, seed)
    command = script('train.py', *flags) + ['-n', str(n), '-d', ctx.spec, '--batch', str(a.batch)]
    lr = a.teacher_lr if method == 'teacher' else a.lr
    command += schedule(steps) + ['--lr', repr(lr), '--seed', str(seed), '--output', run,
                                  '--val_steps', str(a.val_steps if a.val_steps is not None else 0),
                                  '--save_steps', str(min(max(1, steps // 4), SAVE_STEPS)),
                                  '--print_steps', str(max(1, steps // 10))] + list(a.train_flags)
    if method != 'teacher' and method != 'voxelmorph' and a.student_net_args:
        command += ['--net_args', a.student_net_args]
    if needs_teacher:
        if a.teacher_flows == 'offline':
            command += ['--pretrained_flow_path', os.path.join('flows', 'teacher-{}.h5'.format(n))]
        else:
            command += ['--teacher', os.path.join('weights', 'teacher-{}'.format(n))]
    hours = steps * ctx.preset.get('seconds_per_step', {}).get(method, 0.0) * a.threads / 3600.0
    return Stage(run, 'train', command, [os.path.join('weights', run)],
                 'train {} ({} cascade{}, {} steps, seed {})'.format(label, n, 's' if n > 1 else '', steps, seed),
                 method=method, cascades=n, run=run, steps=steps, seed=seed, cpu_hours=hours or None)


def eval_stage(ctx, method, n, seed, all_pairs=False, refine=0):
    """eval.py on the subset's pairs (all_pairs: every ordered pair among its scans, despite an
    atlas; refine: that many iterations of instance optimisation after the network)."""
    a = ctx.args
    run = run_name(ctx, method, n, seed)
    command = script('eval.py', '-c', os.path.join('weights', run), '-d', ctx.spec, '-v', a.subset,
                     '--eval_output_dir', 'evaluate', '--force')
    if a.paired:
        command.append('--paired')
    if refine:
        command += ['--refine', str(refine)]
    if all_pairs:
        command.append('--all_pairs')
    suffix = ('-refine{}'.format(refine) if refine else '') + ('-all_pairs' if all_pairs else '')
    return Stage('eval-' + run + suffix, 'eval', command, [os.path.join('evaluate', '{}-{}{}-{}.json'.format(
        run, a.teacher_steps if method == 'teacher' else a.steps, suffix, a.subset))],
        'evaluate {} on {}{}{}'.format(run, a.subset, ' (all pairs)' if all_pairs else '',
                                       ' with {} refinement iterations'.format(refine) if refine else ''),
        method=method, cascades=n, run=run, seed=seed, all_pairs=all_pairs, refine=refine)


def baseline_stage(ctx, method, all_pairs=False):
    a = ctx.args
    suffix = '-all_pairs' if all_pairs else ''
    output = os.path.join('evaluate', '{}{}-{}'.format(method, suffix, a.subset))
    command = python('-m', 'baselines.evaluate', method, '-d', ctx.spec, '-v', a.subset, '--output', output)
    if a.paired:
        command.append('--paired')
    if all_pairs:
        command.append('--all_pairs')
    return Stage('baseline-' + method + suffix, 'baseline', command, [output + '.json'],
                 'register the {} pairs with {}{}'.format(a.subset, method, ' (all pairs)' if all_pairs else ''),
                 method=method, all_pairs=all_pairs)


def sections_stage(ctx, runs):
    """Warped sections of figure 2 for the given {label: run} at the smallest cascade count: up to
    FIGURE_PAIRS moving scans of the subset against its first fixed scan (all pairs, not --paired)."""
    a = ctx.args
    command = script('reproduce.py', 'sections', '-d', ctx.spec, '-v', a.subset, '--output',
                     os.path.join('figure2', 'sections.npz'), '--pairs', str(FIGURE_PAIRS))
    for label, run in runs.items():
        command += ['--run', '{}={}'.format(label, os.path.join('weights', run))]
    return Stage('sections', 'sections', command, [os.path.join('figure2', 'sections.npz')],
                 'warp sections for figure 2 ({})'.format(', '.join(runs)))


def flows_stage(ctx, n):
    """Offline teacher flows of every training pair (eval.py --writing_flow; resumable itself)."""
    store = os.path.join('flows', 'teacher-{}.h5'.format(n))
    command = script('eval.py', '-c', os.path.join('weights', 'teacher-{}'.format(n)), '-d', ctx.spec, '-v', '1',
                     '--writing_flow', store)
    return Stage('flows-{}'.format(n), 'flows', command, [store],
                 'teacher flows of the training pairs ({} cascade{})'.format(n, 's' if n > 1 else ''), cascades=n)


def data_stages(ctx):
    """The demo's synthetic set or the LPBA40 HDF5 when missing; sets ctx.spec."""
    a = ctx.args
    if a.demo:
        ctx.spec = ctx.path('data', 'synthetic.json')
        command = python('-m', 'data_util.synthetic', 'data', '--n_scans', a.demo_scans, '--image_size',
                         a.image_size, '--seed', a.seed, '--n_val', DEMO['n_val'], '--n_test', a.demo_test)
        return [Stage('data', 'data', command, ['data/synthetic.json', 'data/synthetic.h5'],
                      'synthetic liver-like data: {} scans of {}^3'.format(a.demo_scans, a.image_size))]
    ctx.spec = os.path.abspath(a.dataset)
    if not os.path.exists(ctx.spec):
        raise cli.UserError('dataset spec {} not found'.format(a.dataset))
    missing = missing_files(ctx.spec)
    if not missing:
        return []
    if not a.lpba40:
        raise cli.UserError('{} of spec {} is missing; build it with data_util.prepare (for LPBA40: '
                            'python reproduce.py ... --lpba40 DIR)'.format(missing[0], a.dataset))
    if len(missing) != 1:
        raise cli.UserError('--lpba40 builds one HDF5 file, but {} lists {} missing'.format(a.dataset, len(missing)))
    command = python('-m', 'data_util.prepare', '--lpba40', os.path.abspath(a.lpba40), '--output', missing[0])
    return [Stage('data', 'data', command, [missing[0]], 'LPBA40 -> {}'.format(missing[0]))]


def missing_files(spec_path):
    """HDF5 files a spec lists that exist neither beside the spec nor relative to the cwd (absolute paths)."""
    with open(spec_path) as f:
        spec = json.load(f)
    out = []
    for entry in spec.get('files', {}).values():
        path = os.path.expanduser(entry['path'])
        candidates = [path] if os.path.isabs(path) else [os.path.abspath(path),
                                                          os.path.join(os.path.dirname(spec_path), path)]
        if not any(os.path.exists(c) for c in candidates):
            out.append(candidates[-1])
    return out


def plan(ctx):
    """All stages of this run, in order."""
    a = ctx.args
    stages = data_stages(ctx)
    smallest = min(a.cascades)
    for n in a.cascades:
        for method in a.methods:
            if method == 'voxelmorph' and n != smallest:
                continue
            for seed in seeds_of(ctx, method):
                stages.append(train_stage(ctx, method, n, seed))
                stages.append(eval_stage(ctx, method, n, seed))
                if a.all_pairs:
                    stages.append(eval_stage(ctx, method, n, seed, all_pairs=True))
                if a.refine and method in REFINED:
                    stages.append(eval_stage(ctx, method, n, seed, refine=a.refine))
            if method == 'teacher' and a.teacher_flows == 'offline' and any(LEARNED[m][2] for m in a.methods):
                stages.append(flows_stage(ctx, n))
    for method in a.baselines:
        stages.append(baseline_stage(ctx, method))
    for method in a.baselines:
        if a.all_pairs and method in ALL_PAIRS_BASELINES:
            stages.append(baseline_stage(ctx, method, all_pairs=True))
    figure_runs = {LEARNED[m][0]: run_name(ctx, m, smallest, seeds_of(ctx, m)[0])
                   for m in ('ldr', 'aldk', 'teacher') if m in a.methods}
    if figure_runs:
        stages.append(sections_stage(ctx, figure_runs))
    return stages


# ---------------------------------------------------------------- running stages

def echo(line):
    """Whether a stage's output line is shown on the console (the rest goes to its log only)."""
    text = line.strip()
    return bool(text) and (text.startswith(ECHO_PREFIXES) or ' s/pair' in text or
                           (': Dice ' in text and '|' not in text))


def train_command(ctx, stage):
    """The command of a training stage: resume its run with -c when a checkpoint exists, else start
    afresh (a run directory without a complete checkpoint is removed first)."""
    run_dir = ctx.path('weights', stage.info['run'])
    if not os.path.isdir(run_dir):
        return stage.command, None
    found = runs.list_checkpoints(run_dir)
    if not found or not os.path.exists(os.path.join(run_dir, 'args.json')):
        shutil.rmtree(run_dir)
        shutil.rmtree(ctx.path('logs', stage.info['run']), ignore_errors=True)
        return stage.command, None
    command = list(stage.command)
    i = command.index('--output')
    del command[i:i + 2]
    return command + ['-c', os.path.join('weights', stage.info['run'])], max(found)


def prune_checkpoints(run_dir):
    """Delete every checkpoint of a finished run but the newest; returns the newest step."""
    found = runs.list_checkpoints(run_dir)
    last = max(found)
    for step, prefix in found.items():
        if step != last:
            for path in glob.glob(prefix + '.*'):
                os.remove(path)
    return last


def run_stage(ctx, stage):
    """Run one stage unless finished; write its record. UserError naming the stage and log on failure."""
    if stage.finished(ctx):
        ctx.say('skip {} (finished)'.format(stage.name))
        return False
    if stage.kind == 'data' and all(os.path.exists(ctx.path(p)) for p in stage.outputs):
        ctx.say('{}: outputs exist, kept'.format(stage.name))
        write_record(ctx, stage, None, 0, 0.0, None, None)
        return True
    command, resumed = stage.command, None
    if stage.kind == 'train':
        command, resumed = train_command(ctx, stage)
    log_path = ctx.path('stage_logs', stage.name + '.log')
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    ctx.say('{}: {}{}'.format(stage.name, stage.description,
                              ' (resuming from step {})'.format(resumed) if resumed is not None else ''))
    start = time.time()
    with open(log_path, 'a') as log:
        log.write('$ {}\n'.format(' '.join(command)))
        log.flush()
        proc = subprocess.Popen(command, cwd=ctx.out, env=ctx.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()     # the log of a stage hours long is read while it runs
                if echo(line):
                    print('    [{}] {}'.format(ctx.elapsed(), line.strip()), flush=True)
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    seconds = time.time() - start
    if code != 0:
        raise cli.UserError('stage {} failed (exit status {}); see its log {}'.format(stage.name, code, log_path))
    missing = [p for p in stage.outputs if not os.path.exists(ctx.path(p))]
    if stage.kind == 'train':
        stage.info['final_step'] = prune_checkpoints(ctx.path(stage.outputs[0]))
    elif missing:
        raise cli.UserError('stage {} wrote no {}; see its log {}'.format(stage.name, missing[0], log_path))
    write_record(ctx, stage, command, code, seconds, resumed, ctx.rel(log_path))
    ctx.say('{} done in {:.0f} s'.format(stage.name, seconds))
    return True


def write_record(ctx, stage, command, code, seconds, resumed, log):
    """The stage's record (its 'finished' marker): command line, return code, wall seconds, outputs."""
    record = {'stage': stage.name, 'kind': stage.kind, 'command': command, 'cwd': ctx.out, 'returncode': code,
              'seconds': seconds, 'resumed_from_step': resumed, 'outputs': stage.outputs, 'log': log,
              'finished': datetime.datetime.now().isoformat(timespec='seconds'), 'info': stage.info}
    cli.write_json(stage.record_path(ctx), record)


# ---------------------------------------------------------------- results

def read_json(path):
    with open(path) as f:
        return json.load(f)


def stage_records(ctx, stages):
    return {s.name: read_json(s.record_path(ctx)) for s in stages if s.finished(ctx)}


def method_entries(ctx, stages, records):
    """results.json 'methods': per evaluated method or baseline (keyed like 'aldk-1' or 'ants_syn') its
    label, status ('ok', 'pending', 'not installed') and, when evaluated, its evaluation summary
    (learned methods at several seeds: `combine_seeds`); 'all_pairs' the same on every ordered
    pair of the subset when that was evaluated."""
    import baselines
    entries = {}
    for method in BASELINES:
        evaluations = [s for s in stages if s.kind == 'baseline' and s.info['method'] == method]
        if not evaluations and method not in ctx.skipped_baselines:
            continue
        entry = {'label': baselines.METHODS[method]['label'], 'method': method, 'cascades': None,
                 'kind': 'classical', 'package': baselines.METHODS[method]['package'], 'status': 'pending'}
        if method in ctx.skipped_baselines:
            entry.update({'status': 'not installed', 'reason': ctx.skipped_baselines[method]})
        entries[method] = add_evaluations(ctx, entry, evaluations, records)
    for stage in stages:
        if stage.kind != 'train':
            continue
        method, n = stage.info['method'], stage.info['cascades']
        for refine in sorted({s.info.get('refine', 0) for s in stages if s.kind == 'eval' and s.info['method'] == method}):
            key = '{}{}-{}'.format(method, '+refine' if refine else '', n)
            if key in entries:
                continue
            evaluations = [s for s in stages if s.kind == 'eval' and s.info['method'] == method
                           and s.info['cascades'] == n and s.info.get('refine', 0) == refine]
            label = LEARNED[method][0] + (' + {} refinement iterations'.format(refine) if refine else '')
            entry = {'label': label, 'method': method, 'cascades': n, 'kind': 'learned', 'status': 'pending',
                     'refine': refine}
            entries[key] = add_evaluations(ctx, entry, evaluations, records)
    return entries


def add_evaluations(ctx, entry, stages, records):
    """Fill a method entry from its finished evaluation stages' JSON (eval.py's schema): one per
    seed, on the subset's pairs and (all_pairs) on every ordered pair of it."""
    for all_pairs in (False, True):
        chosen = [s for s in stages if s.info.get('all_pairs', False) == all_pairs]
        done = [s for s in chosen if s.name in records]
        if not chosen:
            continue
        if all_pairs:
            entry['all_pairs'] = {'status': 'pending'}
            target = entry['all_pairs']
        else:
            target = entry
        target['eval_stages'] = [s.name for s in chosen]
        if len(done) < len(chosen) or target.get('status') == 'not installed':
            continue
        data = {s.info.get('seed'): read_json(ctx.path(s.outputs[0])) for s in done}
        summary = combine_seeds([d['summary'] for d in data.values()])
        first = next(iter(data.values()))
        target.update({'status': 'ok', 'sources': [s.outputs[0] for s in done], 'summary': summary,
                       'per_class': first.get('per_class') if len(data) == 1 else None,
                       'parameters': first.get('parameters'), 'pairs': len(first['pairs']),
                       'seeds': sorted(k for k in data if k is not None) or None,
                       'seconds_per_pair': summary['seconds_per_pair']})
        if len(data) > 1:
            target['per_seed'] = {str(k): d['summary'] for k, d in data.items()}
    return entry


def combine_seeds(summaries):
    """One summary of runs at several seeds: each metric's mean over the seeds' means, and as
    'std' the standard deviation of those means across seeds (with one seed: its own summary,
    whose std is over the pairs); seconds per pair: the median of the seeds' medians."""
    if len(summaries) == 1:
        return summaries[0]
    import numpy as np
    combined = {'seconds_per_pair': float(np.median([s['seconds_per_pair'] for s in summaries])),
                'std_over': 'seeds'}
    for name, value in summaries[0].items():
        if isinstance(value, dict) and 'mean' in value:
            means = [s[name]['mean'] for s in summaries]
            combined[name] = {'mean': float(np.mean(means)), 'std': float(np.std(means))}
    return combined


def metric(entry, name, stat='mean'):
    """A summary number of a method entry, or None."""
    if entry.get('status') != 'ok':
        return None
    value = entry['summary'][name] if name == 'seconds_per_pair' else entry['summary'][name][stat]
    return None if value is None or value != value else value


def table1_rows(methods):
    """Rows of table 1: every method, numbers straight from its evaluation summary."""
    rows = []
    for key, e in methods.items():
        rows.append({'key': key, 'method': e['label'], 'cascades': e['cascades'], 'status': e['status'],
                     'package': e.get('package'),
                     'dice': metric(e, 'dice'), 'dice_std': metric(e, 'dice', 'std'),
                     'jacc': metric(e, 'jacc'), 'jacc_std': metric(e, 'jacc', 'std'),
                     'landmark_dist': metric(e, 'landmark_dist'), 'landmark_dist_std': metric(e, 'landmark_dist', 'std'),
                     'jacobian_std': metric(e, 'jacobian_det'), 'folding_percent':
                         None if metric(e, 'folding') is None else 100.0 * metric(e, 'folding'),
                     'seconds_per_pair': metric(e, 'seconds_per_pair'), 'parameters': e.get('parameters'),
                     'seeds': e.get('seeds'),
                     'dice_all_pairs': metric(e.get('all_pairs', {}), 'dice'),
                     'dice_all_pairs_std': metric(e.get('all_pairs', {}), 'dice', 'std')})
    return rows


def table2_rows(methods, cascades):
    """Rows of table 2 (ablation): LDR, LDR + ALDK, LDR + L2 per cascade count, with the change in
    Dice / Jaccard against plain LDR in percentage points."""
    rows = []
    for n in cascades:
        base = methods.get('ldr-{}'.format(n))
        for method in ('ldr', 'aldk', 'l2', 'teacher'):
            e = methods.get('{}-{}'.format(method, n))
            if e is None:
                continue
            row = {'key': '{}-{}'.format(method, n), 'method': e['label'], 'cascades': n, 'status': e['status'],
                   'dice': metric(e, 'dice'), 'dice_std': metric(e, 'dice', 'std'),
                   'jacc': metric(e, 'jacc'), 'jacc_std': metric(e, 'jacc', 'std'),
                   'dice_gain_points': None, 'jacc_gain_points': None}
            if base is not None and method != 'ldr' and row['dice'] is not None and metric(base, 'dice') is not None:
                row['dice_gain_points'] = 100.0 * (row['dice'] - metric(base, 'dice'))
                row['jacc_gain_points'] = 100.0 * (row['jacc'] - metric(base, 'jacc'))
            rows.append(row)
    return rows


def fmt(value, digits=3, std=None):
    """A table cell: '-' for missing, 'mean ± std' with a std."""
    if value is None:
        return '-'
    text = '{:.{}f}'.format(value, digits)
    return text if std is None else '{} ± {:.{}f}'.format(text, std, digits)


def signed(value, digits=2):
    return '-' if value is None else '{:+.{}f}'.format(value, digits)


def render_table1(rows, meta):
    landmarks = any(r['landmark_dist'] is not None for r in rows)
    seeds = any(r['seeds'] and len(r['seeds']) > 1 for r in rows)
    all_pairs = any(r['dice_all_pairs'] is not None for r in rows)
    head = (['Method', 'Cascades'] + (['Seeds'] if seeds else []) + ['Dice', 'Jacc']
            + (['Landmark dist. (vox)'] if landmarks else []) + ['Jacobian std', 'Folding %', 'CPU s/pair', 'Parameters']
            + (['Dice, all pairs'] if all_pairs else []))
    lines = ['# Table 1: registration accuracy, speed and size', '',
             '{} pairs of {} ({}), {}; CPU seconds per pair: median, network only (learned) or the '
             'registration call only (classical), {} threads. Dice and Jaccard of the label maps on the '
             'fixed scans\' own grids (eval.py); mean ± standard deviation over the pairs, or over the seeds\' '
             'means for rows trained at several seeds.{}'.format(
                 meta['pairs'], meta['dataset'], meta['subset'], meta['pairing'], meta['threads'],
                 ' "Dice, all pairs": every ordered pair among the subset\'s scans.' if all_pairs else ''), '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        if r['status'] != 'ok':
            note = '{} ({})'.format(r['status'], r['package']) if r['status'] == 'not installed' else r['status']
            cells = [r['method'], fmt_int(r['cascades'])] + (['-'] if seeds else []) + [note]
            cells += ['-'] * (len(head) - len(cells))
        else:
            cells = [r['method'], fmt_int(r['cascades'])]
            if seeds:
                cells.append(', '.join(str(s) for s in r['seeds']) if r['seeds'] else '-')
            cells += [fmt(r['dice'], 3, r['dice_std']), fmt(r['jacc'], 3, r['jacc_std'])]
            if landmarks:
                cells.append(fmt(r['landmark_dist'], 2, r['landmark_dist_std']))
            cells += [fmt(r['jacobian_std'], 3), fmt(r['folding_percent'], 3), fmt(r['seconds_per_pair'], 3),
                      fmt_int(r['parameters'])]
            if all_pairs:
                cells.append(fmt(r['dice_all_pairs'], 3, r['dice_all_pairs_std']))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def fmt_int(value):
    return '-' if value is None else '{:,}'.format(value)


def render_table2(rows, meta):
    head = ['Method', 'Cascades', 'Dice', 'Jacc', 'Dice gain vs LDR (points)', 'Jacc gain vs LDR (points)']
    lines = ['# Table 2: ablation of the distillation (same student, same steps)', '',
             '{} pairs of {} ({}); gains in percentage points of Dice / Jaccard over plain LDR at the same '
             'cascade count.'.format(meta['pairs'], meta['dataset'], meta['subset']), '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        lines.append('| ' + ' | '.join([r['method'], fmt_int(r['cascades']), fmt(r['dice'], 3, r['dice_std']),
                                        fmt(r['jacc'], 3, r['jacc_std']), signed(r['dice_gain_points']),
                                        signed(r['jacc_gain_points'])]) + ' |')
    return '\n'.join(lines) + '\n'


def versions():
    """Versions of what produced the numbers."""
    from importlib import metadata
    out = {'python': platform.python_version(), 'platform': platform.platform()}
    for package in ('tensorflow-cpu', 'tensorflow', 'numpy', 'h5py', 'scipy', 'matplotlib', 'antspyx', 'itk-elastix'):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        out['git_commit'] = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=ROOT, capture_output=True, text=True).stdout
        out['git_dirty'] = bool(dirty.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        out['cpu'] = names[0] if names else platform.processor()
    except OSError:
        out['cpu'] = platform.processor()
    out['cpu_count'] = os.cpu_count()
    return out


def report(ctx, stages, figures=False):
    """Write results.json, table1.md, table2.md (and the figures) from the finished stages."""
    a = ctx.args
    records = stage_records(ctx, stages)
    methods = method_entries(ctx, stages, records)
    evaluated = [e for e in methods.values() if e.get('status') == 'ok']
    meta = {'dataset': os.path.relpath(ctx.spec, ROOT) if ctx.spec.startswith(ROOT) else ctx.spec,
            'subset': a.subset, 'pairing': 'adjacent pairs' if a.paired else 'all pairs (atlas pairs with an atlas)',
            'pairs': max([e['pairs'] for e in evaluated], default=0), 'threads': a.threads}
    t1 = table1_rows(methods)
    t2 = table2_rows(methods, a.cascades)
    results = {'name': a.name, 'command': [sys.executable] + ctx.argv, 'config': ctx.config, 'meta': meta,
               'versions': ctx.versions, 'stages': records, 'methods': methods, 'table1': t1, 'table2': t2,
               'updated': datetime.datetime.now().isoformat(timespec='seconds')}
    cli.write_atomic(ctx.path('table1.md'), render_table1(t1, meta))
    cli.write_atomic(ctx.path('table2.md'), render_table2(t2, meta))
    if figures:
        results['figures'] = {'figure1.png': figure1(ctx, methods), 'figure2.png': figure2(ctx)}
    elif os.path.exists(ctx.path('results.json')):
        results['figures'] = read_json(ctx.path('results.json')).get('figures', {})
    cli.write_json(ctx.path('results.json'), results)
    return results


def figure1(ctx, methods):
    """Dice (lines) and CPU seconds per pair (bars) against the number of cascades, teacher vs student."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    a = ctx.args
    student = 'aldk' if 'aldk' in a.methods else 'ldr'
    series = [(m, LEARNED[m][0]) for m in ('teacher', student) if m in a.methods]
    x = np.arange(len(a.cascades))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    used = {}
    colours = {'teacher': '#4c72b0', student: '#dd8452'}
    for i, (m, label) in enumerate(series):
        entries = [methods.get('{}-{}'.format(m, n), {}) for n in a.cascades]
        seconds = [metric(e, 'seconds_per_pair') if e else None for e in entries]
        dice = [metric(e, 'dice') if e else None for e in entries]
        used[m] = {'cascades': a.cascades, 'seconds_per_pair': seconds, 'dice': dice,
                   'sources': [e.get('source') for e in entries]}
        offset = x + (i - (len(series) - 1) / 2) * width
        ax.bar(offset, [s or 0 for s in seconds], width, color=colours[m], alpha=0.55,
               label='{} CPU s/pair'.format(label))
        ax2.plot(offset, [np.nan if d is None else d for d in dice], 'o-', color=colours[m],
                 label='{} Dice'.format(label))
    ax.set_xticks(x)
    ax.set_xticklabels(['{}-cas'.format(n) for n in a.cascades])
    ax.set_xlabel('number of cascades')
    ax.set_ylabel('CPU seconds per pair ({} threads)'.format(a.threads))
    ax2.set_ylabel('Dice')
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc='upper left', fontsize=8)
    ax.set_title('Dice and CPU time vs cascades ({})'.format(os.path.basename(ctx.spec)))
    fig.tight_layout()
    fig.savefig(ctx.path('figure1.png'), dpi=120)
    plt.close(fig)
    return used


def overlay(fixed_seg, warped_seg):
    """RGB [X, Y, 3] of two label sections: matched foreground white, mismatched red, else black."""
    import numpy as np
    fixed_on, warped_on = fixed_seg > 0, warped_seg > 0
    matched = fixed_on & warped_on & (fixed_seg == warped_seg)
    mismatched = (fixed_on | warped_on) & ~matched
    rgb = np.zeros(fixed_seg.shape + (3,), np.float32)
    rgb[matched] = 1.0
    rgb[mismatched] = (1.0, 0.0, 0.0)
    return rgb


def figure2(ctx):
    """Sections of the warped images and warped segmentations per method, like the paper's figure 2."""
    path = ctx.path('figure2', 'sections.npz')
    if not os.path.exists(path):
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    with np.load(path, allow_pickle=False) as data:
        sections = {k: data[k] for k in data.files}
    labels = [str(s) for s in sections['labels']]
    pairs = len(sections['moving'])
    columns = 2 * pairs
    fig, axes = plt.subplots(len(labels) + 2, columns, figsize=(1.6 * columns + 0.8, 1.7 * (len(labels) + 2)),
                             squeeze=False)

    def show(ax, image, **kw):
        ax.imshow(np.swapaxes(image, 0, 1), origin='lower', **kw)
        ax.set_xticks([])
        ax.set_yticks([])

    for p in range(pairs):
        show(axes[0, 2 * p], sections['fixed'], cmap='gray', vmin=0, vmax=255)
        show(axes[0, 2 * p + 1], overlay(sections['fixed_seg'], sections['fixed_seg']))
        show(axes[1, 2 * p], sections['moving'][p], cmap='gray', vmin=0, vmax=255)
        show(axes[1, 2 * p + 1], overlay(sections['fixed_seg'], sections['moving_seg'][p]))
        axes[0, 2 * p].set_title('pair {}'.format(p + 1), fontsize=8)
        for i, label in enumerate(labels):
            show(axes[i + 2, 2 * p], sections['warped'][i, p], cmap='gray', vmin=0, vmax=255)
            show(axes[i + 2, 2 * p + 1], overlay(sections['fixed_seg'], sections['warped_seg'][i, p]))
    for i, label in enumerate(['fixed', 'moving'] + labels):
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.suptitle('Warped images and segmentations, slice {} of axis {}\nwhite = matched, red = mismatched'
                 .format(int(sections['index']), int(sections['axis'])), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.path('figure2.png'), dpi=110)
    plt.close(fig)
    return {'sections': ctx.rel(path), 'methods': labels, 'pairs': [str(p) for p in sections['pair_ids']]}


# ---------------------------------------------------------------- figure 2 worker

def sections_main(argv):
    """``python reproduce.py sections``: warp a few test pairs with each run; save central sections (npz)."""
    p = cli.ArgumentParser(prog='reproduce.py sections', description=sections_main.__doc__)
    p.add_argument('-d', '--dataset', required=True)
    p.add_argument('-v', '--val_subset', required=True)
    p.add_argument('--run', action='append', required=True, metavar='LABEL=RUN_DIR')
    p.add_argument('--pairs', type=int, default=FIGURE_PAIRS)
    p.add_argument('--output', required=True)
    args = p.parse_args(argv)
    import numpy as np

    from data_util.dataset import Dataset
    from network.spatial_transformer import warp_nearest
    from network.tfv1 import tf
    subset = int(args.val_subset) if args.val_subset.isdigit() else args.val_subset
    dataset = Dataset(args.dataset, batch_size=1)
    pairs = dataset.pairs(subset)
    fixed_id = pairs[0][0]
    chosen = [pair for pair in pairs if pair[0] == fixed_id][:args.pairs]
    picked = [b for b in dataset.generator(subset, batch_size=1) if (str(b['id1'][0]), str(b['id2'][0])) in chosen]
    batch = {k: np.concatenate([b[k] for b in picked]) for k in picked[0]}
    fixed_seg = batch['seg1'][0, ..., 0]
    axis = 2
    weights = (fixed_seg > 0).sum(axis=(0, 1))
    index = int(round(float((weights * np.arange(len(weights))).sum() / weights.sum()))) if weights.sum() \
        else fixed_seg.shape[axis] // 2
    warped, warped_seg, labels = [], [], []
    for item in args.run:
        label, _, run_dir = item.partition('=')
        sess, framework, _ = runs.load_framework(run_dir, dataset.image_size, dataset.segmentation_class_value)
        with sess.graph.as_default():
            seg = tf.placeholder(tf.float32, [None] + dataset.image_size + [1])
            seg_warp = warp_nearest(seg, framework.outputs['flow'])
            feed = framework.feed_dict(batch)
            feed[seg] = batch['seg2']
            out = sess.run({'warped': framework.outputs['warped'], 'seg': seg_warp}, feed)
            sess.close()
        warped.append(out['warped'][..., index, 0])
        warped_seg.append(np.round(out['seg'][..., index, 0]))
        labels.append(label)
        print('sections of {} ({}) at slice {}'.format(label, run_dir, index), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + '.tmp.npz'
    np.savez_compressed(tmp, labels=np.array(labels), pair_ids=np.array(['{} {}'.format(*c) for c in chosen]),
                        fixed=batch['voxel1'][0, ..., index, 0], fixed_seg=fixed_seg[..., index],
                        moving=batch['voxel2'][..., index, 0], moving_seg=batch['seg2'][..., index, 0],
                        warped=np.stack(warped), warped_seg=np.stack(warped_seg), axis=axis, index=index)
    os.replace(tmp, args.output)
    print('wrote {}'.format(args.output))


# ---------------------------------------------------------------- command line

def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--demo', action='store_true',
                   help='synthetic liver-like data at 64^3, teacher + LDR + LDR + ALDK + baselines (~10 min)')
    p.add_argument('-d', '--dataset', default=None, help='JSON dataset spec (not with --demo)')
    p.add_argument('--name', default=None, help='results/<name>/ (default: demo, or the spec file name)')
    p.add_argument('--results', default='results', help='parent directory of the run (default results)')
    p.add_argument('--cascades', type=int, nargs='+', default=[1], help='cascade counts (default 1)')
    p.add_argument('--steps', type=int, default=None, help='training steps of every student (demo: 200)')
    p.add_argument('--teacher_steps', type=int, default=None,
                   help='training steps of the teacher (default --steps; demo 240)')
    p.add_argument('--batch', type=int, default=None, help='pairs per training step (default 4; demo 2)')
    p.add_argument('--lr', type=float, default=None,
                   help='initial Adam learning rate of the students (default 1e-4; demo 1e-3)')
    p.add_argument('--teacher_lr', type=float, default=None,
                   help='initial Adam learning rate of the teachers (default --lr; demo 1e-4)')
    p.add_argument('--methods', nargs='+', choices=list(LEARNED), default=None,
                   help='learned methods (default: all; demo: teacher ldr aldk)')
    p.add_argument('--baselines', nargs='+', choices=list(BASELINES) + ['none'], default=None,
                   help='classical baselines (default: all installed ones)')
    p.add_argument('-v', '--subset', default=None,
                   help="evaluation scheme or subset (default: 'test' when the spec has it, else 2)")
    p.add_argument('--paired', action='store_true', help='evaluate adjacent pairs only (demo: on)')
    p.add_argument('--teacher_flows', choices=('online', 'offline'), default='online',
                   help='distillation from the teacher in the student graph (online, default) or from flows '
                        'extracted once by eval.py --writing_flow (offline; no augmentation)')
    p.add_argument('--student_net_args', default='', help="--net_args of the LDR students, e.g. \"head='deconv'\"")
    p.add_argument('--val_steps', type=int, default=None, help='validate every N training steps (default: never)')
    p.add_argument('--seed', type=int, default=0, help='data order / augmentation seed (and the demo data)')
    p.add_argument('--seeds', type=int, nargs='+', default=None,
                   help='train every student at each of these seeds (runs <method>-<n>-s<seed>; the tables give '
                        'the mean and the spread over seeds); the teacher at the first (default: --seed)')
    p.add_argument('--all_pairs', action='store_true',
                   help='also evaluate on every ordered pair among the subset\'s scans (eval.py --all_pairs), '
                        'e.g. the 72 inter-subject pairs of LPBA40\'s test scans')
    p.add_argument('--refine', type=int, default=0, metavar='N',
                   help='also evaluate the LDR and LDR + ALDK students with N iterations of instance optimisation '
                        '(eval.py --refine N; rows "<method> + N refinement iterations")')
    p.add_argument('--preset', choices=sorted(PRESETS),
                   help='a named recipe filling every setting not given (see PRESETS): lpba40 = the LPBA40 '
                        'protocol at 128^3, 1 cascade, every method at 2 seeds, all-pairs evaluation, results in '
                        'the tracked folder results/lpba40')
    p.add_argument('--threads', type=int, default=2, help='CPU threads of every stage (timing rule; default 2)')
    p.add_argument('--lpba40', default=None, metavar='DIR',
                   help='build the spec\'s missing HDF5 from this LPBA40 directory (data_util.prepare --lpba40)')
    p.add_argument('--image_size', type=int, default=DEMO['image_size'], help='demo image size (default 64)')
    p.add_argument('--demo_scans', type=int, default=DEMO['n_scans'], help='demo scans (default 16)')
    p.add_argument('--demo_test', type=int, default=DEMO['n_test'], help='demo test scans (default 3)')
    p.add_argument('--list', action='store_true', help='print the stages and whether they are finished, then exit')
    return p


CONFIG_KEYS = ('demo', 'dataset', 'steps', 'teacher_steps', 'batch', 'lr', 'teacher_lr', 'subset', 'paired', 'teacher_flows',
               'student_net_args', 'seed', 'image_size', 'demo_scans', 'demo_test', 'threads', 'seeds', 'all_pairs',
               'train_flags', 'refine')


def resolve_args(args):
    """Fill the defaults that depend on --demo, --preset and the spec; refuse contradictory input."""
    preset = PRESETS.get(args.preset, {})
    for key, value in preset.items():
        if hasattr(args, key) and getattr(args, key) in (None, False):
            setattr(args, key, value)
    args.train_flags = list(preset.get('train_flags', []))
    if args.demo == bool(args.dataset):
        raise cli.UserError('give either --demo or -d SPEC')
    if args.demo:
        for key in ('steps', 'teacher_steps', 'batch', 'lr', 'teacher_lr', 'methods'):
            if getattr(args, key) is None:
                setattr(args, key, DEMO[key])
        args.paired = True
        args.name = args.name or 'demo'
        args.subset = args.subset or 'test'
    else:
        if args.steps is None:
            raise cli.UserError('--steps is required with -d (e.g. --steps 20000)')
        args.teacher_steps = args.teacher_steps or args.steps
        args.batch = args.batch or 4
        args.lr = args.lr or PAPER_LR
        args.teacher_lr = args.teacher_lr or args.lr
        args.methods = args.methods or list(LEARNED)
        args.name = args.name or os.path.splitext(os.path.basename(args.dataset))[0]
        if not os.path.isfile(args.dataset):
            raise cli.UserError('dataset spec {} not found'.format(args.dataset))
        if args.subset is None:
            args.subset = 'test' if 'test' in read_json(args.dataset).get('schemes', {}) else '2'
    args.seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    if min(args.steps, args.teacher_steps, args.batch, args.threads) < 1 or min(args.cascades) < 1:
        raise cli.UserError('--steps, --teacher_steps, --batch, --threads and --cascades must be positive')
    args.cascades = sorted(set(args.cascades))
    args.methods = [m for m in LEARNED if m in args.methods]
    if any(LEARNED[m][2] for m in args.methods) and 'teacher' not in args.methods:
        raise cli.UserError('--methods {} distil from the teacher: add teacher'.format(' '.join(args.methods)))
    if args.baselines is None:
        args.baselines = list(DEMO['baselines'] if args.demo else BASELINES)
    elif 'none' in args.baselines:
        args.baselines = []
    if args.demo and args.image_size % 64:
        raise cli.UserError('--image_size must be a multiple of 64 (the VTN stride), got {}'.format(args.image_size))
    return args


def check_config(ctx, store=True):
    """Store the run's settings (unless ``store`` is false); refuse to continue a run made with other settings."""
    config = {k: getattr(ctx.args, k) for k in CONFIG_KEYS}
    inside = os.path.abspath(ctx.spec).startswith(ROOT + os.sep)
    config['dataset'] = os.path.relpath(ctx.spec, ROOT) if inside else ctx.spec   # a project moved is the same run
    path = ctx.path('config.json')
    if os.path.exists(path):
        stored = read_json(path)
        changed = [k for k in CONFIG_KEYS if k in stored and stored[k] != config[k]]
        if changed:
            raise cli.UserError('{} was made with other settings ({}); use another --name or remove it'.format(
                ctx.out, ', '.join('{} {!r} -> {!r}'.format(k, stored[k], config[k]) for k in changed)))
    elif store:
        cli.write_json(path, config)
    ctx.config = dict(config, cascades=ctx.args.cascades, methods=ctx.args.methods, baselines=ctx.args.baselines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['sections']:
        return sections_main(argv[1:])
    args = resolve_args(build_parser().parse_args(argv))
    ctx = Context(args)
    ctx.argv = [os.path.abspath(__file__)] + argv
    sys.path.insert(0, ROOT)
    import baselines
    ctx.skipped_baselines = {m: baselines.missing(m) for m in args.baselines if baselines.missing(m)}
    args.baselines = [m for m in args.baselines if m not in ctx.skipped_baselines]
    stages = plan(ctx)
    check_config(ctx, store=not args.list)
    if args.list:
        hours = [s.info.get('cpu_hours') for s in stages]
        for stage, cpu_hours in zip(stages, hours):
            print('{:9} {:28} {:>9} {}'.format('finished' if stage.finished(ctx) else 'to do', stage.name,
                                               '{:.1f} CPU-h'.format(cpu_hours) if cpu_hours else '', ' '.join(stage.command)))
        todo = sum(h for s, h in zip(stages, hours) if h and not s.finished(ctx))
        if todo:
            print('training still to do: ~{:.1f} CPU-hours ({:.1f} hours on {} cores; estimates from the preset\'s '
                  'seconds per step)'.format(todo, todo / args.threads, args.threads))
        return
    with cli.made_directory(os.path.dirname(ctx.out)), cli.exclusive_output(ctx.out, 'results directory'):
        return run_stages(ctx, stages)


def run_stages(ctx, stages):
    """Run every stage not finished yet, rewriting the report after each; print the tables."""
    args = ctx.args
    os.makedirs(ctx.out, exist_ok=True)
    ctx.versions = versions()
    ctx.say('reproduce {} -> {} ({} stages, {} finished)'.format(
        'demo' if args.demo else args.dataset, ctx.out, len(stages), sum(s.finished(ctx) for s in stages)))
    if ctx.skipped_baselines:
        ctx.say('baselines not installed, marked so in the table: {} (pip install -r requirements-baselines.txt)'
                .format(', '.join(sorted(ctx.skipped_baselines))))
    for stage in stages:
        if run_stage(ctx, stage):
            report(ctx, stages)
    results = report(ctx, stages, figures=True)
    print()
    with open(ctx.path('table1.md')) as f:
        print(f.read())
    with open(ctx.path('table2.md')) as f:
        print(f.read())
    ctx.say('done: {}'.format(', '.join(ctx.rel(ctx.path(n)) for n in (
        'results.json', 'table1.md', 'table2.md', 'figure1.png', 'figure2.png'))))
    return results


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    cli.run(main)
