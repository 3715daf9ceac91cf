"""Running a plan: each stage as a subprocess in results/<name>/, resumable.

Owns the stage's subprocess (its log under stage_logs/, the lines echoed to the console), a
training stage's resuming from its last checkpoint (train.py -c) and the pruning of its
intermediate checkpoints, the stage's record stages/<stage>.json (its 'finished' marker: a stage
is finished when its record exists, whatever its command, but for a revised training recipe,
below), the run loop that rewrites the report after every stage, and ``--list``'s table of the
stages and their state.

Weights are not kept with the results (weights/ stays on the machine that trained them): on
another machine a finished training stage whose weights a stage still to run reads (a teacher
for distillation, runs figure 2 draws from their weights) is trained again, and the stages that read the earlier
weights (its evaluations) run again with it, so that the tables describe the weights used. Other
finished runs trained from the earlier weights (a teacher's other students) are kept, and the
report says so under the tables (report.earlier_trainings). The same holds for a chosen training
stage whose recipe changed since it finished (plan.RECIPE_KEYS: e.g. a method moved to
coarse-to-fine): it trains again, and the stages that read its weights run again.
"""
import datetime
import fnmatch
import glob
import os
import shutil
import subprocess
import time

import cli
import runs
from reproduction import report
from reproduction.plan import read_json

ECHO_PREFIXES = ('step ', 'validation at', 'Finished', 'Graph built', 'Distillation', 'Teacher flows', 'wrote ',
                 'Evaluating', 'Restored', 'warning', 'error')


def echo(line):
    """Whether a stage's output line is shown on the console (the rest goes to its log only)."""
    text = line.strip()
    return bool(text) and (text.startswith(ECHO_PREFIXES) or ' s/pair' in text or
                           (': Dice ' in text and '|' not in text))


def train_command(ctx, stage):
    """The command of a training stage: resume its run with -c (instead of the options that start a
    run: --output, --init_from) when a checkpoint exists, else start afresh (a run directory without
    a complete checkpoint is removed first)."""
    run_dir = ctx.path('weights', stage.info['run'])
    if not os.path.isdir(run_dir):
        return stage.command, None
    found = runs.list_checkpoints(run_dir)
    if not found or not os.path.exists(os.path.join(run_dir, 'args.json')):
        shutil.rmtree(run_dir)
        shutil.rmtree(ctx.path('logs', stage.info['run']), ignore_errors=True)
        return stage.command, None
    command = list(stage.command)
    for option in ('--output', '--init_from'):
        if option in command:
            i = command.index(option)
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
    if stage.kind == 'baseline' and stage.info['method'] in ctx.missing_baselines:
        ctx.say('skip {}: {}'.format(stage.name, ctx.missing_baselines[stage.info['method']]))
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
    """The stage's record (its 'finished' marker): command line, return code, wall seconds, outputs,
    and the versions and machine that ran it (a protocol's stages may run on several machines)."""
    record = {'stage': stage.name, 'kind': stage.kind, 'command': command, 'cwd': ctx.out, 'returncode': code,
              'seconds': seconds, 'resumed_from_step': resumed, 'outputs': stage.outputs, 'log': log,
              'finished': datetime.datetime.now().isoformat(timespec='seconds'), 'info': stage.info,
              'versions': ctx.versions}
    cli.write_json(stage.record_path(ctx), record)


def named_stages(stages, patterns, option):
    """The stages matching any of the shell-style name patterns; UserError for a pattern matching none."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(s.name, pattern) for s in stages):
            raise cli.UserError('{} {!r} matches no stage of this plan (--list shows them)'.format(option, pattern))
    return [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def chosen_stages(ctx, stages):
    """The stages --only names (all stages without it), and the data stage, which every other one needs."""
    named = named_stages(stages, ctx.args.only or ['*'], '--only')
    return [s for s in stages if s.kind == 'data' or s in named]


def asked_again(ctx, stages):
    """The finished stages --again names."""
    return [s for s in named_stages(stages, ctx.args.again, '--again') if s.finished(ctx)]


def revised_runs(ctx, stages, chosen):
    """{run}: the finished training stages --again names, and the chosen ones trained with another
    recipe than the plan's (Stage.recipe_changed)."""
    asked = {s.info['run'] for s in asked_again(ctx, stages) if s.kind == 'train'}
    return asked | {s.info['run'] for s in chosen if s.kind == 'train' and s.finished(ctx) and s.recipe_changed(ctx)}


