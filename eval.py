"""Evaluate a checkpoint on a subset, as the original eval.py.

    python eval.py -c weights/my_run -d datasets/liver.json -v sliver-val
    python eval.py -c weights/my_run:20000 -r 2 --paired -v lspig-val
    python eval.py -c weights/teacher --writing_flow flows.h5 -v 1   # teacher flows for offline ALDK
    python eval.py -c models/lpba40-ldr -d datasets/lpba.json -v test   # an export (the shipped model)

Writes <eval_output_dir>/<run>-<step>[-rep<R>][-<name>]-<subset>.txt (a line per pair and a
Summary block, like the original) and the same name .json (per-pair, per-class and summary
metrics, seconds per pair, parameter count). Existing results are kept unless --force.

Dice and Jaccard are measured on the fixed scan's original grid, as predict.py measures them,
when the dataset holds the scans' original geometry and label maps (see evaluation.py).

-c may also be an export of predict.py --export (frozen: no -r, --net_args, --flow_multiplier,
--tf_warp, --fast_reconstruction or --writing_flow); it runs as predict.py runs it (ONNX Runtime
where installed, else TensorFlow) and its files are named <export directory>-export-<subset>.
"""
import argparse  # noqa: F401  (RawDescriptionHelpFormatter)
import contextlib
import math
import os
import sys
import time

import numpy as np

import cli
import registration
import runs
from evaluation import (FrameworkEvaluator, MetricGraph, NetworkEvaluator, overlap_values, pair_record, report_text,
                        summarize)
from network.export import is_export


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', required=True, help='run directory, DIR:STEP or checkpoint prefix')
    p.add_argument('-d', '--dataset', default=None, help="JSON dataset spec (default: the run's)")
    p.add_argument('-v', '--val_subset', default=None,
                   help='comma-separated subsets or schemes to evaluate (default: scheme 2, validation)')
    p.add_argument('--batch', type=cli.positive_int, default=1, help='pairs per batch')
    p.add_argument('-r', '--rep', type=int, default=None, help='shared-weight repeats (may exceed training\'s)')
    p.add_argument('-g', '--gpu', default='-1', help='-1 = CPU (default) or a GPU id')
    p.add_argument('--paired', action='store_true', help='adjacent pairs (s0,s1),(s1,s0),... instead of all pairs')
    p.add_argument('--all_pairs', action='store_true',
                   help='every ordered pair among the subset\'s scans, also when the spec has an atlas '
                        '(result files get the suffix -all_pairs)'),
    p.add_argument('--flow_multiplier', type=float, default=None, help='scale of the predicted flows')
    p.add_argument('--data_args', default='', help='dataset options as key=value pairs')
    p.add_argument('--net_args', default='', help='network options overriding the run\'s')
    p.add_argument('--eval_output_dir', default='evaluate', help='where result files go')
    p.add_argument('--name', default=None, help='suffix of the result files')
    p.add_argument('--force', action='store_true', help='overwrite existing result files')
    p.add_argument('--fast_reconstruction', action='store_true', help='require the compiled warp op')
    p.add_argument('--tf_warp', action='store_true', help='force the pure-TensorFlow warp')
    cli.add_refine_flags(p)
    p.add_argument('--writing_flow', default=None, metavar='STORE',
                   help='instead of evaluating, write the final composed flow of every training pair of the subsets '
                        '(default -v: scheme 1, training; the pairs train.py draws, as --data_args train_pairs sets '
                        'them) of a VTN RCN teacher into the HDF5 store STORE '
                        '(float16, keyed "id1-id2", for train.py --aldk --pretrained_flow_path); with --refine N, '
                        'each flow after N refinement iterations on its pair; resumable: pairs already stored '
                        'are skipped')
    return p


