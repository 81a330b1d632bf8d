import json

import pytest
import torch

from dermcir.checkpoint import fingerprint, load_checkpoint, save_checkpoint

from .conftest import held_in_another_process
from .test_models import IMAGES, TEXTS, tiny


def test_roundtrip_restores_config_and_outputs(tmp_path):
    model = tiny(n_masks=2).eval()
    model.config.categories = ["a", "b"]
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    again = load_checkpoint(tmp_path / "ckpt")
    assert again.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(again.encode_query(IMAGES, TEXTS), model.encode_query(IMAGES, TEXTS))
    assert not list(tmp_path.glob("*.pt*")) and (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_a_loaded_checkpoint_encodes_without_autograd_and_checks_its_device(tmp_path):
    """The README's encoder snippet built an autograd graph on every call, and ``.numpy()`` of its vectors raised
    "Can't call numpy() on Tensor that requires grad"; a device the machine lacks failed in torch after the build."""
    model = tiny(n_masks=2).eval()
    model.config.categories = ["a", "b"]
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    again = load_checkpoint(tmp_path / "ckpt")
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    assert again.encode_target(IMAGES).numpy().shape[0] == 4
    assert again.encode_query(IMAGES, TEXTS).numpy().shape[0] == 4
    with pytest.raises(ValueError, match="texts is empty: give one text per query, or texts=None"):
        again.encode_query(IMAGES, [])
    with pytest.raises(ValueError, match="4 images but 2 texts"):
        again.encode_query(IMAGES, TEXTS[:2])
    with pytest.raises(ValueError, match="device 'gpu' is not known; use auto, cpu, cuda or cuda:N"):
        load_checkpoint(tmp_path / "ckpt", "gpu")
    with pytest.raises(ValueError, match="device 'meta': a model cannot run on 'meta' here"):
        load_checkpoint(tmp_path / "ckpt", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
            load_checkpoint(tmp_path / "ckpt", "cuda")


def test_checkpoint_from_before_head_sets_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny(n_masks=2).eval()
    model.config.categories = ["a", "b"]
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    path = tmp_path / "ckpt" / "model.safetensors"
    legacy = {k.removeprefix("heads.0."): v for k, v in load_file(str(path)).items()}  # the old key layout
    assert any(k.startswith("levels.") for k in legacy)
    save_file(legacy, str(path))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt").encode_target(IMAGES), model.encode_target(IMAGES))


def test_frozen_parts_are_referenced_and_verified(tmp_path):
    model = tiny(text="minilm", pretrained=True).eval()
    save_checkpoint(model, tmp_path / "ckpt", frozen=("backbone", "text_encoder"))
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    assert set(meta["frozen"]) == {"backbone", "text_encoder"}
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_size < 2_000_000  # heads only, no MiniLM copy
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt").encode_query(IMAGES, TEXTS),
                                   model.encode_query(IMAGES, TEXTS))
    meta["frozen"]["text_encoder"] = "0" * 64  # as if trained with other MiniLM weights
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="text_encoder weights found now"):
        load_checkpoint(tmp_path / "ckpt")


def test_companion_roundtrip_stores_its_frozen_backbone_by_reference(tmp_path):
    from safetensors.torch import load_file

    from dermcir.training import frozen_parts

    torch.manual_seed(0)
    model = tiny(text="minilm", pretrained=True, companion={"dim": 16, "heads": 2}).eval()
    model.config.categories = ["a", "b"]
    frozen = frozen_parts("gpu", model)
    assert frozen == ("text_encoder", "companion.backbone")
    save_checkpoint(model, tmp_path / "ckpt", frozen=frozen)
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("companion.heads.") for k in keys)
    assert not any(k.startswith(("companion.backbone.", "companion.text_encoder.", "text_encoder.")) for k in keys)
    again = load_checkpoint(tmp_path / "ckpt")
    assert again.config == model.config and again.companion.text_encoder is again.text_encoder
    with torch.no_grad():
        torch.testing.assert_close(again.encode_query(IMAGES, TEXTS), model.encode_query(IMAGES, TEXTS))
        torch.testing.assert_close(again.encode_target(IMAGES), model.encode_target(IMAGES))
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    meta["frozen"]["companion.backbone"] = "0" * 64  # as if its ImageNet weights had been others
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="companion.backbone weights found now"):
        load_checkpoint(tmp_path / "ckpt")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    good = fingerprint(tmp_path / "ckpt")
    import dermcir.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with torch.no_grad():
        model.heads[0].text_proj[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ckpt", frozen=())
    assert fingerprint(tmp_path / "ckpt") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_stopped_between_its_two_renames_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    import os

    model = tiny()
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    good = fingerprint(tmp_path / "ckpt")
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place: Ctrl+C arrives
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "ckpt", frozen=())
    monkeypatch.setattr(os, "replace", real_replace)
    assert fingerprint(tmp_path / "ckpt") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(("damage", "message"), [
    ("weights", r"model.safetensors: not a readable safetensors file"),
    ("config", r"config.json: not a readable checkpoint config \(corrupt JSON"),
    ("no model", r"config.json: expected a JSON object with the model's settings under \"model\""),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    weights, config = tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt" / "config.json"
    if damage == "weights":
        weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    elif damage == "config":
        config.write_text(config.read_text()[:50])
    else:
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model"}))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["model"].update(dim=64),
     r"model.safetensors: does not match the model .*config.json describes: \d+ tensors of other shapes"),
    (lambda m: m.update(frozen=["text_encoder"]), r"config.json: 'frozen' must map submodule names to weight digests"),
    (lambda m: m.update(frozen={"text_encodr": "0" * 64}), r"config.json: 'frozen' names \['text_encodr'\]"),
    (lambda m: m["model"].update(dim="32"), r"config.json: setting dim='32': expected an integer"),
])
def test_a_hand_edited_config_is_refused_naming_the_file(tmp_path, edit, message):
    """These gave a RuntimeError / AttributeError / TypeError traceback, or an error that read like a --set mistake."""
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    config = tmp_path / "ckpt" / "config.json"
    meta = json.loads(config.read_text())
    edit(meta)
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_nan_weights_are_refused_not_served_as_empty_results(tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(weights))
    first = min(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))  # a training that diverged
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=f"model.safetensors: 1 tensors hold NaN or infinite values, e.g. \\['{first}'"):
        load_checkpoint(tmp_path / "ckpt")


