"""The report of a reproduction, rewritten from the stage records and the evaluation JSON files.

Owns results.json (settings, versions, every stage's record, every method's evaluation summary,
the tables' rows, the figures' data), table1.md and table2.md (rows and rendering; at several
seeds the mean and the spread over seeds: combine_seeds), figure1.png and figure2.png (matplotlib
imported when drawn; figure 2 draws the sections reproduction.sections saved per run) and versions().
Every table number is a number of results.json.
"""
import datetime
import os
import platform
import subprocess
import sys

import baselines
import cli
from reproduction.plan import BASELINES, FIGURE_METHODS, LEARNED, ROOT, project_relative, read_json


def stage_records(ctx, stages):
    return {s.name: read_json(s.record_path(ctx)) for s in stages if s.finished(ctx)}


def earlier_trainings(stages, records):
    """Notes on finished training stages that read another stage's output (a teacher's weights, its
    flows, a coarse phase's weights) made again after they finished (on another machine, which had
    not their weights): they were trained from an earlier version of it than the one the tables
    report. [str], one per such stage and output."""
    producers = {output: stage for stage in stages for output in stage.outputs}
    notes = []
    for stage in stages:
        finished = records.get(stage.name, {}).get('finished')
        if stage.kind != 'train' or finished is None:
            continue
        for token in stage.command:
            producer = producers.get(token)
            remade = producer and records.get(producer.name, {}).get('finished', '')
            if remade and remade > finished:
                notes.append('{} was trained from {} as it was before stage {} made it again (finished {}), '
                             'not from the one reported here'.format(stage.name, token, producer.name, remade))
    return notes


def timing_machines(methods, records):
    """{CPU name: [method label]} of the machines that timed table 1's rows (their evaluation stages'
    records; 'not recorded' for records older than the CPU field), when more than one did, else {}:
    seconds per pair compare only within a machine."""
    machines = {}
    for entry in methods.values():
        if entry.get('status') == 'ok':
            cpus = {(records[name].get('versions') or {}).get('cpu') or 'not recorded' for name in entry['eval_stages']}
            for cpu in sorted(cpus):
                machines.setdefault(cpu, []).append(entry['label'])
    return machines if len(machines) > 1 else {}


def render_machines(machines):
    """table 1's closing note on timings from several machines ('' when one timed them all)."""
    if not machines:
        return ''
    return '\nNote: CPU s/pair were measured on {} machines, which compare only within one: {}.\n'.format(
        len(machines), '; '.join('{}: {}'.format(cpu, ', '.join(labels)) for cpu, labels in machines.items()))


def qualified(label, qualifier):
    """A method label with a qualifier in its trailing parenthesis, or in a new one:
    ('VTN + affine (teacher)', 'coarse-to-fine') -> 'VTN + affine (teacher, coarse-to-fine)'."""
    if label.endswith(')'):
        return '{}, {})'.format(label[:-1], qualifier)
    return '{} ({})'.format(label, qualifier)


def method_entries(ctx, stages, records):
    """results.json 'methods': per evaluated method or baseline (keyed like 'aldk-1' or 'ants_syn') its
    label, status ('ok', 'pending', 'not installed') and, when evaluated, its evaluation summary
    (learned methods at several seeds: `combine_seeds`); 'all_pairs' the same on every ordered
    pair of the subset when that was evaluated."""
    entries = {}
    for method in BASELINES:
        evaluations = [s for s in stages if s.kind == 'baseline' and s.info['method'] == method]
        if not evaluations:
            continue
        entry = {'label': baselines.METHODS[method]['label'], 'method': method, 'cascades': None,
                 'kind': 'classical', 'package': baselines.METHODS[method]['package'], 'status': 'pending'}
        entries[method] = add_evaluations(ctx, entry, evaluations, records, ctx.missing_baselines.get(method))
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
            label = LEARNED[method][0]
            if method in ctx.args.coarse_to_fine:
                label = qualified(label, 'coarse-to-fine')
            label += ' + {} refinement iterations'.format(refine) if refine else ''
            entry = {'label': label, 'method': method, 'cascades': n, 'kind': 'learned', 'status': 'pending',
                     'refine': refine}
            entries[key] = add_evaluations(ctx, entry, evaluations, records)
    return entries


def add_evaluations(ctx, entry, stages, records, missing=None):
    """Fill a method entry from its finished evaluation stages' JSON (eval.py's schema): one per
    seed, on the subset's pairs and (all_pairs) on every ordered pair of it. ``missing``: why the
    method cannot run here (a baseline's package not installed): its unfinished evaluations are
    'not installed' rather than 'pending'."""
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
        if len(done) < len(chosen):
            if missing:
                target.update({'status': 'not installed', 'reason': missing})
            continue
        data = {s.info.get('seed'): read_json(ctx.path(s.outputs[0])) for s in done}
        summary = combine_seeds([with_refinement_seconds(d['summary']) for d in data.values()])
        first = next(iter(data.values()))
        target.update({'status': 'ok', 'sources': [s.outputs[0] for s in done], 'summary': summary,
                       'per_class': first.get('per_class') if len(data) == 1 else None,
                       'parameters': first.get('parameters'), 'pairs': len(first['pairs']),
                       'seeds': sorted(k for k in data if k is not None) or None,
                       'seconds_per_pair': summary['seconds_per_pair']})
        if len(data) > 1:
            target['per_seed'] = {str(k): d['summary'] for k, d in data.items()}
    return entry


def with_refinement_seconds(summary):
    """eval.py's summary with seconds_per_pair the whole registration: the network's seconds plus
    the refinement's (kept apart by eval.py as seconds_refine_per_pair) when it refined."""
    if not summary.get('seconds_refine_per_pair'):
        return summary
    return dict(summary, seconds_per_pair=summary['seconds_per_pair'] + summary['seconds_refine_per_pair'],
                seconds_network_per_pair=summary['seconds_per_pair'])


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


