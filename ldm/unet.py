"""The SD v1 and v2 denoising UNet (CompVis `openaimodel.UNetModel` with `SpatialTransformer` cross-attention).

Attribute names are the CompVis state-dict names, so `model.diffusion_model.*` of a real SD file
loads with strict=True: input_blocks.{i}.{0 ResBlock | 1 SpatialTransformer | 0.op Downsample},
middle_block.{0,1,2}, output_blocks.{i}.{0 ResBlock, 1 SpatialTransformer, 1|2 Upsample}, out.
SD 2.x is the same network with 64-channel heads, Linear proj_in / proj_out on the tokens
(`use_linear_in_transformer`), a 1024-wide context and, for 2.1, attention upcast to float32 (`upcast_attention`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ldm.attention import attention
from ldm.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w (B,) (Luo et al. 2023, sec. 4.2; VDM's timestep embedding, Kingma et
    al. 2021), as diffusers' get_guidance_scale_embedding: [sin(1000 w f_i), cos(1000 w f_i)],
    f_i = 10000^(-i / (dim/2 - 1)) for i < dim/2, zero-padded to an odd dim. -> (B, dim) in float32."""
    half = dim // 2
    step = torch.tensor(math.log(10000.0) / (half - 1), dtype=torch.float32)  # float32 as diffusers: 1000 w is large
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step.to(w.device))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 whatever the input dtype (as CompVis does for fp16)."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        w, b = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, w, b, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, C, H, W) -> (B, C_out, H, W)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, 4 * model_channels) -> (B, C_out, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context  # x: (B, N, query_dim), context: (B, M, context_dim)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.upcast and x.dtype in (torch.float16, torch.bfloat16):  # SD 2.1's q k^T overflows fp16
            return self.to_out(attention(q.float(), k.float(), v.float(), self.heads).to(x.dtype))
        return self.to_out(attention(q, k, v, self.heads))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(b), [a, b] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, D) -> 2 x (B, N, 4D)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flatten (B, C, H, W) to H*W tokens, run transformer blocks against the context, add back.
    proj_in / proj_out: 1x1 convs on the feature map (SD v1), or the same map as Linear layers on the tokens (linear:
    SD 2.x's use_linear_in_transformer)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        linear: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.norm(x)
        t = t if self.linear else self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, C, H, W) -> (B, H*W, C): a token per position
        t = self.proj_in(t) if self.linear else t
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t) if self.linear else t
        t = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return x + (t if self.linear else self.proj_out(t))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)  # (B, C, H, W) -> (B, C, H/2, W/2), odd sides rounded up


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `size`: odd sides after a stride-2 conv), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")  # -> (B, C, 2H, 2W)
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; each gets what it needs: ResBlocks the time embedding, transformers the context."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class DeepCache:
    """DeepCache (Ma et al. 2023): the UNet's deep features change little from one denoising step to the next, so a
    full call every `interval` calls keeps the up path's feature that is concatenated with skip `branch`, and the
    interval - 1 calls in between run only the shallow branch around it (input_blocks[:branch + 1], then the last
    branch + 1 output blocks), the deep part taken from the cache:

        full call t:     F_deep = U_{b+1}(...(middle(D_L(...D_0(x_t)))))     kept
        cached call s:   h = U_b(cat(F_deep, D_b(...D_0(x_s))))               then the shallow up blocks as usual

    branch 0 (the default) recomputes only the first conv and the last output block: the most saved; a higher branch
    recomputes more of the UNet and stays closer to the full call. One DeepCache serves one sampling run, its calls
    in order."""

    def __init__(self, interval: int, branch: int = 0):
        self.interval, self.branch = interval, branch
        self.calls, self.deep = 0, None

    def next_is_full(self) -> bool:
        """Counts a call: True when it must run the whole UNet (every interval-th call, the first included)."""
        self.calls += 1
        return (self.calls - 1) % self.interval == 0


def skip_branches(cfg: UNetConfig) -> int:
    """The UNet's skip connections (len(input_blocks)): DeepCache's branch is one of range(skip_branches(cfg))."""
    return len(cfg.channel_mult) * (cfg.num_res_blocks + 1)


