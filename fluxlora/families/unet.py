"""SDXL and SD 1.5 families (UNet, DDPM objective) behind the family interface.

- Training: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n with a_t the scheduler's cumulative alphas and t drawn
  uniformly from the training timesteps; the target is the noise (epsilon) or v = sqrt(a_t) n -
  sqrt(1 - a_t) x0, as the scheduler's `prediction_type` says; optional min-SNR weighting
  (`train.loss_weighting: min_snr`, gamma 5), as in diffusers' training scripts.
- SDXL conditioning: both CLIP encoders' hidden states, the pooled projection and `add_time_ids`
  (original size, crop top-left, target size: the centre-cropped square the trainer caches).
- LoRA goes on the Linear layers of the UNet's transformer blocks; conv layers are out of scope.
The loop's noise levels t are uniform draws u in [0, 1); the timestep is floor(u * T).
"""

from __future__ import annotations

import torch

from fluxlora.errors import ModelLoadError
from fluxlora.families.interface import Cond
from fluxlora.families.pipeline import call_pipeline, encode_images, initial_noise, open_pipeline, vae_factor

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


class UNetFamily:
    lora_component = "unet"
    target_presets = {"attn": ATTN, "attn_context": ATTN, "wide": ATTN + ["ff.net.0.proj", "ff.net.2"]}
    encode_images = staticmethod(encode_images)

    def __init__(self, name: str, pipeline: str, xl: bool, schedule=None):
        self.name, self._pipeline, self.xl, self.schedule = name, pipeline, xl, schedule

    def bind(self, pipe) -> "UNetFamily":
        """A copy that knows the pipeline's noise schedule and VAE factor (read by the training math)."""
        cfg = pipe.scheduler.config
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2 \
            if cfg.beta_schedule == "scaled_linear" else torch.linspace(cfg.beta_start, cfg.beta_end,
                                                                        cfg.num_train_timesteps, dtype=torch.float64)
        alphas = torch.cumprod(1 - betas, 0).float()
        return UNetFamily(self.name, self._pipeline, self.xl,
                          dict(alphas=alphas, prediction=cfg.get("prediction_type", "epsilon"), vae=vae_factor(pipe)))

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self._pipeline)

    def load(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        if quantize != "none":
            raise ModelLoadError(f"model.quantize {quantize!r} is for transformer families (flux, sd3) -> "
                                 "fix: set model.quantize=none for sdxl / sd15")
        kwargs = {} if self.xl else dict(safety_checker=None, requires_safety_checker=False)
        return open_pipeline(self.pipeline_class(), path, dtype, revision, self.name, **kwargs)

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.unet

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]

    def default_max_sequence_length(self) -> int:
        return 77  # CLIP

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> Cond:
        """-> Cond(embeds: hidden states [N, 77, D], and for SDXL pooled: [N, P]) on the CPU."""
        device = pipe.text_encoder.device
        if self.xl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            return Cond({"embeds": embeds.cpu(), "pooled": pooled.cpu()})
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Cond({"embeds": embeds.cpu()})

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def condition(self, text: Cond, latent_hw: tuple[int, int], guidance: float) -> Cond:
        """SDXL: add_time_ids (original size, crop top-left, target size) of the cached square, one row each."""
        if not self.xl:
            return text
        side_h, side_w = latent_hw[0] * self.schedule["vae"], latent_hw[1] * self.schedule["vae"]
        ids = torch.tensor([side_h, side_w, 0, 0, side_h, side_w], dtype=torch.float32)
        return Cond({**text.rows, "time_ids": ids.expand(len(text), 6)}, text.shared)

    def sample_sigmas(self, n: int, scheme: str, generator: torch.Generator, *unused) -> torch.Tensor:
        """Uniform draws in [0, 1) (DDPM trains on uniformly drawn timesteps; the flow-matching density
        options do not apply)."""
        return torch.rand(n, generator=generator)

    def _timesteps(self, u: torch.Tensor) -> torch.Tensor:
        return (u * len(self.schedule["alphas"])).long().clamp(max=len(self.schedule["alphas"]) - 1)

    def _alpha(self, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.schedule["alphas"][self._timesteps(u.cpu())].to(like.device, torch.float32)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alpha(u, x0)
        xt = (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)
        if self.schedule["prediction"] == "v_prediction":
            return xt, (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)
        return xt, noise

    def loss_weights(self, scheme: str, u: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        if scheme != "min_snr":
            return torch.ones_like(u, dtype=torch.float32)
        a = self.schedule["alphas"][self._timesteps(u.cpu())].to(u.device)
        snr = a / (1 - a)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.schedule["prediction"] == "v_prediction" else clipped / snr

    def predict(self, model, x_t, t, cond: Cond) -> torch.Tensor:
        extra = {}
        if self.xl:
            extra = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}
        timesteps = self._timesteps(t.cpu()).to(x_t.device)
        return model(x_t, timesteps, encoder_hidden_states=cond.embeds, return_dict=False, **extra)[0]

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = vae_factor(pipe)
        return pipe.unet.config.in_channels, resolution // f, resolution // f

    def pixel_multiple(self, pipe) -> int:
        return vae_factor(pipe)  # the UNet resamples odd latent sizes itself

    @torch.no_grad()
    def generate(self, pipe, cond: Cond, negative: Cond | None, seeds: list[int], resolution: int, steps: int,
                 guidance: float, true_cfg: float) -> list:
        """Through the family's own pipeline; classifier-free guidance at scale ``guidance`` against
        ``negative`` (an empty prompt when None). Noise per seed from a CPU generator."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype, n = pipe.unet.device, pipe.unet.dtype, len(seeds)
        cond = cond.to(dev, dtype)
        kwargs = dict(prompt_embeds=cond.embeds)
        if guidance > 1.0:
            neg = (negative if negative is not None else self.encode_prompts(pipe, [""], 77)).expand(n).to(dev, dtype)
            kwargs["negative_prompt_embeds"] = neg.embeds
            if self.xl:
                kwargs["negative_pooled_prompt_embeds"] = neg.pooled
        if self.xl:
            kwargs["pooled_prompt_embeds"] = cond.pooled
        latents = torch.cat([initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)
        return call_pipeline(pipe, dev, latents=latents, height=resolution, width=resolution,
                             num_inference_steps=steps, guidance_scale=guidance, **kwargs)


SDXL = UNetFamily("sdxl", "StableDiffusionXLPipeline", xl=True)
SD15 = UNetFamily("sd15", "StableDiffusionPipeline", xl=False)
