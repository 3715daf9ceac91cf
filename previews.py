"""Preview pictures of a registration: mid slices of the fixed, the moving, the warped image, a
checkerboard of fixed and warped, and the displacement magnitude.

`write(directory, ...)` writes preview.png (all five rows: axial, coronal and sagittal mid
slices in radiological view) and one file per row (FILES). Images are sitk.Images on the fixed
grid (the moving one for its own intensity window), the field a numpy [nz, ny, nx, 3] in mm.
"""
import itertools
import os

import numpy as np

ROWS = ('fixed', 'moving', 'warped', 'checkerboard', 'flow')
FILES = ['preview.png'] + ['preview_{}.png'.format(name) for name in ROWS]
VIEWS = ('axial', 'coronal', 'sagittal')
CHECKER_TILES = 8


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


def write(directory, fixed, moving_on_fixed, warped, field, moving, options):
    """All preview files into ``directory``; options: the pair's preprocessing (intensity windows)."""
    rows, extents = preview_rows(fixed, moving_on_fixed, warped, field, moving, options)
    write_previews(directory, rows, extents)
