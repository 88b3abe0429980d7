from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mayfly.errors import IntegrityError, SigningKeyError
from mayfly.packages import (
    Signature,
    TrustedKeys,
    build_package,
    generate_keypair,
    load_private_key,
    sign_built,
    verify_package,
)

from .conftest import TASKPKGS


def test_sign_and_verify(signing_key: Ed25519PrivateKey, trusted: TrustedKeys) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    manifest = verify_package(built.data, Signature.from_json(sig.to_json()), None, trusted)
    assert (manifest.name, manifest.version) == ("reboot", "1.0.0")


def test_flipped_byte_is_refused(signing_key: Ed25519PrivateKey, trusted: TrustedKeys) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    data = bytearray(built.data)
    data[len(data) // 2] ^= 0x01
    with pytest.raises(IntegrityError) as err:
        verify_package(bytes(data), sig, None, trusted)
    assert str(err.value).startswith("reboot 1.0.0: archive digest")
    assert err.value.package == "reboot"
    assert err.value.version == "1.0.0"


def test_untrusted_key_is_refused(signing_key: Ed25519PrivateKey) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    other = TrustedKeys([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(IntegrityError, match=r"reboot 1\.0\.0: signed by key \w+, which is not"):
        verify_package(built.data, sig, None, other)


def test_forged_signature_bytes_are_refused(
    signing_key: Ed25519PrivateKey, trusted: TrustedKeys
) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    forged = dataclasses.replace(sig, signature=bytes(64))
    with pytest.raises(IntegrityError, match="invalid"):
        verify_package(built.data, forged, None, trusted)


def test_signature_cannot_be_replayed_for_another_version(
    signing_key: Ed25519PrivateKey, trusted: TrustedKeys
) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    replayed = dataclasses.replace(sig, version="9.9.9")
    with pytest.raises(IntegrityError, match=r"signature is for reboot 9\.9\.9"):
        verify_package(built.data, replayed, None, trusted)


def test_stored_manifest_must_match(signing_key: Ed25519PrivateKey, trusted: TrustedKeys) -> None:
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(signing_key, built)
    with pytest.raises(IntegrityError, match=r"manifest\.json differs"):
        verify_package(built.data, sig, b'{"name": "reboot"}', trusted)


def test_malformed_signature_file() -> None:
    with pytest.raises(IntegrityError, match="malformed"):
        Signature.from_json(b"{}", package="reboot", version="1.0.0")


def test_keygen_writes_private_key_0600(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert len(kid) == 16
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    # The pair works: what the private key signs, the public key (trusted by folder) verifies.
    built = build_package(TASKPKGS / "reboot")
    sig = sign_built(load_private_key(tmp_path / "k.key"), built)
    assert sig.key_id == kid
    trusted = TrustedKeys.from_paths([tmp_path])
    assert len(trusted) == 1
    manifest = verify_package(built.data, sig, None, trusted)
    assert (manifest.name, manifest.version) == ("reboot", "1.0.0")
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")


def test_missing_key_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="mayfly pkg keygen"):
        load_private_key(tmp_path / "nope.key")
