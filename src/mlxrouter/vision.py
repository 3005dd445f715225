"""Images and PDFs in chat requests, daemon side: cheap checks, then raw bytes to the worker.

Runs on the daemon's event loop; imports no mlx. The gateway never decodes pixels or renders a
page: it decodes base64 (in a thread), enforces byte limits, sniffs the format and reads image
dimensions from the header alone (PIL's lazy open), so a decompression bomb is refused before
anything is decoded. The vision worker decodes and renders (vlm_engine), so a malicious file
can fail its request, never the daemon. http(s) URLs are fetched only when
`allow_remote_images` is set, and then only from public addresses unless
`allow_private_remote_images` is set too (checked on every redirect); local files are never read.

Request-wide limits: the number of parts is checked against `max_request_images` before
anything is decoded, and images' header pixels are summed against `max_request_pixels` here;
the worker keeps the same totals with PDF pages included, before each decode or render.

In the messages a worker receives, each image or file part becomes
`{"type": "image", "media": i}`, i indexing `Request.media` (schemas.message_dicts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import io
import ipaddress
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from . import protocol
from .config import ModelSpec, ServerConfig
from .discovery import vision_capable
from .errors import InvalidRequest
from .media import limit_png_text

log = logging.getLogger(__name__)

# PIL format name -> how users know it. GIF: the first frame is used.
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}
_SUPPORTED = ", ".join(IMAGE_FORMATS.values()) + " or PDF"
# Declared media types worth sniffing; the bytes decide what the file really is.
_DECLARED = ("image/", "application/pdf", "application/octet-stream")
_THREAD_ABOVE_BYTES = 64 * 1024


# ---- which models see images


_capable: dict[str, tuple[float, bool]] = {}  # config.json path -> (mtime, vision?)


def is_vision_model(spec: ModelSpec) -> bool:
    """Per-model `supports_vision` when set, else the model's own config.json (cached by
    mtime). Used by the gateway and, for engine selection, by the worker."""
    if spec.supports_vision is not None:
        return spec.supports_vision
    path = Path(spec.path) / "config.json"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    cached = _capable.get(str(path))
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    capable = isinstance(config, dict) and vision_capable(config)
    _capable[str(path)] = (mtime, capable)
    return capable


# ---- request validation (moved out of schemas.check_supported)


def _kind(part: Any) -> str:
    return type(part).__struct_config__.tag


def _as_text(part: Any) -> Any:
    from .schemas import TextPart

    return TextPart(text=part.refusal)


def check_messages(messages: list[Any]) -> None:
    """Content and content parts of chat messages, before any model is involved: text, images
    (image_url) and files (PDFs) are accepted; images and files only from the user."""
    for i, msg in enumerate(messages):
        if msg.content is None and msg.role != "assistant":
            raise InvalidRequest(f"messages[{i}].content is required for role '{msg.role}'",
                                 param=f"messages[{i}].content")
        if not isinstance(msg.content, list):
            continue
        if not msg.content:
            raise InvalidRequest(f"messages[{i}].content is an empty array; send at least one "
                                 "content part, or a string", param=f"messages[{i}].content")
        for j, part in enumerate(msg.content):
            kind = _kind(part)
            where = f"messages[{i}].content[{j}]"
            if kind == "refusal":
                if msg.role != "assistant":
                    raise InvalidRequest(f"{where}: content of type 'refusal' is only allowed "
                                         f"in messages with role 'assistant', not "
                                         f"'{msg.role}'", param=f"{where}.type")
                msg.content[j] = _as_text(part)  # what the model sees of it
                continue
            if kind not in ("text", "image_url", "file"):
                raise InvalidRequest(f"{where}: content of type '{kind}' is not supported by "
                                     "this server", param=f"{where}.type")
            if kind != "text" and msg.role != "user":
                raise InvalidRequest(f"{where}: content of type '{kind}' is only allowed in "
                                     f"messages with role 'user', not '{msg.role}'",
                                     param=f"{where}.type")
            detail = part.image_url.detail if kind == "image_url" else None
            if detail not in (None, "auto", "low", "high"):
                raise InvalidRequest(f"{where}: image_url.detail must be 'auto', 'low' or "
                                     f"'high', not {detail!r}", param=f"{where}.image_url.detail")


def media_parts(messages: list[Any]) -> Iterator[tuple[str, Any]]:
    """(param path, part) of every image and file part, in the order of Request.media."""
    for i, msg in enumerate(messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if _kind(part) in ("image_url", "file"):
                    yield f"messages[{i}].content[{j}]", part


# ---- the gateway's one call


def refuse_for_vision(req: protocol.Request) -> None:
    """What the vision engine cannot honour (vlm_engine) is a 400 naming it, never silently
    ignored; the gateway asks before the model is loaded for it (which could evict another)."""
    refused = [
        ("logprobs", getattr(req.sampling, "logprobs", False)),
        ("tools", getattr(req, "tools", None)),
        ("response_format", getattr(req, "grammar", None)),
        # reasoning_effort travels among the template variables: name what was sent
        ("reasoning_effort" if set(getattr(req, "template_kwargs", None) or {}) == {
            "reasoning_effort"} else "chat_template_kwargs",
         getattr(req, "template_kwargs", None)),
    ]
    for name, value in refused:
        if value:
            raise InvalidRequest(f"parameter '{name}' is not supported for vision models "
                                 "on this server yet", param=name)


async def collect_media(server: ServerConfig, spec: ModelSpec, messages: list[Any],
                        copies: int = 1) -> list[protocol.Media]:
    """The checked bytes of every image and PDF of a chat request, for Request.media.

    400 for an image sent to a text model, a local path, a remote URL when not allowed, bad
    base64, an unsupported or corrupt format, or any size or pixel limit exceeded. `copies`:
    the worker sequences that will each decode the media (`n` choices); the request-wide
    limits are shared among them, so `n` cannot multiply what one request may cost.
    """
    parts = list(media_parts(messages))
    if not parts:
        return []
    if not is_vision_model(spec):
        why = ("supports_vision = false is set for it" if spec.supports_vision is False else
               "its config.json has no vision_config; set supports_vision = true for it if it "
               "is one")
        raise InvalidRequest(f"model '{spec.id}' does not accept images or files: it is not "
                             f"a vision model ({why})", param=f"{parts[0][0]}.type")
    shared = f" shared by n={copies} choices" if copies > 1 else ""
    max_images = server.max_request_images // copies  # n=16 with one image is 16 decodes
    max_bytes = server.max_request_media_bytes // copies
    max_pixels = server.max_request_pixels // copies
    if len(parts) > max_images:
        where = parts[min(max_images, len(parts) - 1)][0]
        each = (f", decoded once for each of its n={copies} choices ({len(parts) * copies} "
                f"decodes)" if copies > 1 else "")
        raise InvalidRequest(
            f"{where}: the request carries {len(parts)} "
            f"{'image or file' if len(parts) == 1 else 'images and files'}{each}, more than "
            f"max_request_images ({server.max_request_images}{shared}; PDF pages count one "
            f"each)", param=where)
    out: list[protocol.Media] = []
    total = pixels = 0
    deadline = asyncio.get_running_loop().time() + server.remote_image_timeout_s
    for where, part in parts:
        try:
            data = await _part_bytes(server, part, where, deadline)
        except InvalidRequest as exc:  # say which part, as every other 400 here does
            if exc.message.startswith(where):
                raise
            raise InvalidRequest(f"{where}: {exc.message}", param=exc.param) from None
        total += len(data)
        if total > max_bytes:
            raise InvalidRequest(
                f"{where}: the request's images and files add up to more than "
                f"max_request_media_bytes ({server.max_request_media_bytes} bytes{shared})",
                param=where)
        # Off the loop whatever the size: PIL inflates a PNG's text chunks to read its header.
        media = await asyncio.to_thread(inspect_media, data, server, where)
        pixels += media.pixels
        if pixels > max_pixels:
            raise InvalidRequest(
                f"{where}: the request's images add up to {pixels} pixels, more than "
                f"max_request_pixels ({server.max_request_pixels}{shared})", param=where)
        out.append(protocol.Media(
            kind=media.kind, data=media.data, max_pixels=media.max_pixels,
            max_pages=media.max_pages, dpi=media.dpi, param=where,
            request_max_images=max_images, request_max_pixels=max_pixels, shared_by=copies,
            decode_timeout_s=server.media_decode_timeout_s))
    return out


async def _part_bytes(server: ServerConfig, part: Any, where: str, deadline: float) -> bytes:
    if _kind(part) == "file":
        file = part.file
        if "file_data" in file and not isinstance(file["file_data"], str):
            raise InvalidRequest(f"{where}: file.file_data must be a string (a data: URI or "
                                 "base64)", param=f"{where}.file.file_data")
        if "file_id" in file and not isinstance(file.get("file_data"), str):
            raise InvalidRequest(f"{where}: 'file_id' is not supported here; send the file "
                                 "inline as file.file_data (a data: URI or base64)",
                                 param=f"{where}.file.file_id")
        if not isinstance(file.get("file_data"), str):
            raise InvalidRequest(f"{where}: file.file_data is required (the file inline, as a "
                                 "data: URI or base64)", param=f"{where}.file.file_data")
        value = file["file_data"]
        if not value.startswith("data:"):
            return await _b64decode(value, server.max_image_bytes, f"{where}.file.file_data")
        return await decode_data_uri(value, server.max_image_bytes, f"{where}.file.file_data")
    url = part.image_url.url
    param = f"{where}.image_url.url"
    if not url.strip():
        raise InvalidRequest(f"{where}: image_url.url is empty", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return await decode_data_uri(url, server.max_image_bytes, param)
    if scheme in ("http", "https"):
        if not server.allow_remote_images:
            raise InvalidRequest(f"{where}: remote image URLs are not allowed on this server "
                                 "(allow_remote_images is off); send the image as a data: URI",
                                 param=param)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:  # remote_image_timeout_s bounds all of a request's fetches together
            raise InvalidRequest(f"{where}: fetching the request's remote images took longer "
                                 f"than remote_image_timeout_s ({server.remote_image_timeout_s}"
                                 f" s)", param=param)
        return await fetch_remote(url, server.max_image_bytes, left, param,
                                  allow_private=server.allow_private_remote_images)
    why = (f"'{scheme}:' URLs are not fetched" if len(scheme) > 1 and scheme != "file"
           else "local files are never read")  # (C:\\... is a Windows path)
    raise InvalidRequest(f"{where}: image_url must be a data: URI"
                         f"{' or an http(s) URL' if server.allow_remote_images else ''}; "
                         f"{why}", param=param)


async def decode_data_uri(uri: str, limit: int, param: str) -> bytes:
    """The bytes of a base64 `data:` URI of an image or PDF, within `limit` bytes."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InvalidRequest("malformed data: URI (no ',' before the data)", param=param)
    fields = header[5:].split(";")
    media_type = fields[0].strip().lower()
    if "base64" not in (f.strip().lower() for f in fields[1:]):
        raise InvalidRequest("data: URIs of images and files must be base64-encoded "
                             "(data:<type>;base64,...)", param=param)
    if media_type and not media_type.startswith(_DECLARED):
        raise InvalidRequest(f"unsupported media type '{media_type}'; expected an image "
                             f"({_SUPPORTED})", param=param)
    return await _b64decode(payload, limit, param)


