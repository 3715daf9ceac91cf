"""The plan of a reproduction: what runs, in which order, with which settings; no TensorFlow.

Owns the method table (LEARNED), the baselines, the demo's and the presets' settings, resolving
and checking the command line's settings against a results directory's config.json
(resolve_args, check_config, CONFIG_KEYS), the run's Context (paths, clock, the stages'
environment) and the stages themselves: Stage, one builder per kind (data, train, flows, eval,
baseline, sections) and ``plan(ctx)``, all of them in order. A stage is a command line of the
project's own tools; reproduction.run runs it, reproduction.report reads what it wrote.
"""
import glob
import json
import os
import re
import sys
import time

import baselines
import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, 'models')   # the shipped models (exports), each with its export.json
LEARNED = {  # key: (label, train.py arguments, uses the teacher)
    'teacher': ('VTN + affine (teacher)', ['-b', 'VTN'], False),
    'ldr': ('LDR', ['-b', 'LDR'], False),
    'aldk': ('LDR + ALDK', ['-b', 'LDR', '--aldk'], True),
    'l2': ('LDR + L2 distillation', ['-b', 'LDR', '--distill', 'l2'], True),
    'voxelmorph': ('VoxelMorph + affine', ['-b', 'VoxelMorph'], False),
}
PAPER_LR = 1e-4  # Adam learning rate of the paper and the original code
# Methods with the VTN affine stem train at --teacher_lr: at lr 5e-4 that stem's orthogonality loss
# (s2/s3, with s3 = det(A^T A + eI) near 0) gave the teacher an infinite gradient (README "LPBA40").
VTN_AFFINE_STEM = ('teacher', 'voxelmorph')
BASELINES = ('identity', 'ants_syn', 'ants_syncc', 'elastix_bspline', 'elastix_affine_bspline')
DEMO = {'n_scans': 16, 'n_val': 2, 'n_test': 3, 'image_size': 64, 'steps': 200, 'teacher_steps': 240,
        'batch': 2, 'lr': 1e-3, 'teacher_lr': PAPER_LR, 'methods': ['teacher', 'ldr', 'aldk'], 'paired': True,
        'baselines': [b for b in BASELINES if b != 'ants_syncc']}
