"""AUTOMATIC1111's REST API (python -m ldm.webui --nowebui) on the embedded model, driven by the real `webuiapi`
client and by the exact request bodies Open WebUI and SillyTavern send: the images are txt2img.py's bit for bit, the
answers have the shape the clients parse, bad input is a 4xx and the next request works."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, bilevel_png, cli
from ldm import DEFAULT_MODEL, webui

webuiapi = pytest.importorskip("webuiapi", reason="the API tests need webuiapi (the test extra)")

PROMPT, SEED, STEPS, SIDE = "a red apple", 7, 5, 32
AUTH = ("alice", "wonder")  # the server's --api-auth alice:wonder,bob:builder
ASSETS = DEFAULT_MODEL.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """python -m ldm.webui --nowebui on a free port, waited for: (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "ldm.webui", "--nowebui", "--port", str(port), "--outdir", str(root / "out")]
    log = open(root / f"server-{port}.log", "w+")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command + ["--models-dir", str(root / "models"), *flags], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"the server ended: {(root / f'server-{port}.log').read_text()}")
        try:
            urllib.request.urlopen(f"{url}/docs", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.3)
    pytest.fail("the server did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, root): the API alone on the embedded model, with a LoRA, a ControlNet and a second model, behind
    HTTP Basic auth."""
    root = tmp_path_factory.mktemp("api")
    models = root / "models"
    (models / "Lora").mkdir(parents=True)
    (models / "ControlNet").mkdir()
    shutil.copy(ASSETS / "emoji-gameboy" / "emoji-gameboy.safetensors", models / "Lora" / "gameboy.safetensors")
    shutil.copy(ASSETS / "emoji-canny" / "emoji-canny.safetensors", models / "ControlNet" / "canny.safetensors")
    shutil.copy(DEFAULT_MODEL, models / "other.safetensors")
    process, url = start(root, "--api-auth", "alice:wonder,bob:builder")
    yield url, root
    stop(process)


@pytest.fixture
def api(server):
    host, port = server[0].rsplit(":", 1)
    return webuiapi.WebUIApi(host=host.removeprefix("http://"), port=int(port), username=AUTH[0], password=AUTH[1])


def cli_images(tmp: Path, *flags) -> list[Path]:
    """txt2img.py's PNGs (no grid) for the same parameters."""
    out = tmp / f"cli-{len(list(tmp.glob('cli-*')))}"
    args = ["--prompt", PROMPT, "--seed", SEED, "--steps", STEPS, "--outdir", out, "--skip-grid", *flags]
    assert cli(*args) == 0
    return sorted(out.glob("*.png"))


def same_pixels(image: Image.Image, path: Path) -> bool:
    return np.array_equal(np.asarray(image.convert("RGB")), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("a1111, sampler", [("DDIM", "ddim"), ("Euler a", "euler_a")])
def test_txt2img_is_the_cli(api, tmp_path, a1111, sampler):
    """Batch size and count, explicit seed: the CLI's images and PNG parameters, the seeds in info."""
    eta = {"eta": 0} if sampler == "ddim" else {}  # webuiapi sends eta 1 (A1111's ancestral default) otherwise
    result = api.txt2img(
        prompt=PROMPT, seed=SEED, steps=STEPS, sampler_name=a1111, cfg_scale=3, width=SIDE, height=SIDE,
        batch_size=2, n_iter=2, **eta,
    )  # fmt: skip
    paths = cli_images(tmp_path, "--sampler", sampler, "--scale", 3, "--n-samples", 2, "--n-iter", 2)
    assert len(result.images) == len(paths) == 4
    for image, path in zip(result.images, paths):
        assert same_pixels(image, path)
        assert image.info["parameters"] == Image.open(path).info["parameters"]
    assert result.info["all_seeds"] == [SEED, SEED + 1, SEED + 2, SEED + 3] and result.info["sampler_name"] == a1111
    assert result.info["infotexts"][0] == Image.open(paths[0]).info["parameters"]


def test_a_scheduler_is_the_cli_s_schedule(api, server, tmp_path):
    """A1111's sampler_name with scheduler ("DPM++ 2M", "Karras") = txt2img.py --sampler dpmpp_2m --schedule karras;
    /schedulers lists ldm's schedules as A1111 names them; a sampler that does not take the schedule is a 422."""
    result = api.txt2img(
        prompt=PROMPT, seed=SEED, steps=STEPS, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=3, width=SIDE,
        height=SIDE,
    )  # fmt: skip
    (path,) = cli_images(tmp_path, "--sampler", "dpmpp_2m", "--schedule", "karras", "--scale", 3)
    assert same_pixels(result.image, path) and result.image.info["parameters"] == Image.open(path).info["parameters"]
    assert result.info["scheduler"] == "Karras"
    url = server[0]
    assert [s["name"] for s in get(url, "schedulers").json()] == ["automatic", "karras", "exponential", "sgm_uniform"]
    body = {"prompt": PROMPT, "steps": 2, "width": SIDE, "height": SIDE, "sampler_name": "DDIM", "scheduler": "Karras"}
    refused = post(url, "txt2img", body)
    assert refused.status_code == 422 and "the ddim sampler takes default, sgm_uniform" in refused.json()["detail"]


def test_hires_fix_is_the_cli(api, tmp_path):
    """enable_hr with hr_scale, hr_upscaler, hr_second_pass_steps and denoising_strength: the CLI's hires fix."""
    result = api.txt2img(
        prompt=PROMPT, seed=SEED, steps=STEPS, sampler_name="DDIM", eta=0, cfg_scale=3, width=SIDE, height=SIDE,
        enable_hr=True, hr_scale=2, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=3, denoising_strength=0.6,
    )  # fmt: skip
    paths = cli_images(tmp_path, "--sampler", "ddim", "--scale", 3, "--hires-scale", 2, "--hires-upscaler",
                       "Latent (bicubic)", "--hires-steps", 3, "--hires-denoise", 0.6)  # fmt: skip
    assert result.image.size == (2 * SIDE, 2 * SIDE) and same_pixels(result.image, paths[0])
    assert result.image.info["parameters"] == Image.open(paths[0]).info["parameters"]


def test_seed_minus_one_draws_and_returns_a_seed(api, tmp_path):
    result = api.txt2img(prompt=PROMPT, seed=-1, steps=2, sampler_name="DDIM", eta=0, width=SIDE, height=SIDE)
    seed = result.info["seed"]
    assert seed >= 0 and result.info["all_seeds"] == [seed]
    again = api.txt2img(prompt=PROMPT, seed=seed, steps=2, sampler_name="DDIM", eta=0, width=SIDE, height=SIDE)
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))


