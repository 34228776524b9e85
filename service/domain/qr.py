"""Pairing codes rendered as PNG data URLs (``data:image/png;base64,...``).

The QR code (``service.domain.qr_symbol``) is drawn as a black and white PNG of
one bit per pixel, ``BOX_SIZE`` pixels a module, with a quiet zone of
``BORDER`` modules. At 8 pixels a module each module is exactly one byte of a
pixel row (0x00 dark, 0xFF light), so a row of pixels is the modules' bytes
translated, and the 7 rows under it repeat it: PNG's "Up" filter writes them as
zeros, which zlib compresses at its default level in a fraction of a
millisecond (level 9 on the same rows takes several milliseconds). The PNG is
written here directly: Pillow's resize and encoder cost several times more than
the code itself.
"""

from __future__ import annotations

import base64
import functools
import struct
import zlib

from service.domain.qr_symbol import Symbol, encode

DATA_URL_PREFIX = "data:image/png;base64,"
BOX_SIZE = 8  # pixels a module: one byte of a one-bit row
BORDER = 4  # modules of quiet zone around the code
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODULE_BYTES = bytes.maketrans(b"\x00\x01", b"\xff\x00")  # light, dark
ONE_BIT_GREY = (1, 0, 0, 0, 0)  # bit depth, colour type, compression, filter, interlace
NO_FILTER = b"\x00"  # the filter type byte that starts each row: the row as it is
UP_FILTER = b"\x02"  # each byte minus the one above it


@functools.lru_cache(maxsize=64)
def render_data_url(payload: str) -> str:
    """The QR code of ``payload`` as a PNG data URL a browser can show and a phone can scan."""
    png = render_png(encode(payload.encode()))
    return DATA_URL_PREFIX + base64.b64encode(png).decode("ascii")


def render_png(symbol: Symbol) -> bytes:
    """``symbol`` as a one-bit greyscale PNG, ``BOX_SIZE`` pixels a module, in its quiet zone."""
    width = symbol.size + 2 * BORDER  # in modules, that is bytes of a row
    quiet = b"\xff" * BORDER
    repeat = UP_FILTER + bytes(width)  # the row above again
    blank = NO_FILTER + b"\xff" * width + repeat * (BORDER * BOX_SIZE - 1)
    rows = [blank]
    for modules in symbol.rows():
        row = NO_FILTER + quiet + modules.translate(MODULE_BYTES) + quiet
        rows.append(row + repeat * (BOX_SIZE - 1))
    rows.append(blank)
    pixels = width * BOX_SIZE
    header = struct.pack(">II5B", pixels, pixels, *ONE_BIT_GREY)
    return b"".join([
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(b"".join(rows))),
        _chunk(b"IEND", b""),
    ])  # fmt: skip


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: its length, type, data and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
