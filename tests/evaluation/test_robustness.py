"""evaluate(): invariants between the numbers, the contract check, warnings, JSON round trip."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from fortify.attacks import FGSM, PGD, Attack
from fortify.errors import ConfigError, DataError, ThreatModelViolation
from fortify.evaluation import RobustnessReport, evaluate
from fortify.threat import ThreatModel

THREAT = ThreatModel("linf", 0.1)


def test_report_invariants(standard_model, digits):
    x, y = digits.test.x, digits.test.y
    report = evaluate(standard_model, x, y, [FGSM(THREAT), PGD(THREAT, steps=10)], THREAT,
                      eps_grid=[0.05, 0.1, 0.2], batch_size=100)
    clean = float((standard_model(x).argmax(1) == y).float().mean())
    assert report.clean_accuracy == pytest.approx(clean)
    assert report.n_examples == len(y)
    for result in report.attacks:
        assert result.adversarial_accuracy <= report.clean_accuracy
        assert report.worst_case_accuracy <= result.adversarial_accuracy
        assert result.max_norm <= THREAT.eps + 1e-6
        assert result.attacked == sum(report.clean_correct)
        fooled = result.attacked - sum(result.robust)
        assert result.success_rate == pytest.approx(fooled / result.attacked)
    accuracies = [p.accuracy for p in report.eps_curve]
    assert accuracies == sorted(accuracies, reverse=True)
    assert report.eps_curve[1].accuracy == pytest.approx(report.attack("pgd-10").adversarial_accuracy)


def test_cascade_gives_the_same_worst_case_with_deterministic_attacks(standard_model, digits):
    x, y = digits.test.x, digits.test.y
    attacks = [FGSM(THREAT), PGD(THREAT, steps=5, random_start=False)]
    independent = evaluate(standard_model, x, y, attacks, THREAT)
    cascade = evaluate(standard_model, x, y, attacks, THREAT, cascade=True)
    assert cascade.worst_case_accuracy == independent.worst_case_accuracy
    assert cascade.attacks[1].attacked <= independent.attacks[1].attacked
    assert cascade.attacks[-1].adversarial_accuracy == cascade.worst_case_accuracy


class _Cheater(Attack):
    """Returns points twice as far as allowed."""

    name = "cheater"

    def perturb(self, model, x, y, target, generator):
        return (x + 2 * self.threat.eps).clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_narrow_integer_labels_give_the_int64_report(standard_model, digits, dtype):
    # they passed the label check, then failed in the gradient probe's cross-entropy
    threat = ThreatModel("linf", 0.1)
    x, y = digits.test.x[:32], digits.test.y[:32]
    attacks = [FGSM(threat), PGD(threat, steps=3)]
    narrow = evaluate(standard_model, x, y.to(dtype), attacks, threat, eps_grid=[0.05])
    assert narrow.to_dict() == evaluate(standard_model, x, y, attacks, threat, eps_grid=[0.05]).to_dict()


def test_a_point_outside_the_threat_model_is_refused(standard_model, digits):
    with pytest.raises(ThreatModelViolation, match="cheater.*outside"):
        evaluate(standard_model, digits.test.x[:20], digits.test.y[:20], [_Cheater(THREAT)], THREAT)


def test_probability_outputs_get_a_warning(standard_model, digits):
    softmaxed = nn.Sequential(standard_model, nn.Softmax(dim=1))
    report = evaluate(softmaxed, digits.test.x[:50], digits.test.y[:50], [FGSM(THREAT)], THREAT)
    assert any("probabilities" in w for w in report.warnings)
    logits_report = evaluate(standard_model, digits.test.x[:50], digits.test.y[:50], [FGSM(THREAT)],
                             THREAT)
    assert logits_report.warnings == []


def test_json_round_trip(standard_model, digits):
    report = evaluate(standard_model, digits.test.x[:30], digits.test.y[:30], [FGSM(THREAT)], THREAT,
                      eps_grid=[0.05])
    again = RobustnessReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    stale = report.to_dict() | {"version": 0}
    with pytest.raises(DataError, match="version"):
        RobustnessReport.from_dict(stale)
    # a damaged record is a DataError naming what is wrong, and no outcome is dropped without a word
    without_outcomes = report.to_dict()
    del without_outcomes["attacks"][0]["robust"]
    damaged = {"field missing": ({k: v for k, v in report.to_dict().items() if k != "attacks"},
                                 r"lacks the fields \['attacks'\]"),
               "field added": (report.to_dict() | {"note": 1}, r"unexpected \['note'\]"),
               "outcomes missing": (without_outcomes, r"an attack record lacks the fields \['robust'\]"),
               "not a mapping": ([1, 2], "must be a mapping")}
    for data, message in damaged.values():
        with pytest.raises(DataError, match=message):
            RobustnessReport.from_dict(data)


def test_bad_setups(standard_model, digits):
    x, y = digits.test.x[:10], digits.test.y[:10]
    with pytest.raises(DataError, match="labels range over"):
        evaluate(standard_model, x, y + 10, [FGSM(THREAT)], THREAT, num_classes=10)
    with pytest.raises(ConfigError, match="threat model"):
        evaluate(standard_model, x, y, [FGSM(ThreatModel("linf", 0.3))], THREAT)
    with pytest.raises(ConfigError, match="at least one attack"):
        evaluate(standard_model, x, y, [], THREAT)
    with pytest.raises(DataError, match="NaN"):
        evaluate(standard_model, x * torch.nan, y, [FGSM(THREAT)], THREAT)
    # a class count other than the model's was accepted, as docs/ATTACKS.md says it is not
    with pytest.raises(ConfigError, match="num_classes is 20, but the model outputs 10 classes"):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, num_classes=20)
    # the clean pass raised torch's own RuntimeError where the attacks name the inputs
    for bad in (x.double(), x.flatten(1)):
        with pytest.raises(DataError, match="the model does not run on these inputs"):
            evaluate(standard_model, bad, y, [FGSM(THREAT)], THREAT)


class _KilledAfter(Exception):
    pass


class _Fragile(Attack):
    """Delegates to PGD but raises on its n-th call: a stand-in for a killed process."""

    name = "pgd"

    def __init__(self, threat, fail_on_call=None):
        super().__init__(threat, seed=4)
        self.inner = PGD(threat, steps=5, seed=4)
        self.fail_on_call = fail_on_call
        self.calls = 0

    @property
    def label(self):
        return "pgd-5"

    def describe(self):
        return self.inner.describe()

    def perturb(self, model, x, y, target, generator):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise _KilledAfter
        return self.inner.perturb(model, x, y, target, generator)


def test_a_killed_cascade_resumes_from_its_journal_with_the_same_numbers(standard_model, digits, tmp_path):
    # Prepare: FGSM then a PGD that dies on its second batch
    x, y = digits.test.x, digits.test.y
    threat = ThreatModel("linf", 0.05)
    settings = {"batch_size": 64, "cascade": True}
    reference = evaluate(standard_model, x, y, [FGSM(threat), _Fragile(threat)], threat, **settings)
    # Execute
    with pytest.raises(_KilledAfter):
        evaluate(standard_model, x, y, [FGSM(threat), _Fragile(threat, fail_on_call=2)], threat,
                 journal_dir=tmp_path, **settings)
    resumed_attack = _Fragile(threat)
    resumed = evaluate(standard_model, x, y, [FGSM(threat), resumed_attack], threat,
                       journal_dir=tmp_path, **settings)
    # Assert: identical outcome, and the finished batch was not attacked again
    assert resumed.attacks == reference.attacks
    batches = -(-reference.attacks[1].attacked // 64)
    assert resumed_attack.calls == batches - 1


def test_a_journal_that_labelled_a_warm_cw_as_a_restarted_one_still_resumes(standard_model, digits, tmp_path):
    # Prepare: a warm C&W finished and a PGD killed on its second batch, in a journal whose record
    # names the C&W as fortify did before warm runs had a label of their own
    from fortify.attacks.cw import CarliniWagnerL2
    from fortify.evaluation.journal import records_sha256

    x, y = digits.test.x[:100], digits.test.y[:100]
    threat = ThreatModel("l2", 1.0)
    cw = CarliniWagnerL2(threat, steps=5, binary_search_steps=2, warm_start=True)
    reference = evaluate(standard_model, x, y, [cw, _Fragile(threat)], threat, batch_size=64)
    with pytest.raises(_KilledAfter):
        evaluate(standard_model, x, y, [cw, _Fragile(threat, fail_on_call=2)], threat, batch_size=64,
                 journal_dir=tmp_path)
    record = tmp_path / "evaluation.json"
    state = json.loads(record.read_text())
    assert state["completed"][0]["name"] == "cw-2x5-warm"
    state["completed"][0]["name"] = "cw-2x5"
    state["records_sha256"] = records_sha256(state)
    record.write_text(json.dumps(state))
    # Execute
    resumed = evaluate(standard_model, x, y, [cw, _Fragile(threat)], threat, batch_size=64,
                       journal_dir=tmp_path)
    # Assert: the finished C&W is read back under today's label, the numbers as without the kill
    assert resumed.attacks == reference.attacks
    assert [result.name for result in resumed.attacks] == ["cw-2x5-warm", "pgd-5"]


def test_a_journal_of_other_data_is_refused(standard_model, digits, tmp_path):
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    with pytest.raises(CheckpointError, match=f"other data .*; remove {tmp_path} .*to start this one afresh"):
        evaluate(standard_model, x[:30], y[:30], [FGSM(THREAT)], THREAT, journal_dir=tmp_path)


def test_a_journal_of_another_model_is_refused(standard_model, robust_model, digits, tmp_path):
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    with pytest.raises(CheckpointError, match="other data"):  # a retrained model in the same place
        evaluate(robust_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)



def test_a_journal_made_under_another_box_is_refused(standard_model, digits, tmp_path):
    # the attacks' describe() holds norm and eps alone: the box enters the fingerprint as well
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    wider = ThreatModel(THREAT.norm, THREAT.eps, (-1.0, 2.0))
    with pytest.raises(CheckpointError, match="other data or other attack settings"):
        evaluate(standard_model, x, y, [FGSM(wider)], wider, journal_dir=tmp_path)


def test_a_journal_of_a_transfer_from_another_surrogate_is_refused(standard_model, robust_model, digits,
                                                                  tmp_path):
    from fortify.attacks.transfer import Transfer
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [Transfer(FGSM(THREAT), robust_model)], THREAT, journal_dir=tmp_path)
    with pytest.raises(CheckpointError, match="other data or other attack settings"):  # same class
        evaluate(standard_model, x, y, [Transfer(FGSM(THREAT), copy.deepcopy(standard_model))], THREAT,
                 journal_dir=tmp_path)


def test_a_kill_between_the_journals_two_writes_resumes_from_the_batch_before(standard_model, digits,
                                                                             tmp_path, monkeypatch):
    # Prepare: the third batch's outcomes reach their file, then the process dies before
    # evaluation.json names them
    from fortify.evaluation.journal import Journal

    x, y = digits.test.x[:80], digits.test.y[:80]
    threat = ThreatModel("linf", 0.05)
    reference = evaluate(standard_model, x, y, [_Fragile(threat)], threat, batch_size=16)
    writes = []
    write = Journal._write

    def dies_on_the_third(self):
        writes.append(1)
        if len(writes) == 3:
            raise _KilledAfter
        write(self)

    monkeypatch.setattr(Journal, "_write", dies_on_the_third)
    with pytest.raises(_KilledAfter):
        evaluate(standard_model, x, y, [_Fragile(threat)], threat, batch_size=16, journal_dir=tmp_path)
    monkeypatch.setattr(Journal, "_write", write)
    # Execute
    resumed_attack = _Fragile(threat)
    resumed = evaluate(standard_model, x, y, [resumed_attack], threat, batch_size=16, journal_dir=tmp_path)
    # Assert: two batches were on record; the rest ran again, to the same numbers
    assert resumed.attacks == reference.attacks
    assert resumed_attack.calls == -(-reference.attacks[0].attacked // 16) - 2


def _journal_killed_after_its_first_batch(model, digits, journal_dir):
    """A journal in ``journal_dir`` of an evaluation (batches of 8) killed after its first batch; the
    examples and threat model it evaluates."""
    x, y = digits.test.x[:40], digits.test.y[:40]
    threat = ThreatModel("linf", 0.05)
    with pytest.raises(_KilledAfter):
        evaluate(model, x, y, [_Fragile(threat, fail_on_call=2)], threat, batch_size=8,
                 journal_dir=journal_dir)
    return x, y, threat


def _write_journal(directory, journal):
    """evaluation.json written back with its records' hash made to agree, as a careful edit would:
    each record's own checks must still catch what the edit got wrong."""
    from fortify.evaluation.journal import records_sha256

    journal["records_sha256"] = records_sha256(journal)
    (directory / "evaluation.json").write_text(json.dumps(journal))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda current, tensors: tensors.update(robust=tensors["robust"][:10]), "outcomes for"),
    (lambda current, tensors: current.update(next_start=10**6), "stopped at example 1000000"),
    (lambda current, tensors: current.update(next_start=3), "stopped at example 3"),
    (lambda current, tensors: tensors.update(robust=torch.ones_like(tensors["robust"])),
     "robust examples the attack had not reached"),
])
def test_an_edited_record_of_the_attack_under_way_is_refused(standard_model, digits, tmp_path, edit, match):
    # Prepare: a journal killed after its first batch, then its record of that batch edited (and its
    # hash made to agree, as a careful edit would)
    from fortify.errors import CheckpointError
    from fortify.training import checkpoint as ckpt

    x, y, threat = _journal_killed_after_its_first_batch(standard_model, digits, tmp_path)
    journal = json.loads((tmp_path / "evaluation.json").read_text())
    current = journal["current"]
    tensors = ckpt.load_tensors(tmp_path / current["file"], "evaluation", record="evaluation.json")
    edit(current, tensors)
    current["sha256"] = ckpt.save_tensors(tmp_path / current["file"], tensors, kind="evaluation")
    _write_journal(tmp_path, journal)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=match):
        evaluate(standard_model, x, y, [_Fragile(threat)], threat, batch_size=8, journal_dir=tmp_path)


