"""Property test: random trees published and changed in random ways read back exactly as expected.

Each example creates a repository, publishes a random tree, then applies 2-4 further operations (add a
new tree, remove a path, replace a path), each in its own commit. After every commit the reader's view
of the whole repository must equal a simple model (paths, types, permission bits, sizes, mtimes,
contents, symlink targets) and the checker must find no errors.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import Dir, File, Hardlink, Symlink, new_repo, write_tree
from rcds.cvmfs.catalog import NESTED_MARKER
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.hashes import parent_path
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository

FILE_MODES = [0o644, 0o600, 0o640, 0o664, 0o444, 0o755, 0o700, 0o750, 0o555, 0o775]
DIR_MODES = [0o755, 0o700, 0o750, 0o775, 0o711]
MAX_DEPTH = 3
BIG_FILE = 300 * 1024  # above SMALL_CHUNKS.max_size (256 KiB)

names = st.text(alphabet=string.ascii_lowercase + string.digits + "._-é", min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..", NESTED_MARKER)
)
mtimes = st.integers(min_value=0, max_value=2_000_000_000)
symlink_targets = st.one_of(
    st.sampled_from(["../x", "/cvmfs/other.example/lib", "$(RCDS_SITE:-default)/bin", "does/not/exist", "."]),
    st.text(alphabet=string.ascii_letters + string.digits + "/._-$():", min_size=1, max_size=40),
)


@st.composite
def file_specs(draw: st.DrawFn) -> File:
    big = draw(st.integers(0, 9)) < 2  # about one file in five may be chunked
    size = draw(st.integers(0, BIG_FILE if big else 3000))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    return File(data, mode=draw(st.sampled_from(FILE_MODES)), mtime=draw(mtimes))


@st.composite
def tree_specs(draw: st.DrawFn, depth: int = 0) -> dict[str, object]:
    """Children of one directory: files, symlinks, subdirectories (maybe empty), maybe a marker."""
    children: dict[str, object] = {}
    for name in draw(st.lists(names, max_size=[5, 4, 3, 2][depth], unique=True)):
        kinds = ["file", "file", "symlink", "dir"] if depth < MAX_DEPTH else ["file", "symlink"]
        kind = draw(st.sampled_from(kinds))
        if kind == "file":
            children[name] = draw(file_specs())
        elif kind == "symlink":
            children[name] = Symlink(draw(symlink_targets), mtime=draw(mtimes))
        else:
            sub = draw(tree_specs(depth + 1))
            children[name] = Dir(sub, mode=draw(st.sampled_from(DIR_MODES)), mtime=draw(mtimes))
    if draw(st.integers(0, 9)) == 0:  # now and then a directory asks for its own catalog
        children[NESTED_MARKER] = File(b"", mtime=draw(mtimes))
    return children


def _unused(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "~"
    return name


def _files_of(spec: dict[str, object], prefix: str = "") -> list[str]:
    out = []
    for name, value in spec.items():
        if isinstance(value, File):
            out.append(prefix + name)
        elif isinstance(value, Dir):
            out += _files_of(value.children, f"{prefix}{name}/")
    return out


@st.composite
def trees(draw: st.DrawFn) -> tuple[dict[str, object], int]:
    """A whole tree (with a few hard links to its files) and the mtime of its top directory."""
    spec = draw(tree_specs())
    files = [f for f in _files_of(spec) if not f.endswith(NESTED_MARKER)]
    if files and draw(st.booleans()):
        target = draw(st.sampled_from(files))
        spec[_unused(draw(names), set(spec))] = Hardlink(target)
    return spec, draw(mtimes)


# --- the model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    kind: str  # "dir" | "file" | "symlink"
    mode: int  # permission bits
    size: int | None  # None for directories
    mtime: tuple[int, int]  # inclusive range: exact for published entries, a window for touched ones
    content: bytes | str | None = None  # file bytes or symlink target


def _expected_from_disk(src: Path, at: str) -> dict[str, Expected]:
    out: dict[str, Expected] = {}

    def one(path: Path, repo_path: str) -> None:
        st_ = os.lstat(path)
        t = (int(st_.st_mtime), int(st_.st_mtime))
        if stat.S_ISDIR(st_.st_mode):
            out[repo_path] = Expected("dir", stat.S_IMODE(st_.st_mode), None, t)
        elif stat.S_ISLNK(st_.st_mode):
            target = os.readlink(path)
            out[repo_path] = Expected("symlink", 0o777, len(target.encode()), t, target)
        else:
            out[repo_path] = Expected("file", stat.S_IMODE(st_.st_mode), st_.st_size, t, path.read_bytes())

    one(src, at)
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            one(p, f"{at}/{p.relative_to(src).as_posix()}")
    return out


class Model:
    def __init__(self, root: Expected) -> None:
        self.entries: dict[str, Expected] = {"": root}

    def dirs(self) -> list[str]:
        return sorted(p for p, e in self.entries.items() if e.kind == "dir")

    def removable(self) -> list[str]:
        return sorted(p for p in self.entries if p and not p.endswith("/" + NESTED_MARKER))

    def touch(self, path: str, window: tuple[int, int]) -> None:
        old = self.entries[path]
        self.entries[path] = Expected(old.kind, old.mode, old.size, window, old.content)

    def remove(self, path: str, window: tuple[int, int]) -> None:
        for p in [p for p in self.entries if p == path or p.startswith(path + "/")]:
            del self.entries[p]
        self.touch(parent_path(path), window)

    def add(self, path: str, src: Path, nested: bool, window: tuple[int, int]) -> None:
        if path in self.entries:
            self.remove(path, window)
        self.entries.update(_expected_from_disk(src, path))
        marker = f"{path}/{NESTED_MARKER}"
        if nested and marker not in self.entries:
            self.entries[marker] = Expected("file", 0o644, 0, window, b"")
        self.touch(parent_path(path), window)


def _assert_view_matches(reader: RepositoryReader, model: Model) -> None:
    seen = {e.path: e.dirent for e in reader.walk("")}
    assert set(seen) == set(model.entries), (
        sorted(set(seen) - set(model.entries)),
        sorted(set(model.entries) - set(seen)),
    )
    for path, exp in model.entries.items():
        d = seen[path]
        kind = "dir" if d.is_dir else "symlink" if d.is_symlink else "file" if d.is_regular else "special"
        assert kind == exp.kind, path
        assert stat.S_IMODE(d.mode) == exp.mode, (path, oct(d.mode), oct(exp.mode))
        assert exp.mtime[0] <= d.mtime <= exp.mtime[1], (path, d.mtime, exp.mtime)
        if exp.kind == "file":
            assert d.size == exp.size, path
            assert reader.read(path) == exp.content, path
        elif exp.kind == "symlink":
            assert d.symlink == exp.content, path
            assert d.size == exp.size, path


# --- the property ----------------------------------------------------------------------------------


@dataclass
class Scenario:
    repo: Repository
    work: Path
    model: Model
    revision: int = 0
    trees: int = 0

    def new_source(self, spec: tuple[dict[str, object], int]) -> Path:
        self.trees += 1
        return write_tree(self.work / f"src{self.trees}", spec[0], mtime=spec[1])

    def commit(self, change: str, path: str, src: Path | None = None, nested: bool = True) -> None:
        event(f"{change} ({'nested' if nested else 'not nested'})" if src else change)
        t0 = int(time.time())
        with self.repo.transaction() as txn:
            if change == "remove":
                assert txn.remove(path)
            else:
                assert src is not None
                txn.add_directory(path, src, nested=nested)
            result = txn.commit()
        window = (t0, int(time.time()) + 1)
        if change == "remove":
            self.model.remove(path, window)
        else:
            assert src is not None
            self.model.add(path, src, nested, window)
        self.revision += 1
        assert result.revision == self.revision
        self.verify()

    def verify(self) -> None:
        cache = self.work / f"cache{self.revision}"
        with RepositoryReader.open(
            self.repo.storage, self.repo.public_key_path, fqrn=self.repo.fqrn, cache_dir=cache
        ) as reader:
            assert reader.manifest.revision == self.revision
            _assert_view_matches(reader, self.model)
            report = check_repository(reader)
            assert report.ok, [str(i) for i in report.issues]
            event(f"catalogs after a commit: {min(report.catalogs, 4)}{'+' if report.catalogs >= 4 else ''}")
            if any(e.dirent.is_chunked for e in reader.walk("")):
                event("a chunked file was published")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_random_publishes_read_back_as_modelled_and_check_clean(
    repo_template: Path, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory(prefix="rcds-prop-") as tmp:
        work = Path(tmp)
        repo = new_repo(work / "storage", repo_template)
        with RepositoryReader.open(repo.storage, repo.public_key_path, cache_dir=work / "cache0") as reader:
            root = reader.stat("")
        model = Model(Expected("dir", stat.S_IMODE(root.mode), None, (root.mtime, root.mtime)))
        s = Scenario(repo, work, model)
        s.commit("add", "/t0", s.new_source(data.draw(trees(), label="first tree")))
        for step in range(data.draw(st.integers(2, 4), label="operations")):
            op = data.draw(st.sampled_from(["add", "add", "remove", "replace"]), label=f"op {step}")
            nested = data.draw(st.booleans(), label=f"nested {step}")
            if op == "add" or not model.removable():
                parent = data.draw(st.sampled_from(model.dirs()), label=f"parent {step}")
                taken = {p.rsplit("/", 1)[1] for p in model.entries if p and parent_path(p) == parent}
                name = _unused(data.draw(names, label=f"name {step}"), taken)
                s.commit("add", f"{parent}/{name}", s.new_source(data.draw(trees())), nested)
            elif op == "remove":
                s.commit("remove", data.draw(st.sampled_from(model.removable()), label=f"remove {step}"))
            else:
                path = data.draw(st.sampled_from(model.removable()), label=f"replace {step}")
                s.commit("replace", path, s.new_source(data.draw(trees())), nested)
        shutil.rmtree(work / "storage")
