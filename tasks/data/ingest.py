"""Ingest user data in standard formats into the pipeline's Parquet record datasets (DESIGN.md "Data flow").

Formats (``IngestConfig.format``) and what ``src`` is:

- ``llava``: a JSON list of ``{"id", "image" | "images", "conversations": [{"from", "value"}]}``; roles
  human/gpt/system -> user/assistant/system; images relative to ``image_root`` (default: the JSON's folder).
  An image without any ``<image>`` placeholder gets one per image prepended to the first user turn (the
  LLaVA convention), noted in ``meta["ingest"]["placeholders_added"]``.
- ``coco``: a COCO captions JSON ``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``;
  one caption record (``"<image>" + caption``) per annotation.
- ``jsonl``: a ``.jsonl`` file (or a folder of them), one object per line with ``text`` (or ``messages``),
  optional ``id`` and ``meta``. Blank lines are not rows.
- ``webdataset``: a ``.tar`` shard (or a folder of them); members sharing a key (path up to the first dot
  of the basename) form a sample: one image (.jpg/.jpeg/.png/.webp) + ``.txt`` or ``.json``
  (``caption``/``text``). Members are read in memory, never extracted to disk.
- ``parquet``: a file (or folder) already in ``RECORD_SCHEMA``; a wrong schema is a ``DatasetError``.

Whole-file problems (unreadable file, malformed JSON in a llava/coco file, wrong top-level shape or
schema) raise ``DatasetError`` naming the file; a JSONL line that is not a JSON object is a quarantined
row (``bad_json``). Row problems go to quarantine with a reason naming
the file, row/key and field (``tasks/data/ingest_checks.py`` lists the rules); ``accepted + quarantined ==
input``. Ids must be unique within the input: a repeated id is quarantined (the first occurrence counts).

Skip rule: the parents are the source files' content hash and, for llava/coco, a fingerprint of the
referenced image files (relative path, size, mtime); so editing an image re-runs the ingest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tasks.data.ingest_checks import Reject, excerpt, validate_record
from tasks.data.ingest_common import IngestConfig
from tasks.data.ingest_readers import READERS, Item, check_path_name
from tasks.data.io import DatasetError, ShardWriter
from tasks.data.schema import KINDS, QUARANTINE_SCHEMA, RECORD_SCHEMA
from tasks.io.files import staged_dir
from tasks.io.manifest import Manifest, is_up_to_date, read_manifest, write_manifest

FORMATS = ("llava", "coco", "jsonl", "webdataset", "parquet")
DEFAULT_KIND = {"llava": "sft", "coco": "caption", "jsonl": "text", "webdataset": "caption", "parquet": None}


def _raw_kind(raw: Any) -> str:
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if kind in KINDS else "text"


def _quarantine_row(item: Item, r: Reject, cfg: IngestConfig) -> dict[str, Any]:
    return {
        "id": item.id or f"<no id> {item.where}",
        "kind": cfg.kind or DEFAULT_KIND[cfg.format] or _raw_kind(item.raw),
        "source": cfg.source,
        "text": None,
        "messages": None,
        "images": [],
        "media_kind": "none",
        "meta": json.dumps({"ingest": {"format": cfg.format, "where": item.where}, "raw": excerpt(item.raw)}),
        "reason": r.reason,
        "step": "ingest",
    }


def run_ingest(src: Path, out_dir: Path, cfg: IngestConfig) -> Manifest:
    """Read ``src`` in ``cfg.format`` and write accepted records + quarantine to ``out_dir``."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"ingest source {src} does not exist")
    check_path_name(src, "source")
    if cfg.image_root is not None:
        check_path_name(cfg.image_root, "image_root")
    if cfg.format in ("llava", "coco") and not src.is_file():
        raise DatasetError(f"{src}: the {cfg.format} format needs a JSON file, got a directory")
    parents, items = READERS[cfg.format](src, cfg)
    if is_up_to_date(out_dir, config=cfg, parents=parents):
        return read_manifest(out_dir)
    seen: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    n_in = n_img = added = 0
    with staged_dir(out_dir) as stage:
        ok = ShardWriter(stage, RECORD_SCHEMA, cfg.rows_per_shard)
        bad = ShardWriter(stage / "quarantine", QUARANTINE_SCHEMA, cfg.rows_per_shard)
        for item in items:
            n_in += 1
            try:
                if item.id_error is not None:
                    raise item.id_error
                if item.id in seen:
                    raise Reject(
                        "duplicate_id",
                        item.where,
                        "id",
                        f"duplicate id {item.id!r} (first seen at {seen[item.id]})",
                    )
                seen[item.id] = item.where  # type: ignore[index]
                rec = item.build()
                validate_record(rec, item.where)
            except Reject as r:
                reasons[r.rule] += 1
                bad.write(_quarantine_row(item, r, cfg))
                continue
            ok.write(rec)
            n_img += len(rec["images"])
            added += json.loads(rec["meta"])["ingest"].get("placeholders_added", 0)
        accepted, quarantined = ok.close(), bad.close()
        counts = {"input": n_in, "accepted": accepted, "quarantined": quarantined, "images": n_img}
        extra = {
            "format": cfg.format,
            "source": cfg.source,
            "quarantine_reasons": dict(sorted(reasons.items())),
            "placeholders_added": added,
        }
        m = write_manifest(
            stage, kind="dataset", step="ingest", config=cfg, parents=parents, counts=counts, extra=extra
        )
    return m
