"""Checkpoint folders of a training run: `OUTPUT_DIR/checkpoints/step-0000200/` (accelerate state +
`trainer_state.json`), the `latest` lookup for `--resume_from_checkpoint`, and rotation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with `trainer_state.json`), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()), key=lambda p: p.name)


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """None, the newest complete checkpoint for "latest" (None if there is none yet), or a given folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s/checkpoints, starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json in it)")
    return path


def rotate_checkpoints(checkpoints: list[Path], limit: int | None) -> None:
    """Delete the oldest checkpoints beyond `limit` (None or <= 0 keeps all)."""
    if not limit or limit <= 0:
        return
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