LPBA40_DIR = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'LPBA40')
PRESETS = {
    # The LPBA40 protocol as measured here (README "LPBA40"): 128^3, 1 cascade, batch 1; students at
    # lr 5e-4 (an LDR student with the affine augmentation below diverged at 1e-3 after 1700 steps:
    # its light affine stem's determinant loss jumped from 1e-5 to 1e3; without that augmentation
    # 1e-3 trained stably), the VTN teacher and VoxelMorph (its VTN affine stem) at 1e-4 (that stem
    # diverged at 5e-4 here and at 1e-3 in the demo), training on every ordered pair of the training
    # scans and the atlas; 2 seeds per student; every test pair and the 72 inter-subject pairs; a
    # random affine map added to the B-spline augmentation (rotations up to 10 degrees, scales
    # exp(+-0.05), shifts up to 4 voxels = 6 mm) so that models take scans as users send them
    # (bench/robustness.py measures it). VoxelMorph and the teacher train coarse-to-fine, the first
    # 4000 of their 6000 and 8000 steps at 64^3 (README "LPBA40": for the LDR student that gave the
    # same test Dice for 40 % of the CPU time; the teacher gained 1.4 validation points over 8000
    # steps at 128^3 in 65 % of the time), so that each stage fits a session: at 128^3 throughout
    # VoxelMorph took 2.6 hours, the teacher 2.4 on the Intel Xeon.
    # seconds_per_step: wall seconds of one step on 2 cores, validation and checkpoints included, as
    # this preset's own stages took them (their records in results/lpba40/stages: seconds over the
    # steps run; VoxelMorph at 128^3: the steps/s of its first attempt's log), for --list; 'coarse':
    # the same at the coarse size. Machines: the AMD EPYC for the students and the teacher's 128^3
    # step (its stage at 128^3 throughout, records at commit ef6005f); the Intel Xeon for
    # VoxelMorph at 64^3 and the teacher's 64^3 step (teacher-1-coarse: 1289 s for 4000 steps).
    'lpba40': {'dataset': os.path.join(ROOT, 'datasets', 'lpba.json'),
               'lpba40': LPBA40_DIR if os.path.isdir(LPBA40_DIR) else None, 'name': 'lpba40',
               'steps': 6000, 'teacher_steps': 8000, 'batch': 1, 'lr': 5e-4, 'teacher_lr': 1e-4, 'val_steps': 500,
               'seeds': [1, 2], 'seed': 1, 'all_pairs': True, 'refine': 25,
               'coarse_to_fine': ['teacher', 'voxelmorph'], 'coarse_dataset': os.path.join(ROOT, 'datasets', 'lpba64.json'),
               'coarse_steps': 4000,
               'train_flags': ['--data_args', "train_pairs='all'", '--augment_affine', '10', '0.05', '4'],
               'seconds_per_step': {'ldr': 0.39, 'teacher': 1.31, 'aldk': 0.87, 'l2': 0.47, 'voxelmorph': 1.57,
                                    'coarse': {'teacher': 0.32, 'voxelmorph': 0.57}}},
}
FIGURE_PAIRS = 4
FIGURE_METHODS = ('ldr', 'aldk', 'teacher', 'voxelmorph')   # figure 2's rows, in order: each at its first seed
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
        self.coarse_spec = None

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

    def recipe_changed(self, ctx):
        """Whether this finished training stage was trained for other steps or in another phase than
        the plan's (its recipe revised since, e.g. the method moved to --coarse_to_fine). Records
        written before phases existed have no 'phase': a single phase (None)."""
        trained = read_json(self.record_path(ctx))['info']
        return (trained['steps'], trained.get('phase')) != (self.info['steps'], self.info['phase'])

    def reads(self):
        """The training runs whose weights the command reads (its weights/<run> arguments): {run}."""
        return {m.group(1) for token in self.command for m in [re.search(r'(?:^|=)weights/([^/:=\s]+)', str(token))]
                if m}


def python(*args):
    return [sys.executable] + [str(a) for a in args]


def script(name, *args):
    return python(os.path.join(ROOT, name), *args)


