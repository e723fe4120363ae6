"""Taking over a repository made by ``cvmfs_server`` (``rcds repo adopt``, docs/migration.md).

The repository is ``cvmfs-user-pub-2.12`` from the reference fixtures: ``fifeuser1.opensciencegrid.org``
exactly as cvmfs-user-pub's server leaves it (written by the CVMFS 2.12 tools), laid out here as on its
host: storage in ``srv/cvmfs/<fqrn>``, the four keys in ``etc/cvmfs/keys``, ``reflog.chksum`` in the spool
``var/spool/cvmfs/<fqrn>`` and a ``server.conf`` as cvmfs-user-pub's ``initrepos`` leaves it. It is adopted
through the real command, published into and cleaned up by a real ``rcds serve``, then read back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Unpacked
from rcds.cvmfs import signing
from rcds.cvmfs.adopt import AdoptError, adopt
from rcds.cvmfs.catalog import Catalog
from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.history import TRUNK, TRUNK_PREVIOUS
from rcds.cvmfs.manifest import Manifest
from rcds.cvmfs.objects import compress, decompress
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.reflog import Reflog, RefType
from rcds.cvmfs.repository import Repository, RepositoryError
from rcds.cvmfs.tree import entries_from_directory
from rcds.cvmfs.whitelist import Whitelist
from rcds.publish.lastuse import read_records
from rcds.publish.presence import StorageView
from server import RcdsServer, make_tarball

FQRN = "fifeuser1.opensciencegrid.org"
DAY = 86400
FIXTURE_CIDS = {
    "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
    "dune/9a8b7c6d5e4f30211234567890abcdef12345678",
    "fermilab/1f2e3d4c5b6a79880123456789abcdef01234567",
    "fermilab/77665544332211009988aabbccddeeff00112233",
}
SERVER_CONF = """\
CVMFS_CREATOR_VERSION=143
CVMFS_REPOSITORY_NAME={fqrn}
CVMFS_REPOSITORY_TYPE=stratum0
CVMFS_USER=cvmfspub
CVMFS_UNION_DIR=/cvmfs/{fqrn}
CVMFS_SPOOL_DIR=/var/spool/cvmfs/{fqrn}
CVMFS_STRATUM0=http://localhost/cvmfs/{fqrn}
CVMFS_UPSTREAM_STORAGE=local,/srv/cvmfs/{fqrn}/data/txn,/srv/cvmfs/{fqrn}
CVMFS_USE_FILE_CHUNKING=true
CVMFS_MIN_CHUNK_SIZE=4194304
CVMFS_AVG_CHUNK_SIZE=8388608
CVMFS_MAX_CHUNK_SIZE=16777216
CVMFS_UNION_FS_TYPE=overlayfs
CVMFS_HASH_ALGORITHM=sha1
CVMFS_COMPRESSION_ALGORITHM=default
CVMFS_REPOSITORY_TTL=15
CVMFS_GARBAGE_COLLECTION=true
CVMFS_AUTO_TAG_TIMESPAN="1 day ago"
CVMFS_AUTO_GC=false
CVMFS_IGNORE_XDIR_HARDLINKS=true
CVMFS_AUTOCATALOGS=true
CVMFS_ENFORCE_LIMITS=true
"""


@dataclass
class Host:
    """The old service's host, in a temporary directory."""

    storage: Path
    keys: Path
    spool: Path
    server_conf: Path
    content: Path  # the tree as cvmfs-user-pub published it

    def key(self, ext: str) -> Path:
        return self.keys / f"{FQRN}.{ext}"

    def public_files(self) -> dict[str, str]:
        """Every file a stratum 0 serves (everything but rcds's private state), with its SHA-1."""
        return {
            str(p.relative_to(self.storage)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(self.storage.rglob("*"))
            if p.is_file() and ".rcds" not in p.relative_to(self.storage).parts
        }


@pytest.fixture
def host(tmp_path: Path, unpacked: Unpacked) -> Host:
    fixture = unpacked.root / "cvmfs-user-pub-2.12"
    source = Path(__file__).parent / "fixtures" / "cvmfs-reference" / "cvmfs-user-pub-2.12"
    h = Host(
        tmp_path / "srv" / "cvmfs" / FQRN,
        tmp_path / "etc" / "cvmfs" / "keys",
        tmp_path / "var" / "spool" / "cvmfs" / FQRN,
        tmp_path / "etc" / "cvmfs" / "repositories.d" / FQRN / "server.conf",
        fixture / "content",
    )
    shutil.copytree(fixture / "storage" / FQRN, h.storage)
    shutil.copytree(fixture / "keys", h.keys)
    h.spool.mkdir(parents=True)
    shutil.copy(source / "reflog.chksum", h.spool / "reflog.chksum")
    h.server_conf.parent.mkdir(parents=True)
    h.server_conf.write_text(SERVER_CONF.format(fqrn=FQRN))
    return h


def run_rcds(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "rcds.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def adopt_args(h: Host) -> list[object]:
    return [
        "repo",
        "adopt",
        "--storage",
        h.storage,
        "--keys",
        h.keys,
        "--spool",
        h.spool,
        "--server-conf",
        h.server_conf,
    ]


def test_adopt_then_publish_clean_up_and_read_back(host: Host, tmp_path: Path) -> None:
    before = host.public_files()
    doc = json.loads(run_rcds(*adopt_args(host), "--json").stdout)
    assert doc["fqrn"] == FQRN and doc["revision"] == 2 and doc["catalogs"] == 11
    assert doc["objects_indexed"] > 0 and doc["objects_missing"] == 0
    assert doc["keys_dir"] == str(host.keys) and not doc["whitelist_resigned"]
    assert doc["chunk_sizes"] == [4194304, 8388608, 16777216]
    assert any("names the storage /srv/cvmfs" in w for w in doc["warnings"])  # adopted from a copy
    # Nothing published was rewritten; the reflog checksum is kept as cvmfs_server keeps it.
    assert host.public_files() == before
    private = host.storage / ".rcds"
    assert (private / "reflog.chksum").read_text() == (host.spool / "reflog.chksum").read_text()
    assert json.loads((private / "repo.json").read_text())["keys_dir"] == str(host.keys)
    run_rcds("repo", "check", host.storage)
    again = run_rcds(*adopt_args(host), check=False)
    assert again.returncode != 0 and "already an rcds repository" in again.stderr

    old_manifest = Repository(host.storage).manifest()
    (tmp_path / "rcds").mkdir()
    srv = RcdsServer(
        tmp_path / "rcds",
        repos=(),
        top_config="share_seconds = 1\nmaxdays = 30\nauto_cleanup = false\n",
        extra_config=f'[[repository]]\nname = "{FQRN}"\nstorage = "{host.storage}"\n',
    )
    run_sh = (
        host.content / "sw" / "dune" / "9a8b7c6d5e4f30211234567890abcdef12345678" / "bin" / "run.sh"
    ).read_bytes()
    new_cid = "fermilab/" + "c" * 64
    touched = "dune/9a8b7c6d5e4f30211234567890abcdef12345678"
    try:
        srv.start()
        assert srv.api("config").text == f"repos:{FQRN}\n"
        for cid in FIXTURE_CIDS:  # jobsub_lite's and justIN's paths: /cvmfs/fifeuser1.../sw/<cid>
            assert srv.api("exists", cid=cid).text == f"PRESENT:/cvmfs/{FQRN}/sw/{cid}\n"
        assert (
            srv.publish(new_cid, make_tarball({"bin/run.sh": run_sh, "job.py": "print(1)\n"})).text == "OK\n"
        )
        assert srv.wait_state(new_cid)["state"] == "published"
        assert srv.api("update", cid=touched).text == f"PRESENT:/cvmfs/{FQRN}/sw/{touched}\n"

        def touch_shared() -> bool:
            with StorageView(host.storage) as view:
                rec = read_records(view).get(touched)
            return rec is not None and rec.mtime > time.time() - 600

        deadline = time.monotonic() + 30
        while not touch_shared():
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.1)
    finally:
        srv.close()

    repo = Repository(host.storage)
    m = repo.manifest()
    assert m.revision > old_manifest.revision
    with RepositoryReader.open(host.storage, host.key("pub")) as reader:
        # The original's records are files, and so are rcds's: the refreshed one holds this server's name.
        record = reader.stat(f"/ts/{touched}")
        assert record.is_regular and reader.read(f"/ts/{touched}").decode().strip() != "Requeue"
        assert reader.stat(f"/ts/{new_cid}").is_regular
        # The .cvmfsdirtab layout is kept: /sw, /ts, each group and each CID a nested catalog.
        for path in (
            "/sw",
            "/ts",
            "/sw/fermilab",
            "/ts/fermilab",
            "/ts/dune",
            f"/sw/{new_cid}",
            f"/sw/{touched}",
        ):
            assert reader.stat(path).is_nested_root, path
        assert reader.read("/.cvmfsdirtab") == (host.content / ".cvmfsdirtab").read_bytes()
        assert reader.read(f"/sw/{new_cid}/bin/run.sh") == run_sh
        assert reader.read(f"/sw/{new_cid}/.publisher") == b"localhost\n"
    # Revision, history and reflog continued: trunk-previous is the last revision rcds did not write
    # (or a later one), and the reflog still lists cvmfs_server's root catalogs.
    with repo.history_for_update(m.history) as (_, hist):
        trunk, previous = hist.get(TRUNK), hist.get(TRUNK_PREVIOUS)
        assert trunk is not None and trunk.revision == m.revision and trunk.root_hash == m.root_catalog
        assert previous is not None and previous.revision >= old_manifest.revision
    reflog_path = host.storage / ".cvmfsreflog"
    reflog = Reflog(reflog_path)
    try:
        roots = {h for h, _, _ in reflog.list(RefType.CATALOG)}
    finally:
        reflog.close()
    assert {old_manifest.root_catalog, m.root_catalog} <= roots
    assert (repo.private / "reflog.chksum").read_text() == hashlib.sha1(reflog_path.read_bytes()).hexdigest()

    # Cleanup as of a month after the touch, by a server with an empty state (another host): only the
    # ts records speak for the touched CID. The original's CIDs nobody touched expire with their records.
    with StorageView(host.storage) as view:
        touch_time = read_records(view)[touched].mtime
    (tmp_path / "other").mkdir()
    other = RcdsServer(
        tmp_path / "other",
        repos=(),
        top_config="maxdays = 30\nauto_cleanup = false\n",
        extra_config=f'[[repository]]\nname = "{FQRN}"\nstorage = "{host.storage}"\n',
    )
    other.client.close()
    p = run_rcds("cleanup", "--config", other.config_path, "--json", "--at", touch_time + 30 * DAY - 600)
    (report,) = json.loads(p.stdout)
    expired = {e["cid"] for e in report["expired"]}
    assert expired == FIXTURE_CIDS - {touched}
    assert report["kept"] == 2 and report["orphans"] == []
    run_rcds("repo", "check", host.storage)
    with RepositoryReader.open(host.storage, host.key("pub")) as reader:
        for cid in expired:
            assert reader.lookup(f"/sw/{cid}") is None and reader.lookup(f"/ts/{cid}") is None
        assert reader.read(f"/sw/{touched}/bin/run.sh") == run_sh
        assert (
            reader.read(f"/sw/{touched}/.publisher")
            == (host.content / "sw" / touched / ".publisher").read_bytes()
        )
        assert reader.lookup(f"/ts/{touched}") is not None and reader.lookup(f"/ts/{new_cid}") is not None
    assert (repo.private / "reflog.chksum").read_text() == hashlib.sha1(reflog_path.read_bytes()).hexdigest()


def test_an_adopted_repository_deduplicates_through_the_seeded_index(host: Host) -> None:
    report = adopt(
        host.storage, host.keys, spool_dir=host.spool, server_conf=host.server_conf, copy_keys=True
    )
    assert report.keys_dir == str(host.storage / ".rcds" / "keys")
    repo = Repository(host.storage)
    assert repo.keys_dir == host.storage / ".rcds" / "keys"
    assert (repo.keys_dir / f"{FQRN}.masterkey").stat().st_mode & 0o777 == 0o600
    with repo.transaction() as txn:
        txn.add_tree(
            "/sw/copy",
            entries_from_directory(host.content / "sw" / "dune" / "9a8b7c6d5e4f30211234567890abcdef12345678"),
        )
        stats = txn.content.stats
        assert stats.pieces_from_index >= 2 and stats.objects_written == 0
        txn.commit()


def test_a_whitelist_about_to_expire_is_resigned_with_the_masterkey(host: Host) -> None:
    wl = Whitelist.parse((host.storage / ".cvmfswhitelist").read_bytes())[0]
    soon = wl.expires - dt.timedelta(days=2)
    report = adopt(host.storage, host.keys, spool_dir=host.spool, server_conf=host.server_conf, now=soon)
    assert report.whitelist_resigned
    new = Whitelist.verify(
        (host.storage / ".cvmfswhitelist").read_bytes(),
        FQRN,
        [signing.load_public_key(host.key("pub").read_bytes())],
        now=soon,
    )
    assert new.expires > wl.expires


# --- refusals: nothing changes ------------------------------------------------------------------------


def _resign_root(h: Host, **properties: str) -> None:
    """Rewrite the root catalog's properties and sign a manifest for it with the repository's own key
    (what a newer or older cvmfs_server would have published)."""
    manifest, _ = Manifest.parse((h.storage / ".cvmfspublished").read_bytes())
    raw = decompress((h.storage / manifest.root_catalog.object_name(Suffix.CATALOG)).read_bytes())
    path = h.storage.parent / "root.db"
    path.write_bytes(raw)
    cat = Catalog(path, writable=True)
    for k, v in properties.items():
        cat.set_property(k, v)
    cat.close()
    stored, root = compress(path.read_bytes())
    (h.storage / root.object_name(Suffix.CATALOG)).write_bytes(stored)
    new = Manifest(
        root, manifest.revision, manifest.ttl, FQRN, len(path.read_bytes()), manifest.certificate, manifest.history,
        None, manifest.reflog, manifest.timestamp,
    )  # fmt: skip
    key = signing.load_private_key(h.key("key").read_bytes())
    (h.storage / ".cvmfspublished").write_bytes(new.sign(key))


def _other_key(h: Host, ext: str) -> None:
    h.key(ext).write_bytes(signing.private_key_pem(signing.generate_key()))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h: _other_key(h, "masterkey"), "masterkey is not the private key of"),
        (lambda h: _other_key(h, "key"), ".key is not the private key of"),
        (lambda h: h.key("pub").write_bytes(signing.public_key_pem(signing.generate_key().public_key())),
         "whitelist does not verify"),
        (lambda h: h.key("crt").unlink(), "missing key files"),
        (lambda h: (h.spool / "in_transaction.lock").write_text(""), "transaction open"),
        (lambda h: (h.spool / "is_publishing.lock").write_text(""), "transaction open"),
        (lambda h: (h.spool / "reflog.chksum").write_text("0" * 40), "reflog.chksum says"),
        (lambda h: _resign_root(h, schema_revision="8"), "schema 2.5 revision 8"),
        (lambda h: _resign_root(h, schema="2.4", schema_revision="0"), "schema 2.4 revision 0"),
        (lambda h: h.server_conf.write_text("CVMFS_HASH_ALGORITHM=shake128\n"), "CVMFS_HASH_ALGORITHM"),
        (lambda h: h.server_conf.write_text("CVMFS_REPOSITORY_TYPE=stratum1\n"), "only a stratum 0"),
    ],
    ids=["masterkey", "key", "pub", "no-crt", "transaction", "publishing", "chksum", "schema-newer", "schema-older",
         "hash", "stratum1"],
)  # fmt: skip
def test_adoption_refuses_what_does_not_fit_and_changes_nothing(
    host: Host, damage: Any, message: str
) -> None:
    damage(host)
    before = host.public_files()
    p = run_rcds(*adopt_args(host), check=False)
    assert p.returncode == 1 and "not adopted" in p.stderr and message in p.stderr, p.stderr
    assert not (host.storage / ".rcds" / "repo.json").exists()
    assert host.public_files() == before


