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
import itertools
import json
import os
import shutil
import sys
import tempfile

import numpy as np

import cli
import registration

FORMATS = {'nii.gz': '.nii.gz', 'nii': '.nii', 'mha': '.mha', 'mhd': '.mhd', 'nrrd': '.nrrd'}
EXTENSION_FORMATS = (('.nii.gz', 'nii.gz'), ('.nii', 'nii'), ('.mha', 'mha'), ('.mhd', 'mhd'),
                     ('.nrrd', 'nrrd'), ('.nhdr', 'nrrd'))
REPORT = 'predict.json'
PREVIEWS = ('fixed', 'moving', 'warped', 'checkerboard', 'flow')
VIEWS = ('axial', 'coronal', 'sagittal')
CHECKER_TILES = 8


def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--checkpoint', default=None,
                   help='train.py run directory, DIR:STEP or checkpoint prefix; or an export directory '
                        '(default: the shipped brain MRI model, models/lpba40-ldr)')
    p.add_argument('--fixed', help='fixed image file (or DICOM directory)')
    p.add_argument('--moving', help='moving image file (or DICOM directory)')
    p.add_argument('-o', '--output', help='output directory (must not exist unless --force)')
    p.add_argument('--moving_seg', help='label map of the moving image: warped (nearest neighbour)')
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


# ---------------------------------------------------------------- previews

def display_axes(direction):
    """(perm, flip) so that array axis perm[w] is the one closest to world axis w (L, P, S)
    and flip[w] tells whether it runs the opposite way."""
    matrix = np.abs(np.reshape(direction, (3, 3)))
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(matrix[w, p[w]] for w in range(3)))
    signs = np.reshape(direction, (3, 3))
    return list(perm), [bool(signs[w, perm[w]] < 0) for w in range(3)]


