"""Forgetting metrics: accuracy, and membership inference checked against sklearn oracles."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.svm import SVC

from unlearnshield.metrics import (
    accuracy_of,
    classification_accuracy,
    membership_auc,
    membership_inference,
    predict_logits,
    svc_mia_efficacy,
    true_label_confidence,
)
from unlearnshield.training import evaluate_accuracy

from ._fixtures import digits, one_step_release, tiny_digits_model


def test_accuracy_matches_the_training_module_and_both_input_forms():
    model, data = tiny_digits_model(), digits()
    assert classification_accuracy(model, data.test) == pytest.approx(
        evaluate_accuracy(model, data.test), abs=1e-12
    )
    from_split = predict_logits(model, data.test, batch_size=97)
    from_tensor = predict_logits(model, data.test.float_images(), batch_size=500)
    torch.testing.assert_close(from_split, from_tensor, rtol=0, atol=1e-5)
    assert 0.5 < accuracy_of(from_split, data.test.labels) <= 1.0


def test_true_label_confidence_is_the_softmax_entry_of_the_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    conf = true_label_confidence(logits, torch.tensor([0, 2]))
    expected = torch.softmax(logits.double(), 1)[[0, 1], [0, 2]]
    torch.testing.assert_close(conf, expected)
    assert conf[1] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_membership_auc_and_tpr_match_sklearn(seed):
    generator = torch.Generator().manual_seed(seed)
    positives = torch.rand(37, generator=generator).double() * 0.6 + 0.3
    negatives = torch.rand(400, generator=generator).double()
    negatives[:20] = positives[:20]  # ties count one half
    auc, tpr = membership_auc(positives, negatives, fpr=0.05)
    scores = torch.cat([positives, negatives]).numpy()
    truth = np.r_[np.ones(37), np.zeros(400)]
    assert auc == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    fprs, tprs, _ = roc_curve(truth, scores)
    assert tpr == pytest.approx(tprs[fprs <= 0.05].max(), abs=1e-12)


def test_membership_auc_extremes():
    assert membership_auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3])) == (1.0, 1.0)
    assert membership_auc(torch.tensor([0.0]), torch.tensor([0.1, 0.2])) == (0.0, 0.0)
    with pytest.raises(ValueError, match="fpr"):
        membership_auc(torch.tensor([0.5]), torch.tensor([0.5]), fpr=1.0)


def test_svc_efficacy_reads_the_side_of_the_svc_boundary():
    generator = torch.Generator().manual_seed(0)
    members = 0.95 + 0.05 * torch.rand(300, generator=generator)
    nonmembers = 0.2 + 0.5 * torch.rand(300, generator=generator)
    targets = torch.tensor([0.99, 0.98, 0.3, 0.4])
    rate = svc_mia_efficacy(targets, members, nonmembers)
    assert rate == 0.5  # two targets look like members, two like non-members
    # the oracle: sklearn's SVC with SalUn's settings, fitted by hand
    clf = SVC(C=3, kernel="rbf", gamma="auto").fit(
        torch.cat([members, nonmembers]).double().view(-1, 1).numpy(),
        np.r_[np.ones(300), np.zeros(300)],
    )
    assert rate == 1 - clf.predict(targets.double().view(-1, 1).numpy()).mean()


def test_membership_inference_sets_and_what_unlearning_changes():
    model, data = tiny_digits_model(), digits()
    x, y = data.train.float_images([0, 1, 2, 3]), data.train.labels[[0, 1, 2, 3]]
    retain = data.train.subset(torch.arange(4, len(data.train)))
    report = membership_inference(model, x, y, retain, data.test, shadow_size=None, seed=3)
    assert report.num_shadow_nonmembers + report.num_holdout == len(data.test)
    assert report.num_shadow_members == report.num_shadow_nonmembers  # SalUn's balance
    assert report.efficacy in (0.0, 0.25, 0.5, 0.75, 1.0)
    again = membership_inference(model, x, y, retain, data.test, shadow_size=None, seed=3)
    assert again == report  # seeded and deterministic

    # a gradient-ascent step lowers the forget samples' confidence, and with it their AUC
    # against the held-out non-members
    released = one_step_release(model, x, y, step_size=0.5)
    after = membership_inference(released, x, y, retain, data.test, shadow_size=None, seed=3)
    assert np.mean(after.forget_confidence) < np.mean(report.forget_confidence)
    assert after.auc < report.auc
    record = after.as_record()
    assert record["mia_auc"] == after.auc and "p_y" in record["mia_statistic"]
