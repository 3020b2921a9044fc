"""Build a MINIATURE stand-in for the public Kimi-VL-A3B checkpoint directory (and, optionally, a small
LLaVA-format dataset to fine-tune it on), because this machine reaches no model hub.

    .venv/bin/python scripts/make_public_checkpoint.py --out checkpoints/kimivl-mini [--llava-out data/mine]

What it mirrors of the published directory (``moonshotai/Kimi-VL-A3B-Instruct``), so the import, tokenizer,
fine-tune and export paths are exercised on the real formats:

- ``config.json``: ``model_type: kimi_vl``, ``vision_config`` (moonvit) and ``text_config`` (deepseek_v3)
  with the published key set (incl. token ids, ``torch_dtype``, ``auto_map``), small dimensions;
- weights: bf16 safetensors shards with the public key names (one tensor per routed expert) + index;
- tokenizer: ``tiktoken.model`` (``base64(bytes) rank`` per line; a byte-level BPE of 1792 ranks trained
  here with HF ``tokenizers`` on the project's prose, then written as tiktoken ranks) and
  ``tokenizer_config.json`` whose ``added_tokens_decoder`` puts the special tokens at the TOP of the
  vocabulary, at the same offsets from the first special id as the published file (163584 + k there,
  1792 + k here: ``[BOS]`` +0, ``[EOS]`` +1, ``<|im_end|>`` +2, ..., ``<|media_pad|>`` +21, ``[PAD]`` +255),
  with ``bos_token``/``eos_token``/``pad_token`` and a ``chat_template`` written here that renders the
  published conversation format (incl. its default system turn "You are a helpful assistant");
- ``preprocessor_config.json`` / ``generation_config.json`` with the published keys.

NOT mirrored: the remote-code ``*.py`` files (not ours to ship), real weights or the real 163,584-rank BPE.
Everything is deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from pathlib import Path

import torch

FIRST_SPECIAL_OFFSETS = {  # offset from the first special id -> token (published layout)
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    17: "<|im_middle|>",
    18: "<|media_start|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    254: "[UNK]",
    255: "[PAD]",
}
DEFAULT_SYSTEM = "You are a helpful assistant"
# the published conversation format, written for this fixture (one-line blocks: no stray whitespace)
CHAT_TEMPLATE = (
    "{%- set heads = {'system': '<|im_system|>', 'user': '<|im_user|>', 'assistant': '<|im_assistant|>'} -%}"
    "{%- if messages|length > 0 and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>" + DEFAULT_SYSTEM + "<|im_end|>"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{{ heads[m['role']] }}{{ m['role'] }}<|im_middle|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("square", "circle")


def _byte_of_char(ch: str) -> int:
    """Inverse of GPT-2's byte -> printable character map used by byte-level BPE token strings: bytes
    33-126, 161-172 and 174-255 stand for themselves, the others are 256 + n in byte order."""
    o = ord(ch)
    if 33 <= o <= 126 or 161 <= o <= 172 or 174 <= o <= 255:
        return o
    rest = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return rest[o - 256]


def _bytes_of(token: str) -> bytes:
    return bytes(_byte_of_char(c) for c in token)


def train_ranks(n_base: int, seed: int) -> dict[bytes, int]:
    """``n_base`` tiktoken ranks: the 256 bytes, then the merges of a byte-level BPE trained (HF
    ``tokenizers``) on the project's prose and this fixture's conversation words, in merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tasks.data.synth_text import prose_paragraphs

    texts = [p.text for p in prose_paragraphs()]
    rng = random.Random(seed)
    words = [*COLOURS, *SHAPES, "What colour is the", "shape?", "The shape is", DEFAULT_SYSTEM]
    texts += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=n_base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        ranks.setdefault(_bytes_of(a) + _bytes_of(b), len(ranks))
        if len(ranks) == n_base:
            break
    if len(ranks) != n_base:
        raise SystemExit(f"the corpus gave only {len(ranks)} BPE ranks, fewer than --base-vocab {n_base}")
    return ranks


def public_config(n_base: int) -> dict:
    """config.json with the published key set and miniature dimensions."""
    vocab = n_base + 256
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
            "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
        },
        "vision_config": {
            "model_type": "moonvit",
            "patch_size": 14,
            "init_pos_emb_height": 64,
            "init_pos_emb_width": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 256,
            "merge_kernel_size": [2, 2],
        },
        "text_config": {
            "vocab_size": vocab,
            "max_position_embeddings": 131072,
            "hidden_size": 128,
            "intermediate_size": 384,
            "moe_intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_shared_experts": 2,
            "n_routed_experts": 8,
            "ep_size": 1,
            "routed_scaling_factor": 2.446,
            "kv_lora_rank": 64,
            "q_lora_rank": None,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "qk_nope_head_dim": 32,
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "moe_layer_freq": 1,
            "first_k_dense_replace": 1,
            "norm_topk_prob": True,
            "scoring_func": "sigmoid",
            "aux_loss_alpha": 0.001,
            "seq_aux": True,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-05,
            "pretraining_tp": 1,
            "use_cache": True,
            "rope_theta": 800000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": n_base,
            "eos_token_id": n_base + 1,
            "pad_token_id": n_base + 255,
            "tie_word_embeddings": False,
            "model_type": "deepseek_v3",
            "torch_dtype": "bfloat16",
        },
        "ignore_index": -100,
        "media_placeholder_token_id": n_base + 21,
        "model_type": "kimi_vl",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
        "vocab_size": vocab,
        "pad_token_id": 0,
    }


