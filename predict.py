"""Register one image pair with a trained model; write the results on the fixed file's grid.

    python predict.py -c weights/RUN --fixed F.nii.gz --moving M.nii.gz -o OUTDIR
                      [--moving_seg MS.nii.gz] [--fixed_seg FS.nii.gz] [--modality mr|ct]
    python predict.py --fixed ATLAS --moving 'scans/*.nii.gz' -o COHORT [--workers N | --dask ADDRESS]
    python predict.py --pairs pairs.csv -o COHORT            # batch mode (cohort.py)
    python predict.py -c weights/RUN --export EXPORT_DIR     # frozen inference graph (+ ONNX)
    python predict.py -c EXPORT_DIR --fixed F --moving M -o OUTDIR   # run from the export

The registration is `registration.Model.register` (see registration.py for the contract:
both images preprocessed on their own with the model's recorded preprocessing, never with their
label maps; the network's flow on the fixed preprocessed grid; the displacement field in mm on
the fixed file's own grid; the moving image and label map pulled through it). -c defaults to
the shipped brain MRI model (models/lpba40-ldr). The warped outputs are exactly
``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` with the field as
written (linear, default value --default_value, the moving file's pixel type, the fixed file's
grid; label maps by nearest neighbour).

Outputs in OUTDIR (format of the fixed file: .nii.gz, .nii, .mha, .mhd, .nrrd; DICOM and
FreeSurfer .mgz -> .nii.gz; or --format):
    warped.<ext>           the moving image resampled into the fixed file's grid
    field.<ext>            the displacement field: vector image of 3 float64 components in mm
                           along the physical x, y, z (LPS) axes (ITK order), on the fixed grid;
                           fixed point x corresponds to moving point x + u(x) (ITK's convention
                           for DisplacementFieldTransform, as ANTs / elastix pull fields);
                           uncompressed in .mha/.mhd/.nrrd (float64 fields barely compress and
                           zlib would cost more than the registration), gzip in .nii.gz
    warped_seg.<ext>       the moving label map warped by nearest neighbour (with --moving_seg)
    preview.png            mid slices (axial, coronal, sagittal in radiological view) of the
                           fixed, the moving (on the fixed grid, before registration), the
                           warped image, a fixed/warped checkerboard and |u| in mm; also one
                           file per row: preview_fixed.png, preview_moving.png,
                           preview_warped.png, preview_checkerboard.png, preview_flow.png
    predict.json           inputs, model, preprocessing, grids, Dice per label on the fixed
                           file's grid (with both label maps; after and before registration,
                           i.e. warped vs identity-resampled moving labels), displacement
                           statistics, the fraction of folding voxels, wall / CPU seconds per
                           stage: read, preprocess, load_model, network, resample, write; for a
                           model of a fixed field of view (the shipped one: 192 mm), the fraction
                           of each image's foreground outside it, which the network does not see
                           (a warning names the image when it exceeds 5 %: e.g. a head scan with
                           its neck given to a model of skull-stripped brains)
Everything is written into a temporary directory beside OUTDIR and renamed at the end, so a
failure leaves nothing behind. An existing OUTDIR is refused unless --force (and then only
an earlier predict.py output directory or an empty one is replaced).

Export (--export DIR): the checkpoint's inference graph with its weights folded in (a frozen
GraphDef, see network/export.py), built with the pure-TensorFlow warp so that it imports
anywhere (--export_warp op embeds the compiled warp op instead: faster, but the op library
must be loadable where it runs). `-c DIR` then runs from the export without the network code.
Where tf2onnx is installed the export also holds model.onnx (network/export.py), which
onnxruntime runs without TensorFlow in the process: the default (--runtime auto) wherever
onnxruntime is installed; --runtime tensorflow runs model.pb instead.

Errors print one line ``error: ...`` on stderr and exit with status 2.
"""
import argparse
import os
import sys


import cli
import cohort
import registration
import runs



