"""docs/webui-*.png: a screenshot of each tab of python -m ldm.webui (embedded model), in headless chromium.

apt-get install chromium chromium-driver && pip install -e ".[test]"
python docs/webui_screenshots.py
"""

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

DOCS = Path(__file__).resolve().parent
PORT = 7870


def fill(browser, elem_id: str, value) -> None:
    box = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def click(browser, element) -> None:
    """A click that Gradio's loading overlays cannot intercept."""
    browser.execute_script("arguments[0].click()", element)


def tab(browser, name: str) -> None:
    click(browser, browser.find_element(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']"))
    time.sleep(1)


def shoot(browser, name: str, scroll: int = 0) -> None:
    """The page scrolled down by `scroll` pixels, as a small PNG (256-colour palette)."""
    path = DOCS / f"webui-{name}.png"
    browser.execute_script(f"document.activeElement.blur(); window.scrollTo(0, {scroll})")
    time.sleep(1)
    browser.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def main() -> None:
    work = Path(tempfile.mkdtemp())
    command = [sys.executable, "-m", "ldm.webui", "--port", str(PORT), "--outdir", str(work / "out")]
    server = subprocess.Popen(command, cwd=DOCS.parent)  # --models-dir: models/, as a user's
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--window-size=1100,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        browser.get(f"http://127.0.0.1:{PORT}")
        wait = WebDriverWait(browser, 300)
        wait.until(lambda b: b.find_elements(By.ID, "txt2img-generate"))
        fill(browser, "txt2img-prompt", "a red apple")
        fill(browser, "txt2img-size", 4)
        fill(browser, "txt2img-steps", 150)
        click(browser, browser.find_element(By.ID, "txt2img-generate"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#txt2img-preview img"))
        shoot(browser, "preview")  # a run going: its progress bar and latest preview
        click(browser, browser.find_element(By.ID, "txt2img-interrupt"))
        wait.until(
            lambda b: "Interrupted" in b.find_element(By.CSS_SELECTOR, "#txt2img-info textarea").get_attribute("value")
        )
        fill(browser, "txt2img-steps", 20)
        click(browser, browser.find_element(By.ID, "txt2img-generate"))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#txt2img-gallery img")) >= 4)
        shoot(browser, "txt2img")
        first = sorted((work / "out").glob("0*.png"))[0]
        tab(browser, "img2img")
        browser.find_element(By.CSS_SELECTOR, "#img2img-image input[type=file]").send_keys(str(first))
        fill(browser, "img2img-prompt", "a green apple")
        fill(browser, "img2img-steps", 20)
        click(browser, browser.find_element(By.ID, "img2img-generate"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#img2img-gallery img"))
        shoot(browser, "img2img")
        tab(browser, "inpaint")
        browser.find_element(By.CSS_SELECTOR, "#inpaint-editor input[type=file]").send_keys(str(first))
        fill(browser, "inpaint-prompt", "a red apple with a leaf")
        time.sleep(3)
        shoot(browser, "inpaint")
        tab(browser, "outpaint")
        browser.find_element(By.CSS_SELECTOR, "#outpaint-image input[type=file]").send_keys(str(first))
        fill(browser, "outpaint-prompt", "a red apple on a table")
        for side in ("left", "right"):
            fill(browser, f"outpaint-{side}", 16)
        fill(browser, "outpaint-steps", 20)
        click(browser, browser.find_element(By.ID, "outpaint-generate"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#outpaint-gallery img"))
        shoot(browser, "outpaint")
        tab(browser, "txt2img")
        click(browser, browser.find_element(By.CSS_SELECTOR, "#txt2img-controlnet-panel button"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#txt2img-control-image input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#txt2img-control-image input[type=file]").send_keys(str(first))
        click(browser, browser.find_element(By.XPATH, "//*[@id='txt2img-controlnet-panel']//input[@value='canny']"))
        click(browser, browser.find_element(By.ID, "txt2img-show-canny"))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#txt2img-canny img"))
        shoot(browser, "controlnet", browser.find_element(By.ID, "txt2img-controlnet-panel").location["y"] - 20)
        tab(browser, "PNG info")
        browser.find_element(By.CSS_SELECTOR, "#png-file input[type=file]").send_keys(str(first))
        wait.until(
            lambda b: "apple" in b.find_element(By.CSS_SELECTOR, "#png-parameters textarea").get_attribute("value")
        )
        shoot(browser, "png-info")
        tab(browser, "Models")
        shoot(browser, "models")
        tab(browser, "Diffusion explorer")
        browser.find_element(By.CSS_SELECTOR, "#explorer-image input[type=file]").send_keys(str(first))
        click(browser, browser.find_element(By.ID, "explorer-noise"))
        click(browser, browser.find_element(By.ID, "explorer-generate"))
        wait.until(
            lambda b: (
                len(
                    b.find_elements(By.CSS_SELECTOR, "#explorer-forward img, #explorer-reverse img, #explorer-step img")
                )
                >= 3
            )
        )
        time.sleep(2)
        browser.set_window_size(1100, 1600)  # both processes
        shoot(browser, "explorer")
    finally:
        browser.quit()
        server.terminate()


if __name__ == "__main__":
    main()
