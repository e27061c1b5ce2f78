"""The only module that imports llama_cpp: load a model with RuntimeParams, tokenize, stream
tokens, and read logits at chosen positions. It only loads and runs: which parameters, whether
they fit in memory and what to suggest when a prompt does not fit are decided in `runtime`."""
from __future__ import annotations

import codecs
import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp import _internals as llama_internals
import numpy as np

from .chat_template import TEMPLATE_COMPILE_ERRORS, ChatTemplate, Segment, uncompilable_template
from .errors import Cancelled, ContextOverflowError, InputError, LocalctxError, ResourceError
from .gguf_meta import ModelFacts
from .kvcache import KVStore, SnapshotKey, model_identity, snapshot_threshold
from .params import GPU_BACKENDS, KV_CACHE_TYPES, GpuLayers, RuntimeParams
from .presets import Ladder

_SCALING_TYPES = {
    None: llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
    "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
    "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
}
_CACHE_TYPES = {name: getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") for name in KV_CACHE_TYPES}
# Tokens llama.cpp matches in text when it parses special tokens (its cache_special_tokens).
_SPECIAL_ATTRS = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                  | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
_C_SPACE = " \t\n\v\f\r"  # C's isspace(), which llama.cpp's lstrip/rstrip use
REBUILD = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/install.sh',
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" bash scripts/install.sh',
}


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


# --- Build facts and offload -----------------------------------------------------------------


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def backends() -> list[str]:
    """Names of the ggml backends this build registered (CPU, CUDA, Metal, ...)."""
    names = []
    reg_count = getattr(llama_cpp, "ggml_backend_reg_count", None)
    reg_get = getattr(llama_cpp, "ggml_backend_reg_get", None)
    reg_name = getattr(llama_cpp, "ggml_backend_reg_name", None)
    if reg_count and reg_get and reg_name:
        for i in range(reg_count()):
            names.append(reg_name(reg_get(i)).decode())
        return names
    info = system_info()
    names = ["CPU"] + [label for label in GPU_BACKENDS.values() if label.upper() in info.upper()]
    return names


def build_info() -> dict[str, Any]:
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": supports_gpu_offload(),
        "backends": backends(),
        "system_info": system_info(),
    }


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


# --- Chat templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: list[str]


# --- The engine --------------------------------------------------------------------------------


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    # KV snapshots (part of prompt_seconds): tokens restored from one instead of evaluated, the
    # tokens of the one saved, and the time finding, loading or saving took.
    restored_tokens: int = 0
    saved_tokens: int = 0
    snapshot_seconds: float = 0.0
    snapshot_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_seconds": round(self.prompt_seconds, 3),
            "prompt_tokens_per_second": round(self.prompt_tps, 1),
            "generated_tokens": self.generated_tokens,
            "generation_seconds": round(self.generation_seconds, 3),
            "generation_tokens_per_second": round(self.generation_tps, 1),
            "restored_tokens": self.restored_tokens,
            "saved_tokens": self.saved_tokens,
            "snapshot_seconds": round(self.snapshot_seconds, 3),
            "snapshot_bytes": self.snapshot_bytes,
        }


@dataclass
class Generation:
    """A streamed completion; `text` and `timings` fill in as the stream is consumed."""

    chunks: Iterator[str]
    timings: Timings = field(default_factory=Timings)
    text: str = ""
    finish_reason: str = ""

    def __iter__(self) -> Iterator[str]:
        return self.chunks

    def finish(self) -> Generation:
        """Consume whatever is left of the stream; `text`, `timings` and `finish_reason` are then final."""
        for _ in self.chunks:
            pass
        return self


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def llama_arguments(facts: ModelFacts, params: RuntimeParams, *, gpu_layers: int = 0, threads: int | None = None,
                    seed: int = 0, verbose: bool = False) -> dict[str, Any]:
    """The keyword arguments of `llama_cpp.Llama` for these parameters: the one translation of
    RuntimeParams into llama-cpp-python (benchmarks build their raw baseline from it too)."""
    threads = threads or default_threads()
    return dict(
        model_path=str(facts.path),
        n_ctx=params.n_ctx,
        n_batch=params.n_batch,
        n_ubatch=params.n_ubatch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=gpu_layers,
        rope_scaling_type=_SCALING_TYPES[params.rope_scaling_type],
        rope_freq_base=params.rope_freq_base,
        rope_freq_scale=params.rope_freq_scale,
        yarn_ext_factor=params.yarn_ext_factor,
        yarn_attn_factor=params.yarn_attn_factor,
        yarn_beta_fast=params.yarn_beta_fast,
        yarn_beta_slow=params.yarn_beta_slow,
        yarn_orig_ctx=params.yarn_orig_ctx,
        flash_attn=params.flash_attn,
        swa_full=params.swa_full,
        type_k=_CACHE_TYPES[params.type_k],
        type_v=_CACHE_TYPES[params.type_v],
        seed=seed,
        verbose=verbose,
    )


