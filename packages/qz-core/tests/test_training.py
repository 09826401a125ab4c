"""``qz train-qat``: QAT epochs with a schedule, freezing, best/last INT8 files, exact resume, torchrun, errors."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from PIL import Image
from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
from torch.utils.data import DataLoader

import qz_core
from qz_core import distributed, training
from qz_core.cli import main
from qz_core.training import QatTrainingConfig, read_checkpoint, train_qat_model

from conftest import TINY, TOY_TASK, TinyNet, random_batches

TESTS = Path(__file__).parent
COLORS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 200))
LAUNCHER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # registers the toy task and model
from qz_core.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on shared cores run tiny convolutions many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_split(folder: Path, per_class: int, rng: np.random.Generator) -> None:
    for label, color in enumerate(COLORS):
        (folder / f"class{label}").mkdir(parents=True)
        for index in range(per_class):
            noise = rng.integers(-40, 40, size=(32, 32, 3))
            pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class{label}" / f"{index}.png")


@pytest.fixture
def toy(tmp_path):
    """Colour-coded train/val class folders and a float TinyNet checkpoint."""
    rng = np.random.default_rng(0)
    _write_split(tmp_path / "train", 8, rng)
    _write_split(tmp_path / "val", 4, rng)
    torch.manual_seed(0)
    model = TinyNet()
    qz_core.estimate_bn_stats(model, random_batches())
    torch.save(model.eval().state_dict(), tmp_path / "tiny.pth")
    return tmp_path


def _config(root: Path, out: str = "out", **changes) -> QatTrainingConfig:
    settings = dict(
        model=TINY,
        train=root / "train",
        val=root / "val",
        out=root / out,
        weights=str(root / "tiny.pth"),
        epochs=3,
        batch_size=8,
        lr=0.01,
        freeze_observers_after=2,
        freeze_bn_after=1,
        progress=False,
    )
    return QatTrainingConfig(**(settings | changes))


def _val_batches(root: Path) -> DataLoader:
    spec = qz_core.get_model_spec(TINY)
    dataset = TOY_TASK.training_data(spec, root / "val", TOY_TASK.transform(spec, None))
    return DataLoader(dataset, batch_size=8, collate_fn=TOY_TASK.collate)


def _assert_same_state(first, second, where: str = "state") -> None:
    """Bitwise equality of two states (dicts, sequences, tensors, quantized ones too)."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and torch.equal(first, second), where
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key, value in first.items():
            _assert_same_state(value, second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            _assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert first == second, where


def test_qat_learns_and_keeps_the_best_and_last_int8_models(toy):
    result = train_qat_model(_config(toy))
    losses = [epoch["loss"] for epoch in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    history = json.loads((toy / "out" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3] and history["score_key"] == "top1"
    int8_scores = [e["int8"]["top1"] for e in result.history]
    assert result.best_epoch == history["best_epoch"] == int8_scores.index(max(int8_scores)) + 1
    for path, epoch in ((result.last, 3), (result.best, result.best_epoch)):
        model = qz_core.load_quantized(path)
        assert qz_core.is_quantized(model)
        assert TOY_TASK.score(model, _val_batches(toy)) == pytest.approx(result.history[epoch - 1]["int8"])
    assert result.history[-1]["int8"]["top1"] > 25.0  # four balanced colours: chance is 25%
    assert sorted(p.name for p in (toy / "out").iterdir()) == [
        "checkpoint.pt",
        "history.json",
        "int8_best.pt",
        "int8_last.pt",
    ]


def _freezing_state(model: torch.nn.Module) -> tuple[bool, bool]:
    fake_quants = [m for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)]
    conv_bns = [m for m in model.modules() if isinstance(m, _ConvBnNd)]
    assert fake_quants and conv_bns
    observing = {bool(m.observer_enabled[0]) for m in fake_quants}
    bn_training = {m.bn.training for m in conv_bns}
    frozen_flags = {m.freeze_bn for m in conv_bns}
    assert len(observing) == len(bn_training) == 1 and frozen_flags == {not next(iter(bn_training))}
    return observing.pop(), not bn_training.pop()


def test_observers_and_batchnorm_freeze_at_the_set_epochs(toy, monkeypatch):
    seen = []
    original = training.train_epoch

    def spy(step_model, *args, **kwargs):
        seen.append(_freezing_state(step_model.model))
        return original(step_model, *args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", spy)
    result = train_qat_model(_config(toy, epochs=4, freeze_observers_after=3, freeze_bn_after=1))
    assert seen == [(True, False), (True, True), (True, True), (False, True)]
    assert [(e["observers"], e["bn_frozen"]) for e in result.history] == seen


def test_resume_after_an_interruption_reaches_the_same_weights(toy, monkeypatch):
    config = _config(toy, epochs=3, lr_step=1, lr_gamma=0.5, freeze_observers_after=2, freeze_bn_after=2)
    train_qat_model(config)
    original = training.train_epoch

    def interrupted(*args, desc, **kwargs):
        if desc.startswith("epoch 3/"):
            raise KeyboardInterrupt
        return original(*args, desc=desc, **kwargs)

    stopped = QatTrainingConfig(**(vars(config) | {"out": toy / "stopped"}))
    monkeypatch.setattr(training, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_qat_model(stopped)
    assert read_checkpoint(toy / "stopped" / "checkpoint.pt")["epoch"] == 2
    monkeypatch.setattr(training, "train_epoch", original)
    resumed = train_qat_model(QatTrainingConfig(**(vars(stopped) | {"resume": True})))
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    whole, pieced = read_checkpoint(toy / "out" / "checkpoint.pt"), read_checkpoint(toy / "stopped" / "checkpoint.pt")
    for part in ("model", "optimizer", "scheduler"):
        _assert_same_state(whole[part], pieced[part])
    assert whole["history"] == pieced["history"]
    last = [torch.load(toy / out / "int8_last.pt", weights_only=True)["state_dict"] for out in ("out", "stopped")]
    _assert_same_state(*last)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resume": True}, "--resume: .* does not exist; start without --resume"),
        ({"device": "cuda"}, "--device cuda: PyTorch .* sees no CUDA GPU; use --device cpu"),
        ({"device": "tpu"}, "Invalid device 'tpu'.* Valid devices: cpu, cuda"),
        ({"val": Path("missing")}, "--val 'missing' is not an existing folder"),
        ({"lr": 0.0}, "--lr must be a positive number; got 0.0"),
        ({"lr_gamma": 1.5}, r"--lr-gamma must be in \(0, 1\]; got 1.5"),
        ({"freeze_observers_after": 0}, "--freeze-observers-after must be at least 1; got 0"),
        ({"model": "qz_test_tinynett"}, "Did you mean 'qz_test_tinynet'"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_work(toy, monkeypatch, changes, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "get_model_builder", lambda name: pytest.fail("built a model"))
    with pytest.raises(qz_core.QzError, match=message) as error:
        train_qat_model(_config(toy, **changes))
    assert "\n" not in str(error.value)


def test_a_finished_out_folder_needs_resume_and_the_same_settings(toy):
    train_qat_model(_config(toy, epochs=1))
    with pytest.raises(qz_core.QzError, match="holds a checkpoint of an earlier run: pass --resume"):
        train_qat_model(_config(toy, epochs=2))
    with pytest.raises(qz_core.QzError, match=r"other settings: lr 0.01 \(now 0.02\)"):
        train_qat_model(_config(toy, epochs=2, lr=0.02, resume=True))
    assert len(train_qat_model(_config(toy, epochs=2, resume=True)).history) == 2
    (toy / "out" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(qz_core.QzError, match="Cannot read QAT checkpoint .*checkpoint.pt'") as error:
        train_qat_model(_config(toy, epochs=3, resume=True))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--epochs", "0"), ("--lr", "-1"), ("--lr-gamma", "2"), ("--momentum", "nan"), ("--device", "gpu")],
)
def test_bad_cli_values_stop_parsing_with_one_line(toy, capsys, option, value):
    argv = ["train-qat", TINY, "--train", str(toy / "train"), "--val", str(toy / "val"), "--out", str(toy / "o")]
    argv += ["--epochs", "1", option, value]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("qz train-qat: error: argument") and option in err and repr(value) in err


def test_cli_refuses_cuda_without_a_gpu_in_one_line(toy, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "get_model_builder", lambda name: pytest.fail("built a model"))
    argv = ["train-qat", TINY, "--train", str(toy / "train"), "--val", str(toy / "val"), "--out", str(toy / "o")]
    assert main([*argv, "--epochs", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qz train-qat: error: --device cuda:"), err
    assert not (toy / "o").exists()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2 does not fit WORLD_SIZE 2"),
        ({"WORLD_SIZE": "two"}, "must be integers .* got 'two'"),
    ],
)
def test_bad_launch_variables_are_one_line_errors(environ, message):
    with pytest.raises(qz_core.QzError, match=message):
        distributed.launch_ranks(environ)
    assert distributed.launch_ranks({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == distributed.Ranks(4, 3, 1)
    assert not distributed.launch_ranks({}).distributed


def test_batches_keep_their_structure_when_moved():
    @dataclasses.dataclass(frozen=True)
    class Batch:
        images: list
        targets: dict

    Pair = collections.namedtuple("Pair", "inputs labels")
    batch = (Batch([torch.ones(2)], {"boxes": torch.zeros(1, 4), "name": "x"}), Pair(torch.ones(1), [3]))
    moved = distributed.to_device(batch, torch.device("meta"))
    assert isinstance(moved, tuple) and isinstance(moved[0], Batch) and isinstance(moved[1], Pair)
    assert moved[0].images[0].is_meta and moved[0].targets["boxes"].is_meta and moved[1].inputs.is_meta
    assert moved[0].targets["name"] == "x" and moved[1].labels == [3]


def _torchrun(root: Path, out: str) -> list[str]:
    launcher = root / "launch_qz.py"
    launcher.write_text(LAUNCHER)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher),
        "train-qat",
        TINY,
        "--weights",
        str(root / "tiny.pth"),
        "--train",
        str(root / "train"),
        "--val",
        str(root / "val"),
        "--out",
        str(root / out),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--workers",
        "0",
        "--no-progress",
    ]


def _environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (torchrun starts its workers in their own sessions)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _kill_launch(process: subprocess.Popen) -> None:
    """SIGKILLs the torchrun process group and every worker's group."""
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_torchrun_trains_on_two_processes_and_resumes_after_a_kill(toy):
    done = subprocess.run(_torchrun(toy, "ddp"), capture_output=True, text=True, timeout=300, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"], done.stdout
    assert done.stdout.count("best INT8 top1") == 1
    history = json.loads((toy / "ddp" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert read_checkpoint(toy / "ddp" / "checkpoint.pt")["world_size"] == 2

    checkpoint = toy / "killed" / "checkpoint.pt"
    command = _torchrun(toy, "killed")
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_environment(), start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_launch(process)
    assert read_checkpoint(checkpoint)["epoch"] == 1

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=_environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line.split(":")[0] for line in resumed.stdout.splitlines() if line.startswith("epoch ")] == ["epoch 2/2"]
    whole, pieced = read_checkpoint(toy / "ddp" / "checkpoint.pt"), read_checkpoint(checkpoint)
    for part in ("model", "optimizer", "scheduler"):
        _assert_same_state(whole[part], pieced[part])
    assert qz_core.is_quantized(qz_core.load_quantized(toy / "killed" / "int8_best.pt"))
