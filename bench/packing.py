"""Packing + varlen attention vs pad-to-longest batches: useful (non-pad) tokens/s training the LM.

    python -m bench.packing [--quick] [--threads N] [--preset tiny]

Same documents (lognormal lengths, median 256, clipped to 32..2048: many short documents, a long tail),
same groups of documents per optimizer step, same number of steps, same initial weights, same optimizer
(Muon, the project's). Ours: each step's documents packed into ONE flat sequence with ``cu_seqlens``
(per-document causal attention, no pad token). Baseline: the same documents right-padded to the longest
of the step, run as B equal segments of L_max (the usual pad-to-longest batch; pads carry label -100 and
the batch goes through the same per-segment SDPA, i.e. the baseline gets the best attention kernel too).
Before timing, the first-step losses of both are checked to agree (pads change nothing a real token sees).
"""

from __future__ import annotations

import copy
import time

import torch

from bench.common import (
    bench_main,
    group_docs,
    lognormal_lengths,
    median,
    packed_batch,
    random_docs,
    rnd,
)
from kimivl_model.config import preset
from kimivl_model.lm import KimiLM
from kimivl_model.muon import Muon, build_param_groups

GOAL = 2.0


def padded_as_segments(docs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pad-to-longest in the packed layout: B segments of L_max; pads and each doc's last token -> -100."""
    lmax = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), lmax, dtype=torch.long)
    labels = torch.full((len(docs), lmax), -100, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
        labels[i, : len(d) - 1] = d[1:]
    cu = torch.arange(0, len(docs) * lmax + 1, lmax)
    return {"input_ids": ids.reshape(-1), "labels": labels.reshape(-1), "cu_seqlens": cu}


class Trainer:
    """One model + Muon; ``step(batch)`` = forward, CE + aux loss, backward, optimizer step, bias update."""

    def __init__(self, model: KimiLM, lr: float = 1e-3) -> None:
        self.model = model.train()
        self.opt = Muon(build_param_groups(model, lr=lr))

    def loss(self, b: dict[str, torch.Tensor]):
        return self.model(b["input_ids"], cu_seqlens=b["cu_seqlens"], labels=b["labels"], return_logits=False)

    def step(self, b: dict[str, torch.Tensor]) -> float:
        out = self.loss(b)
        (out.loss + out.aux_loss).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_router_bias(out.expert_load)
        return float(out.loss.detach())


def run(
    quick: bool = False, preset_name: str = "tiny", per_step: int = 8, steps: int = 8, passes: int = 2
) -> dict:
    lm_cfg = preset(preset_name).lm
    if quick:
        per_step, steps, passes, hi = 3, 1, 1, 128
    else:
        hi = 2048
    lengths = lognormal_lengths(per_step * steps, lo=32, hi=hi, seed=0)
    docs = random_docs(lengths, lm_cfg.vocab_size, seed=1)
    groups = group_docs(docs, per_step)
    packed = [packed_batch(g) for g in groups]
    padded = [padded_as_segments(g) for g in groups]
    useful = sum(lengths)
    padded_tokens = sum(int(b["input_ids"].numel()) for b in padded)

    torch.manual_seed(0)
    base = KimiLM(lm_cfg, attn_backend="sdpa")
    ours, theirs = Trainer(copy.deepcopy(base)), Trainer(copy.deepcopy(base))
    with torch.no_grad():  # correctness before timing: identical CE on the same documents
        loss_packed = float(ours.loss(packed[0]).loss)
        loss_padded = float(theirs.loss(padded[0]).loss)
    agree = abs(loss_packed - loss_padded) <= 1e-4 * max(1.0, abs(loss_packed))
    if not agree:
        raise AssertionError(f"packed loss {loss_packed} != padded loss {loss_padded}")

    ours.step(packed[0])  # warm-up (allocator, kernels), untimed
    theirs.step(padded[0])

    per_pass: dict[str, list[float]] = {"packed": [], "padded": []}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for p in range(passes):
        t = {"packed": 0.0, "padded": 0.0}
        for i in range(len(groups)):
            order = [("packed", ours, packed[i]), ("padded", theirs, padded[i])]
            for name, trainer, batch in order if (i + p) % 2 == 0 else reversed(order):
                t0 = time.perf_counter()
                trainer.step(batch)
                t[name] += time.perf_counter() - t0
        for k in t:
            per_pass[k].append(t[k])
    share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    sec_ours, sec_base = median(per_pass["packed"]), median(per_pass["padded"])
    ours_tps, base_tps = useful / sec_ours, useful / sec_base
    ratio = ours_tps / base_tps
    return {
        "what": "useful (non-pad) tokens/s training the LM: packed + per-document varlen attention vs "
        "pad-to-longest batches; same documents, steps, init and optimizer (Muon)",
        "preset": preset_name,
        "documents": len(lengths),
        "docs_per_step": per_step,
        "steps_per_pass": len(groups),
        "passes": passes,
        "cpu_share": rnd(share, 3),
        "doc_lengths": {
            "min": min(lengths),
            "median": sorted(lengths)[len(lengths) // 2],
            "max": max(lengths),
        },
        "useful_tokens_per_pass": useful,
        "padded_tokens_per_pass": padded_tokens,
        "pad_fraction_baseline": rnd(1 - useful / padded_tokens),
        "first_step_loss": {"packed": rnd(loss_packed, 7), "padded": rnd(loss_padded, 7), "agree": agree},
        "ours": {
            "name": "packed_varlen",
            "useful_tokens_per_s": rnd(ours_tps),
            "seconds_per_pass": rnd(sec_ours),
        },
        "baseline": {
            "name": "pad_to_longest",
            "useful_tokens_per_s": rnd(base_tps),
            "seconds_per_pass": rnd(sec_base),
        },
        "ratio": rnd(ratio),
        "goal": f">= {GOAL}",
        "goal_met": bool(ratio >= GOAL),
        "samples_s": {k: [rnd(x) for x in v] for k, v in per_pass.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    return bench_main("packing", __doc__, run, argv)


if __name__ == "__main__":
    main()
