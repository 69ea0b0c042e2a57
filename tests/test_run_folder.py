"""The run folder: its state, the guard against overwriting a run, portable paths, atomic writes."""
import json
import os

import pytest

from expandlm.atomic import atomic_path, write_json
from expandlm.errors import UserError
from expandlm.records import RunRecord
from expandlm.run_folder import CHECKPOINT, MARK, METRICS, RUN_RECORD, TRAIN_STATE, RunFolder, versions


def _record(status: str = "running") -> RunRecord:
    return RunRecord("expert", {"x": 1}, 0, versions(), status=status)


def test_state_follows_what_the_folder_holds(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.state == "new"
    folder.begin(resume=False)
    (folder.checkpoint).mkdir()
    write_json(folder.checkpoint / TRAIN_STATE, {"step": 3})
    assert folder.state == "resume"
    folder.write_record(_record())
    assert folder.state == "resume" and folder.record().to_json()["versions"]["torch"]
    folder.write_record(_record("done"))
    assert folder.state == "done"


def test_a_run_is_never_overwritten_and_a_resume_needs_a_checkpoint(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(UserError, match="nothing to resume"):
        folder.begin(resume=True)
    folder.begin(resume=False)
    folder.write_record(_record())
    with pytest.raises(UserError, match="already holds a run"):
        folder.begin(resume=False)


def test_a_run_killed_before_its_first_checkpoint_starts_again_from_nothing(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.begin(resume=False)
    (folder / METRICS).write_text('{"step": 1}\n')
    assert folder.auto() == "new"
    folder.begin(resume=False)
    assert not (folder / METRICS).exists()
    (folder.checkpoint).mkdir(parents=True)
    write_json(folder.checkpoint / TRAIN_STATE, {"step": 3})
    assert folder.auto() == "resume" and (folder.checkpoint / TRAIN_STATE).exists()


@pytest.mark.parametrize("claim", ["begin", "auto", "save"])
def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_was(tmp_path, claim):
    """`demo --out D` once emptied D (issue 30); `train --out` replaced a user's own metrics.jsonl."""
    folder = RunFolder(tmp_path / "mine")
    folder.path.mkdir()
    (folder / "thesis.txt").write_text("precious")
    (folder / METRICS).write_text("my own numbers\n")
    (folder / RUN_RECORD).write_text('{"written by": "another tool"}')
    before = {p.name: p.read_text() for p in folder.path.iterdir()}
    act = {"begin": lambda: folder.begin(resume=False), "auto": folder.auto,
           "save": lambda: folder.save(lambda d: (d / "config.json").write_text("{}"))}[claim]
    with pytest.raises(UserError, match=f"{folder.path}: holds files expandlm did not write"):
        act()
    assert {p.name: p.read_text() for p in folder.path.iterdir()} == before


def test_a_file_is_no_run_folder(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="out: is a file, not a folder"):
        RunFolder(tmp_path / "out").begin(resume=False)
    assert (tmp_path / "out").read_text() == "x"


def test_an_empty_folder_or_one_expandlm_made_is_claimed_and_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    RunFolder(tmp_path / "empty").begin(resume=False)
    assert os.listdir(tmp_path / "empty") == [MARK]
    legacy = RunFolder(tmp_path / "legacy")  # a finished run from before the mark: its record says expandlm
    legacy.path.mkdir()
    legacy.write_record(_record("done"))
    (legacy / "notes.txt").write_text("the user's, beside the run")
    legacy.restart()
    assert sorted(os.listdir(legacy.path)) == [MARK, "notes.txt"] and legacy.state == "new"


def test_paths_are_stored_relative_to_the_folder_and_resolve_from_anywhere(tmp_path, monkeypatch):
    data = tmp_path / "data" / "x.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    folder = RunFolder(tmp_path / "runs" / "a")
    folder.path.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    stored = folder.portable("data/x.jsonl")
    assert stored == os.path.join("..", "..", "data", "x.jsonl")
    assert folder.portable("roneneldan/TinyStories") == "roneneldan/TinyStories"  # a hub id stays
    monkeypatch.chdir(tmp_path / "runs")
    assert os.path.samefile(folder.resolve(stored), data)
    assert folder.resolve("roneneldan/TinyStories") == "roneneldan/TinyStories"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["r.json"]
    folder = tmp_path / "shard"
    with atomic_path(folder, folder=True) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_path(folder, folder=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed")
    assert (folder / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["r.json", "shard"]


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    import expandlm.run_folder as rf
    monkeypatch.setattr(rf, "is_main_process", lambda: False)
    folder = RunFolder(tmp_path / "run")
    folder.write_record(_record("done"))
    folder.write_card({"domains": []})
    folder.save(lambda d: (d / "x").write_text("1"))
    assert not (folder / RUN_RECORD).exists() and not folder.path.exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_and_leftovers_are_removed(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.begin(resume=False)
    folder.write_record(_record())  # a run record, but no checkpoint yet
    (folder / METRICS).write_text('{"step": 1}\n')
    (folder / ".checkpoint.tmp-k1ll").mkdir()  # a checkpoint write that never finished
    (folder / ".run.json.tmp-k1ll.json").write_text("{")
    assert folder.state == "resume"
    folder.begin(resume=True)
    assert sorted(os.listdir(folder.path)) == [MARK, METRICS, RUN_RECORD]
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        folder.begin(resume=False)


def test_a_checkpoint_moved_aside_by_a_killed_write_is_put_back(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.begin(resume=False)
    folder.write_record(_record())
    old = folder / ".checkpoint.old"  # killed between atomic_path's two renames
    old.mkdir()
    write_json(old / TRAIN_STATE, {"step": 3})
    (folder / ".checkpoint.tmp-k1ll").mkdir()
    folder.begin(resume=True)
    assert json.loads((folder.checkpoint / TRAIN_STATE).read_text()) == {"step": 3}
    assert sorted(os.listdir(folder.path)) == [MARK, CHECKPOINT, RUN_RECORD]
