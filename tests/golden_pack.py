"""Access to a golden pack (format: ../shared/golden/README.md). Pack dir from MEGACTOR_GOLDEN_DIR."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from megactor_rt.config import ModelConfig, config_from_upstream
from megactor_rt.weights import MegActorModels, build_models, load_state_strict, strip_prefix

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT.parent / "shared" / "golden" / "public"


def pack_dir() -> Path:
    return Path(os.environ.get("MEGACTOR_GOLDEN_DIR", str(DEFAULT_DIR))).resolve()


@dataclass
class GoldenPack:
    path: Path

    @cached_property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @cached_property
    def vectors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "vectors.safetensors"))

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "weights.safetensors"))

    @property
    def run(self) -> dict:
        return self.config["run"]

    def model_config(self) -> ModelConfig:
        return config_from_upstream(self.config["architecture"], self.run["image_height"])

    def models(self) -> MegActorModels:
        models = build_models(self.model_config(), seed=0)
        prefixes = {"temporal_unet": "unet.", "reference_net": "appearance_encoder.", "vae": "vae.",
                    "clip_image_encoder": "image_encoder."}
        for name, module in models.modules().items():
            load_state_strict(module, strip_prefix(self.weights, prefixes[name]), name, self.path)
        return models

    def atol(self, name: str) -> float:
        return float(self.config["tolerances"][name]["atol"])

    def check(self, name: str, ours: torch.Tensor) -> float:
        """Assert max |ours - golden| <= atol of the pack; returns the error."""
        ref = self.vectors[name]
        assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
        err = (ours.detach().float().cpu() - ref.float()).abs().max().item()
        assert err <= self.atol(name), f"{name}: max abs err {err:.3g} > atol {self.atol(name):.3g}"
        return err
