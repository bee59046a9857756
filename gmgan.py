"""gmgan — a Gaussian-mixture GAN on MNIST: train, sample, score and sweep σ in one file.

The latent is a mixture of K Gaussians with learnable means and one fixed spread σ:
z = μ_k + σ·ε, k ~ Uniform{0..K-1}, ε ~ N(0, I). K = 1, c = 0, σ = 1 is the vanilla GAN.

    python gmgan.py train --sigma 0.1 --epochs 30      # a run in checkpoints/sigma_0.1/
    python gmgan.py generate                           # 10,000 PNGs from checkpoints/G.pth
    python gmgan.py classifier                         # the MNIST feature network
    python gmgan.py evaluate --samples samples         # FID, precision, recall, density, ...
    python gmgan.py control --checkpoint checkpoints/G.pth   # one model, many sampling σ
    python gmgan.py report                             # sweep table and plots in results/
    python gmgan.py bench                              # speed of training, generation, scoring
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input: printed as one line, then exit with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def config_error(message):
    return UserError(message, code=2)


# ----------------------------------------------------------------------------- Config


@dataclass
class Config:
    latent_dim: int = 100  # d, size of the latent z
    K: int = 10  # number of mixture components
    sigma: float = 0.1  # standard deviation of every component (covariance σ²I); fixed, never learned
    c: float = 0.1  # component means are initialised U(-c, c)
    means_lr: float = 1.0  # learning rate of the means as a multiple of lr_g
    g_ema: float = 0.0  # decay of a moving average of G's weights, shipped in G.pth (0: off, ship G itself)
    g_batchnorm: bool = True  # BatchNorm after G's hidden layers, so G is blind to the latent's scale (False: plain MLP)
    d_dropout: float = 0.3  # dropout after each hidden layer of D
    d_noise_std: float = 0.01  # std of the Gaussian instance noise on D's inputs
    d_noise_anneal: int = 0  # epochs over which that noise decays linearly to 0 (0: constant)
    label_smooth: float = 0.0  # D's target for real images is 1 - label_smooth (one-sided)
    lr_d: float = 2e-4  # Adam learning rate of D
    lr_g: float = 2e-4  # Adam learning rate of G (and, times means_lr, of the means)
    beta1: float = 0.5  # Adam β1 for both players
    beta2: float = 0.999  # Adam β2 for both players
    batch_d: int = 64  # real images (and as many fakes) per D update; one epoch = one pass of D
    batch_g: int = 128  # fakes per G update
    epochs: int = 30  # training epochs
    seed: int = 0  # seed of every random draw in training
    train_limit: int = 0  # use only the first N training images (0: all 60,000)
    precision: str = "fp32"  # fp32, or bf16 autocast for the matmuls
    sample_every: int = 5  # save a sample grid every this many epochs
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, mps
    threads: int = 0  # CPU threads for torch (0: every core available to the process)


# fields a resumed run may change (an average switched on mid-run starts from the current weights)
RUN_ONLY = {"epochs", "device", "threads", "sample_every", "lr_d", "lr_g", "g_ema"}


def _coerce(name, kind, value):
    """Check one config value against its field type; the message names the key."""
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise config_error(f"config: {name} must be {kind.__name__}, got {value!r}")


def validate(cfg):
    """Reject impossible values with a one-line message naming the key."""
    checks = {
        "latent_dim": cfg.latent_dim >= 1,
        "K": cfg.K >= 1,
        "sigma": math.isfinite(cfg.sigma) and cfg.sigma > 0,
        "c": math.isfinite(cfg.c) and cfg.c >= 0,
        "means_lr": math.isfinite(cfg.means_lr) and cfg.means_lr >= 0,
        "g_ema": 0 <= cfg.g_ema < 1,
        "d_dropout": 0 <= cfg.d_dropout < 1,
        "d_noise_std": math.isfinite(cfg.d_noise_std) and cfg.d_noise_std >= 0,
        "d_noise_anneal": cfg.d_noise_anneal >= 0,
        "label_smooth": 0 <= cfg.label_smooth < 0.5,
        "lr_d": math.isfinite(cfg.lr_d) and cfg.lr_d > 0,
        "lr_g": math.isfinite(cfg.lr_g) and cfg.lr_g > 0,
        "beta1": 0 <= cfg.beta1 < 1,
        "beta2": 0 <= cfg.beta2 < 1,
        "batch_d": cfg.batch_d >= 1,
        "batch_g": cfg.batch_g >= 1,
        "epochs": cfg.epochs >= 0,
        "train_limit": cfg.train_limit >= 0,
        "precision": cfg.precision in ("fp32", "bf16"),
        "sample_every": cfg.sample_every >= 1,
        "device": cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:"),
        "threads": cfg.threads >= 0,
    }
    for key, ok in checks.items():
        if not ok:
            raise config_error(f"config: bad value for {key}: {getattr(cfg, key)!r}")
    return cfg


def make_config(values, source="config"):
    """Config from a mapping; unknown keys and wrong types stop with a message."""
    if not isinstance(values, dict):
        raise config_error(f"{source}: expected a mapping of key: value, got {type(values).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise config_error(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kw = {k: _coerce(k, fields[k], v) for k, v in values.items()}
    return validate(Config(**kw))


def read_yaml(path):
    """The mapping in a YAML config file; a missing default file is an empty mapping."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise config_error(f"{path}: cannot read config ({e.strerror})")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise config_error(f"{path}: malformed YAML ({str(e).splitlines()[0]})")
    return {} if values is None else values


def env(name, default=None):
    """An environment variable, where empty means unset."""
    return os.environ.get(name) or default


def resolve_config(flags):
    """Defaults < config.yaml (CONFIG_PATH) < command-line flags."""
    path = env("CONFIG_PATH", "config.yaml")
    values = read_yaml(path)
    if values is None:
        if os.environ.get("CONFIG_PATH"):
            raise config_error(f"{path}: config file not found (CONFIG_PATH)")
        values = {}
    if not isinstance(values, dict):
        raise config_error(f"{path}: expected a mapping of key: value")
    return make_config({**values, **flags}, source=str(path))


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def setup(cfg, quiet=False):
    """Seed, threads and device, printed once."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cfg.threads or available)
    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    if not quiet:
        print(f"seed {cfg.seed} · device {device} · {torch.get_num_threads()} threads")
    return device


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------- Data

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def data_root():
    root = env("DATA_PATH")
    if root is None:
        raise UserError(
            "DATA_PATH is not set: point it (in .env or the shell) at the folder holding MNIST/raw/ "
            f"with {', '.join(MNIST_FILES)}"
        )
    return Path(root)


def load_mnist(train=True, root=None, download=True):
    """MNIST as (images in [-1, 1], shape (N, 784) float32; labels (N,) int64), via torchvision."""
    from torchvision.datasets import MNIST

    root = Path(root) if root is not None else data_root()
    layout = f"expected {root}/MNIST/raw/ with {', '.join(MNIST_FILES)}; set DATA_PATH to the folder holding MNIST/"
    if any(not (root / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
        if not download:
            raise UserError(f"MNIST not found: {layout}")
        try:
            with open(os.devnull, "w") as quiet:  # torchvision prints its download attempts
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    MNIST(str(root), train=train, download=True)
                finally:
                    sys.stdout = stdout
        except Exception:
            raise UserError(f"MNIST not found and could not be downloaded: {layout}")
    try:
        ds = MNIST(str(root), train=train, download=False)
    except Exception as e:
        raise UserError(f"MNIST files under {root}/MNIST/raw/ are unreadable ({type(e).__name__}: {e}); {layout}")
    images = ds.data.reshape(len(ds.data), 784).float().div_(127.5).sub_(1.0)
    return images, ds.targets.long()


# ----------------------------------------------------------------------------- Models


def mlp(sizes, act, dropout=0.0, batchnorm=False):
    """Linear layers with `act` (and optional BatchNorm / dropout) between them, none after the last."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if batchnorm else []
            layers.append(act())
            layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """z (n, latent_dim) -> images (n, 784) in (-1, 1)."""

    def __init__(self, latent_dim=100, batchnorm=True):
        super().__init__()
        self.net = mlp([latent_dim, 256, 512, 1024, 784], lambda: nn.LeakyReLU(0.2), batchnorm=batchnorm)

    def forward(self, z):
        return torch.tanh(self.net(z))


