import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scoreprior
from scoreprior.cli import main
from scoreprior.data import builtin_dataset
from scoreprior.pretrained import available_priors
from scoreprior.checkpoints import load_checkpoint

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
    check = metrics["exact_check"]
    assert check["n"] == metrics["config"]["particles"] >= 25
    assert 0 < check["ess"] <= check["n"] and check["log_prior_noise_median"] > 0
    assert check["khat"] is None or check["khat"] == check["khat"]
    # the verdict follows k̂ and the noise, and is printed
    assert check["reliable"] == ("reliable" in check["verdict"] and "do not trust" not in check["verdict"])
    assert check["verdict"] in printed
    ring = metrics["posterior"]["ring_diameter_uas"]
    assert ring["posterior_eti95"][0] <= ring["posterior_mean"] <= ring["posterior_eti95"][1]
    correction = metrics["correction"]  # the quick demo's SMC stops after 2 stages and says so
    assert correction["method"] == "smc" and not correction["converged"] and "NOT converged" in printed
    assert correction["particles"] == metrics["config"]["particles"]
    assert metrics["flow_before_correction"]["coverage"]["level"] == 0.9
    tree = xarray.open_datatree(tmp_path / "samples.nc")
    assert tree["posterior"]["x"].sizes["draw"] == metrics["config"]["particles"]
    assert tree["truth"]["x"].dims == ("channel", "row", "col")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_posterior_fits_and_writes_samples_figure_and_history(tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    assert main(["train", "--data", "gaussian-field", "--out", str(ckpt), "--steps", "3", *SMALL]) == 0
    truth = builtin_dataset("gaussian-field", 1, size=8, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "x.npy", truth[:, 0].numpy())
    out = tmp_path / "posterior"
    fit = ["--sigma", "0.1", "--steps", "20", "--batch-size", "4", "--n-flows", "2", "--warmup", "5",
           "--reference-samples", "16", "--reference-steps", "10", "--n-samples", "8"]
    assert main(["posterior", str(ckpt), "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(out), *fit]) == 0
    printed = capsys.readouterr().out
    assert str(out / "samples.npz") in printed and "reference from 16 prior draws" in printed
    result = np.load(out / "samples.npz")
    assert result["samples"].shape == (8, 1, 8, 8) and np.isfinite(result["samples"]).all()
    assert result["log_q"].shape == (8,) and np.isfinite(result["log_q"]).all()
    assert result["mean"].shape == result["std"].shape == result["truth"].shape == (1, 8, 8)
    np.testing.assert_allclose(result["truth"], truth[0].numpy())
    assert (out / "posterior.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 20

    # --check weighs fresh draws with the exact ODE density, writes the verdict and, without SMC, resampled draws.
    assert main(["posterior", str(ckpt), "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "c"), *fit, "--check", "25", "--check-ode-steps", "1", "--no-correct"]) == 0
    check = json.loads((tmp_path / "c" / "check.json").read_text())
    assert check["q_check"]["n"] == 25 and check["q_check"]["log_prior_noise_median"] > 0
    assert check["method"] == "importance" and check["particles"] == 25
    assert check["q_check"]["verdict"] in capsys.readouterr().out
    assert np.load(tmp_path / "c" / "corrected.npz")["samples"].shape == (25, 1, 8, 8)
    # --exact-steps continues the fit against the exact ODE density (the demo's second stage)
    assert main(["posterior", str(ckpt), "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "e"), *fit, "--exact-steps", "3", "--ode-steps", "1"]) == 0
    assert "against the exact ODE density: 3 steps" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "e" / "history.json").read_text())["loss"]) == 23
    assert main(["posterior", str(ckpt), "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "d"), *fit, "--check", "24"]) == 2
    assert "--check" in capsys.readouterr().err

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


# --- first contact: errors, shipped priors, refusals before the work ------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 1-step 8x8 checkpoint and one gaussian-field image of its training law."""
    folder = tmp_path_factory.mktemp("tiny")
    assert main(["train", "--data", "gaussian-field", "--out", str(folder / "prior.pt"), "--steps", "1", *SMALL]) == 0
    truth = builtin_dataset("gaussian-field", 1, size=8, generator=torch.Generator().manual_seed(2))
    np.save(folder / "x.npy", truth[:, 0].numpy())
    return folder


def test_a_diverged_posterior_fit_is_one_line_exit_1_and_writes_nothing(tiny, tmp_path, capsys):
    from scoreprior.posterior import FitDiverged

    out = tmp_path / "posterior"
    args = ["posterior", str(tiny / "prior.pt"), "--operator", "blur:1", "--truth", str(tiny / "x.npy"),
            "--sigma", "0.1", "--out", str(out), "--lr", "1e4", "--steps", "5", "--batch-size", "4", "--n-flows", "1",
            "--reference-samples", "0", "--n-samples", "4"]
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (and the progress bar)
    assert len(err) == 1 and "fit diverged" in err[0] and "since step" in err[0] and "lower lr" in err[0]
    assert not out.exists()
    with pytest.raises(FitDiverged):
        main(["--debug", *args])
    with pytest.raises(FitDiverged):
        main([*args, "--debug"])


def test_shipped_priors_work_by_name_and_by_file(tmp_path, capsys):
    from scoreprior.pretrained import PRETRAINED_DIR

    images = builtin_dataset("pca-gaussian", 2, size=16, generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "x.npy", images.numpy())
    fast = ["--divergence", "hutchinson", "--rtol", "1e-2", "--atol", "1e-2"]
    for i, source in enumerate(["gaussian-16", str(PRETRAINED_DIR / "gaussian-16.pt")]):
        assert main(["logprob", source, str(tmp_path / "x.npy"), "--out", str(tmp_path / f"{i}.json"), *fast]) == 0
    by_name, by_file = (json.loads((tmp_path / f"{i}.json").read_text())["images"] for i in range(2))
    assert by_name == by_file and all(math.isfinite(row["log_prob_nats"]) for row in by_name)
    assert main(["logprob", "gaussian-99", str(tmp_path / "x.npy"), "--out", str(tmp_path / "n.csv")]) == 2
    assert "gaussian-16" in capsys.readouterr().err  # the list of shipped names
    assert main(["logprob", "gaussian-16", str(tmp_path / "x.npy"), "--out", str(tmp_path / "e.csv"),
                 "--no-ema"]) == 2
    assert "EMA" in capsys.readouterr().err
    assert main(["posterior", "gaussian-16", "--operator", "blur:1", "--truth", str(tmp_path / "x.npy"),
                 "--sigma", "0.1", "--out", str(tmp_path / "p"), "--steps", "2", "--batch-size", "2",
                 "--n-flows", "1", "--reference-samples", "0", "--n-samples", "4"]) == 0
    assert np.isfinite(np.load(tmp_path / "p" / "samples.npz")["samples"]).all()


def test_bad_options_are_refused_by_name_before_any_work(tiny, tmp_path, capsys):
    ckpt, image = str(tiny / "prior.pt"), str(tiny / "x.npy")

    def refused(args, *words):
        assert main(args) == 2
        captured = capsys.readouterr()
        assert all(word in captured.err for word in words), captured.err
        assert len([line for line in captured.err.splitlines() if "error:" in line]) == 1
        return captured.out

    refused(["logprob", ckpt, image, "--out", str(tmp_path / "l.csv"), "--batch-size", "0"], "--batch-size", "0")
    refused(["calibrate", "gaussian", "--operator", "blur:1", "--sigma", "0.1", "--out", str(tmp_path / "c"),
             "--first", "-5"], "--first", "-5")
    refused(["calibrate", "gaussian", "--operator", "blur:1", "--sigma", "0.1", "--out", str(tmp_path / "c"),
             "--reference-samples", "1"], "--reference-samples", "1")
    refused(["train", "--data", "gaussian-field", "--out", str(tmp_path / "p.pt"), "--steps", "0"], "--steps")
    assert not (tmp_path / "p.pt").exists()
    refused(["logprob", ckpt, image, "--out", str(tmp_path / "l.csv"), "--threads", "0"], "--threads")
    # --out inside a file: refused before the fit starts (nothing printed about fitting)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    printed = refused(["posterior", ckpt, "--operator", "blur:1", "--truth", image, "--sigma", "0.1",
                       "--out", str(blocker / "out")], "--out", "a-file")
    assert "fitting" not in printed
    refused(["demo", "--out", str(blocker / "demo")], "--out")
    # 8-bit values against a prior of images in [0, 1] (shipped) or in the recorded training range
    np.save(tmp_path / "x255.npy", np.linspace(0, 255, 256, dtype=np.float32).reshape(1, 16, 16))
    refused(["logprob", "natural-16", str(tmp_path / "x255.npy"), "--out", str(tmp_path / "l.csv")],
            "[0, 255]", "[0, 1]", "rescale")
    np.save(tmp_path / "x8.npy", np.load(image) * 255 + 128)
    refused(["posterior", ckpt, "--operator", "blur:1", "--truth", str(tmp_path / "x8.npy"), "--sigma", "0.1",
             "--out", str(tmp_path / "p")], "--truth", "trained on images in")
    if not torch.cuda.is_available():
        refused(["logprob", ckpt, image, "--out", str(tmp_path / "l.csv"), "--device", "cuda"], "--device", "CUDA")
    with pytest.raises(ValueError, match="--batch-size"):
        main(["--debug", "logprob", ckpt, image, "--out", str(tmp_path / "l.csv"), "--batch-size", "0"])


def test_train_resume_with_fewer_steps_than_done_says_so(tiny, tmp_path, capsys):
    ckpt = tmp_path / "prior.pt"
    ckpt.write_bytes((tiny / "prior.pt").read_bytes())
    common = ["train", "--data", "gaussian-field", "--out", str(ckpt), *SMALL, "--resume"]
    assert main([*common, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main([*common, "--steps", "2"]) == 2
    assert "already done 3 steps" in capsys.readouterr().err
    assert main([*common, "--steps", "3"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert load_checkpoint(ckpt)["step"] == 3


def test_the_package_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one():
    import subprocess

    code = "import os, scoreprior; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "PASSIVE"
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ACTIVE"
    # torch first, no policy: its OpenMP runtime already spins, which is said once, with the fix
    first = "import torch, scoreprior, scoreprior.cli"
    run = subprocess.run([sys.executable, "-c", first], env=env, capture_output=True, text=True, timeout=300)
    assert run.stderr.count("RuntimeWarning") == 1 and "export OMP_WAIT_POLICY=PASSIVE" in run.stderr
    run = subprocess.run([sys.executable, "-c", first], env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True, timeout=300)
    assert "RuntimeWarning" not in run.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_package_keeps_freed_tensor_memory_unless_the_user_tuned_malloc():
    """A 64 MB tensor allocated 20 times: with the package's thresholds its pages fault in once (the freed block
    is reused), without them (the user's own GLIBC_TUNABLES win) at every allocation."""
    import subprocess

    code = ("import resource, scoreprior, torch\n"
            "torch.ones(16_000_000)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20): torch.ones(16_000_000)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    pages = 64_000_000 // 4096
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                                                             "MALLOC_TRIM_THRESHOLD_")}
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert int(kept.stdout) < 2 * pages, kept.stderr
    user = subprocess.run([sys.executable, "-c", code], env={**env, "GLIBC_TUNABLES": "glibc.malloc.check=0"},
                          capture_output=True, text=True, timeout=300)
    assert int(user.stdout) > 10 * pages, user.stderr


UVFITS = (Path(os.environ.get("SCOREPRIOR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
          / "eht" / "hops_lo_3601_M87+zbl-dtcal_selfcal.uvfits")


def test_posterior_uvfits_options_are_checked_before_any_work(tmp_path, capsys):
    def refused(args, *words):
        assert main(["posterior", "blackhole-32", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert all(word in err for word in words), err
        assert not (tmp_path / "o").exists()

    refused(["--uvfits", "m87.uvfits"], "--likelihood", "closure", "station gains")
    refused(["--uvfits", "m87.uvfits", "--likelihood", "closure", "--sigma", "0.1"], "--sigma", "not used")
    refused(["--uvfits", "m87.uvfits", "--likelihood", "closure", "--average", "-1"], "--average")
    refused(["--truth", "x.npy", "--operator", "blur:1", "--sigma", "0.1", "--likelihood", "closure"],
            "--likelihood closure", "--uvfits")
    refused(["--truth", "x.npy", "--sigma", "0.1"], "--operator", "required")
    refused(["--uvfits", str(tmp_path / "absent.uvfits"), "--likelihood", "closure"], "absent.uvfits")


@pytest.mark.skipif(not UVFITS.exists(), reason="the EHT 2017 M87 uvfits is not available")
def test_posterior_images_real_closures(tmp_path, capsys):
    out = tmp_path / "m87"
    assert main(["posterior", "blackhole-32", "--uvfits", str(UVFITS), "--likelihood", "closure", "--out", str(out),
                 "--steps", "10", "--batch-size", "4", "--n-flows", "2", "--warmup", "2", "--reference-samples", "16",
                 "--reference-steps", "10", "--n-samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert "170 rows after averaging over 600 s, 173 closure quantities" in printed  # 22 scans: 97 + 76
    assert "reduced χ² of the draws" in printed
    assert "over-confident" in printed and "--check 128" in printed  # no verdict asked for: say what is at stake
    result = np.load(out / "samples.npz")
    assert result["samples"].shape == (8, 1, 32, 32) and np.isfinite(result["samples"]).all()
    assert result["reduced_chi2_closure_phase"].shape == result["reduced_chi2_log_closure_amplitude"].shape == (8,)
    assert (out / "posterior.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"scoreprior {scoreprior.__version__}"
