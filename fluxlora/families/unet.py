"""SDXL and SD 1.5 families (UNet, DDPM objective): the same small interface as families.flux.

- Training: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n with a_t the scheduler's cumulative alphas and t drawn
  uniformly from the training timesteps; the target is the noise (epsilon) or v = sqrt(a_t) n -
  sqrt(1 - a_t) x0, as the scheduler's `prediction_type` says; optional min-SNR weighting
  (`train.loss_weighting: min_snr`, gamma `train.snr_gamma`), as in diffusers' training scripts.
- SDXL conditioning: both CLIP encoders' hidden states, the pooled projection and `add_time_ids`
  (original size, crop top-left, target size: the centre-cropped square the trainer caches).
- LoRA goes on the Linear layers of the UNet's transformer blocks; conv layers are out of scope.
- The trainer reaches the denoiser as ``pipe.transformer``; for these pipelines that name is set to the
  same UNet object (``pipe.unet``), so one code path serves every family.
The loop's "sigmas" are the uniform draws u in [0, 1); the timestep is floor(u * T).
"""

from __future__ import annotations

import torch

from fluxlora.families.flux import ModelLoadError, call_pipeline, open_pipeline

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


class UNetFamily:
    LORA_COMPONENT = "unet"
    EXPORT_FORMATS = ("diffusers",)
    TARGET_PRESETS = {"attn": ATTN, "attn_context": ATTN, "wide": ATTN + ["ff.net.0.proj", "ff.net.2"]}

    def __init__(self, name: str, pipeline: str, xl: bool, schedule=None):
        self.NAME, self._pipeline, self.xl, self.schedule = name, pipeline, xl, schedule

    def bind(self, pipe) -> "UNetFamily":
        """A copy that knows the pipeline's noise schedule (needed by noisy / loss_weights / predict)."""
        cfg = pipe.scheduler.config
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2 \
            if cfg.beta_schedule == "scaled_linear" else torch.linspace(cfg.beta_start, cfg.beta_end,
                                                                        cfg.num_train_timesteps, dtype=torch.float64)
        alphas = torch.cumprod(1 - betas, 0).float()
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return UNetFamily(self.NAME, self._pipeline, self.xl,
                          dict(alphas=alphas, prediction=cfg.get("prediction_type", "epsilon"), vae=vae_factor))

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self._pipeline)

    def load_pipeline(self, path: str, dtype: str = "fp32", revision: str | None = None, quantize: str = "none"):
        if quantize != "none":
            raise ModelLoadError(f"model.quantize {quantize!r} is for transformer families (flux, sd3) -> "
                                 "fix: set model.quantize=none for sdxl / sd15")
        kwargs = {} if self.xl else dict(safety_checker=None, requires_safety_checker=False)
        pipe = open_pipeline(self.pipeline_class(), path, dtype, revision, self.NAME, **kwargs)
        pipe.transformer = pipe.unet  # the trainer's name for the denoiser (see the module doc)
        return pipe

    def text_encoders(self, pipe) -> list:
        return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]

    def default_max_sequence_length(self, path: str) -> int:
        return 77  # CLIP

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden states [N, 77, D], pooled [N, P]; SD 1.5 has no pooled input: [N, 1] zeros)."""
        device = pipe.text_encoder.device
        if self.xl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            return embeds.cpu(), pooled.cpu()
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return embeds.cpu(), torch.zeros(len(prompts), 1)

    @torch.no_grad()
    def encode_images(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        shift = vae.config.get("shift_factor") or 0.0
        return ((mean - shift) * vae.config.scaling_factor).float().cpu()

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def image_ids(self, latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(0, device=device, dtype=dtype)

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

    def predict(self, unet, xt, u, embeds, pooled, img_ids, guidance: float) -> torch.Tensor:
        t = self._timesteps(u.cpu()).to(xt.device)
        extra = {}
        if self.xl:
            side_h, side_w = xt.shape[-2] * self.schedule["vae"], xt.shape[-1] * self.schedule["vae"]
            ids = torch.tensor([side_h, side_w, 0, 0, side_h, side_w], device=xt.device, dtype=xt.dtype)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.expand(xt.shape[0], 6)}}
        return unet(xt, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]

    def initial_noise(self, seed: int, channels: int, latent_h: int, latent_w: int) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(1, channels, latent_h, latent_w, generator=g)

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return pipe.unet.config.in_channels, resolution // f, resolution // f

    @torch.no_grad()
    def generate_many(self, pipe, embeds, pooled, neg, seeds: list[int], resolution: int, steps: int,
                      guidance: float, true_cfg: float) -> list:
        """Through the family's own pipeline; classifier-free guidance at scale ``guidance`` against
        ``neg`` (an empty prompt when None). Noise per seed from a CPU generator."""
        c, h, w = self.latent_shape(pipe, resolution)
        dev, dtype, n = pipe.unet.device, pipe.unet.dtype, len(seeds)
        kwargs = dict(prompt_embeds=embeds.to(dev, dtype))
        if guidance > 1.0:
            neg = neg if neg is not None else self.encode_prompts(pipe, [""], 77)
            kwargs["negative_prompt_embeds"] = neg[0].expand(n, -1, -1).to(dev, dtype)
            if self.xl:
                kwargs["negative_pooled_prompt_embeds"] = neg[1].expand(n, -1).to(dev, dtype)
        if self.xl:
            kwargs["pooled_prompt_embeds"] = pooled.to(dev, dtype)
        latents = torch.cat([self.initial_noise(s, c, h, w) for s in seeds]).to(dev, dtype)
        return call_pipeline(pipe, dev, latents=latents, height=resolution, width=resolution,
                             num_inference_steps=steps, guidance_scale=guidance, **kwargs)

    def generate(self, pipe, embeds, pooled, neg, seed: int, resolution: int, steps: int, guidance: float,
                 true_cfg: float):
        return self.generate_many(pipe, embeds, pooled, neg, [seed], resolution, steps, guidance, true_cfg)[0]


SDXL = UNetFamily("sdxl", "StableDiffusionXLPipeline", xl=True)
SD15 = UNetFamily("sd15", "StableDiffusionPipeline", xl=False)
