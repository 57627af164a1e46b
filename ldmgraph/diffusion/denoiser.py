"""The denoiser wrapper: an eps- or v-predicting network as x0 = D(x, sigma).

Samplers integrate the variance-exploding ODE/SDE in x = x0 + sigma * eps (Karras et al. 2022),
while the network was trained on x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps. With
alpha_bar = 1 / (1 + sigma^2) the two are related by x_t = c_in * x, c_in = 1 / sqrt(sigma^2 + 1),
and D(x, sigma) = c_skip * x + c_out * F(c_in * x, t(sigma)) with (Karras et al. 2022, Table 1,
"VP" column, sigma_data = 1 for v):
  eps: c_skip = 1,                  c_out = -sigma
  v:   c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)   (Salimans & Ho 2022)
The timestep t(sigma) interpolates the training schedule in log-sigma (k-diffusion).

Conditioning arrives by route (`ldmgraph.conditioners`): `context` (cross-attention), `concat`,
`y` (the vector route) and `control` (residual sources, each applied only while sigma lies in its
start..end percent of the schedule, ComfyUI's convention: percent p maps to the sigma of timestep
(1 - p) * (T - 1)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ldmgraph.diffusion.errors import DiffusionError
from ldmgraph.diffusion.values import Control, DiffusionModel

PREDICTION_TYPES = ("eps", "v")


class Denoiser:
    """Wraps a `DiffusionModel` so that calling it returns the predicted clean latent x0."""

    def __init__(self, model: DiffusionModel) -> None:
        prediction = getattr(model, "prediction_type", "eps")
        if prediction not in PREDICTION_TYPES:
            raise DiffusionError(
                f"model prediction_type {prediction!r} is not supported; expected one of {PREDICTION_TYPES}"
            )
        self.model = model
        self.prediction_type = prediction
        self.noise_schedule = model.noise_schedule
        self.calls = 0  # network evaluations, for tests and progress figures
        self._timesteps: dict[float, float] = {}  # sigma -> t, memoised (schedules revisit sigmas)

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        context: Tensor | None = None,
        concat: Tensor | None = None,
        y: Tensor | None = None,
        control: Sequence[Control] = (),
    ) -> Tensor:
        """x0 for a batch x `[B, C, h, w]` at noise levels sigma (scalar, `[B]`, or `[B / n]` for
        n stacked copies of a batch, as CFG passes them)."""
        self.calls += 1
        values = sigma.reshape(-1).tolist()
        routes: dict[str, Any] = {"context": context, "concat": concat, "y": y}
        active = [c for c in control if self.in_range(c.start_percent, c.end_percent, float(values[0]))]
        if active:
            routes["control"] = active
        if len(set(values)) == 1:  # the usual case: one noise level for the whole batch
            return self._uniform(x, float(values[0]), routes)
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
        sigma = sigma.repeat(x.shape[0] // sigma.shape[0]) if sigma.shape[0] > 1 else sigma.expand(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        c_in = (s * s + 1).rsqrt()
        t = self.noise_schedule.sigma_to_t(sigma)
        out = self.model.apply_model(x * c_in, t, **routes).to(x.dtype)
        if self.prediction_type == "eps":
            return x - s * out
        return x * (c_in * c_in) - s * c_in * out

    def prepare(self, sigmas: Tensor) -> None:
        """Map a run's sigmas to timesteps in one vectorised call, before its first step: the
        sigma -> t lookup depends only on the schedule, so no step pays for it (samplers that
        evaluate between the listed sigmas still get theirs on demand)."""
        positive = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        positive = positive[positive > 0]
        if positive.numel():
            for sigma, t in zip(positive.tolist(), self.noise_schedule.sigma_to_t(positive).tolist(), strict=True):
                self._timesteps.setdefault(sigma, t)

    def sigma_at_percent(self, percent: float) -> float:
        """The sigma where `percent` of the schedule has passed (0 -> above sigma_max, 1 -> 0)."""
        if percent <= 0.0:
            return float("inf")
        if percent >= 1.0:
            return 0.0
        t = (1.0 - percent) * (self.noise_schedule.timesteps - 1)
        return float(self.noise_schedule.t_to_sigma(torch.tensor([t], dtype=torch.float32))[0])

    def in_range(self, start_percent: float, end_percent: float, sigma: float) -> bool:
        """Whether a contribution limited to start..end percent of the schedule applies at sigma."""
        if start_percent <= 0.0 and end_percent >= 1.0:
            return True
        return self.sigma_at_percent(end_percent) <= sigma <= self.sigma_at_percent(start_percent)

    def _uniform(self, x: Tensor, sigma: float, routes: dict[str, Any]) -> Tensor:
        """Same maths with a Python-float sigma: a handful of kernels per call instead of dozens."""
        t = self._timesteps.get(sigma)
        if t is None:
            t = float(self.noise_schedule.sigma_to_t(torch.tensor([sigma]))[0])
            self._timesteps[sigma] = t
        c_in = (sigma * sigma + 1) ** -0.5
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        out = self.model.apply_model(x * c_in, timesteps, **routes).to(x.dtype)
        if self.prediction_type == "eps":
            return torch.add(x, out, alpha=-sigma)
        return torch.add(x * (c_in * c_in), out, alpha=-sigma * c_in)
