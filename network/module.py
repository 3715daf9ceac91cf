"""Sonnet-1-style module base: a module owns one variable scope and builds into the graph.

The first call creates variables under ``<enclosing scope>/<name>/``; every later call
reuses them (shared weights, e.g. RCN's ``-r`` repeats or a second tower).
"""
from .tfv1 import tf


class Module:
    """Base class. Subclasses implement ``_build(*args, **kwargs)``."""

    def __init__(self, name):
        self.name = name
        self._scope = None
        self._variables = []

    def __call__(self, *args, **kwargs):
        if self._scope is None:
            existing = set(tf.global_variables())
            with tf.variable_scope(self.name) as scope:
                self._scope = scope
                out = self._build(*args, **kwargs)
            self._variables = [v for v in tf.global_variables() if v not in existing]
            return out
        with tf.variable_scope(self._scope, reuse=True):
            return self._build(*args, **kwargs)

    def _build(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def scope_name(self):
        """Full variable-scope name; None before the first call."""
        return None if self._scope is None else self._scope.name

    @property
    def trainable_variables(self):
        """The module's own trainable variables (empty before the first call), from the graph
        the module was built in, whichever graph is the default now."""
        if self._scope is None or not self._variables:
            return []
        return self._variables[0].graph.get_collection(tf.GraphKeys.TRAINABLE_VARIABLES, scope=self._scope.name + '/')

    @property
    def variables(self):
        """The variables the module's first call created (not optimiser slots added later)."""
        return list(self._variables)


def count_parameters(variables):
    """Total number of scalars in a list of variables."""
    return int(sum(int(v.shape.num_elements()) for v in variables))