def evaluate(evaluator, dataset, subset, batch_size, class_names, refine=0, refiner=None):
    """Per-pair records of one subset: ids, metrics, per-class dice/jacc, seconds (network only).

    evaluator: evaluation.FrameworkEvaluator or NetworkEvaluator. dice / jacc are measured on
    the original grids when the dataset has them (see the module doc), else on the preprocessed
    grid; dice_grid / jacc_grid always on the grid. seconds: wall time of the evaluator's
    ``register`` per pair of its batch. The first batch is registered once untimed beforehand,
    so the one-off graph set-up is not counted. refine: with a network.refine.Refiner, that many
    iterations on each pair's flow before its metrics; the record then holds 'refinement' (its
    seconds per iteration, losses) and seconds_refine.
    """
    values = overlap_values(dataset.segmentation_class_value, class_names)
    records = []
    warmed = False
    progress = cli.progress(dataset.num_pairs(subset), 'evaluating {}'.format(subset), 'pair')
    for batch in dataset.generator(subset, batch_size=batch_size):
        if not warmed:
            evaluator.register(batch)
            warmed = True
        t0 = time.perf_counter()
        flow = evaluator.register(batch)
        seconds = (time.perf_counter() - t0) / len(flow)
        refined = []
        if refine:
            flow = np.array(flow)
            for i in range(len(flow)):
                flow[i], record = refiner.refine(batch['voxel1'][i, ..., 0], batch['voxel2'][i, ..., 0], flow[i], refine)
                refined.append(record)
        res = evaluator.metrics(batch, flow)
        for i in range(len(flow)):
            records.append(pair_record(dataset, batch, i, res, flow[i], seconds, values))
            if refined:
                records[-1].update(refinement=refined[i], seconds_refine=refined[i]['seconds'])
        progress.update(len(flow))
    progress.close()
    return records


def net_overrides(args):
    """--net_args and --flow_multiplier as a dict of net_args overriding the run's."""
    extra = cli.parse_kwargs(args.net_args, '--net_args')
    if args.flow_multiplier is not None:
        extra['flow_multiplier'] = args.flow_multiplier
    return extra


def make_refiner(args, dataset, refine_options):
    """The network.refine.Refiner of --refine at the dataset's image size, or None without it."""
    if not args.refine:
        return None
    from network.refine import Refiner
    return Refiner(dataset.image_size, **refine_options)


def write_flows(args, prefix, dataset, subsets, refine_options):
    """--writing_flow: store the teacher's flow of every training pair of ``subsets`` (the pairs a
    training run draws from them: with train_pairs='all' every ordered pair among their scans and
    the atlas) that the store lacks; with --refine N, the flow after N refinement iterations on
    the pair (a teacher made stronger by instance optimisation; the store's teacher names the
    iterations and settings)."""
    from data_util.flow_store import FlowStoreWriter
    from network.aldk import check_teacher_net
    sess, framework, _ = runs.load_framework(prefix, dataset.image_size, dataset.segmentation_class_value, args.rep,
                                             net_overrides(args))
    check_teacher_net(framework.net, prefix)
    refiner = make_refiner(args, dataset, refine_options)
    options = [('rep', args.rep), ('flow_multiplier', args.flow_multiplier), ('net_args', args.net_args)]
    if refiner:
        options.append(('refine', '{}({})'.format(args.refine, ', '.join(
            '{}={}'.format(k, v) for k, v in sorted(refiner.settings.items()) if v is not None))))
    teacher = ' '.join([os.path.abspath(prefix)] + ['{}={}'.format(k, v) for k, v in options if v])
    with FlowStoreWriter(args.writing_flow, list(dataset.image_size) + [3], teacher) as store:
        for subset in subsets:
            dataset.check([subset])
            written = skipped = 0
            pairs = dataset.pairs(subset, training=True)
            progress = cli.progress(len(pairs), 'flows of {}'.format(subset), 'pair')
            for batch in dataset.batches(pairs, args.batch):
                ids = list(zip(batch['id1'], batch['id2']))
                todo = [i for i, (a, b) in enumerate(ids) if not store.has(a, b)]
                skipped += len(ids) - len(todo)
                if todo:
                    flows = framework.register(sess, {k: batch[k][todo] for k in ('voxel1', 'voxel2')})
                    for i, flow in zip(todo, flows):
                        if refiner:
                            flow, _ = refiner.refine(batch['voxel1'][i, ..., 0], batch['voxel2'][i, ..., 0], flow,
                                                     args.refine)
                        store.write(ids[i][0], ids[i][1], flow)
                    written += len(todo)
                progress.update(len(ids))
            progress.close()
            print('{}: {} teacher flows written, {} already stored -> {} ({} flows)'.format(
                subset, written, skipped, args.writing_flow, len(store)))
    sess.close()


