"""Image checks at ingest (thorough) and at train time (cheap), and JPEG re-encoding."""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image, ImageFile, ImageOps

# A truncated image must fail, never be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture camera JPEGs; decoders read the first frame


def inspect_image(data: bytes, *, allow_non_jpeg: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[dict | None, str | None]:
    """Decode-check encoded bytes. Returns ({format, width, height, mode}, None) or (None, reason).

    The header gives format and size (so a decompression bomb is refused before any pixel is
    decoded); then the whole entropy-coded stream is decoded at 1/8 scale (JPEG draft mode), which
    reads every byte, so truncation and corrupt data fail, at a fraction of a full decode's cost.
    """
    if len(data) == 0:
        return None, "zero-byte file"
    saved = Image.MAX_IMAGE_PIXELS
    try:
        # PIL itself refuses > 2x its limit at open; we apply our own limit right after instead.
        Image.MAX_IMAGE_PIXELS = max(max_pixels, saved or 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, (w, h), mode = img.format, img.size, img.mode
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb: {e}"
    except Exception as e:  # PIL raises many types for garbage input
        return None, f"not a decodable image: {describe_error(e)}"
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if w * h > max_pixels:
        return None, f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}"
    if fmt not in JPEG_FORMATS and not allow_non_jpeg:
        return None, f"not JPEG content ({fmt}); use --reshard to re-encode"
    try:
        if fmt in JPEG_FORMATS:
            img.draft(None, (max(1, w // 8), max(1, h // 8)))
        img.load()
    except Exception as e:
        return None, f"decode failed: {describe_error(e)}"
    return {"format": fmt, "width": w, "height": h, "mode": mode}, None


def describe_error(e: Exception) -> str:
    # Drop object reprs ("<_io.BytesIO object at 0x...>"): reasons must be identical across reruns.
    return f"{type(e).__name__}: {re.sub(r' ?<[^>]* at 0x[0-9a-f]+>', '', str(e))}"


def reencode_jpeg(data: bytes, short_side: int, quality: int = 90) -> tuple[bytes, int, int]:
    """RGB JPEG with the short side resized to `short_side` (never upscaled); EXIF orientation applied."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if img.format == "JPEG" and min(w, h) >= 2 * short_side:
        # DCT-domain downscale to >= 2x the target first: much faster, no visible loss after resize.
        img.draft("RGB", (w * 2 * short_side // min(w, h), h * 2 * short_side // min(w, h)))
    img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    s = min(w, h)
    if s > short_side:
        nw, nh = max(1, round(w * short_side / s)), max(1, round(h * short_side / s))
        img = img.resize((nw, nh), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return buf.getvalue(), img.size[0], img.size[1]


def quick_jpeg_ok(data: bytes, expected_size: int) -> bool:
    """Cheap train-time check before bytes reach DALI (a DALI decode error kills the pipeline).

    Size must match the manifest, the stream must start with SOI, and end with EOI (allowing a
    little trailing padding); a file without a visible EOI gets a real PIL decode check instead.
    """
    if len(data) != expected_size or not data.startswith(JPEG_SOI):
        return False
    if JPEG_EOI in data[-64:]:
        return True
    return inspect_image(data)[1] is None