def test_keys_of_another_repository_are_refused(host: Host, tmp_path: Path) -> None:
    other = Repository.create(FQRN, tmp_path / "other")  # same name, its own keys
    for ext in ("pub", "crt", "key", "masterkey"):
        shutil.copy(other.keys_dir / f"{FQRN}.{ext}", host.key(ext))
    with pytest.raises(AdoptError, match="whitelist does not verify"):
        adopt(host.storage, host.keys, spool_dir=host.spool, server_conf=host.server_conf)
    with pytest.raises(AdoptError, match=re.escape("holds fifeuser1.opensciencegrid.org, not fifeuser2")):
        adopt(host.storage, host.keys, fqrn="fifeuser2.opensciencegrid.org")


def test_creating_over_a_cvmfs_server_repository_points_to_adopt(host: Host) -> None:
    """What ``rcds serve`` (create_missing) or ``rcds repo create`` says about a storage not adopted yet."""
    before = host.public_files()
    p = run_rcds("repo", "create", FQRN, "--storage", host.storage, check=False)
    assert p.returncode == 1 and "rcds repo adopt --storage" in p.stderr, p.stderr
    assert host.public_files() == before and not (host.storage / ".rcds").exists()


def test_a_whitelist_signed_elsewhere_is_kept_and_never_resigned(host: Host) -> None:
    """OSG signs the whitelists of *.opensciencegrid.org with its domain key: the stratum 0 has no
    .masterkey and its .pub is the domain's. Adopted with --external-whitelist, rcds publishes (the
    certificate key signs manifests) but leaves the whitelist to whoever renews it."""
    domain = host.keys / "opensciencegrid.org"
    domain.mkdir()
    host.key("pub").rename(domain / "opensciencegrid.org.pub")
    host.key("masterkey").unlink()
    p = run_rcds(*adopt_args(host), check=False)
    assert p.returncode == 1 and "--external-whitelist" in p.stderr, p.stderr
    whitelist = (host.storage / ".cvmfswhitelist").read_bytes()
    doc = json.loads(
        run_rcds(
            *adopt_args(host),
            "--external-whitelist",
            "--public-key",
            domain / "opensciencegrid.org.pub",
            "--json",
        ).stdout
    )
    assert not doc["whitelist_resigned"]
    repo = Repository(host.storage)
    assert repo.config.external_whitelist and repo.public_key_path == domain / "opensciencegrid.org.pub"
    with pytest.raises(RepositoryError, match="signed outside rcds"):
        repo.resign()
    wl = repo.whitelist()
    assert repo.whitelist_warning(wl.expires - dt.timedelta(days=3)) is None  # a 7-day whitelist is normal
    warning = repo.whitelist_warning(wl.expires - dt.timedelta(hours=12))
    assert warning is not None and "renew it where it is signed" in warning
    with repo.transaction() as txn:
        txn.add_tree("/sw/new", entries_from_directory(host.content / "sw" / "dune"))
        txn.commit()
    assert (host.storage / ".cvmfswhitelist").read_bytes() == whitelist
    run_rcds("repo", "check", host.storage)  # with the key repo.json names
