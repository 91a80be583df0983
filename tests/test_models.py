import torch

from adrec.features import OOV, PAD
from adrec.models.towers import EmbeddingMLPTower
from adrec.models.two_tower import TwoTower


def tower(oov_dropout=0.0) -> EmbeddingMLPTower:
    torch.manual_seed(0)
    return EmbeddingMLPTower({"user_id": 10, "slot": 4}, {"history": 7}, 8, [16], 5, oov_dropout=oov_dropout)


def batch(b=3):
    return {
        "user_id": torch.tensor([2, 3, 9][:b]),
        "slot": torch.tensor([2, 2, 3][:b]),
        "history": torch.tensor([[2, 3, PAD], [PAD, PAD, PAD], [6, 6, 6]][:b]),
    }


def test_tower_output_shape_and_padding_is_ignored():
    t = tower().eval()
    out = t(batch())
    assert out.shape == (3, 5)
    longer = {**batch(), "history": torch.cat([batch()["history"], torch.zeros(3, 4, dtype=torch.long)], dim=1)}
    assert torch.allclose(t(longer), out)  # more padding, same mean


def test_oov_dropout_hides_values_only_in_training():
    t = tower(oov_dropout=1.0)
    all_oov = {**batch(), "user_id": torch.full((3,), OOV), "slot": torch.full((3,), OOV)}
    assert torch.allclose(t.train()(batch()), t.eval()(all_oov))
    assert not torch.allclose(t.eval()(batch()), t(all_oov))


def test_two_tower_logit_is_dot_product_plus_bias():
    user, ad = tower().eval(), tower().eval()
    model = TwoTower(user, ad).eval()
    with torch.no_grad():
        model.logit_bias.fill_(0.5)
        expected = (user(batch()) * ad(batch())).sum(-1) + 0.5
        assert torch.allclose(model(batch()), expected)
