"""The user's first job, end to end through the README's commands: import the public Kimi-VL checkpoint
(here the miniature stand-in of ``scripts/make_public_checkpoint.py``: tiktoken tokenizer with its special
tokens at the TOP of the vocabulary, bf16 shards, the published config keys), fine-tune it with
``configs/finetune_kimivl.yaml`` on an ingested LLaVA file + JSONL chats through ``kimivl run``, export,
re-import.

Checked: every token id the data holds comes from the checkpoint's tokenizer (conversations equal the
checkpoint's chat template rendered and encoded, placeholder counts equal the images' token counts), the
loss falls, the export has the input's layout (tensor names, config keys, tokenizer files) and re-imports
to the fine-tuned weights, and transformers' ``DeepseekV3ForCausalLM`` loaded from the exported LM
weights gives our logits (rel <= 1e-4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.data.chat_format import ChatFormat
from tasks.data.io import iter_rows
from tasks.data.row_store import iter_rows as iter_tokenized
from tasks.data.schema import RECORD_SCHEMA, TOKENIZED_SCHEMA
from tasks.data.text_tokenizer import load_tokenizer
from tasks.io.weights import load_hf, load_native
from tests.integration.conftest import subprocess_env
from tests.public_fixture import script

ROOT = Path(__file__).resolve().parents[2]


def _kimivl(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "PREFECT_HOME": str(home), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> dict[str, Path]:
    ws = tmp_path_factory.mktemp("finetune")
    home = ws / "prefect"
    script().build_checkpoint(ws / "checkpoints/kimivl-mini", seed=0)
    script().build_llava(ws / "data/mine", n=48, seed=0)
    res = _kimivl(
        "model", "import", "checkpoints/kimivl-mini", "--out", "checkpoints/kimivl-native", cwd=ws, home=home
    )
    assert res.returncode == 0, res.stdout + res.stderr
    raw = yaml.safe_load((ROOT / "configs/finetune_kimivl.yaml").read_text())
    (sft,) = raw["phases"]
    sft["token_budget"] = 12288
    sft["seq_len"] = 1024
    sft["lr"] = {
        "mode": "fresh",
        "peak_lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 1,
        "schedule": "warmup_cosine",
    }
    raw["eval"]["points"] = [{"after": "sft", "tasks": ["vqa", "text_loss"]}]
    recipe = (
        ws / "finetune.yaml"
    )  # the shipped recipe with a test-sized budget and an LR that moves a random model
    recipe.write_text(yaml.safe_dump(raw))
    res = _kimivl(
        "run", "--recipe", str(recipe), "--out", "runs/ft", "--tracking", "local", cwd=ws, home=home
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return {
        "ws": ws,
        "src": ws / "checkpoints/kimivl-mini",
        "native": ws / "checkpoints/kimivl-native",
        "run": ws / "runs/ft",
    }


def test_import_brings_the_tokenizer_and_the_data_uses_its_ids(finetuned):
    run = finetuned["run"]
    tok = load_tokenizer(run / "data/tokenizer")
    assert tok.kind == "tiktoken" and tok.special.media_pad == 1792 + 21  # the checkpoint's, not 0..13
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (run / "data/tokenizer" / name).read_bytes() == (finetuned["src"] / name).read_bytes()
    assert (finetuned["native"] / "tokenizer/tiktoken.model").is_file()
    chat = ChatFormat(tok)
    records = {r["id"]: r for r in iter_rows(run / "data/validated/mine", RECORD_SCHEMA)}
    rows = list(iter_tokenized(run / "data/tokenized/mine", TOKENIZED_SCHEMA))
    assert len(rows) == len(records) == 48
    for row in rows:
        ids = row["input_ids"]
        # the placeholders: one block per image, pads = the image's tokens
        n_img = [(g["h"] // 2) * (g["w"] // 2) for g in row["grid_hws"]]
        assert ids.count(tok.special.media_pad) == sum(n_img) == row["num_image_tokens"] > 0
        # the ids are the checkpoint's template, rendered and encoded, byte for byte (pads expanded)
        rendered = chat.render_template(records[row["id"]]["messages"])
        want = tok.backend.encode(rendered, allowed_special="all")
        k = want.index(tok.special.media_pad)
        assert ids == want[:k] + [tok.special.media_pad] * n_img[0] + want[k + 1 :]
        # and decode back to the rendering
        assert tok.decode(ids).replace("<|media_pad|>" * n_img[0], "<|media_pad|>") == rendered
        mask = np.array(row["loss_mask"])
        assert tok.decode(np.array(ids)[mask].tolist()).count("<|im_end|>") == 2  # the two answers only


def test_loss_falls(finetuned):
    steps = [json.loads(x) for x in (finetuned["run"] / "phases/sft/metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_export_has_the_input_layout_and_reimports(finetuned, tmp_path):
    src, hf = finetuned["src"], finetuned["run"] / "export/hf"

    def keys(d: dict, p: str = "") -> set[str]:
        return {p + k for k in d} | {
            x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{p}{k}.")
        }

    a, b = (json.loads((d / "config.json").read_text()) for d in (src, hf))
    assert keys(a) == keys(b) and a["torch_dtype"] == b["torch_dtype"] == "bfloat16"
    wa, wb = (
        set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) for d in (src, hf)
    )
    assert wa == wb
    for name in (
        "tiktoken.model",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (hf / name).read_bytes() == (src / name).read_bytes(), name
    # re-import: the fine-tuned weights (bf16 as exported) and the same tokenizer come back
    res = _kimivl("model", "import", str(hf), "--out", str(tmp_path / "back"), cwd=ROOT, home=tmp_path / "p")
    assert res.returncode == 0, res.stdout + res.stderr
    _, final = load_native(finetuned["run"] / "phases/sft/final")
    _, back = load_native(tmp_path / "back")
    assert set(final) - {k for k in final if k.startswith("coca.")} == set(back)
    for k, t in back.items():
        assert torch.equal(t, final[k].to(torch.bfloat16)), k
    text = "How many shapes are in picture 7? There are 3."
    assert load_tokenizer(tmp_path / "back/tokenizer").encode(text) == load_tokenizer(src).encode(text)


def test_transformers_deepseek_v3_gives_our_logits_from_the_exported_weights(finetuned, tmp_path):
    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    from kimivl_model.vlm import KimiVL

    hf = finetuned["run"] / "export/hf"
    cfg, sd = load_hf(hf)  # our side: the same exported files
    ours = KimiVL.from_state_dict(cfg, sd, attn_backend="sdpa").float().eval()
    # theirs: the exported text_config and LM tensors as a standalone DeepSeek-V3 checkpoint (per-expert
    # tensors, converted by transformers' own loader)
    from safetensors import safe_open

    lm = {}
    for f in sorted(hf.glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118
                if k.startswith("language_model."):
                    lm[k.removeprefix("language_model.")] = fh.get_tensor(k)
    save_file(lm, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    text_config = json.loads((hf / "config.json").read_text())["text_config"]
    (tmp_path / "config.json").write_text(
        json.dumps({**text_config, "architectures": ["DeepseekV3ForCausalLM"]})
    )
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 1792, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits[0].float()
        got = ours.language_model(ids[0], cu_seqlens=torch.tensor([0, 48])).logits.float()
    rel = float((got - want).norm() / want.norm())
    assert rel <= 1e-4, rel
