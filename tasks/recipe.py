"""The recipe: one validated document (``params.yaml`` = ``configs/tiny.yaml``; ``configs/a3b.yaml``) that
drives data, every training phase and evaluation. It is checked completely before any work starts: a
bad field is a ``RecipeError`` naming the file and the field path (the CLI prints it and exits 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kimivl_model.config import PRESETS, ConfigError, VLMConfig, preset
from tasks.data.pipeline import QA_NAME, DataRecipe
from tasks.data.special_tokens import OWN_BPE_IDS
from tasks.data.synth import SYNTH_KINDS
from tasks.data.text_tokenizer import check_model_ids, load_tokenizer
from tasks.data.tokenizer import CHECKPOINT_TOKENIZER
from tasks.eval.points import INIT_POINT, RecipeEval
from tasks.io.weights import NATIVE_CONFIG, read_native_config
from tasks.train.engine_config import OptimizerSettings
from tasks.train.stages import NAME_PATTERN, STAGES, PhaseConfig


class RecipeError(ValueError):
    """An invalid recipe; the message names the file and the field."""


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    preset: str = Field(default="tiny", description="model preset: tiny | small | a3b")
    init_checkpoint: Path | None = Field(
        default=None, description="native checkpoint the first phase starts from (e.g. an imported model)"
    )
    attn_backend: Literal["auto", "flash", "torch_varlen", "sdpa", "sdpa_masked"] = Field(
        default="auto",
        description="varlen attention backend; auto: flash-attn, else torch varlen_attn on CUDA bf16, else SDPA",
    )
    gradient_checkpointing: bool = False
    compile: bool = Field(
        default=False,
        description="torch.compile every decoder layer and ViT block (for the CUDA path; attention, the aux "
        "loss and the per-expert loop stay eager; kimivl_model/compile.py)",
    )

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSettings:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (expected one of {sorted(PRESETS)})")
        return self

    def vlm_config(self) -> VLMConfig:
        return preset(self.preset)

    def architecture(self) -> VLMConfig:
        """The architecture every phase trains: ``init_checkpoint``'s config when it exists (an imported
        model, as the first phase loads it), else the preset (later phases keep their parent's)."""
        init = self.init_checkpoint
        if init is not None and (Path(init) / NATIVE_CONFIG).is_file():
            return read_native_config(init)
        return self.vlm_config()


class TrainSettings(OptimizerSettings):
    """Engine settings shared by every phase (``OptimizerSettings``: optimizer and its hyper-parameters,
    ZeRO, precision, clipping, seed), plus checkpointing; each phase adds its LR schedule and batch size."""

    checkpoint_every_steps: int = Field(default=20, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(default=2, gt=0, description="complete checkpoints kept per phase")
    data_workers: int = Field(
        default=0,
        ge=0,
        description="DataLoader worker processes per rank that read and decode its micro-batches ahead "
        "(packed lm/sft phases; 0 = in the training process when a batch is first used). Each takes one "
        "core of the rank's share (tasks/train/threads.py); any number resumes any checkpoint exactly",
    )
    data_prefetch: int = Field(default=2, ge=1, description="micro-batches in flight per data worker")
    resume_weights_only: bool = Field(
        default=False,
        description="resume a phase from its last checkpoint's weights, counters and data position with a FRESH "
        "optimizer state and RNG (the way to continue with another optimizer, or on another world size under "
        "ZeRO 1/2; muon and ZeRO 0 checkpoints reshard their optimizer state to a new world size by themselves)",
    )


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=100,
        description="recipe name, e.g. 'tiny' or 'a3b' (letters, digits, '_', '.', '-'): it names the MLflow "
        "registered model 'kimivl-NAME', which may not contain '/' or ':'",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataRecipe = Field(default_factory=DataRecipe)
    train: TrainSettings = Field(default_factory=TrainSettings)
    phases: tuple[PhaseConfig, ...] = Field(default=(), description="training phases in recipe order")
    eval: RecipeEval = Field(default_factory=RecipeEval, description="evaluation points of the pipeline")

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_from_checkpoint(cls, d: Any) -> Any:
        """``data.tokenizer: from_checkpoint`` = the tokenizer ``kimivl model import`` put beside the weights
        of ``model.init_checkpoint`` (its ``tokenizer/`` folder)."""
        data = d.get("data") if isinstance(d, dict) else None
        if not isinstance(data, dict) or data.get("tokenizer") != "from_checkpoint":
            return d
        init = (d.get("model") or {}).get("init_checkpoint")
        if init is None:
            raise ValueError(
                "data.tokenizer: 'from_checkpoint' needs model.init_checkpoint (an imported checkpoint)"
            )
        tok = {"source": "checkpoint", "path": str(Path(init) / CHECKPOINT_TOKENIZER)}
        return {**d, "data": {**data, "tokenizer": tok}}

    @model_validator(mode="after")
    def _tokenizer_fits_model(self) -> Recipe:
        """The data's token ids must be the ones the model reads: checked here, before any work, whenever the
        files it needs exist (a missing init checkpoint is reported by the commands that need it)."""
        tcfg = self.data.tokenizer
        init = self.model.init_checkpoint
        if tcfg.source == "train":  # the project's BPE: specials at 0..13, ids below vocab_size
            desc = {
                "special_ids": OWN_BPE_IDS.as_dict(),
                "max_used_id": tcfg.vocab_size - 1,
                "directory": "the project's BPE trained by the data pipeline (data.tokenizer.source 'train')",
            }
        elif tcfg.path is not None and tcfg.path.is_dir():
            try:
                desc = load_tokenizer(tcfg.path).describe()
            except (OSError, ValueError) as e:
                raise ValueError(f"data.tokenizer.path: {e}") from None
        elif init is not None and Path(init).is_dir():
            raise ValueError(
                f"data.tokenizer.path: {tcfg.path} does not exist: model.init_checkpoint {init} carries no "
                f"tokenizer (import the public checkpoint with `kimivl model import`, which brings it along)"
            )
        else:
            return self
        try:
            cfg = self.model.architecture()
        except (OSError, ValueError):
            return self  # an unreadable init checkpoint is reported where it is loaded
        where = "data.tokenizer" + (
            f" vs model.init_checkpoint {init}" if init else f" vs preset {self.model.preset!r}"
        )
        check_model_ids(desc, cfg, where)
        return self

    @model_validator(mode="after")
    def _phases_consistent(self) -> Recipe:
        names = [p.name for p in self.phases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"phases: duplicate phase names {dup}")
        order = [STAGES.index(p.stage) for p in self.phases]
        if order != sorted(order):
            raise ValueError(
                f"phases: stages must follow the recipe order {list(STAGES)}, got {[p.stage for p in self.phases]}"
            )
        if self.phases and self.phases[0].lr.mode == "continue":
            raise ValueError(f"phases.0.lr.mode: the first phase ({names[0]}) cannot continue a schedule")
        for i, p in enumerate(self.phases):
            src = p.lr.continue_from
            if src is not None and src not in names[:i]:
                raise ValueError(
                    f"phases.{i}.lr.continue_from: {src!r} is not an earlier phase of {names[:i]}"
                )
        known = set(SYNTH_KINDS) | {QA_NAME} | {s.name for s in self.data.sources}
        for i, p in enumerate(self.phases):
            unknown = sorted({s.name for s in p.sources} - known)
            if unknown:
                raise ValueError(
                    f"phases.{i}.sources: unknown datasets {unknown} in phase {p.name!r} (known: {sorted(known)})"
                )
            if p.objective == "lm" and p.stage in ("sft", "cot_sft"):
                raise ValueError(f"phases.{i}.objective: stage {p.stage!r} uses objective 'sft'")
        try:
            vlm = self.model.vlm_config()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        ep, experts = self.train.expert_parallel, vlm.lm.num_routed_experts
        if ep > 1 and experts % ep:
            raise ValueError(
                f"train.expert_parallel: {ep} does not divide the model's {experts} routed experts "
                "(each rank of an expert-parallel group holds the same number of experts)"
            )
        for i, p in enumerate(self.phases):
            sp = p.sequence_parallel
            if sp > 1 and vlm.lm.num_heads % sp:
                raise ValueError(
                    f"phases.{i}.sequence_parallel: {sp} does not divide the LM's {vlm.lm.num_heads} attention "
                    f"heads (each rank of phase {p.name!r}'s sequence-parallel group attends over heads / {sp})"
                )
            if p.seq_len > vlm.lm.max_position_embeddings * 64:
                raise ValueError(f"phases.{i}.seq_len: {p.seq_len} is beyond any supported context")
        for i, pt in enumerate(self.eval.points):
            if pt.after == INIT_POINT and self.model.init_checkpoint is None:
                raise ValueError(f"eval.points.{i}.after: {INIT_POINT!r} needs model.init_checkpoint")
            if pt.after != INIT_POINT and pt.after not in names:
                raise ValueError(
                    f"eval.points.{i}.after: {pt.after!r} is not a phase of this recipe "
                    f"({names}, or {INIT_POINT!r} for model.init_checkpoint)"
                )
        return self

    def phase(self, name: str) -> PhaseConfig:
        for p in self.phases:
            if p.name == name:
                return p
        raise RecipeError(
            f"unknown phase {name!r} (recipe {self.name!r} has {[p.name for p in self.phases]})"
        )

    def select(self, name: str) -> list[PhaseConfig]:
        """The phases ``name`` stands for: one phase of that name, or every phase of that stage."""
        if name in {p.name for p in self.phases}:
            return [self.phase(name)]
        return self.stage_phases(name)

    def stage_phases(self, stage: str) -> list[PhaseConfig]:
        ps = [p for p in self.phases if p.stage == stage]
        if not ps:
            raise RecipeError(
                f"unknown stage {stage!r} (recipe {self.name!r} has {sorted({p.stage for p in self.phases})})"
            )
        return ps


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        # a recipe-level check names its field(s) itself ("phases.3.seq_len: ...")
        lines.append(f"{source}: field {loc}: {msg}" if loc else f"{source}: field {msg}")
    return "\n".join(lines)


def recipe_from_dict(d: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(d)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, source)) from None


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe YAML; every problem is a ``RecipeError`` naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return recipe_from_dict(raw, str(path))
