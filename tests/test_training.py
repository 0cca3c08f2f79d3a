import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from scoreprior.data import gaussian_field, sample_gaussian
from scoreprior.density import ODEOptions, ScorePrior
from scoreprior.nets import MLP, UNet, build_net
from scoreprior.pretrained import export_pretrained, load_pretrained
from scoreprior.priors import GaussianPrior
from scoreprior.scores import GaussianScore
from scoreprior.sde import VPSDE
from scoreprior.checkpoints import CHECKPOINT_VERSION, load_checkpoint, load_prior
from scoreprior.noise_prediction import GaussianResidualNet, NoisePredictionScore
from scoreprior.training import EMA, TrainConfig, dsm_loss, save_checkpoint, train_score_model


class ExactNoisePredictor(nn.Module):
    """The optimal noise predictor E[z | x_t] = -s(t) grad log p_t(x_t) for Gaussian data."""

    def __init__(self, truth: GaussianScore):
        super().__init__()
        self.truth = truth

    def forward(self, x, t):
        _, s = self.truth.sde.marginal(t)
        return -s.reshape(-1, *[1] * (x.ndim - 1)) * self.truth(x, t)


def optimal_loss(truth: GaussianScore, eps: float, n: int = 20001) -> float:
    """E_t[1 - s^2 tr((a^2 C + s^2 I)^-1) / d], t ~ U(eps, 1), by the trapezoid rule."""
    t = torch.linspace(eps, 1.0, n, dtype=torch.float64)
    a, s = truth.sde.marginal(t)
    lam = truth.eigvals
    f = 1.0 - (s[:, None] ** 2 / (a[:, None] ** 2 * lam + s[:, None] ** 2)).mean(1)
    return (torch.trapezoid(f, t) / (1.0 - eps)).item()


def small_field(size=4):
    mean, cov = gaussian_field(size, size, length_scale=1.5)
    return mean, cov


def test_dsm_loss_of_exact_predictor_matches_closed_form_minimum(sde):
    mean, cov = small_field()
    truth = GaussianScore(mean, cov, sde)
    g = torch.Generator().manual_seed(0)
    x0 = sample_gaussian(mean, cov, 40000, generator=g)
    losses = dsm_loss(ExactNoisePredictor(truth), sde, x0, generator=g, eps=1e-3, reduction="none")
    assert losses.shape == (40000,)
    stderr = losses.std().item() / math.sqrt(losses.numel())
    assert abs(losses.mean().item() - optimal_loss(truth, 1e-3)) < 4 * stderr


def test_dsm_loss_of_zero_predictor_is_one():
    # net = 0 gives ||z||^2 / d, whose mean is 1 whatever the data.
    x0 = torch.randn(20000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    losses = dsm_loss(lambda x, t: torch.zeros_like(x), VPSDE(), x0, reduction="none",
                      generator=torch.Generator().manual_seed(2))
    assert abs(losses.mean().item() - 1.0) < 4 * losses.std().item() / math.sqrt(20000)


def test_dsm_loss_validates_arguments():
    net = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="x0"):
        dsm_loss(net, VPSDE(), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        dsm_loss(net, VPSDE(), torch.zeros(4, 2), reduction="sum")


def test_noise_prediction_score_of_exact_predictor_is_the_true_score():
    sde = VPSDE()
    mean, cov = small_field()
    truth = GaussianScore(mean, cov, sde)
    score = NoisePredictionScore(ExactNoisePredictor(truth), sde, event_shape=mean.shape)
    x = sample_gaussian(mean, cov, 5, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1e-3, 0.1, 0.3, 0.7, 1.0], dtype=torch.float64)
    torch.testing.assert_close(score(x, t), truth(x, t))
    torch.testing.assert_close(score(x, 0.5), truth(x, 0.5))
    assert score.event_shape == mean.shape


