"""Search a model's own extension parameters for one target length, on the user's text, and write
the winner as a preset (`--preset tuned-NAME`; a rope-freqs winner is baked by `convert`).

Objective: perplexity at the target length (eval ppl's fixed span), subject to retrieval (needle
tasks of eval ruler at the target) not falling below the default YaRN's. The search is Optuna's
TPE sampler with that constraint; the first trial is the default. Every trial is made of eval
cells, cached by their parameters, and the study is an Optuna journal file: an interrupted search
resumes, and a repeated one computes nothing. Trials are evaluated `batch` at a time as one grid,
so with an executor (Ray workers) they run in parallel.

What is searched, and why not more. yarn: beta_fast, beta_slow (where YaRN's ramp between
interpolated and extrapolated dimensions sits), ext_factor (how much of the ramp applies) and the
scale (the window, as a multiple of the target). Not the attention factor: llama.cpp (0.3.36,
llama-context.cpp) overwrites a requested yarn_attn_factor whenever ext_factor is not 0, so it has
no effect at run time. rope-freqs: per-dimension factors (LongRoPE's form, compactly: a monotone
curve from 1 for the fastest-rotating pairs to lambda_max for the slowest, placed by start and
width, shaped by power) and an attention factor; llama.cpp applies such factors only from a GGUF's
rope_freqs.weight, so each trial is a converted copy of the model, and the default YaRN (run as
usual) is the baseline the trials are held to; the first trial is the curve nearest the default
YaRN's own factors (`yarn_curve`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InputError, LocalctxError
from .convert import convert
from .evaluate import CellCache, PplRequest, RulerRequest, Text, run_ppl, run_ruler
from .evaluate.tasks import RETRIEVAL
from .executor import Executor
from .fsutil import atomic_write
from .paths import cache_dir, user_presets_dir
from .gguf_meta import ModelFacts
from .presets import YARN_BETA_FAST, YARN_BETA_SLOW
from .params import RuntimeParams
from .rope_freqs import check_arch, yarn_attention, yarn_factors, yarn_ramp
from .runtime import RunSpec, resolve_spec

METHODS = ("yarn", "rope-freqs")
DEFAULT_RETRIEVAL = ("niah_single_2", "niah_multikey_1")
DEFAULTS = {"beta_fast": float(YARN_BETA_FAST), "beta_slow": float(YARN_BETA_SLOW), "ext_factor": 1.0, "scale": 1.0}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TuneRequest:
    target: int  # the length to tune for (tokens)
    text: Text  # perplexity and the haystack of the retrieval tasks
    method: str = "yarn"
    trials: int = 24  # including the default, trial 0
    name: str | None = None  # the preset is tuned-NAME [default: <model>-<method>-<target>]
    seed: int = 0
    span: int = 256  # perplexity: tokens scored at the end of the target length
    retrieval: Sequence[str] = DEFAULT_RETRIEVAL  # needle tasks that must not get worse
    samples: int = 3  # per retrieval task
    batch: int = 1  # trials evaluated at once (their cells form one grid: parallel on an executor)


@dataclass
class Trial:
    number: int
    values: dict[str, float]
    ppl: float | None = None
    retrieval: float | None = None
    feasible: bool = False
    preset: str = ""  # the trial's preset file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    name: str
    preset_path: Path
    default: Trial
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    computed: int = 0  # cells computed in this run
    seconds: float = 0.0

    @property
    def gain(self) -> float | None:
        """How much lower the best trial's perplexity is than the default's (0.1 = 10 %)."""
        if self.default.ppl is None or self.best.ppl is None:
            return None
        return 1 - self.best.ppl / self.default.ppl

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": str(self.preset_path), "default": self.default.to_dict(),
                "best": self.best.to_dict(), "gain": self.gain, "computed": self.computed,
                "seconds": round(self.seconds, 1), "trials": [t.to_dict() for t in self.trials]}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise LocalctxError("localctx tune needs Optuna: pip install 'localctx[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # stderr stays ours
    return optuna


def check_request(request: TuneRequest, facts: ModelFacts) -> None:
    trained = facts.trained_context
    if request.method not in METHODS:
        raise InputError(f"Unknown method {request.method!r}; choose from {', '.join(METHODS)}.")
    if request.method == "rope-freqs":
        check_arch(facts.architecture, "A rope-freqs search", "Search --method yarn instead.")
    if request.target <= trained:
        raise InputError(f"The target {request.target:,} is not beyond the model's trained context of {trained:,} "
                         "tokens: there is nothing to extend. Give a longer --target.")
    if request.trials < 1 or request.batch < 1 or request.samples < 1:
        raise InputError("trials, batch and samples must be at least 1.")
    unknown = [t for t in request.retrieval if t not in RETRIEVAL]
    if unknown:
        raise InputError(f"Retrieval tasks are needle tasks ({', '.join(RETRIEVAL)}), not {unknown[0]!r}.")


def suggest(trial: Any, method: str = "yarn") -> dict[str, float]:
    """The search space: around YaRN's published defaults, wide enough to leave them; for
    rope-freqs, the factor curve and the attention factor."""
    if method == "rope-freqs":
        log = {"lambda_max", "power"}
        return {k: trial.suggest_float(k, lo, hi, log=k in log) for k, (lo, hi) in FREQS_BOUNDS.items()}
    return {"beta_fast": trial.suggest_float("beta_fast", 4.0, 128.0, log=True),
            "beta_slow": trial.suggest_float("beta_slow", 0.125, 8.0, log=True),
            "ext_factor": trial.suggest_float("ext_factor", 0.25, 1.0),
            "scale": trial.suggest_float("scale", 1.0, 1.5)}


def preset_text(values: dict[str, float], target: int, description: str, notes: Sequence[str] = ()) -> str:
    """A YaRN preset: the window is the target times `scale`, so the scale factor grows with it."""
    window = math.ceil(target * values["scale"] / 256) * 256
    lines = [f"# {n}" for n in notes] + [
        f"description = {json.dumps(description)}",
        'method = "yarn"',
        f"target_ctx = {window}",
        "",
        "[yarn]",
        f"beta_fast = {values['beta_fast']:.6g}",
        f"beta_slow = {values['beta_slow']:.6g}",
    ]
    if values["ext_factor"] != DEFAULTS["ext_factor"]:  # llama.cpp's own default for YaRN: left unset
        lines.append(f"ext_factor = {values['ext_factor']:.6g}")
    return "\n".join(lines + [""])


def curve(values: dict[str, float], pairs: int) -> list[float]:
    """Pair i's factor: 1 up to `start` of the pairs, rising to lambda_max over `width` (shaped
    by `power`), lambda_max after; monotone, as LongRoPE's searched factors are."""
    out = []
    for i in range(pairs):
        x = min(max((i / max(pairs - 1, 1) - values["start"]) / values["width"], 0.0), 1.0)
        out.append(round(1.0 + (values["lambda_max"] - 1.0) * x ** values["power"], 6))
    return out