def mid_slices(volume, perm, flip):
    """Axial, coronal and sagittal mid slices of a [X, Y, Z] (or [X, Y, Z, C]) array.

    The volume is reoriented (permute + flip, no interpolation) so its axes run to L, P, S.
    Returns three 2-D arrays (magnitude over C for vectors) laid out for display: axial
    rows P (anterior up) x cols L (patient right on the left, radiological), coronal and
    sagittal rows S (superior up; flipped so row 0 is superior) x cols L resp. P.
    """
    volume = np.transpose(volume, perm + list(range(3, volume.ndim)))
    for w in range(3):
        if flip[w]:
            volume = np.flip(volume, w)
    nl, np_, ns = volume.shape[:3]
    slices = [volume[:, :, ns // 2].swapaxes(0, 1), volume[:, np_ // 2, :].swapaxes(0, 1)[::-1],
              volume[nl // 2, :, :].swapaxes(0, 1)[::-1]]
    slices = [np.asarray(s, np.float64) for s in slices]
    if volume.ndim == 4:
        slices = [np.linalg.norm(s, axis=-1) for s in slices]
    return slices


def slice_extents(spacing, shape, perm):
    """imshow extents (left, right, bottom, top) in mm of the three mid_slices views."""
    sl, sp, ss = (spacing[perm[w]] * shape[perm[w]] for w in range(3))
    return [(0, sl, sp, 0), (0, sl, ss, 0), (0, sp, ss, 0)]


def intensity_window(array, modality, percentiles, window):
    """(low, high) display window: the CT window, or the MR percentiles of a subsample."""
    if modality == 'ct':
        return window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    stride = max(1, int(round((array.size / 2e6) ** (1 / 3))))
    sample = np.asarray(array[::stride, ::stride, ::stride], np.float64)
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    return low, max(high, low + 1e-6)


def checkerboard(fixed, warped, extent):
    """CHECKER_TILES tiles along the longer side of a 2-D slice: fixed and warped (both 0..1) alternate."""
    rows, cols = fixed.shape
    width, height = abs(extent[1] - extent[0]), abs(extent[2] - extent[3])
    tile = max(width, height) / CHECKER_TILES
    row_tile = (np.arange(rows) + 0.5) * height / rows // tile
    col_tile = (np.arange(cols) + 0.5) * width / cols // tile
    mask = (row_tile[:, None] + col_tile[None, :]) % 2 == 0
    return np.where(mask, fixed, warped)


def write_previews(directory, rows, extents):
    """preview.png (all rows) and preview_<name>.png (one row each).

    rows: [(name, title, [3 slices], imshow kwargs)], extents: the three views' extents in mm.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ratios = [abs(e[1] - e[0]) / max(abs(e[2] - e[3]), 1e-9) for e in extents] + [0.08]
    width = 2.6 * sum(ratios)

    def draw(figure, axes_row, name, title, slices, kwargs):
        for ax, image, extent, view in zip(axes_row, slices, extents, VIEWS):
            shown = ax.imshow(image, extent=extent, interpolation='nearest', **kwargs)
            ax.set_title('{} - {}'.format(title, view), fontsize=8)
            ax.axis('off')
        if name == 'flow':
            figure.colorbar(shown, cax=axes_row[3], label='mm')
        else:
            axes_row[3].set_visible(False)

    def figure_of(n_rows):
        """A figure of n_rows x (3 views + a colour-bar column)."""
        figure, axes = plt.subplots(n_rows, 4, figsize=(width, 2.7 * n_rows), squeeze=False,
                                    gridspec_kw={'width_ratios': ratios})
        figure.subplots_adjust(left=0.01, right=0.94, bottom=0.02, top=1 - 0.12 / n_rows, wspace=0.05,
                               hspace=0.2)
        return figure, axes

    figure, axes = figure_of(len(rows))
    for axes_row, row in zip(axes, rows):
        draw(figure, axes_row, *row)
    figure.savefig(os.path.join(directory, 'preview.png'), dpi=80)
    plt.close(figure)
    for row in rows:
        figure, axes = figure_of(1)
        draw(figure, axes[0], *row)
        figure.savefig(os.path.join(directory, 'preview_{}.png'.format(row[0])), dpi=100)
        plt.close(figure)


def preview_rows(fixed, moving_on_fixed, warped, field, moving, options):
    """The five preview rows (see write_previews) from images on the fixed grid."""
    import SimpleITK as sitk

    def xyz(image):
        return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)

    perm, flip = display_axes(fixed.GetDirection())
    extents = slice_extents(fixed.GetSpacing(), fixed.GetSize(), perm)
    fixed_window, moving_window = [intensity_window(xyz(image), options['modality'], options['percentiles'],
                                                    options['window']) for image in (fixed, moving)]
    grey = {'cmap': 'gray'}
    fixed_slices = mid_slices(xyz(fixed), perm, flip)
    warped_slices = mid_slices(xyz(warped), perm, flip)

    def scaled(slices, window):
        return [np.clip((s - window[0]) / (window[1] - window[0]), 0, 1) for s in slices]

    checker = [checkerboard(f, w, e) for f, w, e in zip(scaled(fixed_slices, fixed_window),
                                                         scaled(warped_slices, moving_window), extents)]
    flow_slices = mid_slices(field.transpose(2, 1, 0, 3), perm, flip)
    rows = [('fixed', 'fixed', fixed_slices, dict(grey, vmin=fixed_window[0], vmax=fixed_window[1])),
            ('moving', 'moving (before)', mid_slices(xyz(moving_on_fixed), perm, flip),
             dict(grey, vmin=moving_window[0], vmax=moving_window[1])),
            ('warped', 'warped moving', warped_slices, dict(grey, vmin=moving_window[0], vmax=moving_window[1])),
            ('checkerboard', 'checkerboard', checker, dict(grey, vmin=0, vmax=1)),
            ('flow', '|u| (mm)', flow_slices,
             {'cmap': 'viridis', 'vmin': 0, 'vmax': max(float(max(s.max() for s in flow_slices)), 1e-6)})]
    return rows, extents


# ---------------------------------------------------------------- main steps

def write_image(image, path, fmt, compress=True):
    """sitk.WriteImage with a one-line UserError; compression where the format allows it
    (.nii.gz is always compressed, .nii never)."""
    import SimpleITK as sitk
    try:
        sitk.WriteImage(image, path, compress and fmt != 'nii')
    except RuntimeError as e:
        raise cli.UserError('cannot write {}: {}'.format(path, str(e).strip().splitlines()[-1]))


def predict(args, network=None):
    """Register args.moving to args.fixed and write every output into args.output.

    network: an object with ``image_size`` (N), ``info`` (dict) and ``flow(fixed, moving)`` ->
    flow [N, N, N, 3] (voxels; see registration.py); None opens args.checkpoint. Returns the
    report dict. The output directory is owned by this process while it works.
    """
    if not (args.fixed and args.moving and args.output):
        raise cli.UserError('--fixed, --moving and -o/--output are required (or --export DIR)')
    with cli.exclusive_output(args.output, 'output directory'):
        return _predict(args, network)


def _predict(args, network):
    import SimpleITK as sitk
    from data_util.geometry import warp_labels
    if args.threads < 1:
        raise cli.UserError('--threads must be >= 1')
    if args.image_size is not None and args.image_size < 8:
        raise cli.UserError('--image_size {}: the network grid needs at least 8 voxels a side'.format(args.image_size))
    if args.rep is not None and args.rep < 1:
        raise cli.UserError('-r/--rep {}: must be >= 1'.format(args.rep))
    if args.fixed_seg and not args.moving_seg:
        raise cli.UserError('--fixed_seg is compared with the warped --moving_seg; give both')
    fmt = output_format(args.fixed, args.format)
    extension = FORMATS[fmt]
    check_output_dir(args.output, args.force, REPORT)
    if network is None:
        image_size, open_network, record = registration.resolve_network(
            args.checkpoint, args.image_size, args.rep, args.threads, args.tf_warp)
    else:
        image_size, open_network, record = network.image_size, lambda: network, network.info.get('preprocessing')
    options = registration.preprocessing_options(record, image_size, {k: getattr(args, k) for k in registration.PREPROCESSING_KEYS})
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    clock = registration.Stopwatch()
    with clock.stage('read'):
        images = {key: registration.read_image(getattr(args, key), getattr(args, key)) for key in ('fixed', 'moving')}
        for key, image_key in (('fixed_seg', 'fixed'), ('moving_seg', 'moving')):
            if getattr(args, key):
                images[key] = registration.read_label_map(getattr(args, key), images[image_key],
                                                          '{} (--{})'.format(getattr(args, key), key))
    with clock.stage('preprocess'):
        preprocessed = registration.preprocess_pair(images['fixed'], images['moving'], options)
    with clock.stage('load_model'):
        model = registration.Model(open_network(), options)
    result = model.register(images['fixed'], images['moving'], images.get('moving_seg'), images.get('fixed_seg'),
                            args.default_value, preprocessed=preprocessed, clock=clock)
    fixed, moving = images['fixed'], images['moving']
    outputs = {'warped': 'warped' + extension, 'field': 'field' + extension}
    if result.warped_seg is not None:
        outputs['warped_seg'] = 'warped_seg' + extension
    outputs['previews'] = ['preview.png'] + ['preview_{}.png'.format(name) for name in PREVIEWS]
    report = {'fixed': os.path.abspath(args.fixed), 'moving': os.path.abspath(args.moving),
              'fixed_seg': args.fixed_seg and os.path.abspath(args.fixed_seg),
              'moving_seg': args.moving_seg and os.path.abspath(args.moving_seg),
              'format': fmt, 'outputs': outputs, 'threads': args.threads}
    report.update(result.report)
    with staging_directory(args.output) as staging:
        field_path = os.path.join(staging, outputs['field'])
        warped, warped_seg = result.warped, result.warped_seg
        with clock.stage('write'):
            write_image(result.field, field_path, fmt, compress=False)
            written = sitk.ReadImage(field_path, sitk.sitkVectorFloat64)
        if registration.geometry_record(written) != registration.geometry_record(fixed):
            # the format rounded the geometry (an oblique NIfTI header): warp with the field as
            # written, so that re-applying the file reproduces the outputs exactly
            with clock.stage('resample'):
                transform = sitk.DisplacementFieldTransform(written)
                warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, args.default_value)
                if warped_seg is not None:
                    warped_seg = warp_labels(images['moving_seg'], fixed, transform)
        with clock.stage('write'):
            write_image(warped, os.path.join(staging, outputs['warped']), fmt)
            if warped_seg is not None:
                write_image(warped_seg, os.path.join(staging, outputs['warped_seg']), fmt)
            moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, args.default_value)
            rows, extents = preview_rows(fixed, moving_on_fixed, warped, result.field_array, moving, options)
            write_previews(staging, rows, extents)
            report.update(clock.report())
            with open(os.path.join(staging, REPORT), 'w') as f:
                json.dump(report, f, indent=2)
                f.write('\n')
    return report


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
    summary = 'network {:.2f} s, total {:.2f} s'.format(report['seconds']['network'], report['seconds']['total'])
    if report.get('dice', {}).get('mean') is not None:
        summary = 'Dice {:.4f} (before {:.4f}), '.format(report['dice']['mean'], report['dice']['mean_before']) + summary
    print('Wrote {}: {}; {}'.format(args.output, ', '.join(
        v for k, v in report['outputs'].items() if k != 'previews'), summary))
    return 0


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    cli.run(main)
