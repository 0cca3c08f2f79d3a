import csv
import json
import math

import numpy as np
import pytest
import torch

from scoreprior.cli import main
from scoreprior.data import builtin_dataset
from scoreprior.training import load_checkpoint

SMALL = ["--size", "8", "--n", "64", "--channels", "8,16", "--batch-size", "8"]


def test_train_then_logprob_writes_one_row_per_image(tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    assert main(["train", "--data", "gaussian-field", "--out", str(ckpt), "--steps", "3", *SMALL]) == 0
    assert str(ckpt) in capsys.readouterr().out
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["step"] == 3 and checkpoint["event_shape"] == [1, 8, 8]
    assert checkpoint["provenance"].startswith("builtin:gaussian-field")

    images = builtin_dataset("gaussian-field", 3, size=8, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "images.npy", images[:, 0].numpy())
    out = tmp_path / "logp.csv"
    args = ["logprob", str(ckpt), str(tmp_path / "images.npy"), "--out", str(out), "--rtol", "1e-3",
            "--atol", "1e-3", "--batch-size", "2"]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2]
    for row in rows:
        assert math.isfinite(float(row["log_prob_nats"])) and math.isfinite(float(row["bits_per_dim"]))

    out_json = tmp_path / "logp.json"
    assert main(args[:3] + ["--out", str(out_json), "--divergence", "hutchinson", "--n-probes", "2"]) == 0
    result = json.loads(out_json.read_text())
    assert len(result["images"]) == 3 and result["divergence"] == "hutchinson"
    assert "8-bit" in result["note"]


def test_train_resumes_and_refuses_to_overwrite(tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    data = builtin_dataset("gaussian-field", 16, size=8, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "data.npz", images=data.numpy())
    common = ["train", "--data", str(tmp_path / "data.npz"), "--out", str(ckpt), *SMALL]
    assert main([*common, "--steps", "2", "--sde", "ve"]) == 0
    assert main([*common, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*common, "--steps", "4", "--sde", "ve", "--resume"]) == 0
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["step"] == 4 and len(checkpoint["loss_history"]) == 4
    assert checkpoint["sde_config"]["kind"] == "VESDE"
    assert checkpoint["provenance"].startswith("file:") and "sha256=" in checkpoint["provenance"]


def test_logprob_rejects_images_of_the_wrong_shape(tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    assert main(["train", "--data", "gaussian-field", "--out", str(ckpt), "--steps", "1", *SMALL]) == 0
    np.save(tmp_path / "big.npy", np.zeros((2, 16, 16), dtype=np.float32))
    assert main(["logprob", str(ckpt), str(tmp_path / "big.npy"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "big.npy" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nothing.npy"), "--out", str(tmp_path / "p.pt")]) == 2
    assert "nothing.npy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "gaussian-field", "--out", "x.pt", "--channels", "a,b"])


def test_quick_demo_writes_its_metrics(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--steps", "100"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "metrics.json") in printed and "Pearson" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["quick"] and len(metrics["images"]) == 8
    for row in metrics["images"]:
        assert math.isfinite(row["true"]) and math.isfinite(row["hutchinson"]) and math.isfinite(row["exact"])
    assert load_checkpoint(tmp_path / "prior.pt")["step"] == 100
