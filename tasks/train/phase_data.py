"""A phase's data side for the stage runner: its mixture config, its loader (packed mixture for lm/sft,
image-caption batches for coca) and the exact token accounting of its batches (per modality, per mixture
source, per share group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kimivl_model.config import VLMConfig
from tasks.data.loader import (
    MixtureConfig,
    PackedLoader,
    SourceSpec,
    tokens_by_source,
)
from tasks.data.row_store import join
from tasks.data.sources import read_dataset_manifest
from tasks.data.text_tokenizer import check_model_ids
from tasks.io.manifest import ManifestError
from tasks.recipe import Recipe
from tasks.train.coca_loader import CaptionLoader
from tasks.train.stages import PhaseConfig


def tokenized_dir(data_root: str | Path, name: str) -> str | Path:
    """``DATA/tokenized/<name>``: a local directory, or an ``s3://`` URI when the data root is one."""
    return join(data_root, "tokenized", name)


def mixture(recipe: Recipe, phase: PhaseConfig, data_root: Path) -> MixtureConfig:
    """The loader's mixture of a phase: its sources (located under ``DATA/tokenized``) and share schedule as
    the recipe states them, one packed sequence per micro-batch."""
    return MixtureConfig(
        sources=[SourceSpec(**s.model_dump(), path=tokenized_dir(data_root, s.name)) for s in phase.sources],
        schedule=phase.share_schedule,
        token_budget=phase.token_budget,
        seq_len=phase.seq_len,
        micro_batch_tokens=phase.seq_len,
        seed=recipe.train.seed,
        weight_unit=phase.weight_unit,
    )


def build_loader(recipe: Recipe, phase: PhaseConfig, data_root: Path, cfg: VLMConfig):
    mix = mixture(recipe, phase, data_root)
    if phase.objective == "coca":
        res = [(r.until_fraction, r.max_patches) for r in phase.progressive_resolution]
        return CaptionLoader(mix, phase.captions_per_batch, cfg.coca.max_text_len, res, phase.token_budget)
    return PackedLoader(mix)


def measure_tokens_per_step(phase: PhaseConfig, loader: Any) -> float | None:
    """CoCa batches are not seq_len rows: the tokens of an optimizer step measured on 3 batches of the
    phase's loader, whose state is then restored (it starts from its first batch). None for lm/sft."""
    if phase.objective != "coca":
        return None
    state = loader.state_dict()
    per_batch = sum(sum(next(loader)["tokens"].values()) for _ in range(3)) / 3
    loader.load_state_dict(state)
    return phase.micro_batches_per_step * per_batch


def check_tokenizer(phase: PhaseConfig, data_root: Path, cfg: VLMConfig) -> None:
    """Before the model is built: every source of the phase was tokenized with ids the model reads
    (``<|media_pad|>`` = the config's ``media_pad_token_id``, every id inside the vocabularies), read from
    the tokenize step's manifests; a mismatch is a ``TokenizerMismatchError`` naming both values."""
    for s in phase.sources:
        path = tokenized_dir(data_root, s.name)
        try:
            tok = read_dataset_manifest(path).extra.get("tokenizer")
        except ManifestError:
            continue  # the loader names the missing dataset
        if tok is not None:
            check_model_ids(tok, cfg, f"phase {phase.name!r}, source {s.name!r} ({path})")


MODALITIES = ("text", "image", "video")


def batch_tokens(batch: dict[str, Any]) -> dict[str, int]:
    """Tokens of each modality in a batch, as its loader counted them (packed: ``token_counts``; caption
    batches: ``tokens``)."""
    if "token_counts" in batch:
        return dict(zip(MODALITIES, (int(x) for x in batch["token_counts"].tolist()), strict=True))
    return {k: int(batch["tokens"][k]) for k in MODALITIES}


def batch_tokens_by_source(phase: PhaseConfig, batch: dict[str, Any], names: list[str]) -> dict[str, int]:
    """All tokens of a batch per mixture source (sums to ``batch_tokens``)."""
    if phase.objective == "coca":
        return dict(batch["tokens_by_source"])
    return tokens_by_source(batch, names)


def by_group(phase: PhaseConfig, by_source: dict[str, int]) -> dict[str, int]:
    """Per-source token counts summed per share group (``sources[].group``)."""
    out: dict[str, int] = {}
    for s in phase.sources:
        out[s.group] = out.get(s.group, 0) + by_source.get(s.name, 0)
    return out
