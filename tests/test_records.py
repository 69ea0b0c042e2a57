"""The typed records every reader uses: the model card and the run record, and what they make of older files."""
import pytest

from expandlm.errors import UserError
from expandlm.formats import format_of
from expandlm.records import DomainSource, ModelCard, RunRecord


def test_the_card_maps_an_old_strategy_once_and_writes_format_and_method():
    old = ModelCard.from_json({"domains": ["stories", "recipes"], "strategy": "expand_branch", "base": "../s",
                               "own_domains": ["recipes"]}, "x/expandlm.json")
    assert (old.format, old.method, old.base, old.details) == ("branch", "expand_branch", "../s", {"own_domains": ["recipes"]})
    written = old.to_json()
    assert "strategy" not in written and written["format"] == "branch" and written["own_domains"] == ["recipes"]
    assert ModelCard.from_json(written, "x") == old


def test_a_bad_card_names_the_file_and_the_field():
    with pytest.raises(UserError, match=r"x/expandlm.json: field 'domains' must be a list"):
        ModelCard.from_json({"domains": "stories"}, "x/expandlm.json")
    with pytest.raises(UserError, match="unknown format 'zip'"):
        format_of(ModelCard(format="zip"))
    card = ModelCard(domains=["stories"], format="paths", where="y/expandlm.json")
    with pytest.raises(UserError, match=r"y/expandlm.json: field 'paths' is missing"):
        card.detail("paths")


def test_an_older_run_record_is_read_once_into_todays_fields():
    old = {"kind": "expert", "spec": {}, "seed": 0, "versions": {}, "status": "done", "params": 1000,
           "trainable_params": 1000, "val_bpb": 1.5, "domain_data": {"stories": {"train": "s.jsonl", "val": None,
                                                                                 "limit": None, "val_limit": None}}}
    record = RunRecord.from_json(old, "run.json")
    assert record.total_params == 1000 and record.bpb == {"stories": 1.5}
    assert record.domain_data["stories"] == DomainSource("s.jsonl")
    written = record.to_json()
    assert "params" not in written and "val_bpb" not in written and written["total_params"] == 1000
    assert RunRecord.from_json(written, "run.json") == record


def test_a_bad_run_record_names_the_file():
    with pytest.raises(UserError, match="x/run.json: expected a run record"):
        RunRecord.from_json({"status": "done"}, "x/run.json")
    with pytest.raises(UserError, match="x/run.json: field 'domain_data'"):
        RunRecord.from_json({"kind": "expert", "spec": {}, "seed": 0, "domain_data": {"s": {"trian": "a"}}}, "x/run.json")