def init_image(tmp_path: Path) -> Path:
    path = tmp_path / "init.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path)
    return path


def test_img2img_and_inpainting_are_the_cli(api, tmp_path):
    """img2img at a strength, and inpainting with a mask: the CLI's images; inpainting keeps the unmasked pixels."""
    image = init_image(tmp_path)
    common = dict(prompt=PROMPT, seed=SEED, steps=STEPS, sampler_name="Euler a", cfg_scale=3, width=SIDE, height=SIDE)
    result = api.img2img(images=[Image.open(image)], denoising_strength=0.6, **common)
    paths = cli_images(tmp_path, "--sampler", "euler_a", "--scale", 3, "--init-image", image, "--strength", 0.6)
    assert same_pixels(result.image, paths[0])
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (0, 0, SIDE // 2, SIDE))  # repaint the left half
    mask.save(tmp_path / "mask.png")
    result = api.img2img(
        images=[Image.open(image)], mask_image=mask, mask_blur=0, denoising_strength=1, **common
    )  # fmt: skip
    paths = cli_images(tmp_path, "--sampler", "euler_a", "--scale", 3, "--init-image", image, "--mask",
                       tmp_path / "mask.png", "--strength", 1)  # fmt: skip
    assert same_pixels(result.image, paths[0])
    ours, given = np.asarray(result.image.convert("RGB")), np.asarray(Image.open(image))
    assert np.array_equal(ours[:, SIDE // 2 :], given[:, SIDE // 2 :]) and not np.array_equal(ours, given)
    inverted = api.img2img(
        images=[Image.open(image)], mask_image=mask, mask_blur=0, inpainting_mask_invert=1, denoising_strength=1,
        **common,
    )  # fmt: skip
    ours = np.asarray(inverted.image.convert("RGB"))
    assert np.array_equal(ours[:, : SIDE // 2], given[:, : SIDE // 2])


def test_outpainting_script_is_the_cli(api, tmp_path):
    """A1111's "Poor man's outpainting" script (8 pixels left and down, mask blur 2): the CLI's --outpaint image."""
    image = init_image(tmp_path)
    result = api.img2img(
        images=[Image.open(image)], prompt=PROMPT, seed=SEED, steps=STEPS, sampler_name="DDIM", eta=0, cfg_scale=3,
        denoising_strength=1, width=SIDE + 8, height=SIDE + 8, script_name="Poor man's outpainting",
        script_args=[8, 2, "fill", ["left", "down"]],
    )  # fmt: skip
    paths = cli_images(tmp_path, "--sampler", "ddim", "--scale", 3, "--init-image", image, "--outpaint", "8,0,0,8",
                       "--mask-blur", 2, "--strength", 1)  # fmt: skip
    assert result.image.size == (SIDE + 8, SIDE + 8) and same_pixels(result.image, paths[0])


def test_lora_tag_and_controlnet_unit_are_the_cli(api, server, tmp_path):
    """<lora:gameboy:0.8> in the prompt, and a ControlNet unit as sd-webui-controlnet takes it: the CLI's images."""
    models = server[1] / "models"
    common = dict(seed=SEED, steps=STEPS, sampler_name="DDIM", eta=0, cfg_scale=3, width=SIDE, height=SIDE)
    result = api.txt2img(prompt=f"{PROMPT} <lora:gameboy:0.8>", **common)
    out = tmp_path / "lora"
    args = ["--prompt", f"{PROMPT} <lora:gameboy:0.8>", "--seed", SEED, "--steps", STEPS, "--sampler", "ddim"]
    assert cli(*args, "--scale", 3, "--outdir", out, "--lora-dir", models / "Lora") == 0
    assert same_pixels(result.image, next(out.glob("*.png")))
    assert "gameboy" in result.info["infotexts"][0]
    control = init_image(tmp_path)
    unit = webuiapi.ControlNetUnit(image=Image.open(control), module="canny", model="canny [abcd1234]", weight=0.9)
    result = api.txt2img(prompt=PROMPT, controlnet_units=[unit], **common)
    paths = cli_images(tmp_path, "--sampler", "ddim", "--scale", 3, "--controlnet", models / "ControlNet" /
                       "canny.safetensors", "--control-image", control, "--control-preprocess", "canny",
                       "--control-scale", 0.9)  # fmt: skip
    assert same_pixels(result.image, paths[0])


def test_png_info_reads_a_cli_png(api, tmp_path):
    path = cli_images(tmp_path, "--sampler", "ddim")[0]
    result = api.png_info(Image.open(path))
    assert result.info == Image.open(path).info["parameters"]
    assert result.json["parameters"]["seed"] == SEED


def test_options_switch_the_model(api, server):
    """sd-models lists the embedded model and the checkpoints of --models-dir; options switches between them, and
    override_settings for one request only."""
    titles = [m["title"] for m in api.get_sd_models()]
    assert titles == ["ldm-emoji", "other.safetensors"]
    api.util_set_model("other.safetensors")
    assert api.get_options()["sd_model_checkpoint"] == "other.safetensors"
    common = dict(prompt=PROMPT, seed=SEED, steps=2, sampler_name="DDIM", eta=0, width=SIDE, height=SIDE)
    assert api.txt2img(**common).info["sd_model_name"] == "other"
    api.set_options({"sd_model_checkpoint": "ldm-emoji", "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "ldm-emoji" and options["CLIP_stop_at_last_layers"] == 2
    result = api.txt2img(override_settings={"sd_model_checkpoint": "other"}, **common)
    assert result.info["sd_model_name"] == "other" and result.info["clip_skip"] == 2
    assert api.get_options()["sd_model_checkpoint"] == "ldm-emoji"
    api.set_options({"CLIP_stop_at_last_layers": 1})


def test_progress_and_interrupt(api, server):
    """While a long request runs, progress shows its step and a preview; interrupt ends it early with the images
    finished so far."""
    done = {}
    body = dict(prompt=PROMPT, seed=SEED, steps=100, sampler_name="DDIM", eta=0, width=SIDE, height=SIDE, n_iter=4)
    worker = threading.Thread(target=lambda: done.update(result=api.txt2img(**body)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = api.get_progress()
        if progress["state"]["job_no"] >= 1 and progress["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.2)
    assert 0.25 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 100
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (SIDE, SIDE)
    api.interrupt()
    worker.join(60)
    result = done["result"]
    assert 1 <= len(result.images) < 4 and result.info["interrupted"]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_four_concurrent_requests(api):
    """4 requests at once run one by one, each answered with its own images (those of the same request alone)."""
    bodies = [dict(prompt=p, seed=s, steps=3, sampler_name="Euler a", width=SIDE, height=SIDE) for p, s in
              [("a red apple", 1), ("a blue car", 2), ("a cat", 3), ("a green tree", 4)]]  # fmt: skip
    results = [None] * 4

    def call(k):
        results[k] = api.txt2img(**bodies[k])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for body, result in zip(bodies, results):
        assert result.info["prompt"] == body["prompt"] and result.info["all_seeds"] == [body["seed"]]
        alone = api.txt2img(**body)
        assert np.array_equal(np.asarray(result.image), np.asarray(alone.image))


def post(url: str, path: str, body=None, auth=AUTH, timeout=120, **kwargs) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/{path}", json=body, auth=auth, timeout=timeout, **kwargs)


def get(url: str, path: str, auth=AUTH, **kwargs) -> requests.Response:
    return requests.get(f"{url}/sdapi/v1/{path}", auth=auth, timeout=60, **kwargs)


def test_a_client_that_disconnects_ends_its_job(server):
    """A client that gives up (here after 1 s) ends its job at the next step: of the 3 batches it asked to save,
    fewer are written, and the next request is answered."""
    url, root = server
    before = set((root / "out").glob("*.png"))
    body = {"prompt": PROMPT, "steps": 150, "n_iter": 3, "width": SIDE, "height": SIDE, "save_images": True}
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(url, "txt2img", body, timeout=1)
    assert post(url, "txt2img", {"prompt": PROMPT, "steps": 2, "width": SIDE, "height": SIDE}).status_code == 200
    assert len(set((root / "out").glob("*.png")) - before) < 3


def test_open_webui_calls(server):
    """Open WebUI's calls (backend/open_webui/routers/images.py): options read, then posted back whole with the
    model changed; sd-models' title and model_name; its txt2img body; images and info parsed."""
    url = server[0]
    options = get(url, "options").json()
    options["sd_model_checkpoint"] = "other.safetensors"
    assert post(url, "options", options).status_code == 200
    models = get(url, "sd-models").json()
    assert [{"id": m["title"], "name": m["model_name"]} for m in models][1] == {
        "id": "other.safetensors",
        "name": "other",
    }
    body = {"prompt": PROMPT, "batch_size": 2, "width": SIDE, "height": SIDE, "steps": 3, "negative_prompt": "blurry"}
    res = post(url, "txt2img", body).json()
    assert len(res["images"]) == 2 and json.loads(res["info"])["sd_model_name"] == "other"
    for image in res["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(image))).size == (SIDE, SIDE)
    assert post(url, "options", {"sd_model_checkpoint": "ldm-emoji"}).status_code == 200


def test_sillytavern_calls(server):
    """SillyTavern's calls (src/endpoints/stable-diffusion.js and its extension's generateAutoImage): the lists it
    maps, set-model's progress poll, and its txt2img body (hires off, save_images true: the PNG lands in --outdir)."""
    url, root = server
    assert get(url, "options").json()["sd_model_checkpoint"] == "ldm-emoji"
    names = {path: [x[key] for x in get(url, path).json()] for path, key in
             [("upscalers", "name"), ("latent-upscale-modes", "name"), ("sd-vae", "model_name"),
              ("samplers", "name"), ("schedulers", "name"), ("sd-models", "title")]}  # fmt: skip
    assert {"DDIM", "Euler a", "DPM++ 2M"} <= set(names["samplers"]) and "Automatic" not in names["schedulers"]
    assert names["upscalers"][0] == "None" and "ldm-emoji" in names["sd-models"]
    progress = get(url, "progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    before = set((root / "out").glob("*.png"))
    body = {
        "url": url, "auth": "", "prompt": PROMPT, "negative_prompt": "lowres", "sampler_name": "DPM++ 2M",
        "scheduler": "automatic", "steps": 3, "cfg_scale": 7, "width": SIDE, "height": SIDE, "restore_faces": False,
        "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "seed": 5, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
    }  # fmt: skip
    res = post(url, "txt2img", body)
    assert res.status_code == 200, res.text
    data = base64.b64decode(res.json()["images"][0])
    written = set((root / "out").glob("*.png")) - before
    assert len(written) == 1 and written.pop().read_bytes() == data
    assert post(url, "interrupt").status_code == 200


def test_the_other_endpoints(server):
    """The lists and tools A1111 clients call, in A1111's shapes."""
    url = server[0]
    assert [x["name"] for x in get(url, "loras").json()] == ["gameboy"]
    assert get(url, "embeddings").json() == {"loaded": {}, "skipped": {}}
    assert get(url, "memory").json()["ram"]["total"] > 0
    flags = get(url, "cmd-flags").json()
    assert flags["nowebui"] is True and "api_auth" not in flags
    assert "poor man's outpainting" in get(url, "scripts").json()["img2img"]
    assert get(url, "prompt-styles").json() == [] and {"name": "Latent"} in get(url, "latent-upscale-modes").json()
    for path in ("refresh-checkpoints", "refresh-loras", "skip", "interrupt"):
        assert post(url, path).status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(f"{url}/openapi.json", timeout=60).json()["paths"]


def test_bad_input_is_a_4xx_and_the_next_request_works(server, tmp_path):
    url, root = server
    ok = {"prompt": PROMPT, "steps": 2, "width": SIDE, "height": SIDE}
    outputs = set((root / "out").glob("*"))
    big = tmp_path / "big.png"
    bilevel_png(big, 20_000, 20_000)
    bomb = base64.b64encode(big.read_bytes()).decode()
    cases = [
        ("txt2img", ok | {"steps": "many"}, 422, "steps"),
        ("txt2img", ok | {"width": -64}, 422, "width"),
        ("txt2img", ok | {"sampler_name": "Euler z"}, 422, "Euler z"),
        ("txt2img", ok | {"restore_faces": True}, 422, "restore_faces"),
        ("txt2img", ok | {"script_name": "x/y/z plot"}, 422, "x/y/z plot"),
        ("txt2img", ok | {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 422, "passwd"),
        ("img2img", ok | {"init_images": [base64.b64encode(b"not an image").decode()]}, 422, "init_images"),
        ("img2img", ok | {"init_images": ["/etc/passwd"]}, 422, "init_images"),
        ("img2img", ok | {"init_images": [bomb]}, 422, "pixels"),
        ("txt2img", ok | {"alwayson_scripts": {"ControlNet": {"args": [{"model": "../other", "image": bomb}]}}}, 422,
         "ControlNet"),
        ("txt2img", ok | {"prompt": "<lora:../other:1>"}, 422, "Lora"),
        ("txt2img", ok | {"prompt": f"<lora:{root / 'models' / 'other'}:1>"}, 422, "Lora"),
        ("txt2img", ok | {"alwayson_scripts": {"ControlNet": {"args": [5]}}}, 422, "ControlNet unit"),
        ("txt2img", ok | {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, 422, "ADetailer"),
        ("options", {"sd_model_checkpoint": "/etc/passwd"}, 422, "passwd"),
        ("png-info", {"image": "%%%"}, 422, "base64"),
    ]  # fmt: skip
    for path, body, status, named in cases:
        res = post(url, path, body)
        assert res.status_code == status and named in res.text, (body, res.text)
        assert "detail" in res.json()
        assert post(url, "txt2img", ok).status_code == 200
    huge = requests.post(f"{url}/sdapi/v1/txt2img", data=b"{" + b" " * (100 << 20) + b"}", timeout=120, auth=AUTH,
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert huge.status_code == 413
    assert post(url, "txt2img", ok).status_code == 200
    assert set((root / "out").glob("*")) == outputs  # nothing written without save_images


def test_auth(server):
    """--api-auth: 401 without credentials or with wrong ones, answers with the right ones (each user's)."""
    url = server[0]
    assert get(url, "options", auth=None).status_code == 401
    assert get(url, "options", auth=("alice", "wrong")).status_code == 401
    assert get(url, "options", auth=("eve", "wonder")).status_code == 401
    assert get(url, "options", auth=("bob", "builder")).status_code == 200
    body = {"prompt": PROMPT, "steps": 2}
    assert post(url, "txt2img", body, auth=None).status_code == 401
    assert post(url, "txt2img", body, auth=("bob", "builder")).status_code == 200


@pytest.mark.parametrize("value", ["alice", "alice:", ":wonder", "alice:wonder,bob"])
def test_a_bad_api_auth_is_a_one_line_error(value, capsys):
    with pytest.raises(SystemExit) as exit:
        webui.parse_args(["--api-auth", value])
    assert exit.value.code == 2 and "--api-auth" in capsys.readouterr().err
