"""The `mlxrouter` command: serve, models.

Runs in the user's shell. `serve` becomes the daemon (so nothing here imports mlx at module
level); `models import-gguf` may import mlx, since it is not the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _load(args: argparse.Namespace):
    try:
        return load_config(args.config, host=getattr(args, "host", None),
                           port=getattr(args, "port", None),
                           model_dir=getattr(args, "model_dir", None))
    except ConfigError as exc:
        print(f"mlxrouter: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from . import daemon

    def load_again():
        return load_config(args.config, host=args.host, port=args.port,
                           model_dir=args.model_dir)

    return daemon.run(_load(args), args.log_level, reload=load_again)


def cmd_models_list(args: argparse.Namespace) -> int:
    from .discovery import scan

    config = _load(args)
    found = scan(config.model_directory)
    if args.json:
        print(json.dumps([{"id": m.id, "path": m.path, "usable": m.usable, "reason": m.reason,
                           "vision": m.vision} for m in found.values()], indent=2))
        return 0
    if not found:
        print(f"no models in {config.model_directory}")
    for m in found.values():
        status = "ok" if m.usable else f"unusable: {m.reason}"
        print(f"{m.id:40s} {status:30s} {m.path}")
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from .gguf import GGUFImportError, import_gguf

    config = _load(args)
    gguf_path = Path(args.file).expanduser()
    name = args.name or gguf_path.stem.split(".")[0].lower()
    out = Path(args.out).expanduser() if args.out else config.model_directory / name
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
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
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
    from .ctl import add_parser as add_ctl_parser
    from .service import add_parser as add_service_parser

    add_ctl_parser(sub)
    add_service_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
