"""ComfyUI's sampling conventions on imported graphs, against values computed here from ComfyUI's
documented formulas (restated below, not its code): the sigma table of each scheduler name, the
batch's starting noise from one generator, ancestral noise from a fresh generator seeded with the
seed, integer timesteps, and the custom-sampling nodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from comfy_graphs import TXT2IMG

from ldmgraph.interop.comfyui import to_workflow


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (on a shared machine more threads only spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


T = 1000


def comfy_sigmas() -> torch.Tensor:
    """ModelSamplingDiscrete: SD's betas in float64, sigmas sqrt((1 - acp) / acp) (float64 here)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    return ((1 - acp) / acp).sqrt()


SIGMAS = comfy_sigmas().float()  # stored float32
LOG_SIGMAS = comfy_sigmas().log().float()  # the log taken in float64, then stored float32


def timestep(sigma: float) -> int:
    """The training step nearest in log-sigma (float32, the first one on a tie)."""
    return int((torch.tensor(sigma, dtype=torch.float32).log() - LOG_SIGMAS).abs().argmin())


def sigma_at(t: float) -> float:
    """Log-linear interpolation between the neighbouring training sigmas (float32)."""
    t32 = torch.tensor(t, dtype=torch.float32)
    low, high = int(t32.floor()), int(t32.ceil())
    w = t32 - low
    return float(((1 - w) * LOG_SIGMAS[low] + w * LOG_SIGMAS[high]).exp())


def comfy_schedule(name: str, steps: int) -> list[float]:
    s_min, s_max = float(SIGMAS[0]), float(SIGMAS[-1])
    if name in ("normal", "sgm_uniform"):
        start, end = timestep(s_max), timestep(s_min)
        ts = torch.linspace(start, end, steps + 1)[:-1] if name == "sgm_uniform" else torch.linspace(start, end, steps)
        return [sigma_at(float(t)) for t in ts] + [0.0]
    if name == "karras":
        ramp = np.linspace(0, 1, steps)
        return list((s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7) + [0.0]
    if name == "exponential":
        return list(np.exp(np.linspace(math.log(s_max), math.log(s_min), steps))) + [0.0]
    if name == "simple":
        stride = T / steps
        return [float(SIGMAS[-(1 + int(k * stride))]) for k in range(steps)] + [0.0]
    if name == "ddim_uniform":
        stride = max(T // steps, 1)
        return [float(SIGMAS[x]) for x in range(1, T, stride)][::-1] + [0.0]
    if name == "beta":
        from scipy.stats import beta

        ts = np.rint(beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (T - 1))
        kept = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
        return [float(SIGMAS[int(t)]) for t in kept] + [0.0]
    raise AssertionError(name)


NAMES = ("normal", "karras", "exponential", "simple", "sgm_uniform", "ddim_uniform", "beta")


def _loader() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
    }


def test_every_scheduler_name_gives_comfyuis_sigma_table(comfy_executor):
    graph = _loader()
    for i, (name, steps) in enumerate((n, s) for n in NAMES for s in (1, 6, 10, 25)):
        graph[f"s{i}"] = {"class_type": "BasicScheduler",
                          "inputs": {"model": ["1", 0], "scheduler": name, "steps": steps, "denoise": 1.0}}
    from ldmgraph.diffusion import NoiseSchedule
    from ldmgraph.diffusion.sampling import resolve

    ours = NoiseSchedule.from_config()
    schedules = {name: (lambda n, f=resolve("schedules", name): f(n, ours).float()) for name in NAMES}
    workflow = to_workflow(graph)
    wanted = [k for k in workflow["nodes"] if k.startswith("s")]
    result = comfy_executor.run(workflow, outputs=wanted)
    for i, (name, steps) in enumerate((n, s) for n in NAMES for s in (1, 6, 10, 25)):
        got = result.outputs[f"s{i}"]["sigmas"]
        expected = torch.tensor(comfy_schedule(name, steps)[-(steps + 1) :], dtype=torch.float32)  # BasicScheduler
        assert torch.allclose(schedules[name](steps), torch.tensor(comfy_schedule(name, steps), dtype=torch.float32), rtol=1e-5, atol=1e-6)
        assert got.shape == expected.shape, (name, steps)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (name, steps)
    ddim6 = schedules["ddim_uniform"](6)
    assert len(ddim6) == 8 and timestep(float(ddim6[0])) == 997  # KSampler: 7 steps from t = 997


def _comfy_denoiser(model, cond, uncond, cfg: float):
    """ComfyUI's CFG denoiser: the model sees x / sqrt(1 + sigma^2) at the integer timestep nearest
    in log-sigma, D = x - sigma * eps, and D = uncond + cfg (cond - uncond)."""

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(timestep(sigma)))
        x_in = x / math.sqrt(1 + sigma**2)
        d_cond = x - sigma * model.apply_model(x_in, t, context=cond.expand(x.shape[0], -1, -1))
        d_uncond = x - sigma * model.apply_model(x_in, t, context=uncond.expand(x.shape[0], -1, -1))
        return d_uncond + cfg * (d_cond - d_uncond)

    return denoise


def _ancestral_reference(model, cond, uncond, cfg: float, steps: int, seed: int, shape) -> torch.Tensor:
    """KSampler(euler_ancestral, normal) as ComfyUI computes it: the batch's noise from one generator
    seeded with the seed, times sqrt(1 + sigma^2) at the model's largest sigma; each step's noise
    from a second generator seeded with the seed."""
    sigmas = comfy_schedule("normal", steps)
    denoise = _comfy_denoiser(model, cond, uncond, cfg)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    step_noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = denoise(x, s)
            up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            down = math.sqrt(s_next**2 - up**2)
            x = x + (x - denoised) / s * (down - s)
            if s_next > 0:
                x = x + torch.randn(x.shape, generator=step_noise) * up
    return x


