"""The ranker's wide part is a logistic regression, the deep part starts at zero beside it, and an
Avazu-format CSV prepares and builds the ranker through its YAML alone."""

import contextlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adrec.data import prepare
from adrec.data.avazu_like import COLUMNS, make_log, write_csv
from adrec.data.options import DataOptions
from adrec.features import FeatureMap
from adrec.inference import to_features
from adrec.models import build_model
from adrec.models.components import ConfigError
from adrec.models.ranker import DCNRanker
from tests.conftest import CONF

CATEGORICAL = {"site": 6, "device": 4}


def batch(rows: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "site": torch.randint(1, 6, (rows,), generator=g),
        "device": torch.randint(1, 4, (rows,), generator=g),
        "price": torch.rand(rows, generator=g),
    }


def ranker(**options) -> DCNRanker:
    return DCNRanker(CATEGORICAL, {}, ["price"], {}, 8, 2, [16], **{"wide": True, "dropout": 0.0, **options})


def one_hot_design(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 6 + 4 + 1): one column per categorical value, then the dense value."""
    parts = [torch.nn.functional.one_hot(features[n], c).float() for n, c in CATEGORICAL.items()]
    return torch.cat([*parts, features["price"].unsqueeze(-1)], dim=-1)


def test_at_initialisation_the_ranker_is_the_logistic_regression_it_contains():
    torch.manual_seed(0)
    model = ranker().eval()
    features = batch()
    coef = torch.randn(6 + 4 + 1)
    with torch.no_grad():  # give the wide part a logistic regression's weights: x . coef + b
        model.wide.tables["site"].weight.copy_(coef[:6, None])
        model.wide.tables["device"].weight.copy_(coef[6:10, None])
        model.wide.dense.weight.copy_(coef[None, 10:])
        model.wide.bias.fill_(-1.5)
    model.wide.tables["site"].weight.data[0] = 0.0  # PAD never occurs in a categorical input
    expected = one_hot_design(features) @ torch.cat([model.wide.tables["site"].weight[:, 0], coef[6:]]).detach() - 1.5
    assert torch.allclose(model(features), expected, atol=1e-5)  # the deep part adds exactly nothing yet
    assert torch.allclose(model.wide(features), expected, atol=1e-5)
    # ...and it does learn: one step moves the deep part's output off zero.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.nn.functional.binary_cross_entropy_with_logits(model.train()(features), torch.ones(64)).backward()
    optimizer.step()
    assert not torch.allclose(model.eval()(features), expected, atol=1e-4)


def test_the_wide_part_alone_fits_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    features = batch(rows=400, seed=1)
    truth = torch.tensor([0.0, 0.8, -0.5, 0.3, -1.0, 0.6, 0.0, 0.4, -0.4, 0.2, 1.0])
    labels = torch.bernoulli(torch.sigmoid(one_hot_design(features) @ truth - 0.5), generator=torch.Generator().manual_seed(2))
    c = 0.5
    model = ranker(deep=False, wide_l2=1 / (2 * c), training_rows=400)
    assert not any(name.startswith(("cross", "deep", "embeddings")) for name, _ in model.named_parameters())
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(features), labels) + model.regularization()
        loss.backward()
        return loss

    optimizer.step(objective)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(one_hot_design(features).numpy(), labels.numpy())
    ours = model(features).detach().numpy()
    assert np.allclose(ours, reference.decision_function(one_hot_design(features).numpy()), atol=2e-3)


def test_a_ranker_with_neither_part_or_a_misspelled_option_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="wide, deep or both"):
        ranker(wide=False, deep=False)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path}", "experiment=avazu", "data.path=/x.csv", "+model.wide_l3=1.0"])
    options = DataOptions.parse(cfg.data)
    fm = FeatureMap([], {})
    with pytest.raises(ConfigError, match=r"model\.wide_l3 is not an option .*did you mean model\.wide_l2"):
        build_model(cfg.model, fm)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        typo = compose(
            "config", overrides=[f"run_dir={tmp_path}", "experiment=avazu", "data.path=/x.csv", "+data.events.features.site_id.min_cout=3"]
        )
    with pytest.raises(ValueError, match=r"data\.events\.features\.site_id: unknown option 'min_cout' \(did you mean 'min_count'\?\)"):
        DataOptions.parse(typo.data)
    assert set(options.features) == set(COLUMNS) - {"id", "click"}  # every column but the id and the label is a feature


def test_an_avazu_format_csv_prepares_and_builds_the_ranker_through_its_yaml(tmp_path, ray_session):
    table, _ = make_log(600, seed=3)
    write_csv(table, tmp_path / "avazu.csv")
    overrides = [f"run_dir={tmp_path}", "experiment=avazu", f"data.path={tmp_path / 'avazu.csv'}", "+data.events.features.device_ip.min_count=1000"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    out = tmp_path / "prepared"
    report = prepare.prepare(OmegaConf.to_container(cfg.data, resolve=True), out, seed=0)
    assert report.rows_kept == 600 and sum(s["examples"] for s in report.splits.values()) == 600
    fm = FeatureMap.load(out / "feature_map.json")
    # Per-feature min_count: no device_ip is seen 1000 times, while the frequent columns keep their values.
    assert fm.vocabularies["device_ip"].values == [] and len(fm.vocabularies["site_category"].values) > 3
    model, _ = build_model(cfg.model, fm)
    rows = pq.read_table(out / "train")
    logits = model.eval()(to_features(rows, model.feature_names))
    assert logits.shape == (rows.num_rows,) and torch.isfinite(logits).all()


def test_training_steps_add_the_wide_parts_l2_and_it_shrinks_the_logistic_regression():
    from adrec.train.loop import regularization, train_step
    from adrec.train.optim import build_optimizer

    features, labels = batch(rows=256, seed=4), torch.bernoulli(torch.full((256,), 0.3), generator=torch.Generator().manual_seed(5))

    def bce(model, rows):
        logits = model(rows)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels), logits

    norms = {}
    for l2 in (0.0, 50.0):
        torch.manual_seed(0)
        model = ranker(deep=False, wide_l2=l2, training_rows=256)
        optimizer = build_optimizer(model, lr=0.05, weight_decay=0.0)
        for _ in range(60):
            train_step(model, features, optimizer, bce, contextlib.nullcontext)
        norms[l2] = float(model.wide.squared_norm().detach())
        assert float(regularization(model).detach()) == pytest.approx(l2 / 256 * norms[l2])
    assert norms[50.0] < 0.5 * norms[0.0]
    assert regularization(torch.nn.Linear(2, 1)) == 0.0  # a model without a penalty adds nothing


def test_an_exported_ranker_of_another_layout_is_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file

    from adrec.registry import ArtifactError, load_ranker, save_ranker

    model = ranker().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    save_ranker(model, tmp_path)
    assert torch.allclose(load_ranker(tmp_path)(batch()), model(batch()))  # the round trip holds
    linear_only = ranker(deep=False)  # weights of another layout beside this config

    save_file(linear_only.state_dict(), tmp_path / "ranker.safetensors")
    with pytest.raises(ArtifactError, match=r"ranker\.safetensors does not fit this adrec version's DCNRanker .*re-export the model"):
        load_ranker(tmp_path)


def test_ids_rarer_than_deep_min_count_read_the_oov_row_of_a_full_size_table():
    torch.manual_seed(0)
    model = ranker(deep_rows={"site": 3}).eval()
    assert model.embeddings["site"].num_embeddings == CATEGORICAL["site"]  # grow-only warm starts load every row
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    rows = batch(rows=3)
    rare, oov, kept = ({**rows, "site": torch.full((3,), site)} for site in (4, 1, 2))
    assert torch.allclose(model._deep_logit(rare), model._deep_logit(oov))  # id 4 >= 3 rows: OOV in the deep part
    assert not torch.allclose(model._deep_logit(kept), model._deep_logit(oov))
    assert not torch.allclose(model.wide(rare), model.wide(oov))  # the wide part keeps every id
