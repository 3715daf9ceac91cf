"""The library of reproduce.py: ``plan`` (settings and stages), ``run`` (stages as subprocesses,
resuming, records), ``report`` (results.json, tables, figures) and ``sections`` (figure 2's
TensorFlow worker, run only as a subprocess). Only ``sections`` imports TensorFlow."""
