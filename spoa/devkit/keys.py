"""Development signing keys: generation, JWK and PEM export, RFC 7638 kids, key directories.

A key directory (what `jwtgate keys` manages) holds, newest key first:

    current          the kid that signs now, one line (shell friendly)
    keys.json        manifest: {"format": 1, "keys": [{"kid": ..., "alg": ...}, ...]}
    jwks.json        the public keys still published (asymmetric keys only)
    <kid>.pub.pem    SPKI public key per published asymmetric key (for HAProxy's jwt_verify)
    <kid>.key.pem    PKCS#8 private key of the current key only, mode 0600; HMAC keys keep
                     one secret file per kept key, since verifiers need the secret itself

Every file is written to a temporary name and renamed, so a reader never sees half a file, and
`current` is written last, so the files it names always exist.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from spoa.devkit.errors import KeyDirError, KeyMaterialError, UnsupportedAlgorithmError

PrivateKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
PublicKeyObject: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
KeyMaterial: TypeAlias = PrivateKey | bytes

#: JWS algorithms the devkit signs with (the `alg` header values).
SIGNING_ALGORITHMS: Final = (
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
    "HS256", "HS384", "HS512",
)  # fmt: skip
#: Names `generate_signing_key` accepts: the algorithms plus the EdDSA curves by name.
GENERATION_NAMES: Final = (*SIGNING_ALGORITHMS, "Ed25519", "Ed448")

_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_HMAC_DIGESTS: Final[Mapping[str, str]] = {"256": "sha256", "384": "sha384", "512": "sha512"}
# alg -> (curve class, JWK crv name, coordinate size in bytes, per RFC 7518 section 3.4)
_EC_CURVES: Final[Mapping[str, tuple[type[ec.EllipticCurve], str, int]]] = {
    "ES256": (ec.SECP256R1, "P-256", 32),
    "ES384": (ec.SECP384R1, "P-384", 48),
    "ES512": (ec.SECP521R1, "P-521", 66),
}
DEFAULT_RSA_BITS: Final = 2048


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url_encode`; accepts missing padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uint_bytes(value: int, length: int | None = None) -> bytes:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(size, "big")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) over the required members of `jwk`."""
    required = {
        "RSA": ("e", "kty", "n"),
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
        "oct": ("k", "kty"),
    }
    kty = jwk.get("kty")
    if kty not in required:
        raise KeyMaterialError(f"cannot take the thumbprint of a JWK with kty {kty!r}")
    members = {name: jwk[name] for name in required[kty]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def _check_alg(alg: str) -> None:
    if alg not in SIGNING_ALGORITHMS:
        raise UnsupportedAlgorithmError(
            f"unsupported signing algorithm {alg!r}; "
            f"expected one of {', '.join(SIGNING_ALGORITHMS)}"
        )


def _check_material(alg: str, material: object) -> None:
    """Reject a key whose type cannot produce `alg` signatures."""
    family = alg[:2]
    if family in ("RS", "PS"):
        ok = isinstance(material, rsa.RSAPrivateKey | rsa.RSAPublicKey)
    elif family == "ES":
        curve = _EC_CURVES[alg][0]
        ok = isinstance(
            material, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey
        ) and isinstance(material.curve, curve)
    elif alg == "EdDSA":
        ok = isinstance(
            material,
            ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        )
    else:
        ok = isinstance(material, bytes)
    if not ok:
        raise KeyMaterialError(f"a {type(material).__name__} cannot sign {alg}")


def _public_jwk_members(public_key: PublicKeyObject, alg: str) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url_encode(_uint_bytes(numbers.n)),
            "e": b64url_encode(_uint_bytes(numbers.e)),
        }
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        _, crv, size = _EC_CURVES[alg]
        point = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(_uint_bytes(point.x, size)),
            "y": b64url_encode(_uint_bytes(point.y, size)),
        }
    crv = "Ed25519" if isinstance(public_key, ed25519.Ed25519PublicKey) else "Ed448"
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": crv, "x": b64url_encode(raw)}


@dataclass(frozen=True)
class PublicKey:
    """The public half of a signing key, as published in a JWKS after rotation."""

    kid: str
    alg: str
    public_key: PublicKeyObject

    def __post_init__(self) -> None:
        _check_alg(self.alg)
        _check_material(self.alg, self.public_key)

    def public_jwk(self) -> dict[str, Any]:
        """The JWK with `kid`, `alg` and `use="sig"`."""
        return {
            **_public_jwk_members(self.public_key, self.alg),
            "kid": self.kid,
            "alg": self.alg,
            "use": "sig",
        }

    def public_pem(self) -> bytes:
        """SPKI PEM ("BEGIN PUBLIC KEY"), the form HAProxy's jwt_verify reads."""
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


