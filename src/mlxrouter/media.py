"""Decoding a vision request's images and rendering its PDF pages, in a child process that is
killed at a deadline.

The vision worker (vlm_engine) calls `decode_all`, which runs this module as
`python -m mlxrouter.media`: a fresh interpreter with PIL and pypdfium2 only (no MLX; about
70 ms to start). Neither library can be interrupted, and a 3.5 KB PDF of nested form XObjects
takes hours to render, so the only safe bound is a process to kill: past
`media_decode_timeout_s` the request fails with a 400 and the worker's engine thread goes on.
The child applies every limit before the decode or render that would cross it (per image, per
page, and the request-wide `Budget`) and sends back raw RGB pixels; its 400s come back as they
were raised. Imports: stdlib, msgspec, protocol and errors here; PIL and pypdfium2 only inside
the functions the child runs.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from typing import Any

import msgspec

from . import protocol
from .errors import InvalidRequest, RouterError
from .process import die_with_parent

IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
# PNG text chunks (tEXt/zTXt/iTXt) PIL inflates while it reads a header: a 50 KB file can
# otherwise hold 64 MB of them. Metadata is all they carry; images are refused past this.
PNG_TEXT_BYTES = 4 * 2**20


def limit_png_text() -> None:
    """Hold PIL's PNG text inflation to PNG_TEXT_BYTES (process-wide; daemon and child)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES


class Budget:
    """The request-wide totals (images + PDF pages, and their pixels as decoded or rendered),
    charged before each decode or render so that a request over them costs no decoding."""

    def __init__(self, max_images: int = 0, max_pixels: int = 0, shared_by: int = 1) -> None:
        self.max_images = max_images
        self.max_pixels = max_pixels
        # (the limits are one choice's share of the request's: say so, or "16" reads wrong
        # against a configured 32)
        self.share = f", this choice's share of n={shared_by}" if shared_by > 1 else ""
        self.images = 0
        self.pixels = 0

    def charge(self, images: int, pixels: int, what: str, param: str) -> None:
        """Add `images` images of `pixels` pixels in all, or a 400 naming `what` needed."""
        where = f"{param}: " if param else ""
        if self.max_images and self.images + images > self.max_images:
            raise InvalidRequest(
                f"{where}{what} would bring the request to {self.images + images} images "
                f"and PDF pages, more than max_request_images ({self.max_images}{self.share})",
                param=param or None)
        if self.max_pixels and self.pixels + pixels > self.max_pixels:
            raise InvalidRequest(
                f"{where}{what} would bring the request to {self.pixels + pixels} pixels "
                f"(images and rendered PDF pages together), more than max_request_pixels "
                f"({self.max_pixels}{self.share})", param=param or None)
        self.images += images
        self.pixels += pixels


def label_of(media: protocol.Media, index: int) -> str:
    return (f"{'the PDF' if media.kind == 'pdf' else 'the image'} (file {index + 1} of the "
            "request)")


def decode_image(media: protocol.Media, label: str, budget: Budget | None = None) -> Any:
    """An RGB PIL image, upright; refuses too many pixels before decoding (header only
    first)."""
    from PIL import Image, ImageOps

    param = media.param or None
    try:
        with Image.open(io.BytesIO(media.data), formats=IMAGE_FORMATS) as im:
            pixels = im.width * im.height
            if media.max_pixels and pixels > media.max_pixels:
                raise InvalidRequest(f"{label} is {im.width}x{im.height} pixels, more than "
                                     f"max_image_pixels ({media.max_pixels})", param=param)
            if budget is not None:
                budget.charge(1, pixels, f"{label} ({im.width}x{im.height} pixels)",
                              media.param)
            im.seek(0)  # GIF: the first frame
            # A phone photo is stored sideways with an EXIF orientation tag (as mlx-vlm's
            # own loader does, turn it); the full decode happens here.
            return _rgb(ImageOps.exif_transpose(im))
    except RouterError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, far above ours: quote ours
        raise InvalidRequest(f"{label} has more pixels than PIL will even open, far more than "
                             f"max_image_pixels ({media.max_pixels})", param=param) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying corrupt
        raise InvalidRequest(f"{label} is corrupt or not a supported image: {exc}",
                             param=param) from None


