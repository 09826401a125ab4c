"""The study runner: rows of a plan built, calibrated, converted, scored and timed, cached one file per row.

Each row is keyed by a hash of its configuration and of what it runs on (model, weights file, folders,
batch size, input size, backend), and saved in ``OUT/rows/KEY.json`` as soon as it is done: a study
stopped half-way resumes where it stopped, and a finished one computes nothing when run again.

Latency is batch 1, one thread (``measure_latency``). With ``jobs=1`` each row is timed right after it is
scored, alone on the machine. With ``jobs > 1`` rows are scored in parallel processes (forked, one thread
each) and not timed there, since parallel timing is unreliable: a second, sequential pass then times each
row's configuration rebuilt in this process and calibrated on one batch (INT8 kernel speed does not depend
on the scales). The row's ``latency_pass`` says which.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qz_core.builder import ModelSpec, prepare_built
from qz_core.errors import QzError
from qz_core.files import check_output_dir, write_text_atomic
from qz_core.measure import measure_latency, model_size_mb
from qz_core.registry import get_model_builder, get_model_spec, get_task
from qz_core.task import Task
from qz_core.tools.study.axes import RowConfig, StudyPlan
from qz_core.weights import WeightsSource, resolve_weights
from qz_core.workflow import calibrate, convert, output_tensors

IN_MEMORY_BYTES = 512 * 2**20  # folders whose decoded tensors fit are read once, not once per row
INLINE, SEQUENTIAL = "inline", "sequential"


@dataclass(frozen=True)
class StudyInputs:
    """What every row of a study runs on.

    Attributes:
        model: registered model name.
        weights: enum weights name or checkpoint path (random weights when None).
        val: labelled validation folder, in a training layout of the model's task.
        calib: calibration folder, in a calibration layout of the model's task.
        batch_size: samples per batch, for calibration and scoring.
        workers: data loading processes.
        input_size: (H, W) for the task's default transform, in place of the model's own preprocessing.
        backend: quantized engine; the platform's when None.
        model_kwargs: the builder's own keywords (``num_classes``).
        latency_rounds: timed calls per row.
    """

    model: str
    weights: str | None
    val: Path
    calib: Path
    batch_size: int = 32
    workers: int = 0
    input_size: tuple[int, int] | None = None
    backend: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    latency_rounds: int = 20

    def check(self) -> tuple[ModelSpec, WeightsSource | None]:
        """The spec and weights; bad names, folders and numbers raise before any model is built."""
        spec = get_model_spec(self.model)
        source = resolve_weights(self.weights, spec.weights_enum)
        for label, folder in (("--data", self.val), ("--calib", self.calib)):
            if not Path(folder).expanduser().is_dir():
                raise QzError(f"{label} {str(folder)!r} is not an existing folder.")
        for label, value, minimum in (("--batch-size", self.batch_size, 1), ("--rounds", self.latency_rounds, 1)):
            if value < minimum:
                raise QzError(f"{label} must be at least {minimum}; got {value}.")
        return spec, source

    def identity(self) -> dict[str, Any]:
        """What a cached row depends on besides its configuration (a changed weights file invalidates it)."""
        weights = self.weights
        path = Path(weights).expanduser() if weights else None
        stamp = None
        if path is not None and path.is_file():
            stat = path.stat()
            stamp = [str(path.resolve()), stat.st_size, int(stat.st_mtime)]
        return {
            "model": self.model,
            "weights": stamp or weights,
            "val": str(Path(self.val).expanduser().resolve()),
            "calib": str(Path(self.calib).expanduser().resolve()),
            "batch_size": self.batch_size,
            "input_size": list(self.input_size) if self.input_size else None,
            "backend": self.backend,
            "model_kwargs": {k: self.model_kwargs[k] for k in sorted(self.model_kwargs)},
        }


@dataclass
class Row:
    """One measured configuration (``config`` None: the FP32 baseline).

    Attributes:
        key: the cache key.
        config: the ``RowConfig`` fields.
        scores: the task's metrics (``Task.score``).
        size_mb: the serialized state dict.
        latency_ms: median batch-1 latency, one thread (None until timed).
        latency_pass: 'inline' (timed after scoring, alone) or 'sequential' (timed after parallel rows).
        calib_batches: calibration batches fed.
        seconds: wall time to build, calibrate, convert and score.
        error: the first line of what went wrong (a failed row is not cached).
    """

    key: str
    config: dict[str, Any] | None
    scores: dict[str, float] = field(default_factory=dict)
    size_mb: float = 0.0
    latency_ms: float | None = None
    latency_pass: str | None = None
    calib_batches: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def row_config(self) -> RowConfig | None:
        """The configuration as a ``RowConfig``."""
        return None if self.config is None else RowConfig(**self.config)


def row_key(identity: dict[str, Any], config: RowConfig | None) -> str:
    """The cache key of a row: a hash of what it runs on and its configuration."""
    payload = {"identity": identity, "config": None if config is None else config.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class RowCache:
    """Rows saved one JSON file each under ``folder``, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str) -> Row | None:
        """The cached row, or None (missing or unreadable)."""
        path = self.folder / f"{key}.json"
        try:
            return Row(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, row: Row) -> None:
        """Saves a row unless it failed."""
        if row.error is None:
            write_text_atomic(self.folder / f"{row.key}.json", json.dumps(asdict(row), indent=1))