class Discriminator(nn.Module):
    """images (n, 784) -> logits (n,); Gaussian instance noise on the inputs while training."""

    def __init__(self, dropout=0.3):
        super().__init__()
        self.net = mlp([784, 1024, 512, 256, 1], lambda: nn.LeakyReLU(0.2), dropout=dropout)

    def forward(self, x, noise_std=0.0):
        if self.training and noise_std > 0:
            x = x + noise_std * torch.randn_like(x)
        return self.net(x).squeeze(1)


# ----------------------------------------------------------------------------- Latent


class Mixture(nn.Module):
    """K Gaussians N(μ_k, σ²I) with uniform weights; the means learn, σ is a fixed buffer."""

    def __init__(self, K=10, dim=100, sigma=0.1, c=0.1):
        super().__init__()
        self.means = nn.Parameter(torch.empty(K, dim).uniform_(-c, c))
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def sample(self, n, sigma=None, component=None, generator=None):
        """(z (n, dim), component ids (n,)); `sigma` overrides the spread, `component` fixes k."""
        K, dim = self.means.shape
        dev = self.means.device
        if component is None:
            k = torch.randint(K, (n,), device=dev, generator=generator)
        else:
            if not 0 <= component < K:
                raise UserError(f"component must be in 0..{K - 1}, got {component}", code=2)
            k = torch.full((n,), component, device=dev, dtype=torch.long)
        eps = torch.randn(n, dim, device=dev, generator=generator)
        s = self.sigma if sigma is None else sigma
        return self.means[k] + s * eps, k


def build(cfg):
    """The three modules of a model, from its config."""
    return (
        Generator(cfg.latent_dim, cfg.g_batchnorm),
        Discriminator(cfg.d_dropout),
        Mixture(cfg.K, cfg.latent_dim, cfg.sigma, cfg.c),
    )


# ----------------------------------------------------------------------------- Checkpoints


def atomic_write(path, write):
    """write(file) into a temp file in the same folder, then os.replace: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


CKPT_KEYS = {
    "gmgan-run": {"config", "G", "D", "latent", "opt_g", "opt_d", "epoch", "rng"},
    "gmgan-G": {"config", "G", "latent"},
    "gmgan-mnist-cnn": {"model", "test_acc"},
}


def load_checkpoint(path, kind):
    """A checkpoint dict of the given kind (or one of a tuple of kinds), loaded without unpickling code."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable checkpoint (corrupt, truncated or unsafe: {reason[:160]})")
    if not isinstance(obj, dict) or obj.get("format") not in kinds:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: not a {' or '.join(kinds)} checkpoint (found {found!r})")
    missing = sorted(CKPT_KEYS[obj["format"]] - set(obj))
    if missing:
        raise UserError(f"{path}: checkpoint is missing {', '.join(missing)}")
    return obj


def load_state(module, state, path, what):
    try:
        module.load_state_dict(state)
    except Exception as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:200]
        raise UserError(f"{path}: {what} weights do not match the model ({detail})")


def checkpoint_config(obj, path):
    try:
        return make_config(obj["config"], source=f"{path} config")
    except UserError as e:
        raise UserError(str(e), code=1)


def load_generator(path, device="cpu"):
    """(G, mixture, config) from a G.pth — or from a run's ckpt.pt, whose G is the raw, unaveraged one."""
    obj = load_checkpoint(path, ("gmgan-G", "gmgan-run"))
    cfg = checkpoint_config(obj, path)
    G, _, latent = build(cfg)
    load_state(G, obj["G"], path, "generator")
    load_state(latent, obj["latent"], path, "mixture")
    return G.to(device).eval(), latent.to(device), cfg


def generator_payload(cfg, G, latent):
    return {"format": "gmgan-G", "config": asdict(cfg), "G": G.state_dict(), "latent": latent.state_dict()}


# ----------------------------------------------------------------------------- Train


def save_grid(images, path, nrow):
    from torchvision.utils import save_image

    save_image(images.float().view(-1, 1, 28, 28).add(1).div(2), str(path), nrow=nrow, padding=2)


def grid_latents(latent, ncol=10, seed=1234):
    """Fixed latents for the progress grids: one row per component (10 rows for K = 1)."""
    K, dim = latent.means.shape
    rows = K if K > 1 else 10
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(rows * ncol, dim, generator=g).to(latent.means.device)
    k = (torch.arange(rows * ncol) // ncol % K).to(latent.means.device)
    return k, eps


@torch.no_grad()
def render_grid(G, latent, path, sigma=None):
    k, eps = grid_latents(latent)
    was = G.training
    G.eval()
    z = latent.means[k] + (latent.sigma if sigma is None else sigma) * eps
    save_grid(G(z), path, nrow=10)
    G.train(was)


def digits_seen(G, latent, classifier, n=1000):
    """How many digits make up ≥ 2 % of n samples, as the feature network sees them (collapse watch)."""
    if classifier is None:
        return None
    g = torch.Generator(device=latent.means.device).manual_seed(0)
    with torch.no_grad():
        was = G.training
        G.eval()
        z, _ = latent.sample(n, generator=g)
        pred = classifier(G(z).float()).argmax(1)
        G.train(was)
    return int((torch.bincount(pred, minlength=10).float() / n >= 0.02).sum())


@torch.no_grad()
def update_ema(ema, G, decay):
    """ema ← decay·ema + (1 − decay)·G for the weights; BatchNorm's running statistics are copied."""
    for a, p in zip(ema.parameters(), G.parameters()):
        a.lerp_(p, 1 - decay)
    for a, b in zip(ema.buffers(), G.buffers()):
        a.copy_(b)


def make_optimisers(cfg, G, D, latent):
    """Adam for each player; the means ride in G's optimiser at their own learning rate."""
    opt_g = torch.optim.Adam(
        [{"params": G.parameters()}, {"params": latent.parameters(), "lr": cfg.lr_g * cfg.means_lr}],
        lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2),
    )
    return opt_g, torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))


