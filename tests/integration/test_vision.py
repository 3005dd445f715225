"""Images and PDFs through a real vision worker (a tiny random qwen2_vl on mlx-vlm).

One daemon serves the vision model and a text model for the whole module (starting workers is
the slow part on two shared cores); every rejection test also checks that the daemon answers
and that the vision worker is the same process as before.
"""

from __future__ import annotations

import base64
import json
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import Daemon, spawn_daemon, wait_for_gone, write_config
from tinyvlm import build_tiny_qwen2_vl, make_pdf, make_slow_pdf

pytestmark = pytest.mark.timeout(300)

VLM, TEXT, SLOW = "tiny-vlm", "tiny-text", "tiny-vlm-slow"
FORCED = "text-as-vision"  # a text model with supports_vision = true
COLD = "tiny-vlm-cold"  # only asked what it refuses: never loaded
LIMITS = {"max_image_bytes": 300_000, "max_request_media_bytes": 600_000,
          "max_image_pixels": 2_000_000, "max_pdf_pages": 3, "pdf_dpi": 36,
          "max_request_images": 4, "max_request_pixels": 2_500_000,
          "media_decode_timeout_s": 5}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tinyvlm") / "tiny-qwen2-vl")


def _daemon(root: Path, models: dict, server: dict) -> Iterator[Daemon]:
    (root / "models").mkdir(parents=True)
    daemon = spawn_daemon(root, write_config(root, models=models, server=server))
    try:
        yield daemon
    finally:
        daemon.stop()
        leftovers = wait_for_gone(daemon)
        assert not leftovers, f"worker processes left behind: {[p.pid for p in leftovers]}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_vlm: Path, tiny_model: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("vision-daemon")
    yield from _daemon(root, {VLM: {"path": str(tiny_vlm), "max_tokens": 4},
                              TEXT: {"path": str(tiny_model), "max_tokens": 4},
                              FORCED: {"path": str(tiny_model), "max_tokens": 4,
                                       "supports_vision": True},
                              SLOW: {"path": str(tiny_vlm),
                                     "fault": {"delay_per_token_s": 0.05}},
                              COLD: {"path": str(tiny_vlm), "tool_call_format": "hermes"}},
                       LIMITS)


def image_bytes(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (200, 40, 40))
    img.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    if fmt == "GIF":  # two frames: the first one is used
        img.save(buf, "GIF", save_all=True, append_images=[Image.new("RGB", size)])
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, media_type: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data, media_type)}}


def pdf_part(data: bytes) -> dict:
    return {"type": "file", "file": {"filename": "doc.pdf",
                                     "file_data": data_uri(data, "application/pdf")}}


def ask(parts: list[dict], text: str = "Describe this.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def chat(daemon: Daemon, messages: list[dict], model: str = VLM, **extra) -> httpx.Response:
    return daemon.http.post("/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": 3, "temperature": 0, **extra})


def prompt_tokens(daemon: Daemon, messages: list[dict]) -> int:
    r = chat(daemon, messages)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def assert_rejected(daemon: Daemon, resp: httpx.Response, *needles: str) -> dict:
    """A 400 in OpenAI's shape that says what is wrong; daemon and vision worker unharmed."""
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in err["message"], err["message"]
    assert daemon.http.get("/health").status_code == 200
    return err


@pytest.fixture(scope="module")
def vlm_pid(daemon: Daemon) -> int:
    r = chat(daemon, ask([image_part(image_bytes("PNG"))]))
    assert r.status_code == 200, r.text
    return daemon.wait_worker(VLM)


