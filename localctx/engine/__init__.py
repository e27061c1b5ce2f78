"""The engine: the only package that touches llama-cpp-python (through `backend`), split by concern:
backend (llama.cpp calls), tokens (tokenizer and chat templates), positions (native or Self-Extend,
per sequence), snapshots (KV state of a sequence), windows (auto's ladder: one context per step in use, a lane), sequences
(slots, runs and the continuous-batching scheduler) and core (the Engine)."""
from .backend import (LLAMA_CPP_PYTHON, build_info, default_threads, llama_arguments, offload_layers,  # noqa: F401
                      set_llama_log, supports_gpu_offload, system_info)
from .core import Engine  # noqa: F401
from .sequences import Generation, Run, Timings, split_stop  # noqa: F401
from .tokens import ChatPrompt  # noqa: F401
from .windows import Switch  # noqa: F401

_split_stop = split_stop  # the name tests/test_units.py imports