def render_notes(notes):
    """A table's closing note lines for ``earlier_trainings``' notes ('' when none)."""
    return ''.join('\nNote: {}.\n'.format(note) for note in notes)


def render_table1(rows, meta):
    landmarks = any(r['landmark_dist'] is not None for r in rows)
    seeds = any(r['seeds'] and len(r['seeds']) > 1 for r in rows)
    all_pairs = any(r['dice_all_pairs'] is not None for r in rows)
    head = (['Method', 'Cascades'] + (['Seeds'] if seeds else []) + ['Dice', 'Jacc']
            + (['Landmark dist. (vox)'] if landmarks else []) + ['Jacobian std', 'Folding %', 'CPU s/pair', 'Parameters']
            + (['Dice, all pairs'] if all_pairs else []))
    lines = ['# Table 1: registration accuracy, speed and size', '',
             '{} pairs of {} ({}), {}; CPU seconds per pair: median, network only (learned; with refinement: '
             'network + refinement) or the registration call only (classical), {} threads. Dice and Jaccard of the label maps on the '
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


def write(ctx, stages):
    """Write results.json, table1.md, table2.md, figure1.png and figure2.png from the finished stages
    (after every stage: a run cut off by the end of a session leaves a complete report of what it did)."""
    a = ctx.args
    records = stage_records(ctx, stages)
    methods = method_entries(ctx, stages, records)
    evaluated = [e for e in methods.values() if e.get('status') == 'ok']
    meta = {'dataset': project_relative(ctx.spec),
            'subset': a.subset, 'pairing': 'adjacent pairs' if a.paired else 'all pairs (atlas pairs with an atlas)',
            'pairs': max([e['pairs'] for e in evaluated], default=0), 'threads': a.threads}
    t1 = table1_rows(methods)
    t2 = table2_rows(methods, a.cascades)
    notes = earlier_trainings(stages, records)
    machines = timing_machines(methods, records)
    results = {'name': a.name, 'command': [sys.executable] + ctx.argv, 'config': ctx.config, 'meta': meta,
               'versions': ctx.versions, 'stages': records, 'methods': methods, 'table1': t1, 'table2': t2,
               'notes': notes, 'timing_machines': machines,
               'updated': datetime.datetime.now().isoformat(timespec='seconds')}
    cli.write_atomic(ctx.path('table1.md'), render_table1(t1, meta) + render_machines(machines) + render_notes(notes))
    cli.write_atomic(ctx.path('table2.md'), render_table2(t2, meta) + render_notes(notes))
    results['figures'] = {'figure1.png': figure1(ctx, methods), 'figure2.png': figure2(ctx, stages)}
    cli.write_json(ctx.path('results.json'), results)
    return results


def figure1(ctx, methods):
    """Dice (lines) and CPU seconds per pair (bars) against the number of cascades: the teacher, LDR and LDR + ALDK."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    a = ctx.args
    series = [(m, LEARNED[m][0]) for m in ('teacher', 'ldr', 'aldk') if m in a.methods]
    x = np.arange(len(a.cascades))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax2 = ax.twinx()
    used = {}
    colours = {'teacher': '#4c72b0', 'ldr': '#55a868', 'aldk': '#dd8452'}
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
    measured = [d for m in used.values() for d in m['dice'] if d is not None]
    if measured:
        ax2.set_ylim(max(0.0, min(measured) - 0.05), min(1.0, max(measured) + 0.02))
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.set_title('Dice and CPU time vs cascades ({})'.format(os.path.basename(ctx.spec)))
    fig.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc='lower center', ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.01 + 0.045 * len(series), 1, 1))
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


def figure2(ctx, stages):
    """Sections of the warped images and warped segmentations per method, like the paper's figure 2:
    one row per sections stage whose file exists, in FIGURE_METHODS order."""
    import numpy as np
    order = {m: i for i, m in enumerate(FIGURE_METHODS)}
    found = sorted((s for s in stages if s.kind == 'sections' and os.path.exists(ctx.path(s.outputs[0]))),
                   key=lambda s: order[s.info['method']])
    if not found:
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = []
    for stage in found:
        with np.load(ctx.path(stage.outputs[0]), allow_pickle=False) as data:
            runs.append({k: data[k] for k in data.files})
    sections = runs[0]
    for other, stage in zip(runs[1:], found[1:]):
        if list(other['pair_ids']) != list(sections['pair_ids']) or int(other['index']) != int(sections['index']):
            raise ValueError('{} holds other pairs or another slice than {}'.format(stage.outputs[0], found[0].outputs[0]))
    labels = [str(r['label']) for r in runs]
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
        fixed_id, moving_id = str(sections['pair_ids'][p]).split()
        axes[0, 2 * p].set_title('{} -> {}'.format(moving_id, fixed_id), fontsize=8)
        for i, label in enumerate(labels):
            show(axes[i + 2, 2 * p], runs[i]['warped'][p], cmap='gray', vmin=0, vmax=255)
            show(axes[i + 2, 2 * p + 1], overlay(sections['fixed_seg'], runs[i]['warped_seg'][p]))
    for i, label in enumerate(['fixed', 'moving'] + labels):
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.suptitle('Warped images and segmentations, slice {} of axis {}\nwhite = matched, red = mismatched'
                 .format(int(sections['index']), int(sections['axis'])), fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.path('figure2.png'), dpi=110)
    plt.close(fig)
    return {'sections': [s.outputs[0] for s in found], 'methods': labels, 'models': [str(r['source']) for r in runs],
            'pairs': [str(p) for p in sections['pair_ids']]}

