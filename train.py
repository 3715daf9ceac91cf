"""Train an RCN (teacher or student) as the original train.py, with its flags.

    python train.py -b VTN -n 1 -d datasets/liver.json --batch 4 --round 20000 --epochs 5
    python train.py -b LDR -n 3 -d spec.json --output my_run
    python train.py -c weights/my_run            # resume that run where it stopped

A run writes weights/<run>/ (args.json, model-<step> checkpoints) and logs/<run>/ (TensorBoard).
"""
import argparse  # noqa: F401  (RawDescriptionHelpFormatter)
import contextlib
import datetime
import math
import os
import sys
import time

import cli
import runs
from network.aldk_config import CRITIC_UNITS, DistillSettings


def build_parser():
    distill = DistillSettings()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-b', '--base_network', default=None, choices=cli.BASE_NETWORK_NAMES,
                   help='VTN, VoxelMorph, LDR (paper architecture) or LDROriginal (default VTN)')
    p.add_argument('-n', '--n_cascades', type=int, default=None, help='number of cascades (default 1)')
    p.add_argument('-r', '--rep', type=int, default=None, help='shared-weight repeats per cascade (default 1)')
    p.add_argument('-g', '--gpu', default='-1',
                   help="-1 = CPU (default); 'cpu:N' = N CPU towers; '0,1' = GPU towers (gradients averaged)")
    p.add_argument('-c', '--checkpoint', default=None,
                   help='run directory (or DIR:STEP / checkpoint prefix) to resume or start from')
    p.add_argument('-d', '--dataset', default=None, help='JSON dataset spec (default datasets/liver.json)')
    p.add_argument('--batch', type=cli.positive_int, default=4, help='image pairs per step')
    p.add_argument('--round', type=cli.positive_int, default=20000, help='steps per epoch (the learning-rate schedule unit)')
    p.add_argument('--epochs', type=cli.positive_float, default=5, help='number of epochs')
    p.add_argument('--output', default=None, help='run name under weights/ (default: a timestamp)')
    p.add_argument('--lr', type=float, default=1e-4, help='initial Adam learning rate')
    p.add_argument('--warmup', type=cli.positive_int, default=None, metavar='STEPS',
                   help='raise the learning rate linearly from lr/STEPS to lr over the first STEPS steps (default: none)')
    p.add_argument('--image_size', type=int, nargs='+', default=None,
                   help="image size (one value or X Y Z; default: the spec's image_size)")
    p.add_argument('--net_args', default='', help="network options as key=value pairs, e.g. \"affine='light', head='deconv'\"")
    p.add_argument('--data_args', default='', help='dataset options as key=value pairs')
    p.add_argument('--val_steps', type=int, default=100, help='validate every N steps (0 = never)')
    p.add_argument('--save_steps', type=cli.positive_int, default=1000, help='checkpoint every N steps (and at the end)')
    p.add_argument('--print_steps', type=cli.positive_int, default=10, help='progress line every N steps')
    p.add_argument('--finetune', default=None, help="use the spec's finetune-train-/finetune-val-<NAME> schemes; steps restart")
    p.add_argument('--clear_steps', action='store_true', help='restart the step counter when starting from a checkpoint')
    p.add_argument('--init_from', default=None, metavar='RUN',
                   help='start a new run from the network weights of RUN (DIR, DIR:STEP or a prefix) wherever name and '
                        'shape agree, e.g. a run at a coarser --image_size (coarse-to-fine; the affine heads, whose '
                        'kernels span the feature map, resampled to the new size); the optimiser starts afresh')
    p.add_argument('--debug', action='store_true', help='no files written; validate and print every step')
    p.add_argument('--logs', default='', help='TensorBoard sub-directory under logs/')
    p.add_argument('--name', default=None, help='suffix appended to the run name')
    p.add_argument('--no_augment', action='store_true', help='turn the random B-spline augmentation off')
    p.add_argument('--augment_affine', type=float, nargs=3, default=None, metavar=('DEGREES', 'SCALE', 'SHIFT'),
                   help='add a random affine map to the augmentation: rotations up to DEGREES about each axis, '
                        'scales exp(+-SCALE) per axis, shifts up to SHIFT voxels (e.g. 10 0.05 6)')
    p.add_argument('--augment_gamma', type=float, default=None, metavar='G',
                   help='give the fixed and the moving image each a random contrast during training: intensities '
                        '(0..1) raised to a power between 1/G and G (G > 1; default: none)')
    p.add_argument('--seed', type=int, default=None, help='random seed of data order and augmentation')
    p.add_argument('--fast_reconstruction', action='store_true', help='require the compiled warp op')
    p.add_argument('--tf_warp', action='store_true', help='force the pure-TensorFlow warp')
    g = p.add_argument_group('distillation from a VTN teacher (SPEC section 5; network/aldk.py)')
    g.add_argument('--aldk', action='store_true', help='adversarial learning with distilled knowledge (critic + adversarial term)')
    g.add_argument('--distill', choices=('none', 'l2'), default='none',
                   help='l2: plain flow distillation gamma L_rec + (1 - gamma) mean |phi_s - phi_t|^2 (ablation baseline)')
    g.add_argument('--teacher', default=None,
                   help='online teacher: a VTN RCN run directory (or DIR:STEP / prefix), restored frozen into this graph')
    g.add_argument('--pretrained_flow_path', default=None,
                   help='offline teacher: flow store of eval.py --writing_flow (turns augmentation off)')
    g.add_argument('--beta', type=float, default=distill.beta,
                   help='distilled flow phi_d = beta phi_t + (1 - beta) phi_s (default %(default)s)')
    g.add_argument('--gamma', type=float, default=distill.gamma,
                   help='student loss gamma L_rec + (1 - gamma) L_distill (default %(default)s)')
    g.add_argument('--lamb', type=float, default=distill.lamb,
                   help='weight of the critic\'s gradient penalty (default %(default)s)')
    g.add_argument('--critic_every', type=int, default=distill.critic_every,
                   help='update the critic every N-th step, before that step\'s student update (student: every '
                        'step; default %(default)s)')
    g.add_argument('--critic_lr_factor', type=float, default=distill.critic_lr_factor,
                   help='critic learning rate = this x the student\'s (same schedule; default %(default)s)')
    g.add_argument('--critic_units', choices=CRITIC_UNITS, default=distill.critic_units,
                   help='metric of the gradient penalty, hence the scale of the adversarial gradient '
                        '(network.aldk.Critic; default %(default)s)')
    return p


