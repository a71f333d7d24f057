"""Webdataset shards (ldm.shards): the index and its skipped samples, the sources (folder, brace pattern, http, pipe:),
the deterministic split over processes and workers, and exact resume; then train_unet.py on 2 gloo processes."""

import functools
import http.server
import io
import json
import random
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_unet import CONFIG, ENV, assert_same, finish
from torch.utils.data import DataLoader

import ldm.precompute
import train_unet
from conftest import ROOT, launcher, run_in_process
from ldm.buckets import bucket_sizes, nearest
from ldm.config import DataConfig, ShardFilters
from ldm.data import DataError
from ldm.shards import Plan, SampleRules, Shards, build_index, is_shards, shard_urls
from ldm.text_encoder import build_tokenizer

SIZES = [3, 7, 5, 9, 2, 7]  # samples per shard: uneven
BAD = {(1, 2): "corrupt image", (1, 4): "no caption", (3, 0): "watermark", (3, 8): "cut member"}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def jpeg(rng, size=(20, 16)) -> bytes:
    colour = rng.integers(0, 256, 3)
    pixels = np.clip(colour + rng.integers(-25, 26, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of 2..9 samples (33 in all) as img2dataset writes them; shard 1 holds a corrupt image and a sample
    without caption, shard 3 a watermarked one (pwatermark 0.9) and, last, a member cut short (the tar truncated)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s, n in enumerate(SIZES):
        members = []
        for i in range(n):
            key, bad = f"{s:02d}{i:03d}", BAD.get((s, i))
            members.append((f"{key}.jpg", b"\xff\xd8 not a jpeg" if bad == "corrupt image" else jpeg(rng)))
            if bad != "no caption":
                members.append((f"{key}.txt", f"picture {key}".encode()))
            meta = {"key": key, "original_width": 20, "pwatermark": 0.9 if bad == "watermark" else 0.1}
            members.append((f"{key}.json", json.dumps(meta).encode()))
        data = tar_bytes(members)
        if (s, n - 1) in BAD:  # cut inside the last sample's image
            data = data[: data.index(f"{s:02d}{n - 1:03d}.jpg".encode()) + 700]
        (root / f"{s:05d}.tar").write_bytes(data)
    return root


RULES = SampleRules(filters=ShardFilters(max_pwatermark=0.5))


@pytest.fixture(scope="module")
def index(shards):
    return build_index(shard_urls(str(shards)), RULES, 0, 1)


def data_config(**kw) -> DataConfig:
    return DataConfig(resolution=16, shuffle_buffer=4, filters=ShardFilters(max_pwatermark=0.5), **kw)


def test_the_index_counts_each_bad_sample_with_its_reason(shards, index, capsys):
    assert is_shards(str(shards)) and [Path(u).name for u in shard_urls(str(shards))] == [
        f"{s:05d}.tar" for s in range(6)
    ]
    assert [shard["samples"] for shard in index] == SIZES
    why = {(s, int(o)): w for s, shard in enumerate(index) for o, (_, w) in shard["skipped"].items()}
    assert sorted(why) == sorted(BAD)
    assert why[(1, 2)].startswith("unreadable (UnidentifiedImageError")
    assert why[(1, 4)] == "no caption"
    assert why[(3, 0)] == "filtered by data.filters.max_pwatermark (pwatermark 0.9 vs 0.5)"
    assert why[(3, 8)].startswith("unreadable")
    # a missing shard of a brace pattern: tried 3 times, then skipped with one warning line
    pattern = str(shards / "{00004..00006}.tar")
    lost = build_index(shard_urls(pattern), RULES, 0, 1)
    assert [shard["samples"] for shard in lost] == [2, 7, 0] and "error" in lost[2]
    assert capsys.readouterr().err.count("warning: skipped shard") == 1


def test_http_and_pipe_shards_index_as_local_ones(shards, index):
    server = serve(shards)
    try:
        url = f"http://127.0.0.1:{server.server_port}/{{00000..00005}}.tar"
        served = build_index(shard_urls(url), RULES, 0, 1)
    finally:
        server.shutdown()
    piped = build_index(shard_urls(f"pipe:cat {shards}/{{00000..00005}}.tar"), RULES, 0, 1)
    for other in (served, piped):
        assert [(s["samples"], s["skipped"]) for s in other] == [(s["samples"], s["skipped"]) for s in index]


def batches(index, data, world, rank, start, count, workers=0):
    stream = Shards(index, data, 2, rank, world, seed=3, start=start)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


def test_ranks_share_an_epoch_without_overlap_and_resume_exactly(index):
    """29 usable samples, 2 ranks x batch 2: 7 steps an epoch; every usable sample drawn at most once an epoch, all
    but < one global batch drawn; the same batches from a mid-epoch start, and with 2 DataLoader workers."""
    data = data_config()
    plan = Plan(index, 2, 2, 3, 4)
    assert (plan.total, plan.steps(0)) == (29, 7)
    usable = {
        f"{shard['url']}:{s:02d}{i:03d}"
        for s, shard in enumerate(index)
        for i in range(shard["samples"])
        if str(i) not in shard["skipped"]
    }
    ranks = [batches(index, data, 2, rank, 0, 10) for rank in (0, 1)]
    for epoch in (range(7), range(7, 10)):
        keys = [k for r in ranks for i in epoch for k in r[i]["key"]]
        assert len(keys) == len(set(keys)) and set(keys) <= usable
    first = [k for r in ranks for b in r[:7] for k in b["key"]]
    assert len(usable) - len(first) == 1
    assert ranks[0][0]["pixels"].shape == (2, 3, 16, 16)
    for rank in (0, 1):
        resumed = batches(index, data, 2, rank, 5 * 4, 5)  # after 5 steps, into the next epoch
        for a, b in zip(resumed, ranks[rank][5:]):
            assert a["key"] == b["key"] and a["seed"] == b["seed"] and torch.equal(a["pixels"], b["pixels"])
    workers = batches(index, data, 2, 1, 0, 10, workers=2)
    assert [b["key"] for b in workers] == [b["key"] for b in ranks[1]]


def test_fewer_samples_than_a_global_batch_is_one_line(index):
    with pytest.raises(DataError, match="fewer than one global batch"):
        Plan(index[4:5], 2, 2, 0, 4)


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    """`python -m http.server` on folder, in a thread of this process."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, machine: int = 0, machines: int = 1, port: int = 0):
    """train_unet.py on 2 gloo processes: on one machine, or as machine `machine` of 2 on localhost (one process
    each); each launch on a port of its own (runs go side by side)."""
    cmd = launcher(2)
    cmd[cmd.index("--num_machines") + 1] = str(machines)
    cmd += ["--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port"]
    cmd += [str(port or free_port()), str(ROOT / "train_unet.py"), "--config", str(CONFIG), "tracker=none"]
    return subprocess.Popen(
        cmd + list(map(str, args)),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def train_one(*args) -> subprocess.Popen:
    """train_unet.py on one process."""
    cmd = [*launcher(1), str(ROOT / "train_unet.py"), "--config", str(CONFIG), "tracker=none", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def order(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for r in (0, 1) for line in (run_dir / f"data-order-{r}.jsonl").read_text().splitlines()]
    return [row | {"key": row["key"].rsplit("/", 1)[1]} for row in rows]  # 00003.tar:03001, wherever it was read


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to a launch and each of its processes (torchrun starts its workers in sessions of their own)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for child in family:
        child.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=60)


def test_two_processes_cover_an_epoch_resume_after_sigkill_and_two_machines_over_http_agree(tmp_path, shards):
    """2 gloo processes, batch 2 each, 9 steps over 29 usable samples (7 steps an epoch). Two "machines" on localhost
    (one process each) read the shards from an http server; one machine with 2 processes reads them from disk, is
    killed with SIGKILL after its checkpoint of step 3 and resumed with --resume latest. Both end with the same
    weights bit for bit and the same data-order record, which shows every usable sample at most once in the first
    epoch and all but one drawn."""
    common = [
        f"data.path={shards}",
        "max_steps=9",
        "save_every=3",
        "batch_size=2",
        "log_every=1",
        "deterministic=true",
        "data.record_order=true",
        "data.shuffle_buffer=4",
        "data.filters.max_pwatermark=0.5",
    ]
    server, port, reference = serve(shards), free_port(), tmp_path / "machines"
    url = f"http://127.0.0.1:{server.server_port}/{{00000..00005}}.tar"
    machines = [
        launch(*common, f"data.path={url}", f"output_dir={reference}", machine=m, machines=2, port=port) for m in (0, 1)
    ]
    run_dir = tmp_path / "killed"
    killed = launch(*common, f"output_dir={run_dir}")
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-000003").exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.01)
    kill(killed)
    try:
        out = finish(launch(*common, f"output_dir={run_dir}", "--resume", "latest"))
        for proc in machines:
            finish(proc)
    finally:
        server.shutdown()
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000003'} at step 3" in out
    assert "29 training images" in out
    assert "skipped " + str(shards / "00001.tar") + ":01002: unreadable" in out
    assert "1 filtered by data.filters.max_pwatermark" in out and "1 no caption" in out

    rows = order(reference)
    assert sorted({(r["step"], r["rank"]) for r in rows}) == [(s, r) for s in range(1, 10) for r in (0, 1)]
    assert len(rows) == 9 * 4
    first_epoch = [r["key"] for r in rows if r["step"] <= 7]
    assert len(first_epoch) == len(set(first_epoch)) == 33 - len(BAD) - 1
    assert not set(first_epoch) & {f"{s:05d}.tar:{s:02d}{i:03d}" for s, i in BAD}
    assert order(run_dir) == rows
    for name in ("checkpoints/step-000009/state/model.safetensors", "model.safetensors"):
        assert_same(load_file(run_dir / name), load_file(reference / name))

    one = finish(train_one(*common, f"output_dir={run_dir}", "max_steps=10", "--resume", "latest"))
    assert "note: the checkpoint drew its shards on 2 process(es), this run has 1" in one  # what changes


ASPECTS = [(32, 16), (16, 32), (20, 16), (16, 16), (40, 12), (12, 40), (18, 24), (30, 18)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """3 shards of 8, 5 and 11 images of 8 aspect ratios, from 40x12 to 12x40."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    i = 0
    for s, n in enumerate([8, 5, 11]):
        members = []
        for _ in range(n):
            key = f"{i:04d}"
            members += [(f"{key}.jpg", jpeg(rng, ASPECTS[i % len(ASPECTS)])), (f"{key}.txt", f"shape {key}".encode())]
            i += 1
        (root / f"{s:05d}.tar").write_bytes(tar_bytes(members))
    return root


def test_buckets_one_size_a_batch_ranks_agree_never_upscaled_past_cover(mixed):
    """NovelAI's buckets scaled to 16 px (step 8): every batch one bucket, both ranks the same number of batches an
    epoch, each image scaled just to cover its bucket (center crop: one offset 0) and never past it."""
    assert bucket_sizes(512, 64)[:3] == [(256, 1024), (320, 1024), (384, 1024)]
    assert (512, 768) in bucket_sizes(512, 64) and (512, 512) in bucket_sizes(512, 64)
    assert all(w * h <= 512 * 768 and max(w, h) <= 1024 for w, h in bucket_sizes(512, 64))
    sizes = bucket_sizes(16, 8)
    assert sizes == [(8, 32), (16, 24), (16, 16), (24, 16), (32, 8)]
    index = build_index(shard_urls(str(mixed)), SampleRules(), 0, 1)
    data = DataConfig(resolution=16, shuffle_buffer=4, buckets=True, bucket_step=8)
    plan = Plan(index, 2, 2, 3, 4, sizes)
    ranks = [batches(index, data, 2, rank, 0, 2 * plan.steps(0)) for rank in (0, 1)]
    seen = set()
    for rank in ranks:
        for batch in rank:
            h, w = batch["pixels"].shape[-2:]
            assert (w, h) in sizes
            for (ow, oh), (left, top) in zip(batch["original_size"], batch["crop"]):
                assert sizes[nearest(sizes, ow, oh)] == (w, h)
                cover = (max(w, round(ow * max(w / ow, h / oh))), max(h, round(oh * max(w / ow, h / oh))))
                assert (left, top) == ((cover[0] - w) // 2, (cover[1] - h) // 2) and min(left, top) == 0
            seen.add((w, h))
    assert len(seen) >= 3 and plan.steps(0) * 2 * 2 <= 24
    for rank in (0, 1):  # resumed mid-epoch: the same batches
        resumed = batches(index, data, 2, rank, 3 * 4, 2 * plan.steps(0) - 3)
        assert [b["key"] for b in resumed] == [b["key"] for b in ranks[rank][3:]]


def test_mixed_aspects_train_from_images_as_from_precomputed_latents_and_validate_non_square(tmp_path, mixed):
    """A mixed-aspect dataset in buckets trains one size a step and validates at a non-square size. python -m
    ldm.precompute writes each usable sample's posterior mean and std (float16) at its bucket's size; training from
    those shards draws the same samples in the same order with the same seeds, so z = mean + std * noise differs
    from the image run's only by float16 rounding: the same weights to that precision. The text encoder reads the
    stored token ids (the tokenizer's of the caption; those of "" where caption dropout, here one in two, draws it)."""
    args = ["data.buckets=true", "data.bucket_step=8", "data.record_order=true", "max_steps=3", "batch_size=2"]
    args += ["caption_dropout=0.5"]
    args += ["validation.every=3", "validation.steps=2"]
    assert (
        run_in_process(
            ldm.precompute, ["--config", str(CONFIG), str(tmp_path / "latents"), f"data.path={mixed}", *args]
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    tokenizer = build_tokenizer()  # transformers' CLIPTokenizer over CLIP's vocabulary
    with tarfile.open(tmp_path / "latents" / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    texts = {name[: -len(".txt")]: data.decode() for name, data in members.items() if name.endswith(".txt")}
    assert texts
    for key, text in texts.items():
        ids = np.load(io.BytesIO(members[f"{key}.ids.npy"]))
        oracle = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids.dtype == np.int32 and ids.tolist() == oracle
    runs = {
        name: train_one(*args, f"data.path={path}", f"output_dir={tmp_path / name}")
        for name, path in (("images", mixed), ("latents", tmp_path / "latents"))
    }
    for proc in runs.values():
        finish(proc)
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "data-order-0.jsonl").read_text().splitlines()]
        for name in runs
    }
    strip = lambda r: r | {"key": r["key"].rsplit("/", 1)[1]}  # noqa: E731
    assert [strip(r) for r in rows["latents"]] == [strip(r) for r in rows["images"]]
    assert len(rows["images"]) == 6 and all(
        len({tuple(r["size"]) for r in rows["images"] if r["step"] == step}) == 1 for step in (1, 2, 3)
    )
    grid = Image.open(tmp_path / "images" / "validation" / "step-000003.png")
    assert grid.width != 2 * grid.height  # two prompts side by side, each not square
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert unet and any(not torch.equal(a[k], b[k]) for k in unet)  # float16 moments: not bit for bit
    for k in unet:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize(
    "args, message",
    [
        (["data.buckets=true"], "data.buckets needs webdataset shards in data.path"),
        (["data.path=TMP/missing/{0..1}.tar"], "the shards hold 0 usable samples, fewer than one global batch"),
    ],
)
def test_bad_shard_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "a.txt").write_text("a picture")
    argv = [
        "--config",
        str(CONFIG),
        "tracker=none",
        f"data.path={tmp_path / 'images'}",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert run_in_process(train_unet, argv + [a.replace("TMP", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_a_datasets_stream_splits_over_processes_skips_bad_rows_resumes_exactly_and_trains(tmp_path):
    """data.streaming: 4 parquet files of 3 rows (a corrupt image in one, an empty caption in another) read by
    datasets' streaming loader. split_dataset_by_node gives the 2 processes disjoint rows that cover the source;
    each batch holds the rows datasets' own (not streaming) reader has under those captions; the bad rows are counted
    with their reasons; a stream started at a checkpoint's position gives the uninterrupted one's batches; and
    train_unet.py trains from it."""
    from datasets import Dataset, Features, Value, load_dataset
    from datasets import Image as ImageFeature

    from ldm.buckets import fit
    from ldm.data import choose
    from ldm.stream import Stream

    rng = np.random.default_rng(2)
    for f in range(4):
        rows = {"image": [], "text": []}
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16 + 4 * i, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
            rows["image"].append({"bytes": b"not a png" if (f, i) == (1, 2) else buf.getvalue(), "path": None})
            rows["text"].append("" if (f, i) == (2, 0) else f"picture {f}-{i}")
        features = Features({"image": ImageFeature(decode=False), "text": Value("string")})
        Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "src" / f"{f}.parquet")
    data = DataConfig(path=str(tmp_path / "src"), resolution=16, shuffle_buffer=4, streaming=True)
    texts = [[r["text"] for r in Stream(data, 2, rank, 2, 0).rows(0)] for rank in (0, 1)]
    assert not set(texts[0]) & set(texts[1]) and len(texts[0] + texts[1]) == 12
    whole = {r["text"]: r["image"] for r in load_dataset("parquet", data_dir=str(tmp_path / "src"), split="train")}
    skipped = set()
    for rank in (0, 1):
        stream = iter(Stream(data, 2, rank, 2, 0))
        batches = [next(stream) for _ in range(6)]  # 12 samples: past the end of the first epoch
        skipped |= {why.split(" (")[0] for b in batches for _, why in b["skipped"]}
        for batch in batches:
            for caption, seed, pixels in zip(batch["caption"], batch["seed"], batch["pixels"]):
                img = Image.open(io.BytesIO(whole[caption]["bytes"])).convert("RGB")
                rng_sample = random.Random(seed)
                choose(rng_sample, 1, False)
                torch.testing.assert_close(pixels, fit(img, (16, 16), True, False, rng_sample)[0])
        resumed = iter(Stream(data, 2, rank, 2, 0, start=3 * 2 * 2))
        for batch in batches[3:]:
            again = next(resumed)
            assert again["seed"] == batch["seed"] and again["caption"] == batch["caption"]
            assert torch.equal(again["pixels"], batch["pixels"])
    assert skipped == {"no caption", "unreadable"}
    argv = ["--config", str(CONFIG), "tracker=none", "data.streaming=true", f"data.path={tmp_path / 'src'}"]
    argv += ["max_steps=2", "batch_size=2", "validation.every=0", f"output_dir={tmp_path / 'run'}"]
    assert run_in_process(train_unet, argv) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()
