"""The job client: ``rcds wait`` and ``rcds get`` as one file that runs on a bare ``python3`` (3.9+).

A grid worker node has the system's python3 (3.9 on EL9) and nothing installed by pip. The modules the
job side needs are kept runnable there (standard library fallbacks for cryptography, httpx, httptools,
tqdm and tomllib; see ``rcds.compat``), and this module puts them into one file:

* the modules are found by following the ``rcds`` imports of ``rcds.client.jobcli`` (the command line),
  so the file holds exactly what the commands use, and the same code as the installed package;
* each module's source is embedded as it is and loaded by a small importer at the front of
  ``sys.meta_path``: every module keeps its own namespace, its relative imports and its line numbers
  (an uncaught exception's traceback shows the embedded lines), and an ``rcds`` installed on the node
  cannot mix in;
* packages whose ``__init__`` is not itself imported (``rcds.client`` re-exports ``publish``, which needs
  zstandard) are empty in the file.

``rcds build-job-client -o rcds-job`` writes it; ``rcds serve`` offers it at ``GET /pubapi/client``.
The output depends only on the sources, so servers of one version serve the same bytes (and ETag).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

from .. import __version__

ENTRY = "rcds.client.jobcli"
_ROOT = Path(__file__).resolve().parents[1]  # the rcds package directory


def module_file(name: str) -> Path:
    """The source file of module ``name`` (``rcds.x.y``) in this installation."""
    parts = name.split(".")[1:]
    base = _ROOT.joinpath(*parts)
    package = base / "__init__.py"
    return package if package.is_file() else base.with_suffix(".py")


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    base = _ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or base.is_dir()


def _imports(name: str, source: str, is_package: bool) -> set[str]:
    """The ``rcds`` modules a module imports (anywhere in it: lazy imports in functions count too)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, str(module_file(name)))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "rcds" or a.name.startswith("rcds."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            if parent != "rcds" and not parent.startswith("rcds."):
                continue
            for alias in node.names:
                sub = f"{parent}.{alias.name}"
                # ``from . import signing`` imports a module; ``from .. import __version__`` the package
                found.add(sub if _is_module(sub) else parent)
    return found


def modules() -> dict[str, str]:
    """Name -> source of every module the job client needs, in a stable order."""
    sources: dict[str, str] = {}
    todo = [ENTRY]
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        path = module_file(name)
        if not path.is_file():  # a namespace package (rcds.cvmfs): an empty package in the file
            continue
        sources[name] = path.read_text(encoding="utf-8")
        todo.extend(_imports(name, sources[name], path.name == "__init__.py"))
    return dict(sorted(sources.items()))


def module_paths() -> list[Path]:
    """The files the job client is made of (checked for the 3.9 floor by the tests)."""
    return [module_file(name) for name in modules()]


_HEADER = '''#!/usr/bin/env python3
# rcds job client {version}: `wait` and `get` of rcds for grid worker nodes, on python3 >= 3.9 alone.
# Made by `rcds build-job-client` (or fetched from an rcds server's /pubapi/client) from rcds's own
# modules, embedded below as they are; do not edit. Run `python3 rcds-job --help`.
# Sources: sha256 {digest}
"""rcds job client {version} (see `python3 <this file> --help`)."""

import sys

if sys.version_info < (3, 9):
    sys.stderr.write("rcds-job: error: needs Python 3.9 or newer\\n")
    sys.exit(1)

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402

# name -> (is a package, source)
_SOURCES = {{}}
'''

_FOOTER = '''

class _Importer(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Loads the embedded modules; every other rcds module is absent, never taken from the node."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in _SOURCES:
            spec = importlib.util.spec_from_loader(fullname, self, is_package=_SOURCES[fullname][0])
            spec.origin = self._filename(fullname)
            return spec
        return None

    @staticmethod
    def _filename(fullname):
        # Not "<...>": linecache then asks get_source, so tracebacks show the lines.
        return "%s/%s.py" % (__file__, fullname.replace(".", "/"))

    def is_package(self, fullname):
        return _SOURCES[fullname][0]

    def get_source(self, fullname):
        return _SOURCES[fullname][1]

    def get_code(self, fullname):
        return compile(self.get_source(fullname), self._filename(fullname), "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__file__ = self._filename(module.__name__)
        exec(self.get_code(module.__name__), module.__dict__)


sys.meta_path.insert(0, _Importer())

if __name__ == "__main__":
    import traceback

    # The interpreter's own printer reads source files from disk; this one asks the importer.
    sys.excepthook = traceback.print_exception
    from rcds.client.jobcli import main

    sys.exit(main())
'''


def _packages(names: list[str]) -> list[str]:
    """The parent packages of ``names`` that are not themselves among them."""
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return sorted(parents - set(names))


def build() -> bytes:
    """The job client file."""
    sources = modules()
    digest = hashlib.sha256()
    for name, source in sources.items():
        digest.update(f"{name}\0{source}\0".encode())
    lines = [_HEADER.format(version=__version__, digest=digest.hexdigest())]
    for name in _packages(list(sources)):
        lines.append(f"_SOURCES[{name!r}] = (True, '')\n")
    for name, source in sources.items():
        is_package = module_file(name).name == "__init__.py"
        lines.append(f"\n_SOURCES[{name!r}] = ({is_package}, ''.join([\n")
        lines.extend(f"    {line!r},\n" for line in source.splitlines(keepends=True))
        lines.append("]))\n")
    lines.append(_FOOTER)
    return "".join(lines).encode("utf-8")


@functools.cache
def cached() -> tuple[bytes, str]:
    """``build()`` once per process, with its ETag (what the server offers)."""
    data = build()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


__all__ = ["ENTRY", "build", "cached", "module_paths", "modules"]