async def _b64decode(payload: str, limit: int, param: str) -> bytes:
    # Refused before decoding: base64 carries 3 bytes per 4 characters, and whitespace (line
    # breaks, or spaces and tabs where a client wrapped it so) carries none.
    blanks = sum(payload.count(c) for c in " \t\n\r\f\v")
    if (len(payload) - blanks) * 3 // 4 > limit + 2:
        raise InvalidRequest(f"the image or file is larger than max_image_bytes ({limit} "
                             "bytes)", param=param)
    if len(payload) > _THREAD_ABOVE_BYTES:
        data = await asyncio.to_thread(_b64, payload, param)
    else:
        data = _b64(payload, param)
    if len(data) > limit:
        raise InvalidRequest(f"the image or file is {len(data)} bytes, more than "
                             f"max_image_bytes ({limit} bytes)", param=param)
    if not data:
        raise InvalidRequest("the image or file is empty", param=param)
    return data


def _b64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image or file data is not valid base64", param=param) from None


MAX_REDIRECTS = 3


async def fetch_remote(url: str, limit: int, timeout_s: float, param: str, *,
                       allow_private: bool = False) -> bytes:
    """GET an image within `limit` bytes and `timeout_s` seconds in all (redirects included).

    Redirects are followed here, at most MAX_REDIRECTS, so that every hop's host is resolved
    and checked (public_address) before it is connected to, and the connection goes to the
    address that was checked (no second DNS answer in between). Every failure to get an
    image says the same thing, so a client cannot probe which hosts or ports answer, nor
    which names resolve to private addresses.
    """
    import httpx

    why = ("unreachable, refused, timed out or not HTTP 200" if allow_private else
           "unreachable, refused, timed out, not HTTP 200, or a host name that resolves to a "
           "non-public address while allow_private_remote_images is off")
    failed = InvalidRequest(f"could not fetch the image at {url}: no image came back from it "
                            f"({why})", param=param)
    try:
        async with asyncio.timeout(timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s,
                                         trust_env=False) as client:
                target = httpx.URL(url)
                for _ in range(MAX_REDIRECTS + 1):
                    if target.port is not None and not 0 < target.port < 65536:
                        raise OSError(f"port {target.port} out of range")
                    address = await public_address(target, allow_private, param)
                    location = await _get(client, target, address, limit, url, param)
                    if isinstance(location, bytes):
                        return location
                    target = target.join(location)
                    if target.scheme not in ("http", "https"):
                        raise failed
                log.info("remote image: more than %d redirects url=%s", MAX_REDIRECTS,
                         _logged(url))
                raise InvalidRequest(f"fetching the image at {url} took more than "
                                     f"{MAX_REDIRECTS} redirects", param=param)
    except TimeoutError:
        log.info("remote image: timed out url=%s", _logged(url))
        raise failed from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError, UnicodeError, ValueError,
            OverflowError, ExceptionGroup) as exc:  # (the last two: a connect's own checks)
        log.info("remote image: fetch failed url=%s error=%s", _logged(url),
                 _logged(repr(exc)))
        raise failed from None