def test_parts_saved_by_value_do_not_need_their_source_to_load(tmp_path, monkeypatch):
    """A Swin-T checkpoint of the gpu profile holds its whole backbone, yet loading read the ImageNet Swin file again
    (and, given a relative path from another folder, looked it up on the hub: ``Unknown model (swin)``)."""
    from safetensors.torch import save_file

    from dermcir.models import create_backbone

    src = tmp_path / "imagenet" / "swin.safetensors"
    src.parent.mkdir()
    body = create_backbone("swin_t", pretrained=False, img_size=64).body.state_dict()
    save_file({k: v.contiguous() for k, v in body.items()}, str(src))
    monkeypatch.chdir(tmp_path)
    model = tiny(backbone="swin_t", text="minilm", backbone_weights="imagenet/swin.safetensors", pretrained=True).eval()
    assert model.config.backbone_weights == str(src)  # stored resolved: the checkpoint is read from other folders
    save_checkpoint(model, tmp_path / "ckpt", frozen=("text_encoder",))  # the gpu profile's: backbone by value
    src.unlink()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "ckpt").encode_target(IMAGES), model.encode_target(IMAGES))


def test_fingerprint_changes_with_weights(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "a", frozen=())
    with torch.no_grad():
        model.heads[0].levels[0].null_image.add_(1.0)
    save_checkpoint(model, tmp_path / "b", frozen=())
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")


