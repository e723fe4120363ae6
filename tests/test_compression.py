"""Objects deflated with zlib-ng (when installed) are standard zlib streams, and dedup survives a change of
compressor: what stock zlib stored (an older rcds, an install without zlib-ng) is reused by content.

"Older rcds" and "without zlib-ng" are real processes in which ``import zlib_ng`` fails, so that
``rcds.cvmfs.objects`` takes its standard-library fallback (what the job client does on a bare python3).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

from conftest import FQRN, write_tree
from rcds.cvmfs import objects
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository

# A few kinds of content: source-like text, a repetitive binary, random bytes, and one file big enough to
# be chunked with the tests' small chunk sizes (64/128/256 KiB).
_TEXT = b"".join(b"int f%d(int x) { return x * %d + 1; }  // line %d\n" % (i, i % 7, i) for i in range(4000))
_BINARY = b"".join(hashlib.sha256(b"%d" % (i // 16)).digest() + bytes(32) for i in range(20000))
TREE: dict[str, object] = {
    "README": b"hello\n",
    "src": {"main.c": _TEXT, "empty": b""},
    "lib": {"libx.so": _BINARY, "random.bin": os.urandom(50_000)},
}

# Runs Python with zlib-ng and ISA-L unimportable: rcds.cvmfs.objects falls back to the standard library's
# zlib.
_WITHOUT_ZLIB_NG = "import sys; sys.modules['zlib_ng'] = None; sys.modules['isal'] = None\n"


def _without_zlib_ng(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ZLIB_NG + code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _objects(storage: Path) -> dict[str, bytes]:
    """Every object in ``data/`` by name (``ab/cdef...`` plus suffix)."""
    return {
        f"{p.parent.name}/{p.name}": p.read_bytes()
        for p in (storage / "data").glob("??/*")
        if p.is_file() and not p.name.startswith(".")
    }


def _publish(repo: Repository, path: str, tree: Path) -> None:
    with repo.transaction() as t:
        t.mkdir("/sw", nested=True)
        t.add_directory(path, tree)
        t.commit()


def test_every_object_inflates_with_stock_zlib_and_is_named_by_its_bytes(
    make_repo: Callable[..., Repository], tmp_path: Path
) -> None:
    tree = write_tree(tmp_path / "tree", TREE)
    repo = make_repo()
    _publish(repo, "/sw/a", tree)
    stored = _objects(repo.storage)
    contents = set()
    catalogs = 0
    for name, data in stored.items():
        assert hashlib.sha1(data).hexdigest() == name.replace("/", "")[:40]
        raw = zlib.decompress(data)  # what every CVMFS client and an older rcds use
        contents.add(raw)
        if name.endswith("C"):  # a catalog: an SQLite database, read by every client
            db = tmp_path / "catalog.db"
            db.write_bytes(raw)
            with sqlite3.connect(db) as conn:
                assert conn.execute("SELECT count(*) FROM catalog").fetchone()[0] > 0
            catalogs += 1
    assert catalogs >= 2  # root and /sw (nested)
    assert {_TEXT, b"hello\n", b""} <= contents
    # the one big file is in chunks (P objects): together they are the file
    chunks = [zlib.decompress(d) for n, d in stored.items() if n.endswith("P")]
    assert len(chunks) >= 2 and sum(map(len, chunks)) == len(_BINARY)
    assert all(c in _BINARY for c in chunks)
    if objects.ZLIB_NG:  # the fast compressor really wrote them: its bytes are not stock zlib's
        text_object = next(d for d in stored.values() if zlib.decompress(d) == _TEXT)
        assert text_object != zlib.compress(_TEXT, 6)
        assert (
            len(text_object) <= len(zlib.compress(_TEXT, 6)) * 1.05
        )  # and no bigger than stock, give or take


def test_objects_inflate_with_isal_in_bounded_pieces_and_a_bad_stream_is_a_zlib_error() -> None:
    assert objects.ISAL, "isal is a dependency: the reading paths inflate with it"
    inflating = objects.inflater()
    assert type(inflating).__module__.startswith("isal")
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    out, calls, buf = 0, 0, bomb
    while buf:
        piece = inflating.decompress(buf, 4 << 20)
        assert len(piece) <= 4 << 20  # max_length bounds what one call makes, as zlib's does
        out, calls, buf = out + len(piece), calls + 1, inflating.unconsumed_tail
    out += len(inflating.flush())
    assert (out, inflating.eof, inflating.unused_data) == (64 << 20, True, b"")
    assert calls >= 16
    stream = zlib.compress(_TEXT)
    broken = stream[:20] + b"\xff" * 40 + stream[60:]
    try:
        objects.inflater().decompress(broken)
    except objects.ZlibError:
        pass
    else:
        raise AssertionError("a corrupt stream inflated without an error")
    truncated = objects.inflater()
    truncated.decompress(stream[:-10])
    assert not truncated.eof
    assert objects.decompress(stream) == _TEXT  # whole objects too


def test_a_reader_without_zlib_ng_reads_what_zlib_ng_wrote(
    make_repo: Callable[..., Repository], tmp_path: Path
) -> None:
    tree = write_tree(tmp_path / "tree", TREE)
    repo = make_repo()
    _publish(repo, "/sw/a", tree)
    out = _without_zlib_ng(
        f"""
