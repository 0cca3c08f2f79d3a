import csv
import json
import math

import numpy as np
import pytest
import torch

from scoreprior.cli import main
from scoreprior.data import builtin_dataset
from scoreprior.pretrained import available_priors
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


@pytest.mark.skipif("blackhole-32" not in available_priors(), reason="the shipped blackhole-32 prior is missing")
def test_quick_demo_writes_report_samples_and_metrics(tmp_path, capsys):
    xarray = pytest.importorskip("xarray")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "metrics.json") in printed and "EHT 2017" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["observation"]["n_visibilities"] > 100 and len(metrics["observation"]["stations"]) == 7
    assert 0.0 <= metrics["posterior"]["coverage"]["fraction_of_pixels"] <= 1.0
    check = metrics["exact_logp_check"]
    assert all(math.isfinite(v) for v in check["ode"] + check["elbo"])
    # the surrogate is a lower bound of log p: allow the Monte Carlo error of 64 time samples, not a gain
    # of more than a few nats per image
    assert max(check["elbo_minus_ode"]) < 5.0
    tree = xarray.open_datatree(tmp_path / "samples.nc")
    assert tree["posterior"]["x"].sizes["draw"] == metrics["config"]["n_samples"]
    assert tree["truth"]["x"].dims == ("channel", "row", "col")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_posterior_fits_and_writes_samples_figure_and_history(tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    assert main(["train", "--data", "gaussian-field", "--out", str(ckpt), "--steps", "3", *SMALL]) == 0
    truth = builtin_dataset("gaussian-field", 1, size=8, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", truth[:, 0].numpy())
    out = tmp_path / "posterior"
    fit = ["--sigma", "0.1", "--steps", "20", "--batch-size", "4", "--n-flows", "2", "--warmup", "5",
           "--n-samples", "8"]
    assert main(["posterior", str(ckpt), "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(out), *fit]) == 0
    assert str(out / "samples.npz") in capsys.readouterr().out
    result = np.load(out / "samples.npz")
    assert result["samples"].shape == (8, 1, 8, 8) and np.isfinite(result["samples"]).all()
    assert result["log_q"].shape == (8,) and np.isfinite(result["log_q"]).all()
    assert result["mean"].shape == result["std"].shape == result["truth"].shape == (1, 8, 8)
    np.testing.assert_allclose(result["truth"], truth[0].numpy())
    assert (out / "posterior.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 20

    # The simulated y, read back with --data under a Fourier operator, must be complex and A(x)-shaped.
    assert main(["posterior", str(ckpt), "--operator", "fourier:4", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "f"), *fit[:4]]) == 0
    y = np.load(tmp_path / "f" / "samples.npz")["y"]
    assert y.shape == (1, 4, 4) and np.iscomplexobj(y)
    np.save(tmp_path / "y.npy", y)
    assert main(["posterior", str(ckpt), "--operator", "fourier:3", "--data", str(tmp_path / "y.npy"),
                 "--out", str(tmp_path / "g"), *fit]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["bogus", "blur:x", "blur:-1", "inpaint:1.5", "fourier:0", "identity:2"])
def test_posterior_rejects_a_bad_operator_spec(tmp_path, capsys, spec):
    args = ["posterior", str(tmp_path / "missing.pt"), "--operator", spec, "--truth", "x.npy", "--sigma", "0.1",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--operator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
