"""Reading and checking repositories written by the CernVM-FS tools themselves (not by rcds).

The fixtures and their quirks are described in ``tests/fixtures/cvmfs-reference/README.md``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from conftest import ReferenceRepo, Unpacked
from rcds.cvmfs.checker import check_repository
from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.objects import EMPTY_HASH
from rcds.cvmfs.reader import ReaderError, RepositoryReader

ALL_REPOS = ["cvmfs-2.12", "guinea_pig_rev2", "guinea_pig_rev3", "corrupt_repo_20", "legacy_aufs_repo_21"]
BIG_DAT_SIZE = 1200036


@pytest.fixture(scope="module")
def ref(unpacked: Unpacked) -> Iterator[RepositoryReader]:
    """The CVMFS 2.12 reference repository (revision 2), opened with full trust checks."""
    reader = unpacked["cvmfs-2.12"].open(fqrn="reference.rcds.test")
    yield reader
    reader.close()


def _split_signed(data: bytes) -> tuple[bytes, str, bytes]:
    cut = data.index(b"\n--\n")
    body, rest = data[: cut + 1], data[cut + 4 :]
    hash_line, signature = rest.split(b"\n", 1)
    return body, hash_line.decode(), signature


def _body_fields(body: bytes) -> dict[str, str]:
    return {line[:1]: line[1:] for line in body.decode().splitlines() if line}


def _source_tree(root: Path) -> dict[str, os.stat_result]:
    """Repository-style paths ("/a/b") of everything below ``root``, with their lstat."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out["/" + p.relative_to(root).as_posix()] = os.lstat(p)
    return out


def _writable_copy(storage: Path, dest: Path) -> Path:
    shutil.copytree(storage, dest, symlinks=True)
    for dirpath, _dirs, files in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for f in files:
            p = Path(dirpath, f)
            if not p.is_symlink():
                p.chmod(0o644)
    return dest


# --- trust: every fixture's signatures, verified with cryptography directly ----------------------


@pytest.mark.parametrize("name", ALL_REPOS)
def test_fixture_manifest_signature_verifies_with_its_certificate(unpacked: Unpacked, name: str) -> None:
    repo = unpacked[name]
    body, hash_hex, signature = _split_signed((repo.storage / ".cvmfspublished").read_bytes())
    assert hashlib.sha1(body).hexdigest() == hash_hex
    fields = _body_fields(body)
    assert fields["N"] == repo.fqrn
    cert_object = repo.storage / "data" / fields["X"][:2] / (fields["X"][2:] + "X")
    assert hashlib.sha1(cert_object.read_bytes()).hexdigest() == fields["X"]
    cert = x509.load_pem_x509_certificate(zlib.decompress(cert_object.read_bytes()))
    cert.public_key().verify(signature, hash_hex.encode(), padding.PKCS1v15(), hashes.SHA1())  # type: ignore[union-attr, call-arg, arg-type]


@pytest.mark.parametrize("name", ALL_REPOS)
def test_fixture_whitelist_is_signed_by_its_master_key(unpacked: Unpacked, name: str) -> None:
    repo = unpacked[name]
    body, hash_hex, signature = _split_signed((repo.storage / ".cvmfswhitelist").read_bytes())
    assert hashlib.sha1(body).hexdigest() == hash_hex
    assert body.decode().splitlines()[2] == "N" + repo.fqrn
    master = serialization.load_pem_public_key(repo.public_key.read_bytes())
    recovered = master.recover_data_from_signature(signature, padding.PKCS1v15(), None)  # type: ignore[union-attr]
    assert recovered == hash_hex.encode()


