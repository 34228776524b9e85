"""The modules of a QR code (ISO/IEC 18004): byte mode, error correction level M, mask 0.

This is the symbol ``qrcode`` drew for the service before (``ERROR_CORRECT_M``,
``mask_pattern=0``, the smallest version that holds the payload), module for
module (``tests/test_qr.py`` checks it against ``qrcode``), computed in a
fraction of the time: everything a version shares (the function patterns, the
format and version information, the order in which data modules are placed and
the mask over them) is laid out once per version, so a new code costs its
Reed-Solomon codewords and one pass over its data modules.

A fixed mask: searching all eight for the lowest penalty costs more than it
gains for a code shown on a screen.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

# Error correction level M, versions 1 to 40: codewords of error correction per
# block, and blocks (ISO/IEC 18004, table 9).
ECC_PER_BLOCK = (10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26,
                 26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28,
                 28, 28)  # fmt: skip
BLOCKS = (1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17, 18, 20, 21,
          23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)  # fmt: skip
LEVEL_M = 0b00  # the level's two bits in the format information
MASK = 0  # (row + column) even: the module is inverted
BYTE_MODE = 0b0100
PADDING = b"\xec\x11"
ASCII_BITS = bytes.maketrans(b"01", b"\x00\x01")

# Draws one function module: column, row, dark or not.
PutModule = Callable[[int, int, bool], None]


def _powers_and_logarithms() -> tuple[list[int], list[int]]:
    """GF(256) over x^8 + x^4 + x^3 + x^2 + 1: the powers of 2, and the logarithms.

    The powers are listed twice over, so that a sum of two logarithms needs no modulo.
    """
    powers, logarithms = [0] * 512, [0] * 256
    value = 1
    for power in range(255):
        powers[power] = powers[power + 255] = value
        logarithms[value] = power
        value <<= 1
        if value & 0x100:
            value ^= 0x11D
    return powers, logarithms


EXP, LOG = _powers_and_logarithms()


@dataclass(frozen=True)
class Symbol:
    """A QR code: ``size`` modules a side, row by row, 1 for a dark module and 0 for a light one."""

    size: int
    modules: bytes

    def rows(self) -> list[bytes]:
        """The rows of modules, top to bottom."""
        size = self.size
        return [self.modules[start : start + size] for start in range(0, size * size, size)]


def encode(payload: bytes) -> Symbol:
    """The QR code of ``payload`` at the smallest version that holds it; ValueError if none does."""
    version = _version_for(len(payload))
    layout = _layout(version)
    codewords = _with_error_correction(_data_codewords(payload, version), version)
    count = layout.data_modules
    bits = int.from_bytes(codewords) << (count - 8 * len(codewords))  # remainder bits: 0
    data = f"{bits ^ layout.mask:0{count}b}".encode().translate(ASCII_BITS)
    return Symbol(17 + 4 * version, bytes(layout.gather(data + layout.function_modules)))


def _raw_modules(version: int) -> int:
    """The modules of ``version`` left for data and error correction, remainder bits included."""
    modules = (16 * version + 128) * version + 64
    if version >= 2:
        aligned = version // 7 + 2
        modules -= (25 * aligned - 10) * aligned - 55
        if version >= 7:
            modules -= 36
    return modules


def _data_capacity(version: int) -> int:
    """The data codewords ``version`` holds at level M."""
    return _raw_modules(version) // 8 - ECC_PER_BLOCK[version - 1] * BLOCKS[version - 1]


def _count_bits(version: int) -> int:
    """The width of byte mode's character count in ``version``."""
    return 8 if version < 10 else 16


def _version_for(length: int) -> int:
    """The smallest version whose data codewords hold ``length`` bytes in byte mode."""
    for version in range(1, 41):
        if 4 + _count_bits(version) + 8 * length <= 8 * _data_capacity(version):
            return version
    raise ValueError(f"{length} bytes do not fit in a QR code at error correction level M")


