"""Signed bundles: an Ed25519 signature over the manifest, and the device's list of trusted public keys.

Supported: Ed25519 keys in PEM (PKCS#8 private keys, SubjectPublicKeyInfo public keys), as OpenSSL writes them:

    openssl genpkey -algorithm ed25519 -out publisher.pem              # keep private (chmod 600)
    openssl pkey -in publisher.pem -pubout -out publisher.pub.pem       # give this to devices

The signature covers the manifest's canonical JSON without ``integrity`` and ``signature``; the manifest
already holds the size and sha256 of every file the runtime opens (``manifest.py``), so one signature covers the
whole bundle. It is stored in the manifest itself (``signature``: algorithm, key id, value), so a bundle stays one
folder and one atomically replaced ``manifest.json``.

Why not OpenSSF ``model-signing``: its verification needs ``sigstore``, ``in-toto-attestation``, ``blake3`` and
their trees (checked: model-signing 1.1.1 requires sigstore>=4, sigstore-models, in-toto-attestation, blake3,
asn1crypto, click), far beyond the runtime's numpy + onnxruntime + tokenizers + pillow; ``cryptography`` alone
verifies Ed25519, has wheels for aarch64 (Jetson) and x86_64, and is a base dependency so that every device on
which trusted keys are set can verify.

Trust: the device trusts the keys named by ``SAFECLIP_TRUSTED_KEYS`` (a PEM file or a folder of ``*.pem``) and by
``--trusted-key`` / ``trusted_keys=`` (the same forms; both sources together). With at least one trusted key, a
bundle must carry a valid signature by one of them; without any, signatures are not checked (an unsigned
bundle loads). A trust setting that names no usable key refuses to load: it fails closed.
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ENV = "SAFECLIP_TRUSTED_KEYS"
ALGORITHM = "ed25519"
MAX_KEY_BYTES = 64 << 10
TRUSTED_KEY_HELP = ("trust this Ed25519 public key (a PEM file or a folder of .pem; repeatable; adds to "
                    "$SAFECLIP_TRUSTED_KEYS): the bundle must then be signed by a trusted key")

__all__ = ["ENV", "TRUSTED_KEY_HELP", "SigningError", "TrustedKeys", "trusted_keys", "load_signing_key", "sign", "verify", "key_id"]


class SigningError(ValueError):
    """A key that cannot be used, or a signature that does not verify (``manifest.py`` makes it a BundleError)."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:                  # a base dependency; a trimmed install must not load signed-only bundles
        raise SigningError("bundle signatures need the 'cryptography' package: pip install cryptography") from None
    return serialization, ed25519, InvalidSignature


def _read_key_file(path: Path) -> bytes:
    """A key file's bytes: a regular file, opened without blocking (a FIFO or a device is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SigningError(f"{path}: cannot open key ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningError(f"{path}: a key must be a regular file")
        if st.st_size > MAX_KEY_BYTES:
            raise SigningError(f"{path}: {st.st_size} bytes is too big for a PEM key")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)


def key_id(raw_public: bytes) -> str:
    """sha256 of the raw 32-byte public key, hex: names the key in a signature and in error messages."""
    return hashlib.sha256(raw_public).hexdigest()


def _raw(public_key) -> bytes:
    serialization, _, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class TrustedKeys:
    """Raw Ed25519 public keys by key id, and where they came from (for messages). Picklable (Ray workers)."""
    keys: dict[str, bytes]
    sources: tuple[str, ...]

    def verify(self, payload: bytes, signature: dict) -> str:
        """The key id of the trusted key that signed ``payload``; raises :class:`SigningError` otherwise."""
        serialization, ed25519, InvalidSignature = _crypto()
        if not isinstance(signature, dict):
            raise SigningError("bundle is not signed, and trusted keys are set "
                               f"({', '.join(self.sources)}): refusing to load it")
        if signature.get("algorithm") != ALGORITHM:
            raise SigningError(f"bundle signature algorithm {signature.get('algorithm')!r} is not {ALGORITHM}")
        kid = signature.get("key_id")
        if kid not in self.keys:
            raise SigningError(f"bundle is signed by key {str(kid)[:16]}..., which is not among the trusted keys "
                               f"({', '.join(self.sources)})")
        try:
            value = base64.b64decode(str(signature.get("value", "")), validate=True)
            ed25519.Ed25519PublicKey.from_public_bytes(self.keys[kid]).verify(value, payload)
        except (InvalidSignature, ValueError):
            raise SigningError(f"bundle signature by key {kid[:16]}... does not verify: the manifest was changed "
                               "after signing") from None
        return kid


def _public_key_from_pem(data: bytes, where: str) -> bytes:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SigningError(f"{where}: not a PEM public key (make one with: openssl pkey -in KEY.pem -pubout)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SigningError(f"{where}: not an Ed25519 public key ({type(key).__name__})")
    return _raw(key)


def _key_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".pem" and not p.name.startswith("."))
        if not files:
            raise SigningError(f"{path}: trusted-key folder holds no .pem file")
        return files
    return [path]


def trusted_keys(extra: Iterable[str | os.PathLike] | str | os.PathLike | TrustedKeys | None = None,
                 env: dict | None = None) -> TrustedKeys | None:
    """The trusted keys of this process: ``$SAFECLIP_TRUSTED_KEYS`` plus ``extra`` (paths, or a TrustedKeys);
    None when neither names any (signatures are then not checked). Raises :class:`SigningError` for a path
    that is missing, unreadable or not an Ed25519 public key."""
    env = os.environ if env is None else env
    if isinstance(extra, TrustedKeys):
        given: list = []
        found, sources = dict(extra.keys), list(extra.sources)
    else:
        given = [extra] if isinstance(extra, (str, os.PathLike)) else list(extra or [])
        found, sources = {}, []
    if env.get(ENV):
        given.insert(0, env[ENV])
    for p in (Path(g) for g in given):
        if not p.exists():
            raise SigningError(f"trusted key {p} does not exist")
        for f in _key_files(p):
            raw = _public_key_from_pem(_read_key_file(f), str(f))
            found[key_id(raw)] = raw
        sources.append(str(p))
    return TrustedKeys(found, tuple(sources)) if sources else None


@dataclass(frozen=True)
class SigningKey:
    private: object                 # cryptography's Ed25519PrivateKey
    key_id: str
    path: str


def load_signing_key(path: str | os.PathLike) -> SigningKey:
    """An unencrypted Ed25519 private key in PEM (``openssl genpkey -algorithm ed25519``)."""
    serialization, ed25519, _ = _crypto()
    p = Path(path)
    data = _read_key_file(p)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"{p}: encrypted private keys are not supported; write it unencrypted "
                           "(openssl pkey -in KEY.pem -out plain.pem) and keep it private") from None
    except ValueError:
        raise SigningError(f"{p}: not a PEM private key (make one with: openssl genpkey -algorithm ed25519 "
                           f"-out {p.name})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{p}: not an Ed25519 private key ({type(key).__name__})")
    return SigningKey(key, key_id(_raw(key.public_key())), str(p))


def sign(payload: bytes, key: SigningKey) -> dict:
    """The ``signature`` record of ``payload``."""
    return {"algorithm": ALGORITHM, "key_id": key.key_id,
            "value": base64.b64encode(key.private.sign(payload)).decode("ascii")}


def verify(payload: bytes, signature, keys: TrustedKeys) -> str:
    return keys.verify(payload, signature)