def _loader(task: Task, dataset: Dataset, batch_size: int, workers: int) -> Iterable[Any]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=task.collate)
    first = task.collate([dataset[0]])
    sample_bytes = sum(t.numel() * t.element_size() for t in output_tensors(first))
    return list(loader) if sample_bytes * len(dataset) <= IN_MEMORY_BYTES else loader


class StudySession:
    """The float model, the data and the task of a study, loaded once per process."""

    def __init__(self, inputs: StudyInputs) -> None:
        spec, source = inputs.check()
        self.inputs = inputs
        self.task = get_task(spec.task)
        self.score_key = self.task.headline_key(spec)
        # --input-size: the task's default transform at that size, in place of the model's own preprocessing.
        view = spec.variant(input_size=inputs.input_size, preprocess=None) if inputs.input_size else spec
        transform = self.task.transform(view, source)
        val_set = self.task.training_data(view, Path(inputs.val), transform)
        calib_set = self.task.calibration_data(view, Path(inputs.calib), transform)
        self.val = _loader(self.task, val_set, inputs.batch_size, inputs.workers)
        self.calib = _loader(self.task, calib_set, inputs.batch_size, inputs.workers)
        self.example = self.task.model_inputs(self.task.collate([val_set[0]]))
        builder = get_model_builder(spec.name)
        self.float_model = builder(weights=source, progress=False, backend=inputs.backend, **inputs.model_kwargs).eval()
        self.identity = inputs.identity()

    def baseline(self) -> Row:
        """The FP32 row."""
        start = time.perf_counter()
        scores = self.task.score(self.float_model, self.val, progress=False)
        seconds = time.perf_counter() - start
        row = Row(row_key(self.identity, None), None, scores, model_size_mb(self.float_model), seconds=seconds)
        row.latency_ms, row.latency_pass = self.latency(self.float_model), INLINE
        return row

    def quantized(self, config: RowConfig, num_batches: int | None = None) -> tuple[nn.Module, int]:
        """The converted model of ``config`` and the calibration batches it saw."""
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = prepare_built(copy.deepcopy(self.float_model), **config.quant_options())
            fraction = None if num_batches else config.calib_fraction
            fed = calibrate(
                model,
                self.calib,
                num_batches=num_batches,
                fraction=fraction,
                progress=False,
                inputs=self.task.model_inputs,
            )
            return convert(model, inplace=True), fed

    def row(self, config: RowConfig, *, timed: bool) -> Row:
        """Builds, calibrates, converts and scores one configuration (and times it when ``timed``)."""
        row = Row(row_key(self.identity, config), config.to_dict())
        start = time.perf_counter()
        try:
            model, row.calib_batches = self.quantized(config)
            row.scores = self.task.score(model, self.val, progress=False)
            row.size_mb = model_size_mb(model)
        except Exception as exc:  # noqa: BLE001  a failed row is reported in its table, the study goes on
            row.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            return row
        row.seconds = time.perf_counter() - start
        if timed:
            row.latency_ms, row.latency_pass = self.latency(model), INLINE
        return row

    def time_again(self, row: Row) -> Row:
        """Times a row scored in a parallel process: its configuration rebuilt here, calibrated on one batch."""
        model, _ = self.quantized(row.row_config, num_batches=1)
        row.latency_ms, row.latency_pass = self.latency(model), SEQUENTIAL
        return row

    def latency(self, model: nn.Module) -> float:
        """Median batch-1 latency of ``model`` in ms, one thread."""
        return measure_latency(model, self.example, warmup=3, rounds=self.inputs.latency_rounds, threads=1).median_ms


