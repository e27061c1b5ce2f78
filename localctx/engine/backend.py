"""The only code that touches llama-cpp-python, through its low-level `llama_*` functions: a model,
contexts over it, batches, decoding, the KV memory of each sequence, sequence state, samplers
and the vocabulary. Nothing here decides policy (which window, which positions, what fits):
it loads and runs. The llama-cpp-python version is pinned (scripts/install.sh, pyproject) and
checked at import, because these functions and structs change between releases."""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import llama_cpp
import numpy as np  # after llama_cpp (see localctx/__init__.py)
from llama_cpp import llama_grammar

from ..errors import LocalctxError, ResourceError
from ..params import GPU_BACKENDS, KV_CACHE_TYPES, GpuLayers, RuntimeParams, default_threads

LLAMA_CPP_PYTHON = "0.3.36"  # also in pyproject.toml and scripts/install.sh
if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
    raise LocalctxError(
        f"localctx needs llama-cpp-python {LLAMA_CPP_PYTHON}, and {llama_cpp.__version__} is installed: its "
        "low-level API differs between releases. Run: bash scripts/install.sh"
    )

_SCALING_TYPES = {
    None: llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
    "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
    "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
}
_CACHE_TYPES = {name: getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") for name in KV_CACHE_TYPES}
ATTR_CONTROL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
ATTR_LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
ATTR_RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
# Tokens llama.cpp matches in text when it parses special tokens (its cache_special_tokens).
ATTR_SPECIAL = ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
DEFAULT_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # the dist sampler draws a random seed from it
_STATE_HEADER = 8  # bytes before the KV cache's own part of a sequence state (llama-context.cpp)
PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat penalties
REBUILD = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/install.sh',
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" bash scripts/install.sh',
}
VERSION = llama_cpp.__version__


# --- llama.cpp's own log ---------------------------------------------------------------------

_verbose_log = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: object) -> None:
    # llama-cpp-python's own callback maps ggml's log levels wrongly and lets warnings through;
    # localctx keeps llama.cpp silent unless --verbose, and then sends everything to stderr.
    if _verbose_log:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def set_llama_log(verbose: bool) -> None:
    global _verbose_log
    _verbose_log = verbose
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


set_llama_log(False)
llama_cpp.llama_backend_init()


# --- build facts and offload -----------------------------------------------------------------


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def backends() -> list[str]:
    """Names of the ggml backends this build registered (CPU, CUDA, Metal, ...)."""
    reg_count = getattr(llama_cpp, "ggml_backend_reg_count", None)  # not bound by every release
    if reg_count is not None:
        return [llama_cpp.ggml_backend_reg_name(llama_cpp.ggml_backend_reg_get(i)).decode() for i in range(reg_count())]
    info = system_info().upper()
    return ["CPU"] + [label for label in GPU_BACKENDS.values() if label.upper() in info]


def build_info() -> dict[str, Any]:
    return {"llama_cpp_python": VERSION, "gpu_offload": supports_gpu_offload(), "backends": backends(),
            "system_info": system_info()}


def offload_layers(device: str = "auto", gpu_layers: GpuLayers = None) -> int:
    """llama.cpp's n_gpu_layers for a request (-1: all); refuses a GPU request this build cannot
    serve, with the command that rebuilds it. Never falls back silently."""
    wanted = gpu_layers not in (None, 0)
    if device == "cpu":
        if wanted:
            raise ResourceError("--device cpu cannot be combined with --gpu-layers; drop one of them.")
        return 0
    can = supports_gpu_offload()
    if device in GPU_BACKENDS:
        if not can or not any(GPU_BACKENDS[device].lower() in b.lower() for b in backends()):
            raise ResourceError(
                f"This llama.cpp build cannot offload to {device} (backends: {', '.join(backends())}). "
                f"Rebuild it with:\n  {REBUILD[device]}"
            )
    elif wanted and not can:
        raise ResourceError(
            "--gpu-layers needs a llama.cpp build with GPU offload, and this one is CPU-only. Rebuild with\n"
            f"  {REBUILD['cuda']}   (NVIDIA)\n  {REBUILD['metal']}   (Apple)"
        )
    if not can:
        return 0
    return -1 if gpu_layers in (None, "all") else int(gpu_layers)