def stale_stages(ctx, stages, chosen):
    """[stage] to run again: the finished stages --again names, chosen finished training stages
    whose recipe changed since (revised_runs), finished training stages whose weights are gone
    from weights/ while a chosen stage still to run, or a stage run again, reads them (a student
    trained again needs its teacher), and the finished stages that read the weights of any."""
    def weights_here(run):
        return os.path.isdir(ctx.path('weights', run)) and runs.list_checkpoints(ctx.path('weights', run))

    revised = revised_runs(ctx, stages, chosen)
    asked = asked_again(ctx, stages)
    stale = []
    while True:
        pending = set().union(*[s.reads() for s in chosen if not s.finished(ctx)],
                              *[s.reads() for s in stale if s.kind == 'train'])
        gone = revised | {s.info['run'] for s in stages if s.kind == 'train' and s.finished(ctx)
                          and s.info['run'] in pending and not weights_here(s.info['run'])}
        found = [s for s in stages if s.finished(ctx) and (s.kind == 'train' and s.info['run'] in gone
                                                            or s.kind != 'train' and (s.reads() & gone or s in asked))]
        if found == stale:
            return stale
        stale = found


def forget(ctx, stage):
    """Remove a stage's record, and the evaluation files its record lists (with their text reports),
    which describe weights it will replace: a run of other steps writes files of another name."""
    if stage.kind in ('eval', 'sections'):
        for output in read_json(stage.record_path(ctx))['outputs']:
            stem = os.path.splitext(ctx.path(output))[0]
            for path in (ctx.path(output), stem + '.txt'):
                if os.path.isfile(path):
                    os.remove(path)
    os.remove(stage.record_path(ctx))


def run_stages(ctx, stages):
    """Run every chosen stage not finished yet (and those it needs run again), rewriting the report
    of the whole plan after each; print the tables."""
    args = ctx.args
    chosen = chosen_stages(ctx, stages)
    os.makedirs(ctx.out, exist_ok=True)
    asked = asked_again(ctx, stages)
    revised = revised_runs(ctx, stages, chosen)
    stale = stale_stages(ctx, stages, chosen)
    for stage in stale:
        if stage in asked:
            reason = '--again names it'
        elif stage.kind == 'train':
            reason = 'trained with another recipe than the plan\'s' if stage.info['run'] in revised else \
                'the weights it wrote are not on this machine and a stage still to run needs them'
        else:
            reason = 'the weights it read are trained again ({})'.format(
                'named by --again or of another recipe' if stage.reads() & revised else 'not on this machine')
        ctx.say('{}: run again: {}'.format(stage.name, reason))
        forget(ctx, stage)
    ctx.versions = report.versions()
    ctx.say('reproduce {} -> {} ({} stages, {} finished)'.format(
        'demo' if args.demo else args.dataset, ctx.out, len(stages), sum(s.finished(ctx) for s in stages)))
    unrunnable = sorted({s.info['method'] for s in chosen if s.kind == 'baseline' and not s.finished(ctx)
                         and s.info['method'] in ctx.missing_baselines})
    if unrunnable:
        ctx.say('baselines not installed, marked so in the table: {} (pip install -r requirements-baselines.txt)'
                .format(', '.join(unrunnable)))
    for stage in stages:
        if (stage in chosen or stage in stale) and run_stage(ctx, stage):
            report.write(ctx, stages)
    results = report.write(ctx, stages)
    print()
    with open(ctx.path('table1.md')) as f:
        print(f.read())
    with open(ctx.path('table2.md')) as f:
        print(f.read())
    ctx.say('done: {}'.format(', '.join(ctx.rel(ctx.path(n)) for n in (
        'results.json', 'table1.md', 'table2.md', 'figure1.png', 'figure2.png'))))
    return results


def list_stages(ctx, stages):
    """Print every stage with its state, its CPU-hours estimate and its command; then the training still to do."""
    hours = [s.info.get('cpu_hours') for s in stages]
    chosen = chosen_stages(ctx, stages)
    stale = stale_stages(ctx, stages, chosen)
    for stage, cpu_hours in zip(stages, hours):
        state = 'again' if stage in stale else 'finished' if stage.finished(ctx) else \
            'no pkg' if stage.kind == 'baseline' and stage.info['method'] in ctx.missing_baselines else \
            'to do' if stage in chosen else 'not now'
        print('{:9} {:28} {:>9} {}'.format(state, stage.name,
                                           '{:.1f} CPU-h'.format(cpu_hours) if cpu_hours else '', ' '.join(stage.command)))
    todo = sum(h for s, h in zip(stages, hours) if h and (s in stale or s in chosen and not s.finished(ctx)))
    if todo:
        print('training still to do: ~{:.1f} CPU-hours ({:.1f} hours on {} cores; estimates from the preset\'s '
              'seconds per step)'.format(todo, todo / ctx.args.threads, ctx.args.threads))
