"""Register one image pair with a trained model; write the results on the fixed file's grid.

    python predict.py -c weights/RUN --fixed F.nii.gz --moving M.nii.gz -o OUTDIR
                      [--moving_seg MS.nii.gz] [--fixed_seg FS.nii.gz] [--modality mr|ct]
    python predict.py -c weights/RUN --export EXPORT_DIR     # frozen inference graph
    python predict.py -c EXPORT_DIR --fixed F --moving M -o OUTDIR   # run from the export

The registration is `registration.Model.register` (see registration.py for the contract:
both images preprocessed on their own with the model's recorded preprocessing, never with their
label maps; the network's flow on the fixed preprocessed grid; the displacement field in mm on
the fixed file's own grid; the moving image and label map pulled through it). -c defaults to
the shipped brain MRI model (models/lpba40-ldr). The warped outputs are exactly
``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` with the field as
written (linear, default value --default_value, the moving file's pixel type, the fixed file's
grid; label maps by nearest neighbour).

Outputs in OUTDIR (format of the fixed file: .nii.gz, .nii, .mha, .mhd, .nrrd; DICOM -> .nii.gz;
or --format):
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
                           stage: read, preprocess, load_model, network, resample, write
Everything is written into a temporary directory beside OUTDIR and renamed at the end, so a
failure leaves nothing behind. An existing OUTDIR is refused unless --force (and then only
an earlier predict.py output directory or an empty one is replaced).

Export (--export DIR): the checkpoint's inference graph with its weights folded in (a frozen
GraphDef, see network/export.py), built with the pure-TensorFlow warp so that it imports
anywhere (--export_warp op embeds the compiled warp op instead: faster, but the op library
must be loadable where it runs). `-c DIR` then runs from the export without the network code.

Errors print one line ``error: ...`` on stderr and exit with status 2.
"""
import argparse
import contextlib
import csv
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time


import cli
import previews
import registration

FORMATS = {'nii.gz': '.nii.gz', 'nii': '.nii', 'mha': '.mha', 'mhd': '.mhd', 'nrrd': '.nrrd'}
EXTENSION_FORMATS = (('.nii.gz', 'nii.gz'), ('.nii', 'nii'), ('.mha', 'mha'), ('.mhd', 'mhd'),
                     ('.nrrd', 'nrrd'), ('.nhdr', 'nrrd'))
REPORT = 'predict.json'
OUTPUTS = ('warped', 'field', 'seg', 'preview')
SUMMARY_STAGES = ('read', 'preprocess', 'network', 'refine', 'resample', 'write')


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', default=None,
                   help='train.py run directory, DIR:STEP or checkpoint prefix; or an export directory '
                        '(default: the shipped brain MRI model, models/lpba40-ldr)')
    p.add_argument('--fixed', help='fixed image file (or DICOM directory)')
    p.add_argument('--moving', help="moving image file (or DICOM directory); a pattern ('scans/*.nii.gz') "
                                    'registers every match to --fixed (batch mode)')
    p.add_argument('--pairs', metavar='CSV', help='batch mode: a CSV with a header row naming the columns fixed, '
                                                  'moving and optionally moving_seg, fixed_seg, id')
    p.add_argument('-o', '--output', help='output directory (must not exist unless --force; batch mode: one '
                                          'sub-directory per pair, pairs already done are skipped)')
    p.add_argument('--outputs', default=','.join(OUTPUTS),
                   help='what to write, comma-separated from {} (default all; the field is the costly one)'.format(
                       ','.join(OUTPUTS)))
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
    p.add_argument('--format', choices=sorted(FORMATS), default=None,
                   help="output image format (default: the fixed file's; DICOM -> nii.gz)")
    p.add_argument('--default_value', type=float, default=0.0,
                   help='warped intensity where the field points outside the moving image (default 0, as sitk.Resample)')
    p.add_argument('--threads', type=int, default=2, help='CPU threads of TensorFlow and SimpleITK (default 2)')
    p.add_argument('--force', action='store_true',
                   help='replace an existing output directory (only one written by predict.py, or an empty one)')
    p.add_argument('--tf_warp', action='store_true', help='force the pure-TensorFlow warp (checkpoints)')
    p.add_argument('--export', metavar='DIR', default=None,
                   help='instead of registering: write the frozen inference graph of -c into DIR')
    p.add_argument('--export_warp', choices=('tf', 'op'), default='tf',
                   help='warp inside the export: tf (portable, default) or op (compiled op, needs it to load)')
    cli.add_refine_flags(p)
    return p