def test_noise_prediction_score_gives_exact_log_density():
    sde = VPSDE()
    mean, cov = small_field(2)
    truth = GaussianScore(mean, cov, sde)
    # The exact p_T as terminal density, so the only error left is the ODE solver's.
    prior = ScorePrior(NoisePredictionScore(ExactNoisePredictor(truth), sde), sde, t0=1e-3,
                       terminal_log_prob=lambda x: truth.log_prob_t(x, 1.0))
    x = sample_gaussian(mean, cov, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.log_prob(x, ODEOptions(rtol=1e-7, atol=1e-7)), truth.log_prob_t(x, 1e-3),
                               rtol=1e-4, atol=1e-4)


def test_noise_prediction_score_casts_to_the_net_dtype():
    sde = VPSDE()
    net = MLP(3, hidden=8, depth=1)
    with torch.no_grad():
        net.out.bias.fill_(0.5)
    score = NoisePredictionScore(net, sde)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = score(x, 0.5)
    assert out.dtype == torch.float64
    expected = -net(x.float(), torch.full((2,), 0.5)).double() / sde.marginal(torch.tensor([0.5]))[1]
    torch.testing.assert_close(out, expected)


def test_ema_averages_with_warm_up():
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    start = ema.shadow["weight"].clone()
    ema.update()  # d = min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start)
    ema.update()  # d = min(0.5, 2/11)
    torch.testing.assert_close(ema.shadow["weight"], 2 / 11 * 0.1 * start)
    other = EMA(nn.Linear(1, 1, bias=False), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(lin, decay=1.0)


def gaussian_vectors(n, seed=0):
    """(n, 4) samples of a correlated 4-d Gaussian (a 2x2 field, flattened)."""
    mean, cov = gaussian_field(2, 2, length_scale=1.5)
    x = sample_gaussian(mean, cov, n, generator=torch.Generator().manual_seed(seed))
    return x.reshape(n, 4).float(), GaussianScore(mean.reshape(4), cov, VPSDE())


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(4, hidden=32, depth=2, embed_dim=16)


FAST = dict(batch_size=64, lr=3e-3, warmup=10, ema_decay=0.99, log_every=10)


def test_training_reduces_the_loss_towards_its_minimum():
    data, truth = gaussian_vectors(1024)
    sde = truth.sde
    net = make_mlp()
    eval_data, _ = gaussian_vectors(8192, seed=1)

    def held_out_loss():
        with torch.no_grad():
            return dsm_loss(net, sde, eval_data, generator=torch.Generator().manual_seed(3)).item()

    before = held_out_loss()
    result = train_score_model(net, sde, data, TrainConfig(steps=400, **FAST), progress=False)
    after = held_out_loss()
    minimum = optimal_loss(truth, 1e-5)
    assert result.steps == 400 and len(result.loss_history) == 400
    assert math.isfinite(result.final_loss) and result.wall_time > 0
    assert before == pytest.approx(1.0, abs=0.05)  # the zero-initialised net predicts 0
    assert after < minimum + 0.25 * (before - minimum)


def test_training_is_reproducible():
    data, truth = gaussian_vectors(256)
    config = TrainConfig(steps=30, **FAST)
    nets = [make_mlp(), make_mlp()]
    results = [train_score_model(net, truth.sde, data, config, progress=False) for net in nets]
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), k
    assert results[0].loss_history == results[1].loss_history
    other = make_mlp()
    train_score_model(other, truth.sde, data, TrainConfig(steps=30, **{**FAST, "seed": 1}), progress=False)
    assert not torch.equal(other.out.weight, nets[0].out.weight)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    data, truth = gaussian_vectors(256)
    sde = truth.sde
    whole = make_mlp()
    full = train_score_model(whole, sde, data, TrainConfig(steps=40, **FAST), progress=False)

    path = tmp_path / "ckpt.pt"
    first = make_mlp()
    train_score_model(first, sde, data, TrainConfig(steps=20, checkpoint_every=7, **FAST),
                      checkpoint=path, progress=False, provenance="test data")
    assert load_checkpoint(path)["step"] == 20
    second = make_mlp(seed=5)  # the checkpoint's weights replace this initialisation
    resumed = train_score_model(second, sde, data, TrainConfig(steps=40, **FAST), checkpoint=path,
                                progress=False)

    for (k, a), b in zip(whole.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    for k, a in full.ema.shadow.items():
        assert torch.equal(a, resumed.ema.shadow[k]), k
    assert resumed.loss_history == full.loss_history
    assert resumed.steps == 40
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 40 and checkpoint["provenance"] is None
    assert checkpoint["train_config"]["steps"] == 40
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_resume_rejects_a_different_network(tmp_path):
    data, truth = gaussian_vectors(64)
    path = tmp_path / "ckpt.pt"
    train_score_model(make_mlp(), truth.sde, data, TrainConfig(steps=2, **FAST), checkpoint=path,
                      progress=False)
    with pytest.raises(ValueError, match="net_config"):
        train_score_model(MLP(4, hidden=16), truth.sde, data, TrainConfig(steps=4, **FAST),
                          checkpoint=path, progress=False)
    train_score_model(MLP(4, hidden=16), truth.sde, data, TrainConfig(steps=2, **FAST),
                      checkpoint=path, resume=False, progress=False)
    assert load_checkpoint(path)["net_config"]["hidden"] == 16


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, make_mlp(), VPSDE(), event_shape=(4,), step=3)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_mlp(), VPSDE(), event_shape=(4,), step=4)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_load_prior_returns_the_ema_network_as_a_score_prior(tmp_path):
    data, truth = gaussian_vectors(256)
    sde = truth.sde
    net = make_mlp()
    path = tmp_path / "prior.pt"
    result = train_score_model(net, sde, data, TrainConfig(steps=20, **FAST), checkpoint=path,
                               progress=False)
    prior = load_prior(path, t0=1e-3)
    assert isinstance(prior, ScorePrior)
    assert prior.event_shape == (4,) and prior.t0 == 1e-3
    assert not any(p.requires_grad for p in prior.score.parameters())

    ema_net = make_mlp()
    result.ema.copy_to(ema_net)
    x = torch.randn(3, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    expected = -ema_net(x, t) / sde.marginal(t)[1][:, None]
    torch.testing.assert_close(prior.score(x, t), expected)
    raw = load_prior(path, use_ema=False)
    torch.testing.assert_close(raw.score(x, t), -net(x, t) / sde.marginal(t)[1][:, None])

    logp = prior.log_prob(x, ODEOptions(rtol=1e-4, atol=1e-4))
    assert logp.shape == (3,) and torch.isfinite(logp).all()


def test_bad_checkpoints_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pt.*not a scoreprior checkpoint"):
        load_checkpoint(tensor)

    good = tmp_path / "good.pt"
    save_checkpoint(good, make_mlp(), VPSDE(), event_shape=(4,))
    checkpoint = torch.load(good, weights_only=True)

    old = tmp_path / "old.pt"
    torch.save({**checkpoint, "version": CHECKPOINT_VERSION + 1}, old)
    with pytest.raises(ValueError, match="old.pt.*version"):
        load_checkpoint(old)

    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in checkpoint.items() if k != "ema"}, partial)
    with pytest.raises(ValueError, match="partial.pt.*missing keys.*ema"):
        load_prior(partial)


