"""Draw a QR code PNG data URL in a terminal with half-block characters.

The PNG is decoded with ``png`` (pypng); the module size is measured from the
top-left finder pattern (7 modules wide), so any box size and border work.
Each text line shows two rows of modules: ``▀`` top, ``▄`` bottom, ``█`` both.
"""

from __future__ import annotations

import base64

import png

DATA_URL_PREFIX = "data:image/png;base64,"

Matrix = list[list[bool]]


def _pixels(data_url: str) -> tuple[int, int, list[list[bool]]]:
    if not data_url.startswith(DATA_URL_PREFIX):
        raise ValueError("not a PNG data URL")
    raw = base64.b64decode(data_url.removeprefix(DATA_URL_PREFIX))
    width, height, rows, info = png.Reader(bytes=raw).asDirect()
    planes = int(info["planes"])
    half = (2 ** int(info["bitdepth"]) - 1) / 2
    dark = [[row[x * planes] < half for x in range(width)] for row in rows]
    return width, height, dark


def modules(data_url: str) -> Matrix:
    """The QR code's modules (``True`` = dark), without the quiet zone."""
    width, height, dark = _pixels(data_url)
    top = next((y for y in range(height) if any(dark[y])), None)
    if top is None:
        raise ValueError("the image holds no QR code")
    left = dark[top].index(True)
    run = 0
    while left + run < width and dark[top][left + run]:
        run += 1
    box = run // 7
    if box < 1 or run % 7:
        raise ValueError("no finder pattern at the top-left corner")
    size = (width - 2 * left) // box
    return [
        [dark[top + r * box + box // 2][left + c * box + box // 2] for c in range(size)]
        for r in range(size)
    ]


def render(matrix: Matrix, *, quiet: int = 2, invert: bool = False) -> list[str]:
    """Text lines drawing ``matrix`` with a ``quiet``-module margin.

    By default light modules are drawn (blocks look light on the usual dark
    terminal background); ``invert`` draws the dark modules instead, for light
    backgrounds.
    """
    size = len(matrix)
    total = size + 2 * quiet

    def ink(r: int, c: int) -> bool:
        r, c = r - quiet, c - quiet
        is_dark = 0 <= r < size and 0 <= c < size and matrix[r][c]
        return is_dark if invert else not is_dark

    lines = []
    for r in range(0, total, 2):
        chars = []
        for c in range(total):
            top = ink(r, c)
            bottom = ink(r + 1, c) if r + 1 < total else False
            chars.append("█" if top and bottom else "▀" if top else "▄" if bottom else " ")
        lines.append("".join(chars))
    return lines


def parse(lines: list[str], *, quiet: int = 2, invert: bool = False) -> Matrix:
    """The modules back from ``render``'s lines (for tests and tools)."""
    rows: list[list[bool]] = []
    for line in lines:
        top = [ch in "█▀" for ch in line]
        bottom = [ch in "█▄" for ch in line]
        rows += [top, bottom]
    ink = rows[: len(lines[0])]
    size = len(ink) - 2 * quiet
    return [[ink[r + quiet][c + quiet] == invert for c in range(size)] for r in range(size)]
