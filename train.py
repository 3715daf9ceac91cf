"""Train an RCN (teacher or student) as the original train.py, with its flags.

    python train.py -b VTN -n 1 -d datasets/liver.json --batch 4 --round 20000 --epochs 5
    python train.py -b LDR -n 3 -d spec.json --output my_run
    python train.py -c weights/my_run            # resume that run where it stopped

A run writes weights/<run>/ (args.json, model-<step> checkpoints) and logs/<run>/ (TensorBoard).
"""
import argparse
import datetime
import os
import sys
import time

import cli


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-b', '--base_network', default=None,
                   help='VTN, VoxelMorph, LDR (paper architecture) or LDROriginal (default VTN)')
    p.add_argument('-n', '--n_cascades', type=int, default=None, help='number of cascades (default 1)')
    p.add_argument('-r', '--rep', type=int, default=None, help='shared-weight repeats per cascade (default 1)')
    p.add_argument('-g', '--gpu', default='-1',
                   help="-1 = CPU (default); 'cpu:N' = N CPU towers; '0,1' = GPU towers (gradients averaged)")
    p.add_argument('-c', '--checkpoint', default=None,
                   help='run directory (or DIR:STEP / checkpoint prefix) to resume or start from')
    p.add_argument('-d', '--dataset', default=None, help='JSON dataset spec (default datasets/liver.json)')
    p.add_argument('--batch', type=int, default=4, help='image pairs per step')
    p.add_argument('--round', type=int, default=20000, help='steps per epoch (the learning-rate schedule unit)')
    p.add_argument('--epochs', type=float, default=5, help='number of epochs')
    p.add_argument('--output', default=None, help='run name under weights/ (default: a timestamp)')
    p.add_argument('--lr', type=float, default=1e-4, help='initial Adam learning rate')
    p.add_argument('--image_size', type=int, nargs='+', default=None,
                   help="image size (one value or X Y Z; default: the spec's image_size)")
    p.add_argument('--net_args', default='', help="network options as key=value pairs, e.g. \"affine='light', head='deconv'\"")
    p.add_argument('--data_args', default='', help='dataset options as key=value pairs')
    p.add_argument('--val_steps', type=int, default=100, help='validate every N steps (0 = never)')
    p.add_argument('--save_steps', type=int, default=1000, help='checkpoint every N steps (and at the end)')
    p.add_argument('--print_steps', type=int, default=10, help='progress line every N steps')
    p.add_argument('--finetune', default=None, help="use the spec's finetune-train-/finetune-val-<NAME> schemes; steps restart")
    p.add_argument('--clear_steps', action='store_true', help='restart the step counter when starting from a checkpoint')
    p.add_argument('--debug', action='store_true', help='no files written; validate and print every step')
    p.add_argument('--logs', default='', help='TensorBoard sub-directory under logs/')
    p.add_argument('--name', default=None, help='suffix appended to the run name')
    p.add_argument('--no_augment', action='store_true', help='turn the random B-spline augmentation off')
    p.add_argument('--seed', type=int, default=None, help='random seed of data order and augmentation')
    p.add_argument('--fast_reconstruction', action='store_true', help='require the compiled warp op')
    p.add_argument('--tf_warp', action='store_true', help='force the pure-TensorFlow warp')
    return p


