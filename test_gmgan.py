"""Tests for gmgan.py: tiny CPU configs in tmp_path, closed-form metric checks, CLI smoke tests.

    pytest test_gmgan.py          (or: make test)
"""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gmgan
from gmgan import Config, UserError

HERE = Path(__file__).resolve().parent
TINY = dict(batch_d=32, batch_g=32, epochs=1, threads=1, device="cpu", sample_every=1)


# ----------------------------------------------------------------------------- helpers


def write_idx_mnist(root, n_train=256, n_test=64, seed=0):
    """A tiny MNIST in torchvision's raw IDX layout: each digit a bright bar at its own row band."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def images(labels):
        x = rng.integers(0, 30, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, d in enumerate(labels):
            x[i, 2 + 2 * d : 4 + 2 * d, 4:24] = 255
        return x

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        x = images(labels)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return Path(root)


@pytest.fixture
def data_root(tmp_path):
    return write_idx_mnist(tmp_path / "data")


@pytest.fixture
def tiny_data(data_root):
    return gmgan.load_mnist(train=True, root=data_root, download=False)[0]


@pytest.fixture
def env_paths(tmp_path, data_root, monkeypatch):
    """DATA_PATH, CHECKPOINTS_PATH and CONFIG_PATH all inside tmp_path."""
    monkeypatch.setenv("DATA_PATH", str(data_root))
    monkeypatch.setenv("CHECKPOINTS_PATH", str(tmp_path / "ckpt"))
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "config.yaml"))
    (tmp_path / "config.yaml").write_text("")
    return tmp_path


def run_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(HERE / "gmgan.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or HERE, timeout=300)


def tiny_cfg(**kw):
    return Config(**{**TINY, **kw})


# ----------------------------------------------------------------------------- config


def test_config_precedence(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("sigma: 0.2\nepochs: 3\n")
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "c.yaml"))
    cfg = gmgan.resolve_config({"epochs": 5})
    assert (cfg.sigma, cfg.epochs, cfg.K) == (0.2, 5, Config().K)


@pytest.mark.parametrize("text, want", [("false", False), ("true", True), ("0", False), ("yes", True)])
def test_bool_flags_from_the_command_line(text, want):
    args = gmgan.build_parser().parse_args(["train", "--g_batchnorm", text])
    assert gmgan.make_config(gmgan.config_flags(args)).g_batchnorm is want


def test_config_empty_env_means_unset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIG_PATH", "")
    assert gmgan.resolve_config({}) == Config()


@pytest.mark.parametrize(
    "text, key",
    [("sigmaa: 0.1", "sigmaa"), ("sigma: abc", "sigma"), ("sigma: 0", "sigma"), ("sigma: -0.1", "sigma"),
     ("sigma: .nan", "sigma"), ("K: 0", "K"), ("K: 1.5", "K"), ("epochs: -1", "epochs"), ("batch_d: 0", "batch_d"),
     ("g_batchnorm: maybe", "g_batchnorm"), ("precision: fp8", "precision"), ("device: tpu", "device"),
     ("sigma: [1", "malformed YAML"), ("- 1\n- 2", "mapping")],
)
def test_config_errors_name_the_key(tmp_path, monkeypatch, text, key):
    (tmp_path / "c.yaml").write_text(text)
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "c.yaml"))
    with pytest.raises(UserError) as e:
        gmgan.resolve_config({})
    assert e.value.code == 2 and key in str(e.value) and "\n" not in str(e.value)


def test_config_missing_explicit_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="nope.yaml"):
        gmgan.resolve_config({})


# ----------------------------------------------------------------------------- latent and models


def test_latent_shapes_components_and_sigma():
    torch.manual_seed(0)
    m = gmgan.Mixture(K=4, dim=8, sigma=0.1, c=1.0)
    z, k = m.sample(1000)
    assert z.shape == (1000, 8) and k.shape == (1000,) and set(k.tolist()) == {0, 1, 2, 3}
    z, k = m.sample(4000, component=2, sigma=0.5)
    assert (k == 2).all()
    spread = (z - m.means[2]).detach()
    assert abs(spread.std().item() - 0.5) < 0.02  # σ is a standard deviation, not a variance
    z, _ = m.sample(4000, component=1)
    assert abs((z - m.means[1]).detach().std().item() - 0.1) < 0.005
    with pytest.raises(UserError):
        m.sample(3, component=4)


def test_means_learn_sigma_does_not():
    m = gmgan.Mixture(K=3, dim=5, sigma=0.2, c=0.1)
    assert [n for n, _ in m.named_parameters()] == ["means"]  # σ is a buffer: no optimiser can touch it
    z, _ = m.sample(64)
    z.square().sum().backward()
    assert m.means.grad is not None and m.means.grad.abs().sum() > 0
    assert not m.sigma.requires_grad and m.sigma.grad is None
    assert m.means.min() >= -0.1 and m.means.max() <= 0.1


def test_vanilla_prior_is_standard_normal():
    torch.manual_seed(0)
    z, _ = gmgan.Mixture(K=1, dim=100, sigma=1.0, c=0.0).sample(20000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_model_shapes_and_ranges():
    G, D, latent = gmgan.build(Config())
    z, _ = latent.sample(7)
    x = G(z * 100)  # far outside the usual range: tanh still bounds the output
    assert x.shape == (7, 784) and x.abs().max() <= 1
    assert D(x, noise_std=0.01).shape == (7,)
    linear = 100 * 256 + 256 + 256 * 512 + 512 + 512 * 1024 + 1024 + 1024 * 784 + 784
    assert sum(p.numel() for p in gmgan.Generator(batchnorm=False).parameters()) == linear
    assert sum(p.numel() for p in G.parameters()) == linear + 2 * (256 + 512 + 1024)  # BatchNorm's scale and shift


def test_discriminator_noise_only_in_training():
    D = gmgan.Discriminator(dropout=0.3).eval()
    x = torch.zeros(4, 784)
    assert torch.equal(D(x, noise_std=1.0), D(x, noise_std=1.0))


# ----------------------------------------------------------------------------- data


def test_tiny_idx_mnist_loads_through_torchvision(data_root):
    X, y = gmgan.load_mnist(train=True, root=data_root, download=False)
    assert X.shape == (256, 784) and X.dtype == torch.float32 and y.shape == (256,)
    assert X.min() >= -1 and X.max() == 1 and y.tolist()[:3] == [0, 1, 2]
    assert gmgan.load_mnist(train=False, root=data_root, download=False)[0].shape == (64, 784)


def test_missing_data_names_the_layout(tmp_path):
    with pytest.raises(UserError) as e:
        gmgan.load_mnist(root=tmp_path, download=False)
    msg = str(e.value)
    assert "MNIST/raw" in msg and "train-images-idx3-ubyte" in msg and "DATA_PATH" in msg


def test_truncated_idx_is_a_clear_error(data_root):
    f = data_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(UserError, match="unreadable"):
        gmgan.load_mnist(root=data_root, download=False)


@pytest.mark.skipif(not os.environ.get("DATA_PATH"), reason="DATA_PATH not set: real MNIST not available")
def test_real_mnist():
    X, y = gmgan.load_mnist(train=True, download=False)
    assert X.shape == (60000, 784) and X.min() == -1 and X.max() == 1 and torch.bincount(y).min() > 5000


# ----------------------------------------------------------------------------- training and checkpoints


def test_one_epoch_writes_every_run_file(tmp_path, tiny_data):
    out = gmgan.train(tiny_cfg(), tmp_path / "run", data=tiny_data, log=None)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"ckpt.pt", "G.pth", "config.yaml", "log.jsonl", "grid_epoch001.png"} <= files
    assert not [f for f in files if "tmp" in f]
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    for key in ("d_loss", "g_loss", "D(x)", "D(G(z))", "seconds", "images_per_s"):
        assert math.isfinite(rec[key]), key
    G, latent, cfg = gmgan.load_generator(out)
    assert cfg == tiny_cfg() and all(torch.isfinite(p).all() for p in G.parameters())
    raw, _, _ = gmgan.load_generator(tmp_path / "run" / "ckpt.pt")  # a run in progress can be sampled too
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), G.state_dict().values()))


def test_means_move_during_training(tmp_path, tiny_data):
    cfg = tiny_cfg()
    torch.manual_seed(cfg.seed)
    start = gmgan.build(cfg)[2].means.detach().clone()  # the same draws train() makes after seeding
    G, latent, _ = gmgan.load_generator(gmgan.train(cfg, tmp_path / "run", data=tiny_data, log=None))
    moved = (latent.means - start).abs()
    assert moved.max() > 1e-3 and moved.max() < 1  # the means learn, through G's loss, by small steps
    assert latent.sigma.item() == pytest.approx(cfg.sigma)


def test_resume_equals_uninterrupted(tmp_path, tiny_data):
    gmgan.train(tiny_cfg(epochs=2), tmp_path / "straight", data=tiny_data, log=None)
    gmgan.train(tiny_cfg(epochs=1), tmp_path / "split", data=tiny_data, log=None)
    gmgan.train(tiny_cfg(epochs=2), tmp_path / "split", data=tiny_data, resume=True, log=None)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("G", "D", "latent"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def test_weight_average_is_shipped_and_leaves_training_alone(tmp_path, tiny_data):
    gmgan.train(tiny_cfg(epochs=2), tmp_path / "plain", data=tiny_data, log=None)
    gmgan.train(tiny_cfg(epochs=1, g_ema=0.9), tmp_path / "ema", data=tiny_data, log=None)
    gmgan.train(tiny_cfg(epochs=2, g_ema=0.9), tmp_path / "ema", data=tiny_data, resume=True, log=None)
    plain = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    ema = torch.load(tmp_path / "ema" / "ckpt.pt", weights_only=True)
    shipped = torch.load(tmp_path / "ema" / "G.pth", weights_only=True)["G"]
    for name in plain["G"]:
        assert torch.equal(plain["G"][name], ema["G"][name])  # the average never feeds back into training
        assert torch.equal(shipped[name], ema["G_ema"][name])
    w = "net.0.weight"
    assert not torch.equal(ema["G_ema"][w], ema["G"][w])


def test_existing_run_is_never_overwritten(tmp_path, tiny_data):
    gmgan.train(tiny_cfg(), tmp_path / "run", data=tiny_data, log=None)
    with pytest.raises(UserError, match="--resume"):
        gmgan.train(tiny_cfg(), tmp_path / "run", data=tiny_data, log=None)
    with pytest.raises(UserError, match="sigma"):
        gmgan.train(tiny_cfg(sigma=0.3, epochs=2), tmp_path / "run", data=tiny_data, resume=True, log=None)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    gmgan.train(tiny_cfg(), tmp_path / "run", data=tiny_data, log=None)
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    poisoned = tiny_data.clone()
    poisoned[:] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        gmgan.train(tiny_cfg(epochs=2), tmp_path / "run", data=poisoned, resume=True, log=None)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    assert gmgan.load_checkpoint(tmp_path / "run" / "ckpt.pt", "gmgan-run")["epoch"] == 1


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(K=3, sigma=0.3)
    G, _, latent = gmgan.build(cfg)
    gmgan.atomic_save(gmgan.generator_payload(cfg, G, latent), tmp_path / "G.pth")
    G2, latent2, cfg2 = gmgan.load_generator(tmp_path / "G.pth")
    z, _ = latent.sample(5)
    assert cfg2 == cfg and torch.equal(latent2.means, latent.means) and torch.equal(G.eval()(z), G2(z))


class Payload:
    """Unpickling this would run code: create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["gmgan-G", "gmgan-run", "gmgan-mnist-cnn"])
