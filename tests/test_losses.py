import math

import pytest
import torch

from adrec.train.losses import LossConfig, candidate_log_q, catalog_rows_of_ids, full_softmax, in_batch_softmax


def test_softmax_is_cross_entropy_over_the_batch_ads_for_positive_rows_only():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ad = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    ids = torch.tensor([10, 11, 12])
    positive = torch.tensor([True, False, True])
    loss = in_batch_softmax(user, ad, ids, positive)
    logits = user @ ad.T
    expected = (torch.logsumexp(logits[0], 0) - logits[0, 0] + torch.logsumexp(logits[2], 0) - logits[2, 2]) / 2
    assert torch.isclose(loss, expected)


def test_accidental_hits_are_not_negatives():
    user = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ad = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both rows show the same ad
    ids = torch.tensor([7, 7])
    positive = torch.tensor([True, True])
    assert torch.isclose(in_batch_softmax(user, ad, ids, positive, remove_accidental_hits=True), torch.tensor(0.0))
    assert torch.isclose(in_batch_softmax(user, ad, ids, positive, remove_accidental_hits=False), torch.tensor(math.log(2)))


def test_logq_correction_subtracts_each_candidates_log_sampling_probability():
    user = torch.tensor([[0.0, 0.0]])
    ad = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    ids = torch.tensor([0, 1])
    log_q = torch.log(torch.tensor([0.5, 0.05]))  # the rare ad gets a higher corrected logit
    loss = in_batch_softmax(user, ad, ids, torch.tensor([True]), log_q)
    corrected = -log_q
    assert torch.isclose(loss, torch.logsumexp(corrected, 0) - corrected[0])


def test_candidate_log_q_of_in_batch_and_uniform_draws():
    log_frequency = torch.log(torch.tensor([0.0 + 1e-12, 0.1, 0.3, 0.6]))
    ids = torch.tensor([2, 3, 1, 1, 2])  # 3 batch rows, then 2 uniform draws
    log_q = candidate_log_q(ids, log_frequency, batch_rows=3, catalog_size=100, uniform=2)
    assert torch.allclose(log_q, torch.log(torch.tensor([0.9, 1.8, 0.3, 0.02, 0.02])))


def test_no_positive_gives_zero_loss_with_a_gradient_path():
    ad = torch.ones(2, 2, requires_grad=True)
    loss = in_batch_softmax(torch.ones(2, 2), ad, torch.tensor([0, 1]), torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and ad.grad is not None


def test_loss_config_rejects_all_zero_weights():
    with pytest.raises(ValueError, match="weights"):
        LossConfig.from_dict({"bce_weight": 0, "softmax_weight": 0})


def test_full_softmax_is_cross_entropy_over_the_whole_catalog_for_rows_with_a_catalog_row():
    torch.manual_seed(0)
    user, catalog = torch.randn(3, 4), torch.randn(5, 4)
    target = torch.tensor([2, -1, 4])  # the second row's ad has no catalog row of its own
    positive = torch.tensor([True, True, False])
    expected = torch.nn.functional.cross_entropy(user[:1] @ catalog.T, target[:1])
    assert torch.allclose(full_softmax(user, catalog, target, positive), expected)


def test_catalog_rows_of_ids_marks_shared_ids_as_having_none():
    # ads 0 and 3 share id 1 (rare ads out of the vocabulary): neither is the target of that id
    rows = catalog_rows_of_ids(torch.tensor([1, 2, 5, 1]), cardinality=7)
    assert rows.tolist() == [-1, -1, 1, -1, -1, 2, -1]
