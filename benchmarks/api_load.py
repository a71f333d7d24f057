"""The REST API under load: queued requests from several clients at once, none lost, memory flat, the time per image
the command line's.

    python benchmarks/api_load.py --requests 50 --clients 8 --steps 20

Starts `python -m ldm.webui --nowebui` (the embedded model, unless --ckpt) on a free port, sends 5 warm-up requests,
then --requests txt2img requests (seeds 0, 1, ...) from --clients threads at once: each answer must carry one image
and its own seed. The server's resident memory (RSS, with its children) is sampled every 0.2 s: printed after the
warm-up, after every 10 answers, at its peak. The time per image is the load's wall time over --requests, against
txt2img.py's own, measured before and after the load (a shared machine's load varies): (time of --n-iter 12 - time
of --n-iter 2) / 10, which leaves out its start and model load.
"""

import argparse
import base64
import io
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--requests", type=int, default=50)
p.add_argument("--clients", type=int, default=8)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--ckpt", help="a model file (default: the embedded model)")
args = p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as answer:
        return json.load(answer)


def rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def cli_seconds(n_iter: int, folder: Path) -> float:
    command = [sys.executable, "txt2img.py", "--prompt", "a red apple", "--steps", str(args.steps), "--skip-grid"]
    command += ["--n-iter", str(n_iter), "--outdir", str(folder / str(n_iter))] + (
        ["--ckpt", args.ckpt] * bool(args.ckpt)
    )
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    command = [sys.executable, "-m", "ldm.webui", "--nowebui", "--port", str(port), "--outdir", f"{tmp}/out"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    per_cli = [(cli_seconds(12, Path(tmp)) - cli_seconds(2, Path(tmp))) / 10]
    server = subprocess.Popen(command + (["--ckpt", args.ckpt] * bool(args.ckpt)), cwd=ROOT, **quiet)
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        memory = psutil.Process(server.pid)
        body = {"prompt": "a red apple", "steps": args.steps, "sampler_name": "Euler a"}
        for seed in range(5):
            post(url, body | {"seed": 10_000 + seed})
        warm, samples, marks, done = rss(memory), [], [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(rss(memory))
                time.sleep(0.2)

        jobs, answers = queue.Queue(), {}
        for seed in range(args.requests):
            jobs.put(seed)

        def client():
            while True:
                try:
                    seed = jobs.get_nowait()
                except queue.Empty:
                    return
                answers[seed] = post(url, body | {"seed": seed})
                if len(answers) % 10 == 0:
                    marks.append(rss(memory))

        threading.Thread(target=sample, daemon=True).start()
        start = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.perf_counter() - start
        done.set()
    finally:
        server.terminate()
        server.wait(30)
    lost = [s for s in range(args.requests) if s not in answers or json.loads(answers[s]["info"])["all_seeds"] != [s]]
    for answer in answers.values():
        Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).load()
    per_cli.append((cli_seconds(12, Path(tmp)) - cli_seconds(2, Path(tmp))) / 10)

MiB = 2**20
print(f"{args.requests} requests from {args.clients} clients, {args.steps} steps, Euler a, {os.cpu_count()} CPUs")
print(f"answered: {len(answers)}, lost or wrong: {len(lost)}")
every10 = ", ".join(f"{m / MiB:.0f}" for m in marks)
print(f"server RSS, MiB: {warm / MiB:.0f} after warm-up; every 10 answers {every10}; peak {max(samples) / MiB:.0f}")
print(f"time per image: API {wall / args.requests:.3f} s, txt2img.py {per_cli[0]:.3f} s before, {per_cli[1]:.3f} after")
sys.exit(1 if lost else 0)
