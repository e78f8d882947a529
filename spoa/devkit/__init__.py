"""Development tooling: signing keys, token minting and a loopback issuer.

Used by `jwtgate keys`, `jwtgate token`, the demo, the tests and the benchmarks; never on the
request path of the agent. The issuer lives in `spoa.devkit.issuer` and is not imported here,
so that `python -m spoa.devkit.issuer` runs it cleanly.
"""

from spoa.devkit.errors import (
    DevkitError,
    IssuerError,
    KeyDirError,
    KeyMaterialError,
    UnsupportedAlgorithmError,
)
from spoa.devkit.keys import (
    GENERATION_NAMES,
    SIGNING_ALGORITHMS,
    PublicKey,
    SigningKey,
    generate_signing_key,
    init_key_dir,
    jwk_thumbprint,
    jwks_document,
    load_current_key,
    load_key_ring,
    load_signing_key_pem,
    rotate_key_dir,
    save_key_ring,
)
from spoa.devkit.tokens import (
    alg_none_token,
    decode_unverified,
    embedded_jwk_token,
    expired_token,
    forge_signature,
    mint_token,
    psychic_signature_token,
    resign_with_hmac_using_public_key,
)

__all__ = [
    "GENERATION_NAMES",
    "SIGNING_ALGORITHMS",
    "DevkitError",
    "IssuerError",
    "KeyDirError",
    "KeyMaterialError",
    "PublicKey",
    "SigningKey",
    "UnsupportedAlgorithmError",
    "alg_none_token",
    "decode_unverified",
    "embedded_jwk_token",
    "expired_token",
    "forge_signature",
    "generate_signing_key",
    "init_key_dir",
    "jwk_thumbprint",
    "jwks_document",
    "load_current_key",
    "load_key_ring",
    "load_signing_key_pem",
    "mint_token",
    "psychic_signature_token",
    "resign_with_hmac_using_public_key",
    "rotate_key_dir",
    "save_key_ring",
]
