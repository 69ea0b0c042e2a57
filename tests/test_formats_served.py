"""Serving a model folder: the device it lands on, and which domains it answers for."""
import pytest

from expandlm.errors import UserError
from expandlm.training.expert import ExpertSpec, train_expert
from expandlm.formats.served import default_device, load_served
from expandlm.training.loop import TrainConfig


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    from tests.conftest import STORIES, write_jsonl
    root = tmp_path_factory.mktemp("serving")
    data = write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES])
    train_expert(ExpertSpec(domain="stories", data=str(data), out=str(root / "m"), preset="nano", vocab_size=300,
                            train=TrainConfig(max_steps=2, batch_size=2, eval_interval=0, progress=False)))
    return root / "m"


def test_a_served_model_is_moved_to_the_requested_device(expert):
    assert {p.device for p in load_served(expert).model.parameters()} == {default_device()}
    on_meta = load_served(expert, device="meta")  # any device: what a GPU host gets by default
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}


def test_only_served_domains_are_answered(expert):
    served = load_served(expert)
    assert served.domains == ["stories"] and served.for_domain("stories") is served.model
    with pytest.raises(UserError, match="serves stories, not 'recipes'"):
        served.for_domain("recipes")
    with pytest.raises(UserError, match="unknown domain 'poems'"):
        served.for_domain("poems")
    with pytest.raises(UserError, match="no such model folder"):
        load_served(expert.parent / "nowhere")
