"""pydicom decoder plugin for JPEG by libjpeg-turbo, and the decoders the platform installs.

libjpeg-turbo (3.x, through `imagecodecs`, BSD-3) decodes JPEG Baseline (.50), Extended up to
12-bit samples (.51) and Lossless (.57, .70). Lossless is the usual compression of PACS exports:
pydicom's own plugins decode a 256x256 16-bit frame in about 4 ms of CPU (pylibjpeg-libjpeg,
GPL-3.0, deliberately not installed) or 2 ms (gdcm); libjpeg-turbo needs about 0.6 ms. Pillow
decodes only 8-bit lossy JPEG, so without this plugin 12-bit Extended would not decode at all.
`register()` puts this plugin first; pydicom tries the others when it raises (colour images go
to Pillow), so odd streams still get every decoder that is installed.

`INSTALLED_DECODERS` says which packages of pyproject.toml decode each compressed syntax; the
reader names them when none is importable.
"""

from __future__ import annotations

import importlib.util

from pydicom import uid
from pydicom.pixels import get_decoder

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1",) for syntax in SYNTAXES}
# Permissive licences only: imagecodecs BSD-3 (libjpeg-turbo), pyjpegls MIT (CharLS, BSD-3:
# pydicom's 'pyjpegls' plugin), pylibjpeg + pylibjpeg-openjpeg MIT (pydicom's 'pylibjpeg' plugin).
# RLE and deflate are pydicom's own. Kept equal to pyproject.toml's dependencies (tested).
INSTALLED_DECODERS = {
    **DECODER_DEPENDENCIES,
    **{syntax: ("pyjpegls>=1.2",) for syntax in uid.JPEGLSTransferSyntaxes},
    **{syntax: ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.3")
       for syntax in uid.JPEG2000TransferSyntaxes},
}
# pydicom's plugins for these syntaxes in pydicom's order, re-added after this one (pydicom
# tries them in order).
_PYDICOM_PLUGINS = {"gdcm": ("pydicom.pixels.decoders.gdcm", "_decode_frame"),
                    "pylibjpeg": ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame"),
                    "pillow": ("pydicom.pixels.decoders.pillow", "_decode_frame")}


def is_available(syntax: str) -> bool:
    # find_spec, not import: imagecodecs is imported on the first frame it decodes.
    return syntax in SYNTAXES and importlib.util.find_spec("imagecodecs") is not None


def _decode_frame(src: bytes, runner) -> bytes:
    from imagecodecs import jpeg8_decode  # libjpeg-turbo; imported here: ~20 ms, JPEG only

    # Greyscale only; colour (YCbCr conversions) raises, so pydicom hands it to the next plugin.
    if runner.samples_per_pixel != 1:
        raise ValueError("only single-sample (greyscale) images")
    frame = jpeg8_decode(src)  # uint8 for <= 8-bit samples, uint16 above, native byte order
    if frame.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded {frame.shape}, the dataset declares "
                         f"({runner.rows}, {runner.columns})")
    # An 8-bit stream in a 16-bit container comes back as uint8: pydicom widens it (its own
    # plugins report the decoded size the same way).
    runner.set_option("bits_allocated", 8 * frame.itemsize)
    return frame.tobytes()  # row by row, as pydicom expects


_registered = False


def register() -> None:
    """Make this plugin the first JPEG decoder pydicom tries (once per process). Without
    imagecodecs it is listed among the missing ones and pydicom's plugins decode."""
    global _registered
    if _registered:
        return
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        others = [label for label in _PYDICOM_PLUGINS if label in decoder.available_plugins]
        for label in others:
            decoder.remove_plugin(label)
        decoder.add_plugin(LABEL, (__name__, "_decode_frame"))
        decoder.add_plugins([(label, _PYDICOM_PLUGINS[label]) for label in others])
    _registered = True
