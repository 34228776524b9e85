"""Pairing codes rendered as PNG data URLs (``data:image/png;base64,...``)."""

from __future__ import annotations

import base64
import io

import qrcode
import qrcode.constants
from qrcode.image.pure import PyPNGImage

DATA_URL_PREFIX = "data:image/png;base64,"
BOX_SIZE = 8
BORDER = 4


def render_data_url(payload: str) -> str:
    """The QR code of ``payload`` as a PNG data URL a browser can show and a phone can scan."""
    code = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_M,
        box_size=BOX_SIZE,
        border=BORDER,
        image_factory=PyPNGImage,
    )
    code.add_data(payload)
    code.make(fit=True)
    buffer = io.BytesIO()
    code.make_image().save(buffer)
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")
