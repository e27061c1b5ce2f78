#!/usr/bin/env python3
"""Bake a localctx context-extension preset into a new GGUF file (standalone conversion script).

Same library code as `localctx convert`, for use from pipelines that do not want the full CLI.

Example:
  python scripts/convert_gguf.py model.gguf model-32k.gguf --preset yarn-32k --verify
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import localctx  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_gguf.py",
        description="Write OUT: a copy of the GGUF model IN whose metadata carries PRESET "
        "({arch}.context_length and the RoPE scaling keys), so llama-server, Ollama or LM Studio run it "
        "at the extended context with no flags. Tensor data is copied byte for byte; the write is atomic.",
        epilog="example: %(prog)s model.gguf model-32k.gguf --preset yarn-32k --verify",
    )
    p.add_argument("source", metavar="IN", type=Path, help="input GGUF model")
    p.add_argument("out", metavar="OUT", type=Path, help="output GGUF path (must not be IN)")
    p.add_argument("-p", "--preset", required=True, help="preset name or .toml file; 'native' undoes a conversion")
    p.add_argument("--ctx", type=int, help="target context in tokens (overrides the preset's)")
    p.add_argument("--dry-run", action="store_true", help="print the metadata diff and write nothing")
    p.add_argument("--verify", action="store_true",
                   help="check that OUT alone gives the same logits as IN with the preset before publishing it")
    p.add_argument("--verify-text", type=Path, help="text file for --verify's prompt")
    p.add_argument("--verify-tokens", type=int, help="prompt length for --verify [trained context + 256]")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verify:  # llama.cpp before numpy, as the CLI does (localctx/cli.py says why)
        import localctx.engine  # noqa: F401
    from localctx.commands.convert import render
    from localctx.convert import convert
    from localctx.errors import LocalctxError

    try:
        text = args.verify_text.read_text(encoding="utf-8", errors="replace") if args.verify_text else None
        result = convert(args.source, args.out, args.preset, ctx=args.ctx, dry_run=args.dry_run, force=args.force,
                         verify=args.verify, verify_text=text, verify_tokens=args.verify_tokens)
    except LocalctxError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted: no output written.", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        render(result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
