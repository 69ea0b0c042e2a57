"""Distillation (expandlm.training.distill): one student from several experts' outputs; alpha 0 is joint training."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from conftest import NANO_STEPS
from expandlm.training.distill import DistillSpec, LabelledBatches, Teacher, distill, distillation_loss, load_distill_spec
from expandlm.errors import UserError
from expandlm.data.shards import PackedBatches, build_shard
from expandlm.training.loop import TrainConfig, causal_lm_loss


def teachers(experts):
    return [Teacher(model=str(experts["base"]), domain="stories"),
            Teacher(model=str(experts["recipes-full_ft"]), domain="recipes"),
            Teacher(model=str(experts["code-full_ft"]), domain="code")]


def test_labelled_batches_name_the_shard_of_every_window(experts):
    from expandlm.data.corpus import load_train_val
    from expandlm.domains import get_domain
    from expandlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(experts["base"])
    root = experts["root"]
    shards = [build_shard(load_train_val(str(root / f"{d}.jsonl"), get_domain(d))[0], tok, root / "cache")
              for d in ("stories", "code")]
    labelled = LabelledBatches(shards, 32, 16, seed=1, weights=[0.5, 0.5])
    plain = PackedBatches(shards, 32, 16, seed=1, weights=[0.5, 0.5])
    batch = labelled.batch(3)
    assert torch.equal(batch[:, 1:], plain.batch(3))
    assert set(batch[:, 0].tolist()) == {0, 1}
    for (k, start), row in zip(labelled.picks(3), batch):
        assert row[0] == k and torch.equal(row[1:], torch.from_numpy(shards[k].tokens[start:start + 33].astype("int64")))


def test_the_loss_is_zero_on_the_teacher_itself_and_alpha_zero_is_the_next_token_loss(experts):
    model = AutoModelForCausalLM.from_pretrained(experts["base"]).eval()
    other = AutoModelForCausalLM.from_pretrained(experts["code-full_ft"]).eval()
    tokens = torch.randint(0, 300, (4, 17))
    batch = torch.cat([torch.tensor([[0], [1], [0], [1]]), tokens], 1)
    with torch.no_grad():
        assert distillation_loss([model, model], 1.0, 2.0, model, batch).abs() < 1e-5
        assert distillation_loss([model, other], 1.0, 1.0, model, batch) > 1e-4  # rows 1, 3 are the other's
        torch.testing.assert_close(distillation_loss([other, other], 0.0, 1.0, model, batch), causal_lm_loss(model, tokens))
        # only the windows a teacher labels pull toward it
        t_logits = other(input_ids=tokens[1:2, :-1]).logits
        s_logits = model(input_ids=tokens[1:2, :-1]).logits
        kl = F.kl_div(F.log_softmax(s_logits, -1)[0], F.log_softmax(t_logits, -1)[0], log_target=True, reduction="batchmean")
        single = distillation_loss([model, other], 1.0, 1.0, model, batch[1:2])
        torch.testing.assert_close(single, kl)


def test_a_student_learns_every_teacher_and_is_a_standard_checkpoint(experts, tmp_path):
    spec = DistillSpec(teachers=teachers(experts), out=str(tmp_path / "student"), student=str(experts["base"]),
                       cache_dir=str(experts["root"] / "cache"), train=TrainConfig(**{**NANO_STEPS, "max_steps": 6}))
    record = distill(spec).to_json()
    assert record["status"] == "done" and set(record["bpb"]) == {"stories", "recipes", "code"}
    context = AutoModelForCausalLM.from_pretrained(experts["base"]).config.max_position_embeddings
    assert record["tokens"] == 6 * 4 * context
    card = json.loads((tmp_path / "student" / "expandlm.json").read_text())
    assert card["domains"] == ["stories", "recipes", "code"] and card["distilled"]["alpha"] == 1.0
    AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    from expandlm.formats.served import load_served
    assert set(load_served(tmp_path / "student").domain_data()) == {"stories", "recipes", "code"}


def test_distillation_moves_the_student_toward_its_teacher(experts, tmp_path):
    """A fresh student taught by one expert ends closer to it (KL on held windows) than it started."""
    from expandlm.domains import get_domain
    from expandlm.data.corpus import load_train_val
    from expandlm.data.tokenizer import load_tokenizer

    teacher = AutoModelForCausalLM.from_pretrained(experts["recipes-full_ft"]).eval()
    tok = load_tokenizer(experts["base"])
    shard = build_shard(load_train_val(str(experts["root"] / "recipes.jsonl"), get_domain("recipes"))[0], tok)
    windows = PackedBatches([shard], 64, 8, seed=9).batch(0)

    def kl(model):
        with torch.no_grad():
            s, t = model(input_ids=windows[:, :-1]).logits, teacher(input_ids=windows[:, :-1]).logits
        return F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                        reduction="batchmean").item()

    from expandlm.model.llama import build_model, get_preset
    before = kl(build_model(get_preset("nano"), tok, seed=0).eval())
    spec = DistillSpec(teachers=[Teacher(model=str(experts["recipes-full_ft"]), domain="recipes")],
                       out=str(tmp_path / "s"), cache_dir=str(experts["root"] / "cache"),
                       train=TrainConfig(**{**NANO_STEPS, "max_steps": 20, "lr": 0.01}))
    distill(spec)
    assert kl(AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()) < 0.8 * before


def test_bad_specs_are_refused(experts, tmp_path):
    t = teachers(experts)
    with pytest.raises(UserError, match="names a domain twice"):
        distill(DistillSpec(teachers=[t[1], t[1]], out=str(tmp_path / "a")))
    with pytest.raises(UserError, match="shares"):
        distill(DistillSpec(teachers=t, shares=[1.0], out=str(tmp_path / "b")))
    with pytest.raises(UserError, match="no expert"):
        distill(DistillSpec(teachers=[], out=str(tmp_path / "c")))
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"teachers": [{"model": "x"}], "alpha": 2}))
    with pytest.raises(UserError, match="d.yaml"):
        load_distill_spec(path, str(tmp_path / "d"))


def test_distill_command(experts, tmp_path):
    from expandlm.cli import main

    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump({"teachers": [{"model": str(experts["recipes-lora"]), "domain": "recipes"},
                                                 {"model": str(experts["code-lora"]), "domain": "code"}],
                                    "alpha": 0.5, "temperature": 2.0, "cache_dir": str(experts["root"] / "cache"),
                                    "train": {**NANO_STEPS, "max_steps": 2}}))
    assert main(["distill", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["kind"] == "distill" and record["spec"]["temperature"] == 2.0 and "versions" in record
