"""python -m ldm.webui in a real headless browser (Debian's chromium + chromedriver, driven by selenium), on the
embedded model: what a user clicks gives txt2img.py's images and PNGs (outpainting and a ControlNet included),
Interrupt stops, PNG info remakes an image, inpainting keeps the unmasked pixels, bad input is one line in the page;
and the server's exposure."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, cli
from ldm import DEFAULT_MODEL
from ldm.checkpoint import peek_config
from ldm.controlnet import ControlNet, save_controlnet

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[webui]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium (the test extra)")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("no chromium: apt-get install chromium chromium-driver (CI's .ci/run does)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT, SEED, STEPS = "a red apple", 7, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web UI on a free port with the embedded model: (url, outdir, models_dir, port)."""
    root = tmp_path_factory.mktemp("webui")
    outdir, models = root / "outputs", root / "models"
    models.mkdir()
    (models / "secret.txt").write_text("not to be served")
    torch.manual_seed(0)  # a ControlNet for the embedded model, random weights (the tests check the wiring)
    save_controlnet(ControlNet(peek_config(DEFAULT_MODEL)), models / "ControlNet" / "tiny.safetensors")
    port = free_port()
    command = [sys.executable, "-m", "ldm.webui", "--port", str(port), "--outdir", str(outdir)]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(root / "cache")}
    log = open(root / "server.log", "w+")
    process = subprocess.Popen(command + ["--models-dir", str(models)], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"the server ended: {(root / 'server.log').read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    yield url, outdir, models, port
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(server, browser):
    browser.get(server[0])
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "txt2img-generate"))
    return browser


def click(browser, element) -> None:
    """A click that Gradio's loading overlays cannot intercept."""
    browser.execute_script("arguments[0].click()", element)


def tab(browser, name: str) -> None:
    click(browser, browser.find_element(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']"))


def fill(browser, elem_id: str, value) -> None:
    """Type into a Textbox, Number or Slider (its number box) and leave it, as a user does."""
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def upload(browser, elem_id: str, path: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def gallery(browser, mode: str) -> list[str]:
    """The URLs of the images the gallery shows."""
    sources = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, f"#{mode}-gallery img")]
    return list(dict.fromkeys(s for s in sources if s))


def click_generate(browser, mode: str, outdir: Path, n: int = 1) -> list[str]:
    """Click Generate; once n new PNGs are in outdir and shown in the gallery, their URLs (oldest first)."""
    before = set(outdir.glob("*.png"))
    click(browser, browser.find_element(By.ID, f"{mode}-generate"))

    def shown(b):
        new = sorted(p.name for p in set(outdir.glob("*.png")) - before if not p.name.startswith("grid"))
        urls = {url.rsplit("/", 1)[-1]: url for url in gallery(b, mode)}
        return [urls[name] for name in new] if len(new) >= n and all(name in urls for name in new) else None

    return WebDriverWait(browser, 120).until(shown)


def download(url: str) -> Image.Image:
    with urllib.request.urlopen(url) as response:
        image = Image.open(io.BytesIO(response.read()))
        image.load()
        return image


def info_text(browser, mode: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, f"#{mode}-info textarea").get_attribute("value")


def error_toast(browser, timeout: float = 60) -> str:
    return WebDriverWait(browser, timeout).until(
        lambda b: " ".join(t.text for t in b.find_elements(By.CSS_SELECTOR, ".toast-body")) or None
    )


def generate_txt2img(browser, outdir: Path, prompt=PROMPT, seed=SEED, steps=STEPS) -> list[str]:
    fill(browser, "txt2img-prompt", prompt)
    fill(browser, "txt2img-seed", seed)
    fill(browser, "txt2img-steps", steps)
    return click_generate(browser, "txt2img", outdir)


def test_generate_downloads_txt2img_s_png_bit_for_bit(page, server, tmp_path):
    url, outdir, _, _ = server
    png = download(generate_txt2img(page, outdir)[0])
    assert cli("--prompt", PROMPT, "--seed", SEED, "--steps", STEPS, "--outdir", tmp_path) == 0
    ours = Image.open(tmp_path / "00000.png")
    assert png.format == "PNG" and png.size == (32, 32)
    assert np.array_equal(np.asarray(png), np.asarray(ours))
    assert json.loads(png.text["ldm"]) == json.loads(ours.text["ldm"])
    assert png.text["parameters"] == ours.text["parameters"]
    saved = sorted(outdir.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(saved[-1])), np.asarray(ours))


