"""Checkpoints of a training run that can be trusted: `CHECKPOINT_DIR/step-0000200/` holds accelerate's
state (model weights as safetensors, optimizer, scheduler, RNG), `trainer_state.json` (where the data
order stands) and, written last, `manifest.json` with the sha256 of every file.

A checkpoint is complete only with its manifest; loading checks every file against it, so a truncated
file or bytes changed inside the weights are caught and named instead of loading garbage. `latest` falls
back to the newest intact checkpoint, with a warning naming each bad one.

A resume is exact or refused: `trainer_state.json` also records the batch geometry the data order depends
on (patients per batch, lesions per patient, processes, seed, a fingerprint of the train split, ...); a
resume whose geometry differs, or whose RNG state is lost or damaged, is an error naming what changed,
unless the run accepts an inexact resume.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from training.safety import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
RNG_PREFIX = "random_states_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the folder, the file and what is wrong with it."""


def write_manifest(directory: Path) -> None:
    """sha256 and size of every file of the checkpoint, written atomically as the last file."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
    partial = directory / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    partial.rename(directory / MANIFEST)


def damaged_files(directory: Path) -> dict[str, str]:
    """{file: what is wrong} for a checkpoint folder; empty when every file matches the manifest."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return {MANIFEST: "missing (the checkpoint was never completed)"}
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {MANIFEST: f"unreadable ({error})"}
    problems = {}
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size != expected["bytes"]:
            problems[name] = f"{path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        elif file_sha256(path) != expected["sha256"]:
            problems[name] = "its content differs from the manifest (sha256 mismatch)"
    return problems


def checkpoint_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Completed checkpoints of pretrain.py (with `trainer_state.json` and a manifest), oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE).is_file() and (p / MANIFEST).is_file()]
    return sorted(done, key=lambda p: p.name)