@pytest.mark.parametrize("name", [n for n in ALL_REPOS if n != "corrupt_repo_20"])
def test_fixture_certificate_fingerprint_is_whitelisted(unpacked: Unpacked, name: str) -> None:
    repo = unpacked[name]
    fields = _body_fields(_split_signed((repo.storage / ".cvmfspublished").read_bytes())[0])
    cert_object = repo.storage / "data" / fields["X"][:2] / (fields["X"][2:] + "X")
    der = x509.load_pem_x509_certificate(zlib.decompress(cert_object.read_bytes())).public_bytes(
        serialization.Encoding.DER
    )
    fingerprint = hashlib.sha1(der).hexdigest().upper()
    listed = _split_signed((repo.storage / ".cvmfswhitelist").read_bytes())[0].decode().splitlines()[3:]
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 40, 2)) in listed


@pytest.mark.parametrize("name", [n for n in ALL_REPOS if n != "corrupt_repo_20"])
def test_reader_trusts_every_intact_fixture(unpacked: Unpacked, name: str) -> None:
    repo = unpacked[name]
    with repo.open(fqrn=repo.fqrn) as reader:
        assert reader.fqrn == repo.fqrn
        assert reader.trust_errors == []
        assert reader.lookup("/") is not None


def test_corrupt_fixture_certificate_is_not_whitelisted_and_strict_reader_refuses_it(
    unpacked: Unpacked,
) -> None:
    # The corrupt repository's certificate was regenerated after its whitelist was signed.
    with pytest.raises(ReaderError, match="not in the whitelist"):
        unpacked["corrupt_repo_20"].open()


# --- the CVMFS 2.12 repository, read back ----------------------------------------------------------


def test_reference_repository_is_revision_2_with_ttl_15(ref: RepositoryReader) -> None:
    assert ref.manifest.revision == 2
    assert ref.manifest.ttl == 15
    root = ref.root_catalog
    assert root.revision == 2
    assert root.ttl == 15
    assert (root.properties["schema"], root.properties["schema_revision"]) == ("2.5", "7")
    assert ref.manifest.root_catalog_size == root.path.stat().st_size


def test_reference_repository_holds_exactly_the_paths_of_content_rev2(
    ref: RepositoryReader, unpacked: Unpacked
) -> None:
    published = {e.path for e in ref.walk("")} - {""}
    assert published == set(_source_tree(unpacked.content_rev2))


def test_reference_files_read_back_byte_identical_to_content_rev2(
    ref: RepositoryReader, unpacked: Unpacked
) -> None:
    compared = 0
    for path, st in _source_tree(unpacked.content_rev2).items():
        if stat.S_ISREG(st.st_mode) and path != "/lib/big.dat":  # big.dat differs (fixture README)
            assert ref.read(path) == (unpacked.content_rev2 / path[1:]).read_bytes(), path
            compared += 1
    assert compared >= 9


def test_reference_entry_types_modes_sizes_and_mtimes_match_content_rev2(
    ref: RepositoryReader, unpacked: Unpacked
) -> None:
    for path, st in _source_tree(unpacked.content_rev2).items():
        d = ref.stat(path)
        assert stat.S_IFMT(d.mode) == stat.S_IFMT(st.st_mode), path
        assert stat.S_IMODE(d.mode) == stat.S_IMODE(st.st_mode), path
        assert d.mtime == int(st.st_mtime), path
        if stat.S_ISREG(st.st_mode) and path != "/lib/big.dat":
            assert d.size == st.st_size, path


def test_reference_executable_keeps_its_mode(ref: RepositoryReader) -> None:
    assert stat.S_IMODE(ref.stat("/analysis/run.sh").mode) == 0o755


def test_reference_symlink_targets_match_including_the_variant_symlink(
    ref: RepositoryReader, unpacked: Unpacked
) -> None:
    links = {p: st for p, st in _source_tree(unpacked.content_rev2).items() if stat.S_ISLNK(st.st_mode)}
    assert set(links) == {"/analysis/link_to_main", "/analysis/variant_link"}
    for path in links:
        d = ref.stat(path)
        assert d.is_symlink
        assert d.symlink == os.readlink(unpacked.content_rev2 / path[1:])
        assert d.size == len(d.symlink.encode())
        assert d.hash is None
    assert ref.stat("/analysis/variant_link").symlink == "/cvmfs/$(CMSSW_VERSION:-none)/x"