def test_interrupt_stops_a_run_and_keeps_what_was_made(page, server):
    outdir = server[1]
    before = len(list(outdir.glob("*.png")))
    fill(page, "txt2img-prompt", "a blue heart")
    fill(page, "txt2img-steps", 5)
    fill(page, "txt2img-count", 16)
    click_generate(page, "txt2img", outdir)  # the first batch is done
    click(page, page.find_element(By.ID, "txt2img-interrupt"))
    WebDriverWait(page, 60).until(lambda b: "Interrupted" in info_text(b, "txt2img"))
    made = len(list(outdir.glob("*.png"))) - before
    assert 1 <= made < 16
    assert len(gallery(page, "txt2img")) == made


def test_png_info_sends_to_txt2img_which_remakes_the_image(page, server, tmp_path):
    outdir = server[1]
    original = download(generate_txt2img(page, outdir, prompt="a yellow star", seed=3)[0])
    original.save(tmp_path / "dropped.png", pnginfo=png_info(original))
    tab(page, "PNG info")
    upload(page, "png-file", tmp_path / "dropped.png")
    WebDriverWait(page, 30).until(
        lambda b: "a yellow star" in b.find_element(By.CSS_SELECTOR, "#png-parameters textarea").get_attribute("value")
    )
    click(page, page.find_element(By.ID, "png-send"))
    WebDriverWait(page, 30).until(lambda b: b.find_element(By.ID, "txt2img-generate").is_displayed())
    assert page.find_element(By.CSS_SELECTOR, "#txt2img-prompt textarea").get_attribute("value") == "a yellow star"
    remade = download(click_generate(page, "txt2img", outdir)[0])
    assert np.array_equal(np.asarray(remade), np.asarray(original))
    assert json.loads(remade.text["ldm"])["seed"] == 3


def png_info(image: Image.Image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in image.text.items():
        info.add_text(key, value)
    return info


def test_inpaint_with_an_uploaded_mask_keeps_the_unmasked_pixels(page, server, tmp_path):
    g = np.random.default_rng(0)
    init = g.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tab(page, "inpaint")
    fill(page, "inpaint-prompt", PROMPT)
    fill(page, "inpaint-steps", STEPS)
    upload(page, "inpaint-image", tmp_path / "init.png")
    upload(page, "inpaint-mask", tmp_path / "mask.png")
    out = np.asarray(download(click_generate(page, "inpaint", server[1])[0]))
    keep = mask == 0
    assert np.array_equal(out[keep], init[keep])
    assert not np.array_equal(out[~keep], init[~keep])


def test_a_bad_upload_is_one_line_and_the_next_generation_works(page, server, tmp_path):
    good = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good)
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:60])
    tab(page, "img2img")
    fill(page, "img2img-prompt", PROMPT)
    fill(page, "img2img-steps", STEPS)
    upload(page, "img2img-image", tmp_path / "broken.png")
    click(page, page.find_element(By.ID, "img2img-generate"))
    message = error_toast(page)
    assert "cannot read image" in message and "broken.png" in message
    assert "Traceback" not in page.page_source
    tab(page, "txt2img")
    assert len(generate_txt2img(page, server[1], seed=11)) == 1


