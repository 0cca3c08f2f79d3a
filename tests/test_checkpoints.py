import pytest
import torch

from scoreprior.checkpoints import (
    CHECKPOINT_FORMAT, atomic_save, check_weights, load_checkpoint, load_prior, prior_from_checkpoint,
    read_checkpoint_file, weights_sha256,
)
from scoreprior.density import ODEOptions, ScorePrior
from scoreprior.nets import MLP
from scoreprior.noise_prediction import GaussianResidualNet, NoisePredictionScore
from scoreprior.sde import VPSDE
from scoreprior.training import save_checkpoint


def tiny_net(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(4, hidden=8)


def test_atomic_save_leaves_no_partial_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"format": "test", "value": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "test", "value": 2}, path)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "test"}, tmp_path / "new.pt")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert read_checkpoint_file(path, "test")["value"] == 1


def test_read_checkpoint_file_checks_the_format(tmp_path):
    path = tmp_path / "other.pt"
    atomic_save({"format": "other"}, path)
    assert read_checkpoint_file(path, ("test", "other"))["format"] == "other"
    with pytest.raises(ValueError, match="other.pt: not a scoreprior checkpoint of format 'test' \\(its format is 'other'\\)"):
        read_checkpoint_file(path, "test")


def test_a_checkpoint_round_trip_rebuilds_the_same_prior(tmp_path):
    """save_checkpoint, then load_checkpoint and prior_from_checkpoint, give the prior of the saved net."""
    net, sde = tiny_net(), VPSDE()
    path = save_checkpoint(tmp_path / "c.pt", net, sde, event_shape=(4,), data_range=(0.0, 1.0))
    checkpoint = load_checkpoint(path)
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    rebuilt = prior_from_checkpoint(checkpoint, checkpoint["net"], t0=1e-3, data_range=checkpoint["data_range"])
    assert rebuilt.data_range == (0.0, 1.0) and rebuilt.event_shape == (4,)
    original = ScorePrior(NoisePredictionScore(net.eval(), sde, event_shape=(4,)), sde, t0=1e-3)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    options = ODEOptions(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = original.log_prob(x, options)
    torch.testing.assert_close(rebuilt.log_prob(x, options), expected)
    # no EMA given: the saved EMA weights are the net's, so load_prior gives the same prior
    torch.testing.assert_close(load_prior(path, t0=1e-3).log_prob(x, options), expected)


def test_prior_from_checkpoint_uses_a_gaussian_residual_net_s_base_as_gaussian_base(tmp_path):
    sde = VPSDE()
    images = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    net = GaussianResidualNet.fit(tiny_net(), sde, images, floor=1e-3)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "g.pt", net, sde, event_shape=(4,)))
    prior = prior_from_checkpoint(checkpoint, checkpoint["ema"]["shadow"])
    torch.testing.assert_close(prior.gaussian_base.cov, net.gaussian().cov)


def test_tampered_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", tiny_net(), VPSDE(), event_shape=(4,))
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["weights_sha256"]["net"] == weights_sha256(checkpoint["net"])
    tampered = tmp_path / "tampered.pt"
    torch.save({**checkpoint, "weights_sha256": {**checkpoint["weights_sha256"], "ema": "0" * 64}}, tampered)
    with pytest.raises(ValueError, match="tampered.pt: damaged file, the ema weights do not match the SHA-256"):
        load_checkpoint(tampered)
    with pytest.raises(ValueError, match="x.pt: damaged file, the net weights do not match"):
        check_weights("x.pt", {"net": checkpoint["net"]}, {"net": "0" * 64})