def test_bad_checkpoints_are_one_line_errors(tmp_path, kind):
    good = tmp_path / "good.pth"
    G, _, latent = gmgan.build(Config())
    torch.save(gmgan.generator_payload(Config(), G, latent), good)
    marker = tmp_path / "pwned"
    cases = {
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "empty": b"",
        "text": b"hello, I am not a checkpoint\n",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"format": kind, "config": {}}, tmp_path / "missing_keys")
    torch.save([1, 2, 3], tmp_path / "foreign")
    torch.save({"format": kind, "payload": Payload(marker)}, tmp_path / "pickle_bomb")
    for name in [*cases, "missing_keys", "foreign", "pickle_bomb"]:
        with pytest.raises(UserError) as e:
            gmgan.load_checkpoint(tmp_path / name, kind)
        assert e.value.code == 1 and name in str(e.value) and "\n" not in str(e.value), name
    assert not marker.exists()


def test_mismatched_architecture_is_refused(tmp_path):
    cfg = Config(latent_dim=50)
    G, _, latent = gmgan.build(cfg)
    payload = gmgan.generator_payload(Config(), G, latent)  # claims latent_dim 100, holds 50
    torch.save(payload, tmp_path / "G.pth")
    with pytest.raises(UserError, match="do not match"):
        gmgan.load_generator(tmp_path / "G.pth")