def test_default_bind_is_localhost_and_files_outside_the_allowed_folders_are_refused(server):
    url, outdir, models, port = server
    listening = [
        line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if line.split()[3] == "0A"
    ]
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, as the kernel writes it
    assert f"00000000:{port:04X}" not in listening
    outdir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(outdir / "allowed.png")
    assert urllib.request.urlopen(f"{url}/gradio_api/file={outdir / 'allowed.png'}").status == 200
    for path in ("/etc/passwd", ROOT / "ldm" / "__init__.py", models / "secret.txt", outdir / ".." / ".." / "x"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/gradio_api/file={path}")
        assert refused.value.code in (403, 404)


def test_the_server_prints_its_address_and_no_share_link_hint(server):
    log = (server[1].parent / "server.log").read_text()
    assert f"http://127.0.0.1:{server[3]}" in log
    assert "share=True" not in log


SHOWN = """const img = document.querySelector(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return null;
const box = img.getBoundingClientRect(), style = getComputedStyle(img);
const fit = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
return [img.src, fit, style.objectFit, style.imageRendering];"""


def shown(browser, elem_id: str) -> tuple[Image.Image, float]:
    """The file an image element of the page shows (once loaded), and its scale on screen (screen pixels per image
    pixel, as the element's box and object-fit draw it: whole, not cropped); nearest neighbour."""
    url, fit, object_fit, rendering = WebDriverWait(browser, 120).until(
        lambda b: b.execute_script(SHOWN, f"#{elem_id} img")
    )
    assert rendering == "pixelated"
    return download(url), {"contain": fit, "scale-down": min(fit, 1)}[object_fit]


def test_small_images_are_shown_enlarged_and_served_as_made(page, server, tmp_path):
    """The embedded model's 32 px images fill their boxes (not a thumbnail in a large empty box); the files stay."""
    generate_txt2img(page, server[1], steps=10)  # a preview at step 5
    for elem_id in ("txt2img-preview", "txt2img-gallery"):  # the gallery: whole images (an outpainted one too)
        png, scale = shown(page, elem_id)
        assert png.size == (32, 32) and scale >= 3
    random_image(tmp_path / "init.png", 4)
    tab(page, "Diffusion explorer")
    upload(page, "explorer-image", tmp_path / "init.png")
    click(page, page.find_element(By.ID, "explorer-noise"))
    forward, scale = shown(page, "explorer-forward")
    assert forward.size == (7 * 32, 3 * 32) and scale >= 3  # seven timesteps; latent, decoding, pixels
    click(page, page.find_element(By.ID, "explorer-generate"))
    overview, scale = shown(page, "explorer-reverse")
    assert overview.size == (8 * 32, 2 * 32) and scale >= 3  # eight steps; latent, decoding
    step, scale = shown(page, "explorer-step")
    assert step.size == (2 * 32, 32) and scale >= 4


def random_image(path: Path, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def same_run(page_png: Image.Image, cli_png: Image.Image, *files: str) -> None:
    """Same pixels, same parameters but the paths of the uploaded files (the page's are in Gradio's cache)."""
    assert np.array_equal(np.asarray(page_png), np.asarray(cli_png))
    ours, theirs = json.loads(page_png.text["ldm"]), json.loads(cli_png.text["ldm"])
    for facts in (ours, theirs):
        facts.pop("init_image", None)
        for unit in facts.get("controlnets", []):
            unit.pop("image")
    assert ours == theirs


def test_outpaint_gives_txt2img_s_png_and_keeps_the_original(page, server, tmp_path):
    init = random_image(tmp_path / "init.png", 2)
    tab(page, "outpaint")
    fill(page, "outpaint-prompt", PROMPT)
    fill(page, "outpaint-steps", 2)
    fill(page, "outpaint-left", 8)
    fill(page, "outpaint-bottom", 5)
    upload(page, "outpaint-image", tmp_path / "init.png")
    png = download(click_generate(page, "outpaint", server[1])[0])
    args = ("--prompt", PROMPT, "--steps", 2, "--init-image", tmp_path / "init.png", "--outpaint", "8,0,0,5")
    assert cli(*args, "--outdir", tmp_path / "cli") == 0
    same_run(png, Image.open(tmp_path / "cli" / "00000.png"))
    facts = json.loads(png.text["ldm"])
    assert (facts["mode"], facts["outpaint"], facts["mask_blur"], png.size) == ("outpaint", [8, 0, 0, 8], 4, (40, 40))
    assert np.array_equal(np.asarray(png)[:32, 8:], init)


def test_controlnet_gives_txt2img_s_png_and_shows_the_canny_map(page, server, tmp_path):
    random_image(tmp_path / "control.png", 3)
    models = server[2]
    click(page, page.find_element(By.CSS_SELECTOR, "#txt2img-controlnet-panel button"))
    dropdown = WebDriverWait(page, 30).until(lambda b: b.find_element(By.CSS_SELECTOR, "#txt2img-controlnet input"))
    dropdown.click()
    WebDriverWait(page, 30).until(
        lambda b: b.find_element(By.CSS_SELECTOR, "li[aria-label='tiny.safetensors']")
    ).click()
    WebDriverWait(page, 30).until(lambda b: dropdown.get_attribute("value") == "tiny.safetensors")
    upload(page, "txt2img-control-image", tmp_path / "control.png")
    fill(page, "txt2img-control-scale", 0.5)
    click(page, page.find_element(By.ID, "txt2img-show-canny"))
    WebDriverWait(page, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#txt2img-canny img"))
    png = download(generate_txt2img(page, server[1], steps=2)[0])
    net = models / "ControlNet" / "tiny.safetensors"
    args = ("--prompt", PROMPT, "--seed", SEED, "--steps", 2, "--controlnet", net, "--control-image")
    assert cli(*args, tmp_path / "control.png", "--control-scale", 0.5, "--outdir", tmp_path / "cli") == 0
    same_run(png, Image.open(tmp_path / "cli" / "00000.png"))
    assert 'ControlNet 0: "Module: none, Model: tiny [' in png.text["parameters"]
    assert cli("--prompt", PROMPT, "--seed", SEED, "--steps", 2, "--outdir", tmp_path / "plain") == 0
    assert not np.array_equal(np.asarray(png), np.asarray(Image.open(tmp_path / "plain" / "00000.png")))
