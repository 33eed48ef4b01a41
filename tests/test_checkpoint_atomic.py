"""Stage checkpoints appear whole or not at all, every reader skips a half-written one, a changed byte is caught
by its content hash before anything uses the checkpoint, pruned weights read as absent without noise, and a
full disk or an unwritable storage folder gives one clear error while earlier checkpoints stay as they were."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_in_process
from fluxtune.checkpoints import (PROGRESS, CheckpointSpaceError, Progress, check_writable_folder, prune_weights,
                                  read_checkpoint_manifest, read_progress, usable_checkpoint, write_stage_checkpoint)

SAFETENSORS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def transformer():
    from fluxtune.testing import tiny_model

    return tiny_model().transformer


def _write(folder: Path, transformer, stage: str = "full", step: int = 5) -> Path:
    exports = folder.parent / f"exports-{folder.name}"
    (exports / "adapter").mkdir(parents=True, exist_ok=True)
    (exports / "adapter" / "weights.bin").write_bytes(b"a" * 1000)
    return write_stage_checkpoint(folder, transformer, Progress(0, 1, step), stage, exports, {"val_loss": 0.5})


def _half_written(folder: Path, complete: Path) -> Path:
    """What a crash leaves: real files, the weights cut short, no completion marker."""
    shutil.copytree(complete, folder)
    (folder / PROGRESS).unlink()
    _truncate(folder / SAFETENSORS)
    return folder


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_appears_under_its_name_complete_with_a_list_of_its_files(transformer, tmp_path):
    folder = _write(tmp_path / "checkpoint", transformer)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "exports-checkpoint"]  # no temporary folder left
    manifest = read_checkpoint_manifest(folder)
    assert manifest["finished_stage"] == "full" and read_progress(folder) == Progress(0, 1, 5)
    assert manifest["files"][SAFETENSORS]["size"] == (folder / SAFETENSORS).stat().st_size
    assert manifest["files"]["exports/adapter/weights.bin"] == {"size": 1000,
                                                                "sha256": hashlib.sha256(b"a" * 1000).hexdigest()}
    assert set(manifest["files"]) == {str(p.relative_to(folder)) for p in folder.rglob("*")
                                      if p.is_file() and p.name != PROGRESS}
    assert _digest(folder)[SAFETENSORS] == manifest["files"][SAFETENSORS]["sha256"]
    assert usable_checkpoint(folder) == manifest


def test_sharded_weights_are_hashed_as_they_are_written_with_their_index(transformer, tmp_path):
    from fluxtune.canonical import LiveWeights, layout
    from fluxtune.flux.weights import save_streamed

    digests: dict[str, str] = {}
    written = save_streamed(tmp_path, layout(transformer), LiveWeights(transformer).tensors(),
                            max_shard_bytes=64 << 10, digests=digests)
    assert len(written) > 2  # several shards and the index
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in written}


def test_resume_skips_a_folder_without_marker_and_a_copy_cut_short(transformer, tmp_path, caplog):
    complete = _write(tmp_path / "complete", transformer)
    half = _half_written(tmp_path / "half", complete)
    copied = tmp_path / "copy-cut-short"  # the marker arrived, the weights did not (Ray copies in any order)
    shutil.copytree(complete, copied)
    _truncate(copied / SAFETENSORS)
    with caplog.at_level(logging.WARNING, logger="fluxtune.checkpoints"):
        assert read_progress(half) is None and read_progress(copied) is None
        assert read_progress(tmp_path / "never-written") is None
    assert f"skipping incomplete stage checkpoint {half}: no progress.json" in caplog.text
    assert f"{copied}: {SAFETENSORS} is" in caplog.text and "expected" in caplog.text
    (copied / SAFETENSORS).unlink()
    assert read_progress(copied) is None and "is missing" in caplog.text
    (half / PROGRESS).write_text('{"cycle": 1, "stage_in')  # a marker someone else cut short
    assert read_progress(half) is None and "unreadable progress.json" in caplog.text


def test_the_trial_worker_starts_fresh_rather_than_from_a_half_written_checkpoint(transformer, tmp_path,
                                                                                 monkeypatch):
    import ray.train
    import torch

    from fluxtune.train import worker

    complete = _write(tmp_path / "complete", transformer, step=7)
    half = _half_written(tmp_path / "half", complete)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # no checkpoint of its own: the reuse path
    progress, model = worker._resume(transformer, str(half))[:2]
    assert progress == Progress() and model is transformer
    progress, model = worker._resume(transformer, str(complete))[:2]
    assert progress == Progress(0, 1, 7) and model is not transformer
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), transformer.state_dict().values()))


def _three_stage_trial(tmp_path: Path):
    """A full → lora → full2 experiment, its trial settings, its sweep folder and trial t1's Train run folder."""
    from fluxtune.testing import tiny_experiment
    from fluxtune.train.trial import TrialSettings

    experiment = tiny_experiment("""
        data: {jsonl: sample, resolution: 32}
        stages:
          - {name: full, type: full, steps: 2}
          - {name: lora, type: lora, steps: 2}
          - {name: full2, type: full, steps: 2}
        """)
    sweep = tmp_path / "sweep"
    settings = TrialSettings(sweep_id="s1", base=experiment, jsonl=str(tmp_path / "rows.jsonl"),
                             storage_path=str(sweep), plugins={})
    return experiment, settings, sweep, sweep / "train" / "s1-t1"


