"""The evaluation suite end to end on a tiny random checkpoint and the tiny tokenized corpus: every task runs
and is written out; an oracle scores 1.0 everywhere and a constant answer about 0; held-out sets share no
id or text with the training data (checked here independently of the suite's own index); the CLI works."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from flows.cli.eval import eval_cmd
from kimivl_model.config import preset
from kimivl_model.vlm import KimiVL
from tasks.data.io import iter_rows
from tasks.data.schema import RECORD_SCHEMA
from tasks.data.special_tokens import IM_END, OWN_BPE_SPECIAL_IDS
from tasks.data.text_tokenizer import load_tokenizer
from tasks.eval.heldout import TrainingIndex, build_heldout
from tasks.eval.niah import NIAHConfig, haystacks
from tasks.eval.prompts import PromptBuilder
from tasks.eval.suite import GEN_TASKS, TASKS, EvalConfig, run_eval
from tasks.io.weights import save_native

SIZES = {t: 2 for t in ("vqa", "counting", "ocr", "grounding", "chart_qa", "doc_qa", "video_qa", "math")}
CFG = EvalConfig(
    sizes={**SIZES, "caption_loss": 3, "text_loss": 3},
    niah=NIAHConfig(lengths=(128, 256), video_lengths=(128, 256), depths=(0.0, 0.5, 1.0), max_new_tokens=1),
    max_new_tokens=1,  # one forward per item with the cache-free reference loop
    ocr_max_new_tokens=1,
    math_max_new_tokens=1,
)
PRIMARY = {
    "vqa": "exact_match",
    "counting": "accuracy",
    "ocr": "char_accuracy",
    "grounding": "iou",
    "chart_qa": "relaxed_accuracy",
    "doc_qa": "relaxed_accuracy",
    "video_qa": "exact_match",
    "math": "accuracy",
    "niah_text": "recall",
    "niah_video": "recall",
}


def naive_generate(model, input_ids, *, pixel_values=None, grid_hws=None, max_new_tokens, eos_ids=(), **_):
    """Reference greedy loop without a cache (stands in for kimivl_model.generate.greedy_generate)."""
    ids, out = input_ids, []
    for _ in range(max_new_tokens):
        logits = model(ids, pixel_values=pixel_values, grid_hws=grid_hws).logits  # (T, V)
        t = int(logits[-1].argmax())
        out.append(t)
        ids = torch.cat([ids, ids.new_tensor([t])])
        if t in eos_ids:
            break
    return SimpleNamespace(tokens=torch.tensor(out, dtype=torch.long))


def _key(ids: torch.Tensor | list[int], pixel_values: torch.Tensor | None) -> tuple:
    px = b"" if pixel_values is None else pixel_values.float().cpu().numpy().tobytes()
    return tuple(int(t) for t in ids), hashlib.sha256(px).hexdigest()


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    root = tiny_data[0]
    ck = tmp_path_factory.mktemp("eval-ck")
    torch.manual_seed(0)
    save_native(KimiVL(preset("tiny")).state_dict(), preset("tiny"), ck)
    return root, ck, root / "tokenizer"


def _answer_table(cfg: EvalConfig, tok_dir: Path, train_root: Path) -> tuple[dict, PromptBuilder]:
    """(prompt ids, pixels) -> correct answer, built with the public item/prompt/haystack builders."""
    b = PromptBuilder(load_tokenizer(tok_dir), preset("tiny"), cfg.prompt_style)
    index = TrainingIndex.from_data_root(train_root)
    table = {}
    for task in GEN_TASKS:
        hs = build_heldout(
            task, getattr(cfg.sizes, task), seed=cfg.seed, index=index, synth=cfg.synth_overrides()
        )
        for it in hs.items:
            table[_key(b.encode(it.question, it.images, it.media_kind), b.pixels(it.images)[0])] = it.answer
    for kind in ("text", "video"):
        for h in haystacks(kind, b, cfg.niah, seed=cfg.seed):
            table[_key(h.input_ids, b.pixels(h.images)[0])] = h.value
    return table, b


def test_run_eval_random_checkpoint_writes_everything(setup, tmp_path):
    root, ck, tok_dir = setup
    out = tmp_path / "eval"
    res = run_eval(
        ck, tok_dir, out, CFG, train_data_root=root, generate_fn=naive_generate, log=lambda *_: None
    )
    on_disk = json.loads((out / "eval.json").read_text())
    assert set(on_disk["tasks"]) == set(TASKS) and on_disk["summary"] == pytest.approx(res["summary"])
    assert on_disk["heldout_overlap"] == 0
    assert all(h["overlap"] == 0 and h["checked"] for h in on_disk["heldout"].values())
    for t in ("caption_loss", "text_loss"):  # a random model: CE about ln(vocab)
        assert abs(on_disk["tasks"][t]["metrics"]["loss"] - torch.log(torch.tensor(4096.0)).item()) < 1.0
    for t in GEN_TASKS:
        assert on_disk["tasks"][t]["metrics"]["n"] == 2
    grid = on_disk["tasks"]["niah_video"]["grid"]
    assert grid["lengths"] == [128, 256] and len(grid["recall"]) == 3
    md = (out / "report.md").read_text()
    assert "## Tasks" in md and "| niah_text | recall |" in md and "| (128, 256] |" in md
    for p in ("niah_heatmap.png", "niah_recall.png"):
        with Image.open(out / p) as im:
            assert im.size[0] > 100


def test_oracle_scores_one_constant_scores_zero(setup, tmp_path):
    root, ck, tok_dir = setup
    cfg = CFG.model_copy(update={"tasks": (*GEN_TASKS, "niah_text", "niah_video")})
    table, b = _answer_table(cfg, tok_dir, root)
    end = [OWN_BPE_SPECIAL_IDS[IM_END]]

    def oracle(model, input_ids, *, pixel_values=None, **_):
        ans = table[_key(input_ids, pixel_values)]
        return SimpleNamespace(tokens=torch.tensor(b.encode_text(ans) + end))

    def constant(model, input_ids, **_):
        return SimpleNamespace(tokens=torch.tensor(b.encode_text("<box>(0,0),(60,60)</box> -98765") + end))

    good = run_eval(
        ck, tok_dir, tmp_path / "o", cfg, train_data_root=root, generate_fn=oracle, log=lambda *_: None
    )
    bad = run_eval(
        ck, tok_dir, tmp_path / "c", cfg, train_data_root=root, generate_fn=constant, log=lambda *_: None
    )
    for task, key in PRIMARY.items():
        assert good["tasks"][task]["metrics"][key] == 1.0, task
        assert good["tasks"][task]["failures"] == []
        assert bad["tasks"][task]["metrics"][key] < 0.3, task
        if task not in ("ocr", "grounding"):
            assert bad["tasks"][task]["metrics"][key] == 0.0, task
    assert all(v == 1.0 for k, v in good["tasks"]["niah_video"]["recall_by_bin"].items())
    assert bad["tasks"]["vqa"]["failures"][0]["prediction"].startswith("<box>")


def _norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def test_heldout_sets_share_nothing_with_training_data(setup):
    """Independent check: ids, image bytes, questions and paragraphs vs every validated training record."""
    root = setup[0]
    ids, images, texts = set(), set(), set()
    for d in (root / "validated").iterdir():
        for row in iter_rows(d, RECORD_SCHEMA):
            ids.add(row["id"])
            images.update(hashlib.sha256(im["data"]).hexdigest() for im in row["images"])
            parts = [row["text"]] if row["text"] is not None else [m["content"] for m in row["messages"]]
            for p in parts:
                texts.update(_norm(x) for x in p.replace("<image>", " ").split("\n\n") if len(x.split()) >= 3)
    index = TrainingIndex.from_data_root(root)
    for task in ("vqa", "ocr", "chart_qa", "math", "text_loss", "caption_loss", "video_qa"):
        hs = build_heldout(task, 6, index=index)
        assert hs.overlap == 0 and len(hs.items) == 6
        for it in hs.items:
            assert it.id not in ids
            assert not {hashlib.sha256(im["data"]).hexdigest() for im in it.images} & images
            if not it.images:
                rec = it.record
                parts = [rec["text"]] if rec["text"] is not None else [m["content"] for m in rec["messages"]]
                assert not {_norm(x) for p in parts for x in p.split("\n\n") if len(x.split()) >= 3} & texts


def test_cli_eval_command(setup, tmp_path):
    root, ck, tok_dir = setup
    app = typer.Typer()
    app.command("eval")(eval_cmd)
    app.command("noop")(lambda: None)  # keeps "eval" a named subcommand
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["eval", "--checkpoint", str(ck), "--tokenizer", str(tok_dir), "--out", str(out)]
    r = runner.invoke(
        app, [*args, "--tasks", "caption_loss,text_loss", "--max-items", "2", "--train-data", str(root)]
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])["summary"]
    assert set(summary) == {
        f"{t}/{m}" for t in ("caption_loss", "text_loss") for m in ("loss", "perplexity")
    } | {"heldout/overlap"}
    assert (out / "report.md").is_file() and json.loads((out / "eval.json").read_text())["heldout"][
        "text_loss"
    ]["items"] == 2
    r = runner.invoke(app, [*args, "--tasks", "vqa,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output
    r = runner.invoke(app, [*args, "--niah-depths", "0,2"])
    assert r.exit_code == 2 and "niah" in r.output
