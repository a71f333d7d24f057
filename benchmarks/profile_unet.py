"""Where one UNet call spends its time: torch.profiler's top ops, full SD v1 size, batch 2 (CFG), on CPU.

    python benchmarks/profile_unet.py [--latent 64] [--variant fp32|int8|bf16] [--rows 15] [--config configs/sd-v1.yaml]

Random weights; one warm-up call, then one profiled call. int8 is Pipeline's quantize="int8" (dynamic int8
Linear layers), bf16 the whole UNet in bfloat16 (as --dtype bf16).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ROOT, randomize_  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.patcher import quantize_int8_  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--variant", choices=["fp32", "int8", "bf16"], default="fp32")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sd-v1.yaml")
    args = p.parse_args()
    cfg = load_config(args.config).unet
    unet = randomize_(UNetModel(cfg)).eval()
    dtype = torch.bfloat16 if args.variant == "bf16" else torch.float32
    unet.to(dtype)
    if args.variant == "int8":
        quantize_int8_(unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, args.latent, args.latent, generator=g).to(dtype)
    t, c = torch.tensor([500, 500]), torch.randn(2, 77, cfg.context_dim, generator=g).to(dtype)
    with torch.inference_mode():
        unet(x, t, c)
        with torch.profiler.profile() as prof:
            unet(x, t, c)
    print(f"{args.variant}, latent {args.latent}x{args.latent}, {torch.get_num_threads()} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