def llama_arguments(path: str, params: RuntimeParams, *, gpu_layers: int = 0, threads: int | None = None,
                    seed: int = 0, verbose: bool = False) -> dict[str, Any]:
    """The keyword arguments of llama-cpp-python's high-level `Llama` for these parameters, for
    benchmarks that build a raw baseline with the same settings as an engine."""
    threads = threads or default_threads()
    return dict(model_path=path, n_ctx=params.n_ctx, n_batch=params.n_batch, n_ubatch=params.n_ubatch,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers,
                rope_scaling_type=_SCALING_TYPES[params.rope_scaling_type], rope_freq_base=params.rope_freq_base,
                rope_freq_scale=params.rope_freq_scale, yarn_ext_factor=params.yarn_ext_factor,
                yarn_attn_factor=params.yarn_attn_factor, yarn_beta_fast=params.yarn_beta_fast,
                yarn_beta_slow=params.yarn_beta_slow, yarn_orig_ctx=params.yarn_orig_ctx,
                flash_attn=params.flash_attn, swa_full=params.swa_full, type_k=_CACHE_TYPES[params.type_k],
                type_v=_CACHE_TYPES[params.type_v], seed=seed, verbose=verbose)


# --- the model -----------------------------------------------------------------------------------


class Model:
    """Loaded weights and their vocabulary; contexts are made over it (never a reload)."""

    def __init__(self, path: str, gpu_layers: int) -> None:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if gpu_layers == -1 else gpu_layers
        self.ptr = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), mp)
        if not self.ptr:
            raise ValueError(f"failed to load model from file: {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.ptr))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.ptr))
        self._piece = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, data: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        n_max = max(16, len(data) + 8)
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # the buffer was too small: -n tokens are needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                raise LocalctxError(f"llama.cpp could not tokenize a text of {len(data):,} bytes.")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, big, -n, 0, special)
            return bytes(big[:n])
        return bytes(self._piece[:n])

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        out = b"".join(self.piece(t) for t in tokens)
        # As llama-cpp-python: a leading space after BOS is the tokenizer's, not the text's.
        return out[1:] if tokens and tokens[0] == self.bos and out[:1] == b" " else out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def attr(self, token: int) -> int:
        return int(llama_cpp.llama_vocab_get_attr(self.vocab, token))

    def text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")


# --- grammars ----------------------------------------------------------------------------------


class GrammarError(LocalctxError):
    """A grammar, or a JSON schema to make one from, that cannot be enforced."""


# llama-cpp-python's JSON grammar (from llama.cpp's grammars/json.gbnf): any JSON object.
JSON_OBJECT_GBNF: str = llama_grammar.JSON_GBNF


def schema_to_gbnf(schema: str) -> str:
    """llama-cpp-python's JSON-schema to GBNF converter (llama.cpp's json-schema-to-grammar.py,
    remote refs not fetched). It ignores keywords it does not know: callers check the schema
    first (engine.grammar.check_schema)."""
    try:
        return llama_grammar.json_schema_to_gbnf(schema)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise GrammarError(f"The JSON schema cannot be turned into a grammar: {exc}") from None


# --- contexts, batches, samplers ---------------------------------------------------------------


class Context:
    """One llama.cpp context over a Model: a KV cache of `n_seq` sequences of `params.n_ctx`
    tokens each, every one in a stream of its own (kv_unified off): attention over one never
    spans the others' cells, a sequence's results do not depend on where the others sit, and its
    window is exactly the preset's.

    `exact`: a row's logits depend neither on the thread count nor on what else the batch holds.
    llama.cpp cuts a batch into micro-batches with split_equal (the same rows for every sequence
    of a micro-batch, and only consecutive sequence ids together), and its CPU flash attention
    picks a kernel by the rows per stream of a micro-batch: a tiled one from 64 rows, a one-row one
    below, and for one query row alone against 512 cells or more a split-KV one (ggml-cpu ops.cpp,
    ggml_compute_forward_flash_attn_ext_f16: use_split_kv_path) that cuts the cells into one chunk
    per thread and adds the partial sums, so its logits change with the thread count. Each kernel
    computes a row from its own query and cells. So a sequence with one row in a batch gets a
    companion token in its own stream, one position ahead (where the row does not see it; its cell
    removed after): it takes the one-row kernel whatever its neighbours, alone or not. Where its
    window has no cell left for one, the companion goes to a spare stream (one more, never a
    sequence's), which helps only a batch of one row (benchmarks/RESULTS.md §13)."""

    def __init__(self, model: Model, params: RuntimeParams, *, n_seq: int = 1, threads: int | None = None,
                 exact: bool = False) -> None:
        threads = threads or default_threads()
        streams = n_seq + (1 if exact else 0)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = params.n_ctx * streams
        cp.n_batch, cp.n_ubatch = params.n_batch, min(params.n_batch, params.n_ubatch)
        if exact:  # room for a companion beside each sequence's generated token
            cp.n_batch = max(params.n_batch, 2 * streams)
        cp.n_seq_max = streams
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = threads
        cp.rope_scaling_type = _SCALING_TYPES[params.rope_scaling_type]
        for name in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
                     "yarn_beta_slow"):
            setattr(cp, name, getattr(params, name) or 0.0)
        cp.yarn_orig_ctx = params.yarn_orig_ctx or 0
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if params.flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.type_k, cp.type_v = _CACHE_TYPES[params.type_k], _CACHE_TYPES[params.type_v]
        cp.swa_full = params.swa_full
        cp.no_perf = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise ValueError("failed to create llama_context")
        self.model, self.params, self.n_seq, self.threads = model, params, n_seq, threads
        self.mem = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ptr)) // streams  # per sequence
        self.streams = streams
        self.spare = n_seq if exact else None  # the companion's stream
        self.batch = Batch(cp.n_batch + 1)
        self.n_batch = cp.n_batch

    def close(self) -> None:
        if self.ptr:
            self.batch.close()
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: Batch) -> None:
        if self.spare is None:
            return self._decode(batch)
        n = batch.n
        added = self._companions(batch)
        try:
            return self._decode_and_remove(batch, n, added)
        except ResourceError:
            if not added:
                raise
        # No free cell for a companion (llama.cpp decoded nothing): a lone row's goes to the spare stream.
        retry = [(self.spare, 0)] if n == 1 else []
        for seq, pos in retry:
            batch.add(batch.raw.token[0], pos, seq, False)
        self._decode_and_remove(batch, n, retry)

    def _companions(self, batch: Batch) -> list[tuple[int, int]]:
        """A companion for each sequence with one row in `batch` (see the class); returns where."""
        raw, rows = batch.raw, dict[int, int]()
        for j in range(batch.n):
            seq = raw.seq_id[j][0]
            rows[seq] = j if seq not in rows else -1
        added: list[tuple[int, int]] = []
        for seq, j in rows.items():
            if j >= 0 and raw.pos[j] + 1 < self.n_ctx and batch.n < self.n_batch:
                added.append((seq, raw.pos[j] + 1))
                batch.add(raw.token[j], raw.pos[j] + 1, seq, False)
        if not added and batch.n == 1:  # its window is full: the spare stream's
            added.append((self.spare, 0))
            batch.add(raw.token[0], 0, self.spare, False)
        return added

    def _decode_and_remove(self, batch: Batch, n: int, added: list[tuple[int, int]]) -> None:
        try:
            self._decode(batch)
        finally:
            batch.n = batch.raw.n_tokens = n
            for seq, pos in added:
                llama_cpp.llama_memory_seq_rm(self.mem, seq, pos, -1)

    def _decode(self, batch: Batch) -> None:
        rc = llama_cpp.llama_decode(self.ptr, batch.raw)
        if rc == 1:
            raise ResourceError("llama.cpp found no free KV cells for this batch; a smaller --parallel or a larger "
                                "window would fit.")
        if rc != 0:
            raise LocalctxError(f"llama.cpp failed to decode a batch (llama_decode returned {rc}).")

    def logits(self, row: int) -> Any:
        """A pointer to the n_vocab logits of the batch's `row` (-1: the last with logits)."""
        return llama_cpp.llama_get_logits_ith(self.ptr, row)

    def can_shift(self) -> bool:
        return bool(llama_cpp.llama_memory_can_shift(self.mem))

    def clear(self, seq: int | None = None) -> None:
        if seq is None:
            llama_cpp.llama_memory_clear(self.mem, True)
        else:
            llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        llama_cpp.llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def pos_min(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self.mem, seq))

    def pos_max(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.mem, seq))

    @property
    def layout(self) -> str:
        """What a saved state depends on besides the model and parameters: llama.cpp writes the
        stream count into it. A single cache's state is kept in a one-stream form that loads into
        any context; a sliding-window model's two caches are not rewritten, so its states load
        only where the stream count is the same."""
        return "" if not self.model.n_swa else f"streams={self.streams}"

    def state(self, seq: int) -> bytes | memoryview:
        """The sequence's state (its KV cells and their positions), as bytes."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq)
        view = memoryview(buf).cast("B")[:written]
        return self._one_stream(view, seq) if not self.model.n_swa and self.streams > 1 else view

    def _one_stream(self, view: memoryview, seq: int) -> bytes | memoryview:
        # After an 8-byte header, llama-kv-cache.cpp state_write: the stream count, then per stream
        # its cell count and, when not empty, its cells. Only this sequence's stream has cells.
        n, at = self.streams, _STATE_HEADER
        head, tail = at + 4 + 4 * seq, 4 * (n - 1 - seq)
        if (int.from_bytes(view[at : at + 4], "little") != n or any(bytes(view[at + 4 : head]))
                or (tail and any(bytes(view[len(view) - tail :])))):
            return view
        return bytes(view[:at]) + (1).to_bytes(4, "little") + bytes(view[head : len(view) - tail])

    def set_state(self, seq: int, payload: bytearray) -> bool:
        """Load a state saved from any sequence (of a context with any stream count, see
        `layout`) into `seq`; False when llama.cpp refuses it."""
        at = _STATE_HEADER
        if not self.model.n_swa and self.streams > 1 and payload[at : at + 4] == (1).to_bytes(4, "little"):
            # state_read puts a stream's cells into the target sequence's stream, whichever it was.
            payload = (payload[:at] + bytearray(self.streams.to_bytes(4, "little")) + payload[at + 4 :]
                       + bytes(4 * (self.streams - 1)))
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        try:
            return llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(payload), seq) == len(payload)
        except Exception:  # llama.cpp throws inside for a state of another layout; the binding returns 0
            return False


class Batch:
    """A llama_batch of up to `capacity` tokens, each of one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def close(self) -> None:
        if self.capacity:
            llama_cpp.llama_batch_free(self.raw)
            self.capacity = 0

    def clear(self) -> None:
        self.n = self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append a token; returns its row (where its logits are read)."""
        b, j = self.raw, self.n
        b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, logits
        b.seq_id[j][0] = seq
        self.n = b.n_tokens = j + 1
        return j


class Sampler:
    """A sampler chain as llama-cpp-python's `Llama.generate` builds it (penalties, then greedy at
    temperature 0, else top-k, typical, top-p, min-p, temperature and a seeded draw), so a seed
    gives the same text as before. It keeps its own token history for the penalties.

    In front of it: a logit bias (token id -> added logit). A GBNF grammar (rule `root`) is kept
    beside the chain and applied as llama.cpp's common sampler does (common/sampling.cpp,
    common_sampler_sample): the chain picks a token from the raw candidates; if the grammar allows
    it, it is taken, else the grammar masks every candidate and the chain picks again. Checking one
    token is cheap where masking 49K candidates costs about 13 ms a token (RESULTS §14); a greedy
    choice is the same either way."""

    def __init__(self, n_vocab: int, *, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                 seed: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 logit_bias: Mapping[int, float] | None = None, grammar: str | None = None,
                 vocab: Any = None) -> None:
        sp = llama_cpp.llama_sampler_chain_default_params()
        self.ptr = llama_cpp.llama_sampler_chain_init(sp)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(logit_bias))()
            for i, (token, bias) in enumerate(logit_bias.items()):
                biases[i].token, biases[i].bias = token, bias
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(logit_bias), biases))
        self.grammar = self._grammar(vocab, grammar) if grammar is not None else None
        self.n_vocab = n_vocab
        self._cur: Any = None  # candidates for the grammar's two passes, made on first use
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, repeat_penalty, frequency_penalty,
                                                   presence_penalty))
        if temperature < 0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def _grammar(self, vocab: Any, grammar: str) -> Any:
        if vocab is None:
            self.close()
            raise LocalctxError("A grammar needs the model's vocabulary (Sampler(..., vocab=model.vocab)).")
        smpl = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not smpl:  # llama.cpp logs the parse error (--verbose) and returns NULL
            self.close()
            raise GrammarError("llama.cpp could not parse the grammar (run with --verbose to see where).")
        return smpl

    def sample(self, ctx: Context, row: int) -> int:
        """Draw the next token from the logits of the batch's `row` (and record it for penalties)."""
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, row))
        cur = self._candidates(ctx, row)
        token = self._pick(cur)
        if not self._allowed(token):
            cur = self._candidates(ctx, row)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(cur))
            token = self._pick(cur)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _candidates(self, ctx: Context, row: int) -> Any:
        """Every token with its raw logit, as llama_sampler_sample builds them (the chain sorts
        and truncates them in place, so they are filled again for each pass)."""
        if self._cur is None:
            self._data = (llama_cpp.llama_token_data * self.n_vocab)()
            self._view = np.ctypeslib.as_array(self._data)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._cur = llama_cpp.llama_token_data_array(self._data, self.n_vocab, -1, False)
        self._view["id"] = self._ids
        self._view["logit"] = np.ctypeslib.as_array(ctx.logits(row), shape=(self.n_vocab,))
        self._view["p"] = 0.0
        cur = self._cur
        cur.data, cur.size, cur.selected, cur.sorted = self._data, self.n_vocab, -1, False
        return cur

    def _pick(self, cur: Any) -> int:
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(cur))
        return int(cur.data[cur.selected].id)

    def _allowed(self, token: int) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        arr = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return bool(np.isfinite(one[0].logit))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if getattr(self, "grammar", None):
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None

    def __del__(self) -> None:
        self.close()