ARCH_DEFAULTS = {'base_network': 'VTN', 'n_cascades': 1, 'rep': 1, 'dataset': 'datasets/liver.json'}
ARCH_KEYS = ('base_network', 'n_cascades', 'rep', 'net_args', 'image_size')
LR_FACTORS = [1, 1, 1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
FINETUNE_LR_FACTORS = [1 / 20, 1 / 20, 1 / 20, 1 / 40, 1 / 80]


def learning_rate(args, step):
    """Step decay per epoch (--round steps) as the original: x1 for 3 epochs, then halving."""
    factors = FINETUNE_LR_FACTORS if args.finetune else LR_FACTORS
    return args.lr * factors[min(step // args.round, len(factors) - 1)]


def merge_run_args(args, run_args):
    """Take the architecture of the checkpoint's run; refuse explicit flags that contradict it."""
    for key in ARCH_KEYS:
        given, stored = getattr(args, key), run_args.get(key)
        if key == 'net_args':
            given = given or None
        if given is not None and stored is not None and given != stored:
            raise cli.UserError('--{} {} contradicts the checkpoint run ({}); architecture flags must match'.format(
                key, given, stored))
        if stored is not None:
            setattr(args, key, stored)
    if args.dataset is None:
        args.dataset = run_args.get('dataset')


def run_directories(args, resuming):
    """(weights dir, logs dir) of this run; never reuses an existing directory unless resuming it."""
    if resuming and args.output is None:
        run_dir = args.resume_dir
        name = os.path.basename(os.path.normpath(run_dir))
    else:
        name = args.output or datetime.datetime.now().strftime('%b%d-%H%M%S')
        if args.name:
            name += '_' + args.name
        run_dir = os.path.join('weights', name)
        if os.path.exists(run_dir):
            raise cli.UserError('run directory {} exists; resume it with -c {} or choose another --output'.format(
                run_dir, run_dir))
    return run_dir, os.path.join('logs', args.logs, name)


def image_size_of(args, spec):
    size = args.image_size or spec['image_size']
    size = list(size) * 3 if len(size) == 1 else list(size)
    if len(size) != 3 or min(size) < 1:
        raise cli.UserError('--image_size needs one or three positive values, got {}'.format(size))
    return size


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.gpu.startswith('cpu') and args.gpu != '-1':
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', args.gpu)

    from network.framework import parse_devices
    devices = parse_devices(args.gpu)
    resuming = False
    if args.checkpoint:
        args.resume_dir, checkpoint, ckpt_step = cli.resolve_checkpoint(args.checkpoint)
        merge_run_args(args, cli.load_run_args(args.resume_dir))
        resuming = not (args.finetune or args.clear_steps)
    for k, v in ARCH_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch % len(devices):
        raise cli.UserError('--batch {} is not divisible by the {} devices of -g {}'.format(
            args.batch, len(devices), args.gpu))

    from data_util.dataset import Dataset, load_spec
    spec = load_spec(args.dataset)
    image_size = image_size_of(args, spec)
    args.image_size = image_size
    data_args = cli.parse_kwargs(args.data_args, '--data_args')
    dataset = Dataset(args.dataset, batch_size=args.batch, **data_args)
    train_scheme, val_scheme = 1, 2
    if args.finetune:
        train_scheme = 'finetune-train-' + args.finetune
        val_scheme = 'finetune-val-' + args.finetune
    if list(dataset.image_size) != image_size:
        raise cli.UserError('--image_size {} differs from the spec image_size {}'.format(image_size, dataset.image_size))
    dataset.check([train_scheme])
    has_val = args.val_steps > 0 and val_scheme in dataset.schemes

    from network import spatial_transformer
    from network.cascade import make_net_args
    from network.framework import Framework, session_config
    from network.tfv1 import tf
    if args.tf_warp:
        spatial_transformer.set_warp_impl('tf')
    elif args.fast_reconstruction:
        spatial_transformer.set_warp_impl('op')
    net_args = make_net_args(args.base_network, args.n_cascades, args.rep,
                             cli.parse_kwargs(args.net_args, '--net_args'))
    if args.seed is not None:
        tf.set_random_seed(args.seed)
    framework = Framework(net_args, image_size, dataset.segmentation_class_value, devices,
                          augment=not args.no_augment)
    print('Graph built: {} x{} cascade(s), {:,} parameters, warp: {}'.format(
        args.base_network, args.n_cascades, framework.parameter_count, spatial_transformer.warp_impl()))

    run_dir, log_dir = (None, None) if args.debug else run_directories(args, resuming)
    saver = tf.train.Saver(framework.net.variables + [framework.global_step] +
                           framework.optimizer.variables(), max_to_keep=5, keep_checkpoint_every_n_hours=5)
    with tf.Session(config=session_config(devices)) as sess:
        sess.run(tf.global_variables_initializer())
        step = 0
        if args.checkpoint:
            restore(sess, framework, checkpoint, full=resuming)
            step = (ckpt_step or 0) if resuming else 0
            sess.run(framework.global_step.assign(step))
            print('Restored {} at step {}'.format(checkpoint, step))
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            stored = {k: v for k, v in vars(args).items() if k != 'resume_dir'}
            cli.write_json(os.path.join(run_dir, 'args.json'), stored)
            writer = tf.summary.FileWriter(log_dir, sess.graph if step == 0 else None)
        total = int(args.epochs * args.round)
        generator = dataset.generator(train_scheme, batch_size=args.batch, loop=True, seed=args.seed)
        last_time, last_step = time.time(), step
        while step < total:
            lr = learning_rate(args, step)
            batch = next(generator)
            logged = run_dir is not None and (step + 1) % args.print_steps == 0
            res = framework.train_step(sess, batch, lr, with_summary=logged)
            step += 1
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
            if run_dir and (step % args.save_steps == 0 or step == total):
                saver.save(sess, os.path.join(run_dir, 'model'), global_step=step, write_meta_graph=False)
        if run_dir:
            writer.close()
            print('Finished: {} (step {})'.format(run_dir, step))


def restore(sess, framework, checkpoint, full):
    """Restore the network (and, when resuming, the optimiser state) from a checkpoint."""
    variables = framework.net.variables
    if full:
        variables = variables + framework.optimizer.variables()
    cli.restore_variables(sess, checkpoint, variables)


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