def test_template_version_mismatch_is_refused(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    meta["model"]["template_version"] = "meta-report-v0"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta-report-v0"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_checkpoint(tmp_path)


def test_preprocess_version_is_recorded_and_a_mismatch_refused(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["preprocess_version"] == "border-v3"
    del meta["preprocess_version"]  # written before it was recorded: that preprocessing was the only one
    path.write_text(json.dumps(meta))
    load_checkpoint(tmp_path / "ckpt")
    meta["preprocess_version"] = "border-v1"  # differs from v2 only where v1 cut a dark lesion away as frame
    path.write_text(json.dumps(meta))
    load_checkpoint(tmp_path / "ckpt")
    meta["preprocess_version"] = "border-v0"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="preprocessing 'border-v0'"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path):
    runs = tmp_path / "runs"
    (runs / "index").mkdir(parents=True)
    (runs / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"runs: holds index, results.json, so it is not a checkpoint folder"):
        save_checkpoint(tiny(), runs, frozen=())
    assert sorted(p.name for p in runs.iterdir()) == ["index", "results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no temporary folder left either
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_checkpoint(tiny(), tmp_path / "file", frozen=())
    # a checkpoint folder with its training logs is a checkpoint: it is replaced
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    (tmp_path / "ckpt" / "train.log").write_text("log")
    (tmp_path / "ckpt" / ".DS_Store").write_text("a file browser's")
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_a_checkpoint_gets_a_plain_writes_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt", *(tmp_path / "ckpt").iterdir())}
    assert mode == {"ckpt": 0o755, "config.json": 0o644, "model.safetensors": 0o644}


def test_a_file_system_that_refuses_fsync_on_a_folder_still_saves(tmp_path, monkeypatch):
    """Some network and FUSE file systems answer fsync on a folder with EINVAL: folder syncs are best effort."""
    import errno
    import os

    real = os.fsync

    def no_folder_fsync(fd):
        import stat

        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())  # replacing one too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    load_checkpoint(tmp_path / "ckpt")


def test_a_save_killed_between_its_two_renames_is_restored_by_the_next_reader_or_writer(tmp_path):
    """A SIGKILL (no clean-up) between the renames left no checkpoint folder: the old one hidden in ``.ckpt.old``,
    the new one in ``.ckpt.tmp*``, and the next save deleted the old one."""
    from dermcir.checkpoint_folder import check_checkpoint_target, require_checkpoint

    model = tiny()
    model.config.categories = ["a", "b"]
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    good = fingerprint(tmp_path / "ckpt")
    for reader in (load_checkpoint, require_checkpoint, check_checkpoint_target):
        (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # where the kill left it
        reader(tmp_path / "ckpt")
        assert fingerprint(tmp_path / "ckpt") == good and not (tmp_path / ".ckpt.old").exists()
    # the copies that killed saves left behind (weights and all) go at the next save that completes
    for n in range(2):
        (tmp_path / f".ckpt.tmp{n}").mkdir()
        (tmp_path / f".ckpt.tmp{n}" / "model.safetensors").write_bytes(b"x" * 1000)
    save_checkpoint(model, tmp_path / "ckpt", frozen=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_full_disk_in_safetensors_is_an_oserror_naming_the_folder(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import dermcir.checkpoint as ck

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match=f"{tmp_path / 'ckpt'}: the checkpoint could not be written .*StorageFull"):
        save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    assert list(tmp_path.iterdir()) == []


def test_training_refuses_a_checkpoint_folder_it_could_not_write_before_it_trains(tmp_path, monkeypatch):
    """``train --out`` on a read-only disk trained to the end, then lost the model and its log at the save."""
    import tempfile

    from dermcir.checkpoint_folder import check_checkpoint_target

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError, match=f"{tmp_path}: cannot be written \\(Permission denied\\); give an --out where"):
        check_checkpoint_target(tmp_path / "new" / "model")
    assert list(tmp_path.iterdir()) == []  # nothing made on the way


def test_a_second_training_into_a_folder_another_process_trains_into_is_refused_at_once(tmp_path):
    """Two `dermcir train --out M` at once both ran to the end and the later one replaced the earlier one's
    checkpoint (under an index built with it), or their saves broke each other's."""
    from dermcir.checkpoint_folder import CheckpointBusyError
    from dermcir.training.pipeline import train_on_cases

    out = tmp_path / "model"
    held = f"dermcir.checkpoint_folder.checkpoint_lock(Path({str(out)!r}), wait=False)"
    busy = f"{out}: another process is training or saving a checkpoint"
    with held_in_another_process(held), pytest.raises(CheckpointBusyError, match=busy):
        train_on_cases([], out, profile="cpu", progress=False)  # refused before the cases are looked at
    assert list(tmp_path.iterdir()) == []  # and the lock file is gone with its holder


def test_a_save_refuses_a_checkpoint_written_since_the_caller_checked(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    good = fingerprint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="holds a checkpoint already"):
        save_checkpoint(tiny(), tmp_path / "ckpt", frozen=(), overwrite=False)
    assert fingerprint(tmp_path / "ckpt") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_reader_leaves_a_running_save_between_its_renames_alone(tmp_path, monkeypatch):
    """A save between its two renames looks interrupted (no folder, the old one aside): a reader that moved the old
    one back made the save fail with "Directory not empty" and lost the training. (The reader waits a little for
    the save's folder to appear, BUSY_WAIT_S; shortened here.)"""
    import dermcir.checkpoint_folder as folder
    from dermcir.checkpoint_folder import restore_interrupted_save

    monkeypatch.setattr(folder, "BUSY_WAIT_S", 0.3)

    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # the running save's first rename
    ckpt = tmp_path / "ckpt"
    with held_in_another_process(f"dermcir.checkpoint_folder.checkpoint_lock(Path({str(ckpt)!r}))"):
        assert not restore_interrupted_save(ckpt)
        assert (tmp_path / ".ckpt.old").is_dir() and not ckpt.exists()
    assert restore_interrupted_save(ckpt)  # once no save holds the folder, it was interrupted: put it back
    load_checkpoint(ckpt)


@pytest.mark.parametrize("other_config", [False, True])
def test_a_checkpoint_replaced_while_it_loads_gets_the_fingerprint_of_what_was_loaded(tmp_path, monkeypatch,
                                                                                       other_config):
    """The fingerprint was read from the folder again after the weights: a checkpoint replaced in between gave the old
    weights the new one's fingerprint, so an index built with them passed as the new model's."""
    import dermcir.checkpoint as ck

    save_checkpoint(tiny(), tmp_path / "ckpt", frozen=())
    loaded = fingerprint(tmp_path / "ckpt")
    read_weights = ck.load_bytes

    def replaced_meanwhile(raw):
        torch.manual_seed(1)
        model = tiny()
        if other_config:
            model.config.categories = ["a", "b"]
        save_checkpoint(model, tmp_path / "ckpt", frozen=())  # another model, saved after the config was read
        return read_weights(raw)

    monkeypatch.setattr(ck, "load_bytes", replaced_meanwhile)
    if other_config:  # the config read first is not the one beside the weights now: which model is this?
        with pytest.raises(ValueError, match="the checkpoint was replaced while it loaded"):
            load_checkpoint(tmp_path / "ckpt")
    else:
        model = load_checkpoint(tmp_path / "ckpt")
        assert model.checkpoint_fingerprint == loaded != fingerprint(tmp_path / "ckpt")