def freqs_preset_text(values: dict[str, float], target: int, pairs: int, description: str,
                      notes: Sequence[str] = ()) -> str:
    """A preset of per-dimension factors over the target window (baked by `convert`)."""
    return "\n".join([f"# {n}" for n in notes] + [
        f"description = {json.dumps(description)}",
        'method = "extrapolate"',
        f"target_ctx = {math.ceil(target / 256) * 256}",
        "",
        "[rope_freqs]",
        f"factors = [{', '.join(f'{f:g}' for f in curve(values, pairs))}]",
        f"attn_factor = {values['attn_factor']:.6g}",
        "",
    ])


FREQS_BOUNDS = {"lambda_max": (1.0, 16.0), "start": (0.0, 0.8), "width": (0.05, 1.0), "power": (0.5, 3.0),
                "attn_factor": (1.0, 1.3)}


def yarn_curve(params: RuntimeParams, pairs: int) -> dict[str, float]:
    """The curve nearest a YaRN run's per-pair factors, where a rope-freqs search starts (as
    LongRoPE's search starts from PI's, NTK's and YaRN's factors): 1 up to YaRN's ramp, its scale
    after, the power that fits the ramp best (YaRN mixes angles, so its ramp is not linear in the
    factor)."""
    target = yarn_factors(params, 2 * pairs)
    low, high = yarn_ramp(params, 2 * pairs)
    last = max(pairs - 1, 1)
    values = {"lambda_max": max(target), "attn_factor": yarn_attention(params)}

    def error(shape: tuple[float, float, float]) -> float:
        got = curve({**values, "start": shape[0], "width": shape[1], "power": shape[2]}, pairs)
        return sum((math.log(g) - math.log(t)) ** 2 for g, t in zip(got, target))

    # The power over 0.5 to 3 (log-spaced), the ramp's ends moved by up to a pair each way.
    moves = [k / (2 * last) for k in range(-2, 3)]
    start, width = low / last, (high - low) / last
    shapes = [(start + a, max(width - a + b, 0.05), 0.5 * 6 ** (k / 60))
              for a in moves for b in moves for k in range(61)]
    values["start"], values["width"], values["power"] = min(shapes, key=error)
    return {k: min(max(v, FREQS_BOUNDS[k][0]), FREQS_BOUNDS[k][1]) for k, v in values.items()}


def _is_yarn(values: dict[str, float]) -> bool:
    return "beta_fast" in values


def _preset_text(values: dict[str, float], target: int, pairs: int, description: str,
                 notes: Sequence[str] = ()) -> str:
    if _is_yarn(values):
        return preset_text(values, target, description, notes)
    return freqs_preset_text(values, target, pairs, description, notes)


