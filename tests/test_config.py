import pytest

from conftest import ROOT
from ldm import cli
from ldm.config import CONTROL_PREPROCESS_NAMES, ConfigError, ModelConfig, UNetConfig, from_dict, load_config, to_dict


def test_sd_v1_yaml_is_the_default_architecture():
    assert load_config(ROOT / "configs" / "sd-v1.yaml") == ModelConfig()


def test_the_command_line_s_control_preprocessings_are_the_config_s():
    assert cli.CONTROL_PREPROCESS_NAMES == CONTROL_PREPROCESS_NAMES


def test_overrides_and_types(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", ["unet.channel_mult=[1,2,4]", "scale_factor=1", "unet.use_checkpoint=true"]
    )
    assert cfg.unet.channel_mult == (1, 2, 4) and cfg.scale_factor == 1.0 and cfg.unet.use_checkpoint is True
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    assert load_config(None, ["linear_start=1e-4"]).linear_start == 1e-4  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["unet.model_chanels=3"], "unknown config key 'unet.model_chanels'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["unet.model_channels=abc"], "'unet.model_channels': expected int"),
        (["unet.channel_mult=4"], "'unet.channel_mult': expected a list"),
        (["unet.use_checkpoint=3"], "expected true/false"),
        (["unet=5"], "'unet': expected a mapping"),
        (["noequals"], "not of the form"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def test_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("unet: [1, 2\n")
    for name, message in [
        ("list.yaml", "top level must be a mapping"),
        ("broken.yaml", "not valid YAML"),
        ("missing.yaml", "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / name)


def test_unet_config_defaults_are_sd_v1():
    u = UNetConfig()
    assert (u.model_channels, u.channel_mult, u.attention_resolutions, u.context_dim) == (
        320,
        (1, 2, 4, 4),
        (4, 2, 1),
        768,
    )


# ---------------------------------------------------------------- arbitrary input never crashes

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=4)
    ),
    max_leaves=12,
)
known_keys = st.sampled_from(
    ["unet", "vae", "text_encoder", "scale_factor", "timesteps", "channel_mult", "ch_mult", "model_channels"]
)
documents = st.dictionaries(
    known_keys, yaml_values | st.dictionaries(st.text(max_size=14) | known_keys, yaml_values, max_size=4), max_size=4
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80) | documents.map(lambda d: __import__("yaml").safe_dump(d)))
def test_arbitrary_yaml_gives_a_config_or_a_config_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, ModelConfig)


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_arbitrary_overrides_give_a_config_or_a_config_error(overrides):
    try:
        cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, ModelConfig)