def test_train_config_validates():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="data"):
        train_score_model(make_mlp(), VPSDE(), torch.zeros(5, dtype=torch.long), TrainConfig(steps=1))


@pytest.mark.slow
def test_unet_prior_on_gaussian_fields_ranks_log_densities():
    """A small U-Net trained briefly on 8x8 fields orders held-out images like the true density."""
    sde = VPSDE()
    mean, cov = gaussian_field(8, 8)
    g = torch.Generator().manual_seed(0)
    data = sample_gaussian(mean, cov, 2048, generator=g).float()
    held_out = sample_gaussian(mean, cov, 16, generator=g).float()
    torch.manual_seed(0)
    # A low Fourier scale keeps the network smooth in t, so the ODE solve needs fewer steps.
    net = UNet(1, channels=(16, 32), fourier_scale=1.0)
    config = TrainConfig(steps=300, batch_size=64, lr=2e-3, warmup=50, ema_decay=0.99)
    result = train_score_model(net, sde, data, config, progress=False)
    result.ema.copy_to(net)
    net.requires_grad_(False)
    t0 = 1e-3
    prior = ScorePrior(NoisePredictionScore(net, sde), sde, t0=t0)
    logp = prior.log_prob(held_out, ODEOptions(rtol=1e-3, atol=1e-3))
    true = GaussianScore(mean, cov, sde).log_prob_t(held_out.double(), t0)
    corr = np.corrcoef(logp.numpy(), true.numpy())[0, 1]
    assert corr > 0.5, corr


