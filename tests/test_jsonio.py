"""Atomic model folders (`jsonio.atomic_dir`) and the free-space check before one is written, on the real disk."""

from __future__ import annotations

import shutil

import pytest

from llamaduo_nb.jsonio import NotEnoughSpace, atomic_dir, ensure_free_space


def test_a_folder_replaces_the_old_one_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    with pytest.raises(RuntimeError, match="midway"), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("midway")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left beside it
    assert (target / "model.safetensors").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # replaced whole, not merged


def test_a_folder_that_would_not_fit_is_refused_before_anything_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "run" / "deploy" / "merged"
    with (
        pytest.raises(NotEnoughSpace) as refused,
        atomic_dir(target, need_bytes=2 * free, what="the merged model"),
    ):
        raise AssertionError("the body must not run")
    message = str(refused.value)
    assert message.startswith("the merged model: needs about ") and str(target.parent) in message
    assert message.split("has ")[1].split(" GB free")[0].replace(".", "").isdigit()  # what it found, in GB
    assert list(tmp_path.iterdir()) == []  # not even the parent folders
    with atomic_dir(target, need_bytes=4096, what="the merged model") as tmp:  # fits: written as usual
        (tmp / "model.safetensors").write_bytes(b"\0" * 4096)
    assert (target / "model.safetensors").stat().st_size == 4096


def test_the_check_reads_the_file_system_of_the_nearest_existing_folder(tmp_path):
    ensure_free_space(tmp_path / "not" / "yet" / "there", 1, "a tiny file")  # walks up to tmp_path
    with pytest.raises(NotEnoughSpace, match=r"a huge file: needs about 1000000\.00 GB"):
        ensure_free_space(tmp_path / "not" / "yet" / "there", 10**15, "a huge file")
