import re

import torch

from qz_classification.demo import digits_data, format_table, run_demo


def test_digits_are_real_and_split_by_class():
    data = digits_data(image_size=16)
    train_labels = torch.cat([y for _, y in data.train])
    test_labels = torch.cat([y for _, y in data.test])
    assert len(train_labels) + len(test_labels) == 1797  # scikit-learn's digits set
    assert set(test_labels.tolist()) == set(range(10))
    images, _ = next(iter(data.test))
    assert images.shape[1:] == (3, 16, 16)


def test_demo_end_to_end_on_digits(tmp_path, capsys):
    rows = run_demo(epochs=1, qat_epochs=1, image_size=32, calib_batches=4, out_dir=tmp_path)
    assert [r.name for r in rows] == ["FP32", "INT8 PTQ", "INT8 QAT"]
    fp32, ptq, qat = rows
    assert fp32.top1 > 50  # one epoch on real digits is far above chance (10%)
    assert ptq.top1 > fp32.top1 - 3  # PTQ of a ResNet-18 loses about a point, not ten
    assert qat.top1 >= ptq.top1  # QAT trains on: never worse than calibrating alone
    assert ptq.size_mb < 0.3 * fp32.size_mb
    out = capsys.readouterr().out
    assert "| INT8 PTQ |" in out
    agreement = re.search(r"onnxruntime INT8 top-1 predictions agree with PyTorch INT8 on ([\d.]+)%", out)
    assert agreement and float(agreement.group(1)) >= 97.0, out[-500:]
    assert (tmp_path / "resnet18_int8_ptq.pt").exists() and (tmp_path / "resnet18_int8.onnx").exists()


def test_table_ratios_are_against_fp32():
    from qz_classification.demo import Row

    table = format_table([Row("FP32", 90.0, 40.0, 10.0), Row("INT8 PTQ", 89.0, 10.0, 2.5)], "t")
    assert "| INT8 PTQ | 89.00 | 10.00 | 0.25 | 2.50 | 0.25 |" in table
