"""qz's sessions: per-package tests, lint, the demo, and (in their own issues) benchmarks and sweeps.

Every session installs from this repo with ``constraints.txt``, so a fresh machine needs only nox.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ["qz-core", "qz-classification", "qz-detection", "qz-segmentation"]
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
ENV = {"YOLO_OFFLINE": "1", "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")}
# Each test virtualenv holds its own PyTorch (several GB): CI sets this to delete each one when its session ends.
DISCARD_VENVS = os.environ.get("QZ_NOX_DISCARD_VENVS") == "1"

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def _install(session: nox.Session, *packages: str) -> None:
    """Installs qz packages (editable, with their test extras) and the verified stack."""
    args = [arg for name in packages for arg in ("-e", f"{ROOT / 'packages' / name}[test]")]
    session.install(*CONSTRAINTS, *args)


def _dependencies(package: str) -> list[str]:
    chain = {
        "qz-core": ["qz-core"],
        "qz-classification": ["qz-core", "qz-classification"],
        "qz-detection": ["qz-core", "qz-classification", "qz-detection"],
        "qz-segmentation": ["qz-core", "qz-classification", "qz-detection", "qz-segmentation"],
        "integration": PACKAGES,
    }
    return chain[package]


def _test_dir(package: str) -> Path:
    return ROOT / "tests" if package == "integration" else ROOT / "packages" / package / "tests"


@nox.session
@nox.parametrize("package", [*PACKAGES, "integration"])
def tests(session: nox.Session, package: str) -> None:
    """Runs one package's tests in its own virtualenv.

    'integration' installs the four packages as a user would, from wheels this session builds
    (``pip install --find-links DIST qz-detection ...``), and runs tests/ against those installs.
    """
    try:
        if package == "integration":
            wheelhouse = _build_dist(session, Path(session.create_tmp()) / "dist")
            _install_from_wheelhouse(session, wheelhouse)
        else:
            _install(session, *_dependencies(package))
        args = ["-q", "--durations=15", "--timeout=900", *session.posargs]
        session.run("pytest", str(_test_dir(package)), *args, env=ENV)
    finally:
        if DISCARD_VENVS and session.virtualenv.location:
            shutil.rmtree(session.virtualenv.location, ignore_errors=True)


def _build_dist(session: nox.Session, out: Path) -> Path:
    """Builds an sdist and a wheel (from that sdist) of every package into ``out``."""
    session.install(*CONSTRAINTS, "build")
    shutil.rmtree(out, ignore_errors=True)
    for name in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(out), str(ROOT / "packages" / name), silent=True)
    return out


def _install_from_wheelhouse(session: nox.Session, wheelhouse: Path) -> None:
    """Installs the task packages by name from ``wheelhouse``; pip finds qz-core and qz-classification there."""
    names = ["qz-detection[test]", "qz-segmentation[test]", "qz-classification[demo,test]", "qz-core[test]"]
    session.install(*CONSTRAINTS, "--find-links", str(wheelhouse), *names)
    session.run("python", "-c", _NOT_EDITABLE, *PACKAGES)


_NOT_EDITABLE = """
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    direct = md.distribution(name).read_text("direct_url.json") or ""
    assert '"editable": true' not in direct, f"{name} is an editable install, not the wheel"