def make_step(cfg, G, D, latent, opt_g, opt_d, device):
    """The training step: (real batch (batch_d, 784), noise std) -> [d_loss, g_loss, mean D(x), mean D(G(z))]."""
    bd, bg = cfg.batch_d, cfg.batch_g
    n_fake = max(bd, bg)
    real_target = torch.full((bd,), 1.0 - cfg.label_smooth, device=device)
    zeros, ones = torch.zeros(bd, device=device), torch.ones(bg, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step(real, noise):
        z, _ = latent.sample(n_fake)
        with autocast:
            fake = G(z)  # one G forward serves both updates: G does not change in between

            # (1) update D: maximise log D(x) + log(1 - D(G(z))), real and fake in one batched pass
            logits = D(torch.cat([real, fake[:bd].detach()]), noise).float()
            d_real, d_fake = logits[:bd], logits[bd:]
            d_loss = F.binary_cross_entropy_with_logits(d_real, real_target) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        # (2) update G and the means: non-saturating, maximise log D(G(z)); D's weights need no gradient here
        D.requires_grad_(False)
        with autocast:
            g_loss = F.binary_cross_entropy_with_logits(D(fake[:bg], noise).float(), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)
        with torch.no_grad():
            return torch.stack([d_loss, g_loss, torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean()])

    return step


def train(cfg, run_dir, resume=False, data=None, classifier=None, log=print):
    """Train one GMGAN into run_dir; returns the path of its G.pth."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "ckpt.pt"
    if ckpt_path.exists() and not resume:
        raise UserError(f"{run_dir}: a run is already there; pass --resume to continue it or choose another --run")
    device = setup(cfg, quiet=log is None)
    log = log or (lambda *a: None)
    X = (data if data is not None else load_mnist(train=True)[0])
    if cfg.train_limit:
        X = X[: cfg.train_limit]
    if cfg.batch_d > len(X):
        raise config_error(f"config: bad value for batch_d: {cfg.batch_d} is larger than the data set ({len(X)})")
    X = X.to(device)

    G, D, latent = build(cfg)
    G, D, latent = G.to(device), D.to(device), latent.to(device)
    opt_g, opt_d = make_optimisers(cfg, G, D, latent)
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.g_ema else None  # never trained, only averaged
    start = 0
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, "gmgan-run")
        saved = checkpoint_config(ck, ckpt_path)
        changed = [k for k in asdict(cfg) if k not in RUN_ONLY and getattr(cfg, k) != getattr(saved, k)]
        if changed:
            k = changed[0]
            raise config_error(f"--resume: {ckpt_path} was trained with {k}={getattr(saved, k)!r}, not {getattr(cfg, k)!r}")
        for module, key in ((G, "G"), (D, "D"), (latent, "latent"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            load_state(module, ck[key], ckpt_path, key)
        if ema is not None and "G_ema" in ck:
            load_state(ema, ck["G_ema"], ckpt_path, "G_ema")
        elif ema is not None:
            ema.load_state_dict(G.state_dict())
        for group, lr in zip([*opt_g.param_groups, *opt_d.param_groups], [cfg.lr_g, cfg.lr_g * cfg.means_lr, cfg.lr_d]):
            group["lr"] = lr  # a resumed run may lower its learning rates (e.g. after a non-finite loss)
        start = int(ck["epoch"])
        torch.set_rng_state(ck["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        log(f"resuming {run_dir} at epoch {start + 1}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stray in run_dir.glob(".*.tmp*"):  # half-written files of a killed run are never read
        stray.unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))

    steps = len(X) // cfg.batch_d
    step_fn = make_step(cfg, G, D, latent, opt_g, opt_d, device)
    shipped = ema if ema is not None else G  # what G.pth will hold, and what grids and digits show
    G.train(), D.train()
    for epoch in range(start, cfg.epochs):
        noise = cfg.d_noise_std * (max(0.0, 1 - epoch / cfg.d_noise_anneal) if cfg.d_noise_anneal else 1.0)
        t0 = time.perf_counter()
        perm = torch.randperm(len(X), device=device)
        sums = torch.zeros(4, device=device)  # d_loss, g_loss, D(x), D(G(z))
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for step in bar:
            sums += step_fn(X[perm[step * cfg.batch_d : (step + 1) * cfg.batch_d]], noise)
            if ema is not None:
                update_ema(ema, G, cfg.g_ema)
            if step % 50 == 49 or step == steps - 1:
                if not torch.isfinite(sums).all():
                    kept = f"the last good checkpoint ({ckpt_path}, epoch {epoch}) is kept" if epoch else "nothing was saved"
                    raise UserError(f"{run_dir}: non-finite loss in epoch {epoch + 1} (step {step + 1}); stopped, {kept}; "
                                    "lower the learning rates (--lr_d, --lr_g) and --resume")
                bar.set_postfix(d=f"{sums[0].item() / (step + 1):.3f}", g=f"{sums[1].item() / (step + 1):.3f}")
        seconds = time.perf_counter() - t0
        d_loss_m, g_loss_m, dx, dgz = (sums / steps).tolist()
        digits = digits_seen(shipped, latent, classifier)
        record = {
            "epoch": epoch + 1, "d_loss": d_loss_m, "g_loss": g_loss_m, "D(x)": dx, "D(G(z))": dgz,
            "digits": digits, "seconds": seconds, "images_per_s": steps * cfg.batch_d / seconds,
        }
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        atomic_save(
            {"format": "gmgan-run", "config": asdict(cfg), "G": G.state_dict(), "D": D.state_dict(),
             "latent": latent.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
             "epoch": epoch + 1, "rng": rng, **({"G_ema": ema.state_dict()} if ema is not None else {})},
            ckpt_path,
        )
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
            render_grid(shipped, latent, run_dir / f"grid_epoch{epoch + 1:03d}.png")
        flag = "  ← looks collapsed" if digits is not None and digits <= 3 else ""
        log(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  d_loss {d_loss_m:.3f}  g_loss {g_loss_m:.3f}  D(x) {dx:.2f}  "
            f"D(G(z)) {dgz:.2f}  digits {digits if digits is not None else '-'}  {seconds:.1f}s  "
            f"{record['images_per_s']:.0f} img/s{flag}"
        )
    out = run_dir / "G.pth"
    atomic_save(generator_payload(cfg, shipped.eval(), latent), out)
    return out


# ----------------------------------------------------------------------------- Generate


@torch.no_grad()
def sample_images(G, latent, n, sigma=None, component=None, seed=0, batch=2000):
    """(images (n, 784) in (-1, 1) on the CPU, component ids (n,)), from a seeded generator."""
    g = torch.Generator(device=latent.means.device).manual_seed(seed)
    xs, ks = [], []
    for i in range(0, n, batch):
        z, k = latent.sample(min(batch, n - i), sigma=sigma, component=component, generator=g)
        xs.append(G(z).float().cpu())
        ks.append(k.cpu())
    return torch.cat(xs), torch.cat(ks)


def to_uint8(images):
    """(x + 1) / 2 in [0, 1], rounded to 8 bits: the pixel values on disk."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).view(-1, 28, 28).numpy()


def write_pngs(images, out):
    """images (n, 784) in [-1, 1] -> out/0.png ... out/{n-1}.png, replacing earlier numbered PNGs only."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UserError(f"{out}: folder is not writable")
    for old in out.glob("*.png"):
        if old.stem.isdigit():
            old.unlink()
    pixels = to_uint8(images)

    def write(i):
        Image.fromarray(pixels[i]).save(out / f"{i}.png", compress_level=1)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(len(pixels)), chunksize=256))


# ----------------------------------------------------------------------------- Metrics


def check_features(real, fake, k=None):
    """Both sets as float64 tensors (N, D), (M, D); bad input raises a one-line UserError (exit 2)."""
    real, fake = (torch.as_tensor(a).double() for a in (real, fake))
    for name, a in (("real", real), ("fake", fake)):
        if a.ndim != 2:
            raise UserError(f"{name} features must be a 2-d (samples, dims) array, got shape {tuple(a.shape)}", 2)
        if not torch.isfinite(a).all():
            raise UserError(f"{name} features contain NaN or Inf", 2)
        if k is not None and len(a) < k + 1:
            raise UserError(f"{name} set has {len(a)} samples; k = {k} needs at least {k + 1}", 2)
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}", 2)
    return real, fake


def fid(real, fake):
    """Fréchet distance between Gaussians fitted to real (N, D) and fake (M, D) features, in float64.

    Tr √(Σ1 Σ2) is computed in its symmetric form Σ √λ(√Σ1 Σ2 √Σ1), eigenvalues clipped at 0.
    """
    real, fake = check_features(real, fake)
    if min(len(real), len(fake)) < 2:
        raise UserError("FID needs at least 2 samples per set", 2)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = torch.cov(real.T).reshape(real.shape[1], -1), torch.cov(fake.T).reshape(fake.shape[1], -1)
    lam, vec = torch.linalg.eigh(s1)
    root1 = (vec * lam.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def _sq_dists(a, b):
    """Squared Euclidean distances (len(a), len(b)), clipped at 0."""
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_(min=0)


def _chunk(n, budget=2**24):
    return max(1, budget // max(n, 1))


def knn_radii(x, ks, chunk=None):
    """Squared distance from each row of x (N, D) to its k-th nearest other row, for each k in ks: {k: (N,)}."""
    kmax = max(ks)
    chunk = chunk or _chunk(len(x))
    out = []
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i : i + chunk], x)
        out.append(d.topk(kmax + 1, dim=1, largest=False).values)  # column 0 is the point itself
    top = torch.cat(out)
    return {k: top[:, k] for k in ks}


def prdc(real, fake, k=3, k_dc=5, chunk=None, real_radii=None):
    """Improved precision & recall (k-NN balls, k) and density & coverage (real balls only, k_dc).

    real (N, D), fake (M, D) -> dict of floats. A point is inside a ball when its squared distance
    is ≤ the ball's squared radius. One chunked pass over fake × real serves all four metrics.
    real_radii: knn_radii(real, {k, k_dc}) if already known (the reference set's are cached).
    """
    real, fake = check_features(real, fake, max(k, k_dc))
    r_real = real_radii if real_radii is not None else knn_radii(real, {k, k_dc}, chunk)
    r_fake = knn_radii(fake, {k}, chunk)[k]
    chunk = chunk or _chunk(len(real))
    precise = torch.zeros(len(fake), dtype=torch.bool)
    density = torch.zeros(len(fake), dtype=torch.float64)
    recalled = torch.zeros(len(real), dtype=torch.bool)
    nearest = torch.full((len(real),), math.inf, dtype=torch.float64)
    for i in range(0, len(fake), chunk):
        d = _sq_dists(fake[i : i + chunk], real)  # (chunk, N)
        precise[i : i + chunk] = (d <= r_real[k]).any(1)
        density[i : i + chunk] = (d <= r_real[k_dc]).sum(1).double()
        recalled |= (d <= r_fake[i : i + chunk, None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
    return {
        "precision": precise.double().mean().item(),
        "recall": recalled.double().mean().item(),
        "density": density.sum().item() / (k_dc * len(fake)),
        "coverage": (nearest <= r_real[k_dc]).double().mean().item(),
    }


def f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def histogram(labels, n=10):
    return (torch.bincount(torch.as_tensor(labels), minlength=n).double() / len(labels)).tolist()


def mode_stats(pred, ref_hist, threshold=0.02):
    """Digit histogram of predictions, digits with share ≥ threshold, KL(generated ‖ reference)."""
    p = torch.tensor(histogram(pred), dtype=torch.float64)
    q = torch.tensor(ref_hist, dtype=torch.float64).clamp(min=1e-12)
    kl = float((p * (p.clamp(min=1e-12) / q).log()).sum())
    return {"histogram": p.tolist(), "digits_covered": int((p >= threshold).sum()), "kl": kl}


def cluster_table(components, pred, K):
    """For each mixture component: its majority digit and the share of its samples that are that digit."""
    rows = []
    for k in range(K):
        p = pred[components == k]
        if len(p) == 0:
            rows.append({"component": k, "digit": None, "purity": None, "n": 0})
            continue
        counts = torch.bincount(p, minlength=10)
        rows.append({"component": k, "digit": int(counts.argmax()), "purity": float(counts.max() / len(p)), "n": len(p)})
    return rows


# ----------------------------------------------------------------------------- Evaluate


class MnistCNN(nn.Module):
    """The feature network: images (n, 784) in [-1, 1] -> logits (n, 10); features() -> (n, 128)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),  # 14 -> 7
        )
        self.fc = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU())  # 3136 -> 128
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def features(self, x):
        return self.fc(self.conv(x.view(-1, 1, 28, 28)))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(X, y, X_test, y_test, seed=0, epochs=5, batch=128, log=print):
    """The protocol's feature network: Adam 1e-3, batch 128, 5 epochs; returns (model, test accuracy)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=g)
        for i in tqdm(range(0, len(X), batch), desc=f"classifier epoch {epoch + 1}/{epochs}", leave=False, disable=None):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model, X_test, y_test)
        log(f"classifier epoch {epoch + 1}/{epochs}  test accuracy {acc:.2%}")
    return model.eval(), acc


@torch.no_grad()
def predict(model, X, batch=2000):
    """(features (n, 128) float64, predicted digits (n,)) of images (n, 784) in [-1, 1]."""
    model.eval()
    feats, preds = [], []
    for i in range(0, len(X), batch):
        f = model.features(X[i : i + batch].float())
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def accuracy(model, X, y):
    return float((predict(model, X)[1] == y).double().mean())


def classifier_path():
    return Path(env("CHECKPOINTS_PATH", "checkpoints")) / "mnist_cnn.pth"


def load_classifier(path=None, train_if_missing=True, log=print):
    """The shipped feature network; trained (and saved) on first use if the file is missing."""
    path = Path(path or classifier_path())
    if not path.exists() and train_if_missing:
        log(f"{path} is missing: training the feature network first (a few minutes)")
        return make_classifier(path, log=log)
    obj = load_checkpoint(path, "gmgan-mnist-cnn")
    model = MnistCNN()
    load_state(model, obj["model"], path, "feature network")
    return model.eval()


def make_classifier(path, seed=0, log=print):
    X, y = load_mnist(train=True)
    Xt, yt = load_mnist(train=False)
    model, acc = train_classifier(X, y, Xt, yt, seed=seed, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": "gmgan-mnist-cnn", "model": model.state_dict(), "test_acc": acc, "seed": seed}, path)
    log(f"feature network: test accuracy {acc:.2%} -> {path}")
    return model


def read_png_folder(folder, n=None):
    """Images (m, 784) in [-1, 1] from folder/0.png, 1.png, ... (other files are ignored)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such samples folder", 2)
    files = sorted((p for p in folder.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))[:n]
    if not files:
        raise UserError(f"{folder}: no numbered PNGs (0.png, 1.png, ...) to evaluate", 2)
    pixels = np.empty((len(files), 28, 28), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                if im.size != (28, 28) or im.mode != "L":
                    raise UserError(f"{p}: expected a 28x28 grayscale (L) PNG, got {im.size[0]}x{im.size[1]} {im.mode}", 2)
                pixels[i] = np.asarray(im)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{p}: unreadable image ({type(e).__name__})", 2)
    return torch.from_numpy(pixels).view(len(files), 784).float().div_(127.5).sub_(1.0)


def score(ref, feats, preds, k=3, k_dc=5, components=None, K=None):
    """Every metric of a generated set (features, predicted digits) against the reference features."""
    if len(feats) < feats.shape[1]:
        print(f"warning: {len(feats)} samples < {feats.shape[1]} feature dimensions: FID is unreliable", file=sys.stderr)
    m = {"n": len(feats), "k": k, "k_dc": k_dc, "fid": fid(ref["feats"], feats)}
    m.update(prdc(ref["feats"], feats, k, k_dc, real_radii=ref["radii"]))
    m["f1"] = f1(m["precision"], m["recall"])
    m.update(mode_stats(preds, ref["hist"]))
    if components is not None:
        m["clusters"] = cluster_table(components, preds, K)
    return m


def reference(model, k=3, k_dc=5, log=print):
    """Test-set features and histogram, and the real-vs-real floor (10k train vs test), cached on disk."""
    path = Path(env("CHECKPOINTS_PATH", "checkpoints")) / "reference_cache.pt"
    raw = data_root() / "MNIST" / "raw"
    data = [(raw / f).stat().st_size if (raw / f).exists() else 0 for f in MNIST_FILES]
    weights = b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values())
    key = f"{hashlib.sha256(weights).hexdigest()[:16]}-{raw.resolve()}-{data}-k{k}-{k_dc}-v2"  # stale when any changes
    if path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("key") == key:
                return obj
        except Exception:
            pass  # a stale or damaged cache is simply rebuilt
    log("computing reference features and the real-vs-real floor (cached for next time)")
    Xt, yt = load_mnist(train=False)
    X, _ = load_mnist(train=True)
    feats, _ = predict(model, Xt)
    ref = {"key": key, "feats": feats, "hist": histogram(yt), "radii": knn_radii(feats, {k, k_dc})}
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[: len(Xt)]
    f_train, p_train = predict(model, X[idx])
    ref["floor"] = score(ref, f_train, p_train, k, k_dc)
    try:
        atomic_save(ref, path)
    except OSError:
        pass  # a read-only checkpoints folder only costs recomputation
    return ref