def test_an_attack_named_twice_is_refused(standard_model, digits):
    from fortify.errors import ConfigError

    with pytest.raises(ConfigError, match="the attacks name fgsm twice"):
        evaluate(standard_model, digits.test.x[:8], digits.test.y[:8], [FGSM(THREAT), FGSM(THREAT)], THREAT)


@pytest.mark.parametrize(("text", "match"), [("[1, 2]", "does not hold a journal object"),
                                             ("{oops", "is not valid JSON")])
def test_a_damaged_journal_is_a_checkpoint_error(standard_model, digits, tmp_path, text, match):
    # a JSON list was an AttributeError inside the evaluation
    from fortify.errors import CheckpointError

    (tmp_path / "evaluation.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"{match}.*fortify evaluate --restart does"):
        evaluate(standard_model, digits.test.x[:8], digits.test.y[:8], [FGSM(THREAT)], THREAT,
                 journal_dir=tmp_path)


def test_a_journal_without_the_hash_of_its_records_names_the_way_out(standard_model, digits, tmp_path):
    # a journal as an earlier fortify wrote it: no records_sha256, and no accusation of an edit
    from fortify.errors import CheckpointError

    x, y, threat = _journal_killed_after_its_first_batch(standard_model, digits, tmp_path)
    journal = json.loads((tmp_path / "evaluation.json").read_text())
    del journal["records_sha256"]
    (tmp_path / "evaluation.json").write_text(json.dumps(journal))
    with pytest.raises(CheckpointError, match=re.escape("holds no hash of its records (an earlier fortify "
                                                        "wrote it, or it was edited)")):
        evaluate(standard_model, x, y, [_Fragile(threat)], threat, batch_size=8, journal_dir=tmp_path)


def test_a_journal_whose_batch_file_is_gone_names_the_way_to_start_afresh(standard_model, digits, tmp_path):
    from fortify.errors import CheckpointError

    x, y, threat = _journal_killed_after_its_first_batch(standard_model, digits, tmp_path)
    current = json.loads((tmp_path / "evaluation.json").read_text())["current"]
    (tmp_path / current["file"]).unlink()
    way_out = re.escape("(fortify evaluate --restart does) to evaluate from the start")
    with pytest.raises(CheckpointError, match=f"does not exist.*{way_out}"):
        evaluate(standard_model, x, y, [_Fragile(threat)], threat, batch_size=8, journal_dir=tmp_path)

@pytest.mark.parametrize(("edit", "match"), [
    (lambda r: r.pop("mode"), "has fields"),
    (lambda r: r.update(robust=r["robust"][:10]), "are not 40 true/false values"),
    (lambda r: r.update(adversarial_accuracy=0.99), "accuracy does not match its per-example outcomes"),
    (lambda r: r.update(name="pgd-50"), "records 'pgd-50' where this evaluation runs 'fgsm'"),
    (lambda r: r.update(settings={**r["settings"], "eps": 0.5}), "settings are not this evaluation's"),
    (lambda r: r.update(success_rate=7.5), "success rate or norms are not numbers in their range"),
    (lambda r: r.update(mean_norm="abc"), "success rate or norms are not numbers in their range"),
])
def test_an_edited_journal_record_is_refused_not_reported(standard_model, digits, tmp_path, edit, match):
    # Prepare: a finished journal entry, then edited or damaged
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    journal = json.loads((tmp_path / "evaluation.json").read_text())
    edit(journal["completed"][0])
    _write_journal(tmp_path, journal)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=match):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)


