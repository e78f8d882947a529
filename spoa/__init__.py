"""jwtgate: JWT verification for HAProxy over SPOP (the SPOE agent protocol)."""

__version__ = "0.1.0"