import hashlib, json
from rcds.cvmfs import objects
from rcds.cvmfs.reader import RepositoryReader
assert not objects.ZLIB_NG and not objects.ISAL
with RepositoryReader.open({str(repo.storage)!r}, {str(repo.public_key_path)!r}, fqrn={FQRN!r},
                           cache_dir={str(tmp_path / "old-cache")!r}) as r:
    print(json.dumps({{p: hashlib.sha256(r.read("/sw/a/" + p)).hexdigest()
                      for p in ("README", "src/main.c", "src/empty", "lib/libx.so", "lib/random.bin")}}))
"""
    )
    got = json.loads(out)
    for rel, digest in got.items():
        assert hashlib.sha256((tree / rel).read_bytes()).hexdigest() == digest, rel


def test_content_stored_by_stock_zlib_is_reused_by_content_not_stored_again(
    make_repo: Callable[..., Repository], tmp_path: Path, open_reader: Callable[..., RepositoryReader]
) -> None:
    tree = write_tree(tmp_path / "tree", TREE)
    repo = make_repo()
    # an older rcds (stock zlib, level 6) publishes the tree first
    _without_zlib_ng(
        f"""
from rcds.cvmfs import objects
from rcds.cvmfs.repository import Repository
assert not objects.ZLIB_NG and objects.ZLIB_LEVEL == 6
repo = Repository({str(repo.storage)!r})
with repo.transaction() as t:
    t.mkdir("/sw", nested=True)
    t.add_directory("/sw/a", {str(tree)!r})
    t.commit()
"""
    )
    before = _objects(repo.storage)
    text_name = next(n for n, d in before.items() if not n.endswith("C") and zlib.decompress(d) == _TEXT)
    assert before[text_name] == zlib.compress(_TEXT, 6)  # really stock zlib's bytes

    # this process (zlib-ng if installed) publishes the same content at another path
    _publish(repo, "/sw/b", tree)
    after = _objects(repo.storage)
    new = set(after) - set(before)
    assert new and all(n.endswith(("C", "H")) for n in new), new  # only catalogs and history
    reader = open_reader(repo)
    entries = {e.path: e.dirent for e in reader.walk("/sw")}
    for rel in ("src/main.c", "lib/libx.so", "lib/random.bin"):
        a, b = entries[f"/sw/a/{rel}"], entries[f"/sw/b/{rel}"]
        assert (a.hash, a.chunks) == (b.hash, b.chunks)
        assert reader.read(f"/sw/b/{rel}") == (tree / rel).read_bytes()
    assert entries["/sw/a/lib/libx.so"].is_chunked
