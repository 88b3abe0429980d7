"""Ed25519 signatures over package versions.

A signature covers a canonical statement binding the package name, version,
archive digest and manifest digest together, so a valid signature for one
version can never be replayed for another version or another manifest.
``package.sig`` is a small JSON document: the statement fields, the signing
key's id and the base64 signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mayfly.errors import IntegrityError, SigningKeyError
from mayfly.packages.archive import BuiltPackage, digest_of

__all__ = [
    "Signature",
    "TrustedKeys",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "sign_built",
    "verify",
]

_STATEMENT_KIND = "mayfly-package-signature/v1"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    """What ``package.sig`` holds."""

    name: str
    version: str
    digest: str
    manifest_digest: str
    key_id: str
    signature: bytes

    def statement(self) -> bytes:
        return _statement(self.name, self.version, self.digest, self.manifest_digest)

    def to_json(self) -> bytes:
        doc = {
            "kind": _STATEMENT_KIND,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "manifest_digest": self.manifest_digest,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }
        return json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(
        cls, raw: bytes, *, package: str | None = None, version: str | None = None
    ) -> Signature:
        try:
            doc = json.loads(raw)
            if doc.get("kind") != _STATEMENT_KIND:
                raise ValueError(f"unknown signature kind {doc.get('kind')!r}")
            return cls(
                name=str(doc["name"]),
                version=str(doc["version"]),
                digest=str(doc["digest"]),
                manifest_digest=str(doc["manifest_digest"]),
                key_id=str(doc["key_id"]),
                signature=base64.b64decode(doc["signature"], validate=True),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"signature file is malformed: {exc}", package=package, version=version
            ) from exc


def _statement(name: str, version: str, digest: str, manifest_digest: str) -> bytes:
    doc = {
        "kind": _STATEMENT_KIND,
        "name": name,
        "version": version,
        "digest": digest,
        "manifest_digest": manifest_digest,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(
    private_key: Ed25519PrivateKey, *, name: str, version: str, digest: str, manifest_digest: str
) -> Signature:
    """Sign one package version."""
    public = private_key.public_key()
    raw = private_key.sign(_statement(name, version, digest, manifest_digest))
    return Signature(name, version, digest, manifest_digest, key_id(public), raw)


class TrustedKeys:
    """The public keys whose signatures are accepted, by key id."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    @classmethod
    def from_paths(cls, paths: list[Path]) -> TrustedKeys:
        """Load ``*.pub`` files; a folder contributes every ``*.pub`` inside it."""
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            if path.is_dir():
                keys.extend(load_public_key(p) for p in sorted(path.glob("*.pub")))
            elif path.exists():
                keys.append(load_public_key(path))
            else:
                raise SigningKeyError(f"trusted key {path} does not exist")
        return cls(keys)


def verify(
    sig: Signature,
    trusted: TrustedKeys,
    *,
    name: str,
    version: str,
    digest: str,
    manifest_digest: str,
) -> None:
    """Check that ``sig`` is a trusted signature over exactly these bytes.

    Raises:
        IntegrityError: naming the package, version and the reason.
    """
    where = {"package": name, "version": version}
    if (sig.name, sig.version) != (name, version):
        raise IntegrityError(
            f"signature is for {sig.name} {sig.version}, not this package", **where
        )
    if sig.digest != digest:
        raise IntegrityError(
            f"archive digest {digest} does not match the signed digest {sig.digest}", **where
        )
    if sig.manifest_digest != manifest_digest:
        raise IntegrityError("manifest does not match the signed manifest", **where)
    key = trusted.get(sig.key_id)
    if key is None:
        raise IntegrityError(
            f"signed by key {sig.key_id}, which is not trusted "
            f"({len(trusted)} trusted key(s) loaded)",
            **where,
        )
    try:
        key.verify(sig.signature, sig.statement())
    except InvalidSignature as exc:
        raise IntegrityError(f"signature by key {sig.key_id} is invalid", **where) from exc


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair as PEM files; the private one is mode 0600.

    Returns:
        The new key's id.
    """
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise SigningKeyError(f"{path} already exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: a chmod afterwards would leave a window.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise SigningKeyError(
            f"signing key {path} not found; create one with `mayfly pkg keygen`"
        ) from exc
    except (ValueError, TypeError, OSError) as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise SigningKeyError(f"public key {path} not found") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise SigningKeyError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def sign_built(private_key: Ed25519PrivateKey, built: BuiltPackage) -> Signature:
    """Sign a freshly built package: its name, version, archive and manifest."""
    return sign(
        private_key,
        name=built.manifest.name,
        version=built.manifest.version,
        digest=built.digest,
        manifest_digest=digest_of(built.manifest.to_json()),
    )
