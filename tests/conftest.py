import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ~8 ms less per small op when the CPU is contended
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ldm.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture
def sd_cfg():
    return load_config(ROOT / "configs" / "sd-v1.yaml")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh non-zero random weights everywhere (zero-initialised output convs would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + 0.01 * torch.randn(p.shape, generator=g))
    return module


def compvis_original_config(cfg) -> dict:
    """Our ModelConfig written as the CompVis v1-inference.yaml dict that diffusers' converters read."""
    u, v = cfg.unet, cfg.vae
    return {
        "model": {
            "params": {
                "scale_factor": cfg.scale_factor,
                "unet_config": {
                    "params": {
                        "in_channels": u.in_channels,
                        "out_channels": u.out_channels,
                        "model_channels": u.model_channels,
                        "attention_resolutions": list(u.attention_resolutions),
                        "num_res_blocks": u.num_res_blocks,
                        "channel_mult": list(u.channel_mult),
                        "num_heads": u.num_heads,
                        "transformer_depth": u.transformer_depth,
                        "context_dim": u.context_dim,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "embed_dim": v.embed_dim,
                        "ddconfig": {
                            "double_z": v.double_z,
                            "z_channels": v.z_channels,
                            "resolution": v.resolution,
                            "in_channels": v.in_channels,
                            "out_ch": v.out_ch,
                            "ch": v.ch,
                            "ch_mult": list(v.ch_mult),
                            "num_res_blocks": v.num_res_blocks,
                            "attn_resolutions": list(v.attn_resolutions),
                        },
                    }
                },
            }
        }
    }
