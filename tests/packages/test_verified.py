"""A version verified once is reused: the ref is still resolved, the archive not reread."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mayfly.errors import IntegrityError
from mayfly.packages import (
    LocalPackageStore,
    PackageRepository,
    TrustedKeys,
    build_package,
    sign_built,
)
from mayfly.packages.verified import VerifiedVersions

from .conftest import write_package


class CountingStore(LocalPackageStore):
    """A local store that remembers every key read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key: str) -> bytes | None:
        self.reads.append(key)
        return super().get(key)

    def list_keys(self, prefix: str) -> list[str]:
        self.reads.append(f"list:{prefix}")
        return super().list_keys(prefix)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


def _publish(
    repo: PackageRepository, key: Ed25519PrivateKey, folder: Path, version: str = "1.0.0"
) -> None:
    built = build_package(write_package(folder, version=version))
    repo.publish(built, sign_built(key, built))


@pytest.fixture
def repo(store: CountingStore, signing_key: Ed25519PrivateKey, tmp_path: Path) -> PackageRepository:
    repo = PackageRepository(store, TrustedKeys([signing_key.public_key()]))
    _publish(repo, signing_key, tmp_path / "v1")
    _publish(repo, signing_key, tmp_path / "v2", "2.0.0")
    repo.store.put("demo/channels/stable", b"1.0.0\n")
    store.reads.clear()
    return repo


def test_a_second_fetch_reads_only_the_ref(repo: PackageRepository, store: CountingStore) -> None:
    first = repo.fetch("demo", "stable")
    assert "demo/1.0.0/package.tar.gz" in store.reads
    store.reads.clear()
    again = repo.fetch("demo", "stable")
    assert again is first
    assert store.reads == ["demo/channels/stable"]  # the channel, and nothing else
    store.reads.clear()
    assert repo.fetch("demo", "1.0.0") is first
    assert store.reads == ["demo/1.0.0/package.sig"]  # still checked to be published


def test_a_channel_moved_between_fetches_gives_the_new_version(
    repo: PackageRepository, store: CountingStore
) -> None:
    assert repo.fetch("demo", "stable").manifest.version == "1.0.0"
    repo.store.put("demo/channels/stable", b"2.0.0\n")
    assert repo.fetch("demo", "stable").manifest.version == "2.0.0"
    repo.store.put("demo/channels/stable", b"1.0.0\n")
    store.reads.clear()
    assert repo.fetch("demo", "stable").manifest.version == "1.0.0"
    assert store.reads == ["demo/channels/stable"]  # both versions stay verified


def test_a_key_no_longer_trusted_refuses_the_cached_version(
    repo: PackageRepository, store: CountingStore
) -> None:
    repo.fetch("demo", "1.0.0")
    repo.trusted = TrustedKeys([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(IntegrityError, match=r"demo 1\.0\.0: signed by key .* not trusted"):
        repo.fetch("demo", "1.0.0")
    assert len(repo.verified) == 0  # forgotten, not kept for when the key comes back
    with pytest.raises(IntegrityError):
        repo.fetch("demo", "1.0.0")


def test_bytes_rewritten_in_the_store_after_verification_never_run(
    repo: PackageRepository, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Versions are immutable: the first verified bytes are the ones to run. A
    rewrite behind Mayfly's back (signed even, with a trusted key) changes nothing
    for a process that verified the version, and is refused by one that did not."""
    first = repo.fetch("demo", "1.0.0")
    other = build_package(write_package(tmp_path / "other", code="def run(ctx):\n    return 2\n"))
    repo.store.put("demo/1.0.0/package.tar.gz", other.data)
    repo.store.put("demo/1.0.0/package.sig", sign_built(signing_key, other).to_json())
    assert repo.fetch("demo", "1.0.0").data == first.data
    garbled = bytearray(other.data)
    garbled[-10] ^= 0x01
    repo.store.put("demo/1.0.0/package.tar.gz", bytes(garbled))
    assert repo.fetch("demo", "1.0.0").data == first.data
    fresh = PackageRepository(repo.store, repo.trusted)
    with pytest.raises(IntegrityError, match=r"archive digest .* does not match"):
        fresh.fetch("demo", "1.0.0")


def test_the_cache_is_bounded(
    store: CountingStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    repo = PackageRepository(
        store, TrustedKeys([signing_key.public_key()]), verified=VerifiedVersions(max_versions=2)
    )
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        _publish(repo, signing_key, tmp_path / version, version)
        repo.fetch("demo", version)
    assert len(repo.verified) == 2
    store.reads.clear()
    repo.fetch("demo", "1.0.0")  # the least recently used went first
    assert "demo/1.0.0/package.tar.gz" in store.reads
    store.reads.clear()
    repo.fetch("demo", "1.2.0")
    assert "demo/1.2.0/package.tar.gz" not in store.reads


def test_the_cache_is_bounded_in_bytes(
    store: CountingStore, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    repo = PackageRepository(store, TrustedKeys([signing_key.public_key()]))
    _publish(repo, signing_key, tmp_path / "v1")
    size = len(repo.fetch("demo", "1.0.0").data)
    repo.verified = VerifiedVersions(max_bytes=size * 2 - 1)
    _publish(repo, signing_key, tmp_path / "v2", "2.0.0")
    repo.fetch("demo", "1.0.0")
    repo.fetch("demo", "2.0.0")
    assert len(repo.verified) == 1


def test_a_pinned_view_takes_the_resolve_it_was_given(
    repo: PackageRepository, store: CountingStore
) -> None:
    """What a forked coordinator gets: the warm parent resolved ``stable`` just
    before the fork, so the child reads nothing; the parent keeps resolving."""
    fetched = repo.fetch("demo", "stable")
    child = repo.pinned("demo", "stable", fetched.manifest.version)
    store.reads.clear()
    assert child.fetch("demo", "stable") is fetched
    assert store.reads == []
    repo.store.put("demo/channels/stable", b"2.0.0\n")
    assert repo.fetch("demo", "stable").manifest.version == "2.0.0"
    assert repo.pinned("demo", None, "2.0.0").fetch("demo").manifest.version == "2.0.0"
    store.reads.clear()
    assert child.fetch("demo", "1.0.0").manifest.version == "1.0.0"  # other refs resolve
    assert store.reads == ["demo/1.0.0/package.sig"]
