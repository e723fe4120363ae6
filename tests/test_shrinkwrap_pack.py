"""Packaging an export: reproducible tar and squashfs images read back with the standard tools, and an
OCI image pushed to a real registry (Debian's docker-registry) and pulled back with skopeo and umoci.

"Reproducible" is checked on two independent exports (other directories, other inode numbers) of the
same selection: the images must be equal byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DEFAULT_MTIME, File, Hardlink, Symlink, new_repo, write_tree
from rcds.cvmfs.reader import RepositoryReader
from rcds.cvmfs.repository import Repository
from rcds.shrinkwrap.export import MARKER, export
from rcds.shrinkwrap.pack import PackError, write_oci, write_squashfs, write_tar
from rcds.shrinkwrap.spec import Selector, parse_spec
from tools import require_tool

TREE: dict[str, object] = {
    "run.sh": File(b"#!/bin/sh\necho packed\n", mode=0o755, mtime=1_600_000_000),
    "same.txt": b"same\n",
    "same_too.txt": b"same\n",
    "link": Symlink("run.sh"),
    "alias": Hardlink("same.txt"),
    "empty": {},
    "sub": {"deep.txt": b"deep\n", "é.txt": b"unicode\n"},
}


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory: pytest.TempPathFactory, repo_template: Path
) -> tuple[Repository, Path, Path, Path]:
    base = tmp_path_factory.mktemp("pack")
    repo = new_repo(base / "storage", repo_template)
    src = write_tree(base / "src", TREE)
    with repo.transaction() as txn:
        txn.add_directory("/app", src)
        txn.commit()
    outs = []
    for name in ("one", "two"):
        reader = RepositoryReader.open(repo.storage, repo.public_key_path, cache_dir=base / f"rc-{name}")
        try:
            export(
                reader,
                Selector(parse_spec("/app*"), "2.14"),
                base / name,
                progress=False,
                jobs=1 if name == "one" else 4,
            )
        finally:
            reader.close()
        outs.append(base / name / repo.fqrn)
    return repo, src, outs[0], outs[1]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            st = os.lstat(p)
            data: object = (
                p.read_bytes()
                if stat.S_ISREG(st.st_mode)
                else os.readlink(p)
                if stat.S_ISLNK(st.st_mode)
                else None
            )
            mtime = (
                int(st.st_mtime) if not stat.S_ISLNK(st.st_mode) else None
            )  # tar/squashfs restore symlink mtimes unevenly
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), mtime, data)
    return out


def test_tar_is_reproducible_and_unpacks_to_the_export(
    exports: tuple[Repository, Path, Path, Path], tmp_path: Path
) -> None:
    repo, _, one, two = exports
    write_tar(one, tmp_path / "a.tar", repo.fqrn)
    write_tar(two, tmp_path / "b.tar", repo.fqrn)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    write_tar(one, tmp_path / "a.tar.gz", repo.fqrn)
    write_tar(two, tmp_path / "b.tar.gz", repo.fqrn)
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert f"{repo.fqrn}/{MARKER}" not in members
    links = [m for m in members.values() if m.islnk()]
    assert len(links) == 2  # alias + same_too.txt share same.txt's .data inode: stored once
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())
    out = tmp_path / "x"
    out.mkdir()
    tar_bin = require_tool("tar", "tar")
    subprocess.run([tar_bin, "-xf", str(tmp_path / "a.tar.gz"), "-C", str(out)], check=True)
    assert snapshot(out / repo.fqrn) == snapshot(one)


def test_squashfs_is_reproducible_and_reads_back(
    exports: tuple[Repository, Path, Path, Path], tmp_path: Path
) -> None:
    _, _, one, two = exports
    require_tool("mksquashfs", "squashfs-tools")
    unsquashfs = require_tool("unsquashfs", "squashfs-tools")
    write_squashfs(one, tmp_path / "a.sqfs")
    write_squashfs(two, tmp_path / "b.sqfs", processors=1)
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()
    listing = subprocess.run(
        [unsquashfs, "-lls", str(tmp_path / "a.sqfs")], capture_output=True, text=True, check=True
    ).stdout
    assert "squashfs-root/app/run.sh" in listing and MARKER not in listing
    subprocess.run(
        [unsquashfs, "-q", "-d", str(tmp_path / "x"), str(tmp_path / "a.sqfs")],
        check=True,
        capture_output=True,
    )
    assert snapshot(tmp_path / "x") == snapshot(one)


def test_squashfs_mounts_with_squashfuse(
    exports: tuple[Repository, Path, Path, Path], tmp_path: Path
) -> None:
    _, _, one, _ = exports
    squashfuse = require_tool("squashfuse", "squashfuse")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "umount"
    write_squashfs(one, tmp_path / "a.sqfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([squashfuse, str(tmp_path / "a.sqfs"), str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"squashfuse cannot mount here (no FUSE in this container?): {proc.stderr.strip()}")
    try:
        assert (mnt / "app/run.sh").read_bytes() == b"#!/bin/sh\necho packed\n"
        assert snapshot(mnt) == snapshot(one)
    finally:
        subprocess.run(
            [fusermount, "-u", str(mnt)] if "fusermount" in fusermount else [fusermount, str(mnt)],
            check=False,
        )


def test_oci_layout_standalone_and_on_a_base(
    exports: tuple[Repository, Path, Path, Path], tmp_path: Path
) -> None:
    repo, _, one, two = exports
    a = write_oci(one, tmp_path / "a", repo.fqrn, tag="v1", revision=1)
    b = write_oci(two, tmp_path / "b", repo.fqrn, tag="v1", revision=1)
    assert a == b  # same digests: reproducible
    config = json.loads((tmp_path / "a/blobs" / a["config"].replace(":", "/")).read_bytes())
    labels = config["config"]["Labels"]
    assert labels["cvmfs_injection_tar"] == a["diff_id"] == config["rootfs"]["diff_ids"][-1]
    assert labels["cvmfs_injection_gz"] == a["layer"]
    # on top of a base image: the base's layers stay, the new one comes last
    on = write_oci(one, tmp_path / "on", repo.fqrn, tag="t", base=f"{tmp_path / 'a'}:v1")
    manifest = json.loads((tmp_path / "on/blobs" / on["manifest"].replace(":", "/")).read_bytes())
    assert [layer["digest"] for layer in manifest["layers"]] == [a["layer"], on["layer"]]
    config = json.loads((tmp_path / "on/blobs" / on["config"].replace(":", "/")).read_bytes())
    assert config["rootfs"]["diff_ids"] == [a["diff_id"], on["diff_id"]]
    assert all(
        (tmp_path / "on/blobs" / layer["digest"].replace(":", "/")).exists() for layer in manifest["layers"]
    )
    with pytest.raises(PackError):
        write_oci(one, tmp_path / "bad", repo.fqrn, base=f"{tmp_path / 'a'}:nosuchtag")
    umoci = require_tool("umoci", "umoci")
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{tmp_path / 'on'}:t", str(bundle)], check=True, capture_output=True
    )
    rootfs = bundle / "rootfs" / "cvmfs" / repo.fqrn
    assert snapshot(rootfs) == snapshot(one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    binary = require_tool("docker-registry", "docker-registry")
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("docker-registry did not start")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_oci_image_pushed_to_a_registry_and_pulled_back(
    exports: tuple[Repository, Path, Path, Path], registry: str, tmp_path: Path
) -> None:
    repo, _, _, _ = exports
    skopeo = require_tool("skopeo", "skopeo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ref = f"docker://{registry}/rcds/app:r1"
    cmd = [sys.executable, "-m", "rcds.cli", "shrinkwrap", str(repo.storage), "--key", str(repo.public_key_path), "--path", "/app",
           "--dialect", "2.14", "--dest", str(tmp_path / "exp"), "--format", "oci", "--output", str(tmp_path / "layout"),
           "--tag", "r1", "--push", ref, "--insecure-registry", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    image = json.loads(proc.stdout)["image"]
    assert image["pushed"] == ref
    inspect = subprocess.run(
        [skopeo, "inspect", "--tls-verify=false", ref], capture_output=True, text=True, check=True
    )
    info = json.loads(inspect.stdout)
    assert info["Labels"]["cvmfs_injection_gz"] == image["layer"]
    assert info["Labels"]["org.rcds.shrinkwrap.repository"] == repo.fqrn
    assert info["Layers"] == [image["layer"]]
    pulled = tmp_path / "pulled"
    subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{pulled}:r1"], check=True)
    index = json.loads((pulled / "index.json").read_text())
    manifest = json.loads((pulled / "blobs" / index["manifests"][0]["digest"].replace(":", "/")).read_bytes())
    assert manifest["layers"][0]["digest"] == image["layer"]
    with tarfile.open(pulled / "blobs" / image["layer"].replace(":", "/")) as tar:
        run_sh = tar.extractfile(f"cvmfs/{repo.fqrn}/app/run.sh")
        assert run_sh is not None and run_sh.read() == b"#!/bin/sh\necho packed\n"
        assert tar.getmember(f"cvmfs/{repo.fqrn}/app/run.sh").mtime == 1_600_000_000
        assert tar.getmember(f"cvmfs/{repo.fqrn}/app/same.txt").mtime == DEFAULT_MTIME