print("installed from the wheelhouse:", ", ".join(f"{n} {md.version(n)}" for n in sys.argv[1:]))
"""


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repo."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", str(ROOT), *session.posargs)
    session.run("ruff", "format", "--check", str(ROOT), *session.posargs)


DEMO_PACKAGES = {
    "classification": ["qz-core", "qz-classification[demo]"],
    "detection": ["qz-core", "qz-classification[demo]", "qz-detection"],
    "segmentation": ["qz-core", "qz-classification[demo]", "qz-segmentation"],
}


def _demo_task(posargs: list[str]) -> str:
    """The task named by ``--task NAME`` (or ``--task=NAME``) in the session's args; classification by default."""
    for i, arg in enumerate(posargs):
        if arg == "--task" and i + 1 < len(posargs):
            return posargs[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return "classification"


@nox.session
def demo(session: nox.Session) -> None:
    """FP32 vs INT8 PTQ vs INT8 QAT on real digits: `-- --task detection|segmentation` (default classification).

    Classification trains a ResNet-18 on scikit-learn's digits; detection (YOLOv5n, box mAP) and segmentation
    (LRASPP, mIoU) train on canvases of those digits over scikit-image photos. The args go to 'qz demo'.
    """
    task = _demo_task(session.posargs)
    if task not in DEMO_PACKAGES:
        session.error(f"Invalid --task {task!r}. Valid tasks: {', '.join(DEMO_PACKAGES)}.")
    editable = [arg for name in DEMO_PACKAGES[task] for arg in ("-e", _package_path(name))]
    session.install(*CONSTRAINTS, *editable)
    session.run("qz", "demo", *session.posargs, env=ENV)


def _package_path(name: str) -> str:
    """``qz-x[extra]`` -> the path of packages/qz-x with its ``[extra]``."""
    package, _, extra = name.partition("[")
    return str(ROOT / "packages" / package) + (f"[{extra}" if extra else "")


@nox.session
def dist(session: nox.Session) -> None:
    """Writes an sdist and a wheel of each package to dist/: then `pip install --find-links dist qz-detection`."""
    out = _build_dist(session, ROOT / "dist")
    session.log("Wheelhouse: %s", ", ".join(sorted(path.name for path in out.iterdir())))


@nox.session
def bench(session: nox.Session) -> None:
    """FP32 vs INT8 latency, eager and onnxruntime (args: models, or --all/--task; default: the whole zoo).

    The default is every registered model with torchvision's own INT8 models beside qz's and a 30 s timing
    budget per model (about 1.5 hours on 2 cores). Run it on a quiet machine; add --readme README.md to publish.
    """
    _install(session, *PACKAGES)
    session.install(*CONSTRAINTS, "-e", f"{ROOT / 'packages' / 'qz-core'}[bench]")  # OpenVINO, NNCF (--anchors nncf)
    args = session.posargs or ["--all", "--torchvision", "--warmup", "2", "--budget", "30"]
    session.run("qz", "bench", "--out", str(ROOT / "benchmarks" / "results"), *args, env=ENV)


@nox.session
def support(session: nox.Session) -> None:
    """Support matrix of every registered model (or those in args); rewrites README.md's support-table block."""
    _install(session, *PACKAGES)
    out = str(ROOT / "benchmarks" / "support")
    session.run("qz", "support", "--out", out, "--readme", str(ROOT / "README.md"), *session.posargs, env=ENV)


@nox.session
def zoo(session: nox.Session) -> None:
    """Full-zoo sweep: every variant through the whole contract (slow; not part of `tests`)."""
    _install(session, *PACKAGES)
    for package in PACKAGES[1:]:
        # Exit 5 (nothing marked zoo yet) is fine for packages whose models are still to come.
        session.run(
            "pytest", str(_test_dir(package)), "-m", "zoo", "-q", *session.posargs, env=ENV, success_codes=[0, 5]
        )


@nox.session
def study(session: nox.Session) -> None:
    """The seed's PTQ study (fusion, observers, start stage, calibration) on a demo's trained model.

    By default the digits demo's ResNet-18: writes scikit-learn's digits as image folders and trains it on them
    (kept in the session's tmp folder between runs), then runs 'qz study' into benchmarks/study/ (tables, CSVs,
    plots). `-- --task detection|segmentation` runs the canvas demo (YOLOv5nu or LR-ASPP trained on real digits
    over photos) and studies its model into benchmarks/study/<task>/ (`canvas_axes.yaml`). Other args go to
    'qz study' in place of the default sweeps, e.g. `-- --sweep fusion,calibration --jobs 2`. Rows are cached:
    a stopped run resumes. Latency is batch 1, one thread: run it on a quiet machine.
    """
    task = _demo_task(session.posargs)
    if task not in DEMO_PACKAGES:
        session.error(f"Invalid --task {task!r}. Valid tasks: {', '.join(DEMO_PACKAGES)}.")
    editable = [arg for name in DEMO_PACKAGES[task] for arg in ("-e", _package_path(name))]
    session.install(*CONSTRAINTS, *editable, "matplotlib", "pyyaml")
    out = ROOT / "benchmarks" / "study"
    args = _without_task(session.posargs)
    if task != "classification":
        work = Path(session.create_tmp()) / f"demo-{task}"
        script = ["python", str(out / "study_demo.py"), "--task", task, "--work", str(work), "--out", str(out / task)]
        session.run(*script, *args, env=ENV)
        return
    work = Path(session.create_tmp()) / "digits"
    session.run("python", str(out / "prepare_digits.py"), "--out", str(work), "--image-size", "64", env=ENV)
    inputs = ["--weights", str(work / "resnet18_digits.pth"), "--num-classes", "10", "--input-size", "64"]
    inputs += ["--data", str(work / "val"), "--calib", str(work / "train"), "--out", str(out)]
    sweeps = args or ["--sweep", "fusion,observers,start,calibration"]
    session.run("qz", "study", "resnet18", *inputs, *sweeps, env=ENV)


def _without_task(posargs: list[str]) -> list[str]:
    """The session's args without ``--task NAME`` / ``--task=NAME``."""
    kept, skip = [], False
    for arg in posargs:
        if skip:
            skip = False
        elif arg == "--task":
            skip = True
        elif not arg.startswith("--task="):
            kept.append(arg)
    return kept