def test_a_consistent_edit_of_a_finished_record_is_refused_by_the_records_hash(standard_model, digits,
                                                                               tmp_path):
    # Prepare: a finished attack's record edited so that every check of the record passes: one robust
    # flag turned on, and the accuracy that flag gives
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    journal = json.loads((tmp_path / "evaluation.json").read_text())
    record = journal["completed"][0]
    fooled = record["robust"].index(False)
    record["robust"][fooled] = True
    record["adversarial_accuracy"] = sum(record["robust"]) / len(record["robust"])
    edited = copy.deepcopy(journal)
    _write_journal(tmp_path, edited)
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)  # the edit passes its checks
    (tmp_path / "evaluation.json").write_text(json.dumps(journal))  # the hash left as it was
    # Execute / Assert
    with pytest.raises(CheckpointError, match="does not match the hash of its records"):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)


@pytest.mark.parametrize("current", [
    {"attack_index": 0, "sha256": "00", "file": "evaluation-0-8.safetensors"},  # next_start gone
    {"attack_index": 0, "next_start": 8, "sha256": "00", "file": "../outside.safetensors"},
])
def test_a_journal_whose_current_attack_is_damaged_is_refused(standard_model, digits, tmp_path, current):
    from fortify.errors import CheckpointError

    x, y = digits.test.x[:40], digits.test.y[:40]
    evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)
    journal = json.loads((tmp_path / "evaluation.json").read_text())
    journal["current"] = current
    _write_journal(tmp_path, journal)
    with pytest.raises(CheckpointError, match="evaluation.json is damaged"):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, journal_dir=tmp_path)