def select_warp(args):
    """Apply --tf_warp / --fast_reconstruction (this imports TensorFlow); returns network.spatial_transformer."""
    from network import spatial_transformer
    if args.tf_warp:
        spatial_transformer.set_warp_impl('tf')
    elif args.fast_reconstruction:
        spatial_transformer.set_warp_impl('op')
    return spatial_transformer


def refuse_for_export(args):
    """UserError naming the first flag that an export (frozen network, repeats and warp) cannot take."""
    for flag, given in (('-r/--rep', args.rep is not None), ('--net_args', bool(args.net_args)),
                        ('--flow_multiplier', args.flow_multiplier is not None), ('--tf_warp', args.tf_warp),
                        ('--fast_reconstruction', args.fast_reconstruction),
                        ('--writing_flow', args.writing_flow is not None)):
        if given:
            raise cli.UserError('{}: {} is an export, frozen with its network, repeats and warp; give a train.py '
                                'run instead'.format(flag, args.checkpoint))
    if not args.dataset:
        raise cli.UserError('-d/--dataset: {} is an export, which names no dataset; give the JSON spec'.format(
            args.checkpoint))


def open_checkpoint(args, run, dataset):
    """(FrameworkEvaluator of the run's checkpoint, its record for the result file)."""
    spatial_transformer = select_warp(args)
    sess, framework, _ = runs.load_framework(run.prefix, dataset.image_size, dataset.segmentation_class_value,
                                             args.rep, net_overrides(args))
    return FrameworkEvaluator(sess, framework), {'rep': args.rep or run.config.rep,
                                                 'parameters': framework.parameter_count,
                                                 'warp': spatial_transformer.warp_impl()}