def _dpmpp_2m_sde_reference(model, cond, uncond, cfg: float, steps: int, seed: int, shape) -> torch.Tensor:
    """k-diffusion's DPM-Solver++(2M) SDE (midpoint, eta 1, s_noise 1) with its Brownian-tree noise
    sampler as ComfyUI seeds it: one torchsde BrownianTree over the whole batch, entropy = seed,
    on [smallest positive sigma, largest sigma]; a step's noise is (W(s_next) - W(s)) / sqrt|s_next - s|."""
    import torchsde

    sigmas = comfy_schedule("karras", steps)
    denoise = _comfy_denoiser(model, cond, uncond, cfg)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * math.sqrt(1 + sigmas[0] ** 2)
    low, high = min(s for s in sigmas if s > 0), max(sigmas)
    tree = torchsde.BrownianTree(low, torch.zeros(shape), high, entropy=seed)
    old, h_last = None, None
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = denoise(x, s)
            if s_next == 0:
                x = denoised
            else:
                h = math.log(s / s_next)
                x = s_next / s * math.exp(-h) * x - math.expm1(-2 * h) * denoised
                if old is not None:
                    x = x + 0.5 * -math.expm1(-2 * h) * (h / h_last) * (denoised - old)
                dw = -tree(s_next, s) / math.sqrt(s - s_next)  # W(s_next) - W(s), normalised
                x = x + dw * s_next * math.sqrt(-math.expm1(-2 * h))
                h_last = h
            old = denoised
    return x


def test_imported_dpmpp_2m_sde_matches_k_diffusion_with_brownian_noise(comfy_executor):
    graph = _loader()
    graph.update({
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 77}},
        "11": {"class_type": "CFGGuider",
               "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 2.0}},
        "12": {"class_type": "SamplerDPMPP_2M_SDE",
               "inputs": {"solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"}},
        "13": {"class_type": "BasicScheduler",
               "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 4, "denoise": 1.0}},
        "5": {"class_type": "SamplerCustomAdvanced",
              "inputs": {"noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
                         "latent_image": ["4", 0]}},
    })
    result = comfy_executor.run(to_workflow(graph), outputs=["1", "2", "3", "5"])
    got = result.outputs["5"]["output"].samples
    cond, uncond = result.outputs["2"]["conditioning"][0].context, result.outputs["3"]["conditioning"][0].context
    expected = _dpmpp_2m_sde_reference(result.outputs["1"]["model"], cond, uncond, 2.0, 4, 77, tuple(got.shape))
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("custom", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
def test_imported_ancestral_batch_matches_comfyuis_noise(comfy_executor, custom):
    graph = _loader()
    if custom:
        graph.update({
            "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 123}},
            "11": {"class_type": "CFGGuider",
                   "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": 3.0}},
            "12": {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}},
            "13": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}},
            "5": {"class_type": "SamplerCustomAdvanced",
                  "inputs": {"noise": ["10", 0], "guider": ["11", 0], "sampler": ["12", 0], "sigmas": ["13", 0],
                             "latent_image": ["4", 0]}},
        })
        out = "output"
    else:
        graph["5"] = {"class_type": "KSampler",
                      "inputs": {"seed": 123, "steps": 3, "cfg": 3.0, "sampler_name": "euler_ancestral",
                                 "scheduler": "normal", "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0],
                                 "negative": ["3", 0], "latent_image": ["4", 0]}}
        out = "latent"
    workflow = to_workflow(graph)
    result = comfy_executor.run(workflow, outputs=["1", "2", "3", "5"])
    model = result.outputs["1"]["model"]
    got = result.outputs["5"][out].samples
    cond, uncond = result.outputs["2"]["conditioning"][0].context, result.outputs["3"]["conditioning"][0].context
    expected = _ancestral_reference(model, cond, uncond, 3.0, 3, 123, tuple(got.shape))
    assert got.shape[0] == 2
    # 1e-5 of the latent's scale: the tiny random model leaves latents of magnitude ~50, where
    # float32 rounding alone (a different but equivalent order of operations) is ~1e-6 relative
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert not torch.equal(got[0], got[1])


def test_import_sets_comfyuis_convention_on_every_noise_source():
    graph = _loader()
    graph["5"] = {"class_type": "KSamplerAdvanced",
                  "inputs": {"add_noise": "enable", "noise_seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
                             "scheduler": "normal", "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                             "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 2,
                             "return_with_leftover_noise": "disable"}}
    graph["6"] = {"class_type": "DisableNoise", "inputs": {}}
    graph["7"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    nodes = to_workflow(graph)["nodes"]
    assert {nodes[k]["inputs"]["convention"] for k in ("5", "6", "7")} == {"comfyui"}


def test_imported_save_image_truncates_like_comfyui(comfy_executor):
    """ComfyUI writes clip(255 x) truncated to uint8; the imported SaveImage does the same."""
    import copy

    from comfy_graphs import API_TXT2IMG
    from PIL import Image

    workflow = to_workflow(copy.deepcopy(API_TXT2IMG))
    assert workflow["nodes"]["9"]["inputs"]["quantize"] == "truncate"
    result = comfy_executor.run(workflow, outputs=["8", "9"])
    decoded = np.asarray(result.outputs["8"]["image"])[0]
    (path,) = [f for f in result.files if f.name.startswith("comfy_txt2img_")]
    with Image.open(path) as png:
        written = np.asarray(png.convert("RGB"))
    assert np.array_equal(written, np.clip(decoded * 255.0, 0, 255).astype(np.uint8))
    assert not np.array_equal(written, np.clip(np.rint(decoded * 255.0), 0, 255).astype(np.uint8))