def _trial_preset(folder: Path, values: dict[str, float], target: int, pairs: int = 0) -> Path:
    text = _preset_text(values, target, pairs, "a localctx tune trial")
    path = folder / f"trial-{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"
    if not path.exists():
        atomic_write(path, text.encode())
    return path


class Study:
    """The search's state: an Optuna study in a journal file beside its trial presets."""

    def __init__(self, request: TuneRequest, name: str, folder: Path, first: dict[str, float] | None = None) -> None:
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.optuna, self.request, self.folder = optuna, request, folder
        folder.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
        self.study = optuna.create_study(study_name=name, storage=storage, sampler=self._sampler(0),
                                         direction="minimize", load_if_exists=True)
        states = optuna.trial.TrialState
        for t in self.study.trials:  # an interrupted run's trial in flight: its cells are cached, ask again
            if t.state == states.RUNNING:
                self.study.tell(t.number, state=states.FAIL)
        # The first trial: yarn's defaults, the baseline every trial is held to; for rope-freqs the
        # curve nearest them, so the search starts where YaRN is and TPE learns around it.
        first = DEFAULTS if request.method == "yarn" else first
        if first is not None and not any(t.state == states.WAITING or (t.state == states.COMPLETE and t.params == first)
                                         for t in self.study.trials):
            self.study.enqueue_trial(first)

    def done(self) -> list[Any]:
        """The finished trials (a failed one, cut short by an interrupt, is not counted)."""
        return [t for t in self.study.trials if t.state == self.optuna.trial.TrialState.COMPLETE]

    def _sampler(self, number: int) -> Any:
        # Seeded by the trial's number, not once per process: a resumed search draws what an
        # uninterrupted one would, instead of repeating its first draws.
        # Random draws for a third of the trials (3 to 8) before TPE models them: a short search
        # (a trial at 32K is minutes even on a GPU) still gets trials TPE chose.
        startup = min(8, max(3, self.request.trials // 3))
        return self.optuna.samplers.TPESampler(seed=self.request.seed * 100_003 + number, n_startup_trials=startup)

    def ask(self, n: int) -> list[tuple[Any, dict[str, float]]]:
        asked = []
        for _ in range(n):
            self.study.sampler = self._sampler(len(self.study.trials))
            trial = self.study.ask()
            asked.append((trial, suggest(trial, self.request.method)))
        return asked

    def tell(self, trial: Any, ppl: float, retrieval: float, baseline: float) -> None:
        trial.set_user_attr("retrieval", retrieval)
        trial.set_constraint("retrieval_shortfall", baseline - retrieval)  # <= 0: feasible, for TPE
        self.study.tell(trial, ppl)


def tune(request: TuneRequest, spec: RunSpec = RunSpec(), *, cache: CellCache | None = None,
         progress: Progress = lambda _: None, executor: Executor | None = None) -> TuneResult:
    """Run (or resume) the search and write the best feasible trial as preset tuned-NAME."""
    start = time.perf_counter()
    resolved = resolve_spec(spec)
    facts = resolved.facts
    check_request(request, facts)
    name = request.name or f"{Path(facts.path).stem.lower()}-{request.method}-{request.target // 1024}k"
    folder = cache_dir() / "tune" / name
    pairs = (facts.rope_dims or facts.head_dim_k) // 2
    first = None
    if request.method == "rope-freqs":
        folder.mkdir(parents=True, exist_ok=True)
        default = replace(spec, preset=str(_trial_preset(folder, DEFAULTS, request.target)), ctx=None)
        first = yarn_curve(resolve_spec(default).params, pairs)
    study = Study(request, name, folder, first)
    trials = Trials(request, spec, folder, pairs, cache or CellCache(), progress, executor)
    base_ppl, baseline = trials.measure([DEFAULTS])[0]
    progress(f"default YaRN: ppl {base_ppl:.3f}, retrieval {baseline:.2f}")
    while len(study.done()) < request.trials:
        asked = study.ask(min(request.batch, request.trials - len(study.done())))
        for (trial, values), (ppl, hit) in zip(asked, trials.measure([v for _, v in asked])):
            study.tell(trial, ppl, hit, baseline)
            progress(f"trial {trial.number + 1}/{request.trials}: ppl {ppl:.3f}, retrieval {hit:.2f}"
                     f"{'' if hit >= baseline else ' (below the default: not eligible)'}")
    done = _trials(study, folder, request.target, pairs, baseline)
    default = next((t for t in done if t.values == DEFAULTS), None) or Trial(
        -1, dict(DEFAULTS), base_ppl, baseline, True, str(_trial_preset(folder, DEFAULTS, request.target)))
    best = min((t for t in done + [default] if t.feasible and not (request.method == "rope-freqs" and t is default)),
               key=lambda t: t.ppl or math.inf, default=default)
    result = TuneResult(name, user_presets_dir() / f"tuned-{name}.toml", default, best, done, trials.computed,
                        time.perf_counter() - start)
    write_tuned(result, request, facts.trained_context, pairs)
    return result


class Trials:
    """Measures trials: perplexity and retrieval at the target, as eval cells (cached). YaRN trials
    run as runtime presets, all of a batch in one grid; rope-freqs trials as converted copies of
    the model (llama.cpp reads per-dimension factors only from a file), one at a time."""

    def __init__(self, request: TuneRequest, spec: RunSpec, folder: Path, pairs: int, cache: CellCache,
                 progress: Progress, executor: Executor | None) -> None:
        self.request, self.spec, self.folder, self.pairs = request, spec, folder, pairs
        self.cache, self.progress, self.executor = cache, progress, executor
        self.computed = 0

    def measure(self, batch: list[dict[str, float]]) -> list[tuple[float, float]]:
        yarn = [v for v in batch if _is_yarn(v)]
        found = dict(zip(map(_key, yarn), self._grid([str(_trial_preset(self.folder, v, self.request.target))
                                                       for v in yarn], self.spec)))
        for values in batch:
            if not _is_yarn(values):
                found[_key(values)] = self._baked(values)
        return [found[_key(v)] for v in batch]

    def _baked(self, values: dict[str, float]) -> tuple[float, float]:
        r = self.request
        preset = _trial_preset(self.folder, values, r.target, self.pairs)
        model = preset.with_suffix(".gguf")
        model_path = self.spec.model or str(resolve_spec(self.spec).facts.path)
        convert(model_path, model, str(preset), force=True)  # a byte-identical file on a resume: its cells are cached
        try:
            spec = replace(self.spec, model=str(model), ctx=math.ceil(r.target / 256) * 256)
            return self._grid(["native"], spec)[0]
        finally:
            model.unlink(missing_ok=True)  # a model's size per trial: not kept

    def _grid(self, presets: list[str], spec: RunSpec) -> list[tuple[float, float]]:
        if not presets:
            return []
        r = self.request
        ppl = run_ppl(PplRequest(presets, [r.target], r.text, span=r.span), spec, cache=self.cache,
                      progress=self.progress, executor=self.executor)
        hits = run_ruler(RulerRequest(presets, [r.target], r.text, list(r.retrieval), samples=r.samples, seed=r.seed),
                         spec, cache=self.cache, progress=self.progress, executor=self.executor)
        self.computed += ppl.computed + hits.computed
        out = []
        for p in presets:
            scores = [c["score"] for c in hits.cells if c["preset"] == p]
            out.append((next(c["ppl"] for c in ppl.cells if c["preset"] == p), sum(scores) / len(scores)))
        return out


def _key(values: dict[str, float]) -> str:
    return json.dumps(values, sort_keys=True)


def _trials(study: Study, folder: Path, target: int, pairs: int, baseline: float) -> list[Trial]:
    out = []
    for t in study.done():
        values = {k: float(v) for k, v in t.params.items()} or dict(DEFAULTS)
        retrieval = float(t.user_attrs.get("retrieval", 0.0))
        out.append(Trial(t.number, values, float(t.value), retrieval, retrieval >= baseline,
                         str(_trial_preset(folder, values, target, pairs))))
    return out


def write_tuned(result: TuneResult, request: TuneRequest, trained: int, pairs: int) -> None:
    """The winner as a user preset, its provenance in comments, every trial in a JSON beside it."""
    best, default = result.best, result.default
    notes = [f"tuned by localctx tune: method {request.method}, target {request.target}, model trained on {trained}",
             f"text {request.text.path.name} (sha256 {request.text.sha}), {len(result.trials)} trials, seed {request.seed}",
             f"objective: perplexity at {request.target} ({request.span} tokens) {best.ppl:.4f} "
             f"against the default's {default.ppl:.4f}",
             f"retrieval ({', '.join(request.retrieval)}, {request.samples} sample{'s' * (request.samples != 1)} "
             f"each): {best.retrieval:.2f} "
             f"against the default's {default.retrieval:.2f}",
             f"all trials: tuned-{result.name}.json"]
    kind = "YaRN" if _is_yarn(best.values) else "Per-dimension RoPE factors (bake with localctx convert)"
    text = _preset_text(best.values, request.target, pairs, f"{kind} tuned for {request.target // 1024}K on "
                        f"{request.text.path.name} (trial {best.number} of {len(result.trials)})", notes)
    atomic_write(result.preset_path, text.encode())
    atomic_write(result.preset_path.with_suffix(".json"), (json.dumps(result.to_dict(), indent=2) + "\n").encode())
