#!/usr/bin/env python3
"""Bake a localctx context-extension preset into a new GGUF file, for pipelines that do not want
the whole CLI. This is `localctx convert` itself (same options, same error handling, same exit
codes), so the two cannot drift apart; it needs localctx installed (`bash scripts/install.sh`).

Example:
  python scripts/convert_gguf.py model.gguf model-32k.gguf --preset yarn-32k --verify
"""
from __future__ import annotations

import sys

from localctx.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]], prog_name="convert_gguf.py")
