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
  <run>-coarse    with --coarse_to_fine: the run's first --coarse_steps steps on --coarse_dataset; then
                  <run> trains the remaining steps at full size from its weights (train.py --init_from)
  eval-<run>      eval.py -c weights/<run> -v SUBSET       metrics + network-only CPU seconds per pair
  baseline-<m>    python -m baselines.evaluate <m>         no registration, ANTs SyN, Elastix B-spline (+ affine)
  sections-<run>  python -m reproduction.sections ...      figure 2's warped sections of a run (ldr, aldk,
                  teacher, voxelmorph at their first seed), right after its evaluations; from the
                  run's export in models/ when one is shipped (its final step), else its weights

A stage is finished when its record stages/<stage>.json exists (written atomically after the
command succeeded); a re-run skips finished stages, and a training stage stopped half-way
resumes from its last checkpoint (train.py -c). A failed stage stops the run with one line
naming the stage and its log (stage_logs/<stage>.log). After every stage results.json,
table1.md, table2.md, figure1.png and figure2.png are rewritten from the stage records and the
evaluation JSON files. Every table number is a number of results.json,
which also holds each stage's command line, return code, wall time and outputs, and the
versions of Python, TensorFlow and the baseline packages.

This script is the command line; the work is done in reproduction/: plan.py (settings, stages),
run.py (running and resuming them), report.py (results.json, tables, figures) and sections.py
(figure 2's TensorFlow worker, a subprocess of the sections stages).

Choices:
  - Timing (table 1, "CPU s/pair"): eval.py's median network-only seconds per pair at batch 1;
    the baselines' registration call alone (median). Every stage runs with TF_NUM_INTRAOP_THREADS,
    TF_NUM_INTEROP_THREADS and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS set to --threads (2).
  - Learning rate: Adam --lr (the LDR students) and --teacher_lr (the teacher and VoxelMorph, whose
    VTN affine stem diverged at 5e-4 on LPBA40) with the original's step
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
import os
import sys

import cli
from reproduction.plan import (BASELINES, DEMO, LEARNED, PRESETS, Context, check_config, note_missing_baselines, plan,
                               resolve_args)
from reproduction.run import list_stages, run_stages


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
                   help='initial Adam learning rate of the LDR students (default 1e-4; demo 1e-3)')
    p.add_argument('--teacher_lr', type=float, default=None,
                   help='initial Adam learning rate of the teachers and VoxelMorph, the methods with the VTN '
                        'affine stem (default --lr; demo 1e-4)')
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
    p.add_argument('--coarse_to_fine', nargs='+', choices=list(LEARNED), default=None, metavar='METHOD',
                   help='train these methods coarse-to-fine: --coarse_steps steps on --coarse_dataset first (run '
                        '<run>-coarse), the rest on -d starting from those weights (train.py --init_from)')
    p.add_argument('--coarse_dataset', default=None, metavar='SPEC',
                   help='the same scans at a coarser size (e.g. datasets/lpba64.json), for --coarse_to_fine')
    p.add_argument('--coarse_steps', type=int, default=None, help='steps of the coarse phase (of --steps)')
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
    p.add_argument('--only', nargs='+', default=None, metavar='STAGE',
                   help="run only these stages (names or shell patterns, e.g. 'baseline-*' 'voxelmorph-*'), with "
                        "the training a chosen stage needs again; the report still covers every finished stage")
    p.add_argument('--again', nargs='+', default=[], metavar='STAGE',
                   help="run these finished stages again (names or shell patterns), with the stages that read what "
                        "they wrote: e.g. a student trained from a teacher trained again since (the note under the "
                        "tables names such runs)")
    p.add_argument('--list', action='store_true', help='print the stages and whether they are finished, then exit')
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    ctx = Context(args)
    ctx.argv = [os.path.abspath(__file__)] + argv
    note_missing_baselines(ctx)
    stages = plan(ctx)
    check_config(ctx, store=not args.list)
    if args.list:
        return list_stages(ctx, stages)
    with cli.made_directory(os.path.dirname(ctx.out)), cli.exclusive_output(ctx.out, 'results directory'):
        return run_stages(ctx, stages)


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