_HMAC_PEM_LABEL: Final = "HMAC SECRET"


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its kid and JWS algorithm. `repr` never shows the key."""

    kid: str
    alg: str
    private_key: KeyMaterial = field(repr=False)

    def __post_init__(self) -> None:
        _check_alg(self.alg)
        _check_material(self.alg, self.private_key)

    @property
    def is_symmetric(self) -> bool:
        return isinstance(self.private_key, bytes)

    @property
    def generation_name(self) -> str:
        """The name to pass to `generate_signing_key` for a key of the same kind."""
        if isinstance(self.private_key, ed448.Ed448PrivateKey):
            return "Ed448"
        return self.alg

    def public(self) -> PublicKey:
        """The public half; HMAC keys have none."""
        if isinstance(self.private_key, bytes):
            raise KeyMaterialError(f"{self.alg} key {self.kid!r} is a shared secret, not public")
        return PublicKey(self.kid, self.alg, self.private_key.public_key())

    def public_jwk(self) -> dict[str, Any]:
        return self.public().public_jwk()

    def public_pem(self) -> bytes:
        return self.public().public_pem()

    def secret_jwk(self) -> dict[str, Any]:
        """HMAC keys only: the `oct` JWK holding the secret (for verifiers, never for logs)."""
        if not isinstance(self.private_key, bytes):
            raise KeyMaterialError(f"{self.alg} key {self.kid!r} is asymmetric; use public_jwk()")
        return {
            "kty": "oct",
            "k": b64url_encode(self.private_key),
            "kid": self.kid,
            "alg": self.alg,
            "use": "sig",
        }

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM; an HMAC secret is armoured as "BEGIN HMAC SECRET"."""
        if isinstance(self.private_key, bytes):
            body = base64.encodebytes(self.private_key).decode("ascii")
            return (
                f"-----BEGIN {_HMAC_PEM_LABEL}-----\n{body}-----END {_HMAC_PEM_LABEL}-----\n"
            ).encode("ascii")
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature over `signing_input`, in the RFC 7518 wire form for `alg`."""
        material = self.private_key
        bits = self.alg[-3:]
        if isinstance(material, bytes):
            return hmac.new(material, signing_input, _HMAC_DIGESTS[bits]).digest()
        if isinstance(material, rsa.RSAPrivateKey):
            digest = _HASHES[bits]()
            if self.alg.startswith("PS"):
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
                return material.sign(signing_input, pss, digest)
            return material.sign(signing_input, padding.PKCS1v15(), digest)
        if isinstance(material, ec.EllipticCurvePrivateKey):
            der = material.sign(signing_input, ec.ECDSA(_HASHES[bits]()))
            r, s = decode_dss_signature(der)
            size = _EC_CURVES[self.alg][2]
            return _uint_bytes(r, size) + _uint_bytes(s, size)
        return material.sign(signing_input)


def _thumbprint_of(alg: str, material: KeyMaterial) -> str:
    probe = SigningKey("", alg, material)
    jwk = probe.secret_jwk() if probe.is_symmetric else probe.public_jwk()
    return jwk_thumbprint(jwk)


def signing_key_from(material: KeyMaterial, alg: str, kid: str | None = None) -> SigningKey:
    """Wrap existing key material; the kid defaults to its RFC 7638 thumbprint."""
    return SigningKey(kid if kid is not None else _thumbprint_of(alg, material), alg, material)


def generate_signing_key(
    alg: str = "RS256", kid: str | None = None, *, rsa_bits: int = DEFAULT_RSA_BITS
) -> SigningKey:
    """A fresh key for `alg` (any of GENERATION_NAMES); "Ed25519" and "Ed448" give EdDSA keys."""
    material: KeyMaterial
    if alg in ("EdDSA", "Ed25519"):
        material, alg = ed25519.Ed25519PrivateKey.generate(), "EdDSA"
    elif alg == "Ed448":
        material, alg = ed448.Ed448PrivateKey.generate(), "EdDSA"
    else:
        _check_alg(alg)
        if alg[:2] in ("RS", "PS"):
            material = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        elif alg in _EC_CURVES:
            material = ec.generate_private_key(_EC_CURVES[alg][0]())
        else:
            # RFC 7518 section 3.2: the secret is at least as long as the hash output.
            material = secrets.token_bytes(_HASHES[alg[-3:]]().digest_size)
    return signing_key_from(material, alg, kid)


def load_signing_key_pem(data: bytes, alg: str, kid: str | None = None) -> SigningKey:
    """Read what `SigningKey.private_pem` wrote."""
    _check_alg(alg)
    if alg.startswith("HS"):
        text = data.decode("ascii", errors="replace").strip()
        begin, end = f"-----BEGIN {_HMAC_PEM_LABEL}-----", f"-----END {_HMAC_PEM_LABEL}-----"
        if not (text.startswith(begin) and text.endswith(end)):
            raise KeyMaterialError(f"expected a {_HMAC_PEM_LABEL} PEM block for {alg}")
        try:
            secret = base64.b64decode(text[len(begin) : -len(end)], validate=False)
        except ValueError as exc:
            raise KeyMaterialError(f"the {_HMAC_PEM_LABEL} block is not base64") from exc
        return signing_key_from(secret, alg, kid)
    try:
        material = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError("not an unencrypted PEM private key") from exc
    if not isinstance(
        material,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise KeyMaterialError(f"unsupported private key type {type(material).__name__}")
    return signing_key_from(material, alg, kid)


def load_public_key_pem(data: bytes, alg: str, kid: str) -> PublicKey:
    """Read an SPKI PEM written by `public_pem`."""
    try:
        material = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyMaterialError("not a PEM public key") from exc
    if not isinstance(
        material,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise KeyMaterialError(f"unsupported public key type {type(material).__name__}")
    return PublicKey(kid, alg, material)


def jwks_document(keys: Sequence[SigningKey | PublicKey]) -> dict[str, Any]:
    """`{"keys": [...]}` with the public JWK of every asymmetric key; HMAC keys are left out."""
    published = [key for key in keys if not (isinstance(key, SigningKey) and key.is_symmetric)]
    return {"keys": [key.public_jwk() for key in published]}


# ---------------------------------------------------------------- key directories

CURRENT_FILE: Final = "current"
MANIFEST_FILE: Final = "keys.json"
JWKS_FILE: Final = "jwks.json"
_MANIFEST_FORMAT: Final = 1
_SAFE_KID: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_KEY_FILE: Final = re.compile(r"(?P<kid>.+)\.(?:key|pub)\.pem")

RingEntry: TypeAlias = SigningKey | PublicKey


def private_key_path(directory: str | os.PathLike[str], kid: str) -> Path:
    return Path(directory) / f"{_checked_kid(kid)}.key.pem"


def public_key_path(directory: str | os.PathLike[str], kid: str) -> Path:
    return Path(directory) / f"{_checked_kid(kid)}.pub.pem"


def _checked_kid(kid: str) -> str:
    # kids become file names: no separators, no dot files, no "..".
    if not _SAFE_KID.fullmatch(kid):
        raise KeyDirError(f"kid {kid!r} cannot name a file; use letters, digits, '.', '_', '-'")
    return kid


def write_file_atomically(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temporary file beside `target`, fsync it, then rename it over `target`."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _json_bytes(document: object) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_key_ring(directory: str | os.PathLike[str], ring: Sequence[RingEntry]) -> None:
    """Write `ring` (newest first; the first entry signs) as a key directory, pruning the rest."""
    if not ring or not isinstance(ring[0], SigningKey):
        raise KeyDirError("a key ring needs its current signing key first")
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    current = ring[0]
    wanted: set[str] = set()
    for index, entry in enumerate(ring):
        _checked_kid(entry.kid)
        if isinstance(entry, SigningKey) and (index == 0 or entry.is_symmetric):
            target = private_key_path(path, entry.kid)
            write_file_atomically(target, entry.private_pem(), mode=0o600)
            wanted.add(target.name)
        if not (isinstance(entry, SigningKey) and entry.is_symmetric):
            target = public_key_path(path, entry.kid)
            write_file_atomically(target, entry.public_pem())
            wanted.add(target.name)
    write_file_atomically(path / JWKS_FILE, _json_bytes(jwks_document(ring)))
    manifest = {
        "format": _MANIFEST_FORMAT,
        "keys": [{"kid": entry.kid, "alg": entry.alg} for entry in ring],
    }
    write_file_atomically(path / MANIFEST_FILE, _json_bytes(manifest))
    write_file_atomically(path / CURRENT_FILE, f"{current.kid}\n".encode("ascii"))
    for stale in path.iterdir():
        if _KEY_FILE.fullmatch(stale.name) and stale.name not in wanted:
            stale.unlink(missing_ok=True)
    _fsync_directory(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> list[tuple[str, str]]:
    manifest_path = path / MANIFEST_FILE
    try:
        document = json.loads(manifest_path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyDirError(f"{path} is not a key directory (no {MANIFEST_FILE})") from exc
    except ValueError as exc:
        raise KeyDirError(f"{manifest_path} is not valid JSON") from exc
    if not isinstance(document, dict):
        raise KeyDirError(f"{manifest_path}: expected a JSON object")
    entries = document.get("keys")
    if document.get("format") != _MANIFEST_FORMAT or not isinstance(entries, list) or not entries:
        raise KeyDirError(f"{manifest_path}: expected format {_MANIFEST_FORMAT} with keys")
    result: list[tuple[str, str]] = []
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        alg = entry.get("alg") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not isinstance(alg, str):
            raise KeyDirError(f"{manifest_path}: each key needs a kid and an alg")
        result.append((_checked_kid(kid), alg))
    return result


def load_key_ring(directory: str | os.PathLike[str]) -> list[RingEntry]:
    """Every key a directory still holds, newest first; private where the secret is kept."""
    path = Path(directory)
    ring: list[RingEntry] = []
    for kid, alg in _read_manifest(path):
        private_path, public_path = private_key_path(path, kid), public_key_path(path, kid)
        if private_path.exists():
            ring.append(load_signing_key_pem(private_path.read_bytes(), alg, kid))
        elif public_path.exists():
            ring.append(load_public_key_pem(public_path.read_bytes(), alg, kid))
        else:
            raise KeyDirError(f"{path}: neither {private_path.name} nor {public_path.name} exists")
    return ring


def load_current_key(directory: str | os.PathLike[str]) -> SigningKey:
    """The key named by the directory's `current` file."""
    path = Path(directory)
    # A rotation between reading `current` and reading the key removes the old private key;
    # the rotation has then already named the new key, so read `current` again.
    for _ in range(3):
        kid = _read_current_kid(path)
        algs = dict(_read_manifest(path))
        if kid not in algs:
            continue
        try:
            data = private_key_path(path, kid).read_bytes()
        except FileNotFoundError:
            if _read_current_kid(path) != kid:
                continue
            raise KeyDirError(f"{path}: the current key's private key file is missing") from None
        return load_signing_key_pem(data, algs[kid], kid)
    raise KeyDirError(f"{path}: the current kid is not in {MANIFEST_FILE}")