class UNetEncoder(nn.Module):
    """The UNet's time embedding, input blocks and middle block, which a ControlNet copies (ldm.controlnet).
    skip_channels: the channels of each input block's output, the skip connections of the output blocks."""

    def __init__(self, cfg: UNetConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.num_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), self.transformer(ch), ResBlock(ch, emb_dim, ch, groups)
        )
        self.skip_channels = skip_channels

    def transformer(self, ch: int) -> SpatialTransformer:
        cfg = self.cfg
        heads = ch // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads
        return SpatialTransformer(
            ch,
            heads,
            ch // heads,
            cfg.transformer_depth,
            cfg.context_dim,
            cfg.num_groups,
            cfg.use_linear_in_transformer,
            cfg.upcast_attention,
        )

    def time_embedding(
        self, timesteps: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 4 * model_channels) embedding of timesteps (B,) or a scalar, for x's batch and dtype; extra: (B,
        model_channels) added to the sinusoidal features before the MLP (UNetModel's guidance embedding), or None."""
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        features = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)
        return self.time_embed(features if extra is None else features + extra)


class UNetModel(UNetEncoder):
    """The UNet. With cfg.time_cond_proj_dim (an LCM distilled into the whole UNet: train_unet.py --lcm-full), the
    guidance scale w is an input too: time_cond_proj (diffusers' time_embedding.cond_proj, no bias) maps its embedding
    (guidance_scale_embedding) onto the timestep's sinusoidal features. It starts at zero, so that the UNet given it
    computes what it did without."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, cfg.in_channels)
        mc, groups, emb_dim = cfg.model_channels, cfg.num_groups, cfg.model_channels * 4
        if cfg.time_cond_proj_dim is not None:
            self.time_cond_proj = nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)
            nn.init.zeros_(self.time_cond_proj.weight)
        skip_channels, ch, ds = list(self.skip_channels), self.skip_channels[-1], 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self.transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        control: list | None = None,
        cache: DeepCache | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) noisy latents, timesteps: (B,) or scalar, context: (B, 77, context_dim).
        control: a ControlNet's residuals (ldm.controlnet), one per input block and one for the middle block, added
        to the skip connections and to the middle block's output (ControlNet's ControlledUnetModel).
        cache: a DeepCache: this call runs the whole UNet or only its shallow branch, as the cache says.
        guidance: (B,) the guidance scale w in LCM's form (diffusers' guidance_scale - 1), for a UNet with the
        w-embedding (cfg.time_cond_proj_dim); None: none added, as diffusers without timestep_cond."""
        extra = None
        if guidance is not None:
            embedded = guidance_scale_embedding(guidance.to(x.device), self.cfg.time_cond_proj_dim)
            extra = self.time_cond_proj(embedded.to(x.dtype))
        emb = self.time_embedding(timesteps, x, extra)  # (B, 4 * mc)

        def run(block, h, upsample_size=None):
            if self.cfg.use_checkpoint and self.training:
                return checkpoint(block, h, emb, context, upsample_size, use_reentrant=False)
            return block(h, emb, context, upsample_size)

        shallow = cache is not None and not cache.next_is_full()
        skips, h = [], x
        for block in self.input_blocks[: cache.branch + 1] if shallow else self.input_blocks:
            h = run(block, h)  # (B, model_channels * channel_mult[level], H / 2^level, W / 2^level)
            skips.append(h)
        if control is not None:
            skips = [skip + residual for skip, residual in zip(skips, control)]
        if shallow:
            h = cache.deep
        else:
            h = run(self.middle_block, h)
            h = h + control[-1] if control is not None else h
        for block in self.output_blocks[-len(skips) :]:
            if cache is not None and len(skips) == cache.branch + 1:
                cache.deep = h  # the deep feature that meets skip `branch` (DeepCache)
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = run(block, h, skips[-1].shape[-2:] if skips else None)  # upsample to the next skip's size
        return self.out(h)  # (B, out_channels, H, W)
