"""SPOP DISCONNECT statuses and the protocol core's one exception tree.

Every exception knows the status the agent sends in AGENT-DISCONNECT when it is
raised while decoding HAProxy's input. Messages describe structure only (never
payload bytes), so they are safe to log.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DISCONNECT status codes, as listed in SPOE.txt."""

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    FRAME_TOO_BIG = 3
    INVALID_FRAME = 4
    VERSION_MISSING = 5
    MAX_FRAME_SIZE_MISSING = 6
    CAPABILITIES_MISSING = 7
    UNSUPPORTED_VERSION = 8
    BAD_MAX_FRAME_SIZE = 9
    FRAGMENTATION_NOT_SUPPORTED = 10
    INVALID_INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ALLOCATION = 13
    UNKNOWN = 99

    @classmethod
    def from_code(cls, code: int) -> Status:
        """Map a peer's code onto the table; private codes become UNKNOWN."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_normal(self) -> bool:
        """HAProxy 2.x ends idle or timed-out connections with 1 or 2: not a fault."""
        return self <= Status.TIMEOUT


class SpopError(Exception):
    """Root of every error raised by `spoa.protocol`."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class FrameTooBig(SpopError):
    status = Status.FRAME_TOO_BIG


class InvalidFrame(SpopError):
    status = Status.INVALID_FRAME


class VersionMissing(InvalidFrame):
    status = Status.VERSION_MISSING


class MaxFrameSizeMissing(InvalidFrame):
    status = Status.MAX_FRAME_SIZE_MISSING


class CapabilitiesMissing(InvalidFrame):
    status = Status.CAPABILITIES_MISSING


class UnsupportedVersion(SpopError):
    status = Status.UNSUPPORTED_VERSION


class BadMaxFrameSize(SpopError):
    status = Status.BAD_MAX_FRAME_SIZE


class FragmentationNotSupported(SpopError):
    status = Status.FRAGMENTATION_NOT_SUPPORTED


class InvalidInterlacedFrames(SpopError):
    status = Status.INVALID_INTERLACED_FRAMES


class FrameIdNotFound(SpopError):
    """An ACK for a NOTIFY that is not in flight (a caller error, never from the wire)."""

    status = Status.FRAME_ID_NOT_FOUND


class ResourceLimit(SpopError):
    status = Status.RESOURCE_ALLOCATION


class InvalidValue(SpopError, ValueError):
    """A value, name or action the encoder cannot represent (a caller error)."""

    status = Status.UNKNOWN
