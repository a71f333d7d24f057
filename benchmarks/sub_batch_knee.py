r"""Where txt2img's throughput stops growing with the sub-batch: the measurement behind ldm.pipeline's
SUB_BATCH_LATENTS (the latent pixels a sub-batch holds at most), on the embedded model, fp32 on CPU.

    python benchmarks/sub_batch_knee.py [--sizes 1 2 4 8 16 32 64 128 256] [--steps 10] [--repeats 2] \
        [--images N]

For each size, SUB_BATCH_LATENTS is set to size x the latent pixels of one image, so Pipeline.batch_size picks
that many images a sub-batch (fewer only where estimate_memory does not fit batch_memory: the table's "sub-batch"
column says what ran), and one `pipe.generate`-like call (Pipeline.sub_batches, the generator generate gathers) makes
`--images` images (default: the size, one sub-batch a call) with --steps steps of the model's sampler, guidance on,
seeds from 0. Printed per size: images/s (images / the whole call), median [min..max] over the repeats, its ratio to
the best size's median, and the seconds until the first sub-batch is made (what a user waits for the first PNG).
One warm-up call first; sizes interleaved in each repeat, in reverse order every other repeat, so a change of
machine phase hits every size; a GEMM rate is measured before each repeat to show how busy the host was.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_models import gemm_rate  # noqa: E402
from bench_txt2img import cpu_flags  # noqa: E402

import ldm.pipeline  # noqa: E402
from ldm.request import Request  # noqa: E402

PROMPT = "a red apple"


def call(pipe, request: Request) -> tuple[float, float]:
    """(seconds to the first sub-batch, seconds for the whole call) of one request."""
    t0 = time.perf_counter()
    batches = pipe.sub_batches(request, progress=False)
    next(batches)
    first = time.perf_counter() - t0
    for _ in batches:
        pass
    return first, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="images a sub-batch"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--images", type=int, help="images a call (default: the size, one sub-batch a call)")
    args = p.parse_args()
    pipe = ldm.load_pipeline()
    resolved = Request(PROMPT, steps=args.steps).resolved(pipe.cfg)
    latents = (resolved.height // pipe.vae_factor) * (resolved.width // pipe.vae_factor)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, embedded model, "
        f"{resolved.width}x{resolved.height} ({latents} latent pixels), {resolved.sampler}, {args.steps} steps, "
        f"guidance {resolved.scale}; SUB_BATCH_LATENTS in the library: {ldm.pipeline.SUB_BATCH_LATENTS}",
        flush=True,
    )

    def request(size: int) -> tuple[Request, int]:
        """The request of one call at this sub-batch size, and the sub-batch that runs."""
        ldm.pipeline.SUB_BATCH_LATENTS = size * latents
        n = args.images or size
        return Request(PROMPT, n_samples=n, steps=args.steps), pipe.batch_size(
            n, resolved.height, resolved.width, resolved.unet_rows
        )

    call(pipe, request(min(args.sizes))[0])  # warm-up
    first = {size: [] for size in args.sizes}
    rate = {size: [] for size in args.sizes}
    ran = {}
    gemm = []
    for r in range(args.repeats):
        gemm.append(gemm_rate())
        print(f"repeat {r + 1}: GEMM {gemm[-1]:.0f} GFLOP/s", flush=True)
        for size in args.sizes if r % 2 == 0 else args.sizes[::-1]:
            req, ran[size] = request(size)
            to_first, total = call(pipe, req)
            first[size].append(to_first)
            rate[size].append(req.n_samples / total)
            print(f"  {size}: {rate[size][-1]:.2f} images/s, first sub-batch {to_first:.1f} s", flush=True)
    best = max(statistics.median(rate[size]) for size in args.sizes)
    print(f"\nGEMM {statistics.median(gemm):.0f} GFLOP/s [{min(gemm):.0f}..{max(gemm):.0f}]")
    print(f"CPU flags (lscpu): {cpu_flags()}")
    print("| images a sub-batch | sub-batch | images/s, median [min..max] | ratio to best | first sub-batch, s |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        r, f = rate[size], first[size]
        print(
            f"| {size} | {ran[size]} | {statistics.median(r):.2f} [{min(r):.2f}..{max(r):.2f}] | "
            f"{statistics.median(r) / best:.2f} | {statistics.median(f):.1f} [{min(f):.1f}..{max(f):.1f}] |"
        )


if __name__ == "__main__":
    main()
