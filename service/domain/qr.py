"""Pairing codes rendered as PNG data URLs (``data:image/png;base64,...``).

``qrcode`` computes the module matrix (with a fixed mask pattern: searching
all eight masks costs more than it gains for a code shown on a screen) and
Pillow encodes it, one pixel per module scaled up, which is several times
faster than drawing each module.
"""

from __future__ import annotations

import base64
import functools
import io

DATA_URL_PREFIX = "data:image/png;base64,"
BOX_SIZE = 8
BORDER = 4


@functools.lru_cache(maxsize=64)
def render_data_url(payload: str) -> str:
    """The QR code of ``payload`` as a PNG data URL a browser can show and a phone can scan."""
    # Imported here: engine workers use the state machine's events but never draw.
    import qrcode
    import qrcode.constants
    from PIL import Image

    code = qrcode.QRCode(
        error_correction=qrcode.constants.ERROR_CORRECT_M, border=BORDER, mask_pattern=0
    )
    code.add_data(payload)
    code.make(fit=True)
    matrix = code.get_matrix()
    size = len(matrix)
    image = Image.new("1", (size, size))
    image.putdata([0 if dark else 1 for row in matrix for dark in row])
    image = image.resize((size * BOX_SIZE, size * BOX_SIZE), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")