METRIC_COLUMNS = [("fid", "FID", "{:.3f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
                  ("f1", "F1", "{:.3f}"), ("density", "density", "{:.3f}"), ("coverage", "coverage", "{:.3f}"),
                  ("digits_covered", "digits", "{}"), ("kl", "KL", "{:.3f}")]


def format_table(rows):
    """rows: [(label, metrics)] -> a fixed-width text table."""
    width = max(len(label) for label, _ in rows) + 2
    lines = ["".ljust(width) + "".join(h.rjust(10) for _, h, _ in METRIC_COLUMNS)]
    for label, m in rows:
        lines.append(label.ljust(width) + "".join(fmt.format(m[key]).rjust(10) for key, _, fmt in METRIC_COLUMNS))
    return "\n".join(lines)


def evaluate(images, model, ref, k=3, k_dc=5, components=None, K=None):
    feats, preds = predict(model, images)
    return score(ref, feats, preds, k, k_dc, components, K)



# ----------------------------------------------------------------------------- Sweep

REFERENCE_STUDY = {0.05: (0.975, 0.258), 0.1: (0.892, 0.790), 0.15: (0.756, 0.888), 0.2: (0.681, 0.864)}  # σ: (P, R), GUIDE.md


def control(G, latent, K, model, ref, sigmas, n=10000, seed=0, log=print):
    """One trained model sampled at several σ, each scored: the precision–recall knob without retraining."""
    rows = []
    for s in sigmas:
        images, comps = sample_images(G, latent, n, sigma=s, seed=seed)
        m = evaluate(images, model, ref, components=comps, K=K)
        m["sigma"] = s
        rows.append(m)
        log(f"σ {s:<6g} FID {m['fid']:8.2f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"density {m['density']:.3f}  coverage {m['coverage']:.3f}  digits {m['digits_covered']}")
    return rows


def write_json(obj, path):
    """JSON written atomically: a half-written metrics file is never taken for a finished one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def sweep_runs(sweep_dir):
    """One row per finished, scored sweep run: its name, σ (None for vanilla), seed, metrics, minutes."""
    rows = []
    for mpath in sorted(Path(sweep_dir).glob("*/metrics.json")):
        run = mpath.parent
        cfg = checkpoint_config({"config": yaml.safe_load((run / "config.yaml").read_text())}, run / "config.yaml")
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        vanilla = (cfg.K, cfg.c, cfg.sigma) == (1, 0.0, 1.0)
        rows.append({"run": run.name, "sigma": None if vanilla else cfg.sigma, "seed": cfg.seed, "epochs": len(log),
                     "minutes": sum(r["seconds"] for r in log) / 60, **json.loads(mpath.read_text())})
    return rows


REPORT_COLUMNS = ["fid", "precision", "recall", "density", "coverage", "digits_covered", "minutes"]


def aggregate(rows):
    """Mean and std over seeds per σ (vanilla last): [(label, σ, n_seeds, {col: (mean, std)})]."""
    groups = {}
    for r in rows:
        groups.setdefault(r["sigma"], []).append(r)
    out = []
    for sigma in sorted(groups, key=lambda s: math.inf if s is None else s):
        g = groups[sigma]
        stats = {c: (float(np.mean([r[c] for r in g])), float(np.std([r[c] for r in g]))) for c in REPORT_COLUMNS}
        out.append(("vanilla N(0, I)" if sigma is None else f"σ = {sigma:g}", sigma, len(g), stats))
    return out


def report(sweep_dir, results, control_rows=None, floor=None, log=print):
    """results/sweep.csv, sweep.md and the plots, from the scored runs in sweep_dir."""
    import csv

    rows = sweep_runs(sweep_dir)
    if not rows:
        raise UserError(f"{sweep_dir}: no scored runs (*/metrics.json) to report; run `make sweep` first")
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    floor = floor or rows[0]["floor"]
    with open(results / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "sigma", "seed", "epochs", *REPORT_COLUMNS, "f1", "kl"])
        for r in rows:
            w.writerow([r["run"], r["sigma"] if r["sigma"] is not None else "vanilla", r["seed"], r["epochs"],
                        *(f"{r[c]:.4f}" for c in REPORT_COLUMNS), f"{r['f1']:.4f}", f"{r['kl']:.4f}"])
    agg = aggregate(rows)
    fmt = lambda m, s, d: f"{m:.{d}f} ± {s:.{d}f}" if s > 0 else f"{m:.{d}f}"
    lines = ["| latent | seeds | FID | precision | recall | density | coverage | digits | train min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, _, n, st in agg:
        cells = [fmt(*st["fid"], 2), *(fmt(*st[c], 3) for c in ("precision", "recall", "density", "coverage")),
                 fmt(*st["digits_covered"], 1), fmt(*st["minutes"], 1)]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines.append(f"| real vs real (floor) | – | {floor['fid']:.2f} | {floor['precision']:.3f} | {floor['recall']:.3f} | "
                 f"{floor['density']:.3f} | {floor['coverage']:.3f} | {floor['digits_covered']} | – |")
    (results / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(agg, floor, results)
    for sigma in sorted({r["sigma"] for r in rows if r["sigma"] is not None}):
        first = min((r for r in rows if r["sigma"] == sigma), key=lambda r: r["seed"])
        plot_components(Path(sweep_dir) / first["run"] / "G.pth", first.get("clusters") or [],
                        results / f"sigma_{sigma:g}.png", f"trained and sampled at σ = {sigma:g}")
    if control_rows:
        plot_control(control_rows, floor, results / "control.png")
    log("\n".join(lines))
    log(f"wrote {results}/sweep.csv, sweep.md and plots")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_sweep(agg, floor, results):
    plt = _plt()
    mix = [(s, st) for _, s, _, st in agg if s is not None]
    base = next((st for _, s, _, st in agg if s is None), None)
    xs = [s for s, _ in mix]

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(xs, [st["fid"][0] for _, st in mix], yerr=[st["fid"][1] for _, st in mix], marker="o", capsize=3,
                label="Gaussian mixture")
    if base:
        m, sd = base["fid"]
        ax.axhspan(m - sd - 1e-9, m + sd + 1e-9, color="tab:orange", alpha=0.25)
        ax.axhline(m, color="tab:orange", label="vanilla N(0, I)")
    ax.axhline(floor["fid"], color="k", ls="--", label="real vs real (floor)")
    ax.set(xscale="log", yscale="log", xlabel="σ (training and sampling)", ylabel="FID (MNIST CNN features)",
           title="FID vs σ (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "fid.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, color in (("precision", "tab:blue"), ("recall", "tab:red")):
        a1.errorbar(xs, [st[key][0] for _, st in mix], yerr=[st[key][1] for _, st in mix], marker="o", capsize=3,
                    color=color, label=key)
        if base:
            a1.axhline(base[key][0], color=color, ls=":", label=f"vanilla {key}")
    a1.set(xscale="log", xlabel="σ (training and sampling)", ylabel="score", ylim=(0, 1.02), title="precision and recall vs σ")
    a1.legend(fontsize=9)
    a2.plot([st["recall"][0] for _, st in mix], [st["precision"][0] for _, st in mix], "o-", label="mixture, one run per σ")
    for i, (s, st) in enumerate(mix):  # labels alternate above and below so neighbours do not collide
        a2.annotate(f"σ={s:g}", (st["recall"][0], st["precision"][0]), textcoords="offset points",
                    xytext=(4, 6 if i % 2 == 0 else -14), fontsize=9)
    if base:
        a2.plot(base["recall"][0], base["precision"][0], "s", color="tab:orange", ms=9, label="vanilla N(0, I)")
    a2.plot(floor["recall"], floor["precision"], "*", color="k", ms=12, label="real vs real")
    low = min([0.5] + [st["precision"][0] - 0.05 for _, st in mix])
    a2.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(low, 1.02), title="precision–recall plane")
    a2.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    fig.savefig(results / "precision_recall.png", dpi=120)
    plt.close(fig)


def plot_control(rows, floor, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    ax.plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", label="this kit: one model, sampling σ varied")
    for r in rows:  # this kit's labels below-left of its points, the reference study's above-right of its own
        ax.annotate(f"{r['sigma']:g}", (r["recall"], r["precision"]), textcoords="offset points", xytext=(-6, -13),
                    ha="right", fontsize=9, color="tab:blue")
    ref = sorted(REFERENCE_STUDY.items())
    ax.plot([r for _, (p, r) in ref], [p for _, (p, r) in ref], "s--", color="tab:gray", label="reference study (σ = 0.05…0.2)")
    for s, (p, r) in ref:
        ax.annotate(f"{s:g}", (r, p), textcoords="offset points", xytext=(5, 4), fontsize=9, color="tab:gray")
    ax.plot(floor["recall"], floor["precision"], "*", color="k", ms=12, label="real vs real")
    low = min([0.5] + [r["precision"] - 0.05 for r in rows])
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.06, 1.02), ylim=(low, 1.02),
           title="precision–recall by sampling σ (labels: σ)")
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_components(g_path, clusters, path, title):
    """A sample grid, one row per component, each row labelled with its majority digit and purity."""
    plt = _plt()
    G, latent, cfg = load_generator(g_path)
    k, eps = grid_latents(latent)
    with torch.no_grad():
        images = G(latent.means[k] + latent.sigma * eps).view(-1, 10, 28, 28)
    rows = len(images)
    canvas = images.add(1).div(2).permute(0, 2, 1, 3).reshape(rows * 28, 10 * 28).numpy()
    fig, ax = plt.subplots(figsize=(5.2, 0.5 * rows + 0.8))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.grid(False)
    by_k = {c["component"]: c for c in clusters}
    labels = [f"k={i}: {by_k[i]['digit']} ({by_k[i]['purity']:.0%})" if by_k.get(i, {}).get("n") else f"k={i}"
              for i in range(rows)] if cfg.K > 1 else [""] * rows
    ax.set_yticks([28 * i + 14 for i in range(rows)], labels, fontsize=9)
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)



# ----------------------------------------------------------------------------- Bench


def linear_shapes(net):
    """(in, out) of every Linear layer of a network."""
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


def step_flops(cfg):
    """Matmul FLOPs of one kit step, analytically (forward 2·n·in·out, each backward product as much again)."""
    G, D, _ = build(cfg)
    pg, pd = (sum(i * o for i, o in linear_shapes(net)) for net in (G, D))
    bd, bg = cfg.batch_d, cfg.batch_g
    first_d = 784 * 1024  # D's input gradient is not needed in the D update
    return (2 * max(bd, bg) * pg + 4 * bg * pg  # G forward; G backward (weights + inputs, for the means)
            + 2 * 2 * bd * pd + 4 * 2 * bd * pd - 2 * 2 * bd * first_d  # D update: forward, backward
            + 2 * bg * pd + 2 * bg * pd)  # G update through frozen D: forward, input gradients only


def timed(fn, min_seconds=1.0, warmup=1):
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_gflops(cfg, dtype, batch=128):
    """Measured GFLOP/s of the model's layer shapes as plain matmuls (FLOP-weighted over the layers)."""
    flops = seconds = 0.0
    G, D, _ = build(cfg)
    for i, o in linear_shapes(G) + linear_shapes(D):
        a, w = torch.randn(batch, i, dtype=dtype), torch.randn(i, o, dtype=dtype)
        seconds += timed(lambda: a @ w, 0.3)
        flops += 2 * batch * i * o
    return flops / seconds / 1e9


def kit_images_per_s(cfg, X, steps):
    torch.manual_seed(0)
    G, D, latent = build(cfg)
    opt_g, opt_d = make_optimisers(cfg, G, D, latent)
    step = make_step(cfg, G, D, latent, opt_g, opt_d, torch.device("cpu"))
    perm = torch.randperm(len(X))
    batches = [X[perm[i * cfg.batch_d : (i + 1) * cfg.batch_d]] for i in range(steps)]
    step(batches[0], cfg.d_noise_std)
    t0 = time.perf_counter()
    for real in batches:
        step(real, cfg.d_noise_std)
    return steps * cfg.batch_d / (time.perf_counter() - t0)


def plain_images_per_s(cfg, root, steps, X=None):
    """The obvious loop: DataLoader with per-sample ToTensor + Normalize, separate forwards, nothing frozen.

    With X (images (N, 784)) the same step is fed from a tensor instead, to separate data from step costs.
    """
    from torchvision import transforms
    from torchvision.datasets import MNIST

    torch.manual_seed(0)
    if X is None:
        ds = MNIST(str(root), train=True, transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]))
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_d, shuffle=True, drop_last=True)
    else:
        loader = [(X[i * cfg.batch_d : (i + 1) * cfg.batch_d], None) for i in range(steps + 1)]
    G, D, latent = build(cfg)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    opt_g = torch.optim.Adam([*G.parameters(), *latent.parameters()], lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    bce = nn.BCEWithLogitsLoss()
    t0 = None
    for i, (real, _) in enumerate(loader):
        if i == 1:
            t0 = time.perf_counter()
        if i == steps + 1:
            break
        real = real.view(len(real), -1)
        z, _ = latent.sample(cfg.batch_d)
        fake = G(z)
        d_loss = bce(D(real, cfg.d_noise_std), torch.ones(len(real))) + bce(D(fake.detach(), cfg.d_noise_std), torch.zeros(len(real)))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        z, _ = latent.sample(cfg.batch_g)
        g_loss = bce(D(G(z), cfg.d_noise_std), torch.ones(cfg.batch_g))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    return steps * cfg.batch_d / (time.perf_counter() - t0)


def plain_metrics(real, fake, k=3, k_dc=5):
    """The plain reference: full distance matrices per metric (scipy cdist) and scipy's sqrtm FID."""
    from scipy import linalg
    from scipy.spatial.distance import cdist

    real, fake = np.asarray(real), np.asarray(fake)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU features make Σ1Σ2 singular; sqrtm says so, and copes
        warnings.simplefilter("ignore")
        out = {"fid": float(((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))}
    radius = lambda x, kk: np.sort(cdist(x, x), axis=1)[:, kk]
    out["precision"] = float((cdist(fake, real) <= radius(real, k)[None]).any(1).mean())
    out["recall"] = float((cdist(real, fake) <= radius(fake, k)[None]).any(1).mean())
    out["density"] = float((cdist(fake, real) <= radius(real, k_dc)[None]).sum() / (k_dc * len(fake)))
    out["coverage"] = float((cdist(real, fake).min(1) <= radius(real, k_dc)).mean())
    return out


def bench(cfg, steps=60, log=print):
    """Training, generation and evaluation speed on this machine, each beside a plain reference."""
    import platform
    import tempfile

    X, _ = load_mnist(train=True)
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    res["kit_images_per_s"] = kit_images_per_s(cfg, X, steps)
    res["kit_bf16_images_per_s"] = kit_images_per_s(replace(cfg, precision="bf16"), X, steps)
    res["plain_images_per_s"] = plain_images_per_s(cfg, data_root(), steps)
    res["plain_tensor_images_per_s"] = plain_images_per_s(cfg, None, steps, X)
    res["train_speedup"] = res["kit_images_per_s"] / res["plain_images_per_s"]
    res["flops_per_image"] = step_flops(cfg) / cfg.batch_d
    res["matmul_gflops_fp32"] = matmul_gflops(cfg, torch.float32)
    res["matmul_gflops_bf16"] = matmul_gflops(cfg, torch.bfloat16)
    res["kit_gflops"] = res["kit_images_per_s"] * res["flops_per_image"] / 1e9
    res["share_of_fp32_peak"] = res["kit_gflops"] / res["matmul_gflops_fp32"]
    res["kit_bf16_share_of_bf16_peak"] = res["kit_bf16_images_per_s"] * res["flops_per_image"] / 1e9 / res["matmul_gflops_bf16"]

    g_path = checkpoints_dir() / "G.pth"
    G, latent, _ = load_generator(g_path) if g_path.exists() else (build(cfg)[0].eval(), build(cfg)[2], cfg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images, _ = sample_images(G, latent, 10000)
        write_pngs(images, tmp)
        res["generate_10k_s"] = time.perf_counter() - t0
    model = load_classifier()
    ref = reference(model)
    t0 = time.perf_counter()
    feats, preds = predict(model, images)
    kit = score(ref, feats, preds)
    res["evaluate_10k_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = plain_metrics(ref["feats"].numpy(), predict(model, images)[0].numpy())
    res["plain_evaluate_10k_s"] = time.perf_counter() - t0
    res["evaluate_speedup"] = res["plain_evaluate_10k_s"] / res["evaluate_10k_s"]
    res["max_metric_difference_vs_plain"] = max(abs(kit[key] - plain[key]) for key in plain)
    rows = [
        ("training, kit step (fp32)", f"{res['kit_images_per_s']:.0f} img/s", f"{res['train_speedup']:.2f}× plain"),
        ("training, kit step (bf16 autocast)", f"{res['kit_bf16_images_per_s']:.0f} img/s",
         f"{res['kit_bf16_images_per_s'] / res['plain_images_per_s']:.2f}× plain"),
        ("training, plain reference loop", f"{res['plain_images_per_s']:.0f} img/s", "1.00×"),
        ("  same plain step, data from a tensor", f"{res['plain_tensor_images_per_s']:.0f} img/s",
         f"{res['plain_tensor_images_per_s'] / res['plain_images_per_s']:.2f}× plain"),
        ("matmul peak at the model's shapes", f"{res['matmul_gflops_fp32']:.0f} GFLOP/s fp32",
         f"{res['matmul_gflops_bf16']:.0f} GFLOP/s bf16"),
        ("kit step, matmul work", f"{res['kit_gflops']:.0f} GFLOP/s", f"{res['share_of_fp32_peak']:.0%} of fp32 peak"),
        ("generate 10,000 PNGs", f"{res['generate_10k_s']:.2f} s", ""),
        ("evaluate 10k vs 10k (features + metrics)", f"{res['evaluate_10k_s']:.2f} s",
         f"{res['evaluate_speedup']:.1f}× plain ({res['plain_evaluate_10k_s']:.1f} s)"),
    ]
    log(res["machine"])
    for name, a, b in rows:
        log(f"{name:<44}{a:>22}   {b}")
    log(f"(analytic matmul work per training image: {res['flops_per_image'] / 1e6:.1f} MFLOP; "
        f"kit vs plain metrics differ by at most {res['max_metric_difference_vs_plain']:.2e})")
    return res


# ----------------------------------------------------------------------------- CLI


def checkpoints_dir():
    return Path(env("CHECKPOINTS_PATH", "checkpoints"))


def default_run_name(cfg):
    return "vanilla" if (cfg.K, cfg.c, cfg.sigma) == (1, 0.0, 1.0) else f"sigma_{cfg.sigma:g}"


def config_flags(args):
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}


def runtime(args):
    """Device and threads for commands that only run models, from the resolved config."""
    cfg = resolve_config({k: v for k, v in config_flags(args).items() if k in ("device", "threads", "seed")})
    return setup(cfg)


def check_positive(**values):
    """Command-line numbers that must be > 0 (None: not given)."""
    for name, v in values.items():
        for x in v if isinstance(v, list) else [v]:
            if x is not None and not (math.isfinite(x) and x > 0):
                raise UserError(f"--{name} must be a positive number, got {x}", 2)


def cmd_train(args):
    cfg = resolve_config(config_flags(args))
    run_dir = checkpoints_dir() / (args.run or default_run_name(cfg))
    classifier = load_classifier(train_if_missing=False) if classifier_path().exists() else None
    t0 = time.perf_counter()
    out = train(cfg, run_dir, resume=args.resume, classifier=classifier)
    print(f"trained {run_dir} in {(time.perf_counter() - t0) / 60:.1f} min -> {out}")


def cmd_generate(args):
    check_positive(n=args.n, sigma=args.sigma)
    device = runtime(args)
    G, latent, cfg = load_generator(args.checkpoint, device)
    t0 = time.perf_counter()
    images, _ = sample_images(G, latent, args.n, args.sigma, args.component, args.seed)
    write_pngs(images, args.out)
    render_grid(G, latent, Path(args.out) / "grid.png", args.sigma)
    sigma = args.sigma if args.sigma is not None else cfg.sigma
    print(f"wrote {args.n} PNGs (σ = {sigma:g}) and grid.png to {args.out}/ in {time.perf_counter() - t0:.1f}s")


def cmd_classifier(args):
    runtime(args)
    make_classifier(Path(args.out or classifier_path()), seed=args.seed or 0)


def cmd_evaluate(args):
    check_positive(n=args.n, sigma=args.sigma, k=args.k, k_dc=args.k_dc)
    device = runtime(args)
    model = load_classifier()
    ref = reference(model, args.k, args.k_dc)
    if args.samples:
        images, components, K, label = read_png_folder(args.samples, args.n), None, None, str(args.samples)
    else:
        G, latent, cfg = load_generator(args.checkpoint, device)
        images, components = sample_images(G, latent, args.n, args.sigma, seed=args.seed or 0)
        K, label = cfg.K, f"{args.checkpoint} σ={args.sigma if args.sigma is not None else cfg.sigma:g}"
    t0 = time.perf_counter()
    m = evaluate(images, model, ref, args.k, args.k_dc, components, K)
    m.update(source=label, seconds=time.perf_counter() - t0, floor=ref["floor"])
    print_metrics(label, m)
    if args.out:
        write_json(m, args.out)
        print(f"wrote {args.out}")
    return m


def print_metrics(label, m):
    print(format_table([(label, m), ("real vs real (floor)", m["floor"])]))
    print("digit histogram: " + " ".join(f"{d}:{p:.1%}" for d, p in enumerate(m["histogram"])))
    if m.get("clusters"):
        print("component → digit (purity): " + "  ".join(
            f"{r['component']}→{r['digit']} ({r['purity']:.0%})" for r in m["clusters"] if r["n"]))


def cmd_control(args):
    check_positive(n=args.n, sigmas=args.sigmas)
    device = runtime(args)
    model = load_classifier()
    ref = reference(model)
    G, latent, cfg = load_generator(args.checkpoint, device)
    rows = control(G, latent, cfg.K, model, ref, args.sigmas, args.n, args.seed or 0)
    results = Path(args.results)
    write_json({"checkpoint": str(args.checkpoint), "trained_sigma": cfg.sigma, "rows": rows, "floor": ref["floor"]},
               results / "control.json")
    plot_control(rows, ref["floor"], results / "control.png")
    print(f"wrote {results}/control.json and control.png")


def cmd_report(args):
    results = Path(args.results)
    ctrl = json.loads((results / "control.json").read_text()) if (results / "control.json").exists() else {}
    report(checkpoints_dir() / "sweep", results, ctrl.get("rows"))


def cmd_bench(args):
    cfg = resolve_config(config_flags(args))
    setup(cfg)
    res = bench(cfg, steps=args.steps)
    write_json(res, Path(args.results) / "bench.json")
    print(f"wrote {args.results}/bench.json")


def build_parser():
    parser = argparse.ArgumentParser(prog="gmgan.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_flags(p, names=None):
        for f in dataclasses.fields(Config):
            if names is None or f.name in names:  # bools arrive as text ("false") and are checked by make_config
                p.add_argument(f"--{f.name}", type=str if f.type is bool else f.type, default=None,
                               metavar=f.type.__name__.upper(), help=f"(default {f.default})")

    p = sub.add_parser("train", help="train one GMGAN into CHECKPOINTS_PATH/<run>/")
    p.add_argument("--run", help="run folder name under CHECKPOINTS_PATH (default: sigma_<σ> or vanilla)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    default_g = str(checkpoints_dir() / "G.pth")
    p = sub.add_parser("generate", help="write N PNGs and a grid from a G.pth")
    p.add_argument("--checkpoint", default=default_g)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--out", default="samples")
    p.add_argument("--sigma", type=float, help="sampling σ (default: the model's)")
    p.add_argument("--component", type=int, help="sample from this mixture component only")
    p.add_argument("--seed", type=int, default=0)
    add_config_flags(p, {"device", "threads"})
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("classifier", help="train the MNIST feature network")
    p.add_argument("--out", help="default CHECKPOINTS_PATH/mnist_cnn.pth")
    add_config_flags(p, {"device", "threads", "seed"})
    p.set_defaults(func=cmd_classifier)

    p = sub.add_parser("evaluate", help="FID, precision, recall, density, coverage, digits")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--samples", help="folder of PNGs written by generate")
    src.add_argument("--checkpoint", default=default_g, help="sample directly from this G.pth (default)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--k", type=int, default=3, help="k of precision and recall")
    p.add_argument("--k_dc", type=int, default=5, help="k of density and coverage")
    p.add_argument("--sigma", type=float, help="sampling σ (default: the model's)")
    p.add_argument("--out", help="write the metrics as JSON here")
    add_config_flags(p, {"device", "threads", "seed"})
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("control", help="score one model at several sampling σ (no retraining)")
    p.add_argument("--checkpoint", default=default_g)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--results", default="results")
    add_config_flags(p, {"device", "threads", "seed"})
    p.set_defaults(func=cmd_control)

    p = sub.add_parser("report", help="table and plots of the σ sweep in CHECKPOINTS_PATH/sweep/")
    p.add_argument("--results", default="results")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="training, generation and evaluation speed vs plain references")
    p.add_argument("--steps", type=int, default=60, help="training steps timed per loop")
    p.add_argument("--results", default="results")
    add_config_flags(p, {"threads", "batch_d", "batch_g"})
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)  # the shell's variables win
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gmgan: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("gmgan: interrupted; completed epochs are checkpointed (continue with --resume)", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"gmgan: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