def trainer_checkpoint_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """`transformers.Trainer`'s checkpoints (`checkpoint-STEP`, finetune.py), oldest first."""
    return sorted(Path(checkpoint_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def newest_intact(candidates: list[Path], checkpoint_dir: str | Path, ignore_prefix: str | None = None) -> Path | None:
    """The newest of `candidates` (oldest first) whose files match its manifest (files named `ignore_prefix*`
    not checked), warning about each damaged one it skips; None when there is none yet. Raises CheckpointError
    when there are checkpoints but none is intact."""
    for candidate in reversed(candidates):
        problems = {k: v for k, v in damaged_files(candidate).items() if not (ignore_prefix and k.startswith(ignore_prefix))}
        if not problems:
            return candidate
        logger.warning("checkpoint %s is damaged (%s): falling back to an older one", candidate,
                       "; ".join(f"{name}: {why}" for name, why in problems.items()))
    if candidates:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir}: every one has damaged files (see the warnings)")
    logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", checkpoint_dir)
    return None


def find_checkpoint(checkpoint_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """pretrain.py's resume: None, the newest intact checkpoint for "latest" (None if there is none yet; its
    random-number state is checked at load, `load_checkpoint`), or a given folder.

    Raises CheckpointError when "latest" finds checkpoints but none is intact, or a given folder is not
    a complete checkpoint.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return newest_intact(checkpoint_dirs(checkpoint_dir), checkpoint_dir, ignore_prefix=RNG_PREFIX)
    path = Path(resume_from_checkpoint)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE} in it)")
    return path


def find_trainer_checkpoint(checkpoint_dir: str, resume: str | bool | None) -> str | None:
    """finetune.py's resume, as Trainer's `resume_from_checkpoint`: None, the newest intact checkpoint for
    "latest"/True (`newest_intact`), or a given folder, refused when it is damaged."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume not in (True, "latest", "true", "True"):
        problems = damaged_files(Path(resume))
        if problems:
            raise CheckpointError(f"checkpoint {resume} is damaged: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
        return str(resume)
    found = newest_intact(trainer_checkpoint_dirs(checkpoint_dir), checkpoint_dir)
    return str(found) if found is not None else None


def check_geometry(saved: dict | None, current: dict, directory: Path, allow_inexact_resume: bool) -> None:
    """Raises CheckpointError when the batch geometry of the run (`current`) differs from the one the
    checkpoint was written with (`saved`), naming each change; only a warning with `allow_inexact_resume`."""
    if saved is None:
        changes = ["the checkpoint records no batch geometry (written by an older version)"]
    else:
        changes = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    if not changes:
        return
    if not allow_inexact_resume:
        raise CheckpointError(f"checkpoint {directory} was written with another batch geometry ({'; '.join(changes)}): "
                              "resuming would repeat or skip batches. Resume with the same options, or pass "
                              "--allow_inexact_resume to continue anyway (not an exact continuation).")
    logger.warning("checkpoint %s: batch geometry changed (%s); resuming anyway (--allow_inexact_resume): the run is not "
                   "an exact continuation", directory, "; ".join(changes))


def load_checkpoint(accelerator, directory: Path, allow_inexact_resume: bool = False, geometry: dict | None = None) -> dict:
    """Check `directory` against its manifest, load it into `accelerator`, and return its trainer state.

    Raises CheckpointError naming the damaged file; a damaged or missing RNG state (`random_states_*.pkl`)
    is an error too unless `allow_inexact_resume`, since the resumed run would not repeat the dropout and
    augmentation draws of an uninterrupted one; so is a batch `geometry` other than the checkpoint's
    (`check_geometry`).
    """
    problems = damaged_files(directory)
    rng_file = f"{RNG_PREFIX}{accelerator.process_index}.pkl"
    if (directory / MANIFEST).is_file() and not (directory / rng_file).is_file():
        problems.setdefault(rng_file, "missing")
    rng = {k: v for k, v in problems.items() if k.startswith(RNG_PREFIX)}
    other = {k: v for k, v in problems.items() if not k.startswith(RNG_PREFIX)}
    if other:
        raise CheckpointError(f"checkpoint {directory} is damaged: " + "; ".join(f"{k}: {v}" for k, v in other.items())
                              + ". Resume from an older checkpoint (--resume_from_checkpoint latest skips damaged ones).")
    if rng and not allow_inexact_resume:
        raise CheckpointError(f"checkpoint {directory}: the random-number state is damaged ("
                              + "; ".join(f"{k}: {v}" for k, v in rng.items())
                              + "), so the resumed run would not be an exact continuation. Pass --allow_inexact_resume "
                              "to resume anyway, or resume from an older checkpoint.")
    if rng:
        logger.warning("checkpoint %s: random-number state damaged (%s); resuming anyway (--allow_inexact_resume): the "
                       "run is not an exact continuation", directory, ", ".join(rng))
    state = json.loads((directory / STATE).read_text())
    if geometry is not None:
        check_geometry(state.get("geometry"), geometry, directory, allow_inexact_resume)
    accelerator.load_state(str(directory))
    return state


def save_checkpoint(accelerator, checkpoint_dir: str | Path, state: dict, limit: int | None) -> Path:
    """accelerate state + where the data order stands + the manifest (last); then rotate old checkpoints."""
    directory = Path(checkpoint_dir) / f"step-{state['global_step']:07d}"
    accelerator.save_state(str(directory))
    accelerator.wait_for_everyone()  # every rank's RNG file is written before the manifest hashes them
    if accelerator.is_main_process:
        (directory / STATE).write_text(json.dumps(state))
        write_manifest(directory)
        rotate_checkpoints(checkpoint_dirs(checkpoint_dir), limit)
    accelerator.wait_for_everyone()
    return directory


def rotate_checkpoints(checkpoints: list[Path], limit: int | None) -> None:
    """Delete the oldest checkpoints beyond `limit` (None or <= 0 keeps all)."""
    if not limit or limit <= 0:
        return
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["CheckpointError", "checkpoint_dirs", "trainer_checkpoint_dirs", "newest_intact", "find_checkpoint",
           "find_trainer_checkpoint", "check_geometry", "load_checkpoint", "save_checkpoint",
           "rotate_checkpoints", "damaged_files", "write_manifest"]