def _rgb(im: Any) -> Any:
    """RGB of 8 bits. 16-bit grey (a PNG's I;16) is scaled down first: convert() clips it,
    and a mid-grey image reached the model as white."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("RGB")


def render_pdf(media: protocol.Media, label: str, budget: Budget | None = None) -> list[Any]:
    """Every page of a PDF as an RGB PIL image, in order, at media.dpi. Every page's size is
    read (points x dpi / 72, no rendering) and charged to `budget` before the first render."""
    import pypdfium2 as pdfium

    param = media.param or None
    try:
        pdf = pdfium.PdfDocument(media.data)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise InvalidRequest(f"{label} is encrypted (password-protected); send an "
                                 "unencrypted PDF", param=param) from None
        if "(PDFium: Success)" in str(exc):  # PDFium's word for a document with no pages
            raise InvalidRequest(f"{label} has no pages", param=param) from None
        raise InvalidRequest(f"{label} could not be read as a PDF: {exc}", param=param) from None
    try:
        pages = len(pdf)
        if media.max_pages and pages > media.max_pages:
            raise InvalidRequest(f"{label} has {pages} pages; this server accepts at most "
                                 f"{media.max_pages} pages per PDF (max_pdf_pages)", param=param)
        if pages == 0:
            raise InvalidRequest(f"{label} has no pages", param=param)
        scale = media.dpi / 72  # PDF sizes are in points, 72 to the inch
        sizes = [_page_pixels(pdf, i, scale, media, label) for i in range(pages)]
        if budget is not None:
            budget.charge(pages, sum(w * h for w, h in sizes),
                          f"{label} ({pages} pages at {media.dpi} dpi)", media.param)
        images = []
        for i in range(pages):
            page = pdf[i]
            try:
                images.append(page.render(scale=scale).to_pil().convert("RGB"))
            finally:
                page.close()
        return images
    except pdfium.PdfiumError as exc:
        raise InvalidRequest(f"{label} could not be rendered: {exc}", param=param) from None
    finally:
        pdf.close()


def _page_pixels(pdf: Any, i: int, scale: float, media: protocol.Media,
                 label: str) -> tuple[int, int]:
    """A page's rendered size from its size in points, checked against max_image_pixels."""
    page = pdf[i]
    try:
        width, height = (round(v * scale) for v in page.get_size())
    finally:
        page.close()
    if media.max_pixels and width * height > media.max_pixels:
        raise InvalidRequest(
            f"page {i + 1} of {label} would be {width}x{height} pixels at {media.dpi} dpi, "
            f"more than max_image_pixels ({media.max_pixels})", param=media.param or None)
    return width, height


def decode_here(media: list[protocol.Media]) -> list[list[Any]]:
    """Every medium's RGB images (a PDF gives one per page), in order, under one Budget."""
    if not media:
        return []
    budget = Budget(media[0].request_max_images, media[0].request_max_pixels,
                    media[0].shared_by)
    return [render_pdf(m, label_of(m, i), budget) if m.kind == "pdf"
            else [decode_image(m, label_of(m, i), budget)] for i, m in enumerate(media)]


# ---- the child process and its one call


class Pixels(msgspec.Struct, array_like=True):
    width: int
    height: int
    rgb: memoryview  # decoded as a view into the child's output: no second copy of the pixels


class Decoded(msgspec.Struct):
    images: list[list[Pixels]] = []
    error: str = ""  # an InvalidRequest's message, else ""
    param: str | None = None


def decode_all(media: list[protocol.Media], timeout_s: float) -> list[list[Any]]:
    """`decode_here` in a child process, killed after `timeout_s`: every medium's RGB PIL
    images in order, or the 400 the child raised, or a 400 for running past the deadline."""
    if not media:
        return []
    from PIL import Image

    try:
        done = subprocess.run([sys.executable, "-m", "mlxrouter.media", str(os.getpid())],
                              input=msgspec.msgpack.encode(media), capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise InvalidRequest(
            f"decoding the request's images and PDF pages took longer than "
            f"media_decode_timeout_s ({timeout_s:g} s); the file costs too much to render",
            param="messages") from None
    if done.returncode != 0:  # not the request's fault (a 400 comes back as result.error)
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        rc = done.returncode
        try:
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with {rc}"
        except ValueError:
            how = f"was killed by signal {-rc}"
        raise RouterError(f"the media decoder {how} while decoding this request's images and "
                          f"PDF pages{': ' + tail[0] if tail else ''}; the model is still "
                          f"served, and a retry may succeed")
    result = msgspec.msgpack.decode(done.stdout, type=Decoded)
    if result.error:
        raise InvalidRequest(result.error, param=result.param)
    return [[Image.frombytes("RGB", (p.width, p.height), p.rgb) for p in pages]
            for pages in result.images]


def encode_decoded(decoded: list[list[Any]]) -> bytes:
    """The child's answer: every image's raw RGB, each image closed once copied (the pixels
    are held twice at most, not three times)."""
    rows = []
    for pages in decoded:
        row = []
        while pages:
            im = pages.pop(0)
            row.append(Pixels(im.width, im.height, im.tobytes()))
            im.close()
        rows.append(row)
    return msgspec.msgpack.encode(Decoded(images=rows))


def main() -> int:
    # A decode can run for as long as a file makes it (until the worker's deadline kills it):
    # it must not outlive a worker that ends first, evicted, killed or crashed.
    die_with_parent()
    if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
        return 1  # the worker ended before that was armed
    limit_png_text()
    media = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=list[protocol.Media])
    try:
        out = encode_decoded(decode_here(media))
    except InvalidRequest as exc:
        out = msgspec.msgpack.encode(Decoded(error=exc.message, param=exc.param))
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
