"""The `mlxrouter` command: serve, ctl, models, service, bench.

Runs in the user's shell. `serve` becomes the daemon (so nothing here imports mlx at module
level); `models import-gguf` may import mlx, since it is not the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return value


def _host(text: str) -> str:
    if not text.strip():  # "" would bind every interface without saying so
        raise argparse.ArgumentTypeError("an empty host would listen on every interface; "
                                         "give 0.0.0.0 or :: for that, or 127.0.0.1")
    return text


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, host=getattr(args, "host", None),
                           port=getattr(args, "port", None),
                           model_dir=getattr(args, "model_dir", None))
    except ConfigError as exc:
        print(f"mlxrouter: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    # Until the daemon's event loop takes the signals over (daemon.Daemon._run): a reload has
    # nothing to reload yet (by default SIGHUP ended the process without a word), and a
    # Ctrl-C is a quiet stop, not a KeyboardInterrupt traceback.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, _stop_quietly)
    from . import daemon

    def load_again():
        return load_config(args.config, host=args.host, port=args.port,
                           model_dir=args.model_dir)

    return daemon.run(_load(args), args.log_level, reload=load_again)


def _stop_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _daemon_states(config) -> dict[str, str] | None:
    """Worker states of a running daemon (for the LOADED column), None when none answers."""
    import httpx

    from .daemon import local_url, read_lock_info

    info = read_lock_info(config.run_dir)
    if not info.get("port"):
        return None
    headers = ({"Authorization": f"Bearer {config.server.admin_key}"}
               if config.server.admin_key else {})
    try:
        resp = httpx.get(f"{local_url(info)}/admin/status", headers=headers, timeout=2)
        if resp.status_code != 200:  # a wrong admin key: states unknown, not all STOPPED
            return None
        return {w["model"]: w["state"] for w in resp.json()["workers"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _size(n: int | None, unit: str = "B") -> str:
    """Bytes in units of 1024 ("GB" meaning GiB, as in the config's *_gb keys and the memory
    messages, so a model reads the same size everywhere); counts (unit "") in units of 1000."""
    if not n:
        return "-"
    step = 1024 if unit == "B" else 1000
    for prefix in ("", "K", "M", "G", "T"):
        if n < step or prefix == "T":
            return f"{n:.0f}{prefix}{unit}" if prefix == "" else f"{n:.1f}{prefix}{unit}"
        n /= step
    return "-"


def cmd_models_list(args: argparse.Namespace) -> int:
    from .library import list_rows

    config = _load(args)
    rows = list_rows(config, _daemon_states(config))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {config.model_directory}")
        return 0
    print(f"{'ID':40s} {'STATE':8s} {'ARCH':24s} {'QUANT':16s} {'PARAMS':>7s} {'WEIGHTS':>8s} "
          f"{'EST.MEM':>8s} {'CONTEXT':>7s} {'CAPABILITIES':26s} SOURCE")
    for r in rows:
        if not r["usable"]:
            print(f"{r['id']:40s} unusable: {r['reason']}"
                  + (f" ({r['path']})" if r["path"] else ""))
            continue
        print(f"{r['id']:40s} {(r['state'] or '-'):8s} {r['architecture'][:24]:24s} "
              f"{r['quantization'][:16]:16s} {_size(r['parameters'], ''):>7s} "
              f"{_size(r['weights_bytes']):>8s} {_size(r['estimated_memory_bytes']):>8s} "
              f"{r['context_length'] or '-'!s:>7s} {','.join(r['capabilities']):26s} "
              f"{r['source']}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from .library import LibraryError, pull

    config = _load(args)
    from .discovery import scan

    # the same id in another directory of the model directory (org/name, a linked
    # models--org--name): the pull would be hidden behind it, or hide it
    existing = scan(config.model_directory).get(args.repo)
    target = (config.model_directory / args.repo.replace("/", "--")).resolve()
    if existing is not None and not Path(existing.path).resolve().is_relative_to(target):
        print(f"mlxrouter: pull failed: there is a model '{args.repo}' already, at "
              f"{existing.path}; remove it first (mlxrouter models rm {shlex.quote(args.repo)}"
              f"), or use that copy", file=sys.stderr)
        return 1
    try:
        path = pull(args.repo, config.model_directory, revision=args.revision)
    except LibraryError as exc:
        print(f"mlxrouter: pull failed: {exc}", file=sys.stderr)
        return 1
    print(f"pulled {args.repo} -> {path}")
    return 0


def cmd_models_link(args: argparse.Namespace) -> int:
    from .discovery import sources_for
    from .library import LibraryError, link_into_lmstudio, link_into_model_directory

    config = _load(args)
    try:
        if args.lmstudio:
            target = config.supervisor.lmstudio_dir
            if not target:
                print("mlxrouter: no LM Studio models directory (set lmstudio_dir)",
                      file=sys.stderr)
                return 1
            lines = link_into_lmstudio(config.model_directory, Path(target), args.names,
                                       tuple(s.root.resolve() for s in sources_for(config)))
        else:
            lines = link_into_model_directory(config.model_directory, sources_for(config),
                                              args.names)
    except LibraryError as exc:
        print(f"mlxrouter: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines) if lines else "nothing to link")
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    from . import discovery
    from .library import LibraryError, dir_bytes, remove, removal_target

    config = _load(args)
    model = discovery.scan(config.model_directory).get(args.name)
    if model is None:
        print(f"mlxrouter: no model '{args.name}' in {config.model_directory}", file=sys.stderr)
        return 1
    target = removal_target(config.model_directory, model)
    what = "unlink" if target.is_symlink() else f"delete ({_size(dir_bytes(target))})"
    if not args.yes:
        try:
            answer = input(f"{what} {target}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not removed")
            return 1
    try:
        path, done = remove(config.model_directory, args.name)
    except (LibraryError, OSError) as exc:
        print(f"mlxrouter: rm failed: {exc}", file=sys.stderr)
        return 1
    print(f"{done} {path}")
    # another directory of the same id (`org--name` and `org/name`), or another source (the
    # HF cache, LM Studio): the daemon serves that copy from now on
    still = discovery.scan_sources(discovery.sources_for(config)).get(args.name)
    if still is not None and still.usable:
        print(f"note: '{args.name}' is still served, from {still.path} ({still.source})")
    return 0


def cmd_models_tune(args: argparse.Namespace) -> int:
    from .tune import TuneError, tune

    config = _load(args)
    try:
        contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
        if contexts is not None and min(contexts) < 1:
            raise ValueError("sizes must be at least 1 token")  # 0 measured nothing
    except ValueError:
        print(f"mlxrouter: --contexts takes token counts separated by commas, e.g. "
              f"512,2048 (got {args.contexts!r})", file=sys.stderr)
        return 2
    try:
        result = tune(config, args.name, contexts=contexts,
                      workers_dir=Path(args.workers_dir) if args.workers_dir else None)
    except TuneError as exc:
        print(f"mlxrouter: tune failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import msgspec

        print(msgspec.json.encode(result).decode())
        return 0
    print(f"{result.model}: load {result.load_s:.2f}s, "
          f"{_size(result.memory_after_load_bytes)} after load, "
          f"{_size(result.bytes_per_1k_tokens)} per 1K tokens measured "
          f"({_size(result.bytes_per_1k_tokens_config)} from its config)")
    for p in result.points:
        print(f"  prompt {p.prompt_tokens:6d} tokens: decode "
              f"{p.decode_tokens_per_s or 0:.1f} tok/s, peak {_size(p.peak_bytes)}")
    print(f"wrote {result.worker_file}: {json.dumps(result.values)}")
    return 0


_QUANT_TAG = re.compile(r"(?i)(i?q\d\w*|f16|f32|bf16|fp16|fp32)")


def gguf_model_name(path: Path) -> str:
    """The default model name of a GGUF file: its name without .gguf, lowercased, and without
    a trailing quantization tag after a dot ("llama-2-7b.Q4_K_M.gguf" is llama-2-7b); dots
    inside the name stay ("Qwen2.5-0.5B-Instruct-Q8_0.gguf" is qwen2.5-0.5b-instruct-q8_0)."""
    stem = path.name.removesuffix(".gguf").removesuffix(".GGUF")
    head, dot, tag = stem.rpartition(".")
    if dot and head and _QUANT_TAG.fullmatch(tag):
        stem = head
    return stem.lower()


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from .gguf import GGUFImportError, import_gguf

    config = _load(args)
    gguf_path = Path(args.file).expanduser()
    name = args.name or gguf_model_name(gguf_path)
    parts = name.split("/")
    if args.name and not (len(parts) <= 2 and all(
            p and not p.startswith(".") and "\\" not in p for p in parts)):
        # (`../x` or `/abs` wrote outside the model directory)
        print(f"mlxrouter: --name takes a model id (NAME or ORG/NAME), not {name!r}; "
              "--out takes any directory", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser() if args.out else config.model_directory / name
    if not args.out:
        from .discovery import scan_sources, sources_for

        # the id discovery will give it: "org--x" is org/x (next to org/x, one would hide
        # the other)
        model_id = name if "/" in name else name.replace("--", "/", 1)
        existing = scan_sources(sources_for(config)).get(model_id)
        if existing is not None:
            where = (" --config " + shlex.quote(args.config) if args.config else "") + (
                " --model-dir " + shlex.quote(args.model_dir) if args.model_dir else "")
            remedy = (f", or remove it first (mlxrouter models rm {shlex.quote(model_id)}"
                      f"{where})" if existing.source == "model_directory" else "")
            print(f"mlxrouter: import failed: there is a model '{model_id}' already "
                  f"({existing.path}, {existing.source}); choose another --name{remedy}",
                  file=sys.stderr)
            return 2
    try:
        summary = import_gguf(gguf_path, out)
    except (GGUFImportError, OSError) as exc:
        print(f"mlxrouter: import failed: {exc}", file=sys.stderr)
        return 2
    print(f"imported {gguf_path.name} -> {out} ({json.dumps(summary)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxrouter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon (gateway, broker, supervisor)")
    serve.add_argument("--config", help="supervisor.toml or the seed's config.json")
    serve.add_argument("--host", type=_host)
    serve.add_argument("--port", type=_port, help="0 to 65535 (0: any free port)")
    serve.add_argument("--model-dir")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="default: info, or debug when [server] debug = true")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="model library")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list", help="models found in the model directory")
    mlist.add_argument("--json", action="store_true")
    mlist.add_argument("--config")
    mlist.add_argument("--model-dir")
    mlist.set_defaults(func=cmd_models_list)
    imp = msub.add_parser("import-gguf", help="turn a llama-family GGUF into an MLX model dir")
    imp.add_argument("file")
    imp.add_argument("--name", help="model dir name (default: from the file name)")
    imp.add_argument("--out", help="output dir (default: <model_directory>/<name>)")
    imp.add_argument("--config")
    imp.add_argument("--model-dir")
    imp.set_defaults(func=cmd_import_gguf)
    pull = msub.add_parser("pull", help="download a model from the Hugging Face Hub")
    pull.add_argument("repo", help="org/name")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    link = msub.add_parser("link", help="symlink models of the HF cache / LM Studio into the "
                                        "model directory (or, with --lmstudio, the other way)")
    link.add_argument("names", nargs="*", help="model ids (default: all)")
    link.add_argument("--lmstudio", action="store_true",
                      help="link the model directory's models into LM Studio's")
    rm = msub.add_parser("rm", help="remove a model from the model directory")
    rm.add_argument("name")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask")
    tune = msub.add_parser("tune", help="measure a model and write workers/NAME.toml")
    tune.add_argument("name")
    tune.add_argument("--contexts", help="prompt sizes in tokens, e.g. 512,2048,8192")
    tune.add_argument("--workers-dir", help="default: workers/ beside the config file")
    tune.add_argument("--json", action="store_true")
    for command, func in ((pull, cmd_models_pull), (link, cmd_models_link),
                          (rm, cmd_models_rm), (tune, cmd_models_tune)):
        command.add_argument("--config")
        command.add_argument("--model-dir")
        command.set_defaults(func=func)
    from .ctl import add_parser as add_ctl_parser
    from .service import add_parser as add_service_parser

    add_ctl_parser(sub)
    add_service_parser(sub)
    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C in models pull, tune, ...: no traceback
        print("mlxrouter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `mlxrouter ctl status | head -1`: the reader left; no traceback, and none again
        # when the interpreter flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command killed by SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
