"""One contract, every package store: the local folder and real S3."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mayfly.errors import ImmutableVersionError, IntegrityError, PackageNotFoundError
from mayfly.packages import (
    LocalPackageStore,
    PackageRepository,
    PackageStore,
    TrustedKeys,
    build_package,
    sign_built,
)
from mayfly.packages.s3store import S3PackageStore

from .conftest import write_package


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PackageStore]:
    if request.param == "local":
        yield LocalPackageStore(tmp_path / "store")
        return
    server, bucket = request.getfixturevalue("s3_bucket")
    yield S3PackageStore(
        server.endpoint, bucket, access_key=server.access_key, secret_key=server.secret_key
    )


@pytest.fixture
def repo(store: PackageStore, trusted: TrustedKeys) -> PackageRepository:
    return PackageRepository(store, trusted)


def _publish(repo: PackageRepository, key: Ed25519PrivateKey, folder: Path) -> str:
    built = build_package(folder)
    result = repo.publish(built, sign_built(key, built))
    assert result.created
    return result.digest


# --- the raw store -----------------------------------------------------------


def test_store_get_put_list(store: PackageStore) -> None:
    assert store.get("a/b/c") is None
    store.put("a/b/c", b"one")
    store.put("a/b/c", b"two")
    assert store.get("a/b/c") == b"two"
    assert store.put_new("a/new", b"first")
    assert not store.put_new("a/new", b"second")
    assert store.get("a/new") == b"first"
    assert store.list_keys("a/") == ["a/b/c", "a/new"]
    assert store.list_keys("zzz/") == []


# --- the repository ----------------------------------------------------------


def test_publish_resolve_fetch(
    repo: PackageRepository, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    digest = _publish(repo, signing_key, write_package(tmp_path / "v1"))
    repo.promote("demo", "1.0.0", "stable")
    fetched = repo.fetch("demo")
    assert (fetched.manifest.name, fetched.manifest.version, fetched.digest) == (
        "demo",
        "1.0.0",
        digest,
    )
    assert repo.fetch("demo", "1.0.0").data == fetched.data
    path = fetched.materialise(tmp_path / "cache")
    assert path.name == digest.removeprefix("sha256:")
    assert (path / "task.py").read_text().startswith("def run")


def test_versions_sort_by_semver_and_channels_move(
    repo: PackageRepository, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    for version in ("1.10.0", "1.2.0", "1.9.0-rc.1"):
        _publish(repo, signing_key, write_package(tmp_path / version, version=version))
    assert repo.versions("demo") == ["1.2.0", "1.9.0-rc.1", "1.10.0"]
    assert repo.promote("demo", "1.2.0", "stable") is None
    assert repo.promote("demo", "1.10.0", "canary") is None
    assert repo.resolve("demo", "canary") == "1.10.0"
    assert repo.promote("demo", "1.10.0", "stable") == "1.2.0"
    assert repo.fetch("demo", "stable").manifest.version == "1.10.0"
    info = {i.version: i.channels for i in repo.describe("demo")}
    assert info == {"1.2.0": (), "1.9.0-rc.1": (), "1.10.0": ("canary", "stable")}
    assert repo.packages() == ["demo"]


def test_same_bytes_again_is_a_noop(
    repo: PackageRepository, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    folder = write_package(tmp_path / "v1")
    _publish(repo, signing_key, folder)
    built = build_package(folder)
    again = repo.publish(built, sign_built(signing_key, built))
    assert not again.created


def test_other_bytes_under_a_published_version_are_refused(
    repo: PackageRepository, store: PackageStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    _publish(repo, signing_key, write_package(tmp_path / "v1"))
    stored = store.get("demo/1.0.0/package.tar.gz")
    changed = build_package(write_package(tmp_path / "v1b", code="def run(ctx):\n    return 2\n"))
    with pytest.raises(ImmutableVersionError, match=r"demo 1\.0\.0: version already published"):
        repo.publish(changed, sign_built(signing_key, changed))
    assert store.get("demo/1.0.0/package.tar.gz") == stored
    assert repo.fetch("demo", "1.0.0").data == stored


def test_fetch_refuses_a_flipped_byte(
    repo: PackageRepository, store: PackageStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    _publish(repo, signing_key, write_package(tmp_path / "v1"))
    data = bytearray(store.get("demo/1.0.0/package.tar.gz") or b"")
    data[-10] ^= 0x01
    store.put("demo/1.0.0/package.tar.gz", bytes(data))  # tampering behind Mayfly's back
    with pytest.raises(IntegrityError, match=r"demo 1\.0\.0: archive digest .* does not match"):
        repo.fetch("demo", "1.0.0")


def test_fetch_refuses_an_untrusted_signer(
    store: PackageStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    publisher = PackageRepository(store, TrustedKeys([signing_key.public_key()]))
    _publish(publisher, signing_key, write_package(tmp_path / "v1"))
    stranger = PackageRepository(store, TrustedKeys([Ed25519PrivateKey.generate().public_key()]))
    with pytest.raises(IntegrityError, match=r"demo 1\.0\.0: signed by key .* not trusted"):
        stranger.fetch("demo", "1.0.0")


def test_publish_refuses_an_untrusted_signer(
    repo: PackageRepository, store: PackageStore, tmp_path: Path
) -> None:
    built = build_package(write_package(tmp_path / "v1"))
    with pytest.raises(IntegrityError, match="not trusted"):
        repo.publish(built, sign_built(Ed25519PrivateKey.generate(), built))
    assert store.list_keys("demo/") == []


def test_unknown_package_version_and_channel(
    repo: PackageRepository, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    with pytest.raises(PackageNotFoundError, match="nope: package not published"):
        repo.fetch("nope")
    _publish(repo, signing_key, write_package(tmp_path / "v1"))
    with pytest.raises(PackageNotFoundError, match=r"demo 2\.0\.0: version not published"):
        repo.fetch("demo", "2.0.0")
    with pytest.raises(PackageNotFoundError, match=r"no channel 'beta'.*1\.0\.0"):
        repo.fetch("demo", "beta")
    with pytest.raises(PackageNotFoundError):
        repo.promote("demo", "3.0.0", "stable")


def test_half_published_version_is_invisible_then_completed(
    repo: PackageRepository, store: PackageStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    built = build_package(write_package(tmp_path / "v1"))
    store.put_new("demo/1.0.0/package.tar.gz", built.data)  # a publish that died here
    assert repo.versions("demo") == []
    repo.publish(built, sign_built(signing_key, built))
    assert repo.versions("demo") == ["1.0.0"]