def test_reference_hard_link_pair_shares_one_content_object(ref: RepositoryReader) -> None:
    a, b = ref.stat("/analysis/src/a.txt"), ref.stat("/analysis/src/a_hardlink.txt")
    assert a.hash is not None and a.hash == b.hash
    assert ref.read("/analysis/src/a.txt") == ref.read("/analysis/src/a_hardlink.txt")


def test_reference_nested_markers_are_empty_files_with_the_empty_object(ref: RepositoryReader) -> None:
    for mount in ("/lib/nested", "/cids/sw/group/abc123"):
        marker = ref.stat(f"{mount}/.cvmfscatalog")
        assert marker.is_regular and marker.size == 0
        assert marker.hash == EMPTY_HASH
        assert ref.read(f"{mount}/.cvmfscatalog") == b""


def test_reference_big_dat_is_three_contiguous_chunks_summing_to_its_size(ref: RepositoryReader) -> None:
    d = ref.stat("/lib/big.dat")
    assert d.is_chunked
    assert d.hash is None
    assert d.size == BIG_DAT_SIZE
    assert len(d.chunks) == 3
    offset = 0
    for c in d.chunks:
        assert c.offset == offset
        offset += c.size
    assert offset == BIG_DAT_SIZE


def test_reference_big_dat_reads_back_with_verified_chunk_objects(ref: RepositoryReader) -> None:
    d = ref.stat("/lib/big.dat")
    data = ref.read("/lib/big.dat")
    assert len(data) == BIG_DAT_SIZE
    for c in d.chunks:
        stored = ref.source.get(c.hash.object_name(Suffix.PARTIAL))
        assert hashlib.sha1(stored).digest() == c.hash.digest
        assert zlib.decompress(stored) == data[c.offset : c.offset + c.size]


def test_reference_nested_catalogs_are_found_by_lookups(ref: RepositoryReader) -> None:
    for mount, inner in (("/lib/nested", "/lib/nested/data.txt"), ("/cids/sw/group/abc123", None)):
        found, cat = ref.catalog_for(inner or f"{mount}/code.py")
        assert found == mount
        assert cat.root_prefix == mount
        root_row = ref.stat(mount)
        assert root_row.is_dir and root_row.is_nested_root
    assert ref.read("/lib/nested/data.txt")
    assert ref.read("/cids/sw/group/abc123/code.py")
    mounts = {m for m, _h, _c in ref.iter_catalogs()}
    assert mounts == {"", "/lib/nested", "/cids/sw/group/abc123"}


def test_reference_listdir_crosses_into_nested_catalogs(ref: RepositoryReader) -> None:
    assert [d.name for d in ref.listdir("/lib")] == ["big.dat", "nested"]
    assert [d.name for d in ref.listdir("/lib/nested")] == [".cvmfscatalog", "data.txt"]
    assert [d.name for d in ref.listdir("/cids/sw/group")] == ["abc123"]


def test_reference_objects_are_stock_zlib_6_and_ours_inflate_to_the_same_content(unpacked: Unpacked) -> None:
    """The C++ publisher writes stock zlib level 6. rcds deflates with zlib-ng (other bytes, same content:
    dedup with such objects goes by the content index, see test_compression.py); an empty file is the one
    object that must stay byte-identical (its well-known name is in every catalog's ``.cvmfscatalog``)."""
    from rcds.cvmfs.objects import EMPTY_OBJECT, compress

    objects = [p for p in (unpacked["cvmfs-2.12"].storage / "data").rglob("*") if p.is_file()]
    assert len(objects) >= 10
    for p in objects:
        stored = p.read_bytes()
        assert hashlib.sha1(stored).hexdigest() == (p.parent.name + p.name).rstrip("CHXMP")
        raw = zlib.decompress(stored)
        assert zlib.compress(raw, 6) == stored, p
        ours = compress(raw)[0]
        assert zlib.decompress(ours) == raw
        if not raw:
            assert ours == stored == EMPTY_OBJECT


