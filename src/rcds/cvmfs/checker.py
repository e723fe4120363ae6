"""``rcds repo check``: verify a repository the way the CVMFS client and ``cvmfs_swissknife check`` would.

It checks the manifest ensemble (signatures, whitelist, names, revision and timestamps), walks every
catalog of the current revision (schema, properties, transition points, markers, link counts, hard
links, per-type field rules, chunk lists, statistics counters recomputed bottom-up), verifies that every
referenced object exists and hashes to its name, and checks the reflog and history database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .catalog import (
    COUNTER_KINDS,
    FLAG_NESTED_MOUNTPOINT,
    FLAG_NESTED_ROOT,
    NESTED_MARKER,
    TRANSITION_FLAGS,
    Catalog,
    Dirent,
    NestedRef,
    add_counts,
)
from .hashes import ROOT_MD5, ContentHash, Suffix, md5_pair, parent_path
from .history import TRUNK
from .reader import ReaderError, RepositoryReader
from .reflog import Reflog, RefType
from .sources import NotFound


@dataclass(frozen=True)
class Issue:
    severity: str  # "error" or "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass
class CheckReport:
    issues: list[Issue] = field(default_factory=list)
    catalogs: int = 0
    entries: int = 0
    objects: int = 0

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, message: str) -> None:
        self.issues.append(Issue("error", where or "/", message))

    def warning(self, where: str, message: str) -> None:
        self.issues.append(Issue("warning", where or "/", message))


@dataclass
class _Row:
    md5: tuple[int, int]
    parent: tuple[int, int]
    d: Dirent


@dataclass
class _Frame:
    """A catalog whose own rows are checked, waiting for its nested catalogs."""

    where: str
    cat: Catalog
    legacy: bool
    pending: list[tuple[str, NestedRef, Dirent]]  # nested catalogs still to check (last one next)
    subtree: dict[str, int]  # their totals so far


class Checker:
    def __init__(
        self,
        reader: RepositoryReader,
        verify_objects: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.reader = reader
        self.verify_objects = verify_objects
        self.report = CheckReport()
        self._checked_objects: set[tuple[bytes, str]] = set()
        self.progress = progress or (lambda _msg: None)

    def run(self) -> CheckReport:
        self._check_manifest()
        try:
            self._check_catalogs(self.reader.manifest.root_catalog)
        except ReaderError as exc:
            self.report.error("", f"cannot read the root catalog: {exc}")
        self._check_reflog()
        self._check_history()
        return self.report

    # --- manifest --------------------------------------------------------------------------------

    def _check_manifest(self) -> None:
        r, rep = self.reader, self.report
        for problem in r.trust_errors:
            rep.error(".cvmfspublished", problem)
        m = r.manifest
        wl = r.whitelist
        now = dt.datetime.now(dt.UTC)
        if wl.is_expired(now) and not any("expired" in t for t in r.trust_errors):
            report = rep.error if r.check_whitelist_expiry else rep.warning
            report(".cvmfswhitelist", f"expired at {wl.expires:%Y-%m-%d %H:%M} UTC")
        elif wl.expires - now < dt.timedelta(days=7):
            rep.warning(".cvmfswhitelist", f"expires soon ({wl.expires:%Y-%m-%d %H:%M} UTC)")
        if not m.fqrn:
            rep.error(".cvmfspublished", "no repository name (N)")
        if not m.timestamp:
            rep.error(".cvmfspublished", "no publish timestamp (T): clients refuse to remount")
        try:
            root = r.root_catalog
        except ReaderError as exc:
            rep.error(".cvmfspublished", f"root catalog unreadable: {exc}")
            return
        if root.revision != m.revision:
            rep.error(
                ".cvmfspublished", f"revision S={m.revision} but root catalog revision is {root.revision}"
            )
        if m.timestamp and m.timestamp < root.last_modified:
            rep.error(
                ".cvmfspublished", f"T={m.timestamp} is older than the root catalog ({root.last_modified})"
            )
        if m.root_catalog_size and m.root_catalog_size != root.path.stat().st_size:
            rep.error(
                ".cvmfspublished",
                f"B={m.root_catalog_size} but the root catalog has {root.path.stat().st_size} bytes",
            )
        if root.ttl != m.ttl and "TTL" in root.properties:
            rep.warning(".cvmfspublished", f"D={m.ttl} differs from the root catalog TTL {root.ttl}")

    # --- catalogs --------------------------------------------------------------------------------

    def _check_catalogs(self, root: ContentHash) -> None:
        """Check every catalog of the revision, depth first, with an explicit stack.

        Each catalog's statistics are compared with its nested catalogs' totals, so a catalog is
        finished only after all its children. A chain of nested catalogs can be as deep as a tree of
        directories (a thousand and more, from other tools or older rcds): recursion would hit Python's
        recursion limit.
        """
        first = self._enter_catalog(root, "", None, None)
        stack = [first] if first is not None else []
        while stack:
            frame = stack[-1]
            if frame.pending:
                path, ref, row = frame.pending.pop()
                try:
                    child = self._enter_catalog(ref.hash, path, row, ref.size or None)
                except ReaderError as exc:
                    self.report.error(path, f"nested catalog {ref.hash.hex} unreadable: {exc}")
                    continue
                if child is not None:
                    stack.append(child)
                continue
            stack.pop()
            totals = self._leave_catalog(frame)
            if stack:
                stack[-1].subtree = add_counts(stack[-1].subtree, totals)

    def _enter_catalog(
        self, h: ContentHash, mount: str, parent_row: Dirent | None, expected_size: int | None
    ) -> _Frame | None:
        """Check one catalog's own rows and objects. Returns what is left to do once its nested catalogs
        are checked (``_leave_catalog``), or None if the catalog has no root entry (nothing to count)."""
        rep = self.report
        where = mount or "/"
        cat = self.reader.catalog(h)
        rep.catalogs += 1
        self.progress(f"catalog {where}")
        if expected_size and cat.path.stat().st_size != expected_size:
            rep.error(
                where, f"nested catalog is {cat.path.stat().st_size} bytes, parent lists {expected_size}"
            )
        if cat.schema < 2.35 and cat.schema > 1.5:
            rep.error(where, f"unsupported catalog schema {cat.schema}")
        legacy = cat.schema < 2.0
        for prop in ("revision", "last_modified") if not legacy else ("revision",):
            if prop not in cat.properties:
                rep.error(where, f"catalog property {prop!r} missing")
        if mount and cat.root_prefix != mount:
            rep.error(where, f"root_prefix is {cat.root_prefix!r}, expected {mount!r}")
        if not mount and "root_prefix" in cat.properties:
            rep.error(where, "the root catalog has a root_prefix")

        rows: dict[tuple[int, int], _Row] = {}
        children: dict[tuple[int, int], list[_Row]] = {}
        for md5, parent, d in cat.iter_rows():
            row = _Row(md5, parent, d)
            rows[md5] = row
            children.setdefault(parent, []).append(row)
        rep.entries += len(rows)
        root_md5 = md5_pair(mount) if mount else ROOT_MD5
        root = rows.get(root_md5)
        if root is None:
            rep.error(where, "catalog has no root entry")
            return None
        if mount:
            if not root.d.flags & FLAG_NESTED_ROOT:
                rep.error(where, "nested catalog root entry lacks the nested-root flag")
            if parent_row is not None:
                self._compare_transition(where, parent_row, root.d)
        else:
            if root.parent != (0, 0):
                rep.error(where, "root entry's parent is not (0, 0)")
            if root.d.flags & FLAG_NESTED_ROOT:
                rep.error(where, "root catalog's root entry carries the nested-root flag")

        nested = {ref.path: ref for ref in cat.nested()}
        seen: set[tuple[int, int]] = {root_md5}
        paths: dict[tuple[int, int], str] = {root_md5: mount}
        stack = [root]
        mountpoints: dict[str, Dirent] = {}
        groups: dict[tuple[str, int], list[str]] = {}  # hard link groups count per directory, as in CVMFS
        while stack:
            row = stack.pop()
            path = paths[row.md5]
            kids = children.get(row.md5, [])
            subdirs = 0
            for kid in kids:
                if kid.md5 in seen:
                    continue
                seen.add(kid.md5)
                kp = f"{path}/{kid.d.name}"
                paths[kid.md5] = kp
                if md5_pair(kp) != kid.md5:
                    rep.error(kp, "row key is not the MD5 of its path")
                if kid.d.is_dir:
                    subdirs += 1
                    if kid.d.flags & FLAG_NESTED_MOUNTPOINT:
                        mountpoints[kp] = kid.d
                        if children.get(kid.md5):
                            rep.error(kp, "non-empty nested catalog mountpoint (rows below it in the parent)")
                    else:
                        stack.append(kid)
                self._check_entry(kp, kid.d)
                if kid.d.hardlink_group and not kid.d.is_dir:
                    groups.setdefault((path, kid.d.hardlink_group), []).append(kp)
                elif kid.d.linkcount > 1 and not kid.d.is_dir:
                    rep.error(kp, f"link count {kid.d.linkcount} without a hard link group")
            if row.d.is_dir and row.d.linkcount != 2 + subdirs and not legacy:
                rep.error(path or "/", f"directory link count {row.d.linkcount}, expected {2 + subdirs}")
            if row.md5 != root_md5 and row.d.flags & FLAG_NESTED_ROOT:
                rep.error(path, "nested-root flag on an entry that is not a catalog root")
            if path != mount and row.d.is_dir:
                marker = md5_pair(f"{path}/{NESTED_MARKER}")
                if marker in rows and not (row.d.flags & FLAG_NESTED_MOUNTPOINT):
                    rep.error(path, "abandoned nested catalog marker (.cvmfscatalog outside a catalog root)")
        dangling = len(rows) - len(seen)
        if dangling:
            rep.error(where, f"{dangling} dangling entries (not reachable from the catalog root)")
        if root.d.name == "" and mount:
            rep.error(where, "nested catalog root has an empty name")
        if mount and not legacy and md5_pair(f"{mount}/{NESTED_MARKER}") not in rows:
            rep.error(where, "nested catalog without .cvmfscatalog marker")
        for (_dir, g), members in groups.items():
            counts = {rows[md5_pair(p)].d.linkcount for p in members}
            if counts != {len(members)}:
                rep.error(
                    members[0], f"hard link group {g} has {len(members)} members, link count {sorted(counts)}"
                )

        # Transition points: each mountpoint row must have a nested_catalogs row and vice versa.
        for path in mountpoints:
            if path not in nested:
                rep.error(path, "dangling nested catalog mountpoint (no nested_catalogs row)")
        for path in nested:
            if path not in mountpoints:
                rep.error(path, "nested_catalogs lists a path with no mountpoint entry")
            if parent_path(path) and not path.startswith(mount + "/"):
                rep.error(path, f"nested catalog outside its parent catalog {where}")

        self._check_objects(where, cat)

        pending = [
            (path, ref, mountpoints[path]) for path, ref in sorted(nested.items()) if path in mountpoints
        ]
        pending.reverse()  # popped from the end: checked in path order
        return _Frame(where, cat, legacy, pending, dict.fromkeys(COUNTER_KINDS, 0))

    def _leave_catalog(self, frame: _Frame) -> dict[str, int]:
        """Compare a catalog's statistics with its recount; returns its totals (self + subtree)."""
        rep, where, cat, legacy, subtree = self.report, frame.where, frame.cat, frame.legacy, frame.subtree
        own = cat.compute_self_counters()
        stored = cat.counters()
        if stored is None:
            if not legacy:
                rep.error(where, "catalog has no statistics table")
            return add_counts(own, subtree)
        present = {name for (name,) in cat.db.execute("SELECT counter FROM statistics")}
        missing = [
            f"{p}_{k}" for p in ("self", "subtree") for k in COUNTER_KINDS if f"{p}_{k}" not in present
        ]
        # Schema revision 5 made all 24 counters mandatory (older catalogs lack special/external ones).
        if missing and int(cat.properties.get("schema_revision", "0")) >= 5:
            rep.error(where, f"statistics counters missing: {', '.join(missing)}")
        for k in COUNTER_KINDS:
            if f"self_{k}" not in present:
                continue
            if stored.self_[k] != own[k]:
                rep.error(where, f"counter self_{k} = {stored.self_[k]}, recounted {own[k]}")
            if stored.subtree[k] != subtree[k]:
                rep.error(
                    where, f"counter subtree_{k} = {stored.subtree[k]}, summed from nested {subtree[k]}"
                )
        return add_counts(own, subtree)

    def _compare_transition(self, where: str, outer: Dirent, inner: Dirent) -> None:
        for attr in ("name", "mode", "size", "mtime", "hardlinks", "hash", "symlink", "uid", "gid"):
            a, b = getattr(outer, attr), getattr(inner, attr)
            if a != b:
                self.report.error(
                    where,
                    f"nested catalog mountpoint out of sync: {attr} {a!r} in the parent, "
                    f"{b!r} in the nested root",
                )
        if (outer.xattr is None) != (inner.xattr is None):
            self.report.error(where, "nested catalog mountpoint out of sync: xattr presence differs")
        if (outer.flags & ~TRANSITION_FLAGS) != (inner.flags & ~TRANSITION_FLAGS):
            self.report.error(where, "nested catalog mountpoint out of sync: flags differ")

    def _check_entry(self, path: str, d: Dirent) -> None:
        rep = self.report
        if not d.name:
            rep.error(path, "entry with an empty name")
        if d.is_regular:
            if not d.is_chunked and d.hash is None and not d.is_external:
                rep.error(path, "regular file without content hash")
            if d.symlink:
                rep.error(path, "regular file with a symlink target")
        elif d.is_symlink:
            if d.hash is not None:
                rep.error(path, "symlink with a content hash")
            if d.size != len(d.symlink.encode("utf-8", "surrogateescape")):
                rep.error(path, f"symlink size {d.size} != target length {len(d.symlink)}")
        elif d.is_dir:
            if d.hash is not None:
                rep.error(path, "directory with a content hash")
        else:
            if d.hash is not None:
                rep.error(path, "special file with a content hash")

    def _check_objects(self, where: str, cat: Catalog) -> None:
        """Chunk lists contiguous and complete; every referenced object present (and hash-valid)."""
        rep = self.report
        chunked: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for md5, offset, size, _h in cat.iter_chunks():
            chunked.setdefault(md5, []).append((offset, size))
        sizes = {md5: d.size for md5, _p, d in cat.iter_rows() if d.is_chunked}
        for md5, size in sizes.items():
            pieces = sorted(chunked.get(md5, []))
            expected = 0
            for offset, length in pieces:
                if offset != expected:
                    rep.error(where, f"chunked file {md5} has a chunk gap or overlap at {expected}")
                    break
                expected += length
            else:
                if expected != size:
                    rep.error(where, f"chunked file {md5}: chunks cover {expected} of {size} bytes")
        for digest, suffix_letter in cat.referenced_objects():
            suffix = Suffix(suffix_letter)
            key = (digest, suffix_letter)
            if key in self._checked_objects:
                continue
            self._checked_objects.add(key)
            self.report.objects += 1
            h = ContentHash(digest)
            self._check_object(where, h, suffix)

    def _check_object(self, where: str, h: ContentHash, suffix: Suffix) -> None:
        name = h.object_name(suffix)
        try:
            if self.verify_objects:
                self.reader.object_file(h, suffix)
            elif not self.reader.source.exists(name):
                self.report.error(where, f"missing object {name}")
        except ReaderError as exc:
            cause = exc.__cause__
            if isinstance(cause, NotFound) or "no such file" in str(exc) or "404" in str(exc):
                self.report.error(where, f"missing object {name}")
            else:
                self.report.error(where, f"object {name}: {exc}")

    # --- reflog and history ----------------------------------------------------------------------

    def _check_reflog(self) -> None:
        m, rep = self.reader.manifest, self.report
        try:
            data = self.reader.source.get(".cvmfsreflog")
        except NotFound:
            if m.reflog is not None:
                rep.error(".cvmfsreflog", "manifest names a reflog (Y) but none is served")
            elif m.garbage_collectable:
                rep.warning(".cvmfsreflog", "no reflog: garbage collection is impossible")
            return
        except Exception as exc:
            rep.error(".cvmfsreflog", f"cannot fetch: {exc}")
            return
        stale = m.reflog is not None and hashlib.sha1(data).hexdigest() != m.reflog.hex
        path = self.reader.cache.temp()
        path.write_bytes(data)
        try:
            reflog = Reflog(path)
            for h, _kind, label in (
                (m.root_catalog, RefType.CATALOG, "root catalog"),
                (m.certificate, RefType.CERTIFICATE, "certificate"),
                (m.history, RefType.HISTORY, "history"),
                (m.metainfo, RefType.METAINFO, "metainfo"),
            ):
                if h is not None and not reflog.contains(h):
                    rep.error(".cvmfsreflog", f"current {label} {h.hex} is not in the reflog")
                    stale = False  # reported as an error already
            reflog.close()
            if stale and not self._is_stratum1():
                # A publish died between writing the reflog and the manifest: the reflog lists one
                # root catalog more. Clients never read it; the next publish re-signs the manifest.
                rep.warning(".cvmfsreflog", "newer than the manifest's Y hash (an interrupted publish)")
        except Exception as exc:
            rep.error(".cvmfsreflog", f"not a reflog database: {exc}")
        finally:
            path.unlink(missing_ok=True)

    def _is_stratum1(self) -> bool:
        """A stratum 1 (it serves ``.cvmfs_last_snapshot``) keeps its own reflog: ``Y`` is the stratum 0's."""
        try:
            return self.reader.source.exists(".cvmfs_last_snapshot")
        except Exception:
            return False

    def _check_history(self) -> None:
        m, rep = self.reader.manifest, self.report
        if m.history is None:
            return
        try:
            hist = self.reader.history()
        except ReaderError as exc:
            rep.error("history", f"unreadable: {exc}")
            return
        if hist is None:
            return
        try:
            tags = hist.tags()
            trunk = next((t for t in tags if t.name == TRUNK), None)
            if trunk is not None and trunk.root_hash != m.root_catalog:
                rep.error(
                    "history", f"trunk tag points to {trunk.root_hash.hex}, not the current root catalog"
                )
            for t in tags:
                if not self.reader.source.exists(t.root_hash.object_name(Suffix.CATALOG)) and not (
                    m.garbage_collectable and t.name.startswith(TRUNK)
                ):
                    rep.error("history", f"tag {t.name!r} points to missing catalog {t.root_hash.hex}")
            used = {t.branch for t in tags}
            for branch, _parent, _rev in hist.branches():
                if branch not in used:
                    rep.error("history", f"branch {branch!r} is not used by any tag")
        finally:
            hist.close()


def check_repository(
    reader: RepositoryReader, verify_objects: bool = True, progress: Callable[[str], None] | None = None
) -> CheckReport:
    return Checker(reader, verify_objects, progress).run()