def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', default=None,
                   help='train.py run directory, DIR:STEP or checkpoint prefix; or an export directory '
                        '(default: the shipped brain MRI model, models/lpba40-ldr)')
    p.add_argument('--fixed', help='fixed image file (NIfTI, MHA/MHD, NRRD, FreeSurfer .mgz, ...) or DICOM directory')
    p.add_argument('--moving', help="moving image file (or DICOM directory); a pattern ('scans/*.nii.gz') "
                                    'registers every match to --fixed (batch mode)')
    p.add_argument('--pairs', metavar='CSV', help='batch mode: a CSV with a header row naming the columns fixed, '
                                                  'moving and optionally moving_seg, fixed_seg, id')
    p.add_argument('--workers', type=int, default=None, metavar='N',
                   help='batch mode: spread the pairs over a local Dask cluster of N worker processes, each '
                        'loading the model once (pip install "dask[distributed]")')
    p.add_argument('--dask', default=None, metavar='ADDRESS',
                   help='batch mode: the pairs go to the Dask scheduler at ADDRESS (e.g. tcp://host:8786; its workers '
                        'need this project on PYTHONPATH and the files at the same paths; see README for SLURM/PBS)')
    p.add_argument('-o', '--output', help='output directory (must not exist unless --force; batch mode: one '
                                          'sub-directory per pair, pairs already done are skipped)')
    p.add_argument('--outputs', default=','.join(cohort.OUTPUTS),
                   help='what to write, comma-separated from {} (default all; the field is the costly one)'.format(
                       ','.join(cohort.OUTPUTS)))
    p.add_argument('--field_dtype', choices=('float32', 'float64'), default='float64',
                   help='the written displacement field\'s type (default float64: re-applying it reproduces '
                        'the warped image exactly)')
    p.add_argument('--moving_seg', help='label map of the moving image: warped (nearest neighbour); with a '
                                        '--moving pattern a template with {id}')
    p.add_argument('--fixed_seg', help='label map of the fixed image: Dice per label against the warped one')
    p.add_argument('--modality', choices=('mr', 'ct'), default=None,
                   help='intensity normalisation as the converter: mr percentiles, ct HU window '
                        '(default: the model\'s training data, else mr)')
    p.add_argument('--percentiles', type=float, nargs=2, default=None, metavar=('LOW', 'HIGH'),
                   help='mr: intensity percentiles mapped to 0 and 255 (default: the model\'s, else 0.5 99.5)')
    p.add_argument('--window', type=float, nargs=2, default=None, metavar=('LEVEL', 'WIDTH'),
                   help='ct: HU window mapped to 0..255 (default: the model\'s, else 50 400)')
    p.add_argument('--threshold', type=float, default=None,
                   help='foreground = intensity > THRESHOLD for the crop (default: the model\'s, else Otsu / -500 HU)')
    p.add_argument('--margin', type=float, default=None,
                   help='mm added around the foreground box (default: the model\'s, else 4)')
    p.add_argument('--field_of_view', type=float, default=None, metavar='MM',
                   help='a cube of MM mm centred on each image\'s foreground centroid instead of the foreground '
                        'box (default: the model\'s training data, e.g. 192 for LPBA40 models)')
    p.add_argument('--image_size', type=int, default=None,
                   help="N of the N^3 network grid (default: the checkpoint's or export's image_size)")
    p.add_argument('-r', '--rep', type=int, default=None, help='shared-weight repeats per cascade (checkpoints)')
    p.add_argument('--format', choices=sorted(cohort.FORMATS), default=None,
                   help="output image format (default: the fixed file's; DICOM, .mgz -> nii.gz)")
    p.add_argument('--default_value', type=float, default=0.0,
                   help='warped intensity where the field points outside the moving image (default 0, as sitk.Resample)')
    p.add_argument('--threads', type=int, default=2,
                   help='CPU threads of the network\'s runtime, SimpleITK and the field\'s NumPy work (default 2)')
    p.add_argument('--force', action='store_true',
                   help='replace an existing output directory (only one written by predict.py, or an empty one)')
    p.add_argument('--tf_warp', action='store_true', help='force the pure-TensorFlow warp (checkpoints)')
    p.add_argument('--runtime', choices=registration.RUNTIMES, default='auto',
                   help='what runs an export: auto (default: onnxruntime when it is installed and the export has '
                        'its model.onnx, else TensorFlow), onnx (insist) or tensorflow; checkpoints run in TensorFlow')
    p.add_argument('--export', metavar='DIR', default=None,
                   help='instead of registering: write the frozen inference graph of -c into DIR')
    p.add_argument('--export_warp', choices=('tf', 'op'), default='tf',
                   help='warp inside the export: tf (portable, default) or op (compiled op, needs it to load)')
    cli.add_refine_flags(p)
    return p