def output_format(fixed_path, requested=None):
    """The output format key of FORMATS: requested, else the fixed file's, else 'nii.gz'."""
    if requested:
        return requested
    name = os.path.basename(os.path.normpath(fixed_path)).lower()
    for extension, fmt in EXTENSION_FORMATS:
        if name.endswith(extension):
            return fmt
    return 'nii.gz'


def check_output_dir(path, force, marker):
    """UserError unless ``path`` can be (re)placed: absent, or with --force an empty directory or
    one holding ``marker`` (a previous output of this script). Its parent must exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise cli.UserError('{}: parent directory {} does not exist'.format(path, parent))
    if not os.path.lexists(path):
        return
    if not force:
        raise cli.UserError('{} exists; use --force to replace it or choose another directory'.format(path))
    if not os.path.isdir(path) or os.path.islink(path):
        raise cli.UserError('{} exists and is not a directory; not replacing it'.format(path))
    if os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise cli.UserError('{} exists and is not an output of predict.py (no {}); not replacing it'.format(
            path, marker))


@contextlib.contextmanager
def staging_directory(path):
    """A temporary directory beside ``path`` that replaces ``path`` when the block succeeds and is
    removed when it fails (an existing ``path`` is swapped out and deleted only after success)."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    staging = tempfile.mkdtemp(prefix='.' + name + '.', suffix='.tmp', dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix='.' + name + '.', suffix='.old', dir=parent)
            os.rename(path, os.path.join(old, name))
        os.rename(staging, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------- main steps

def write_image(image, path, fmt, compress=True):
    """sitk.WriteImage with a one-line UserError; compression where the format allows it
    (.nii.gz is always compressed, .nii never)."""
    import SimpleITK as sitk
    try:
        sitk.WriteImage(image, path, compress and fmt != 'nii')
    except RuntimeError as e:
        raise cli.UserError('cannot write {}: {}'.format(path, str(e).strip().splitlines()[-1]))


@dataclasses.dataclass
class Pair:
    """One registration job: its id (the output sub-directory in batch mode) and its files."""
    fixed: str
    moving: str
    moving_seg: str = None
    fixed_seg: str = None
    id: str = None


def predict(args, network=None):
    """Register args.moving to args.fixed (or every pair of a batch) and write the outputs.

    network: an object with ``image_size`` (N), ``info`` (dict) and ``flow(fixed, moving)`` ->
    flow [N, N, N, 3] (voxels; see registration.py); None opens args.checkpoint. Returns the
    report dict (batch: the summary). The output directory is owned by this process while it works.
    """
    batch = bool(args.pairs) or any(c in (args.moving or '') for c in '*?[')
    if batch:
        pairs = batch_pairs(args)
    elif not (args.fixed and args.moving and args.output):
        raise cli.UserError('--fixed, --moving and -o/--output are required (or --pairs CSV, or --export DIR)')
    if not args.output:
        raise cli.UserError('-o/--output is required')
    check_args(args)
    with cli.exclusive_output(args.output, 'output directory'):
        if batch:
            return predict_batch(args, pairs, network)
        return predict_pair(args, Pair(args.fixed, args.moving, args.moving_seg, args.fixed_seg), network)


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
    unknown = [w for w in wanted if w not in OUTPUTS]
    if unknown or not wanted:
        raise cli.UserError('--outputs {!r}: choose from {}'.format(args.outputs, ','.join(OUTPUTS)))
    args.outputs = wanted
    args.refine_options = cli.refine_settings(args)


def open_model(args, network):
    """(image size N, function opening the network, preprocessing options) without TensorFlow."""
    if network is None:
        image_size, open_network, record = registration.resolve_network(
            args.checkpoint, args.image_size, args.rep, args.threads, args.tf_warp)
    else:
        image_size, open_network, record = network.image_size, lambda: network, network.info.get('preprocessing')
    options = registration.preprocessing_options(record, image_size,
                                                 {k: getattr(args, k) for k in registration.PREPROCESSING_KEYS})
    return image_size, open_network, options


def read_pair(pair, options, clock):
    """The pair's images and label maps (checked) and both images preprocessed: (images, preprocessed)."""
    with clock.stage('read'):
        images = {key: registration.read_image(getattr(pair, key), getattr(pair, key)) for key in ('fixed', 'moving')}
        for key, image_key in (('fixed_seg', 'fixed'), ('moving_seg', 'moving')):
            if getattr(pair, key):
                images[key] = registration.read_label_map(getattr(pair, key), images[image_key],
                                                          '{} (--{})'.format(getattr(pair, key), key))
    with clock.stage('preprocess'):
        preprocessed = registration.preprocess_pair(images['fixed'], images['moving'], options)
    return images, preprocessed


def predict_pair(args, pair, network):
    """One pair into args.output (replaced only with --force)."""
    import SimpleITK as sitk
    fmt = output_format(pair.fixed, args.format)
    check_output_dir(args.output, args.force, REPORT)
    image_size, open_network, options = open_model(args, network)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    clock = registration.Stopwatch()
    images, preprocessed = read_pair(pair, options, clock)
    with clock.stage('load_model'):
        model = registration.Model(open_network(), options, threads=args.threads)
    return register_and_write(model, pair, images, preprocessed, args.output, args, fmt, clock, progress=True)


def register_and_write(model, pair, images, preprocessed, output, args, fmt, clock, progress=False):
    """Register a read pair and write the outputs args.outputs asks for into ``output`` (through a
    staging directory); returns the pair's report (also written as predict.json). progress: a
    progress bar over the refinement's iterations (--refine)."""
    import SimpleITK as sitk
    from data_util.geometry import warp_labels
    bar = cli.progress(args.refine, 'refining', 'iteration') if progress and args.refine else None
    result = model.register(images['fixed'], images['moving'], images.get('moving_seg'), images.get('fixed_seg'),
                            args.default_value, args.field_dtype, preprocessed=preprocessed, clock=clock,
                            refine=args.refine, progress=bar and (lambda i: bar.update()), **args.refine_options)
    if bar:
        bar.close()
    fixed, moving = images['fixed'], images['moving']
    extension = FORMATS[fmt]
    outputs = {}
    if 'warped' in args.outputs:
        outputs['warped'] = 'warped' + extension
    if 'field' in args.outputs:
        outputs['field'] = 'field' + extension
    if 'seg' in args.outputs and result.warped_seg is not None:
        outputs['warped_seg'] = 'warped_seg' + extension
    if 'preview' in args.outputs:
        outputs['previews'] = previews.FILES
    report = {'fixed': os.path.abspath(pair.fixed), 'moving': os.path.abspath(pair.moving),
              'fixed_seg': pair.fixed_seg and os.path.abspath(pair.fixed_seg),
              'moving_seg': pair.moving_seg and os.path.abspath(pair.moving_seg),
              'format': fmt, 'outputs': outputs, 'threads': args.threads}
    report.update(result.report)
    with staging_directory(output) as staging:
        warped, warped_seg = result.warped, result.warped_seg
        if 'field' in outputs:
            field_path = os.path.join(staging, outputs['field'])
            with clock.stage('write'):
                write_image(result.field, field_path, fmt, compress=False)
                written = sitk.ReadImage(field_path, sitk.sitkVectorFloat64)
            if args.field_dtype == 'float64' and (registration.geometry_record(written)
                                                  != registration.geometry_record(fixed)):
                # the format rounded the geometry (an oblique NIfTI header): warp with the field as
                # written, so that re-applying the file reproduces the outputs exactly
                with clock.stage('resample'):
                    transform = sitk.DisplacementFieldTransform(written)
                    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, args.default_value)
                    if warped_seg is not None:
                        warped_seg = warp_labels(images['moving_seg'], fixed, transform)
        with clock.stage('write'):
            if 'warped' in outputs:
                write_image(warped, os.path.join(staging, outputs['warped']), fmt)
            if 'warped_seg' in outputs:
                write_image(warped_seg, os.path.join(staging, outputs['warped_seg']), fmt)
            if 'previews' in outputs:
                moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, args.default_value)
                previews.write(staging, fixed, moving_on_fixed, warped, result.field_array, moving, model.preprocessing)
            report.update(clock.report())
            with open(os.path.join(staging, REPORT), 'w') as f:
                json.dump(report, f, indent=2)
                f.write('\n')
    return report