def test_png_and_jpeg_requests_succeed_with_image_tokens_counted(daemon, vlm_pid) -> None:
    client = daemon.openai()
    text_only = client.chat.completions.create(
        model=VLM, messages=ask([]), max_tokens=3, temperature=0)
    for fmt, media_type in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        r = client.chat.completions.create(
            model=VLM, messages=ask([image_part(image_bytes(fmt), media_type)]),
            max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3
        # the image's tokens plus its two vision markers are in the prompt
        assert r.usage.prompt_tokens >= text_only.usage.prompt_tokens + 3
    assert daemon.worker_pid(VLM) == vlm_pid


def test_an_image_request_reports_its_time_in_the_vision_worker(daemon, vlm_pid) -> None:
    r = chat(daemon, ask([image_part(image_bytes("PNG"))]))
    assert r.status_code == 200, r.text
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    # image decoding, the processor, prefill and 3 tokens: never nothing
    assert 0 < float(timing["worker"]) < float(timing["total"])


def test_streaming_image_request_reports_the_same_usage(daemon, vlm_pid) -> None:
    messages = ask([image_part(image_bytes("PNG"))])
    expected = prompt_tokens(daemon, messages)
    stream = daemon.openai().chat.completions.create(
        model=VLM, messages=messages, max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage.prompt_tokens == expected
    assert chunks[-1].usage.completion_tokens == 3


def test_every_pdf_page_becomes_an_image_in_the_prompt(daemon, vlm_pid) -> None:
    base = prompt_tokens(daemon, ask([]))
    one = prompt_tokens(daemon, ask([pdf_part(make_pdf(1))]))
    two = prompt_tokens(daemon, ask([pdf_part(make_pdf(2))]))
    per_page = one - base
    assert per_page >= 3  # image tokens + vision start/end markers
    assert two - one == per_page
    # the same PDF as an image_url data URI is the same prompt
    as_url = [{"type": "image_url",
               "image_url": {"url": data_uri(make_pdf(2), "application/pdf")}}]
    assert prompt_tokens(daemon, ask(as_url)) == two


def test_several_images_per_message_and_per_conversation(daemon, vlm_pid) -> None:
    png = image_part(image_bytes("PNG"))
    base = prompt_tokens(daemon, ask([]))
    one = prompt_tokens(daemon, ask([png]))
    formats = [image_part(image_bytes("WEBP"), "image/webp"),
               image_part(image_bytes("BMP"), "image/bmp"),
               image_part(image_bytes("GIF"), "image/gif")]
    three = prompt_tokens(daemon, ask(formats))
    assert three - base == 3 * (one - base)  # same size: same tokens per image
    conversation = [*ask([png], "First picture."),
                    {"role": "assistant", "content": "A red square."},
                    *ask([png, {**png, "image_url": {**png["image_url"], "detail": "low"}}],
                         "Two more.")]
    r = chat(daemon, conversation)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > three


def test_text_only_request_to_a_vision_model(daemon, vlm_pid) -> None:
    r = chat(daemon, [{"role": "user", "content": "Hello there"}], stop=["zzz"])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_completions_and_several_choices_on_a_vision_model(daemon, vlm_pid) -> None:
    r = daemon.http.post("/v1/completions", json={"model": VLM, "prompt": "Once upon a",
                                                  "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    messages = ask([image_part(image_bytes("PNG"))])
    r = chat(daemon, messages, n=2, temperature=1.0, seed=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens(daemon, messages)  # counted once


def test_a_cancelled_stream_frees_the_engine_for_the_next_request(daemon, vlm_pid) -> None:
    body = {"model": SLOW, "messages": ask([pdf_part(make_pdf(1))]), "max_tokens": 400,
            "stream": True}
    with daemon.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first.startswith("data: ") and '"role":"assistant"' in first
    # 400 tokens at 50 ms would take 20 s; the next request runs only once that one is gone
    r = daemon.http.post("/v1/chat/completions", timeout=15, json={
        "model": SLOW, "messages": ask([image_part(image_bytes("PNG"))]), "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert "finish=cancelled" in daemon.worker_log(SLOW)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a tiny zlib stream of zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("parts, needles", [
    pytest.param([image_part(b"this is not an image at all")],
                 ["not an image in a supported format"], id="garbage"),
    pytest.param([image_part(image_bytes("PNG")[:60])], ["corrupt"], id="truncated-png"),
    pytest.param([image_part(image_bytes("TIFF"), "image/tiff")],
                 ["TIFF images are not supported"], id="tiff"),
    pytest.param([image_part(_png_claiming(10000, 10000))],
                 ["10000x10000", "max_image_pixels"], id="pixel-bomb"),
    pytest.param([image_part(_png_claiming(40000, 40000))], ["max_image_pixels"],
                 id="pixel-bomb-past-pil-limit"),
    pytest.param([image_part(image_bytes("BMP", (400, 300)))], ["max_image_bytes"],
                 id="too-many-bytes"),
    pytest.param([pdf_part(make_pdf(4))], ["has 4 pages", "at most 3"], id="too-many-pages"),
    pytest.param([pdf_part(make_pdf(1, user_password=True))], ["encrypted"], id="encrypted"),
    pytest.param([pdf_part(make_pdf(1, width=60000, height=60000))], ["max_image_pixels"],
                 id="huge-page"),
    pytest.param([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                 ["local files are never read"], id="file-url"),
    pytest.param([{"type": "image_url", "image_url": {"url": "/etc/hosts"}}],
                 ["local files are never read"], id="bare-path"),
    pytest.param([{"type": "image_url", "image_url": {"url": " "}}],
                 ["image_url.url is empty"], id="empty-url"),  # no talk of local files
    pytest.param([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}],
                 ["allow_remote_images"], id="remote-off"),
    pytest.param([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                 ["base64"], id="bad-base64"),
    # the model's own processor refuses it (qwen2-vl: aspect ratio past 200)
    pytest.param([image_part(image_bytes("PNG", (1, 600)))], ["could not be processed"],
                 id="processor-refuses"),
])
def test_bad_media_is_a_clear_400(daemon, vlm_pid, parts, needles) -> None:
    for stream in (False, True):
        err = assert_rejected(daemon, chat(daemon, ask(parts), stream=stream), *needles)
        assert err["param"] and err["param"].startswith("messages")  # where to look
    assert daemon.worker_pid(VLM) == vlm_pid


def test_request_media_total_is_limited(daemon, vlm_pid) -> None:
    big = image_part(image_bytes("BMP", (280, 250)))  # ~210 KB each, under the per-image limit
    err = assert_rejected(daemon, chat(daemon, ask([big, big, big])),
                          "max_request_media_bytes")
    assert err["param"] == "messages[0].content[3]"


def test_image_sent_to_a_text_model_names_the_model(daemon, vlm_pid) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        daemon.openai().chat.completions.create(
            model=TEXT, messages=ask([image_part(image_bytes("PNG"))]), max_tokens=2)
    assert f"model '{TEXT}'" in caught.value.body["message"]
    assert "not a vision model" in caught.value.body["message"]
    r = chat(daemon, [{"role": "user", "content": "still fine?"}], model=TEXT)
    assert r.status_code == 200, r.text


def test_an_image_to_a_text_model_forced_to_vision_is_refused(daemon, vlm_pid) -> None:
    """supports_vision = true on a text model loads it with mlx-vlm, whose processor has no
    image processor: the image was dropped without a word and the model answered anyway."""
    err = assert_rejected(daemon, chat(daemon, ask([image_part(image_bytes("PNG"))]),
                                       model=FORCED), "cannot read images", "supports_vision")
    assert err["param"] == "messages"
    r = chat(daemon, [{"role": "user", "content": "text is fine"}], model=FORCED)
    assert r.status_code == 200, r.text


def test_a_vision_models_text_streams_per_token_and_stops_at_once(daemon, vlm_pid) -> None:
    """mlx-vlm's streaming detokenizer let text out only at a token starting with a space:
    output without spaces came in one piece at the end, and a stop string was found only
    then (the tokens past it generated and billed)."""
    messages = ask([image_part(image_bytes("PNG"))])
    whole = chat(daemon, messages, temperature=0, max_tokens=6).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] == 6 and text
    stopped = chat(daemon, messages, temperature=0, max_tokens=6, stop=[text[0]]).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] <= 2, stopped
    chunks = [c.choices[0].delta.content for c in daemon.openai().chat.completions.create(
        model=SLOW, messages=messages, temperature=0, max_tokens=6, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert "".join(chunks) == text
    assert len(chunks) >= 4, chunks


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),  # named as sent, not as a template var
])
def test_what_a_vision_model_cannot_honour_is_a_400_naming_it(daemon, vlm_pid, extra,
                                                             param) -> None:
    err = assert_rejected(daemon, chat(daemon, ask([image_part(image_bytes("PNG"))]), **extra),
                          f"parameter '{param}' is not supported for vision models")
    assert err["param"] == param
    assert daemon.worker_pid(VLM) == vlm_pid


def test_what_a_vision_model_refuses_never_loads_it_and_is_not_advertised(daemon) -> None:
    """These 400s came from the worker: the model was loaded for them (evicting another
    under max_loaded_models), and /v1/models listed `tools` for a vision model."""
    tool = {"type": "function", "function": {"name": "f"}}
    for extra in ({"tools": [tool]}, {"logprobs": True},
                  {"response_format": {"type": "json_object"}}):
        param = next(iter(extra))
        err = assert_rejected(daemon, chat(daemon, ask([image_part(image_bytes("PNG"))]),
                                           model=COLD, **extra),
                              f"parameter '{param}' is not supported for vision models")
        assert err["param"] == param
    text = daemon.http.post("/v1/completions", json={"model": COLD, "prompt": "hi",
                                                     "logprobs": 1})
    assert text.status_code == 400 and "not supported for vision models" in text.text
    assert daemon.workers().get(COLD, {}).get("pid") in (None, 0), daemon.workers()[COLD]
    served = daemon.http.get(f"/v1/models/{COLD}").json()
    assert "vision" in served["capabilities"] and "tools" not in served["capabilities"]


def test_a_thinking_vision_models_reasoning_never_reaches_content(tmp_path, tiny_vlm) -> None:
    """mlx-vlm's models sent everything as content: the reasoning of a template that opens
    <think> (Qwen3-VL-Thinking style) came back as the answer."""
    import shutil

    thinker = tmp_path / "thinker"
    shutil.copytree(tiny_vlm, thinker)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = thinker / name
        data = json.loads(path.read_text())
        data["chat_template"] = data["chat_template"].replace(
            "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
        assert "<think>" in data["chat_template"]
        path.write_text(json.dumps(data))
    vocab = json.loads((thinker / "tokenizer.json").read_text())
    end = next(t["id"] for t in vocab["added_tokens"] if t["content"] == "</think>")
    yield_ = _daemon(tmp_path / "d", {"thinker": {"path": str(thinker)},
                                      "plain": {"path": str(thinker),
                                                "reasoning_response": "disable"}}, LIMITS)
    daemon = next(yield_)
    try:
        messages = ask([image_part(image_bytes("PNG"))])
        msg = chat(daemon, messages, model="thinker", max_tokens=4, temperature=0,
                   logit_bias={str(end): -100}).json()["choices"][0]["message"]
        assert msg["reasoning_content"] and not msg["content"], msg
        closed = chat(daemon, messages, model="thinker", max_tokens=4, temperature=0,
                      logit_bias={str(end): 100}).json()["choices"][0]["message"]
        assert not closed.get("reasoning_content") and "</think>" not in closed["content"]
        streamed = [c.choices[0].delta for c in daemon.openai().chat.completions.create(
            model="thinker", messages=messages, max_tokens=4, temperature=0, stream=True,
            logit_bias={str(end): -100}) if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in streamed) == (
            msg["reasoning_content"])
        assert not "".join(d.content or "" for d in streamed)
        dropped = chat(daemon, messages, model="plain", max_tokens=4, temperature=0,
                       logit_bias={str(end): -100}).json()["choices"][0]["message"]
        assert not dropped.get("reasoning_content") and not dropped["content"]
    finally:
        next(yield_, None)


def test_images_only_from_the_user(daemon, vlm_pid) -> None:
    messages = [{"role": "system", "content": [image_part(image_bytes("PNG"))]},
                {"role": "user", "content": "hi"}]
    assert_rejected(daemon, chat(daemon, messages), "only allowed in messages with role 'user'")


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = image_bytes("PNG")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.png if self.path.split("?")[0] == "/small.png" else b"x" * 400_000
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_remote_images_when_allowed(tmp_path, tiny_vlm: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for d in _daemon(tmp_path / "remote", {VLM: {"path": str(tiny_vlm)}},
                         {**LIMITS, "allow_remote_images": True,
                          "allow_private_remote_images": True,  # the server is on loopback
                          "remote_image_timeout_s": 5}):
            remote = {"type": "image_url", "image_url": {"url": f"{base}/small.png"}}
            inline = image_part(_ImageHandler.png)
            assert prompt_tokens(d, ask([remote])) == prompt_tokens(d, ask([inline]))
            big = {"type": "image_url", "image_url": {"url": f"{base}/big.png"}}
            assert_rejected(d, chat(d, ask([big])), "max_image_bytes")
            # a signed URL's credentials and token never reach the logs, which only their
            # owner reads
            signed = f"http://alice:s3cr3t@{base[7:]}/small.png?token=abc123"
            assert chat(d, ask([{"type": "image_url", "image_url": {"url": signed}}]),
                        max_tokens=1).status_code == 200
            assert_rejected(d, chat(d, ask([{"type": "image_url", "image_url": {
                "url": f"http://alice:s3cr3t@{base[7:]}/big.png?token=abc123"}}])),
                "max_image_bytes")
            logs = sorted(d.log_dir.glob("*.log"))
            assert len(logs) >= 2
            for log in logs:
                assert "s3cr3t" not in log.read_text() and "abc123" not in log.read_text()
                assert log.stat().st_mode & 0o077 == 0, log
    finally:
        server.shutdown()


# ---- request-wide limits: images + PDF pages, and their pixels as rendered


def test_too_many_images_in_one_request_is_refused_before_decoding(daemon, vlm_pid) -> None:
    png = image_part(image_bytes("PNG"))
    assert chat(daemon, ask([png] * 4)).status_code == 200  # at the limit
    err = assert_rejected(daemon, chat(daemon, ask([png] * 5)), "max_request_images (4",
                          "carries 5 images")
    assert err["param"] == "messages[0].content[5]"
    assert daemon.worker_pid(VLM) == vlm_pid


def test_pdf_pages_count_towards_the_image_limit(daemon, vlm_pid) -> None:
    png = image_part(image_bytes("PNG"))
    for stream in (False, True):  # 2 images + 3 pages: the worker counts the pages
        err = assert_rejected(daemon, chat(daemon, ask([png, png, pdf_part(make_pdf(3))]),
                                           stream=stream),
                              "max_request_images (4)", "to 5 images and PDF pages")
        assert err["param"] == "messages[0].content[3]"
    assert daemon.worker_pid(VLM) == vlm_pid


def test_pdf_pages_over_the_pixel_budget_are_refused_before_rendering(daemon, vlm_pid) -> None:
    # 2000 x 2000 pt at 36 dpi: 1000 x 1000 px a page, under max_image_pixels (2 Mpx) alone
    big = pdf_part(make_pdf(2, width=2000, height=2000))
    assert chat(daemon, ask([big])).status_code == 200  # 2 Mpx: within the 2.5 Mpx budget
    started = time.monotonic()
    err = assert_rejected(daemon, chat(daemon, ask([big, big])), "max_request_pixels (2500000)",
                          "4000000 pixels")
    assert time.monotonic() - started < 5
    assert err["param"] == "messages[0].content[2]"
    # one PDF can be over the budget on its own: two blank 1300 x 1300 px pages
    huge = pdf_part(make_pdf(2, width=2600, height=2600, lines=0))  # 1300 x 1300 px a page
    err = assert_rejected(daemon, chat(daemon, ask([huge])), "max_request_pixels")
    assert err["param"] == "messages[0].content[1]"
    assert daemon.worker_pid(VLM) == vlm_pid


def test_a_pdf_that_would_render_for_hours_is_a_400_at_the_deadline(daemon, vlm_pid) -> None:
    bomb = make_slow_pdf(16)  # 4**16 strokes on one 200 x 200 pt page
    assert len(bomb) < 5000
    started = time.monotonic()
    err = assert_rejected(daemon, chat(daemon, ask([pdf_part(bomb)])),
                          "media_decode_timeout_s (5 s)")
    assert 4.5 < time.monotonic() - started < 30
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    # the engine thread was never stuck: the same worker answers at once
    assert chat(daemon, ask([image_part(image_bytes("PNG"))])).status_code == 200
    assert daemon.worker_pid(VLM) == vlm_pid
    assert not _decoders(vlm_pid)


def test_slow_pdfs_hold_up_no_other_request_to_the_model(daemon, vlm_pid) -> None:
    """Two files that take the whole decode deadline to fail, then a text-only request and an
    image request to the same vision model: those two answer while the PDFs still decode."""
    bomb = pdf_part(make_slow_pdf(16))
    results: dict[str, tuple[int, float]] = {}
    started = time.monotonic()

    def send(name: str, messages: list[dict], delay: float) -> None:
        time.sleep(delay)
        with httpx.Client(base_url=daemon.base_url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json={
                "model": VLM, "messages": messages, "max_tokens": 3, "temperature": 0})
        results[name] = (r.status_code, time.monotonic() - started)

    jobs = [threading.Thread(target=send, args=args) for args in [
        ("pdf1", ask([bomb]), 0.0), ("pdf2", ask([bomb]), 0.0),
        ("text", [{"role": "user", "content": "Hello there"}], 0.5),
        ("image", ask([image_part(image_bytes("PNG"))]), 0.6)]]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert results["pdf1"][0] == results["pdf2"][0] == 400, results
    assert results["text"][0] == results["image"][0] == 200, results
    # the PDFs fail at their 5 s deadline; the others were not queued behind them
    assert results["text"][1] < 4 and results["image"][1] < 4, results
    assert min(results["pdf1"][1], results["pdf2"][1]) > 4.5, results
    assert daemon.worker_pid(VLM) == vlm_pid
    assert not _decoders(vlm_pid)


def test_a_client_that_leaves_while_its_pdf_decodes_gets_nothing_left_behind(
        daemon, vlm_pid) -> None:
    bomb = pdf_part(make_slow_pdf(16))
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(base_url=daemon.base_url, timeout=1.0) as http:
            http.post("/v1/chat/completions", json={"model": VLM, "messages": ask([bomb]),
                                                     "max_tokens": 3, "stream": True})
    # the worker saw the cancel: its next request is served at once, not after the decode
    started = time.monotonic()
    assert chat(daemon, ask([image_part(image_bytes("PNG"))])).status_code == 200
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 10  # the orphaned decode ends at its own deadline
    while _decoders(vlm_pid):
        assert time.monotonic() < deadline, "the media decoder outlived its deadline"
        time.sleep(0.2)
    assert daemon.worker_pid(VLM) == vlm_pid


def test_a_decode_dies_with_its_worker(daemon) -> None:
    """The decoder is the worker's child: a worker killed mid-decode leaves no renderer running
    (it would go on for hours on this file), and the request gets a 502, not a hang."""
    import psutil
    if chat(daemon, ask([image_part(image_bytes("PNG"))]), model=SLOW).status_code != 200:
        pytest.fail("the slow vision model does not answer")
    pid = daemon.wait_worker(SLOW)
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(
        httpx.post(f"{daemon.base_url}/v1/chat/completions", timeout=60, json={
            "model": SLOW, "messages": ask([pdf_part(make_slow_pdf(16))]), "max_tokens": 3})))
    sender.start()
    deadline = time.monotonic() + 4
    while not (decoders := _decoders(pid)):
        assert time.monotonic() < deadline, "no media decoder started"
        time.sleep(0.05)
    psutil.Process(pid).kill()
    gone, alive = psutil.wait_procs(decoders, timeout=5)
    assert not alive, f"media decoders outlived their worker: {[p.pid for p in alive]}"
    sender.join(timeout=30)
    assert result and result[0].status_code == 502, result
    assert result[0].json()["error"]["code"] == "worker_crashed"


def _decoders(pid: int) -> list:
    """The worker's media decoder processes still running (one just ended may be a zombie
    for a moment, until the worker reaps it)."""
    import psutil
    found = []
    for p in _children(pid):
        try:
            if "mlxrouter.media" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _children(pid: int) -> list:
    import psutil
    return psutil.Process(pid).children(recursive=True)


def test_huge_png_header_quotes_our_limit(daemon, vlm_pid) -> None:
    err = assert_rejected(daemon, chat(daemon, ask([image_part(_png_claiming(40000, 40000))])),
                          "max_image_pixels (2000000)")
    assert "DecompressionBomb" not in err["message"] and "89478485" not in err["message"]
    assert err["param"] == "messages[0].content[1]"


@pytest.mark.parametrize("part", [
    pytest.param(pdf_part(make_pdf(1, user_password=True)), id="encrypted"),
    pytest.param(pdf_part(make_pdf(4)), id="too-many-pages"),
    pytest.param(image_part(image_bytes("PNG")[:60]), id="truncated-png"),
])
def test_worker_400s_name_the_content_part(daemon, vlm_pid, part) -> None:
    png = image_part(image_bytes("PNG"))
    messages = [*ask([png], "first"), {"role": "assistant", "content": "ok"},
                *ask([png, part], "second")]
    err = assert_rejected(daemon, chat(daemon, messages))
    assert err["param"] == "messages[2].content[2]"
    assert daemon.worker_pid(VLM) == vlm_pid