def _logged(url: str) -> str:
    """A client's URL as the log shows it: no credentials, query or fragment (signed URLs
    carry tokens there), and no line breaks or other control characters (a forged log line)."""
    import httpx

    try:
        u = httpx.URL(url)
        text = str(u.copy_with(userinfo=b"", query=None, fragment=None)) if u.host else url
    except (httpx.InvalidURL, TypeError, ValueError):
        text = url  # unparsable (a line break, a broken host): cut by hand
    text = text.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = text.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        text = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:300]


async def _get(client: Any, target: Any, address: str, limit: int, url: str,
               param: str) -> bytes | str:
    """One hop, connected to `address`: the body, or the Location of a redirect."""
    pinned = target.copy_with(host=address)
    # identity: httpx would inflate a gzip body on the event loop, 64 KB to 64 MB at a time
    headers = {"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    async with client.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
        if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
            return resp.headers["location"]
        if resp.status_code != 200:
            log.info("remote image: HTTP %d url=%s", resp.status_code, _logged(str(target)))
            raise OSError(f"HTTP {resp.status_code}")
        if resp.headers.get("content-encoding", "identity").lower() != "identity":
            log.info("remote image: compressed body refused url=%s", _logged(str(target)))
            raise OSError("content-encoding")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidRequest(f"the image at {url} is {declared} bytes, more than "
                                 f"max_image_bytes ({limit} bytes)", param=param)
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise InvalidRequest(f"the image at {url} is larger than max_image_bytes "
                                     f"({limit} bytes)", param=param)
            chunks.append(chunk)
        return b"".join(chunks)


_RESOLVER: concurrent.futures.ThreadPoolExecutor | None = None


def _resolver() -> concurrent.futures.ThreadPoolExecutor:
    """Name lookups for remote images run in threads of their own: a lookup outlives the
    timeout that gives up on it (a thread cannot be cancelled), and a slow name server (any
    client can point its own domain at one) filled the loop's default pool, which worker
    starts, grammar compiles and image checks share, for tens of seconds."""
    global _RESOLVER
    if _RESOLVER is None:
        _RESOLVER = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="resolve")
    return _RESOLVER