def test_damaged_weights_are_refused_with_the_file_name(tmp_path):
    """Weights altered after writing (bit rot, a partial copy) fail the SHA-256; non-finite ones fail even
    in files written before digests were stored; untouched files of either kind load."""
    good = tmp_path / "good.pt"
    save_checkpoint(good, make_mlp(), VPSDE(), event_shape=(4,))
    checkpoint = torch.load(good, weights_only=True)
    assert set(checkpoint["weights_sha256"]) == {"net", "ema"}
    name = next(iter(checkpoint["net"]))

    altered = {**checkpoint, "net": {**checkpoint["net"], name: checkpoint["net"][name] * 1.001}}
    torch.save(altered, tmp_path / "altered.pt")
    with pytest.raises(ValueError, match="altered.pt: damaged file, the net weights do not match"):
        load_checkpoint(tmp_path / "altered.pt")

    legacy = {k: v for k, v in checkpoint.items() if k != "weights_sha256"}
    torch.save(legacy, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt")["step"] == 0
    poisoned = checkpoint["ema"]["shadow"][name].clone()
    poisoned.view(-1)[:3] = torch.tensor([math.nan, math.inf, -math.inf])
    legacy["ema"] = {**legacy["ema"], "shadow": {**legacy["ema"]["shadow"], name: poisoned}}
    torch.save(legacy, tmp_path / "legacy-nan.pt")
    with pytest.raises(ValueError, match=f"legacy-nan.pt: damaged file, 3 non-finite ema weights \\(in {name}"):
        load_prior(tmp_path / "legacy-nan.pt")


def test_checkpoints_record_the_training_data_range(tmp_path):
    data = torch.linspace(-0.5, 2.0, 64).reshape(16, 4)
    net = make_mlp()
    train_score_model(net, VPSDE(), data, TrainConfig(steps=1, batch_size=4, warmup=0), checkpoint=tmp_path / "c.pt",
                      progress=False)
    assert load_checkpoint(tmp_path / "c.pt")["data_range"] == [-0.5, 2.0]
    assert load_prior(tmp_path / "c.pt").data_range == (-0.5, 2.0)


def optimal_loss_likelihood(truth: GaussianScore, eps: float, n: int = 20001) -> float:
    """E_tau[1 - s^2 tr((a^2 C + s^2 I)^-1) / d], tau = log(s / a) ~ U(tau(eps), tau(1)), by the trapezoid rule."""
    sde = truth.sde
    ends = sde.log_noise_ratio(torch.tensor([eps, sde.T], dtype=torch.float64))
    tau = torch.linspace(float(ends[0]), float(ends[1]), n, dtype=torch.float64)
    a, s = sde.marginal(sde.time_at_log_noise_ratio(tau))
    f = 1.0 - (s[:, None] ** 2 / (a[:, None] ** 2 * truth.eigvals + s[:, None] ** 2)).mean(1)
    return (torch.trapezoid(f, tau) / (ends[1] - ends[0])).item()


def test_likelihood_time_sampling_matches_closed_form_minimum(sde):
    mean, cov = small_field()
    truth = GaussianScore(mean, cov, sde)
    g = torch.Generator().manual_seed(0)
    x0 = sample_gaussian(mean, cov, 40000, generator=g)
    losses = dsm_loss(ExactNoisePredictor(truth), sde, x0, generator=g, eps=1e-3, reduction="none",
                      time_sampling="likelihood")
    stderr = losses.std().item() / math.sqrt(losses.numel())
    expected = optimal_loss_likelihood(truth, 1e-3)
    assert abs(losses.mean().item() - expected) < 4 * stderr
    # The two weightings differ here, so the test can tell them apart.
    assert abs(expected - optimal_loss(truth, 1e-3)) > 20 * stderr


def test_likelihood_time_sampling_is_uniform_in_log_noise_ratio():
    sde = VPSDE()
    times = []

    def record(x, t):
        times.append(t)
        return torch.zeros_like(x)

    dsm_loss(record, sde, torch.zeros(4000, 2), generator=torch.Generator().manual_seed(1), eps=1e-4,
             time_sampling="likelihood")
    ends = sde.log_noise_ratio(torch.tensor([1e-4, 1.0], dtype=torch.float64))
    u = ((sde.log_noise_ratio(times[0].double()) - ends[0]) / (ends[1] - ends[0])).numpy()
    assert stats.kstest(u, "uniform").pvalue > 0.01
    with pytest.raises(ValueError, match="time_sampling"):
        dsm_loss(record, sde, torch.zeros(4, 2), time_sampling="log")


def test_gaussian_residual_net_is_the_wiener_denoiser_of_its_fit(sde):
    mean, cov = small_field()
    images = sample_gaussian(mean, cov, 500, generator=torch.Generator().manual_seed(2)).float()
    model = GaussianResidualNet.fit(UNet(1, channels=(8,), groups=4), sde, images, floor=1e-3)
    fitted = GaussianPrior.fit(images, floor=1e-3)
    exact = ExactNoisePredictor(GaussianScore(fitted.mean, fitted.cov, sde))
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.7, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), exact(x.double(), t.double()).float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.zeros(2, 1, 4, 8), t[:2])