def _offer_for_reuse(experiment: dict, settings, checkpoints: tuple[Path, ...]) -> None:
    """Stage-cache entries pointing at `checkpoints`, one per leading stage, as trial t1 would leave them."""
    cache = Path(settings.layout.stage_cache)
    cache.mkdir(parents=True)
    for entry, checkpoint in zip(settings.keys_of(experiment), checkpoints):
        (cache / f"{entry['key']}.json").write_text(json.dumps({"checkpoint": str(checkpoint), "trial": "t1",
                                                                "global_step": 2}))


def test_stage_reuse_and_registration_skip_half_written_checkpoints(transformer, tmp_path):
    from fluxtune.search.best import finished_stages
    from fluxtune.train.trial import cached_prefix

    experiment, settings, sweep, run = _three_stage_trial(tmp_path)
    first = _write(run / "checkpoint_000000", transformer, "full", 2)
    second = run / "checkpoint_000001"  # its marker was copied, its weights were not (a crash mid-copy)
    shutil.copytree(first, second)
    (second / SAFETENSORS).unlink()
    _half_written(run / "checkpoint_000002", first)
    _offer_for_reuse(experiment, settings, (first, second))
    reused = cached_prefix(experiment, settings)
    assert reused["checkpoint"] == str(first) and reused["stage"] == "full"  # not the half-written lora stage
    assert [r.checkpoint for r in finished_stages(sweep, "s1", "t1")] == [str(first)]


def _flip_a_byte(path: Path) -> None:
    """One exponent byte in the middle of the weights, changed in place: same size, same marker."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2 + 3)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))


def test_a_changed_byte_is_refused_by_resume_reuse_and_registration_naming_the_file(transformer, tmp_path, caplog,
                                                                                   monkeypatch):
    import ray.train

    from fluxtune.search.best import finished_stages
    from fluxtune.tracking.publishing import BaseReferences
    from fluxtune.train import worker
    from fluxtune.train.trial import cached_prefix
    from fluxtune.version_contents import release_of

    experiment, settings, sweep, run = _three_stage_trial(tmp_path)
    first = _write(run / "checkpoint_000000", transformer, "full", 2)
    second = _write(run / "checkpoint_000001", transformer, "lora", 4)
    _offer_for_reuse(experiment, settings, (first, second))
    assert cached_prefix(experiment, settings)["checkpoint"] == str(second)  # the longest prefix
    _flip_a_byte(second / SAFETENSORS)
    assert read_checkpoint_manifest(second) is not None  # sizes agree: only the hash can tell

    refused: list[str] = []
    with caplog.at_level(logging.WARNING, logger="fluxtune.checkpoints"):
        assert cached_prefix(experiment, settings, refused=refused)["checkpoint"] == str(first)  # the shorter one
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(second)))
        progress, model, restarted = worker._resume(transformer)
        assert (progress, model, restarted) == (Progress(), transformer, False)  # never resumed from it
        problems: list[str] = []
        with pytest.raises(ValueError):
            BaseReferences().for_release(release_of("t1", finished_stages(sweep, "s1", "t1") + [
                _adapter_stage(run / "checkpoint_000002", transformer)]), {"preset": "tiny-fill"}, problems)
    [line] = refused
    assert line == (f"refusing stage checkpoint {second}: {SAFETENSORS} does not match the sha256 in its "
                    "progress.json (changed or corrupted since it was written); it is not used")
    assert problems == [line]
    assert [r.getMessage() for r in caplog.records] == [line] * 3  # one line per refusal, nothing else


def _adapter_stage(folder: Path, transformer):
    from fluxtune.search.best import read_stage

    return read_stage(str(_write(folder, transformer, "lora2", 6)))


def test_pruned_weights_read_as_absent_without_a_warning_and_keep_the_exports(transformer, tmp_path, caplog,
                                                                            monkeypatch):
    import ray.train

    from fluxtune.search.best import read_stage
    from fluxtune.train import worker

    folder = _write(tmp_path / "checkpoint", transformer)
    size = (folder / SAFETENSORS).stat().st_size
    with caplog.at_level(logging.DEBUG, logger="fluxtune.checkpoints"):
        assert prune_weights(folder) >= size
        assert prune_weights(folder) == 0  # already pruned
        manifest = read_checkpoint_manifest(folder)
        assert manifest is not None and SAFETENSORS in manifest["pruned"] and not (folder / "transformer").exists()
        assert (folder / "exports" / "adapter" / "weights.bin").exists()
        assert usable_checkpoint(folder) is None
        assert usable_checkpoint(folder, parts=("exports/adapter",)) == manifest  # the adapter is still there
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(folder)))
        assert worker._resume(transformer)[0] == Progress()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    stage = read_stage(str(folder))
    assert stage is not None and not stage.has_weights


def test_a_marker_written_before_hashes_is_still_read_by_its_sizes(transformer, tmp_path):
    folder = _write(tmp_path / "checkpoint", transformer)
    manifest = json.loads((folder / PROGRESS).read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (folder / PROGRESS).write_text(json.dumps(manifest))
    assert usable_checkpoint(folder)["files"][SAFETENSORS] == (folder / SAFETENSORS).stat().st_size
    _truncate(folder / SAFETENSORS)
    assert usable_checkpoint(folder) is None


def test_a_store_that_fills_up_or_turns_read_only_is_named_plainly_and_survives_pickling(tmp_path):
    """What a trial reports when Ray's copy of its checkpoint into storage fails (the error crosses processes)."""
    import pickle

    from fluxtune.checkpoints import CheckpointReadOnlyError, check_room, store_error

    full = store_error(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
                       str(tmp_path), 3 << 20)
    assert isinstance(full, CheckpointSpaceError)
    assert f"no space to write stage checkpoint {tmp_path} ([Errno 28] Error writing bytes" in str(full)
    read_only = store_error(OSError(f"[Errno 30] Read-only file system: '{tmp_path}/x'"), str(tmp_path), 1)
    assert isinstance(read_only, CheckpointReadOnlyError) and "the store is read-only" in str(read_only)
    for error in (full, read_only):
        assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert store_error(ValueError("something else"), str(tmp_path), 1) is None
    with pytest.raises(CheckpointSpaceError, match=f"no space to write stage checkpoint {tmp_path}: it needs"):
        check_room(str(tmp_path), shutil.disk_usage(tmp_path).free + (1 << 30))
    check_room(str(tmp_path), 1)  # room enough: nothing to say
    check_room("s3://bucket/runs", 1 << 60)  # object stores are not measured