# -- what a call can get wrong -----------------------------------------------------------------

def test_labels_past_the_models_classes_are_refused_not_counted_as_errors(standard_model, digits):
    x, y = digits.test.x[:20], digits.test.y[:20].clone()
    y[3] = 12  # the model scores 10 classes
    with pytest.raises(DataError, match=r"labels range over \[0, 12\] but the model has 10 classes"):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, eps_grid=[])
    with pytest.raises(DataError, match="integer class indices"):
        evaluate(standard_model, x, y.float(), [FGSM(THREAT)], THREAT, eps_grid=[])


def test_the_curve_attack_must_share_the_threat_model(standard_model, digits):
    x, y = digits.test.x[:20], digits.test.y[:20]
    with pytest.raises(ConfigError, match="uses l2 eps=1"):
        evaluate(standard_model, x, y, [FGSM(THREAT)], THREAT, eps_grid=[0.05],
                 curve_attack=PGD(ThreatModel("l2", 1.0), steps=2))


class _CountingFGSM(FGSM):
    calls = 0

    def perturb(self, model, x, y, target, generator):
        type(self).calls += 1
        return super().perturb(model, x, y, target, generator)


@pytest.mark.parametrize("eps_grid, fragment", [([0.05, 0.0], "eps must be a finite number > 0, got 0.0"),
                                                ([0.05, 1.5], "beyond the box"),
                                                ([0.05, 0.1, 0.05], "eps_grid names an eps twice")])