# --- the checker -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cvmfs-2.12", "guinea_pig_rev2", "guinea_pig_rev3", "legacy_aufs_repo_21"])
def test_checker_finds_no_errors_in_intact_fixtures(unpacked: Unpacked, name: str) -> None:
    repo = unpacked[name]
    with repo.open(strict=False) as reader:
        report = check_repository(reader)
    assert report.errors == [], [str(i) for i in report.issues]
    assert report.catalogs >= 1 and report.entries >= 1


def test_checker_counts_every_catalog_entry_and_object_of_the_reference(ref: RepositoryReader) -> None:
    report = check_repository(ref)
    assert report.ok
    assert report.catalogs == 3
    assert report.entries == sum(1 for _ in ref.walk("")) + 2  # the 2 transition points have 2 rows each
    assert report.objects >= 10


def test_checker_reports_the_deliberate_corruptions(unpacked: Unpacked) -> None:
    with unpacked["corrupt_repo_20"].open(strict=False) as reader:
        report = check_repository(reader)
    messages = [str(i) for i in report.errors]
    assert not report.ok
    for expected in (
        "non-empty nested catalog mountpoint",
        "dangling nested catalog mountpoint",
        "mountpoint out of sync",
        "not in the whitelist",
    ):
        assert any(expected in m for m in messages), (expected, messages)
    assert any(m.startswith("error: /non_empty_nested_mountpoint:") for m in messages)
    assert any(m.startswith("error: /nested_mountpoint_out_of_sync:") for m in messages)


def test_checker_reports_an_expired_whitelist_as_a_warning_when_expiry_is_ignored(unpacked: Unpacked) -> None:
    with unpacked["guinea_pig_rev3"].open(strict=False) as reader:
        report = check_repository(reader)
    assert report.ok
    assert any(i.severity == "warning" and "expired" in i.message for i in report.issues)


def _rcds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rcds.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_check_exits_1_on_the_corrupt_fixture(unpacked: Unpacked) -> None:
    repo = unpacked["corrupt_repo_20"]
    proc = _rcds("repo", "check", str(repo.storage), "--key", str(repo.public_key), "--ignore-expiry")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "non-empty nested catalog mountpoint" in proc.stdout
    assert "ERRORS" in proc.stdout.splitlines()[-1]


def test_cli_check_exits_0_on_the_reference_repository(unpacked: Unpacked) -> None:
    repo = unpacked["cvmfs-2.12"]
    proc = _rcds("repo", "check", str(repo.storage), "--key", str(repo.public_key), "--ignore-expiry")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("OK: revision 2, 3 catalogs")


# --- what the reader must refuse -------------------------------------------------------------------


def test_reader_rejects_a_wrong_master_key(unpacked: Unpacked) -> None:
    repo = unpacked["cvmfs-2.12"]
    with pytest.raises(ReaderError, match="does not verify"):
        RepositoryReader.open(repo.storage, unpacked["guinea_pig_rev3"].public_key)


def test_reader_rejects_a_wrong_expected_repository_name(unpacked: Unpacked) -> None:
    repo = unpacked["cvmfs-2.12"]
    with pytest.raises(ReaderError, match=r"expected 'other\.rcds\.test'"):
        RepositoryReader.open(repo.storage, repo.public_key, fqrn="other.rcds.test")


def test_reader_rejects_an_expired_whitelist_when_expiry_is_checked(unpacked: Unpacked) -> None:
    repo = unpacked["guinea_pig_rev3"]
    with pytest.raises(ReaderError, match="expired"):
        RepositoryReader.open(repo.storage, repo.public_key, check_whitelist_expiry=True)


