"""Subject metrics of the sample images, the DreamBooth paper's three (arXiv 2208.12242 section 4.1):

- ``dino``: mean cosine similarity between the DINO embeddings (the class token of the last layer) of each
  sample image and each instance image (subject fidelity; DINO separates individuals of one class better
  than CLIP does);
- ``clip_i``: the same with CLIP image embeddings;
- ``clip_t``: mean cosine similarity between each sample image's CLIP embedding and its prompt's (prompt
  fidelity).
Higher is better for all three. The models come from ``metrics.dino`` / ``metrics.clip`` (a local path or
a hub id), are loaded once per run, stay on the CPU and visit the accelerator only while scoring; the
instance images are embedded once. The toy world keeps its exact detectors (metrics.py); to the rest of
the system both are just metrics in metrics.jsonl.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxlora.errors import ModelLoadError
from fluxlora.families.pipeline import on_device


def _load(kind: str, path: str, loaders):
    try:
        return [loader.from_pretrained(path) for loader in loaders]
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the {kind} model of metrics.{kind} {path!r}: {e} -> fix: give a "
                             "local model folder or a reachable hub id, or set metrics.subject=false") from e


class SubjectMetrics:
    def __init__(self, dino_path: str, clip_path: str, instance_images: list, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = device
        self.dino, self.dino_processor = _load("dino", dino_path, (AutoModel, AutoImageProcessor))
        self.clip, self.clip_processor = _load("clip", clip_path, (CLIPModel, CLIPProcessor))
        for model in (self.dino, self.clip):
            model.eval().requires_grad_(False)
        with on_device(device, self.dino, self.clip):
            self.instance_dino = self._dino(instance_images)
            self.instance_clip = self._clip_images(instance_images)

    @torch.no_grad()
    def _dino(self, images: list) -> torch.Tensor:
        pixels = self.dino_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = self.dino(pixel_values=pixels.to(self.dino.device)).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1).cpu()

    @torch.no_grad()
    def _clip_images(self, images: list) -> torch.Tensor:
        pixels = self.clip_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.clip.get_image_features(pixel_values=pixels.to(self.clip.device))
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1).cpu()

    @torch.no_grad()
    def _clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        out = self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.clip.device),
                                          attention_mask=tokens["attention_mask"].to(self.clip.device))
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1).cpu()

    def score(self, images: list, prompts: list[str]) -> dict[str, float]:
        """``images[k]`` was generated from ``prompts[k]``."""
        with on_device(self.device, self.dino, self.clip):
            dino, clip_i, clip_t = self._dino(images), self._clip_images(images), self._clip_texts(prompts)
        return {"dino": float((dino @ self.instance_dino.T).mean()),
                "clip_i": float((clip_i @ self.instance_clip.T).mean()),
                "clip_t": float((clip_i * clip_t).sum(-1).mean())}
