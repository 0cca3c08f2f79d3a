import importlib

import pytest
import torch

from scoreprior.data import builtin_dataset, pca_gaussian
from scoreprior.density import ScorePrior
from scoreprior.nets import UNet
from scoreprior.pretrained import available_priors, export_pretrained, load_pretrained, pretrained, record_metadata
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.checkpoints import load_checkpoint, load_prior
from scoreprior.training import TrainConfig, train_score_model

# The package exports the function `pretrained`, which hides the submodule of the same name.
pretrained_module = importlib.import_module("scoreprior.pretrained")
SHIPPED = {"blackhole-32": (1, 32, 32), "gaussian-16": (1, 16, 16), "natural-16": (1, 16, 16),
           "natural-32": (1, 32, 32), "faces-24": (1, 24, 24)}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A full training checkpoint of a tiny U-Net after a few steps on 8 x 8 Gaussian fields."""
    path = tmp_path_factory.mktemp("ckpt") / "full.pt"
    data = builtin_dataset("gaussian-field", 64, size=8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = UNet(1, channels=(8, 16))
    train_score_model(net, VPSDE(), data, TrainConfig(steps=5, batch_size=8, warmup=1, seed=0), checkpoint=path,
                      progress=False, provenance="gaussian-field test data")
    return path


def _scores(prior: ScorePrior) -> torch.Tensor:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return prior.score(x, torch.tensor([0.1, 0.5, 0.9]))


def test_full_precision_export_gives_the_same_prior_as_the_checkpoint(trained_checkpoint, tmp_path):
    path = export_pretrained(trained_checkpoint, tmp_path / "slim.pt", dtype=torch.float32)
    slim, full = load_pretrained(path, t0=1e-3), load_prior(trained_checkpoint, t0=1e-3)
    assert isinstance(slim, ScorePrior) and slim.event_shape == (1, 8, 8) and slim.t0 == 1e-3
    assert slim.sde.config() == full.sde.config()
    assert torch.equal(_scores(slim), _scores(full))


def test_half_precision_export_is_smaller_and_close(trained_checkpoint, tmp_path):
    path = export_pretrained(trained_checkpoint, tmp_path / "slim.pt", metadata={"final_loss": 0.5, "steps": 7})
    assert path.stat().st_size < 0.5 * trained_checkpoint.stat().st_size
    slim, full = load_pretrained(path), load_prior(trained_checkpoint)
    assert next(slim.score.net.parameters()).dtype == torch.float32
    torch.testing.assert_close(_scores(slim), _scores(full), rtol=1e-2, atol=1e-2)
    info = torch.load(path, weights_only=True)["metadata"]
    assert info["provenance"] == "gaussian-field test data"
    assert info["train_config"] == load_checkpoint(trained_checkpoint)["train_config"]
    assert info["final_loss"] == 0.5 and info["steps"] == 7  # given metadata wins over the checkpoint's


def test_pretrained_by_name_and_available_priors(trained_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained_module, "PRETRAINED_DIR", tmp_path)
    export_pretrained(trained_checkpoint, tmp_path / "tiny-8.pt", metadata={"wall_time_s": 1.5})
    listed = available_priors()
    assert list(listed) == ["tiny-8"]
    assert listed["tiny-8"]["event_shape"] == [1, 8, 8] and listed["tiny-8"]["steps"] == 5
    assert listed["tiny-8"]["wall_time_s"] == 1.5 and listed["tiny-8"]["file_bytes"] > 0
    assert pretrained("tiny-8", t0=1e-4).t0 == 1e-4
    with pytest.raises(ValueError, match=r"name: expected one of the pretrained priors \['tiny-8'\], got 'nope'"):
        pretrained("nope")


def test_load_pretrained_rejects_other_files(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="full.pt"):
        load_pretrained(trained_checkpoint)  # a full checkpoint, not a slim export
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(tmp_path / "missing.pt")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_prior_loads_with_its_metadata(name):
    if not (pretrained_module.PRETRAINED_DIR / f"{name}.pt").is_file():
        pytest.skip(f"{name}.pt is not in {pretrained_module.PRETRAINED_DIR}")
    prior = pretrained(name)
    assert prior.event_shape == SHIPPED[name]
    info = available_priors()[name]
    for key in ("provenance", "steps", "wall_time_s", "final_loss", "seed"):
        assert key in info
    assert info["sde_config"] == {"kind": "VPSDE", "beta_min": 0.1, "beta_max": 20.0}
    x = torch.rand(2, *SHIPPED[name], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prior.score(x, torch.tensor([0.01, 0.5]))).all()


def test_shipped_priors_are_small():
    total = sum(p.stat().st_size for p in pretrained_module.PRETRAINED_DIR.glob("*.pt"))
    assert total <= 25e6


def test_shipped_gaussian_prior_score_is_close_to_the_exact_score():
    # The optimal noise predictor is -s(t) times the exact score; compare on noised samples of the truth.
    if not (pretrained_module.PRETRAINED_DIR / "gaussian-16.pt").is_file():
        pytest.skip("gaussian-16.pt is not shipped yet")
    pytest.importorskip("skimage")
    prior = pretrained("gaussian-16")
    mean, cov = pca_gaussian(16)
    truth = GaussianScore(mean, cov, prior.sde)
    g = torch.Generator().manual_seed(0)
    x0 = builtin_dataset("pca-gaussian", 256, size=16, generator=g).double()
    for t in (0.05, 0.3, 0.7):
        times = torch.full((256,), t, dtype=torch.float64)
        xt = prior.sde.perturb(x0, times, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        _, s = prior.sde.marginal(times[0])
        exact, learned = s * truth(xt, times), s * prior.score(xt, times)
        rel = ((learned - exact).norm() / exact.norm()).item()
        assert rel < 0.25, f"t={t}: relative error {rel:.3f}"


def test_damaged_prior_files_are_refused_with_their_name(trained_checkpoint, tmp_path):
    """4 KB of random bytes inside a shipped file (no digest: written before digests were stored) leave
    non-finite float16 weights: refused. An export's stored SHA-256 catches finite damage too."""
    shipped = pretrained_module.PRETRAINED_DIR / "gaussian-16.pt"
    if not shipped.is_file():
        pytest.skip("gaussian-16.pt is not shipped")
    raw = bytearray(shipped.read_bytes())
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(noise.tolist())
    (tmp_path / "damaged-16.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged-16.pt: damaged file, [0-9]+ non-finite prior weights"):
        load_pretrained(tmp_path / "damaged-16.pt")

    path = export_pretrained(trained_checkpoint, tmp_path / "slim.pt")
    slim = torch.load(path, weights_only=True)
    assert len(slim["weights_sha256"]) == 64
    name = next(k for k, v in slim["weights"].items() if v.is_floating_point())
    slim["weights"][name] = slim["weights"][name] * 0.5
    torch.save(slim, tmp_path / "altered.pt")
    with pytest.raises(ValueError, match="altered.pt: damaged file, the prior weights do not match"):
        load_pretrained(tmp_path / "altered.pt")