async def public_address(target: Any, allow_private: bool, param: str) -> str:
    """The address to connect to for `target`'s host: every address it resolves to must be
    public (global unicast) unless `allow_private`, else a 400 that names the setting. An
    IPv4-mapped IPv6 address is judged as the IPv4 address it carries."""
    host = target.host
    if not host:
        raise OSError("no host")
    port = target.port or (443 if target.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().run_in_executor(
        _resolver(), functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError("no address")
    if not allow_private and not all(is_public(a) for a in addresses):
        log.info("remote image: refused non-public address host=%s addresses=%s", host,
                 ",".join(map(str, addresses)))
        if not _is_literal(host):
            # the same 400 as a name that does not resolve: else a client could tell the
            # internal names this server's DNS knows from unknown ones
            raise OSError("non-public address")
        raise InvalidRequest(
            f"remote image URLs must name a public host; '{host}' is a loopback, private, "
            "link-local or otherwise non-public address (allow_private_remote_images is off)",
            param=param)
    return str(addresses[0])


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast: not loopback, private, link-local, reserved, multicast, unspecified
    (nor shared address space or documentation ranges: ipaddress's is_global). IPv4-mapped
    and 6to4 IPv6 addresses are judged by the IPv4 address they carry; site-local is not
    public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # deprecated fec0::/10, still routed on some networks
            return False
        embedded = address.ipv4_mapped or address.sixtofour  # judged as the IPv4 inside
        if embedded is not None:
            address = embedded
    return address.is_global and not (address.is_multicast or address.is_reserved
                                      or address.is_loopback or address.is_link_local
                                      or address.is_private or address.is_unspecified)


# ---- format and size, from headers only


class Inspected(msgspec.Struct, frozen=True, kw_only=True):
    """What inspect_media learnt of one part: its limits for the worker, and its pixels
    (0 for a PDF, whose pages only the worker reads)."""

    kind: str
    data: bytes
    max_pixels: int
    max_pages: int = 0
    dpi: int = 150
    pixels: int = 0


def inspect_media(data: bytes, server: ServerConfig, where: str) -> Inspected:
    """Sniff an image or PDF and check its pixels from the header alone (no decoding)."""
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return Inspected(kind="pdf", data=data, max_pixels=server.max_image_pixels,
                         max_pages=server.max_pdf_pages, dpi=server.pdf_dpi)
    width, height, fmt = image_header(data, where, server.max_image_pixels)
    if width * height > server.max_image_pixels:
        raise InvalidRequest(
            f"{where}: the image is {width}x{height} pixels ({width * height}), more than "
            f"max_image_pixels ({server.max_image_pixels})", param=where)
    log.debug("image %s %dx%d %d bytes", fmt, width, height, len(data))
    return Inspected(kind="image", data=data, max_pixels=server.max_image_pixels,
                     pixels=width * height)


# Formats users send that are not supported, by their magic bytes (for a clearer 400).
_UNSUPPORTED_MAGIC = ((b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"<svg", "SVG"),
                      (b"<?xml", "SVG"), (b"\0\0\0\x0cjP", "JPEG 2000"), (b"8BPS", "PSD"),
                      (b"\0\0\1\0", "ICO"))


def sniff_unsupported(data: bytes) -> str:
    """The name of a known but unsupported image format, else ''."""
    head = data[:64].lstrip()
    if head[4:8] == b"ftyp":  # ISO media: HEIC / AVIF photos
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC"
    return next((name for magic, name in _UNSUPPORTED_MAGIC if head.startswith(magic)), "")


def image_header(data: bytes, where: str, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) read by PIL's lazy open: the header only, never the pixels."""
    from PIL import Image, UnidentifiedImageError

    limit_png_text()
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
            return im.width, im.height, str(im.format)
    except Image.DecompressionBombError:  # PIL's own limit, far above ours: quote ours
        raise InvalidRequest(f"{where}: the image has more pixels than PIL will even open, "
                             f"far more than max_image_pixels ({max_pixels})",
                             param=where) from None
    except UnidentifiedImageError:
        known = sniff_unsupported(data)
        what = f"{known} images are not supported" if known else (
            "the data is not an image in a supported format, or it is corrupt")
        raise InvalidRequest(f"{where}: {what}; send {_SUPPORTED}", param=where) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying corrupt
        raise InvalidRequest(f"{where}: the image is corrupt: {exc}", param=where) from None