def tokenizer_config(n_base: int) -> dict:
    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    named = {n_base + k: t for k, t in FIRST_SPECIAL_OFFSETS.items()}
    return {
        "added_tokens_decoder": {str(i): added(t) for i, t in sorted(named.items())},
        "additional_special_tokens": [t for k, t in sorted(FIRST_SPECIAL_OFFSETS.items()) if 2 <= k <= 21],
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def synthetic_ranks(n_base: int) -> dict[bytes, int]:
    """``n_base`` distinct ranks without training (the 256 bytes, then every byte pair, then byte triples):
    a vocabulary of the published size (163,584 ranks) for tests of the real id layout."""
    ranks = {bytes([b]): b for b in range(256)}
    for width in (2, 3):
        for i in range(256**width):
            if len(ranks) == n_base:
                return ranks
            ranks[i.to_bytes(width, "big")] = len(ranks)
    return ranks


def write_tokenizer(out: Path, ranks: dict[bytes, int]) -> Path:
    """``tiktoken.model`` + ``tokenizer_config.json`` (special tokens right after the ranks) in ``out``."""
    from tasks.io.files import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out / "tiktoken.model").write_text("\n".join(lines) + "\n")
    write_json_atomic(tokenizer_config(len(ranks)), out / "tokenizer_config.json")
    return out


def build_checkpoint(out: Path, seed: int = 0, n_base: int = 1792) -> Path:
    """Write the miniature public checkpoint directory; returns ``out``."""
    from kimivl_model.hf_interop import from_hf_config
    from kimivl_model.vlm import KimiVL
    from tasks.io.files import write_json_atomic
    from tasks.io.weights import save_hf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = public_config(n_base)
    cfg = from_hf_config(config, name="kimivl-mini")
    torch.manual_seed(seed)
    with torch.no_grad():
        model = KimiVL(cfg, attn_backend="sdpa")
        for p in model.parameters():  # perturbed: norm weights off 1, biases off 0, so a key mix-up shows
            p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_hf(sd, cfg, out, max_shard_bytes=1 << 20)  # several shards + index, as published
    write_json_atomic(config, out / "config.json")
    write_tokenizer(out, train_ranks(n_base, seed))
    write_json_atomic(
        {
            "auto_map": {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor"},
            "image_processor_type": "KimiVLImageProcessor",
            "patch_size": 14,
            "pad_input": False,
            "merge_kernel_size": [2, 2],
            "in_token_limit": 4096,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        out / "preprocessor_config.json",
    )
    write_json_atomic(
        {"bos_token_id": n_base, "eos_token_id": [n_base + 1, n_base + 2], "do_sample": False},
        out / "generation_config.json",
    )
    (out / "README.md").write_text(
        "# kimivl-mini\n\nA miniature, randomly initialised stand-in for the public Kimi-VL-A3B checkpoint "
        "layout, built by `scripts/make_public_checkpoint.py` for tests. Not a trained model.\n"
    )
    return out


def build_llava(out: Path, n: int = 48, seed: int = 0) -> Path:
    """A LLaVA-format dataset (``data.json`` + ``images/``): 1-3 coloured shapes at random places on a
    random background, asked how many there are and the colour of one; plus ``chat.jsonl`` with text-only
    conversations (small sums). Every sample differs (images and text), so deduplication keeps them.
    Returns ``out/data.json``."""
    from PIL import Image, ImageDraw

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        w, h = rng.choice([(112, 112), (140, 112), (112, 140), (168, 112)])
        im = Image.new("RGB", (w, h), tuple(rng.randrange(150, 256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        shapes = []
        for _ in range(rng.randint(1, 3)):
            colour, shape, r = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randrange(8, 20)
            x, y = rng.randrange(r, w - r), rng.randrange(r, h - r)
            (draw.rectangle if shape == "square" else draw.ellipse)(
                (x - r, y - r, x + r, y + r), fill=COLOURS[colour]
            )
            shapes.append((colour, shape, "left" if x < w / 2 else "right"))
        name = f"img_{i:04d}.png"
        im.save(out / "images" / name)
        colour, shape, side = shapes[-1]
        samples.append(
            {
                "id": f"mine-{i:04d}",
                "image": f"images/{name}",
                "conversations": [
                    {"from": "human", "value": f"<image>\nHow many shapes are in picture {i}?"},
                    {"from": "gpt", "value": f"There are {len(shapes)}."},
                    {"from": "human", "value": f"What colour is the {shape} drawn last, on the {side}?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    (out / "data.json").write_text(json.dumps(samples, indent=1))
    with open(out / "chat.jsonl", "w") as f:
        for i in range(n // 2):
            a, b = rng.randrange(100), rng.randrange(100)
            msgs = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"id": f"chat-{i:04d}", "messages": msgs}) + "\n")
    return out / "data.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--llava-out", type=Path, default=None, help="also write a LLaVA dataset here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-vocab", type=int, default=1792, help="BPE ranks before the 256 special ids")
    a = ap.parse_args()
    build_checkpoint(a.out, a.seed, a.base_vocab)
    print(f"wrote {a.out}")
    if a.llava_out is not None:
        print(f"wrote {build_llava(a.llava_out, seed=a.seed)}")


if __name__ == "__main__":
    main()
