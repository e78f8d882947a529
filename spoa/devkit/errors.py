"""The devkit's one exception tree."""

from __future__ import annotations


class DevkitError(Exception):
    """Root of every error raised by `spoa.devkit`."""


class UnsupportedAlgorithmError(DevkitError, ValueError):
    """The JWS algorithm name is not one the devkit can generate or sign with."""


class KeyMaterialError(DevkitError):
    """A key cannot do what was asked (for example, an HMAC secret has no public form)."""


class KeyDirError(DevkitError):
    """A key directory is missing, incomplete or inconsistent."""


class IssuerError(DevkitError):
    """The loopback issuer cannot do what was asked (bad mode, cannot bind)."""
