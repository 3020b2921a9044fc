"""Bytes at rest, one owner: files (atomic writes, hashing, staged directories), step manifests, local and
S3 storage, model weights (safetensors, the public layout), published copies, fault injection points."""
