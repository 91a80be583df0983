"""Preparation of logs the project has never seen: CSV with its own column names, Criteo and
MovieLens formats (fixtures written here, in the real files' formats), bad rows and bad files."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from adrec.data import prepare
from adrec.features import FeatureMap
from tests.conftest import CONF

pytestmark = pytest.mark.slow

GOOD_ROWS = 300
# Planted bad lines of a CSV log, each with the reason preparation must give it.
BAD_LINES = [
    ("e-bad1,,cr-1,2026-01-05T10:00:00,1,camp,3.5,blue shoes", "missing_user_id"),
    ("e-bad2,alice-1,cr-1,yesterday,0,camp,3.5,blue shoes", "bad_ts"),
    ("e-bad3,alice-1,cr-1,2026-01-05T10:00:00,yes,camp,3.5,blue shoes", "bad_label"),
    ("e-bad4,alice-1,cr-1,2026-01-05T10:00:00,0,camp,nan,blue shoes", "nonfinite_price"),
    ("e-bad5,alice-1,cr-1,2026-01-05T10:00:00,0,camp,cheap,blue shoes", "bad_price"),
    (f"e-bad6,alice-1,cr-1,2026-01-05T10:00:00,0,{'c' * 2000},1,blue shoes", "oversized_campaign"),
    ("e-bad7,alice-1,cr-1,2026-01-05T10:00:00,0,camp,1,blue,shoes,extra", "malformed_row"),
    ("e0,alice-0,cr-0,2026-01-05T10:00:00,0,camp,1,replayed row", "duplicate_event_id"),
]

SHORT_YAML = """defaults: [generic, _self_]
events: {{path: {path}, columns: {{event_id: eid, user_id: uid, ad_id: creative, ts: when, label: clicked}}, features: {{campaign: {{}}, price: {{kind: numeric, log1p: true, quantiles: 4}}, query: {{kind: text, group: user}}}}}}
"""


def compose_data(tmp_path: Path, *overrides: str, searchpath: Path | None = None):
    extra = [f"hydra.searchpath=[file://{searchpath}]"] if searchpath else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"run_dir={tmp_path / 'run'}", *extra, *overrides])


def write_csv_log(path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    lines = ["eid,uid,creative,when,clicked,campaign,price,query"]
    users = []
    for i in range(GOOD_ROWS):
        user = f"alice-{i % 20}"
        users.append(user)
        day, minute = 5 + i // 60, i % 60
        lines.append(
            f"e{i},{user},cr-{rng.integers(0, 15)},2026-01-{day:02d}T10:{minute:02d}:00,{int(rng.random() < 0.3)},"
            f"camp-{i % 3},{rng.integers(1, 500)},red shoes {i % 7}"
        )
    lines += [line for line, _ in BAD_LINES]
    path.write_text("\n".join(lines) + "\n")
    return users


def all_strings(directory: Path) -> str:
    """Every string value in the Parquet and JSON files under ``directory``, as one text."""
    parts = [p.read_text() for p in directory.rglob("*.json")]
    for file in directory.rglob("*.parquet"):
        table = pq.read_table(file)
        parts += [str(table[c].to_pylist()) for c in table.column_names]
    return "\n".join(parts)


def test_a_short_yaml_prepares_a_csv_log_never_seen_before(ray_session, tmp_path):
    users = write_csv_log(tmp_path / "clicks.csv")
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "shop.yaml").write_text(SHORT_YAML.format(path=tmp_path / "clicks.csv"))
    cfg = compose_data(tmp_path, "data=shop", "data.pseudonymize=true", "data.pseudonym_key=test-key", searchpath=tmp_path / "conf")
    report = prepare.run(cfg)

    assert report["quarantined_by_reason"] == {reason: 1 for _, reason in BAD_LINES}
    assert report["rows_read"] == GOOD_ROWS + len(BAD_LINES) == report["rows_kept"] + report["rows_quarantined"]
    assert sum(s["examples"] for s in report["splits"].values()) == GOOD_ROWS  # every good row kept
    out = Path(cfg.paths.prepared_dir)
    fm = FeatureMap.load(out / "feature_map.json")
    assert {"user_id", "ad_id", "history", "campaign", "price", "price_q", "query"} <= {f.name for f in fm.features}
    assert fm.spec("query").group == "user" and fm.spec("price").kind == "dense"
    train = pq.read_table(out / "train")
    assert train["query"].type.shape == (16,) and train.num_rows == report["splits"]["train"]["examples"]
    # Pseudonymised at ingestion: no raw user id in any artifact, quarantine included.
    written = all_strings(out)
    assert not any(user in written for user in set(users))
    assert "alice-" not in (out / "feature_map.json").read_text()


def test_a_garbage_file_is_named(ray_session, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    write_csv_log(logs / "a.csv")
    (logs / "b.csv").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "shop.yaml").write_text(SHORT_YAML.format(path=logs))
    cfg = compose_data(tmp_path, "data=shop", searchpath=tmp_path / "conf")
    with pytest.raises(ValueError, match="b.csv holds binary data"):
        prepare.run(cfg)


def test_a_truncated_parquet_file_is_named(ray_session, tmp_path):
    cfg = compose_data(tmp_path, "data.events.path=" + str(tmp_path / "events"))
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "part-0.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(ValueError, match="part-0.parquet is not a readable Parquet file"):
        prepare.run(cfg)


def test_a_mapping_to_a_missing_column_says_which(ray_session, tmp_path):
    write_csv_log(tmp_path / "clicks.csv")
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "shop.yaml").write_text(SHORT_YAML.format(path=tmp_path / "clicks.csv"))
    cfg = compose_data(tmp_path, "data=shop", "data.events.columns.ad_id=creative_id", searchpath=tmp_path / "conf")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['creative_id'\]"):
        prepare.run(cfg)


def write_criteo(path: Path, rows: int) -> None:
    """Rows in the Criteo DAC format: label, 13 ints, 26 hex hashes, tab-separated, empty fields allowed."""
    rng = np.random.default_rng(1)
    lines = []
    for _ in range(rows):
        ints = ["" if rng.random() < 0.2 else str(rng.integers(-2, 1000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.integers(0, 40):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.25)), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")


def test_criteo_format(ray_session, tmp_path):
    write_criteo(tmp_path / "train.tsv", 400)
    cfg = compose_data(tmp_path, "data=criteo", f"data.path={tmp_path / 'train.tsv'}")
    report = prepare.run(cfg)
    assert report["rows_read"] == report["rows_kept"] == 400
    assert sum(s["examples"] for s in report["splits"].values()) == 400
    fm = FeatureMap.load(Path(cfg.paths.prepared_dir) / "feature_map.json")
    kinds = [f.kind for f in fm.features]
    assert kinds.count("dense") == 13 and kinds.count("bucket") == 13 and kinds.count("categorical") == 26
    assert all(len(f.boundaries) >= 1 for f in fm.features if f.kind == "bucket")


def write_movielens(directory: Path) -> None:
    """u.data, u.item and u.user in MovieLens 100K's formats (u.item is latin-1)."""
    rng = np.random.default_rng(2)
    directory.mkdir()
    ratings = [
        f"{u}\t{m}\t{rng.integers(1, 6)}\t{880000000 + 1000 * i}"
        for i, (u, m) in enumerate((u, m) for u in range(1, 21) for m in rng.choice(np.arange(1, 31), 12, replace=False))
    ]
    (directory / "u.data").write_text("\n".join(ratings) + "\n")
    items = [f"{m}|Film {m} (199{m % 10})|01-Jan-199{m % 10}||http://x|" + "|".join(str(int(g == m % 19)) for g in range(19)) for m in range(1, 31)]
    items[0] = items[0].replace("Film 1", "Amélie")
    (directory / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    users = [f"{u}|{20 + u}|{'MF'[u % 2]}|student|{10000 + u}" for u in range(1, 21)]
    (directory / "u.user").write_text("\n".join(users) + "\n")


def test_movielens_format_with_per_user_split(ray_session, tmp_path):
    write_movielens(tmp_path / "ml")
    cfg = compose_data(tmp_path, "data=movielens", f"data.path={tmp_path / 'ml'}")
    report = prepare.run(cfg)
    assert report["rows_read"] == report["rows_kept"] == 240
    assert report["side_tables"]["ads"]["rows_read"] == 30 and report["side_tables"]["users"]["rows_read"] == 20
    out = Path(cfg.paths.prepared_dir)
    ratings = np.loadtxt(tmp_path / "ml" / "u.data", dtype=int)
    assert sum(s["clicks"] for s in report["splits"].values()) == int((ratings[:, 2] >= 4).sum())
    sizes = {s: pq.read_table(out / s, columns=["user_id"])["user_id"].to_numpy() for s in ("train", "validation", "test")}
    for user in np.unique(sizes["train"]):
        # 12 ratings a user: 80/10/10 by user gives 9-10 / 1-2 / 1 of them.
        assert (sizes["train"] == user).sum() >= 9 and (sizes["test"] == user).sum() >= 1
    ads = pq.read_table(out / "ads.parquet")
    assert ads.num_rows == 30 and "title" in ads.column_names
    assert json.loads((out / "report.json").read_text())["split"]["kind"] == "per_user_random"