@dataclass(frozen=True)
class Switch:
    """A change of window: the parameters before and after, and the time the new llama.cpp
    context took to create (the weights stay loaded; the KV cache starts empty)."""

    before: RuntimeParams
    after: RuntimeParams
    seconds: float


class Engine:
    """A model loaded at a resolved context: tokenize, generate, chat templates, logits.
    Open one with `localctx.open_model` (or `runtime.open_engine`); close it, or use `with`.

    An engine opened with `auto` is adaptive: its `ladder` holds several windows, and each
    request runs at the smallest that holds it (`params` and `n_ctx` are those in use)."""

    def __init__(self, llm: llama_cpp.Llama, facts: ModelFacts, params: RuntimeParams, gpu_layers: int) -> None:
        self._llm = llm
        self.facts = facts
        self.params = params
        self.ladder = Ladder((params,))
        self.switches: list[Switch] = []  # every change of window, oldest first
        self.gpu_layers = gpu_layers
        self.n_vocab = llm.n_vocab()
        self.n_ctx = llm.n_ctx()
        # What to suggest when a prompt does not fit (runtime sets it: it knows the presets).
        self.overflow_hint: Callable[[int], str] | None = None
        # The llama_cpp.Llama keyword arguments it was loaded with (a raw baseline can reuse them).
        self.llama_arguments: dict[str, Any] = {}
        # Where KV snapshots of long documents go (runtime sets it unless --no-kv-cache).
        self.kv_store: KVStore | None = None
        self._model_id: str | None = None
        self._template: ChatTemplate | None = None
        self._grouped = 0  # Self-Extend: how many leading tokens sit at grouped positions
        # Asked before each batch is decoded (prompt batches and each generated token): when it
        # returns True the request stops with Cancelled (the server: a client that went away).
        self.should_stop: Callable[[], bool] | None = None
        # Every evaluation of a prompt or a generated token goes through _decode (positions, and
        # Self-Extend's grouping), including llama-cpp-python's generate loop.
        llm.eval = self._eval  # type: ignore[method-assign]

    @classmethod
    def load(cls, facts: ModelFacts, params: RuntimeParams, *, gpu_layers: int = 0, threads: int | None = None,
             verbose: bool = False, seed: int = 0) -> Engine:
        """Load the model as given: no policy here (runtime.open_engine checks memory first)."""
        arguments = llama_arguments(facts, params, gpu_layers=gpu_layers, threads=threads, seed=seed,
                                    verbose=verbose)
        try:
            set_llama_log(verbose)
            llm = llama_cpp.Llama(**arguments)
            set_llama_log(verbose)
        except TEMPLATE_COMPILE_ERRORS as exc:
            # llama-cpp-python compiles every chat template in the file while loading it.
            raise uncompilable_template(str(facts.path), exc) from None
        except (ValueError, RuntimeError) as exc:
            raise LocalctxError(
                f"llama.cpp could not load {facts.path} at {params.n_ctx} tokens ({exc}). "
                "Run again with --verbose to see llama.cpp's own log."
            ) from None
        engine = cls(llm, facts, params, gpu_layers)
        engine.llama_arguments = arguments
        if params.self_extend and not llama_cpp.llama_memory_can_shift(llm._ctx.memory):
            engine.close()
            raise LocalctxError(
                f"Self-Extend moves positions inside the KV cache, and llama.cpp cannot shift this one "
                f"({facts.architecture}: a recurrent or hybrid memory, or positions it cannot re-rotate). "
                "Use a YaRN preset instead."
            )
        return engine

    def close(self) -> None:
        self._llm.close()

    # --- the window ----------------------------------------------------------------------------

    @property
    def max_ctx(self) -> int:
        """The largest window a request may use (the window itself, unless adaptive)."""
        return self.ladder.top.n_ctx

    def use_window(self, needed: int) -> Switch | None:
        """Run at the smallest step of the ladder that holds `needed` tokens (the largest when
        none does: check_fits refuses those). Returns the switch made, if any."""
        if self._llm._ctx is None:
            raise ResourceError("This model has no usable llama.cpp context (an earlier switch failed); reopen it.")
        step = self.ladder.step_for(needed)
        if step == self.params:
            return None
        return self._switch_to(step)

    def _switch_to(self, params: RuntimeParams) -> Switch:
        """A new llama.cpp context over the loaded weights: RoPE scaling and the window are
        per context in llama.cpp, so nothing is read from disk again. The old context (and its
        KV cache) is freed first, so memory in use is the new window's; if the new one cannot be
        created, the old window is restored and the error says so."""
        start, before = time.perf_counter(), self.params
        try:
            self._new_context(params)
        except ValueError as exc:
            try:
                self._new_context(before)
            except ValueError:
                self._llm._ctx = None  # nothing can run: fail cleanly, never decode on a freed context
                raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}), nor "
                                    "restore the previous one; reopen the model.") from None
            raise ResourceError(f"llama.cpp could not create a {params.n_ctx:,}-token context ({exc}); the "
                                f"engine stays at {before.n_ctx:,} tokens. Use a smaller --ctx.") from None
        switch = Switch(before, params, time.perf_counter() - start)
        self.switches.append(switch)
        return switch

    def _new_context(self, params: RuntimeParams) -> None:
        llm = self._llm
        arguments = llama_arguments(self.facts, params, gpu_layers=self.gpu_layers, threads=llm.n_threads,
                                    seed=self.llama_arguments.get("seed", 0), verbose=llm.verbose)
        cp = llm.context_params
        cp.n_ctx, cp.n_batch, cp.n_ubatch = params.n_ctx, params.n_batch, params.n_ubatch
        cp.rope_scaling_type = arguments["rope_scaling_type"]
        for name in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast",
                     "yarn_beta_slow", "yarn_orig_ctx", "type_k", "type_v", "swa_full"):
            setattr(cp, name, arguments[name])
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if params.flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        llm._ctx.close()
        llm._ctx = llama_internals.LlamaContext(model=llm._model, params=cp, verbose=llm.verbose)
        if params.n_batch != llm.n_batch:
            llm.n_batch = params.n_batch
            llm._batch = llama_internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=params.n_ctx,
                                                    verbose=llm.verbose)
            llm.scores = np.ndarray((params.n_batch, self.n_vocab), dtype=np.single)
        llm._n_ctx = params.n_ctx
        llm.input_ids = np.ndarray((params.n_ctx,), dtype=np.intc)
        llm.n_tokens = 0
        llm._requires_eval = True
        llm._sampler = None
        self._grouped = 0
        self.params, self.n_ctx, self.llama_arguments = params, llm.n_ctx(), arguments

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def count(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    # --- chat ----------------------------------------------------------------------------------

    def _chat_template(self) -> ChatTemplate:
        """The model's own chat template (from its GGUF metadata), compiled once, on first use:
        a model whose template is broken still runs plain completions."""
        if self._template is None:
            model = self._llm._model
            eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
            bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
            self._template = ChatTemplate(self.facts.chat_template, origin=str(self.facts.path),
                                          bos_token=bos, eos_token=eos)
        return self._template

    @property
    def chat_stop(self) -> list[str]:
        """The strings that end a chat reply."""
        return self._chat_template().stop

    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        """Render messages with the model's own chat template; ChatTemplateError (a clean error)
        when the template fails, loops past its budget or renders nothing."""
        template = self._chat_template()
        return ChatPrompt(template.render(messages, add_generation_prompt), template.stop)

    def chat_tokens(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The conversation's tokens. The template's own text is tokenized with its control tokens
        (<|im_start|>, BOS: the template writes any BOS itself, nothing is added); message text is
        data, tokenized without special-token parsing, so a document cannot inject chat markup.
        For text without control-token strings the tokens are those of the whole rendered prompt."""
        text, segments = self._chat_template().split(messages, add_generation_prompt)
        if segments is None:
            # The template rewrites message text, so it cannot be told apart from the template's:
            # safe only while no message carries a control token's text.
            self._refuse_control_text(messages)
            return self.tokenize(text, add_bos=False, special=True)
        return self._tokenize_segments(segments)

    def _token_attr(self, token: int) -> int:
        return int(llama_cpp.llama_vocab_get_attr(self._llm._model.vocab, token))

    def _token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self._llm._model.vocab, token).decode("utf-8", errors="replace")

    def _tokenize_segments(self, segments: Sequence[Segment]) -> list[int]:
        """Tokenize as llama.cpp tokenizes the whole prompt with special tokens, except that only
        the template's text may yield them: each run of plain text between two special tokens
        (template text and message text together) is tokenized in one piece, without special
        parsing, exactly as llama.cpp tokenizes the fragments it splits at special tokens."""
        tokens: list[int] = []
        run: list[str] = []
        before = 0  # attributes of the special token before the current run (0: start of text)
        for seg in segments:
            if seg.data:
                run.append(seg.text)
                continue
            head, middle, tail, first, last = self._split_at_specials(seg.text)
            if middle is None:
                run.append(seg.text)
                continue
            run.append(head)
            tokens += self._tokenize_run("".join(run), before, first)
            tokens += self.tokenize(middle, add_bos=False, special=True)
            run, before = [tail], last
        tokens += self._tokenize_run("".join(run), before, 0)
        return tokens

    def _tokenize_run(self, text: str, before: int, after: int) -> list[int]:
        # Special tokens marked rstrip/lstrip eat the whitespace beside them (llama.cpp's rule).
        if before & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP:
            text = text.lstrip(_C_SPACE)
        if after & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP:
            text = text.rstrip(_C_SPACE)
        return self.tokenize(text, add_bos=False, special=False) if text else []

    def _split_at_specials(self, text: str) -> tuple[str, str | None, str, int, int]:
        """Template text as (plain head, middle from the first special token to the end of the
        last, plain tail, attributes of the first and last special token); middle is None when
        the text holds no special token."""
        spans: list[tuple[int, int, int]] = []
        pos = 0
        for token in self.tokenize(text, add_bos=False, special=True):
            attr = self._token_attr(token)
            if attr & _SPECIAL_ATTRS:
                piece = self._token_text(token)
                at = text.find(piece, pos)
                if not piece or at < 0:  # cannot place it: keep the whole text as one special block
                    return "", text, "", 0, 0
                spans.append((at, at + len(piece), attr))
                pos = at + len(piece)
        if not spans:
            return text, None, "", 0, 0
        return text[: spans[0][0]], text[spans[0][0] : spans[-1][1]], text[spans[-1][1] :], spans[0][2], spans[-1][2]

    def control_tokens_in(self, text: str) -> list[str]:
        """The control tokens of this model (<|im_end|>, BOS ...) that `text` would produce if it
        were tokenized as template text: what a user's text must not carry into a template."""
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        return [self._token_text(t) for t in self.tokenize(text, add_bos=False, special=True)
                if self._token_attr(t) & control]

    def _refuse_control_text(self, messages: list[dict[str, str]]) -> None:
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str):
                continue
            found = self.control_tokens_in(content)
            if found:
                raise InputError(
                    f"A {m.get('role', 'chat')} message contains {found[0]!r}, a control token "
                    f"of this model, and the chat template in {self.facts.path} rewrites message text, so "
                    "localctx cannot keep it as plain text. Remove that marker from the text, or run "
                    "`localctx generate` without --chat."
                )

    # --- generation ----------------------------------------------------------------------------

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """The one overflow check: a prompt and its answer budget must fit the largest window, or
        nothing runs (never truncated), and the error names the counts and what would fit."""
        needed = n_prompt + max_tokens
        if needed > self.max_ctx:
            hint = f" A preset that fits: {self.overflow_hint(needed)}" if self.overflow_hint else ""
            window = "a maximum window" if self.ladder.adaptive else "a window"
            raise ContextOverflowError(
                f"The prompt is {n_prompt:,} tokens and the answer budget {max_tokens:,}: {needed:,} in all, "
                f"but preset {self.params.preset} gives {window} of {self.max_ctx:,}. Nothing was truncated.{hint}"
            )

    # --- KV snapshots -------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget every evaluated token: the next request starts from an empty KV cache, as in a
        new process (and so restores a snapshot where one matches)."""
        self._llm.reset()
        self._llm._ctx.kv_cache_clear()
        self._grouped = 0

    def last_logits(self) -> np.ndarray:
        """The next-token logits after the last evaluated token (after `generate(..., max_tokens=1)`:
        the first answer token's distribution)."""
        ptr = llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        if not ptr:
            raise LocalctxError("No logits yet: nothing has been evaluated since the cache was reset.")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def snapshot_key(self) -> SnapshotKey:
        """What a KV snapshot taken now is valid for: this model file, the parameters of the window
        in use (with `auto`, the step), this llama.cpp build."""
        if self._model_id is None:
            self._model_id = model_identity(self.facts.path)
        return SnapshotKey.of(self._model_id, self.params, llama_cpp.__version__)

    def _snapshot_key_or_none(self) -> SnapshotKey | None:
        try:
            return self.snapshot_key()
        except OSError as exc:  # the model file went away or became unreadable after loading
            if self.kv_store is not None:
                self.kv_store.warn(f"cannot fingerprint {self.facts.path} ({exc.strerror or exc}): no KV snapshot "
                                   "used or saved")
            return None

    def _held(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the KV cache holds already (from this engine's last call)."""
        m = min(self._llm.n_tokens, len(tokens))
        if m == 0:
            return 0
        differ = np.flatnonzero(self._llm.input_ids[:m] != np.asarray(tokens[:m], dtype=np.intc))
        m = int(differ[0]) if differ.size else m
        # The caller evaluates at least the last prompt token again, so going on from m - 1 must work.
        return m if self._resumable(m - 1) else 0

    def _resumable(self, n: int) -> bool:
        """Whether evaluation can go on after the first `n` cached tokens. A window-sized
        sliding-window cache (swa_full off) drops the tokens its layers no longer see; going back
        further than it still holds needs the prompt again (or its snapshot)."""
        w = self.facts.sliding_window
        if n <= 0 or not w or self.params.swa_full or self._llm._ctx is None:
            return True
        oldest = int(llama_cpp.llama_memory_seq_pos_min(self._llm._ctx.memory, 0))
        # The token at position n sees back to n - w + 1 (a chunked window: to its chunk's start).
        first_seen = (n // w) * w if self.facts.sliding_kind == "chunked" else n - w + 1
        return oldest <= max(0, first_seen)

    def _fixed_head(self, tokens: list[int], end: int) -> int:
        """Bring `tokens[:end]` into the KV cache as one piece evaluated alone from the first token
        (kept when the cache holds it so, and can go on after it); returns where the rest starts.
        A fixed split makes the answer independent of the engine's history: llama.cpp's CPU
        flash-attention kernels give different logits for different batch splits (see below)."""
        end = min(end, len(tokens) - 1)
        if end <= 0:
            return 0
        if self._held(tokens) >= end and self._grouped <= end and self._resumable(end):
            return end
        self._llm.n_tokens = 0  # _eval drops anything cached past it first
        self._eval(tokens[:end])
        return end

    def _document_prefix(self, tokens: list[int], end: int, timings: Timings) -> int | None:
        """Bring the document, `tokens[:end]`, into the KV cache: kept from this engine's last call,
        restored from a snapshot, or evaluated (and saved as one); `_stream`'s prefix matching then
        evaluates only the rest. A document below the threshold is left to that matching alone.

        The document is always evaluated alone and from the first token, and the rest after it,
        with or without snapshots: llama.cpp's CPU flash-attention kernels give different logits
        for different batch splits (up to 1.2 on the default model; benchmarks/RESULTS.md), so
        this fixed split is what makes an answer after a restore equal a fresh one. Returns where the
        rest starts (`end`), or None when the document was left to prefix matching."""
        store = self.kv_store
        end = min(end, len(tokens) - 1)  # the last prompt token is evaluated with the rest, for its logits
        if self.params.self_extend:
            return None  # its cache holds grouped positions: not a state a snapshot key describes (yet)
        if end < (store.threshold if store is not None else snapshot_threshold()):
            return None
        if self._held(tokens) >= end:
            return end
        key = self._snapshot_key_or_none() if store is not None else None
        if store is not None and key is not None:
            start = time.perf_counter()
            found = store.find(key, tokens[:end])
            restored = found is not None and self._restore(found.payload, tokens[:end], str(found.path))
            timings.snapshot_seconds += time.perf_counter() - start
            if restored:
                timings.restored_tokens, timings.snapshot_bytes = end, len(found.payload)
                return end
        self._llm.n_tokens = 0  # _eval drops anything cached past it first
        self._eval(tokens[:end])
        if store is not None and key is not None:
            start = time.perf_counter()
            state = self._state()
            if store.save(key, tokens[:end], state, self._snapshot_about()) is not None:
                timings.saved_tokens, timings.snapshot_bytes = end, len(state)
            timings.snapshot_seconds += time.perf_counter() - start
        return end

    def _restore(self, payload: bytearray, tokens: Sequence[int], origin: str) -> bool:
        ctx = self._llm._ctx
        ctx.kv_cache_clear()
        self._llm.n_tokens = 0
        buf = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
        read = llama_cpp.llama_state_seq_set_data(ctx.ctx, buf, len(payload), 0)
        if read != len(payload):
            ctx.kv_cache_clear()
            if self.kv_store is not None:
                self.kv_store.warn(f"llama.cpp did not accept KV snapshot {origin}; the document is evaluated again")
            return False
        n = len(tokens)
        self._llm.input_ids[:n] = tokens
        self._llm.n_tokens = n
        self._llm._requires_eval = True  # no logits yet: the rest of the prompt is evaluated next
        return True

    def _state(self) -> memoryview:
        """llama.cpp's state of sequence 0 (the KV cells in use and their positions)."""
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        return memoryview(buf)[:written]

    def _snapshot_about(self) -> dict[str, Any]:
        p = self.params
        return {"model": self.facts.path.name, "model_path": str(self.facts.path), "preset": p.preset,
                "scaling": p.scaling, "n_ctx": p.n_ctx,
                "kv_type": p.type_k if p.type_k == p.type_v else f"{p.type_k}/{p.type_v}"}

    def generate(self, tokens: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
                 seed: int | None = None, stop: Sequence[str] = (), top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, document_end: int | None = None,
                 head_end: int | None = None) -> Generation:
        """Stream a completion of `tokens`. The KV cache is reused for any prefix shared with the
        previous call, so a growing chat or a fixed instruction prefix is evaluated once. `document_end`: the prompt's tokens up to there are a
        long document, restored from a KV snapshot when one matches, else evaluated and saved as one.
        `head_end`: the prompt's tokens up to there are a fixed head (an instruction), evaluated alone
        from the first token (or kept when cached) and the rest after it, whatever ran before: the
        answer is the same on any engine in any order (see `_document_prefix`)."""
        self.check_fits(len(tokens), max_tokens)
        self.use_window(len(tokens) + max_tokens)
        if seed is not None:
            self._llm.set_seed(seed)
        gen = Generation(iter(()))
        gen.chunks = self._stream(list(tokens), gen, max_tokens=max_tokens, temp=temperature, stop=list(stop),
                                  top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                  document_end=document_end, head_end=head_end)
        return gen

    def _stream(self, tokens: list[int], gen: Generation, *, max_tokens: int, stop: list[str],
                document_end: int | None = None, head_end: int | None = None, **sampling: Any) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        timings = gen.timings
        timings.prompt_tokens = len(tokens)
        start = time.perf_counter()
        first: float | None = None
        held = ""  # text withheld while it could be the start of a stop string
        stopped = False
        gen.finish_reason = "length"
        split = self._document_prefix(tokens, document_end, timings) if document_end is not None else None
        # With a fixed head the rest is always evaluated from the split (the document's end, or the
        # head's), never from a longer prefix a previous call left; a chat (no head) reuses its turns.
        limit = len(tokens)
        if head_end is not None:
            limit = split if split is not None else self._fixed_head(tokens, head_end)
        # The prefix already in the KV cache is kept (at least the last token is evaluated again, for
        # its logits); llama-cpp-python's own matching is bypassed: it cuts the cache at a position
        # equal to the token count, which Self-Extend's grouped positions are not.
        cached = min(self._held(tokens), len(tokens) - 1, limit)
        self._llm.n_tokens = cached
        generator = self._llm.generate(tokens[cached:], reset=False, **sampling)
        try:
            for token in generator:
                if first is None:
                    first = time.perf_counter()
                    timings.prompt_seconds = first - start
                if self.is_eog(token):
                    gen.finish_reason = "stop"
                    break
                timings.generated_tokens += 1
                held += decoder.decode(self._llm.detokenize([token]))
                emit, held, stopped = _split_stop(held, stop)
                if emit:
                    gen.text += emit
                    yield emit
                if stopped:
                    gen.finish_reason = "stop"
                    break
                if timings.generated_tokens >= max_tokens:
                    break
            if not stopped:
                tail = held + decoder.decode(b"", final=True)
                if tail:
                    gen.text += tail
                    yield tail
        finally:
            generator.close()
            end = time.perf_counter()
            if first is None:
                timings.prompt_seconds = end - start
            else:
                # The first token's sampling is part of prompt processing; the rest is generation.
                timings.generation_seconds = end - first

    def complete(self, tokens: Sequence[int], **kwargs: Any) -> Generation:
        """Run `generate` to the end and return the finished Generation."""
        return self.generate(tokens, **kwargs).finish()

    # --- scoring -------------------------------------------------------------------------------

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` from an empty cache and return the next-token logits after each index in
        `positions` (shape len(positions) × n_vocab). Logits are requested for those positions only,
        so memory does not grow with the window. The tokens stay in the KV cache for reuse."""
        n = len(tokens)
        if n > self.max_ctx:
            raise ContextOverflowError(f"{n:,} tokens do not fit the {self.max_ctx:,}-token window.")
        self.use_window(n)
        wanted = sorted(set(positions))
        if wanted and (wanted[0] < 0 or wanted[-1] >= n):
            raise ValueError("positions must index into tokens")
        index = {p: i for i, p in enumerate(wanted)}
        out = np.empty((len(wanted), self.n_vocab), dtype=np.float32)
        self.reset_cache()

        def keep(at: int, row: int) -> None:
            out[index[at]] = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(row), shape=(self.n_vocab,))

        self._decode(list(tokens), 0, index.__contains__, keep)
        # The evaluated tokens stay, and llama-cpp-python knows they are there, so a generation over
        # the same prompt (score it, then answer it) evaluates only its last token again.
        self._llm._requires_eval = True  # the sampler's logits are not this decode's
        return out[[index[p] for p in positions]] if list(positions) != wanted else out

    # --- the one decode path ----------------------------------------------------------------

    def _eval(self, tokens: Sequence[int]) -> None:
        """llama-cpp-python's `Llama.eval`, replaced: evaluate `tokens` after the first `n_tokens`
        already cached (dropping anything cached past them), logits for the last one."""
        llm = self._llm
        n = llm.n_tokens
        tokens = list(tokens)
        if 0 < n < self._grouped or not self._resumable(n):
            # The cut falls among grouped positions, which several tokens share, or before what a
            # window-sized sliding cache still holds: start over.
            tokens, n = [int(t) for t in llm.input_ids[:n]] + tokens, 0
        if n == 0:
            llm._ctx.kv_cache_clear()
            self._grouped = 0
        else:
            llama_cpp.llama_memory_seq_rm(llm._ctx.memory, 0, self._position(n), -1)
        last = n + len(tokens) - 1
        self._decode(tokens, n, lambda i: i == last, lambda i, row: None)
        llm._requires_eval = False

    def _decode(self, tokens: list[int], start: int, wanted: Callable[[int], bool],
                take: Callable[[int, int], None]) -> None:
        """Evaluate `tokens` as the sequence's tokens `start`, `start` + 1, ..., in batches; `take(i,
        row)` for each wanted index once its batch is decoded. Positions are the token indices,
        except under Self-Extend (`_position`), which regroups older positions before each batch."""
        llm = self._llm
        batch = llm._batch.batch
        step = self._batch_size()
        for offset in range(0, len(tokens), step):
            if self.should_stop is not None and self.should_stop():
                # Between batches: input_ids and n_tokens describe what the KV cache holds.
                raise Cancelled("The request was cancelled.")
            chunk = tokens[offset : offset + step]
            first = start + offset
            if self.params.self_extend:
                self._group_before(first, len(chunk))
            batch.n_tokens = len(chunk)
            for j, tok in enumerate(chunk):
                batch.token[j] = tok
                batch.pos[j] = self._position(first + j)
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = wanted(first + j)
            llm._ctx.decode(llm._batch)
            llm.input_ids[first : first + len(chunk)] = chunk
            llm.n_tokens = first + len(chunk)
            for j in range(len(chunk)):
                if wanted(first + j):
                    take(first + j, j)

    def _batch_size(self) -> int:
        p = self.params
        # Self-Extend: grouping can keep a batch below the trained context only if the batch is at
        # most the neighbour window; up to it, the same batches as without (the same logits).
        return max(1, min(p.n_batch, p.neighbor_window)) if p.self_extend else p.n_batch

    # --- Self-Extend ---------------------------------------------------------------------------

    def _position(self, index: int) -> int:
        """The position the token at `index` sits at: its index, except under Self-Extend, where the
        first `_grouped` tokens share positions G to one and the rest follow them one by one."""
        c = self._grouped
        if index < c:
            return index // self.params.group_size
        return c // self.params.group_size + (index - c)

    def _group_before(self, n: int, b: int) -> None:
        """Before evaluating tokens [n, n + b): move the oldest tokens out of the exact region (into
        grouped positions) until no position of the batch reaches the trained context. Positions
        are edited in the KV cache (llama.cpp re-rotates the keys at the next decode): every grouped
        token ends at index // G, the rest one apart after the last group.

        Only llama_memory_seq_add is used, one token at a time for the grouped ones:
        llama_memory_seq_div records the opposite of the shift it makes, so its keys are re-rotated
        the wrong way (measured: a key divided from position 100 to 50 gives logits off by 13, a key
        added from 100 to 50 by 0.8, the same as no edit at all; tests/test_self_extend.py)."""
        g, trained = self.params.group_size, self.params.trained_ctx
        # Lazily: nothing is grouped while the sequence fits the trained context, and then only as
        # many of the oldest tokens as keep the batch's last position below it, c/g + (n + b - c) <=
        # trained. The exact region shrinks as the input grows, to the neighbour window at the
        # preset's reach ((trained - window) x g + window).
        need = -(-(n + b - trained) * g // (g - 1))
        c_old = self._grouped
        if need <= c_old:
            return
        c_new = min(-(-need // g) * g, n - n % g)  # whole groups, of tokens already evaluated
        if c_new <= c_old:
            return
        mem = self._llm._ctx.memory
        p0, moved, tail = c_old // g, c_new - c_old, n - c_new
        # Token c_old + k sits at p0 + k and goes to p0 + k // g. In increasing k, no token already
        # moved sits at a position still to be addressed, so each edit touches exactly one cell.
        for k in range(moved):
            if k // g != k:
                llama_cpp.llama_memory_seq_add(mem, 0, p0 + k, p0 + k + 1, k // g - k)
        if tail:
            llama_cpp.llama_memory_seq_add(mem, 0, p0 + moved, p0 + moved + tail, moved // g - moved)
        self._grouped = c_new

    def max_position(self) -> int:
        """The largest position in the KV cache (-1 when empty): under Self-Extend it stays below
        the trained context however long the prompt."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._llm._ctx.memory, 0))


def _split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split streamed text into (safe to emit, withheld, stopped)."""
    if not stops:
        return text, "", False
    for s in stops:
        at = text.find(s)
        if at >= 0:
            return text[:at], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False

