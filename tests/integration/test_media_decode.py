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
