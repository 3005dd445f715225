"""Time to render a 10-page PDF at the default DPI, and the vision worker's peak memory for it.

Usage: python benchmarks/pdf_render.py [--pages 10] [--dpi 150] [--runs 3]

Each measurement runs in a fresh interpreter (with a vision worker's imports for the request),
so peak RSS (getrusage ru_maxrss) is that process's, not this script's. Three figures:
- render: `media.render_pdf` alone (pypdfium2, every page to an RGB PIL image), the
  median of --runs runs, and the peak RSS growth over the process after imports;
- request: one chat request carrying the PDF through a VisionEngine on a tiny random qwen2_vl
  (tests/tinyvlm.py): render (in the worker's decoder child, media.decode_all) + chat template
  + processor + prefill + 4 tokens, and the peak RSS of that process;
- decoder: what the worker's decoder child does for that request (render every page, encode the
  RGB pixels to send back), in a fresh interpreter with the child's imports, and its peak RSS.
A real model adds its weights and a bigger vision-tower prefill.
The PDF is letter-sized, 30 lines of Helvetica text per page (tests/tinyvlm.make_pdf).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, resource, statistics, sys, time
sys.path.insert(0, {tests!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from mlxrouter import protocol
from mlxrouter.media import render_pdf
from tinyvlm import make_pdf

def rss_mb():
    import psutil
    return psutil.Process().memory_info().rss / 2**20

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

pdf = make_pdf({pages}, lines=30)
media = protocol.Media(kind="pdf", data=pdf, dpi={dpi}, max_pages=1000,
                       max_pixels=10**9)
base_rss, base_peak = rss_mb(), peak_mb()
out = {{"pdf_bytes": len(pdf), "rss_after_imports_mb": round(base_rss, 1)}}
if {mode!r} == "render":
    times = []
    for _ in range({runs}):
        t = time.perf_counter()
        images = render_pdf(media, "the PDF")
        times.append(time.perf_counter() - t)
        size = images[0].size
        del images
    out.update(render_s=round(statistics.median(times), 3), runs=times, page_px=size,
               peak_rss_mb=round(peak_mb(), 1),
               peak_growth_mb=round(peak_mb() - base_peak, 1))
elif {mode!r} == "decoder":  # what `python -m mlxrouter.media` does for this request
    from mlxrouter import media as m
    m.limit_png_text()
    t = time.perf_counter()
    payload = m.encode_decoded(m.decode_here([media]))
    out.update(decode_s=round(time.perf_counter() - t, 3), payload_mb=round(len(payload) / 2**20, 1),
               peak_rss_mb=round(peak_mb(), 1), peak_growth_mb=round(peak_mb() - base_peak, 1))
else:
    from mlxrouter.config import ModelSpec
    from mlxrouter.engine import FaultPlan
    from mlxrouter.vlm_engine import VisionEngine
    from tinyvlm import build_tiny_qwen2_vl
    path = build_tiny_qwen2_vl(__import__("pathlib").Path({model!r}))
    msgs = []
    engine = VisionEngine(ModelSpec(id="bench", path=str(path)), msgs.append, FaultPlan({{}}))
    engine.load()
    loaded_peak = peak_mb()
    t = time.perf_counter()
    engine.submit(protocol.Request(
        rid=1, sampling=protocol.SamplingParams(max_tokens=4, temperature=0),
        messages=[{{"role": "user", "content": [{{"type": "text", "text": "Summarise."}},
                                               {{"type": "image", "media": 0}}]}}],
        media=[media]))
    prepared = time.perf_counter() - t
    while engine.active:
        engine.step()
    total = time.perf_counter() - t
    end = msgs[-1]
    assert isinstance(end, protocol.End), end
    out.update(prepare_s=round(prepared, 3), request_s=round(total, 3),
               prompt_tokens=end.prompt_tokens, peak_rss_mb=round(peak_mb(), 1),
               peak_growth_mb=round(peak_mb() - loaded_peak, 1))
print(json.dumps(out))
"""


def measure(mode: str, pages: int, dpi: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = _CHILD.format(tests=str(REPO / "tests"), pages=pages, dpi=dpi, runs=runs,
                             mode=mode, model=str(Path(tmp) / "tiny-vlm"))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--dpi", type=int, default=None,
                        help="default: [server] pdf_dpi's default")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.dpi is None:
        sys.path.insert(0, str(REPO / "src"))
        from mlxrouter.config import ServerConfig

        args.dpi = ServerConfig().pdf_dpi
    render = measure("render", args.pages, args.dpi, args.runs)
    decoder = measure("decoder", args.pages, args.dpi, 1)
    request = measure("request", args.pages, args.dpi, 1)
    w, h = render["page_px"]
    print(f"{args.pages}-page letter PDF ({render['pdf_bytes']} bytes) at {args.dpi} dpi "
          f"({w}x{h} px per page)")
    print("| measurement | time | peak RSS of the process | growth over its baseline |")
    print("|---|---|---|---|")
    print(f"| render_pdf (median of {args.runs}) | {render['render_s']:.2f} s | "
          f"{render['peak_rss_mb']:.0f} MB | {render['peak_growth_mb']:.0f} MB over "
          f"{render['rss_after_imports_mb']:.0f} MB after imports |")
    print(f"| whole request, tiny qwen2_vl ({request['prompt_tokens']} prompt tokens) | "
          f"{request['request_s']:.2f} s (prepare {request['prepare_s']:.2f} s) | "
          f"{request['peak_rss_mb']:.0f} MB | {request['peak_growth_mb']:.0f} MB over the "
          "loaded worker |")
    print(f"| the worker's decoder child for it (`python -m mlxrouter.media`: render + "
          f"{decoder['payload_mb']:.0f} MB of RGB to send) | {decoder['decode_s']:.2f} s | "
          f"{decoder['peak_rss_mb']:.0f} MB | {decoder['peak_growth_mb']:.0f} MB over its "
          f"{decoder['rss_after_imports_mb']:.0f} MB after imports |")


if __name__ == "__main__":
    main()
