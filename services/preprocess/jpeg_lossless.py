"""pydicom decoder plugin: JPEG Lossless (1.2.840.10008.1.2.4.57 and .70) by libjpeg-turbo.

JPEG Lossless is the usual compression of PACS exports. pydicom's own plugins for it decode a
256x256 16-bit frame in about 4 ms of CPU (pylibjpeg-libjpeg) or 2 ms (gdcm); libjpeg-turbo
(lossless since 3.0, through `imagecodecs`) needs about 0.6 ms. `register()` puts this plugin
first; pydicom tries the others when it raises, so odd streams still get every decoder.
"""

from __future__ import annotations

import importlib.util

from pydicom import uid
from pydicom.pixels import get_decoder

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1",) for syntax in SYNTAXES}
# pydicom's plugins for these syntaxes, re-added after this one (pydicom tries them in order).
_PYDICOM_PLUGINS = {"gdcm": ("pydicom.pixels.decoders.gdcm", "_decode_frame"),
                    "pylibjpeg": ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame")}


def is_available(syntax: str) -> bool:
    # find_spec, not import: imagecodecs is imported on the first frame it decodes.
    return syntax in SYNTAXES and importlib.util.find_spec("imagecodecs") is not None


def _decode_frame(src: bytes, runner) -> bytes:
    from imagecodecs import jpeg8_decode  # libjpeg-turbo; imported here: ~20 ms, JPEG only

    # Greyscale with the container size the dataset declares; anything else (colour, a
    # precision that needs another container) raises, so pydicom hands it to the next plugin.
    if runner.samples_per_pixel != 1:
        raise ValueError("only single-sample (greyscale) images")
    frame = jpeg8_decode(src).tobytes()  # native byte order, row by row as pydicom expects
    if len(frame) != runner.frame_length(unit="bytes"):
        raise ValueError(f"decoded {len(frame)} bytes, the dataset declares "
                         f"{runner.frame_length(unit='bytes')}")
    return frame


_registered = False


def register() -> None:
    """Make this plugin the first JPEG Lossless decoder pydicom tries (once per process).
    Without imagecodecs it is listed among the missing ones and pydicom's plugins decode."""
    global _registered
    if _registered:
        return
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        others = [label for label in decoder.available_plugins if label in _PYDICOM_PLUGINS]
        for label in others:
            decoder.remove_plugin(label)
        decoder.add_plugin(LABEL, (__name__, "_decode_frame"))
        decoder.add_plugins([(label, _PYDICOM_PLUGINS[label]) for label in others])
    _registered = True
