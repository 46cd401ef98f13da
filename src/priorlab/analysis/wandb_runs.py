"""Offline W&B runs read back without a network: what a study's runs hold before `wandb sync` uploads them.

An offline run keeps everything in its `run-<id>.wandb` file (wandb-core writes no config.yaml nor
wandb-summary.json offline): W&B's transaction log, in LevelDB's log format (a 7-byte file header `:W&B`, 0xBEE1,
version 0; then 32 KiB blocks of chunks, each with a 7-byte header of CRC, length and type: whole, first, middle
or last part of a record), each record a `wandb_internal_pb2.Record` protobuf. wandb 0.31 has no Python reader of
it (its Go core reads it), so this one reads the records the dashboard needs: the run (name, group, tags, job
type), config updates and history rows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<IHB")  # CRC-32C (unchecked here), data length, chunk type
FILE_HEADER = b":W&B\xe1\xbe\x00"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """One offline W&B run: `history` holds the rows logged (metric key → value), `summary` the last value of each
    key, as W&B's run summary shows it."""

    path: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        out: dict = {}
        for row in self.history:
            out.update(row)
        return out


def _records(data: bytes):
    """The records' bytes of a transaction log (module doc)."""
    if not data.startswith(FILE_HEADER):
        raise ValueError("not a W&B transaction log (.wandb file)")
    pos, parts = len(FILE_HEADER), []
    while pos + HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER.size:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = HEADER.unpack_from(data, pos)
        if kind == 0:  # zeros: padding to the end of the block, or a file still being written
            pos += left
            continue
        chunk = data[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            yield b"".join(parts)


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """The run in an `offline-run-*` folder (its run-*.wandb file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    path = next(run_dir.glob("run-*.wandb"))
    run = OfflineRun(run_dir)
    for raw in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
    return run


def offline_runs(study_dir: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under a study folder (`<study>/wandb/`, or a run folder's own wandb/ of older runs)."""
    folders = sorted(Path(study_dir).glob("**/wandb/offline-run-*"))
    return [read_offline_run(p) for p in folders if any(p.glob("run-*.wandb"))]
