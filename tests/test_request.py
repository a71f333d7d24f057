"""ldm.request: one frozen Request per generation, its rules once in each front end's words, defaults filled once."""

import subprocess
import sys

import pytest
from PIL import Image

import txt2img
from conftest import ROOT, tiny_model
from ldm.request import NAMES, InputError, OutputSpec, Request


@pytest.fixture(scope="module")
def cfg():
    return tiny_model().cfg


def test_importing_the_request_imports_no_torch():
    code = (
        "import ldm.request, sys; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize(
    "settings, library, cli, page",
    [
        ({"steps": 0}, "steps must be at least 1", "--steps must be at least 1", "Steps must be at least 1"),
        ({"strength": 0.5}, "strength needs init image", "--strength needs --init-image", "Strength needs an image"),
        ({"cfg_end": 2.0}, "cfg end must be in [0, 1]", "--cfg-end must be in [0, 1]", "CFG end must be in [0, 1]"),
        ({"height": 0}, "height must be a positive", "--H must be a positive", "Height must be a positive"),
    ],
)
def test_a_rule_speaks_each_front_ends_words(settings, library, cli, page):
    webui_app = pytest.importorskip("ldm.webui_app", reason="the web page needs gradio")
    request = Request("x", **settings)
    for names, message in ((None, library), (txt2img.NAMES, cli), (webui_app.NAMES, page)):
        with pytest.raises(InputError) as error:
            request.check(names)
        assert str(error.value).startswith(message), str(error.value)
    assert set(txt2img.NAMES) - {"n_iter"} <= set(NAMES) and set(webui_app.NAMES) - {"n_iter"} <= set(NAMES)


def test_resolved_fills_the_models_defaults_once_and_again_changes_nothing(cfg):
    init = Image.new("RGB", (19, 21), "red")
    request = Request("x", init_image=init, outpaint=(3, 0, 4, 2))
    resolved = request.resolved(cfg)
    sampling = cfg.sampling
    assert (resolved.sampler, resolved.steps, resolved.scale) == (sampling.sampler, sampling.steps, sampling.scale)
    assert (resolved.strength, resolved.mask_blur, resolved.outpaint) == (1.0, 4, (4, 0, 5, 3))
    assert (resolved.width, resolved.height) == (4 + 19 + 5, 21 + 3)
    assert resolved.resolved(cfg) == resolved
    assert Request("x", init_image=init).resolved(cfg).strength == 0.75  # img2img's default
    assert Request("x", steps=3).resolved(cfg).steps == 3  # given: kept


def test_an_output_spec_checks_the_seeds_of_all_its_batches():
    request = Request("x", seed=2**64 - 3, n_samples=2)
    OutputSpec("out").check(request)
    with pytest.raises(InputError, match=r"the seeds of the images must lie in \[-2\*\*63, 2\*\*64\)"):
        OutputSpec("out", n_iter=2).check(request)
    with pytest.raises(InputError, match="--n-iter must be at least 1, got 0"):
        OutputSpec("out", n_iter=0).check(request, txt2img.NAMES)