def predict(args, network=None):
    """Register args.moving to args.fixed (or every pair of a batch) and write the outputs.

    network: an object with ``image_size`` (N), ``info`` (dict) and ``flow(fixed, moving)`` ->
    flow [N, N, N, 3] (voxels; see registration.py); None opens args.checkpoint. Returns the
    report dict (batch: the summary). The output directory is owned by this process while it works.
    """
    batch = bool(args.pairs) or any(c in (args.moving or '') for c in '*?[')
    if batch:
        pairs = cohort.batch_pairs(args)
    elif not (args.fixed and args.moving and args.output):
        raise cli.UserError('--fixed, --moving and -o/--output are required (or --pairs CSV, or --export DIR)')
    if not args.output:
        raise cli.UserError('-o/--output is required')
    check_args(args)
    if (args.workers or args.dask) and not batch:
        raise cli.UserError('--workers and --dask spread a batch (--pairs or a --moving pattern) over Dask workers')
    with cli.exclusive_output(args.output, 'output directory'):
        if batch:
            return cohort.run_batch(args, pairs, network)
        return predict_pair(args, cohort.Pair(args.fixed, args.moving, args.moving_seg, args.fixed_seg), network)


def check_args(args):
    """Refuse flag values no registration can use (before anything is read or loaded)."""
    if args.threads < 1:
        raise cli.UserError('--threads must be >= 1')
    if args.image_size is not None and args.image_size < 8:
        raise cli.UserError('--image_size {}: the network grid needs at least 8 voxels a side'.format(args.image_size))
    if args.rep is not None and args.rep < 1:
        raise cli.UserError('-r/--rep {}: must be >= 1'.format(args.rep))
    if args.fixed_seg and not args.moving_seg:
        raise cli.UserError('--fixed_seg is compared with the warped --moving_seg; give both')
    wanted = [w.strip() for w in args.outputs.split(',') if w.strip()]
    unknown = [w for w in wanted if w not in cohort.OUTPUTS]
    if unknown or not wanted:
        raise cli.UserError('--outputs {!r}: choose from {}'.format(args.outputs, ','.join(cohort.OUTPUTS)))
    args.outputs = wanted
    args.refine_options = cli.refine_settings(args)
    if args.workers is not None and args.workers < 1:
        raise cli.UserError('--workers {}: at least 1'.format(args.workers))
    if args.workers and args.dask:
        raise cli.UserError('--workers starts a local cluster, --dask uses a running one: give one of them')


def predict_pair(args, pair, network):
    """One pair into args.output (replaced only with --force)."""
    import SimpleITK as sitk
    fmt = cohort.output_format(pair.fixed, args.format)
    cohort.check_output_dir(args.output, args.force, cohort.REPORT)
    image_size, open_network, options = cohort.open_model(args, network)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    clock = registration.Stopwatch()
    images, preprocessed = cohort.read_pair(pair, options, clock)
    with clock.stage('load_model'):
        model = registration.Model(open_network(), options, threads=args.threads)
    return cohort.register_and_write(model, pair, images, preprocessed, args.output, args, fmt, clock, progress=True)