def test_gaussian_residual_net_rebuilds_from_its_config(tmp_path):
    images = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    model = GaussianResidualNet.fit(UNet(1, channels=(8,), groups=4), VPSDE(), images, floor=1e-3)
    nn.init.normal_(model.net.conv_out.weight, std=0.1)
    rebuilt = build_net(model.config())
    rebuilt.load_state_dict(model.state_dict())
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([0.01, 0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), model(x, t))
    path = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError, match="Gaussian base"):
        train_score_model(model, VPSDE(beta_max=10.0), images, TrainConfig(steps=2, batch_size=8), progress=False)
    train_score_model(model, VPSDE(), images, TrainConfig(steps=2, batch_size=8, warmup=1), checkpoint=path,
                      progress=False)
    export = export_pretrained(path, tmp_path / "slim.pt")
    prior = load_pretrained(export)
    assert prior.score.net.eigvecs.dtype == torch.float32
    assert prior.score.net.net.conv_out.weight.dtype == torch.float32
    # The net's base Gaussian becomes the prior's gaussian_base (the base of log_prob's solver), however loaded.
    fitted = GaussianPrior.fit(images, floor=1e-3)
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for loaded in (prior, load_prior(path)):
        torch.testing.assert_close(loaded.gaussian_base.log_prob(x), fitted.log_prob(x), rtol=1e-5, atol=1e-4)


def test_learning_rate_schedules():
    constant = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert constant.learning_rate(0) == pytest.approx(1e-4)
    assert constant.learning_rate(9) == pytest.approx(1e-3)
    assert constant.learning_rate(99) == pytest.approx(1e-3)
    cosine = TrainConfig(steps=100, lr=1e-3, warmup=0, lr_schedule="cosine")
    assert cosine.learning_rate(0) == pytest.approx(1e-3)
    assert cosine.learning_rate(50) == pytest.approx(5e-4)
    assert cosine.learning_rate(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="time_sampling"):
        TrainConfig(time_sampling="log")