# ---------------------------------------------------------------- batch mode

def batch_pairs(args):
    """The pairs of --pairs CSV (columns fixed, moving[, moving_seg, fixed_seg, id]; relative
    paths from the CSV's directory) or of --fixed F --moving 'GLOB' (ids: the moving file names)."""
    from data_util.prepare import scan_id_from_path
    if args.pairs:
        if args.moving or args.fixed or args.moving_seg or args.fixed_seg:
            raise cli.UserError('--pairs lists every file; give no --fixed, --moving or label maps with it')
        pairs = read_pairs_csv(args.pairs)
    else:
        if not args.fixed:
            raise cli.UserError('--moving {!r} is a pattern: give the --fixed image they are registered to'.format(
                args.moving))
        if args.moving_seg and '{id}' not in args.moving_seg:
            raise cli.UserError('--moving_seg with a --moving pattern is a template with {id}, e.g. seg/{id}.nii.gz')
        paths = sorted(glob.glob(args.moving))
        if not paths:
            raise cli.UserError('--moving {!r} matches no file'.format(args.moving))
        pairs = []
        for path in paths:
            pair_id = scan_id_from_path(path)
            pairs.append(Pair(args.fixed, path, args.moving_seg and args.moving_seg.replace('{id}', pair_id),
                              args.fixed_seg, pair_id))
    ids = [p.id for p in pairs]
    duplicate = sorted({i for i in ids if ids.count(i) > 1})
    if duplicate:
        raise cli.UserError('pair id {!r} appears twice; give ids in an id column'.format(duplicate[0]))
    bad = [i for i in ids if not i or '/' in i or i in ('.', '..')]
    if bad:
        raise cli.UserError('pair id {!r} cannot name an output directory'.format(bad[0]))
    return pairs