def export(args):
    """Write the frozen inference graph of the checkpoint args.checkpoint into args.export."""
    from network.export import is_export
    if any(getattr(args, k) for k in ('fixed', 'moving', 'output', 'moving_seg', 'fixed_seg')):
        raise cli.UserError('--export writes a model only; run the export with -c {} --fixed ...'.format(args.export))
    if is_export(args.checkpoint):
        raise cli.UserError('{} is already an export; --export needs a train.py checkpoint'.format(args.checkpoint))
    with cli.exclusive_output(args.export, 'export directory'):
        return _export(args)


def _export(args):
    from network.export import META_FILE, ExportError, freeze, onnx_unavailable, to_onnx, write_export
    from registration import cubic_size
    cohort.check_output_dir(args.export, args.force, META_FILE)
    run = runs.Run(args.checkpoint)
    size = args.image_size or cubic_size(run.config.image_size, 'the checkpoint\'s')
    from network import spatial_transformer
    spatial_transformer.set_warp_impl(args.export_warp)
    sess, framework, _ = runs.load_framework(run.prefix, [size] * 3, rep=args.rep, threads=args.threads)
    graph_def = freeze(sess, framework.outputs['flow'])
    meta = dict(run.config.describe(), image_size=[size] * 3, rep=args.rep or run.config.rep,
                parameters=framework.parameter_count, warp=spatial_transformer.warp_impl(),
                checkpoint=os.path.abspath(run.prefix), step=run.step, preprocessing=run.config.preprocessing,
                flow='float32 [B, N, N, N, 3], voxels of the fixed grid, channel k along array axis k; '
                     'warped(p) = moving(p + flow(p))',
                inputs_range='float32 [B, N, N, N, 1] in 0..255 (preprocessed uint8 volumes)')
    sess.close()
    no_onnx = onnx_unavailable(meta)
    try:
        onnx_model = None if no_onnx else to_onnx(graph_def)
        with cohort.staging_directory(args.export) as staging:
            meta = write_export(staging, graph_def, meta, onnx_model)
    except ExportError as e:
        raise cli.UserError(str(e))
    files = [meta['graph']] + ([meta['onnx']['file']] if 'onnx' in meta else [])
    print('Exported {} ({:,} parameters, warp {}) to {}: {}{}'.format(
        run.prefix, meta['parameters'], meta['warp'], args.export, ', '.join(
            '{} {:.2f} MB'.format(name, os.path.getsize(os.path.join(args.export, name)) / 1e6) for name in files),
        '; no model.onnx: {}'.format(no_onnx) if no_onnx else ''))
    return meta


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.checkpoint is None:
        if args.export:
            raise cli.UserError('--export needs -c RUN, the train.py checkpoint to export')
        args.checkpoint = registration.DEFAULT_MODEL
    if args.export:
        export(args)
        return 0
    report = predict(args)
    if 'pairs' in report:
        loading = ('model loaded once in {:.1f} s'.format(report['load_model_seconds'])
                   if report['load_model_seconds'] is not None else 'on {} Dask workers'.format(report['workers']))
        print('Registered {} pairs into {} ({} skipped as done before): {} pairs/min, {}; summary.csv'.format(
            report['registered'], args.output, report['skipped'], report['pairs_per_minute'], loading))
        return 0
    summary = 'network {:.2f} s, total {:.2f} s'.format(report['seconds']['network'], report['seconds']['total'])
    if report.get('dice', {}).get('mean') is not None:
        summary = 'Dice {:.4f} (before {:.4f}), '.format(report['dice']['mean'], report['dice']['mean_before']) + summary
    print('Wrote {}: {}; {}'.format(args.output, ', '.join(
        v for k, v in report['outputs'].items() if k != 'previews'), summary))
    return 0


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