@pytest.fixture
def ref_copy(unpacked: Unpacked, tmp_path: Path) -> ReferenceRepo:
    """A writable copy of the 2.12 reference repository, to tamper with."""
    repo = unpacked["cvmfs-2.12"]
    storage = _writable_copy(repo.storage, tmp_path / "storage")
    return ReferenceRepo(repo.name, storage, repo.public_key, repo.fqrn, repo.expired)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_reader_rejects_a_manifest_with_one_body_byte_changed(ref_copy: ReferenceRepo) -> None:
    manifest = ref_copy.storage / ".cvmfspublished"
    _flip_byte(manifest, manifest.read_bytes().index(b"\nS2\n") + 2)  # S2 -> S3
    with pytest.raises(ReaderError, match="bad manifest"):
        ref_copy.open()


def test_reader_rejects_a_manifest_with_one_signature_byte_changed(ref_copy: ReferenceRepo) -> None:
    manifest = ref_copy.storage / ".cvmfspublished"
    _flip_byte(manifest, len(manifest.read_bytes()) - 10)
    with pytest.raises(ReaderError, match="signature"):
        ref_copy.open()


def test_reader_rejects_a_manifest_naming_another_root_catalog(ref_copy: ReferenceRepo) -> None:
    # Re-hashed body (hash line consistent) but the signature no longer matches.
    manifest = ref_copy.storage / ".cvmfspublished"
    body, _hash_hex, signature = _split_signed(manifest.read_bytes())
    fields = _body_fields(body)
    body = body.replace(fields["C"].encode(), b"0" * 40)
    manifest.write_bytes(body + b"--\n" + hashlib.sha1(body).hexdigest().encode() + b"\n" + signature)
    with pytest.raises(ReaderError, match="signature does not verify"):
        ref_copy.open()


@pytest.mark.parametrize("strict", [True, False])
def test_reader_rejects_a_whitelist_with_a_changed_byte(ref_copy: ReferenceRepo, strict: bool) -> None:
    wl = ref_copy.storage / ".cvmfswhitelist"
    _flip_byte(wl, wl.read_bytes().index(b"\nN") + 3)
    with pytest.raises(ReaderError, match="whitelist"):
        ref_copy.open(strict=strict)


def test_cli_check_reports_a_damaged_whitelist_cleanly(ref_copy: ReferenceRepo) -> None:
    wl = ref_copy.storage / ".cvmfswhitelist"
    _flip_byte(wl, wl.read_bytes().index(b"\nN") + 3)
    proc = _rcds("repo", "check", str(ref_copy.storage), "--key", str(ref_copy.public_key))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "whitelist" in proc.stderr


@pytest.mark.parametrize("path", ["/analysis/src/main.py", "/lib/big.dat"])
def test_tampered_object_fails_to_read_and_is_reported_by_the_checker(
    ref_copy: ReferenceRepo, path: str, tmp_path: Path
) -> None:
    with ref_copy.open() as reader:
        d = reader.stat(path)
        name = d.chunks[1].hash.object_name(Suffix.PARTIAL) if d.is_chunked else d.hash.object_name()  # type: ignore[union-attr]
    _flip_byte(ref_copy.storage / name, 5)
    with ref_copy.open(cache_dir=tmp_path / "cache") as reader:
        with pytest.raises(ReaderError, match="corrupt"):
            reader.read(path)
        report = check_repository(reader)
    assert not report.ok
    assert any(name in i.message for i in report.errors), [str(i) for i in report.issues]


def test_missing_object_is_reported_by_the_checker(ref_copy: ReferenceRepo) -> None:
    with ref_copy.open() as reader:
        name = reader.stat("/analysis/run.sh").hash.object_name()  # type: ignore[union-attr]
    (ref_copy.storage / name).unlink()
    with ref_copy.open() as reader:
        with pytest.raises(ReaderError):
            reader.read("/analysis/run.sh")
        report = check_repository(reader)
    assert [i.message for i in report.errors] == [f"missing object {name}"]
