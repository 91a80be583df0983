import pytest
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


def test_item_bias_adds_a_learned_scalar_per_ad_to_the_dot_product():
    torch.manual_seed(0)
    user = EmbeddingMLPTower({"user_id": 10}, {}, 8, [], 5, score_column="one").eval()
    ad = EmbeddingMLPTower({"user_id": 10}, {}, 8, [], 5, score_column="bias:user_id").eval()
    with torch.no_grad():
        ad.id_bias.weight[3] = 2.0
    features = {"user_id": torch.tensor([3, 4])}
    u, v = user(features), ad(features)
    assert u.shape == (2, 6) and user.width == 6 and torch.equal(u[:, -1], torch.ones(2))
    assert torch.allclose((u * v).sum(-1), (u[:, :5] * v[:, :5]).sum(-1) + torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="bias:<categorical feature>"):
        EmbeddingMLPTower({"user_id": 10}, {}, 8, [], 5, score_column="bias:ad_id")


def test_history_dropout_keeps_the_remaining_clicks_in_order_at_the_front():
    from adrec.models.towers import _drop_clicks

    torch.manual_seed(0)
    items = torch.arange(1, 7, dtype=torch.float32).reshape(1, 6, 1)  # clicks 1..5, then padding
    mask = torch.tensor([[True] * 5 + [False]])
    kept_items, kept = _drop_clicks(items, mask, 0.5)
    n = int(kept.sum())
    assert 0 < n < 5 and kept[0, :n].all() and not kept[0, n:].any()
    values = kept_items[0, :n, 0].tolist()
    assert values == sorted(values) and set(values) < {1.0, 2.0, 3.0, 4.0, 5.0}


ENCODERS = ["mlp", "cnn", "gru", "attention"]


def behaviour_tower(kind: str) -> EmbeddingMLPTower:
    torch.manual_seed(0)
    return EmbeddingMLPTower(
        {"user_id": 10}, {}, 8, [16], 5, behaviour={"history": 7, "history_category": 4}, encoder={"kind": kind}, max_len=4
    ).eval()


def histories(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded (B, 4) history and matching categories (category = ad % 3 + 1)."""
    history = torch.tensor([row + [PAD] * (4 - len(row)) for row in rows])
    category = torch.where(history == PAD, PAD, history % 3 + 1)
    return {"user_id": torch.full((len(rows),), 2), "history": history, "history_category": category}


@pytest.mark.parametrize("kind", ENCODERS)
def test_every_encoder_is_finite_on_empty_histories_and_ignores_padding_content(kind):
    t = behaviour_tower(kind)
    out = t(histories([[], [2, 3], [4, 5, 6, 2]]))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    # Whatever sits in padded positions must not change the result: the mask comes from history == PAD.
    padded = histories([[], [2, 3], [4, 5, 6, 2]])
    padded["history_category"][0] = 3  # a category under a PAD history position
    assert torch.allclose(t(padded), out, atol=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "gru", "attention"])
def test_sequence_encoders_see_order_that_the_mean_cannot(kind):
    order = histories([[2, 3, 4, 5], [5, 4, 3, 2]])
    assert torch.allclose(behaviour_tower("mlp")(order)[0], behaviour_tower("mlp")(order)[1], atol=1e-6)
    out = behaviour_tower(kind)(order)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_normalized_towers_score_cosine_over_temperature():
    torch.manual_seed(0)
    user = EmbeddingMLPTower({"user_id": 10}, {}, 8, [16], 5, normalize=True, temperature=0.05).eval()
    out = user({"user_id": torch.tensor([2, 3])})
    assert torch.allclose((out * out).sum(-1), torch.full((2,), 1 / 0.05))


def test_unknown_user_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="mlp, cnn, gru, attention"):
        behaviour_tower("lstm")


@pytest.mark.parametrize("kind", ENCODERS)
def test_a_stored_encoder_rebuilds_from_its_kind_and_a_misspelled_option_is_named(kind):
    from adrec.models.components import ConfigError
    from adrec.models.sequence import ENCODERS as OPTIONS
    from adrec.models.sequence import encoder_options

    options = OPTIONS[kind]()
    assert options.kind == kind and encoder_options(options.describe()) == options
    with pytest.raises(ConfigError, match=r"encoder\.head is not an option of adrec\.models\.sequence\.\w+EncoderOptions"):
        encoder_options({**options.describe(), "head": 4})


def test_every_component_a_config_may_name_exists_and_every_encoder_is_one():
    import importlib

    from adrec.models.components import COMPONENTS, target_of
    from adrec.models.sequence import ENCODERS as OPTIONS

    for target in COMPONENTS:
        module, _, name = target.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), target
    assert {target_of(options) for options in OPTIONS.values()} <= set(COMPONENTS)


def ranker_inputs(b: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "ad_id": torch.randint(2, 9, (b,)),
        "category": torch.randint(2, 5, (b,)),
        "device": torch.randint(2, 4, (b,)),
        "history": torch.randint(2, 9, (b, 5)),
        "history_category": torch.randint(2, 5, (b, 5)),
        "tokens": torch.randint(0, 6, (b, 3)),
        "price": torch.rand(b),
    }


def test_dcn_ranker_attends_over_history_with_the_candidates_tables():
    from adrec.models.ranker import DCNRanker

    torch.manual_seed(0)
    model = DCNRanker(
        {"ad_id": 9, "category": 5, "device": 4},
        {"tokens": 6},
        ["price"],
        {"history": "ad_id", "history_category": "category"},
        8,
        2,
        [16],
        wide=True,
        dropout=0.1,
    ).eval()
    torch.nn.init.normal_(model.deep[-1].weight)  # beside the wide part the deep part starts at zero
    batch = ranker_inputs()
    logits = model(batch)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    # An empty history is finite, and the attention depends on which ads were clicked.
    empty = {**batch, "history": torch.zeros(4, 5, dtype=torch.long), "history_category": torch.zeros(4, 5, dtype=torch.long)}
    assert torch.isfinite(model(empty)).all() and not torch.allclose(model(empty), logits)
    # No separate history tables: clicked ads are embedded with the candidate's own tables.
    assert not any("history" in name for name, _ in model.named_parameters())