@dataclass
class StudyResult:
    """The rows of a study and how many this run computed.

    Attributes:
        plan: the sweeps.
        baseline: the FP32 row.
        rows: row key -> row.
        keys: configuration -> row key.
        metric_key: the task's headline metric.
        computed: rows built and scored by this run.
        timed: rows timed by this run's sequential pass.
    """

    plan: StudyPlan
    baseline: Row
    rows: dict[str, Row]
    keys: dict[RowConfig, str]
    metric_key: str
    computed: int = 0
    timed: int = 0

    def sweep_rows(self, sweep: str) -> list[tuple[RowConfig, Row]]:
        """The configurations of one sweep with their rows, in the sweep's order."""
        return [(c, self.rows[self.keys[c]]) for c in self.plan.sweeps[sweep] if self.keys[c] in self.rows]


_WORKER_SESSION: StudySession | None = None


def _worker_row(config: RowConfig) -> Row:
    assert _WORKER_SESSION is not None
    return _WORKER_SESSION.row(config, timed=False)


def _worker_start() -> None:
    torch.set_num_threads(1)


def _run_parallel(session: StudySession, configs: list[RowConfig], jobs: int, done: Callable[[Row], None]) -> None:
    global _WORKER_SESSION
    _WORKER_SESSION = session  # forked workers inherit the loaded model and data
    context = multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start) as pool:
            pending = {pool.submit(_worker_row, c) for c in configs}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        done(future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        _WORKER_SESSION = None


def check_jobs(jobs: int) -> int:
    """``--jobs``: at least 1; more than 1 needs the fork start method."""
    if jobs < 1:
        raise QzError(f"--jobs must be at least 1; got {jobs}.")
    if jobs > 1 and "fork" not in multiprocessing.get_all_start_methods():
        raise QzError("--jobs above 1 needs the 'fork' start method (Linux); run with --jobs 1.")
    return jobs


def run_study(
    inputs: StudyInputs,
    plan: StudyPlan,
    out: Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    session: StudySession | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> StudyResult:
    """Runs every row of ``plan`` not already cached in ``out/rows`` (and times rows not yet timed).

    Args:
        inputs: what the rows run on.
        plan: the sweeps.
        out: the study folder (rows are cached in ``out/rows``).
        jobs: rows scored in parallel processes; above 1, latency is measured in a sequential pass after.
        progress: a progress bar over rows.
        session: an already loaded session (tests, or several studies on one model).
        on_row: called with each row as it is saved.
    """
    check_jobs(jobs)
    out = check_output_dir(out, "--out")
    cache = RowCache(out / "rows")
    session = session or StudySession(inputs)
    keys = {c: row_key(session.identity, c) for c in plan.configs()}
    baseline = cache.get(row_key(session.identity, None))
    if baseline is None:
        baseline = session.baseline()
        cache.put(baseline)
    rows = {k: row for k in keys.values() if (row := cache.get(k)) is not None}
    result = StudyResult(plan, baseline, rows, keys, session.score_key)
    todo = [c for c, k in keys.items() if k not in rows]
    bar = tqdm(total=len(todo), desc="study", unit="row", disable=not progress)

    def done(row: Row) -> None:
        cache.put(row)
        rows[row.key] = row
        result.computed += 1
        bar.update()
        bar.set_postfix_str(f"{session.score_key}={row.scores.get(session.score_key, float('nan')):.2f}")
        if on_row is not None:
            on_row(row)

    try:
        if jobs == 1 or len(todo) <= 1:
            for config in todo:
                done(session.row(config, timed=True))
        else:
            _run_parallel(session, todo, jobs, done)
    finally:
        bar.close()
    untimed = [r for r in rows.values() if r.latency_ms is None and r.error is None]
    for row in tqdm(untimed, desc="latency", unit="row", disable=not progress or not untimed):
        cache.put(session.time_again(row))
        result.timed += 1
    return result
