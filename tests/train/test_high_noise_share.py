"""--high-noise-share: part of each batch trains at the noise levels where only the text can say what
colour goes where (the noisy latent still shows colour at lower noise, so the model learns to read it
from there and never from the caption)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmgraph.train.ldm import alphas_cumprod, diffusion_loss


class _Timesteps(torch.nn.Module):
    """A stand-in denoiser that predicts zero and remembers the timesteps it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(t.clone())
        return torch.zeros_like(x[:, :4])


def _timesteps(share: float, start: int, batch: int = 400) -> torch.Tensor:
    model = _Timesteps()
    data = {"z0": torch.zeros(batch, 4, 2, 2), "concat": None, "context": None}
    diffusion_loss(model, data, alphas_cumprod(), torch.Generator().manual_seed(0), high_noise_share=share,
                   high_noise_from=start)
    return model.seen[0]


def test_the_share_of_the_batch_comes_from_the_high_noise_range() -> None:
    plain = _timesteps(0.0, 700)
    assert plain.min() < 100 and plain.max() > 900
    half = _timesteps(0.5, 700)
    assert (half[:200] >= 700).all() and half[:200].max() <= 999
    assert torch.equal(half[200:], plain[200:])  # the rest is drawn as before
    assert (_timesteps(1.0, 950) >= 950).all()


def test_cli_refuses_a_share_outside_0_to_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldmgraph.cli import main

    code = main(["train", "ldm", "--high-noise-share", "1.5", "--ae", str(tmp_path), "--pool", str(tmp_path / "pool"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "--high-noise-share 1.5" in capsys.readouterr().err
    assert not (tmp_path / "pool").exists()


def test_the_high_noise_weight_is_one_over_snr_between_1_and_the_cap() -> None:
    abar = alphas_cumprod()
    data = {"z0": torch.zeros(500, 4, 2, 2), "concat": None, "context": None}
    model = _Timesteps()
    weighted = diffusion_loss(model, data, abar, torch.Generator().manual_seed(0), high_noise_weight=20.0)
    plain = diffusion_loss(_Timesteps(), data, abar, torch.Generator().manual_seed(0))
    # the same draws as diffusion_loss makes: the timesteps, then eps; the stand-in predicts zero
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, abar.shape[0], (500,), generator=g)
    eps = torch.randn(500, 4, 2, 2, generator=g)
    assert torch.equal(t, model.seen[0])
    weight = ((1 - abar[t]) / abar[t]).clamp(1.0, 20.0).view(-1, 1, 1, 1)
    assert weight.min() == 1.0 and weight.max() == 20.0
    torch.testing.assert_close(plain, eps.pow(2).mean())
    torch.testing.assert_close(weighted, (eps.pow(2) * weight).mean())