LR_FACTORS = [1, 1, 1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
FINETUNE_LR_FACTORS = [1 / 20, 1 / 20, 1 / 20, 1 / 40, 1 / 80]


def learning_rate(args, step):
    """The learning rate of 0-based ``step``: step decay per epoch (--round steps) as the original
    (x1 for 3 epochs, then halving), times a linear warm-up (step + 1) / --warmup while step < --warmup."""
    factors = FINETUNE_LR_FACTORS if args.finetune else LR_FACTORS
    warmup = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
    return args.lr * factors[min(step // args.round, len(factors) - 1)] * warmup


def given_flags(parser, argv):
    """The destinations of the options present on the command line (argv), abbreviations included."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def run_paths(args, resumed):
    """(weights dir, logs dir) of this run: the resumed run's (``resumed``, a runs.Run, without
    --output), or weights/<--output or a timestamp>."""
    if resumed and args.output is None:
        run_dir, name = resumed.directory, resumed.name
    else:
        name = args.output or datetime.datetime.now().strftime('%b%d-%H%M%S')
        if args.name:
            name += '_' + args.name
        run_dir = os.path.join('weights', name)
    return run_dir, os.path.join('logs', args.logs, name)


def check_values(args):
    """Refuse values no run can use, naming the flag, before anything is read or built."""
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise cli.UserError('--lr {}: the learning rate must be a positive number'.format(args.lr))
    if int(round(args.epochs * args.round)) < 1:
        raise cli.UserError('--epochs {:g} x --round {} is less than one step'.format(args.epochs, args.round))
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise cli.UserError('--seed {}: a seed lies in 0..2^32-1'.format(args.seed))
    for key in ('beta', 'gamma'):
        if not 0.0 <= getattr(args, key) <= 1.0:
            raise cli.UserError('--{} {}: must lie in 0..1'.format(key, getattr(args, key)))
    if not (math.isfinite(args.lamb) and args.lamb >= 0) or not (math.isfinite(args.critic_lr_factor)
                                                                 and args.critic_lr_factor > 0):
        raise cli.UserError('--lamb must be >= 0 and --critic_lr_factor > 0 (finite)')


def check_distill_args(args):
    """Refuse inconsistent distillation flags before anything is read or built."""
    distilling = args.aldk or args.distill != 'none'
    sources = [s for s in (args.teacher, args.pretrained_flow_path) if s]
    if args.aldk and args.distill != 'none':
        raise cli.UserError('--aldk and --distill {} are alternatives; choose one'.format(args.distill))
    if distilling and len(sources) != 1:
        raise cli.UserError('{} needs exactly one teacher source: --teacher RUN (online) or --pretrained_flow_path '
                            'STORE (offline)'.format('--aldk' if args.aldk else '--distill l2'))
    if sources and not distilling:
        raise cli.UserError('--teacher / --pretrained_flow_path need --aldk or --distill l2')
    if args.critic_every < 1:
        raise cli.UserError('--critic_every must be >= 1, got {}'.format(args.critic_every))


def load_teacher(spec, image_size):
    """The frozen teacher RCN of a train.py run (network.aldk.Teacher), from its args.json."""
    from network.aldk import Teacher
    run = runs.Run(spec)
    return Teacher(run.config.cascade_args(), run.prefix, run.config.image_size or image_size)


def augmentation(args):
    """The augmentation keyword arguments of Framework and DistillFramework from the flags
    (--no_augment, --augment_affine as a network.augment.AffineRange, --augment_gamma, --seed)."""
    from network.augment import AffineRange
    return {'augment': not args.no_augment, 'gamma_augment': args.augment_gamma, 'augment_seed': args.seed,
            'affine_augment': None if args.augment_affine is None else AffineRange(*args.augment_affine)}


def build_framework(args, net_args, image_size, dataset, devices):
    """The training Framework: plain, or DistillFramework for --aldk / --distill l2."""
    from network.framework import Framework
    if not (args.aldk or args.distill != 'none'):
        return Framework(net_args, image_size, dataset.segmentation_class_value, devices, **augmentation(args))
    from network.aldk import DistillFramework
    teacher = load_teacher(args.teacher, image_size) if args.teacher else None
    if args.pretrained_flow_path and not (args.no_augment and args.augment_affine is None):
        print('Stored teacher flows belong to un-augmented pairs: augmentation off')
        args.no_augment, args.augment_affine = True, None
    framework = DistillFramework(net_args, image_size, dataset.segmentation_class_value, devices,
                                 method='aldk' if args.aldk else 'l2', teacher=teacher,
                                 stored_flows=bool(args.pretrained_flow_path), beta=args.beta, gamma=args.gamma,
                                 lamb=args.lamb, critic_every=args.critic_every,
                                 critic_lr_factor=args.critic_lr_factor, critic_units=args.critic_units,
                                 **augmentation(args))
    source = ('teacher {} ({:,} parameters, frozen, not saved)'.format(args.teacher, teacher.parameter_count)
              if teacher else 'teacher flows of {}'.format(args.pretrained_flow_path))
    print('Distillation: {}, {}, beta {} gamma {} lamb {}{}'.format(
        'ALDK' if args.aldk else 'L2', source, args.beta, args.gamma, args.lamb,
        ', critic every {} steps, critic units {}'.format(args.critic_every, args.critic_units) if args.aldk else ''))
    return framework


def open_flow_store(path, dataset, subset, image_size):
    """The offline teacher-flow store, after counting the training pairs it lacks (logged, skipped)."""
    from data_util.flow_store import FlowStore
    store = FlowStore(path, image_size)
    pairs = dataset.pairs(subset, training=True)
    missing = len(store.missing(pairs))
    if missing == len(pairs):
        raise cli.UserError('{} holds no flow of the {} training pairs'.format(path, len(pairs)))
    print('Teacher flows: {} of {} training pairs stored in {}; {} pairs without a flow are skipped'.format(
        len(pairs) - missing, len(pairs), path, missing))
    return store


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if not args.gpu.startswith('cpu') and args.gpu != '-1':
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', args.gpu)

    devices = cli.parse_devices(args.gpu)
    resuming = False
    start = None
    if args.checkpoint and args.init_from:
        raise cli.UserError('-c continues a run and --init_from starts a new one from its weights: choose one')
    if args.checkpoint:
        start = runs.Run(args.checkpoint)
        start.config.apply_architecture(args)
        if args.dataset is None:
            args.dataset = start.config.get('dataset')
        resuming = not (args.finetune or args.clear_steps)
        if resuming and args.output is None:
            start.config.apply_settings(args, given_flags(build_parser(), argv))
    init = None
    if args.init_from:
        init = runs.Run(args.init_from)
        init.config.apply_architecture(args, keys=('base_network', 'n_cascades', 'rep', 'net_args'))
    for key, value in runs.ARCH_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset is None:
        args.dataset = runs.DEFAULT_DATASET
    check_distill_args(args)
    check_values(args)
    if args.seed is None and not resuming:
        # every new run is seeded (and the seed stored), so that a resumed run replays its data
        # order and augmentation exactly
        args.seed = int.from_bytes(os.urandom(4), 'little') % 2 ** 31
    if args.augment_affine is not None:
        if args.no_augment:
            raise cli.UserError('--no_augment turns augmentation off; it cannot go with --augment_affine')
        if not all(math.isfinite(v) and v >= 0 for v in args.augment_affine):
            raise cli.UserError('--augment_affine takes three finite values >= 0, got {}'.format(
                ' '.join('{:g}'.format(v) for v in args.augment_affine)))
    if args.augment_gamma is not None and not (math.isfinite(args.augment_gamma) and args.augment_gamma > 1):
        raise cli.UserError('--augment_gamma {:g}: the largest power, a finite number > 1'.format(args.augment_gamma))
    if args.batch % len(devices):
        raise cli.UserError('--batch {} is not divisible by the {} devices of -g {}'.format(
            args.batch, len(devices), args.gpu))

    from data_util.dataset import Dataset, load_spec
    spec = load_spec(args.dataset)
    image_size = runs.cubic_sizes(args.image_size or spec['image_size'], '--image_size')
    args.image_size = image_size
    data_args = cli.parse_kwargs(args.data_args, '--data_args')
    dataset = Dataset(args.dataset, batch_size=args.batch, **data_args)
    args.preprocessing = dataset.preprocessing
    train_scheme, val_scheme = 1, 2
    if args.finetune:
        train_scheme = 'finetune-train-' + args.finetune
        val_scheme = 'finetune-val-' + args.finetune
    if list(dataset.image_size) != image_size:
        raise cli.UserError('--image_size {} differs from the spec image_size {}'.format(image_size, dataset.image_size))
    has_val = args.val_steps > 0 and val_scheme in dataset.schemes
    dataset.check([train_scheme] + ([val_scheme] if has_val else []))
    store = open_flow_store(args.pretrained_flow_path, dataset, train_scheme, image_size) \
        if args.pretrained_flow_path else None

    run_dir, log_dir = (None, None) if args.debug else run_paths(args, start if resuming else None)
    with contextlib.ExitStack() as owned:
        if run_dir:
            owned.enter_context(cli.made_directory(os.path.dirname(run_dir) or '.'))
            owned.enter_context(cli.exclusive_output(run_dir, 'run directory'))
        if run_dir and not (resuming and args.output is None) and os.path.exists(run_dir):
            raise cli.UserError('run directory {} exists; resume it with -c {} or choose another --output'.format(
                run_dir, run_dir))

        from network import spatial_transformer
        from network.cascade import make_net_args
        from network.framework import session_config
        from network.tfv1 import tf
        if args.tf_warp:
            spatial_transformer.set_warp_impl('tf')
        elif args.fast_reconstruction:
            spatial_transformer.set_warp_impl('op')
        net_args = make_net_args(args.base_network, args.n_cascades, args.rep,
                                 cli.parse_kwargs(args.net_args, '--net_args'))
        if args.seed is not None:
            tf.set_random_seed(args.seed)
        framework = build_framework(args, net_args, image_size, dataset, devices)
        print('Graph built: {} x{} cascade(s), {:,} parameters, warp: {}'.format(
            args.base_network, args.n_cascades, framework.parameter_count, spatial_transformer.warp_impl()))

        saver = tf.train.Saver(framework.net.variables + [framework.global_step] +
                               framework.training_state, max_to_keep=5, keep_checkpoint_every_n_hours=5)
        with tf.Session(config=session_config(devices)) as sess:
            sess.run(tf.global_variables_initializer())
            if getattr(framework, 'teacher', None) is not None:
                framework.teacher.restore(sess)
            step = 0
            if start:
                checkpoint, ckpt_step = restore(sess, framework, runs.fallbacks(args.checkpoint, start), full=resuming)
                step = (ckpt_step or 0) if resuming else 0
                sess.run(framework.global_step.assign(step))
                print('Restored {} at step {}'.format(checkpoint, step))
            if init:
                resampled, fresh = runs.restore_matching(sess, init.prefix, framework.net.variables)
                print('Initialised from {}: {} of {} variables{}{}'.format(
                    init.prefix, len(framework.net.variables) - len(fresh), len(framework.net.variables),
                    '; resampled to this size (kernels spanning the feature map): ' + ', '.join(resampled)
                    if resampled else '', '; afresh (name or shape differs): ' + ', '.join(fresh) if fresh else ''))
            if run_dir:
                os.makedirs(run_dir, exist_ok=True)
                runs.RunConfig.from_flags(args).save(run_dir)
                writer = tf.summary.FileWriter(log_dir, sess.graph if step == 0 else None)
            total = int(round(args.epochs * args.round))
            # a resumed run goes on with the order the uninterrupted one would have drawn
            generator = dataset.generator(train_scheme, batch_size=args.batch, loop=True, seed=args.seed,
                                          skip=step if resuming else 0)
            if store is not None:
                from data_util.flow_store import with_teacher_flows
                generator = with_teacher_flows(generator, store, args.batch)
            last_time, last_step = time.time(), step
            stop = cli.StopRequests()
            with stop.installed():
                while step < total:
                    lr = learning_rate(args, step)
                    batch = next(generator)
                    logged = run_dir is not None and (step + 1) % args.print_steps == 0
                    res = framework.train_step(sess, batch, lr, with_summary=logged)
                    step += 1
                    check_finite(res, step, run_dir)
                    if 'summary' in res:
                        writer.add_summary(res.pop('summary'), step)
                    if args.debug or step % args.print_steps == 0 or step == total:
                        now = time.time()
                        rate = (step - last_step) / max(now - last_time, 1e-9)
                        last_time, last_step = now, step
                        terms = ' '.join('{} {:.4g}'.format(k, v) for k, v in res.items() if k not in ('loss', 'grad_norm'))
                        print('step {}/{} | {:.2f} steps/s | loss {:.4f} ({}) | lr {:.2e}'.format(
                            step, total, rate, res['loss'], terms, lr), flush=True)
                    if has_val and (args.debug or step % args.val_steps == 0 or step == total):
                        val = framework.validate(sess, dataset.generator(val_scheme, batch_size=args.batch))
                        print('validation at step {}: '.format(step) + ', '.join('{} {:.4f}'.format(k, v) for k, v in val.items()),
                              flush=True)
                        if run_dir:
                            writer.add_summary(tf.Summary(value=[tf.Summary.Value(tag='val_' + k, simple_value=v)
                                                                 for k, v in val.items()]), step)
                    if run_dir and (step % args.save_steps == 0 or step == total or stop.requested):
                        save(saver, sess, run_dir, step)
                    if stop.requested:
                        raise cli.UserError('stopped by {} at step {}{}'.format(
                            stop.requested, step, '; checkpoint saved, resume with python train.py -c {}'.format(run_dir)
                            if run_dir else ''))
            if run_dir:
                writer.close()
                print('Finished: {} (step {})'.format(run_dir, step))


def check_finite(scalars, step, run_dir):
    """Stop with one line naming the step and every non-finite loss term; checkpoints are kept."""
    bad = sorted(k for k, v in scalars.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        kept = runs.list_checkpoints(run_dir) if run_dir else {}
        raise cli.UserError('non-finite {} at step {}; training stopped{}'.format(
            ', '.join('{}={}'.format(k, scalars[k]) for k in bad), step,
            ', last good checkpoint {}'.format(kept[max(kept)]) if kept else ', no checkpoint written yet'))


def save(saver, sess, run_dir, step):
    """Checkpoint with its completion marker; a failed save (e.g. a full disk) stops the run."""
    try:
        runs.save_checkpoint(saver, sess, run_dir, step)
    except Exception as e:
        kept = runs.list_checkpoints(run_dir)
        raise cli.UserError('could not save the checkpoint of step {} ({}); {}'.format(
            step, str(e).splitlines()[0] if str(e) else type(e).__name__,
            'the previous checkpoint {} is kept'.format(kept[max(kept)]) if kept else 'no earlier checkpoint'))


def restore(sess, framework, candidates, full):
    """Restore the network (and, when resuming, the optimiser state) from the first of the
    candidates [(prefix, step)] that restores; returns it. Each damaged one is skipped with a
    warning naming it; UserError if none restores."""
    variables = framework.net.variables
    if full:
        variables = variables + framework.training_state
    return runs.restore_first(sess, variables, candidates,
                              lambda message: print('warning: ' + message, file=sys.stderr, flush=True))


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
