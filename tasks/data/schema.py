"""The one record schema every dataset in the pipeline uses (Parquet, typed with pyarrow).

A record is one training document of any kind. Pretraining-style documents (captions, interleaved
image-text, OCR, plain text, long documents) carry ``text``; conversational ones (QA, SFT, long-CoT) carry
``messages`` (ChatML roles). Exactly one of the two is set. Media placeholders inside the text mark where
each image goes, in order:

- ``<image>``: the next entry of ``images``;
- ``<video>``: ALL entries of ``images`` as the frames of one video (``media_kind == "video"``).

``images`` holds encoded bytes (PNG/JPEG/WebP) plus their pixel size, so size-dependent work (patch grids,
token counts, filters) never needs to decode. ``meta`` is a JSON object (string) with kind-specific ground
truth: attributes, boxes, OCR strings, verified answers, generator seeds.

Tokenized shards (after the tokenizer step) use ``TOKENIZED_SCHEMA``.
"""

from __future__ import annotations

import pyarrow as pa

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

# kinds of documents the recipe needs (REFERENCE.md training recipe / data columns)
KINDS = (
    "caption",  # image + alt text / synthetic caption
    "grounding",  # image + text with boxes
    "ocr",  # image of rendered text + the text
    "chart_qa",  # chart image + QA
    "doc_qa",  # document image + QA
    "interleaved",  # several images inside one text document
    "video_qa",  # frames + QA
    "video_haystack",  # long frame sequence (needle-in-a-haystack source)
    "long_doc",  # long text document (long-context stage)
    "text",  # plain text
    "sft",  # multi-turn, multi-image ChatML conversation
    "cot",  # math problem with a verified long chain-of-thought trace
    "synthetic_qa",  # QA pairs made by the QA-synthesis step (rejection-sampled)
)
MEDIA_KINDS = ("none", "image", "video")
ROLES = ("system", "user", "assistant")

IMAGE_STRUCT = pa.struct(
    [
        pa.field("data", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),  # "png" | "jpeg" | "webp"
    ]
)
MESSAGE_STRUCT = pa.struct(
    [pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)]
)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # unique within a dataset, stable across runs
        pa.field("kind", pa.string(), nullable=False),  # one of KINDS
        pa.field("source", pa.string(), nullable=False),  # generator or user dataset name
        pa.field("text", pa.string(), nullable=True),
        pa.field("messages", pa.list_(MESSAGE_STRUCT), nullable=True),
        pa.field("images", pa.list_(IMAGE_STRUCT), nullable=False),  # may be empty
        pa.field("media_kind", pa.string(), nullable=False),  # one of MEDIA_KINDS
        pa.field("meta", pa.string(), nullable=False),  # JSON object
    ]
)

# Rows set aside by a filtering/validation/dedup step: the record plus why.
QUARANTINE_SCHEMA = RECORD_SCHEMA.append(pa.field("reason", pa.string(), nullable=False)).append(
    pa.field("step", pa.string(), nullable=False)
)
DUPLICATE_SCHEMA = RECORD_SCHEMA.append(pa.field("duplicate_of", pa.string(), nullable=False)).append(
    pa.field("method", pa.string(), nullable=False)  # "exact" | "minhash" | "phash"
)

GRID_STRUCT = pa.struct(
    [pa.field("h", pa.int32(), nullable=False), pa.field("w", pa.int32(), nullable=False)]
)

TOKENIZED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # (T,) unshifted
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),  # (T,) True = token is a target
        pa.field("images", pa.list_(IMAGE_STRUCT), nullable=False),  # in placeholder order
        pa.field("grid_hws", pa.list_(GRID_STRUCT), nullable=False),  # patch grid per image (after resize)
        # stored size (height, width) per image: what a loader needs to re-grid an image without its bytes
        pa.field("image_sizes", pa.list_(GRID_STRUCT), nullable=False),
        pa.field("media_kind", pa.string(), nullable=False),
        pa.field("num_text_tokens", pa.int32(), nullable=False),
        pa.field("num_image_tokens", pa.int32(), nullable=False),  # <|media_pad|> count of still images
        pa.field("num_video_tokens", pa.int32(), nullable=False),  # <|media_pad|> count of video frames
    ]
)


def empty_table(schema: pa.Schema = RECORD_SCHEMA) -> pa.Table:
    return schema.empty_table()