def test_a_full_disk_leaves_earlier_checkpoints_untouched_and_names_the_folder_and_sizes(transformer, tmp_path):
    """A real full filesystem: a 2 MiB tmpfs (needs mount rights, which root in a container usually has)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers the path")
    try:
        earlier = _write(disk / "checkpoint_000000", transformer)
        before = _digest(earlier)
        free = shutil.disk_usage(disk).free
        needed = sum(t.numel() * t.element_size() for t in transformer.state_dict().values()) + 1000
        # Refused up front: the ballast leaves less than the checkpoint needs.
        (disk / "ballast").write_bytes(b"0" * (free - needed // 2))
        with pytest.raises(CheckpointSpaceError) as refused:
            _write(disk / "checkpoint_000001", transformer)
        assert f"stage checkpoint {disk / 'checkpoint_000001'}" in str(refused.value)
        assert "needs about" in str(refused.value) and "MiB free there" in str(refused.value)
        # Room for the raw weights but not for the files around them: ENOSPC in the middle of the write.
        (disk / "ballast").unlink()
        (disk / "ballast").write_bytes(b"0" * (shutil.disk_usage(disk).free - needed - 4096))
        with pytest.raises(CheckpointSpaceError) as mid_write:
            _write(disk / "checkpoint_000001", transformer)
        assert "No space left on device" in str(mid_write.value)
        assert sorted(p.name for p in disk.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint_000000"]
        assert _digest(earlier) == before and read_progress(earlier) == Progress(0, 1, 5)
        # A disk with no room at all is refused as a storage folder before a sweep starts.
        with open(disk / "ballast", "ab", buffering=0) as ballast, pytest.raises(OSError):
            while True:
                ballast.write(b"0" * 65536)
        assert check_writable_folder(disk / "runs").startswith("No space left on device (0.0 MiB free)")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_file_size_limit_mid_write_gives_the_same_clear_error(tmp_path):
    """Without mount rights: RLIMIT_FSIZE makes the kernel fail the weights write with EFBIG, for real (Python ignores
    SIGXFSZ, so the write fails instead of the process dying). Set for this process, only around the write."""
    import resource

    from fluxtune.testing import tiny_model

    model = tiny_model().transformer
    write_stage_checkpoint(tmp_path / "checkpoint_000000", model, Progress(0, 1, 5), "full", None, {})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # far below the weights' size
    try:
        with pytest.raises(CheckpointSpaceError) as caught:
            write_stage_checkpoint(tmp_path / "checkpoint_000001", model, Progress(1, 0, 10), "lora", None, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(caught.value)
    assert f"no space to write stage checkpoint {tmp_path / 'checkpoint_000001'}" in message
    assert "File too large" in message and "earlier checkpoints are untouched" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000"]  # no temporary folder left
    assert read_progress(tmp_path / "checkpoint_000000") == Progress(0, 1, 5)


def test_an_unwritable_storage_folder_is_named_with_the_reason(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "Not a directory" in check_writable_folder(blocker / "runs")
    assert check_writable_folder(tmp_path / "new" / "runs") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the probe and the folders it made are gone


SPEC = """\
name: storage-faults
base:
  data: {jsonl: sample, resolution: 32, sample_size: 8, batch_size: 2}
  stages:
    - {name: full, type: full, steps: 2}