# ----------------------------------------------------------------------------- generation


def test_generate_writes_pngs_matching_the_generator(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    cfg = Config()
    G, _, latent = gmgan.build(cfg)
    G.eval()
    out = tmp_path / "samples"
    out.mkdir()
    (out / "999.png").write_bytes(b"old")
    (out / "notes.txt").write_text("keep me")
    images, _ = gmgan.sample_images(G, latent, 25, seed=3)
    gmgan.write_pngs(images, out)
    assert sorted(int(p.stem) for p in out.glob("*.png")) == list(range(25))
    assert (out / "notes.txt").read_text() == "keep me"
    back = gmgan.read_png_folder(out)
    assert back.shape == (25, 784) and torch.allclose(back, images, atol=1 / 255 + 1e-6)
    with Image.open(out / "0.png") as im:
        px = np.asarray(im) / 255.0
        assert im.mode == "L" and px.min() >= 0 and px.max() <= 1
        assert np.allclose(px, (images[0].view(28, 28).numpy() + 1) / 2, atol=0.5 / 255 + 1e-6)
    again, _ = gmgan.sample_images(G, latent, 25, seed=3)
    assert torch.equal(images, again)  # generation has its own seeded generator


# ----------------------------------------------------------------------------- metrics


def brute_prdc(real, fake, k, k_dc):
    """Plain O(N²) reference: full distance matrices, sorted radii, no chunks, no tricks."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rr, ff, fr = d(real, real), d(fake, fake), d(fake, real)
    rad_r = np.sort(rr, axis=1)[:, k]
    rad_r_dc = np.sort(rr, axis=1)[:, k_dc]
    rad_f = np.sort(ff, axis=1)[:, k]
    return {
        "precision": (fr <= rad_r[None, :]).any(1).mean(),
        "recall": (fr.T <= rad_f[None, :]).any(1).mean(),
        "density": (fr <= rad_r_dc[None, :]).sum() / (k_dc * len(fake)),
        "coverage": (fr.min(0) <= rad_r_dc).mean(),
    }


@pytest.mark.parametrize("n, m, dim, chunk", [(50, 40, 3, 7), (120, 200, 8, 64), (300, 90, 16, 1000), (64, 64, 2, 1)])
def test_prdc_equals_brute_force(n, m, dim, chunk):
    g = torch.Generator().manual_seed(n + m)
    real = torch.randn(n, dim, generator=g, dtype=torch.float64)
    fake = torch.randn(m, dim, generator=g, dtype=torch.float64) * 1.2 + 0.3
    got = gmgan.prdc(real, fake, k=3, k_dc=5, chunk=chunk)
    want = brute_prdc(real.numpy(), fake.numpy(), 3, 5)
    cached = gmgan.prdc(real, fake, k=3, k_dc=5, chunk=chunk, real_radii=gmgan.knn_radii(real, {3, 5}))
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12) and cached[key] == got[key], key


def test_prdc_identical_and_far_apart():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    same = gmgan.prdc(x, x.clone())
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    far = gmgan.prdc(x, x + 1000)
    assert far["precision"] == 0 and far["recall"] == 0 and far["coverage"] == 0 and far["density"] == 0


def test_one_mode_generator_has_high_precision_low_recall():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 2, generator=g) * 10
    real = (centers[torch.arange(2000) % 10] + torch.randn(2000, 2, generator=g))
    fake = centers[0] + torch.randn(500, 2, generator=g)  # every sample is a good "0"
    m = gmgan.prdc(real, fake)
    assert m["precision"] > 0.9 and m["recall"] < 0.2  # never the other way round


def test_fid_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=g, dtype=torch.float64)
    assert abs(gmgan.fid(x, x)) < 1e-6
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25], dtype=torch.float64)
    assert gmgan.fid(x, x + delta) == pytest.approx(delta.square().sum().item(), abs=1e-6)
    # whitened samples: empirical mean 0 and covariance exactly I, then scaled per axis
    w = x - x.mean(0)
    w = w @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(w.T))).T
    a = torch.tensor([1.0, 4.0, 0.25, 2.0, 9.0, 1.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 1.0, 0.5, 4.0, 1.0], dtype=torch.float64)
    closed = (a.sqrt() - b.sqrt()).square().sum() + 1.0
    assert gmgan.fid(w * a.sqrt(), w * b.sqrt() + torch.tensor([1.0, 0, 0, 0, 0, 0])) == pytest.approx(closed.item(), abs=1e-6)
    y = torch.randn(1000, 6, generator=g, dtype=torch.float64) * 2 + 1
    assert gmgan.fid(x, y) == pytest.approx(gmgan.fid(y, x), rel=1e-9)


def test_fid_matches_scipy_sqrtm():
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 10, generator=g, dtype=torch.float64)
    y = torch.randn(400, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    s1, s2 = np.cov(x.numpy().T), np.cov(y.numpy().T)
    ref = ((x.mean(0) - y.mean(0)).square().sum().item() + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert gmgan.fid(x, y) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize(
    "real, fake, match",
    [(torch.full((10, 3), float("nan")), torch.zeros(10, 3), "NaN"), (torch.zeros(10, 3), torch.zeros(10, 4), "dimensions"),
     (torch.randn(10, 3), torch.randn(3, 3), "at least")],
)
def test_metric_inputs_are_checked(real, fake, match):
    with pytest.raises(UserError, match=match) as e:
        gmgan.prdc(real, fake)
    assert e.value.code == 2


def test_mode_stats_and_clusters():
    pred = torch.tensor([0] * 90 + [1] * 10)
    s = gmgan.mode_stats(pred, [0.1] * 10)
    assert s["digits_covered"] == 2 and s["histogram"][0] == 0.9 and s["kl"] > 1
    assert gmgan.mode_stats(torch.arange(100) % 10, [0.1] * 10)["kl"] == pytest.approx(0, abs=1e-9)
    rows = gmgan.cluster_table(torch.tensor([0, 0, 0, 1]), torch.tensor([7, 7, 3, 2]), K=3)
    assert rows[0]["digit"] == 7 and rows[0]["purity"] == pytest.approx(2 / 3) and rows[2]["n"] == 0


def test_classifier_round_trip_and_features(tmp_path, data_root):
    X, y = gmgan.load_mnist(train=True, root=data_root, download=False)
    model, acc = gmgan.train_classifier(X, y, X[:64], y[:64], epochs=2, log=lambda *a: None)
    assert acc > 0.5  # the tiny digits are easy bars
    path = tmp_path / "cnn.pth"
    gmgan.atomic_save({"format": "gmgan-mnist-cnn", "model": model.state_dict(), "test_acc": acc}, path)
    again = gmgan.load_classifier(path, train_if_missing=False)
    f1, p1 = gmgan.predict(model, X[:10])
    f2, p2 = gmgan.predict(again, X[:10])
    assert f1.shape == (10, 128) and (f1 >= 0).all() and torch.equal(f1, f2) and torch.equal(p1, p2)


# ----------------------------------------------------------------------------- command line


def test_cli_train_generate_evaluate(env_paths):
    env = {k: os.environ[k] for k in ("DATA_PATH", "CHECKPOINTS_PATH", "CONFIG_PATH")}
    ck = Path(env["CHECKPOINTS_PATH"])
    r = run_cli("train", "--run", "smoke", "--epochs", "1", "--batch_d", "32", "--batch_g", "32", "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and (ck / "smoke" / "G.pth").exists()
    samples = env_paths / "samples"
    r = run_cli("generate", "--checkpoint", str(ck / "smoke" / "G.pth"), "--n", "40", "--out", str(samples), env=env)
    assert r.returncode == 0, r.stderr
    assert len(list(samples.glob("[0-9]*.png"))) == 40 and (samples / "grid.png").exists()
    r = run_cli("evaluate", "--samples", str(samples), "--out", str(env_paths / "m.json"), env=env)
    assert r.returncode == 0, r.stderr
    assert "training the feature network" in r.stdout and "real vs real" in r.stdout
    m = json.loads((env_paths / "m.json").read_text())
    assert m["n"] == 40 and 0 <= m["precision"] <= 1 and m["floor"]["fid"] >= 0


def test_cli_errors_are_one_line(env_paths):
    env = {k: os.environ[k] for k in ("DATA_PATH", "CHECKPOINTS_PATH", "CONFIG_PATH")}
    r = run_cli("train", "--sigma", "-1", env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "sigma" in r.stderr
    (env_paths / "config.yaml").write_text("sigmaa: 0.1\n")
    r = run_cli("train", env=env)
    assert r.returncode == 2 and "sigmaa" in r.stderr and "Traceback" not in r.stderr
    (env_paths / "config.yaml").write_text("")
    r = run_cli("generate", "--sigma", "0", env=env)
    assert r.returncode == 2 and "--sigma must be a positive number" in r.stderr
    (env_paths / "bad.pth").write_bytes(b"junk")
    r = run_cli("generate", "--checkpoint", str(env_paths / "bad.pth"), env=env)
    assert r.returncode == 1 and "bad.pth" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- sweep, report, control


def make_env(tmp_path, data_root, config=""):
    (tmp_path / "config.yaml").write_text(config)
    return {"DATA_PATH": str(data_root), "CHECKPOINTS_PATH": str(tmp_path / "ckpt"),
            "CONFIG_PATH": str(tmp_path / "config.yaml")}


def run_make(*args, env, timeout=300):
    return subprocess.run(["make", "-C", str(HERE), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


SWEEP_KNOBS = lambda tmp_path: [f"CKPT={tmp_path / 'ckpt'}", f"RESULTS={tmp_path / 'results'}", "SIGMAS=0.1 0.5",
                                "SEEDS=0", "EPOCHS=1", "N=40", "THREADS=1", f"PYTHON={sys.executable}"]


def test_make_sweep_parses(tmp_path):
    r = run_make("-n", "sweep", "SIGMAS=0.1 0.5", "SEEDS=0 1", "EPOCHS=2", f"CKPT={tmp_path}",
                 f"RESULTS={tmp_path}", env={}, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("gmgan.py train") == 6 and r.stdout.count("gmgan.py evaluate") == 6
    assert "--K 1 --c 0 --sigma 1 --seed 1" in r.stdout and "--sigma 0.5 --seed 0" in r.stdout


# ----------------------------------------------------------------------------- faults: nothing lost, nothing let in


def weights(path):
    ck = torch.load(path, weights_only=True)
    return ck["epoch"], {f"{k}.{n}": t for k in ("G", "D", "latent") for n, t in ck[k].items()}


def test_killed_mid_training_resumes_bit_for_bit(tmp_path):
    """SIGKILL `train` inside epochs 1, 2 and 3; each --resume ends on the uninterrupted run's weights."""
    import random
    import signal
    import time

    data = write_idx_mnist(tmp_path / "data", n_train=1200)
    env = make_env(tmp_path, data, "batch_d: 16\nbatch_g: 16\nepochs: 3\nthreads: 1\nsample_every: 3\n")
    args = [sys.executable, str(HERE / "gmgan.py"), "train"]
    subprocess.run(args + ["--run", "straight"], env={**os.environ, **env}, check=True, capture_output=True, timeout=300)
    want = weights(tmp_path / "ckpt" / "straight" / "ckpt.pt")
    rng = random.Random(0)
    for kill_in_epoch in (1, 2, 3):
        run = tmp_path / "ckpt" / f"killed{kill_in_epoch}"
        p = subprocess.Popen(args + ["--run", run.name], env={**os.environ, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logged = lambda: len((run / "log.jsonl").read_text().splitlines()) if (run / "log.jsonl").exists() else 0
        while not (run / "config.yaml").exists() or logged() < kill_in_epoch - 1:  # config.yaml: epoch 1 begins
            assert p.poll() is None, "training ended before it could be killed"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.4))  # somewhere inside the epoch (an epoch takes about 2 s here)
        p.send_signal(signal.SIGKILL)
        p.wait()
        done = logged()
        assert done == kill_in_epoch - 1, f"the kill landed in epoch {done + 1}, not {kill_in_epoch}"
        if (run / "ckpt.pt").exists():
            assert gmgan.load_checkpoint(run / "ckpt.pt", "gmgan-run")["epoch"] == done
        r = run_cli("train", "--run", run.name, "--resume", env=env)
        assert r.returncode == 0, r.stderr
        assert not list(run.glob(".*tmp*")), "a temp file was left behind"
        got = weights(run / "ckpt.pt")
        assert got[0] == want[0] == 3
        for name, tensor in want[1].items():
            assert torch.equal(tensor, got[1][name]), (kill_in_epoch, name)


def test_interrupted_sweep_finishes_and_reports(tmp_path, data_root):
    """Kill `make sweep` inside its second run; the rerun finishes it, redoes nothing, and writes every file."""
    import signal
    import time

    env = make_env(tmp_path, data_root, "batch_d: 32\nbatch_g: 32\n")
    knobs = SWEEP_KNOBS(tmp_path)
    first = tmp_path / "ckpt" / "sweep" / "sigma_0.1_seed_0" / "metrics.json"
    second = tmp_path / "ckpt" / "sweep" / "sigma_0.5_seed_0"
    p = subprocess.Popen(["make", "-C", str(HERE), "sweep", *knobs], env={**os.environ, **env},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not (second / "config.yaml").exists():  # the second run has started
        assert p.poll() is None, "sweep ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # make and its children, as a closed laptop would
    p.wait()
    assert first.exists() and not (tmp_path / "results" / "sweep.csv").exists()
    stamp = first.stat().st_mtime_ns, (first.parent / "G.pth").stat().st_mtime_ns
    r = run_make("sweep", *knobs, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep/sigma_0.1_seed_0 " not in r.stdout  # the finished run was not trained again
    assert (first.stat().st_mtime_ns, (first.parent / "G.pth").stat().st_mtime_ns) == stamp

    results = tmp_path / "results"
    for name in ("sweep.csv", "sweep.md", "fid.png", "precision_recall.png", "sigma_0.1.png", "sigma_0.5.png"):
        assert (results / name).stat().st_size > 0, name
    md = (results / "sweep.md").read_text()
    assert "σ = 0.1" in md and "vanilla" in md and "floor" in md
    assert len((results / "sweep.csv").read_text().splitlines()) == 4  # header + 2 σ + vanilla
    r = run_make("sweep", *knobs, env=env)
    assert r.returncode == 0 and "gmgan.py train" not in r.stdout and "gmgan.py evaluate" not in r.stdout

    # sampling-time control on one of the sweep's models
    r = run_cli("control", "--checkpoint", str(first.parent / "G.pth"), "--sigmas", "0.05", "0.2",
                "--n", "40", "--results", str(results), env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads((results / "control.json").read_text())["rows"]
    assert [row["sigma"] for row in rows] == [0.05, 0.2] and (results / "control.png").exists()


def test_corrupt_checkpoint_is_not_overwritten_by_resume(tmp_path, data_root):
    env = make_env(tmp_path, data_root, "batch_d: 32\nbatch_g: 32\nepochs: 1\nthreads: 1\n")
    assert run_cli("train", "--run", "r", env=env).returncode == 0
    ckpt = tmp_path / "ckpt" / "r" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    damaged = ckpt.read_bytes()
    r = run_cli("train", "--run", "r", "--resume", "--epochs", "2", env=env)
    assert r.returncode == 1 and "ckpt.pt" in r.stderr and r.stderr.count("\n") == 1
    assert ckpt.read_bytes() == damaged  # no silent fresh start over the user's run


def test_overflowing_learning_rate_stops_and_keeps_the_checkpoint(tmp_path, data_root):
    env = make_env(tmp_path, data_root, "batch_d: 32\nbatch_g: 32\nepochs: 1\nthreads: 1\n")
    assert run_cli("train", "--run", "r", env=env).returncode == 0
    ckpt = tmp_path / "ckpt" / "r" / "ckpt.pt"
    before = ckpt.read_bytes()
    r = run_cli("train", "--run", "r", "--resume", "--epochs", "3", "--lr_d", "1e30", "--lr_g", "1e30", env=env)
    assert r.returncode == 1 and "non-finite" in r.stderr and "Traceback" not in r.stderr
    assert ckpt.read_bytes() == before and gmgan.load_checkpoint(ckpt, "gmgan-run")["epoch"] == 1
    r = run_cli("train", "--run", "r", "--resume", "--epochs", "2", env=env)  # lower rates: it carries on
    assert r.returncode == 0, r.stderr


def test_every_torch_load_is_weights_only():
    import re

    source = (HERE / "gmgan.py").read_text()
    calls = re.findall(r"torch\.load\([^)]*\)", source)
    assert calls and all("weights_only=True" in c for c in calls)


def test_poisoned_reference_cache_is_not_unpickled(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("DATA_PATH", str(data_root))
    monkeypatch.setenv("CHECKPOINTS_PATH", str(tmp_path))
    marker = tmp_path / "pwned"
    torch.save({"key": "x", "payload": Payload(marker)}, tmp_path / "reference_cache.pt")
    ref = gmgan.reference(gmgan.MnistCNN().eval(), log=lambda *a: None)  # rebuilt, not trusted
    assert ref["feats"].shape == (64, 128) and not marker.exists()


@pytest.mark.parametrize(
    "config, extra, match",
    [("batch_d: 100000\n", [], "batch_d"), ("", ["--epochs", "-1"], "epochs"), ("K: 0\n", [], "K"),
     ("sigma: .nan\n", [], "sigma"), ("lr_d: fast\n", [], "lr_d"), ("{{{", [], "malformed")],
)
def test_bad_configuration_exits_2(tmp_path, data_root, config, extra, match):
    env = make_env(tmp_path, data_root, config)
    r = run_cli("train", "--run", "r", *extra, env=env)
    assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_unreadable_config_file(tmp_path, data_root):
    env = make_env(tmp_path, data_root)
    env["CONFIG_PATH"] = str(tmp_path)  # a folder, not a file
    r = run_cli("train", env=env)
    assert r.returncode == 2 and "cannot read config" in r.stderr


def test_bad_environment(tmp_path, data_root):
    env = make_env(tmp_path, data_root, "epochs: 1\n")
    (tmp_path / "empty").mkdir()
    for data, match in (("", "DATA_PATH is not set"), (str(tmp_path / "empty"), "MNIST/raw")):
        r = run_cli("train", "--run", "r", env={**env, "DATA_PATH": data})
        assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "a_file").write_text("")
    r = run_cli("train", env={**env, "CHECKPOINTS_PATH": str(tmp_path / "a_file" / "ckpt")})
    assert r.returncode == 1 and "a_file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    G, _, latent = gmgan.build(Config())
    torch.save(gmgan.generator_payload(Config(), G, latent), tmp_path / "G.pth")
    r = run_cli("generate", "--checkpoint", str(tmp_path / "G.pth"), "--n", "5", "--out", str(tmp_path / "a_file" / "s"), env=env)
    assert r.returncode == 1 and "a_file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_evaluation_inputs(tmp_path):
    from PIL import Image

    folder = tmp_path / "s"
    folder.mkdir()
    with pytest.raises(UserError, match="no numbered PNGs"):
        gmgan.read_png_folder(folder)
    with pytest.raises(UserError, match="no such"):
        gmgan.read_png_folder(tmp_path / "nope")
    for i in range(8):
        Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "grid.png").write_bytes(b"not even a png")  # not a numbered sample: ignored
    (folder / "notes.txt").write_text("ignored")
    assert gmgan.read_png_folder(folder).shape == (8, 784)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "8.png")
    with pytest.raises(UserError, match="28x28"):
        gmgan.read_png_folder(folder)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "8.png")
    with pytest.raises(UserError, match="grayscale"):
        gmgan.read_png_folder(folder)
    (folder / "8.png").write_bytes(b"truncated")
    with pytest.raises(UserError, match="unreadable"):
        gmgan.read_png_folder(folder)
    with pytest.raises(UserError, match="at least 6"):  # 4 images cannot give k_dc = 5 radii
        gmgan.prdc(torch.randn(50, 3), torch.randn(4, 3))
