"""A phase's directories and starting model: from the previous phase's final checkpoint, the recipe's
init checkpoint, or from scratch (``tasks/train/runner.py`` runs the phase)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kimivl_model.compile import compile_blocks
from kimivl_model.config import VLMConfig
from kimivl_model.vlm import KimiVL
from tasks.io.manifest import Parent, read_manifest
from tasks.io.weights import NATIVE_WEIGHTS, load_native
from tasks.recipe import Recipe
from tasks.train.stages import PhaseConfig

RESULT = "result.json"


class MissingParentError(FileNotFoundError):
    """A phase needs the previous phase's final checkpoint, which does not exist yet."""


def phase_dir(out_root: Path, phase: PhaseConfig) -> Path:
    return Path(out_root) / "phases" / phase.name


def final_dir(out_root: Path, phase: PhaseConfig) -> Path:
    return phase_dir(out_root, phase) / "final"


def previous_phase(recipe: Recipe, phase: PhaseConfig) -> PhaseConfig | None:
    phases = list(recipe.phases)
    i = phases.index(phase)
    return phases[i - 1] if i > 0 else None


def start_weights_file(recipe: Recipe, phase: PhaseConfig, out_root: Path) -> Path | None:
    """The safetensors file ``build_model`` starts ``phase`` from (None: from scratch)."""
    prev = previous_phase(recipe, phase)
    if phase.init_from == "scratch" or prev is None:
        init = recipe.model.init_checkpoint
        return None if init is None else Path(init) / NATIVE_WEIGHTS
    return final_dir(out_root, prev) / NATIVE_WEIGHTS


def build_model(
    recipe: Recipe, phase: PhaseConfig, out_root: Path
) -> tuple[KimiVL, VLMConfig, Parent | None]:
    """The phase's starting model (full precision) and the parent checkpoint it came from."""
    with_coca = phase.objective == "coca"
    prev = previous_phase(recipe, phase)
    parent = None
    if phase.init_from == "scratch" or prev is None:
        if recipe.model.init_checkpoint is not None:
            cfg, sd = load_native(recipe.model.init_checkpoint)
            parent = Parent(uri=str(recipe.model.init_checkpoint), content_hash="init")
        else:
            cfg, sd = recipe.model.vlm_config(), None
    else:
        src = final_dir(out_root, prev)
        if not (src / RESULT).is_file():
            raise MissingParentError(
                f"phase {phase.name!r} starts from phase {prev.name!r}, whose final checkpoint {src} is missing: "
                f"run {prev.name!r} first"
            )
        cfg, sd = load_native(src)
        parent = read_manifest(src).parent_of(src)
    torch.manual_seed(recipe.train.seed)
    kw = {"attn_backend": recipe.model.attn_backend, "with_coca": with_coca}
    try:  # the checkpoint's tensors become the weights: no init, no second copy (None: no CoCa head in it)
        model = KimiVL.from_state_dict(cfg, sd, **kw) if sd is not None else None
    except ValueError as e:
        raise ValueError(f"checkpoint for phase {phase.name!r}: {e}") from None
    if model is None:  # from scratch, or a checkpoint without the CoCa head the ViT stage adds
        model = KimiVL(cfg, **kw)
        if sd is not None:
            missing, _ = model.load_state_dict(sd, strict=False)  # unexpected keys were refused above
            if bad := [k for k in missing if not k.startswith("coca.")]:
                raise ValueError(
                    f"checkpoint for phase {phase.name!r} does not fit the model: missing {bad[:5]}"
                )
    if phase.rope_theta is not None:
        model.set_rope_theta(phase.rope_theta)
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, rope_theta=phase.rope_theta))
    model.set_gradient_checkpointing(recipe.model.gradient_checkpointing)
    model.set_trainable(list(phase.trainable))
    if model.coca is not None:  # SigLIP negatives from every rank's micro-batch, or from its own only
        model.coca.siglip.gather_negatives = phase.coca_negatives == "all_ranks"
    if recipe.model.compile:
        compile_blocks(model)  # in place: parameter names (checkpoints) unchanged
    return model, cfg, parent
