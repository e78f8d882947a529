"""Suite-wide settings."""

from __future__ import annotations

from hypothesis import settings

# No per-example deadline anywhere: on a shared 2-core machine one slow example (a GC
# pause, a noisy neighbour) is not a bug, and hypothesis would report it as a failure.
settings.register_profile("jwtgate", deadline=None)
settings.load_profile("jwtgate")