def test_load_score_prior_takes_names_exports_and_checkpoints(trained_checkpoint, tmp_path):
    from scoreprior.pretrained import load_score_prior

    export = export_pretrained(trained_checkpoint, tmp_path / "slim.pt", dtype=torch.float32)
    from_export, from_checkpoint = load_score_prior(export, t0=1e-3), load_score_prior(trained_checkpoint, t0=1e-3)
    assert torch.equal(_scores(from_export), _scores(from_checkpoint))
    assert from_export.data_range == from_checkpoint.data_range
    if (pretrained_module.PRETRAINED_DIR / "gaussian-16.pt").is_file():
        by_name = load_score_prior("gaussian-16")
        # the range of its training draws, recorded at export: samples of the PCA Gaussian leave [0, 1]
        assert by_name.event_shape == (1, 16, 16) and by_name.data_range[0] < 0.0 < 1.0 < by_name.data_range[1]
    with pytest.raises(FileNotFoundError, match="gaussian-16"):
        load_score_prior("no-such-prior")
    with pytest.raises(ValueError, match="EMA"):
        load_score_prior(export, use_ema=False)


def test_record_metadata_adds_entries_and_keeps_the_weights(trained_checkpoint, tmp_path):
    path = export_pretrained(trained_checkpoint, tmp_path / "slim.pt", metadata={"seed": 3})
    before = torch.load(path, weights_only=True)
    record_metadata(path, {"test_nll": {"nats_per_dim": -1.5}})
    after = torch.load(path, weights_only=True)
    assert after["metadata"]["test_nll"] == {"nats_per_dim": -1.5} and after["metadata"]["seed"] == 3
    assert after["weights_sha256"] == before["weights_sha256"]
    load_pretrained(path)
    with pytest.raises(TypeError):
        record_metadata(path, {"bad": object()})
