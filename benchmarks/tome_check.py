"""Does token merging (ToMe for SD, Bolya & Hoffman 2023) pay on this CPU? Measured with the authors' own package.

    pip install --no-deps tomesd==0.1.3 && python benchmarks/tome_check.py --sizes 512 768 --repeats 3

An SD v1 UNet (diffusers' UNet2DConditionModel with SD v1's shapes, its own random initialisation, fp32) is timed
for one guided call (batch 2, 77 context tokens) at each image size, unpatched and after
`tomesd.apply_patch(unet, ratio=r)` (its defaults: merging in the self-attention of the highest-resolution blocks,
max_downsample 1), the variants interleaved, median of --repeats. Printed per size and ratio: seconds per call, the
speed-up, and the output's relative L2 error against the unpatched call (ToMe approximates: the error is its cost).
Only this check imports tomesd; ldm does not depend on it.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tomesd  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()

torch.manual_seed(0)
unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()  # SD v1's UNet
context = torch.randn(2, 77, 768)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| size | ToMe ratio | s per call (median) | speed-up | rel. L2 error |")
print("|---|---|---|---|---|")
for size in args.sizes:
    x, t = torch.randn(2, 4, size // 8, size // 8), torch.tensor([500, 500])
    times, outputs = {r: [] for r in [0.0, *args.ratios]}, {}
    for _ in range(args.repeats):
        for ratio in times:
            tomesd.remove_patch(unet)
            if ratio:
                tomesd.apply_patch(unet, ratio=ratio)
            with torch.no_grad():
                start = time.perf_counter()
                outputs[ratio] = unet(x, t, context).sample
                times[ratio].append(time.perf_counter() - start)
    base = statistics.median(times[0.0])
    for ratio, ts in times.items():
        error = ((outputs[ratio] - outputs[0.0]).norm() / outputs[0.0].norm()).item()
        print(f"| {size} | {ratio} | {statistics.median(ts):.2f} | {base / statistics.median(ts):.2f}x | {error:.4f} |")
