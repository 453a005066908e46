"""The ``deltadct`` command: compress, apply, info, verify, methods.

Every failure the package anticipates prints one line, ``deltadct: error: …``, and exits with status 2;
no traceback, no partial output file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Sequence

from . import api
from .errors import ConfigError, DeltaDCTError
from .methods import get_method_class, list_methods
from .policy import TensorPolicy

EXIT_ERROR = 2
#: what a shell reports for a command killed by SIGPIPE (128 + 13), as `yes | head` shows
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _parse_sets(pairs: Sequence[str]) -> tuple[dict, dict]:
    """``--set key=value`` → (method options, policy options); ``policy.`` prefixes route to the policy."""
    method, policy = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        if key.startswith("policy."):
            policy[key.removeprefix("policy.")] = value
        else:
            method[key] = value
    return method, policy


def _fmt_info(info: dict) -> str:
    lines = [
        f"file            {info['path']}",
        f"method          {info['method']}",
        f"config          {json.dumps(info['config'], sort_keys=True)}",
        f"bits_per_param  {info['bits_per_param']:.4f}  (measured: file bytes − kept bytes, over compressed params)",
        f"num_params      {info['num_params']:,} compressed in {info['num_compressed']} tensors",
        f"kept            {info['num_kept']} kept + {info['num_new']} new tensors, {info['kept_params']:,} params, "
        f"{info['kept_bytes']:,} bytes (stored exactly)",
        f"file_bytes      {info['file_bytes']:,}",
        "",
        f"{'tensor':<60} {'shape':>16} {'bits/param':>10} {'rel_error':>10}",
    ]
    for name, layer in info["layers"].items():
        err = f"{layer['rel_error']:.4f}" if "rel_error" in layer else "-"
        lines.append(f"{name:<60} {'x'.join(map(str, layer['shape'])):>16} {layer['bits_per_param']:>10.4f} {err:>10}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltadct", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress finetuned − base into a delta file")
    p.add_argument("--base", required=True, help="base checkpoint: model dir, .safetensors or state dict")
    p.add_argument("--finetuned", required=True, help="fine-tuned checkpoint, same forms as --base")
    p.add_argument("--method", default="deltadct", help="registered method (see `deltadct methods`)")
    p.add_argument("--out", required=True, help="output .safetensors delta file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (e.g. patch_size=16, ratios=0.2,0.6,0.2) or policy.KEY=VALUE")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-errors", action="store_true", help="skip per-layer relative errors (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("apply", help="base + delta → a checkpoint directory")
    p.add_argument("--base", required=True)
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("info", help="method, config, measured bits/param, per-layer stats")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = sub.add_parser("verify", help="check checksum (and base fingerprint) without reconstructing")
    p.add_argument("file")
    p.add_argument("--base", help="also check that this is the base the delta was made from")

    p = sub.add_parser("methods", help="list registered methods and their options")
    p.add_argument("--json", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "compress":
        method_cfg, policy_cfg = _parse_sets(args.sets)
        delta = api.compress(args.base, args.finetuned, args.method, args.out, device=args.device,
                             policy=TensorPolicy.from_dict(policy_cfg), progress=not args.quiet,
                             overwrite=args.overwrite, record_errors=not args.no_errors, **method_cfg)
        inf = delta.info()
        print(f"wrote {args.out}: {inf['method']}, {inf['bits_per_param']:.4f} bits/param over "
              f"{inf['num_params']:,} params, {inf['file_bytes']:,} bytes")
    elif args.command == "apply":
        out = api.apply(args.base, args.delta, args.out, device=args.device, progress=not args.quiet,
                        overwrite=args.overwrite)
        print(f"wrote {out}")
    elif args.command == "info":
        inf = api.info(args.file)
        print(json.dumps(inf, sort_keys=True) if args.json else _fmt_info(inf))
    elif args.command == "verify":
        report = api.verify(args.file, args.base)
        print(" ".join(f"{k}={v}" for k, v in report.items()))
    elif args.command == "methods":
        table = {name: get_method_class(name).Config().to_dict() for name in list_methods()}
        if args.json:
            print(json.dumps(table, sort_keys=True))
        else:
            for name, cfg in table.items():
                print(f"{name:<16} {json.dumps(cfg, sort_keys=True)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (`deltadct info … | head`): stop quietly with the status a SIGPIPE gives,
        # and point stdout at /dev/null so the interpreter's final flush does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout without a descriptor
            os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except DeltaDCTError as err:
        print(f"deltadct: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"deltadct: error: {err.strerror or err}: {getattr(err, 'filename', '') or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("deltadct: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