"""


@pytest.mark.parametrize("configured", [True, False], ids=["storage_path", "default-runs"])
def test_search_refuses_an_unwritable_storage_folder_before_ray_naming_the_key(configured, tmp_path, monkeypatch,
                                                                                capsys, session_cache):
    monkeypatch.setenv("FLUXTUNE_CACHE", str(session_cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder must go")
    target = tmp_path / "blocker" / "runs" if configured else tmp_path / "runs"
    if configured:
        (tmp_path / "sweep.yaml").write_text(SPEC + f"storage_path: {target}\n")
    else:
        (tmp_path / "sweep.yaml").write_text(SPEC)
        (tmp_path / "runs").write_text("a file named like the default storage folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_in_process(["search", "sweep.yaml"], monkeypatch, capsys)
    assert code == 2, err
    [line] = err.strip().splitlines()
    if configured:
        assert line.startswith("error: sweep.yaml:6:1: storage_path: cannot write checkpoints to ")
        assert f"{target}: Not a directory" in line
    else:
        assert line.startswith("error: sweep.yaml: storage_path: cannot write checkpoints to ")
        assert f"{target} (the default): File exists" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow/, no sweep folder


def test_the_console_names_why_a_trial_failed_not_only_where_its_traceback_is():
    import traceback

    from fluxtune.failures import TrialFailure, trial_failure_line

    try:
        raise CheckpointSpaceError(Path("runs/s/train/t/checkpoint_000001"), needed=3 << 20, free=1 << 20)
    except CheckpointSpaceError:  # Ray adds its wrapper's line after the worker's traceback
        text = traceback.format_exc() + "\nray.exceptions.RayTaskError(CheckpointSpaceError): ray::_Inner.train()\n"
    failure = TrialFailure.from_text(text)
    line = trial_failure_line("t", failure, "runs/s/errors/trial-t.txt")
    assert failure.error.startswith("fluxtune.checkpoints.CheckpointSpaceError: ")
    assert "no space to write stage checkpoint runs/s/train/t/checkpoint_000001" in failure.error
    assert line.endswith("(full error: runs/s/errors/trial-t.txt)") and "needs about 3.0 MiB" in line
    assert TrialFailure.from_text("").error == "see the error file"


def test_hashes_pruning_and_disk_use_work_the_same_on_s3(transformer, tmp_path, s3_endpoint):
    """A cluster's checkpoints live behind a URI: verification, refusal and pruning go through the same calls."""
    import uuid

    import pyarrow.fs as pafs

    from conftest import s3_bucket
    from fluxtune import storage
    from fluxtune.search.retention import disk_use

    local = _write(tmp_path / "checkpoint_000000", transformer)
    root = s3_bucket(f"fluxtune-{uuid.uuid4().hex[:8]}") + "/runs"
    fs, inner = storage.filesystem(root)
    pafs.copy_files(str(local), f"{inner}/checkpoint_000000", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    remote = storage.join(root, "checkpoint_000000")
    assert usable_checkpoint(remote) == read_checkpoint_manifest(local)
    assert disk_use(root) == (sum(p.stat().st_size for p in local.rglob("*") if p.is_file()), 1)
    _flip_a_byte(local / SAFETENSORS)
    storage.write_bytes(storage.join(remote, SAFETENSORS), (local / SAFETENSORS).read_bytes())
    problems: list[str] = []
    assert usable_checkpoint(remote, problems=problems) is None and f"{SAFETENSORS} does not match" in problems[0]
    assert prune_weights(remote) > 0 and disk_use(root)[1] == 0
    assert SAFETENSORS in read_checkpoint_manifest(remote)["pruned"] and usable_checkpoint(remote) is None
    assert usable_checkpoint(remote, parts=("exports/adapter",)) is not None
