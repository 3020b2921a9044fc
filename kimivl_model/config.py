"""Typed, composed model configs and named presets (tiny, small, a3b).

Every number of the full-size preset comes from the Kimi-VL report (arXiv 2504.07491, Sec. 2.1), the
Moonlight report and the public Kimi-VL-A3B config (see ../shared/REFERENCE.md). Configs are frozen
dataclasses; ``validate()`` runs in ``__post_init__`` so an invalid config can never be built, and every
error names the field and what was expected. Nothing derived hides in a default: derived values are
properties.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid model config; the message names the field and what was expected."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass(frozen=True)
class MoonViTConfig:
    """MoonViT, the native-resolution vision encoder (Kimi-VL Sec. 2.1)."""

    patch_size: int = 14  # pixels per patch side
    in_channels: int = 3
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16  # head dim 72 at full size; must be divisible by 4 for 2D RoPE
    intermediate_size: int = 4304  # MLP width (GELU-tanh)
    pos_table_size: tuple[int, int] = (64, 64)  # learnable absolute table (rows, cols), bicubic-interpolated
    rope_theta: float = 10000.0  # 2D RoPE base
    layer_norm_eps: float = 1e-5
    max_patches_per_image: int = 4096  # preprocessing downscales larger images (REFERENCE.md)
    max_patches_per_side: int = 512  # each side must be < this many patches

    def __post_init__(self) -> None:
        w = "MoonViTConfig"
        for name in (
            "patch_size",
            "in_channels",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
        ):
            _check(getattr(self, name) > 0, f"{w}.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"{w}.hidden_size",
            f"must be divisible by num_heads={self.num_heads}, got {self.hidden_size}",
        )
        _check(
            self.head_dim % 4 == 0,
            f"{w}.num_heads",
            f"head_dim=hidden_size/num_heads must be divisible by 4 for 2D RoPE, got {self.head_dim}",
        )
        _check(
            len(self.pos_table_size) == 2 and min(self.pos_table_size) > 0,
            f"{w}.pos_table_size",
            f"must be (rows, cols) > 0, got {self.pos_table_size}",
        )
        _check(self.rope_theta > 0, f"{w}.rope_theta", f"must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ProjectorConfig:
    """Pixel-shuffle + 2-layer MLP projector (Kimi-VL Sec. 2.1)."""

    vit_hidden_size: int = 1152
    lm_hidden_size: int = 2048
    merge_kernel: tuple[int, int] = (2, 2)  # pixel-shuffle neighbourhood (rows, cols)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        w = "ProjectorConfig"
        _check(self.vit_hidden_size > 0, f"{w}.vit_hidden_size", "must be > 0")
        _check(self.lm_hidden_size > 0, f"{w}.lm_hidden_size", "must be > 0")
        _check(
            len(self.merge_kernel) == 2 and min(self.merge_kernel) > 0,
            f"{w}.merge_kernel",
            f"must be (rows, cols) > 0, got {self.merge_kernel}",
        )

    @property
    def merged_hidden_size(self) -> int:
        return self.vit_hidden_size * self.merge_kernel[0] * self.merge_kernel[1]


@dataclass(frozen=True)
class LMConfig:
    """Moonlight / DeepSeek-V3-style MoE language model with MLA attention."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    num_layers: int = 27
    num_heads: int = 16
    q_lora_rank: int | None = None  # None: q is a full-rank projection (Moonlight)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # one RoPE key of this size shared by all heads
    v_head_dim: int = 128
    intermediate_size: int = 11264  # dense SwiGLU width (first_k_dense layers)
    moe_intermediate_size: int = 1408  # per-expert SwiGLU width
    num_routed_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2  # fused into one SwiGLU of width num_shared * moe_intermediate_size
    first_k_dense: int = 1
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True  # renormalise the chosen sigmoid scores
    aux_loss_alpha: float = 0.001  # sequence-level balance loss weight (0 disables it)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step u
    rms_norm_eps: float = 1e-5
    rope_theta: float = 50000.0  # 800000 after the long-context stage
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        w = "LMConfig"
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "max_position_embeddings",
        ):
            _check(getattr(self, name) > 0, f"{w}.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(self.qk_rope_head_dim % 2 == 0, f"{w}.qk_rope_head_dim", "must be even for RoPE")
        _check(self.q_lora_rank is None or self.q_lora_rank > 0, f"{w}.q_lora_rank", "must be None or > 0")
        _check(0 <= self.first_k_dense <= self.num_layers, f"{w}.first_k_dense", "must be in [0, num_layers]")
        if self.num_moe_layers:
            _check(self.num_routed_experts > 0, f"{w}.num_routed_experts", "must be > 0 with MoE layers")
            _check(
                0 < self.num_experts_per_tok <= self.num_routed_experts,
                f"{w}.num_experts_per_tok",
                f"must be in [1, num_routed_experts={self.num_routed_experts}], got {self.num_experts_per_tok}",
            )
        _check(self.num_shared_experts >= 0, f"{w}.num_shared_experts", "must be >= 0")
        _check(self.routed_scaling_factor > 0, f"{w}.routed_scaling_factor", "must be > 0")
        _check(self.aux_loss_alpha >= 0, f"{w}.aux_loss_alpha", "must be >= 0")
        _check(self.bias_update_rate >= 0, f"{w}.bias_update_rate", "must be >= 0")
        _check(self.rope_theta > 0, f"{w}.rope_theta", f"must be > 0, got {self.rope_theta}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_head_dim)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense


@dataclass(frozen=True)
class CoCaConfig:
    """The ViT-stage head (CoCa, Yu et al. 2022; Kimi-VL Sec. 2.3): SigLIP loss + caption decoder.

    A small text encoder (non-causal, mean-pooled) and an attention-pooled image embedding give the SigLIP
    pair logits; a small causal decoder conditioned on the image features (as a prefix) predicts captions.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    num_heads: int = 8
    intermediate_size: int = 2048
    num_text_encoder_layers: int = 4
    num_decoder_layers: int = 4
    embed_dim: int = 512  # shared contrastive embedding width
    max_text_len: int = 128
    image_prefix_merge: tuple[int, int] = (2, 2)  # pixel-shuffle of ViT features before the decoder prefix
    siglip_temperature_init: float = math.log(10.0)  # t, logits scale = exp(t)
    siglip_bias_init: float = -10.0  # b
    caption_loss_weight: float = 2.0  # lambda in L = L_siglip + lambda * L_caption
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        w = "CoCaConfig"
        for name in (
            "vocab_size",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "embed_dim",
            "max_text_len",
            "num_text_encoder_layers",
            "num_decoder_layers",
        ):
            _check(getattr(self, name) > 0, f"{w}.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0, f"{w}.hidden_size", "must be divisible by num_heads")
        _check(
            (self.hidden_size // self.num_heads) % 2 == 0, f"{w}.num_heads", "head dim must be even (RoPE)"
        )
        _check(self.caption_loss_weight >= 0, f"{w}.caption_loss_weight", "must be >= 0")


@dataclass(frozen=True)
class VLMConfig:
    """Kimi-VL = MoonViT + projector + MoE LM (+ the CoCa head used only in the ViT stage)."""

    name: str = "a3b"
    vit: MoonViTConfig = field(default_factory=MoonViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    coca: CoCaConfig = field(default_factory=CoCaConfig)
    media_pad_token_id: int = 163605  # <|media_pad|> in the public Kimi-VL tokenizer
    ignore_index: int = -100

    def __post_init__(self) -> None:
        w = "VLMConfig"
        _check(
            self.projector.vit_hidden_size == self.vit.hidden_size,
            f"{w}.projector.vit_hidden_size",
            f"must equal vit.hidden_size={self.vit.hidden_size}, got {self.projector.vit_hidden_size}",
        )
        _check(
            self.projector.lm_hidden_size == self.lm.hidden_size,
            f"{w}.projector.lm_hidden_size",
            f"must equal lm.hidden_size={self.lm.hidden_size}, got {self.projector.lm_hidden_size}",
        )
        _check(
            0 <= self.media_pad_token_id < self.lm.vocab_size,
            f"{w}.media_pad_token_id",
            f"must be a token id in [0, lm.vocab_size={self.lm.vocab_size}), got {self.media_pad_token_id}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming the key."""
        sub = {"vit": MoonViTConfig, "projector": ProjectorConfig, "lm": LMConfig, "coca": CoCaConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in known:
                raise ConfigError(f"VLMConfig.{k}: unknown field (expected one of {sorted(known)})")
            if k in sub:
                kwargs[k] = _build(sub[k], v, f"VLMConfig.{k}")
            else:
                kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes: Any) -> VLMConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            raise ConfigError(f"{where}.{k}: unknown field (expected one of {sorted(known)})")
        if isinstance(v, list):  # tuples come back as lists from JSON/YAML
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- presets


def _tiny() -> VLMConfig:
    """CPU-sized: a packed 512-token batch with two images does forward+backward well under a second."""
    vit = MoonViTConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
    lm = LMConfig(
        vocab_size=4096,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_routed_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        first_k_dense=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=2048,
    )
    coca = CoCaConfig(
        vocab_size=4096,
        hidden_size=64,
        num_heads=4,
        intermediate_size=256,
        num_text_encoder_layers=1,
        num_decoder_layers=2,
        embed_dim=64,
        max_text_len=64,
    )
    return VLMConfig(
        name="tiny",
        vit=vit,
        projector=ProjectorConfig(vit_hidden_size=64, lm_hidden_size=128),
        lm=lm,
        coca=coca,
        media_pad_token_id=5,  # the data pipeline's tokenizer reserves low ids for special tokens
    )


def _small() -> VLMConfig:
    """Benchmark-sized (~50-100M parameters): same shapes family as the reference DeepseekV3 bench."""
    vit = MoonViTConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    lm = LMConfig(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=1536,
        moe_intermediate_size=384,
        num_routed_experts=16,
        num_experts_per_tok=4,
        num_shared_experts=1,
        first_k_dense=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=8192,
    )
    coca = CoCaConfig(
        vocab_size=8192,
        hidden_size=256,
        num_heads=4,
        intermediate_size=1024,
        num_text_encoder_layers=2,
        num_decoder_layers=2,
        embed_dim=256,
    )
    return VLMConfig(
        name="small",
        vit=vit,
        projector=ProjectorConfig(vit_hidden_size=256, lm_hidden_size=512),
        lm=lm,
        coca=coca,
        media_pad_token_id=5,
    )


def _a3b() -> VLMConfig:
    """Full size: Kimi-VL-A3B (MoonViT 417M + projector 31M + Moonlight 16B-A3B)."""
    return VLMConfig(name="a3b", coca=CoCaConfig(vocab_size=163840))


PRESETS = {"tiny": _tiny, "small": _small, "a3b": _a3b}


def preset(name: str) -> VLMConfig:
    """A named preset; an unknown name is an error listing the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r} (expected one of {sorted(PRESETS)})") from None
