"""The vision worker's media decoding (media.py): limits charged before any decode or render,
and the child process that bounds the time a file may take."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image
from tinyvlm import make_pdf, make_slow_pdf

from mlxrouter import media, protocol
from mlxrouter.errors import InvalidRequest


def png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def pdf_media(data: bytes, **limits) -> protocol.Media:
    return protocol.Media(kind="pdf", data=data, dpi=72, param="messages[0].content[1]",
                          **limits)


def test_pages_over_the_request_budget_are_refused_before_any_render(monkeypatch) -> None:
    import pypdfium2 as pdfium

    def never(*args, **kwargs):
        raise AssertionError("a page was rendered")

    monkeypatch.setattr(pdfium.PdfPage, "render", never)
    two_pages = pdf_media(make_pdf(2, width=1000, height=1000),  # 1 Mpx a page at 72 dpi
                          request_max_pixels=1_500_000)
    with pytest.raises(InvalidRequest, match="max_request_pixels") as caught:
        media.decode_here([two_pages])
    assert caught.value.param == "messages[0].content[1]"
    # one of n choices: the limit it names is its share, and it says so
    shared = pdf_media(make_pdf(3), request_max_images=2, shared_by=2)
    with pytest.raises(InvalidRequest, match=r"max_request_images \(2, this choice's share "
                                             r"of n=2\)"):
        media.decode_here([shared])


def test_decode_all_returns_every_page_and_image_in_order() -> None:
    items = [protocol.Media(kind="image", data=png((40, 30))),
             pdf_media(make_pdf(2, width=144, height=72))]
    decoded = media.decode_all(items, timeout_s=30)
    assert [[im.size for im in pages] for pages in decoded] == [[(40, 30)],
                                                                [(144, 72), (144, 72)]]
    assert decoded[0][0].getpixel((5, 5)) == (10, 200, 30)  # the pixels came back intact


def test_decode_all_passes_the_childs_400_back() -> None:
    with pytest.raises(InvalidRequest, match="encrypted") as caught:
        media.decode_all([pdf_media(make_pdf(1, user_password=True))], timeout_s=30)
    assert caught.value.param == "messages[0].content[1]"


def test_a_file_that_renders_past_the_deadline_is_a_400_and_its_child_is_gone() -> None:
    import psutil

    started = time.monotonic()
    with pytest.raises(InvalidRequest, match=r"media_decode_timeout_s \(1 s\)"):
        media.decode_all([pdf_media(make_slow_pdf(16))], timeout_s=1)
    assert time.monotonic() - started < 10
    assert not [p for p in psutil.Process().children(recursive=True)
                if "mlxrouter.media" in " ".join(p.cmdline())]


def _image_media(im: Image.Image, fmt: str, **save) -> protocol.Media:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return protocol.Media(kind="image", data=buf.getvalue(), param="messages[0].content[1]")


def test_a_photo_with_an_exif_orientation_is_turned_upright() -> None:
    """Phones store photos sideways plus a tag saying how to turn them."""
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    upright = media.decode_image(_image_media(wide, "JPEG", exif=exif, quality=95), "the image")
    assert upright.size == (20, 60)
    r, g, b = upright.getpixel((10, 5))  # the band is now on top
    assert b > 200 and r < 60


def test_a_16_bit_grey_png_keeps_its_grey_levels() -> None:
    import numpy as np

    grey = Image.fromarray(np.full((8, 8), 30000, np.uint16))  # mid grey, mode I;16
    decoded = media.decode_image(_image_media(grey, "PNG"), "the image")
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (117, 117, 117)  # not white
    ramp = Image.fromarray(np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4))
    levels = [media.decode_image(_image_media(ramp, "PNG"), "x").getpixel((i % 4, i // 4))[0]
              for i in range(16)]
    assert levels == list(range(0, 256, 16))


def test_a_pdf_with_no_pages_says_so() -> None:
    import pypdfium2 as pdfium

    buf = io.BytesIO()
    pdfium.PdfDocument.new().save(buf)
    with pytest.raises(InvalidRequest, match=r"has no pages$"):
        media.decode_all([pdf_media(buf.getvalue())], None)


def test_a_decoder_killed_by_a_signal_is_a_server_error_not_the_requests_fault() -> None:
    """The OOM killer (here: SIGKILL from a thread) took the child: the client got a 400
    invalid_request "exited with -9: no message", as if its file were bad."""
    import threading

    import psutil

    from mlxrouter.errors import RouterError

    def kill_the_decoder() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for p in psutil.Process().children(recursive=True):
                if "mlxrouter.media" in " ".join(p.cmdline()):
                    time.sleep(0.3)
                    p.kill()
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_decoder)
    killer.start()
    with pytest.raises(RouterError) as caught:
        media.decode_all([pdf_media(make_slow_pdf(16))], timeout_s=30)
    killer.join()
    assert not isinstance(caught.value, InvalidRequest)
    assert caught.value.status == 500 and "killed by SIGKILL" in caught.value.message
