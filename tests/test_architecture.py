"""The layering README's Architecture section states: libraries below, scripts on top, no
import cycles, and nothing imports a script (a file run as a command: `python train.py`,
`python -m bench.inference`). Read from the sources' import statements, lazy ones included."""
import ast
import os

from conftest import ROOT

SKIPPED_DIRECTORIES = {'tests', 'results', 'weights', 'logs', 'models', 'datasets', '_build', '__pycache__'}
# modules that are libraries although they can also be run (their command line is a thin main)
RUNNABLE_LIBRARIES = {'data_util.prepare', 'data_util.synthetic', 'network.export', 'network.ops.build'}


def project_modules():
    """{dotted module name: source path} of the project's own Python files (tests excluded)."""
    modules = {}
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith('.') and d not in SKIPPED_DIRECTORIES]
        for name in files:
            if name.endswith('.py'):
                dotted = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].replace(os.sep, '.')
                modules[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = \
                    os.path.join(directory, name)
    return modules


def imported_names(module, path):
    """Every module name an import statement of the file names (absolute, relative ones resolved)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                package = module.split('.') if path.endswith('__init__.py') else module.split('.')[:-1]
                package = package[:len(package) - node.level + 1]
                base = '.'.join(package + ([node.module] if node.module else []))
            names.add(base)
            names.update(base + '.' + alias.name for alias in node.names)
    return names


def import_graph():
    modules = project_modules()
    return {m: sorted(n for n in imported_names(m, p) if n in modules and n != m) for m, p in modules.items()}


def is_script(module, path):
    source = open(path).read()
    return "if __name__ == '__main__'" in source and module not in RUNNABLE_LIBRARIES


def test_no_module_imports_a_script():
    modules = project_modules()
    scripts = {m for m, p in modules.items() if is_script(m, p)}
    assert {'train', 'eval', 'predict', 'reproduce', 'bench.inference'} <= scripts
    offending = {m: sorted(set(deps) & scripts) for m, deps in import_graph().items() if set(deps) & scripts}
    assert offending == {}


def test_imports_have_no_cycle():
    graph = import_graph()
    state = {}

    def visit(module, trail):
        state[module] = 'open'
        for dep in graph[module]:
            if state.get(dep) == 'open':
                return trail + [module, dep]
            if dep not in state:
                cycle = visit(dep, trail + [module])
                if cycle:
                    return cycle
        state[module] = 'done'
        return None

    for module in graph:
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, ' -> '.join(cycle)


def test_cycle_detection_sees_lazy_imports(tmp_path):
    """The reader resolves relative and lazy (function-level) imports: the check can fail."""
    path = tmp_path / 'mod.py'
    path.write_text('def f():\n    from . import sibling\n    import cli\n')
    assert imported_names('pkg.mod', str(path)) >= {'pkg', 'pkg.sibling', 'cli'}