def _read_current_kid(path: Path) -> str:
    try:
        return (path / CURRENT_FILE).read_text("ascii").strip()
    except FileNotFoundError as exc:
        raise KeyDirError(f"{path} is not a key directory (no {CURRENT_FILE} file)") from exc


def init_key_dir(
    directory: str | os.PathLike[str], alg: str = "RS256", kid: str | None = None
) -> SigningKey:
    """Create a key directory with one fresh key; refuses to overwrite an existing one."""
    path = Path(directory)
    if (path / MANIFEST_FILE).exists():
        raise KeyDirError(f"{path} already holds keys; rotate it instead")
    key = generate_signing_key(alg, kid)
    _checked_kid(key.kid)
    save_key_ring(path, [key])
    return key


def _demoted(entry: RingEntry) -> RingEntry:
    # Old asymmetric keys only verify, so their private half is dropped.
    if isinstance(entry, SigningKey) and not entry.is_symmetric:
        return entry.public()
    return entry


def rotate_key_dir(
    directory: str | os.PathLike[str],
    keep: int = 2,
    *,
    alg: str | None = None,
    kid: str | None = None,
) -> SigningKey:
    """Add a new current key (same kind as the current one unless `alg` is given).

    The newest `keep` keys stay published so tokens signed just before the rotation still verify.
    """
    if keep < 1:
        raise KeyDirError(f"keep must be at least 1, got {keep}")
    ring = load_key_ring(directory)
    current = ring[0]
    if alg is None:
        if not isinstance(current, SigningKey):
            raise KeyDirError(f"{directory}: the current key's private key is missing")
        alg = current.generation_name
    new_key = generate_signing_key(alg, kid)
    if any(entry.kid == new_key.kid for entry in ring):
        raise KeyDirError(f"kid {new_key.kid!r} is already in {directory}")
    save_key_ring(directory, [new_key, *(_demoted(entry) for entry in ring)][:keep])
    return new_key