def test_a_bad_eps_grid_is_refused_before_any_attack(standard_model, digits, eps_grid, fragment):
    _CountingFGSM.calls = 0
    with pytest.raises(ConfigError, match=fragment):
        evaluate(standard_model, digits.test.x[:20], digits.test.y[:20], [_CountingFGSM(THREAT)], THREAT,
                 eps_grid=eps_grid)
    assert _CountingFGSM.calls == 0


@pytest.mark.parametrize("attacks, batch_size, fragment", [
    (lambda: FGSM(THREAT), 64, r"pass \[attack\]"),
    (lambda: [FGSM(THREAT)], 2.5, "batch_size must be an integer >= 1, got 2.5"),
])
def test_arguments_of_the_wrong_kind_are_named(standard_model, digits, attacks, batch_size, fragment):
    with pytest.raises(ConfigError, match=fragment):
        evaluate(standard_model, digits.test.x[:8], digits.test.y[:8], attacks(), THREAT,
                 batch_size=batch_size)


def test_a_generator_of_attacks_is_taken_whole(standard_model, digits):
    x, y = digits.test.x[:20], digits.test.y[:20]
    report = evaluate(standard_model, x, y, (a for a in [FGSM(THREAT)]), THREAT, eps_grid=[])
    assert [a.name for a in report.attacks] == ["fgsm"]


class _NoParameters(nn.Module):
    def forward(self, x):
        return 10 * x.flatten(1)[:, :10]