def open_export(open_network, dataset):
    """(NetworkEvaluator of an export, opened by registration.resolve_network's function, as
    predict.py runs it; its record for the result file)."""
    network = open_network()
    class_values = list(dataset.segmentation_class_value.values()) if dataset.segmentation_class_value else None
    evaluator = NetworkEvaluator(network, MetricGraph(dataset.image_size, class_values, threads=0))
    return evaluator, {key: network.info[key] for key in ('rep', 'parameters', 'warp', 'runtime')}


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.parse_devices(args.gpu)
    if args.flow_multiplier is not None and not (math.isfinite(args.flow_multiplier) and args.flow_multiplier > 0):
        raise cli.UserError('--flow_multiplier {}: must be a positive number'.format(args.flow_multiplier))
    if args.rep is not None and args.rep < 1:
        raise cli.UserError('-r/--rep {}: must be >= 1'.format(args.rep))
    refine_options = cli.refine_settings(args)
    if args.gpu != '-1':
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', args.gpu)
    from data_util.dataset import Dataset

    export = is_export(args.checkpoint)
    if export:
        refuse_for_export(args)
        run, prefix = None, os.path.abspath(args.checkpoint)
        export_size, open_network, _ = registration.resolve_network(args.checkpoint)
        prefix_name = os.path.basename(os.path.normpath(args.checkpoint)) + '-export'
        dataset_path, data_args = args.dataset, args.data_args
    else:
        run = runs.Run(args.checkpoint)
        prefix, prefix_name = run.prefix, '{}-{}'.format(run.name, run.step)
        dataset_path, data_args = args.dataset or run.config.get('dataset'), args.data_args or run.config.get('data_args', '')
    data_args = cli.parse_kwargs(data_args, '--data_args')
    if args.paired:
        data_args['paired'] = True
    if args.all_pairs:
        data_args['all_pairs'] = True
    dataset = Dataset(dataset_path, batch_size=args.batch, **data_args)
    if export and list(dataset.image_size) != [export_size] * 3:
        raise cli.UserError('{}: the export is frozen at {}^3, the dataset {} is {}'.format(
            args.checkpoint, export_size, dataset_path, 'x'.join(map(str, dataset.image_size))))
    default_subset = 1 if args.writing_flow else 2
    subsets = [int(s) if s.isdigit() else s for s in args.val_subset.split(',')] if args.val_subset else [default_subset]
    for subset in subsets:
        if subset not in dataset.schemes and subset not in dataset.subsets:
            raise cli.UserError('subset {!r} is neither a scheme nor a subset of {}'.format(subset, dataset_path))
    if args.writing_flow:
        select_warp(args)
        with cli.exclusive_output(args.writing_flow, 'flow store'):
            return write_flows(args, prefix, dataset, subsets, refine_options)

    if args.rep:
        prefix_name += '-rep{}'.format(args.rep)
    if args.name:
        prefix_name += '-' + args.name
    if args.refine:
        prefix_name += '-refine{}{}'.format(args.refine, '-diffeomorphic' if args.diffeomorphic else '')
    if args.all_pairs:
        prefix_name += '-all_pairs'
    outputs = {s: os.path.join(args.eval_output_dir, '{}-{}'.format(prefix_name, s)) for s in subsets}
    with contextlib.ExitStack() as owned:
        owned.enter_context(cli.made_directory(args.eval_output_dir))
        for base in outputs.values():
            owned.enter_context(cli.exclusive_output(base, 'result'))
        for base in outputs.values():
            for ext in ('.txt', '.json'):
                if os.path.exists(base + ext) and not args.force:
                    raise cli.UserError('{} exists; use --force to overwrite or --name to write beside it'.format(base + ext))
        for subset in subsets:
            dataset.check([subset])
            dataset.check_segmentations(subset)

        evaluator, model = open_export(open_network, dataset) if export else open_checkpoint(args, run, dataset)
        parameters = 'unknown' if model['parameters'] is None else '{:,}'.format(model['parameters'])
        print('Evaluating {} ({} parameters, warp: {})'.format(prefix, parameters, model['warp']))
        class_names = list(dataset.segmentation_class_value) if dataset.segmentation_class_value else None
        refiner = make_refiner(args, dataset, refine_options)
        for subset, base in outputs.items():
            records = evaluate(evaluator, dataset, subset, args.batch, class_names, args.refine, refiner)
            summary, per_class = summarize(records, class_names)
            cli.write_atomic(base + '.txt', report_text(records, summary))
            cli.write_json(base + '.json', dict(
                model, checkpoint=prefix, dataset=dataset_path, subset=subset,
                refinement=dict(refine_options, iterations=args.refine) if args.refine else None,
                summary=summary, per_class=per_class, pairs=records))
            print('{}: Dice {:.4f} ({:.4f}), Jacc {:.4f}, landmark {:.3f}, Jacobian std {:.4f}, folding {:.5f}, '
                  '{:.3f} s/pair -> {}.txt'.format(subset, summary['dice']['mean'], summary['dice']['std'],
                                                   summary['jacc']['mean'], summary['landmark_dist']['mean'],
                                                   summary['jacobian_det']['mean'], summary['folding']['mean'],
                                                   summary['seconds_per_pair'], base))
        evaluator.close()


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
