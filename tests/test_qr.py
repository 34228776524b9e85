"""QR codes: the service's encoder against ``qrcode``; the PNG data URL read back like a phone.

``service.domain.qr_symbol`` replaced ``qrcode`` (level M, mask 0, the smallest
version, byte mode) for speed; it must draw the very same modules, at every
version, and the PNG the very same pixels (8 a module, a quiet zone of 4).
"""

from __future__ import annotations

import base64
import io
import random

import pytest
import qrcode
import qrcode.constants
import qrcode.util
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.domain.qr import BORDER, BOX_SIZE, DATA_URL_PREFIX, render_data_url
from service.domain.qr_symbol import encode
from service.engine.simulated import pairing_payload
from sessionmanager_client import terminal_qr

LONGEST = 2331  # bytes a version 40 code holds at level M


def reference(payload: bytes) -> list[bytes]:
    """The modules ``qrcode`` draws for ``payload``, as the service drew them before."""
    code = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_M, border=0, mask_pattern=0
    )
    code.add_data(qrcode.util.QRData(payload, mode=qrcode.util.MODE_8BIT_BYTE))
    code.make(fit=True)
    return [bytes(map(int, row)) for row in code.get_matrix()]


def whatsmeow_like(seed: int) -> str:
    """A payload of whatsmeow's length: a 2@ reference and three base64 keys."""
    rng = random.Random(seed)

    def part(size: int) -> str:
        return base64.b64encode(rng.randbytes(size)).decode()

    return f"2@{part(66)},{part(32)},{part(32)},{part(32)}"


@pytest.mark.parametrize("length", [*range(60), *range(60, LONGEST, 37), LONGEST])
def test_every_version_draws_the_modules_qrcode_draws(length: int) -> None:
    payload = random.Random(length).randbytes(length)
    assert encode(payload).rows() == reference(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_draw_the_modules_qrcode_draws(payload: bytes) -> None:
    assert encode(payload).rows() == reference(payload)


def test_a_payload_too_long_for_any_version_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        encode(bytes(LONGEST + 1))


def _png(data_url: str) -> Image.Image:
    assert data_url.startswith(DATA_URL_PREFIX)
    return Image.open(io.BytesIO(base64.b64decode(data_url.removeprefix(DATA_URL_PREFIX))))


@pytest.mark.parametrize(
    "payload", [pairing_payload("sender_1", 1), whatsmeow_like(1), whatsmeow_like(2), "a"]
)
def test_the_data_url_is_the_png_the_service_drew_before_and_scans(payload: str) -> None:
    image = _png(render_data_url(payload))
    modules = reference(payload.encode())
    side = (len(modules) + 2 * BORDER) * BOX_SIZE
    assert (image.mode, image.size) == ("1", (side, side))

    before = Image.new("1", (len(modules) + 2 * BORDER,) * 2, 1)  # Pillow, one pixel a module
    before.putdata([
        0 if 0 <= r < len(modules) and 0 <= c < len(modules) and modules[r][c] else 1
        for r in range(-BORDER, len(modules) + BORDER)
        for c in range(-BORDER, len(modules) + BORDER)
    ])  # fmt: skip
    before = before.resize((side, side), Image.Resampling.NEAREST)
    assert image.tobytes() == before.tobytes()

    (barcode,) = zxingcpp.read_barcodes(image)
    assert barcode.text == payload
    assert terminal_qr.modules(render_data_url(payload)) == [
        [bool(module) for module in row] for row in modules
    ]