def read_pairs_csv(path):
    """Pairs of a CSV with a header row naming its columns (fixed, moving required)."""
    if not os.path.isfile(path):
        raise cli.UserError('{}: no such pairs file'.format(path))
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline='', encoding='utf-8-sig') as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row) and not row[0].startswith('#')]
    if not rows:
        raise cli.UserError('{}: lists no pairs'.format(path))
    header = [cell.strip() for cell in rows[0]]
    known = [field.name for field in dataclasses.fields(Pair)]
    if 'fixed' not in header or 'moving' not in header or any(h not in known for h in header):
        raise cli.UserError('{}: the header row must name the columns, fixed and moving and optionally {} '
                            '(got {})'.format(path, ', '.join(k for k in known if k not in ('fixed', 'moving')),
                                              ','.join(header)))
    pairs = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise cli.UserError('{}:{}: {} cells, the header has {}'.format(path, number, len(row), len(header)))
        cells = {h: c.strip() or None for h, c in zip(header, row)}
        if not cells['fixed'] or not cells['moving']:
            raise cli.UserError('{}:{}: fixed and moving are required'.format(path, number))
        files = {k: v if k == 'id' or v is None else os.path.join(base, v) for k, v in cells.items()}
        if not files.get('id'):
            files['id'] = '{:04d}-{}'.format(number - 1, os.path.basename(cells['moving']).split('.')[0])
        pairs.append(Pair(**files))
    if not pairs:
        raise cli.UserError('{}: lists no pairs'.format(path))
    return pairs


def predict_batch(args, pairs, network):
    """Every pair into args.output/<id>/ with the model loaded once; the next pair is read and
    preprocessed while this one is registered. A pair already done (its predict.json exists) is
    skipped; a pair that fails is reported and skipped. Writes summary.json and summary.csv;
    UserError at the end if any pair failed."""
    import concurrent.futures

    import SimpleITK as sitk
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise cli.UserError('{} exists and is not a directory'.format(args.output))
    image_size, open_network, options = open_model(args, network)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    todo = [p for p in pairs if not os.path.isfile(os.path.join(args.output, p.id, REPORT))]
    records = {}
    for pair in pairs:
        if pair not in todo:
            with open(os.path.join(args.output, pair.id, REPORT)) as f:
                records[pair.id] = dict(summary_record(pair, json.load(f)), status='done before')
    start = time.perf_counter()
    model = registration.Model(open_network(), options, threads=args.threads) if todo else None
    load_seconds = time.perf_counter() - start

    def prepare(pair):
        clock = registration.Stopwatch()
        return clock, read_pair(pair, options, clock)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = reader.submit(prepare, todo[0]) if todo else None
        progress = cli.progress(len(todo), 'registering', 'pair')
        for index, pair in enumerate(todo):
            try:
                clock, (images, preprocessed) = upcoming.result()
            except cli.UserError as e:
                clock, failure = None, e
            upcoming = reader.submit(prepare, todo[index + 1]) if index + 1 < len(todo) else None
            output = os.path.join(args.output, pair.id)
            try:
                if clock is None:
                    raise failure
                fmt = output_format(pair.fixed, args.format)
                check_output_dir(output, True, REPORT)
                report = register_and_write(model, pair, images, preprocessed, output, args, fmt, clock)
                records[pair.id] = summary_record(pair, report)
            except cli.UserError as e:
                records[pair.id] = {'id': pair.id, 'fixed': pair.fixed, 'moving': pair.moving, 'status': 'failed',
                                    'error': ' '.join(str(e).split())}
                cli.progress_write('{}: failed: {}'.format(pair.id, records[pair.id]['error']))
            progress.update()
        progress.close()
    elapsed = time.perf_counter() - start
    ordered = [records[p.id] for p in pairs]
    failed = [r for r in ordered if r['status'] == 'failed']
    summary = {'model': model.info if model else None, 'preprocessing': dict(options, percentiles=list(
        options['percentiles']), window=list(options['window'])), 'outputs': args.outputs,
        'field_dtype': args.field_dtype, 'pairs': ordered, 'registered': len(todo) - len(failed),
        'failed': len(failed), 'skipped': len(pairs) - len(todo), 'load_model_seconds': round(load_seconds, 4),
        'seconds': round(elapsed, 4),
        'pairs_per_minute': round(60.0 * len(todo) / elapsed, 2) if todo else None}
    cli.write_json(os.path.join(args.output, 'summary.json'), summary)
    write_summary_csv(os.path.join(args.output, 'summary.csv'), ordered)
    if failed:
        raise cli.UserError('{} of {} pairs failed (first: {}: {}); see {}'.format(
            len(failed), len(pairs), failed[0]['id'], failed[0]['error'], os.path.join(args.output, 'summary.csv')))
    return summary