def test_a_model_without_parameters_is_evaluated(digits):
    x, y = digits.test.x[:20], digits.test.y[:20]
    report = evaluate(_NoParameters(), x, y, [FGSM(THREAT)], THREAT, eps_grid=[])
    assert report.attacks[0].adversarial_accuracy <= report.clean_accuracy


def test_evaluate_gives_every_submodule_its_mode_back(standard_model, digits):
    model = nn.Sequential(standard_model, nn.Dropout(0.5))
    model.eval()
    model[1].train()  # dropout kept on, as for Monte-Carlo sampling
    evaluate(model, digits.test.x[:20], digits.test.y[:20], [FGSM(THREAT)], THREAT, eps_grid=[])
    assert not model.training and not standard_model.training and model[1].training


def test_threat_models_that_read_alike_are_told_apart_in_the_message(standard_model, digits):
    import numpy as np

    attack = FGSM(ThreatModel("linf", np.float32(0.1)))  # eps 0.10000000149011612
    with pytest.raises(ConfigError, match=r"uses linf eps=0\.10000000149011612 .* is linf eps=0\.1 "):
        evaluate(standard_model, digits.test.x[:8], digits.test.y[:8], [attack], THREAT)


def _linear_two_class_box_model():
    """z = (0, w.x + b): FGSM's point is the exact L-inf worst case of each example (the box included)."""
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 1.0]]))
        model.bias.copy_(torch.tensor([0.0, -0.5]))
    return model


@pytest.mark.parametrize("cascade", [False, True])
def test_the_worst_case_of_a_linear_model_is_its_closed_form_at_every_batch_size(cascade):
    # Prepare: the exact robust set: correct clean, and still correct at the box corner of the
    # ball that moves w.x against the label (what FGSM reaches on a linear model)
    model = _linear_two_class_box_model()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(23, 4, generator=generator), torch.randint(0, 2, (23,), generator=generator)
    threat = ThreatModel("linf", 0.1)
    w, b = model.weight[1].detach(), model.bias[1].detach()
    towards_the_other_class = torch.where(y[:, None] == 1, -w.sign(), w.sign())
    worst = (x + threat.eps * towards_the_other_class).clamp(0, 1) @ w + b
    clean_correct = torch.where(y == 1, x @ w + b > 0, x @ w + b < 0)
    robust = clean_correct & torch.where(y == 1, worst > 0, worst < 0)
    assert 0 < int(robust.sum()) < int(clean_correct.sum())  # the attacks have something to flip
    for batch_size in (1, 3, 5, 23, 64):
        for labels in (y, y.int(), y.to(torch.uint8)):
            # Execute
            report = evaluate(model, x, labels, [FGSM(threat), PGD(threat, steps=5)], threat,
                              batch_size=batch_size, cascade=cascade)
            # Assert: every batching gives the exact per-example outcome
            assert report.clean_correct == clean_correct.tolist()
            assert report.attacks[0].robust == robust.tolist()
            assert report.worst_case_accuracy == pytest.approx(float(robust.float().mean()))


@pytest.mark.parametrize("cascade", [False, True])
def test_a_kill_at_any_batch_resumes_to_the_uninterrupted_numbers(tmp_path, cascade):
    # Prepare: a small network on random points, a random-start FGSM, then a PGD killed on its k-th
    # batch for every k (batches of 7, the last one short)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(50, 6, generator=generator), torch.randint(0, 3, (50,), generator=generator)
    threat = ThreatModel("linf", 0.15)
    # the curve by a PGD of its own: _Fragile's inner PGD keeps its eps under with_threat
    settings = {"batch_size": 7, "cascade": cascade, "eps_grid": [0.05],
                "curve_attack": PGD(threat, steps=3, seed=2)}
    reference = evaluate(model, x, y, [FGSM(threat, random_start=True), _Fragile(threat)], threat,
                         **settings)
    batches = -(-reference.attacks[1].attacked // 7)
    assert batches >= 2
    for kill in range(1, batches + 1):
        journal = tmp_path / f"killed-{kill}"
        with pytest.raises(_KilledAfter):
            evaluate(model, x, y, [FGSM(threat, random_start=True), _Fragile(threat, fail_on_call=kill)],
                     threat, journal_dir=journal, **settings)
        # Execute
        resumed = evaluate(model, x, y, [FGSM(threat, random_start=True), _Fragile(threat)], threat,
                           journal_dir=journal, **settings)
        # Assert
        assert resumed.to_dict() == reference.to_dict()
