"""Stage configs: every stage of the Kimi-VL recipe is data, not code (REFERENCE.md "Training recipe").

A recipe lists *phases* in order. A phase belongs to one recipe stage (``stage``) and names everything the
generic stage runner needs: objective, trainable components, data mixture (+ share schedule), sequence
length, token budget, LR schedule (continued or re-warmed), RoPE theta, and where its weights start.
Stages with sub-stages are several phases of the same ``stage``:

| stage          | phases (tiny recipe)                  | objective | trains                  |
|----------------|---------------------------------------|-----------|-------------------------|
| text_pretrain  | text_pretrain (stage 0, abbreviated)  | lm        | lm                      |
| vit            | vit                                   | coca      | vit + coca head         |
| align          | align                                 | lm        | vit + projector         |
| joint_pretrain | joint_pretrain                        | lm        | all                     |
| cooldown       | cooldown                              | lm        | all                     |
| long_context   | long_context.1, long_context.2 (x4)   | lm        | all                     |
| sft            | sft.1 (L), sft.2 (4L, re-warmed)      | sft       | all                     |
| cot_sft        | cot_sft                               | sft       | all                     |

Stage 0 (Moonlight's 5.2T-token text pretraining) is "given" in the paper; a real run imports that LM
(``model.init_checkpoint``). The tiny recipe has no such checkpoint, so it runs an abbreviated
``text_pretrain`` phase first so that later stages start from an LM that has seen text.
(The paper's RL stage for the Thinking model is not part of this system yet.)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.data.mixture import MixtureSource, ShareSchedule, check_mixture

STAGES = ("text_pretrain", "vit", "align", "joint_pretrain", "cooldown", "long_context", "sft", "cot_sft")
COMPONENTS = ("vit", "projector", "lm", "coca")


class _Strict(BaseModel):
    # NaN/Infinity are never a meaningful weight, learning rate, share or RoPE base (YAML spells them .nan/.inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LRConfig(_Strict):
    """One phase's learning rate.

    ``fresh`` starts a new schedule (warm-up + decay) spanning this phase and every phase that continues it;
    ``continue`` carries on the schedule of an earlier phase (``continue_from``, default the previous
    phase): joint pretraining continues the LM's pretraining schedule and cooldown continues that
    (REFERENCE.md), so a continuing phase leaves peak/min/warm-up unset.
    """

    mode: Literal["fresh", "continue"] = Field(default="fresh", description="fresh schedule or continue")
    peak_lr: float | None = Field(default=None, gt=0, description="peak learning rate (fresh only)")
    min_lr: float | None = Field(default=None, ge=0, description="final learning rate (fresh only)")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps (fresh only)")
    schedule: Literal["warmup_cosine", "cosine", "linear", "constant"] = "warmup_cosine"
    continue_from: str | None = Field(
        default=None,
        description="continue: the earlier phase whose schedule goes on (default: the previous one)",
    )

    @model_validator(mode="after")
    def _check(self) -> LRConfig:
        if self.continue_from is not None and self.mode != "continue":
            raise ValueError("continue_from is only valid with mode 'continue'")
        if self.mode == "fresh":
            if self.peak_lr is None or self.min_lr is None:
                raise ValueError("peak_lr and min_lr are required for mode 'fresh'")
            if self.min_lr > self.peak_lr:
                raise ValueError(f"min_lr ({self.min_lr}) must be <= peak_lr ({self.peak_lr})")
        elif self.peak_lr is not None or self.min_lr is not None or self.warmup_steps:
            raise ValueError(
                "mode 'continue' takes the previous schedule: leave peak_lr/min_lr/warmup_steps unset"
            )
        return self


class ResolutionStep(_Strict):
    until_fraction: float = Field(gt=0, le=1, description="applies until this fraction of the token budget")
    max_patches: int = Field(gt=0, description="max patches per image (images are downscaled to fit)")


# recipe and phase names: a directory, a DVC stage, a CLI argument, part of an MLflow model name
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PhaseConfig(_Strict):
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=100,
        description="unique phase name, e.g. 'long_context.1' (letters, digits, '_', '.', '-'; starts with a "
        "letter or digit): it names the phase's directory, its DVC stage and `kimivl stage NAME`",
    )
    stage: Literal[
        "text_pretrain", "vit", "align", "joint_pretrain", "cooldown", "long_context", "sft", "cot_sft"
    ]
    objective: Literal["coca", "lm", "sft"]
    trainable: tuple[Literal["vit", "projector", "lm", "coca"], ...]
    sources: tuple[MixtureSource, ...] = Field(min_length=1)
    share_schedule: ShareSchedule | None = None
    weight_unit: Literal["documents", "tokens"] = Field(
        default="documents",
        description="what sources[].weight and share_schedule shares measure: drawn documents, or tokens "
        "(each source's draw probability is divided by its mean document length, so the expected token "
        "shares are the weights: '25% long / 75% replay' as written). LM/SFT objectives only",
    )
    seq_len: int = Field(ge=8, description="packed sequence length in tokens (the packer needs >= 8)")
    token_budget: int = Field(
        gt=0, description="tokens consumed (all modalities, padding excluded) before stopping"
    )
    micro_batches_per_step: int = Field(
        default=1, gt=0, description="global micro-batches per optimizer step"
    )
    sequence_parallel: int = Field(
        default=1,
        ge=1,
        description="LM/SFT: each packed sequence is split over this many consecutive ranks (Ulysses all-to-all "
        "over attention heads, kimivl_model/sequence_parallel.py); must divide the world size and the LM's "
        "heads; the data-parallel degree is world / sequence_parallel",
    )
    lr: LRConfig
    rope_theta: float | None = Field(default=None, gt=0, description="set the LM RoPE base before this phase")
    init_from: Literal["previous", "scratch"] = "previous"
    router_bias_update: bool = Field(
        default=True, description="aux-loss-free bias update (pretraining stages)"
    )
    progressive_resolution: tuple[ResolutionStep, ...] = ()
    captions_per_batch: int = Field(
        default=8, gt=1, description="coca: image-caption pairs per micro-batch (per rank)"
    )
    coca_negatives: Literal["micro_batch", "all_ranks"] = Field(
        default="micro_batch",
        description="coca: the SigLIP negatives of an image: the other captions of its micro-batch, or of every "
        "data-parallel rank's micro-batch at the same micro-step (the SigLIP paper's distributed loss)",
    )

    @field_validator("trainable")
    @classmethod
    def _nonempty_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one component must be trainable")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate components in {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PhaseConfig:
        if self.objective == "coca" and "coca" not in self.trainable:
            raise ValueError("objective 'coca' needs 'coca' in trainable")
        if self.objective != "coca" and "coca" in self.trainable:
            raise ValueError(f"'coca' is trainable only with objective 'coca' (got {self.objective!r})")
        if self.objective != "coca" and self.coca_negatives != "micro_batch":
            raise ValueError(f"coca_negatives is for objective 'coca' (got {self.objective!r})")
        if self.objective == "coca" and self.weight_unit == "tokens":
            raise ValueError(
                "weight_unit 'tokens' is for packed LM/SFT phases; objective 'coca' draws (image, caption) "
                "pairs at the current resolution, so its weights are per document"
            )
        if self.objective == "coca" and self.sequence_parallel > 1:
            raise ValueError(
                f"sequence_parallel: {self.sequence_parallel} is for LM/SFT phases; objective 'coca' trains on "
                "(image, caption) batches, not packed sequences"
            )
        check_mixture(self.sources, self.share_schedule, lambda s: s.group)
        fr = [r.until_fraction for r in self.progressive_resolution]
        if fr and (fr != sorted(fr) or fr[-1] != 1.0):
            raise ValueError(f"progressive_resolution until_fraction must increase and end at 1.0, got {fr}")
        if self.token_budget < self.seq_len:
            raise ValueError(f"token_budget ({self.token_budget}) must be >= seq_len ({self.seq_len})")
        return self


def token_mix(tokens_by_group: dict[str, int] | None) -> str:
    """A phase's token share per mixture group, largest first: 'replay 75% · long 25%' ('-' if unknown)."""
    total = sum((tokens_by_group or {}).values())
    if not total:
        return "-"
    ranked = sorted(tokens_by_group.items(), key=lambda kv: (-kv[1], kv[0]))
    return " · ".join(f"{g} {100 * v / total:.0f}%" for g, v in ranked)
