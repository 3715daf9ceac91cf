"""Evaluation records: the metrics of a registered pair and their summaries, one path for
eval.py (networks) and baselines/evaluate.py (ANTs, Elastix, identity).

A pair's record: 'id1' (fixed), 'id2' (moving), 'dice', 'jacc' (mean over the classes),
'dices', 'jaccs' (per class), the same on the preprocessed grid as 'dice_grid', 'jacc_grid',
'dices_grid', 'jaccs_grid', 'overlap_on' ('original' or 'grid'), 'landmark_dist' (voxels of
the grid), 'jacobian_det' (std of the Jacobian determinant), 'folding' (fraction of voxels
with det <= 0) and 'seconds' (registration time per pair).

Where the scans are met: when the dataset's HDF5 groups carry their original geometry and label
maps (data_util.prepare writes both), Dice and Jaccard are measured on the FIXED scan's original
grid, with the moving label map pulled through the displacement field exactly as predict.py
does (data_util.geometry.original_overlap), so evaluation and predict.py give the same
numbers for the same pair. Without them (e.g. the original's HDF5 files) they are those of the
preprocessed grid.
"""
import numpy as np

METRICS = ('dice', 'jacc', 'dice_grid', 'jacc_grid', 'landmark_dist', 'jacobian_det', 'folding')


def nanmean(values):
    values = np.asarray(values, np.float64)
    return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else float('nan')


def nanstd(values):
    values = np.asarray(values, np.float64)
    return float(np.std(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else float('nan')


def overlap_values(class_values, class_names):
    """The label values measured on the original grids, in class order (None: every non-zero
    value of the fixed label map, for specs without segmentation_class_value)."""
    if not class_names:
        return None
    return [int(class_values[name]) for name in class_names]


def original_metrics(dataset, fixed_id, moving_id, flow, values):
    """{'dices', 'jaccs'} of a pair on the fixed scan's original grid, or None when either
    scan lacks its original geometry or label map (see Dataset.original)."""
    from data_util.geometry import original_overlap
    fixed, moving = dataset.original(fixed_id), dataset.original(moving_id)
    if fixed is None or moving is None:
        return None
    if values is None:
        values = sorted(int(v) for v in np.unique(fixed[1]) if v)
    dices, jaccs = original_overlap(flow, fixed, moving, values)
    return {'dices': dices, 'jaccs': jaccs}


def pair_record(dataset, batch, i, res, flow, seconds, values):
    """The record of pair i of a batch: res holds the graph's metrics of the batch
    (network.metrics: 'dices', 'jaccs', 'landmark_dists', 'jacobian_det', 'folding'), flow
    [N, N, N, 3] is the pair's flow, values as `overlap_values`."""
    grid = {'dices': [float(v) for v in res['dices'][i]], 'jaccs': [float(v) for v in res['jaccs'][i]]}
    original = original_metrics(dataset, batch['id1'][i], batch['id2'][i], flow, values)
    overlap = original or grid
    return {'id1': str(batch['id1'][i]), 'id2': str(batch['id2'][i]),
            'dice': nanmean(overlap['dices']), 'jacc': nanmean(overlap['jaccs']),
            'dice_grid': nanmean(grid['dices']), 'jacc_grid': nanmean(grid['jaccs']),
            'overlap_on': 'original' if original else 'grid',
            'landmark_dist': nanmean(res['landmark_dists'][i]),
            'jacobian_det': float(res['jacobian_det'][i]), 'folding': float(res['folding'][i]),
            'dices': overlap['dices'], 'jaccs': overlap['jaccs'],
            'dices_grid': grid['dices'], 'jaccs_grid': grid['jaccs'],
            'seconds': float(seconds)}


def summarize(records, class_names):
    """Mean and std of every metric over pairs, per-class means, median seconds per pair."""
    summary = {m: {'mean': nanmean([r[m] for r in records]), 'std': nanstd([r[m] for r in records])}
               for m in METRICS}
    summary['seconds_per_pair'] = float(np.median([r['seconds'] for r in records]))
    if all('seconds_refine' in r for r in records):
        summary['seconds_refine_per_pair'] = float(np.median([r['seconds_refine'] for r in records]))
        summary['seconds_per_iteration'] = float(np.median([r['refinement']['seconds_per_iteration'] for r in records]))
    per_class = {}
    if class_names:
        for k, name in enumerate(class_names):
            per_class[name] = {'dice': nanmean([r['dices'][k] for r in records]),
                               'jacc': nanmean([r['jaccs'][k] for r in records])}
    return summary, per_class


def report_text(records, summary):
    """The original's text format: 'id1 id2 dice jacc landmark jacobian' lines, then Summary."""
    lines = ['{} {} {} {} {} {}'.format(r['id1'], r['id2'], r['dice'], r['jacc'], r['landmark_dist'],
                                        r['jacobian_det']) for r in records]
    s = summary
    lines += ['Summary',
              'Dice score: {} ({})'.format(s['dice']['mean'], s['dice']['std']),
              'Jacc score: {} ({})'.format(s['jacc']['mean'], s['jacc']['std']),
              'Landmark distance: {} ({})'.format(s['landmark_dist']['mean'], s['landmark_dist']['std']),
              'Jacobian determinant: {} ({})'.format(s['jacobian_det']['mean'], s['jacobian_det']['std']),
              'Folding fraction: {} ({})'.format(s['folding']['mean'], s['folding']['std']),
              'Seconds per pair: {}'.format(s['seconds_per_pair'])]
    return '\n'.join(lines) + '\n'