def _data_codewords(payload: bytes, version: int) -> bytes:
    """Mode, count, payload and terminator, then the pad codewords up to the version's capacity.

    The mode and count take 12 or 20 bits, so with the 4-bit terminator the bits
    end on a byte boundary.
    """
    count_bits = _count_bits(version)
    header = (BYTE_MODE << count_bits | len(payload)) << 8 * len(payload)
    bits = (header | int.from_bytes(payload)) << 4
    data = bits.to_bytes((4 + count_bits + 8 * len(payload) + 4) // 8)
    pad = _data_capacity(version) - len(data)
    return data + PADDING * (pad // 2) + PADDING[: pad % 2]


def _with_error_correction(data: bytes, version: int) -> bytes:
    """The data split into blocks, each followed by its error correction, interleaved."""
    blocks, degree = BLOCKS[version - 1], ECC_PER_BLOCK[version - 1]
    total = _raw_modules(version) // 8
    short = blocks - total % blocks  # the first ``short`` blocks hold one data codeword fewer
    short_length = total // blocks - degree
    pieces, start = [], 0
    for block in range(blocks):
        length = short_length + (block >= short)
        pieces.append(data[start : start + length])
        start += length
    corrections = [_remainder(piece, degree) for piece in pieces]
    return b"".join([
        # Column by column as far as the short blocks go, then the long blocks' last codewords.
        bytes(chain.from_iterable(zip(*pieces, strict=False))),
        bytes(piece[-1] for piece in pieces[short:]),
        bytes(chain.from_iterable(zip(*corrections, strict=True))),
    ])  # fmt: skip


def _multiply(a: int, b: int) -> int:
    """The product of ``a`` and ``b`` in GF(256)."""
    return EXP[LOG[a] + LOG[b]] if a and b else 0


@functools.cache
def _generator_logs(degree: int) -> tuple[int, ...]:
    """The logarithms of the Reed-Solomon generator's coefficients, highest first.

    The generator is the product of (x - 2^i) for i below ``degree``. Its leading
    coefficient, 1, is left out; none of the others is 0.
    """
    coefficients = [0] * (degree - 1) + [1]
    root = 1
    for _ in range(degree):
        for j in range(degree):
            coefficients[j] = _multiply(coefficients[j], root)
            if j + 1 < degree:
                coefficients[j] ^= coefficients[j + 1]
        root = _multiply(root, 2)
    return tuple(LOG[coefficient] for coefficient in coefficients)


@functools.cache
def _generator_products(degree: int) -> tuple[int, ...]:
    """For each byte value, the generator times it, as one integer of ``degree`` bytes.

    The generator's leading 1 is left out.
    """
    logs = _generator_logs(degree)
    products = [0]
    for factor in range(1, 256):
        shift = LOG[factor]
        products.append(int.from_bytes(bytes(EXP[shift + g] for g in logs)))
    return tuple(products)


def _remainder(data: bytes, degree: int) -> bytes:
    """The ``degree`` error correction codewords of a block: data times x^degree mod the generator.

    The remainder is held as one integer of ``degree`` bytes: each data byte
    shifts it by a byte and subtracts (XOR) the generator times the byte shifted out.
    """
    products = _generator_products(degree)
    top = 8 * (degree - 1)
    keep = (1 << 8 * degree) - 1
    remainder = 0
    for byte in data:
        remainder = (remainder << 8 & keep) ^ products[byte ^ remainder >> top]
    return remainder.to_bytes(degree)


def _bch(value: int, generator: int, degree: int) -> int:
    """``value`` followed by its BCH remainder of ``degree`` bits (format, version information)."""
    remainder = value
    for _ in range(degree):
        remainder = (remainder << 1) ^ ((remainder >> (degree - 1)) * generator)
    return value << degree | remainder


def _alignment_centres(version: int) -> list[int]:
    """The rows (and columns) of the alignment patterns' centres."""
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    last = 17 + 4 * version - 7
    return [6, *sorted(last - n * step for n in range(count - 1))]


@dataclass(frozen=True)
class Layout:
    """What every symbol of one version shares.

    ``data_modules`` counts the modules that hold codeword (and remainder) bits;
    ``mask`` holds the mask's bit for each of them, in placement order, as one
    integer, the first module's bit highest. ``function_modules`` are the values
    of the others (the patterns and the format and version information).
    ``gather`` picks the symbol's modules, row by row, from the data modules'
    values in placement order followed by ``function_modules``.
    """

    data_modules: int
    mask: int
    function_modules: bytes
    gather: Callable[[bytes], tuple[int, ...]]


@functools.cache
def _layout(version: int) -> Layout:
    """Draw what every symbol of ``version`` shares, and find where its data modules go."""
    size = 17 + 4 * version
    dark = bytearray(size * size)
    reserved = bytearray(size * size)

    def put(column: int, row: int, is_dark: bool) -> None:
        dark[row * size + column] = is_dark
        reserved[row * size + column] = 1

    for i in range(size):  # the timing patterns; the finders and alignments cover their ends
        put(6, i, i % 2 == 0)
        put(i, 6, i % 2 == 0)
    for column, row in ((3, 3), (size - 4, 3), (3, size - 4)):  # finders with their separators
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                if 0 <= column + dx < size and 0 <= row + dy < size:
                    put(column + dx, row + dy, max(abs(dx), abs(dy)) not in (2, 4))
    centres = _alignment_centres(version)
    corners = {(0, 0), (0, len(centres) - 1), (len(centres) - 1, 0)}  # under the finders
    for i, row in enumerate(centres):
        for j, column in enumerate(centres):
            if (i, j) not in corners:
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        put(column + dx, row + dy, max(abs(dx), abs(dy)) != 1)
    _draw_format(put, size)
    if version >= 7:
        _draw_version(put, size, version)
    order = _placement_order(size, reserved)
    mask = 0
    for index in order:
        mask = mask << 1 | ((index // size + index % size) % 2 == 0)
    source = [0] * (size * size)  # where each module's value is in ``gather``'s argument
    for position, index in enumerate(order):
        source[index] = position
    function_modules = [index for index in range(size * size) if reserved[index]]
    for position, index in enumerate(function_modules, start=len(order)):
        source[index] = position
    values = bytes(dark[index] for index in function_modules)
    return Layout(len(order), mask, values, operator.itemgetter(*source))


def _draw_format(put: PutModule, size: int) -> None:
    """The format information (level M, mask 0) in its two copies, and the dark module."""
    bits = _bch(LEVEL_M << 3 | MASK, 0x537, 10) ^ 0x5412

    def bit(i: int) -> bool:
        return bool(bits >> i & 1)

    for i in range(6):
        put(8, i, bit(i))
    put(8, 7, bit(6))
    put(8, 8, bit(7))
    put(7, 8, bit(8))
    for i in range(9, 15):
        put(14 - i, 8, bit(i))
    for i in range(8):
        put(size - 1 - i, 8, bit(i))
    for i in range(8, 15):
        put(8, size - 15 + i, bit(i))
    put(8, size - 8, True)


def _draw_version(put: PutModule, size: int, version: int) -> None:
    """The version information, in the two 6 x 3 blocks beside the finders (versions 7 and up)."""
    bits = _bch(version, 0x1F25, 12)
    for i in range(18):
        is_dark = bool(bits >> i & 1)
        put(size - 11 + i % 3, i // 3, is_dark)
        put(i // 3, size - 11 + i % 3, is_dark)


def _placement_order(size: int, reserved: bytearray) -> list[int]:
    """The data modules' indices in the order codeword bits fill them.

    Two columns at a time from the right, up then down in turn, skipping the
    vertical timing pattern's column.
    """
    order = []
    for pair in range(size - 1, 0, -2):
        right = pair - 1 if pair <= 6 else pair  # left of the timing pattern, shifted by one
        upward = (right + 1) & 2 == 0
        for step in range(size):
            row = size - 1 - step if upward else step
            for column in (right, right - 1):
                if not reserved[row * size + column]:
                    order.append(row * size + column)
    return order