def schedule(steps):
    """train.py --round/--epochs running exactly ``steps`` steps, decaying over the last 2 of 5 epochs."""
    rounds = max(1, steps // 5)
    return ['--round', str(rounds), '--epochs', repr(steps / rounds)]


def run_name(ctx, method, n, seed):
    """A training run's name: method-n, with -s<seed> when the students train at several seeds
    (the teacher, one per cascade count, never has it)."""
    if method == 'teacher' or len(ctx.args.seeds) == 1:
        return '{}-{}'.format(method, n)
    return '{}-{}-s{}'.format(method, n, seed)


def seeds_of(ctx, method):
    """The seeds a method trains at: the first one for the teacher, all of --seeds for students."""
    return ctx.args.seeds[:1] if method == 'teacher' else ctx.args.seeds


def phases(ctx, method):
    """A method's training phases, as (phase, steps): [('coarse', S), ('fine', rest)] for the methods
    of --coarse_to_fine, else [(None, steps)]."""
    a = ctx.args
    steps = a.teacher_steps if method == 'teacher' else a.steps
    if method in a.coarse_to_fine:
        return [('coarse', a.coarse_steps), ('fine', steps - a.coarse_steps)]
    return [(None, steps)]


def final_steps(ctx, method):
    """The step of a method's final checkpoint (a coarse-to-fine run's fine phase starts at 0)."""
    return phases(ctx, method)[-1][1]


def train_stage(ctx, method, n, seed, phase, steps):
    """The training stage of a learned method at n cascades and one seed, ``steps`` steps of one of
    its ``phases``: 'coarse' trains run '<run>-coarse' on --coarse_dataset, 'fine' starts the run
    from its weights (--init_from), None trains the run alone."""
    a = ctx.args
    label, flags, needs_teacher = LEARNED[method]
    run = run_name(ctx, method, n, seed)
    coarse_run = run + '-coarse'
    spec, name = (ctx.coarse_spec, coarse_run) if phase == 'coarse' else (ctx.spec, run)
    command = script('train.py', *flags) + ['-n', str(n), '-d', spec, '--batch', str(a.batch)]
    lr = a.teacher_lr if method in VTN_AFFINE_STEM else a.lr
    command += schedule(steps) + ['--lr', repr(lr), '--seed', str(seed), '--output', name,
                                  '--val_steps', str(a.val_steps if a.val_steps is not None else 0),
                                  '--save_steps', str(min(max(1, steps // 4), SAVE_STEPS)),
                                  '--print_steps', str(max(1, steps // 10))] + list(a.train_flags)
    if phase == 'fine':
        command += ['--init_from', os.path.join('weights', coarse_run)]
    if method != 'teacher' and method != 'voxelmorph' and a.student_net_args:
        command += ['--net_args', a.student_net_args]
    if needs_teacher:
        if a.teacher_flows == 'offline':
            command += ['--pretrained_flow_path', os.path.join('flows', 'teacher-{}.h5'.format(n))]
        else:
            command += ['--teacher', os.path.join('weights', 'teacher-{}'.format(n))]
    per_step = ctx.preset.get('seconds_per_step', {})
    per_step = per_step.get('coarse', {}) if phase == 'coarse' else per_step
    hours = steps * per_step.get(method, 0.0) * a.threads / 3600.0
    size = ' at {}^3'.format(read_json(spec)['image_size'][0]) if phase else ''
    return Stage(name, 'train', command, [os.path.join('weights', name)],
                 'train {} ({} cascade{}, {} steps{}{}, seed {})'.format(
                     label, n, 's' if n > 1 else '', steps, size, ', from ' + coarse_run if phase == 'fine' else '',
                     seed),
                 method=method, cascades=n, run=name, steps=steps, seed=seed, phase=phase, cpu_hours=hours or None)


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
        run, final_steps(ctx, method), suffix, a.subset))],
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


def sections_stage(ctx, method, n, seed):
    """Figure 2's warped sections of one run: up to FIGURE_PAIRS moving scans of the subset against
    its first fixed scan (all pairs, not --paired). Planned right after the run's evaluations, so
    that the figure needs no weights a later session may no longer have."""
    a = ctx.args
    run = run_name(ctx, method, n, seed)
    output = os.path.join('figure2', run + '.npz')
    model = shipped_export(ctx, run, final_steps(ctx, method)) or os.path.join('weights', run)
    command = python('-m', 'reproduction.sections', '-d', ctx.spec, '-v', a.subset, '--output', output,
                     '--pairs', FIGURE_PAIRS, '--run', '{}={}'.format(LEARNED[method][0], model))
    return Stage('sections-' + run, 'sections', command, [output], 'warp sections of {} for figure 2'.format(run),
                 method=method, cascades=n, run=run, seed=seed)


def shipped_export(ctx, run, step):
    """The export in models/ frozen from this results directory's run at ``step`` (its export.json's
    checkpoint is <results>/<name>/weights/<run>/model-<step>), or None. Figure 2 draws such a run
    from it: the same network as the run's last weights (with the pure-TF warp), the model users
    get, and on any machine, where the weights stay on the one that trained them."""
    tail = os.path.join(ctx.args.name, 'weights', run, 'model-{}'.format(step))
    for meta_path in sorted(glob.glob(os.path.join(MODELS, '*', 'export.json'))):
        meta = read_json(meta_path)
        if meta.get('step') == step and str(meta.get('checkpoint', '')).endswith(os.sep + tail):
            return os.path.dirname(meta_path)
    return None


def flows_stage(ctx, n):
    """Offline teacher flows of every training pair (eval.py --writing_flow; resumable itself)."""
    store = os.path.join('flows', 'teacher-{}.h5'.format(n))
    command = script('eval.py', '-c', os.path.join('weights', 'teacher-{}'.format(n)), '-d', ctx.spec, '-v', '1',
                     '--writing_flow', store)
    return Stage('flows-{}'.format(n), 'flows', command, [store],
                 'teacher flows of the training pairs ({} cascade{})'.format(n, 's' if n > 1 else ''), cascades=n)


def data_stages(ctx):
    """The demo's synthetic set, or the HDF5 files of the spec and of --coarse_dataset that are
    missing (built from --lpba40); sets ctx.spec and ctx.coarse_spec."""
    a = ctx.args
    if a.demo:
        ctx.spec = ctx.path('data', 'synthetic.json')
        command = python('-m', 'data_util.synthetic', 'data', '--n_scans', a.demo_scans, '--image_size',
                         a.image_size, '--seed', a.seed, '--n_val', DEMO['n_val'], '--n_test', a.demo_test)
        return [Stage('data', 'data', command, ['data/synthetic.json', 'data/synthetic.h5'],
                      'synthetic liver-like data: {} scans of {}^3'.format(a.demo_scans, a.image_size))]
    ctx.spec = os.path.abspath(a.dataset)
    stages = spec_data_stage(ctx, a.dataset, 'data')
    if a.coarse_to_fine:
        ctx.coarse_spec = os.path.abspath(a.coarse_dataset)
        stages += spec_data_stage(ctx, a.coarse_dataset, 'data-coarse')
    return stages


def spec_data_stage(ctx, spec_path, name):
    """[] when every HDF5 file of the spec exists, else the stage building its one missing file
    from --lpba40 at the spec's image size."""
    a = ctx.args
    if not os.path.exists(spec_path):
        raise cli.UserError('dataset spec {} not found'.format(spec_path))
    missing = missing_files(spec_path)
    if not missing:
        return []
    if not a.lpba40:
        raise cli.UserError('{} of spec {} is missing; build it with data_util.prepare (for LPBA40: '
                            'python reproduce.py ... --lpba40 DIR)'.format(missing[0], spec_path))
    if len(missing) != 1:
        raise cli.UserError('--lpba40 builds one HDF5 file, but {} lists {} missing'.format(spec_path, len(missing)))
    size = read_json(spec_path)['image_size']
    command = python('-m', 'data_util.prepare', '--lpba40', os.path.abspath(a.lpba40), '--output', missing[0],
                     '--image_size', size[0] if isinstance(size, list) else size)
    return [Stage(name, 'data', command, [missing[0]], 'LPBA40 -> {}'.format(missing[0]))]


def missing_files(spec_path):
    """HDF5 files a spec lists that exist neither beside the spec nor relative to the cwd (absolute paths)."""
    spec = read_json(spec_path)
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
    stages += [baseline_stage(ctx, method) for method in a.baselines]  # the anchors first: hours, not days
    smallest = min(a.cascades)
    for n in a.cascades:
        for method in a.methods:
            if method == 'voxelmorph' and n != smallest:
                continue
            for seed in seeds_of(ctx, method):
                stages += [train_stage(ctx, method, n, seed, phase, steps) for phase, steps in phases(ctx, method)]
                stages.append(eval_stage(ctx, method, n, seed))
                if a.all_pairs:
                    stages.append(eval_stage(ctx, method, n, seed, all_pairs=True))
                if a.refine and method in REFINED:
                    stages.append(eval_stage(ctx, method, n, seed, refine=a.refine))
                if n == smallest and method in FIGURE_METHODS and seed == seeds_of(ctx, method)[0]:
                    stages.append(sections_stage(ctx, method, n, seed))
            if method == 'teacher' and a.teacher_flows == 'offline' and any(LEARNED[m][2] for m in a.methods):
                stages.append(flows_stage(ctx, n))
    for method in a.baselines:
        if a.all_pairs and method in ALL_PAIRS_BASELINES:
            stages.append(baseline_stage(ctx, method, all_pairs=True))
    return stages


# Settings a run's training recipe may change between sessions: the training stages they change are
# trained again (run.stale_stages), with the stages that read their weights; the other settings
# change every stage, so that a results directory made with other values of them is refused.
RECIPE_KEYS = ('coarse_to_fine', 'coarse_steps')
CONFIG_KEYS = ('demo', 'dataset', 'steps', 'teacher_steps', 'batch', 'lr', 'teacher_lr', 'subset', 'paired', 'teacher_flows',
               'student_net_args', 'seed', 'image_size', 'demo_scans', 'demo_test', 'threads', 'seeds', 'all_pairs',
               'train_flags', 'refine', 'coarse_to_fine', 'coarse_dataset', 'coarse_steps')


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
    check_coarse_to_fine(args)
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


def check_coarse_to_fine(args):
    """--coarse_to_fine needs --coarse_dataset and 0 < --coarse_steps < the method's steps."""
    args.coarse_to_fine = [m for m in LEARNED if m in (args.coarse_to_fine or [])]
    if not args.coarse_to_fine:
        args.coarse_dataset = args.coarse_steps = None
        return
    if args.demo or not args.coarse_dataset:
        raise cli.UserError('--coarse_to_fine needs -d SPEC and --coarse_dataset SPEC (the same scans at a coarser size)')
    if not os.path.isfile(args.coarse_dataset):
        raise cli.UserError('coarse dataset spec {} not found'.format(args.coarse_dataset))
    shortest = min(args.teacher_steps if m == 'teacher' else args.steps for m in args.coarse_to_fine)
    if not args.coarse_steps or not 0 < args.coarse_steps < shortest:
        raise cli.UserError('--coarse_steps must be between 0 and the steps of {} ({}), got {}'.format(
            ' '.join(args.coarse_to_fine), shortest, args.coarse_steps))


def check_config(ctx, store=True):
    """Store the run's settings (unless ``store`` is false); refuse to continue a run made with other
    settings, but for RECIPE_KEYS (said in one line). A setting the stored config lacks (one added to
    reproduce.py since) is added to it."""
    config = {k: getattr(ctx.args, k) for k in CONFIG_KEYS}
    config['dataset'] = project_relative(ctx.spec)
    config['coarse_dataset'] = ctx.coarse_spec and project_relative(ctx.coarse_spec)
    path = ctx.path('config.json')
    stored = read_json(path) if os.path.exists(path) else {}
    changed = [k for k in CONFIG_KEYS if k in stored and stored[k] != config[k]]
    revised = [k for k in changed if k in RECIPE_KEYS]
    if revised:
        ctx.say('the training recipe changed since {} was made ({}): the training stages it changes run again'.format(
            ctx.out, ', '.join('{} {!r} -> {!r}'.format(k, stored[k], config[k]) for k in revised)))
    changed = [k for k in changed if k not in RECIPE_KEYS]
    if changed:
        raise cli.UserError('{} was made with other settings ({}); use another --name or remove it'.format(
            ctx.out, ', '.join('{} {!r} -> {!r}'.format(k, stored[k], config[k]) for k in changed)))
    if store and stored != config:
        cli.write_json(path, config)
    ctx.config = dict(config, cascades=ctx.args.cascades, methods=ctx.args.methods, baselines=ctx.args.baselines)


def project_relative(path):
    """A path inside the project relative to it (a project moved is the same run), else as given."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def note_missing_baselines(ctx):
    """ctx.missing_baselines: {baseline: one-line reason} for the baselines whose package is not
    installed here. They stay in the plan: their finished stages are reported, the others are
    skipped and their rows say 'not installed'."""
    ctx.missing_baselines = {m: baselines.missing(m) for m in ctx.args.baselines if baselines.missing(m)}


def read_json(path):
    with open(path) as f:
        return json.load(f)