def summary_record(pair, report):
    """A registered pair's line of the batch summary."""
    record = {'id': pair.id, 'fixed': report['fixed'], 'moving': report['moving'], 'status': 'registered',
              'folding': report['folding'], 'displacement_mm_mean': report['displacement_mm']['mean'],
              'seconds': {k: report['seconds'].get(k, 0.0) for k in SUMMARY_STAGES},
              'report': os.path.join(pair.id, REPORT)}
    if 'dice' in report:
        record['dice'] = report['dice']['mean']
        record['dice_before'] = report['dice']['mean_before']
        record['dice_per_label'] = report['dice']['per_label']
    return record


def write_summary_csv(path, records):
    """One row per pair: id, status, files, Dice (mean, before, per label), folding, seconds per stage."""
    labels = sorted({k for r in records for k in r.get('dice_per_label', {})}, key=lambda v: int(v))
    columns = (['id', 'status', 'fixed', 'moving', 'dice', 'dice_before', 'folding', 'displacement_mm_mean']
               + ['seconds_' + s for s in SUMMARY_STAGES] + ['dice_' + v for v in labels] + ['error'])
    lines = [columns]
    for r in records:
        row = dict(r, **{'seconds_' + s: v for s, v in r.get('seconds', {}).items()},
                   **{'dice_' + v: d for v, d in r.get('dice_per_label', {}).items()})
        lines.append(['' if row.get(c) is None else row.get(c, '') for c in columns])
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    cli.write_atomic(path, buffer.getvalue())


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
    from network.export import META_FILE, ExportError, freeze, write_export
    from registration import cubic_size
    check_output_dir(args.export, args.force, META_FILE)
    run_dir, prefix, step = cli.resolve_checkpoint(args.checkpoint)
    run_args = cli.load_run_args(run_dir)
    size = args.image_size or cubic_size(run_args.get('image_size'), 'the checkpoint\'s')
    from network import spatial_transformer
    spatial_transformer.set_warp_impl(args.export_warp)
    sess, framework, run_args, prefix = cli.load_model(prefix, [size] * 3, rep=args.rep, threads=args.threads)
    graph_def = freeze(sess, framework.outputs['flow'])
    meta = {'image_size': [size] * 3, 'base_network': run_args.get('base_network'),
            'n_cascades': run_args.get('n_cascades'), 'rep': args.rep or run_args.get('rep', 1),
            'net_args': run_args.get('net_args', ''), 'parameters': framework.parameter_count,
            'warp': spatial_transformer.warp_impl(), 'checkpoint': os.path.abspath(prefix), 'step': step,
            'preprocessing': run_args.get('preprocessing'),
            'flow': 'float32 [B, N, N, N, 3], voxels of the fixed grid, channel k along array axis k; '
                    'warped(p) = moving(p + flow(p))',
            'inputs_range': 'float32 [B, N, N, N, 1] in 0..255 (preprocessed uint8 volumes)'}
    sess.close()
    try:
        with staging_directory(args.export) as staging:
            meta = write_export(staging, graph_def, meta)
    except ExportError as e:
        raise cli.UserError(str(e))
    size_bytes = os.path.getsize(os.path.join(args.export, meta['graph']))
    print('Exported {} ({:,} parameters, warp {}) to {}: {} {:.2f} MB'.format(
        prefix, meta['parameters'], meta['warp'], args.export, meta['graph'], size_bytes / 1e6))
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
        print('Registered {} pairs into {} ({} skipped as done before): {} pairs/min, model loaded once in {:.1f} s; '
              'summary.csv'.format(report['registered'], args.output, report['skipped'],
                                   report['pairs_per_minute'], report['load_model_seconds']))
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
