"""Bytes from a user's file or stream as text: UTF-8, a byte-order mark allowed."""

from __future__ import annotations

from genkit.errors import GenkitError


def decode(data: bytes, where: str, advice: str = "send UTF-8 text") -> str:
    """`data` decoded (a leading BOM dropped), or one line naming `where`, the line and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GenkitError(f"{where}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}): {advice}") from None
