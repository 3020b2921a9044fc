"""Step manifests: the lineage record every pipeline step writes beside its outputs.

``DIR/manifest.json`` says what ``DIR`` is and what it was made from:

- ``kind``: what the directory holds (``dataset``, ``tokenizer``, ``tokenized``, ``packed``, ``checkpoint``...)
- ``step``: the step that wrote it (``synth``, ``filter``, ``dedup``, ...)
- ``content_hash``: sha256 over the sorted (relative path, file sha256) pairs of every output file
  (the manifest itself excluded); identical bytes -> identical hash, so "same seed -> same hash".
- ``parents``: ``[{"uri", "content_hash"}]`` of the inputs.
- ``config_hash``: sha256 of the step config's canonical JSON.
- ``code_version``: the package version plus the git commit when available (informational: it is not part
  of the skip decision, so a documentation commit does not force reruns).
- ``counts``: rows, tokens by modality, and for filtering/validation steps ``{input, accepted, quarantined}``.
- ``files``: every output file with its size and sha256 (integrity check on read).

A step whose existing manifest records the same parents and config hash, and whose files still match their
recorded hashes, is up to date and is skipped (``is_up_to_date``). Manifests are written last and
atomically, so a directory without a manifest is never mistaken for a finished output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.io.files import atomic_path, sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Any) -> str:
    """sha256 of a config's canonical JSON (pydantic models, dataclasses and dicts)."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    elif hasattr(config, "__dataclass_fields__"):
        config = asdict(config)
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def list_output_files(out_dir: Path) -> list[Path]:
    """Every regular file under ``out_dir`` except the manifest and temp files, sorted by relative path."""
    out_dir = Path(out_dir)
    files = [
        p
        for p in out_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".") and ".tmp" not in p.name
    ]
    return sorted(files, key=lambda p: p.relative_to(out_dir).as_posix())


def hash_files(out_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    out_dir = Path(out_dir)
    entries = []
    h = hashlib.sha256()
    for p in list_output_files(out_dir):
        rel = p.relative_to(out_dir).as_posix()
        digest = sha256_file(p)
        entries.append({"path": rel, "bytes": p.stat().st_size, "sha256": digest})
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest(), entries


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("kimivl")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{v}+g{sha}"
    except (OSError, subprocess.SubprocessError):
        return v


@dataclass
class Parent:
    uri: str
    content_hash: str


@dataclass
class Manifest:
    kind: str
    step: str
    content_hash: str
    config_hash: str
    parents: list[Parent] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    code_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["parents"] = [Parent(**p) for p in d.get("parents", [])]
        return cls(**d)

    def parent_of(self, out_dir: Path) -> Parent:
        """This output as a ``Parent`` entry for the next step."""
        return Parent(uri=str(Path(out_dir).resolve()), content_hash=self.content_hash)


def write_manifest(
    out_dir: Path,
    *,
    kind: str,
    step: str,
    config: Any,
    parents: list[Parent] | None = None,
    counts: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    content_hash: str | None = None,
) -> Manifest:
    """Hash everything in ``out_dir`` and write ``manifest.json`` atomically (always the last write).
    ``content_hash``: the output's hash when its files do not reproduce it (a Lance dataset's file names are
    random: ``tasks.data.row_store`` hashes its rows); every file is still listed with its sha256."""
    out_dir = Path(out_dir)
    content, files = hash_files(out_dir)
    content = content_hash or content
    m = Manifest(
        kind=kind,
        step=step,
        content_hash=content,
        config_hash=config_hash(config),
        parents=list(parents or []),
        counts=dict(counts or {}),
        files=files,
        code_version=code_version(),
        extra=dict(extra or {}),
    )
    # the manifest makes the directory complete: written last, atomically (a crash point before the rename)
    with atomic_path(out_dir / MANIFEST_NAME, crash_name=f"manifest:{step}") as tmp:
        tmp.write_text(json.dumps(m.to_dict(), indent=2, sort_keys=True) + "\n")
    return m


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent manifest; the message names the directory."""


def read_manifest(out_dir: Path) -> Manifest:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing (the step that makes {out_dir} has not completed)")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None


def verify_files(out_dir: Path, manifest: Manifest | None = None) -> None:
    """Raise ``ManifestError`` naming the first file whose bytes differ from the manifest."""
    out_dir = Path(out_dir)
    m = manifest or read_manifest(out_dir)
    for entry in m.files:
        p = out_dir / entry["path"]
        if not p.is_file():
            raise ManifestError(f"{p}: listed in {out_dir / MANIFEST_NAME} but missing")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            raise ManifestError(f"{p}: content differs from its manifest (corrupt or modified)")


def dir_parent(directory: Path) -> Parent:
    """A directory as a manifest parent: its manifest's hash when it has one, else the hash of its files
    (e.g. an imported checkpoint or a tokenizer made elsewhere)."""
    try:
        return read_manifest(directory).parent_of(directory)
    except ManifestError:
        return Parent(uri=str(Path(directory).resolve()), content_hash=hash_files(directory)[0])


def is_up_to_date(out_dir: Path, *, config: Any, parents: list[Parent] | None = None) -> bool:
    """True when ``out_dir`` holds a complete output made from these parents with this config."""
    try:
        m = read_manifest(out_dir)
        verify_files(out_dir, m)
    except ManifestError:
        return False
    # parents compare by content, not location: a moved or re-rooted workspace is still up to date
    want = sorted(p.content_hash for p in (parents or []))
    have = sorted(p.content_hash for p in m.parents)
    return m.config_hash == config_hash(config) and want == have
