"""A synthetic click log in the Avazu CTR format (not Avazu data), with a planted click model.

``make_log(rows, seed)`` builds it, ``write_csv`` writes it (benchmarks/make_avazu_like.py is the
command line). The table has Avazu's header and value shapes
    id, click, hour (YYMMDDHH), C1, banner_pos, site_id, site_domain, site_category, app_id,
    app_domain, app_category, device_id, device_ip, device_model, device_type, device_conn_type,
    C14..C21
and ``make_log`` also returns each row's planted click probability (its AUC is the best any model
can reach on the log). What makes it Avazu-like rather than uniform noise:
  - ids (sites, apps, ad creatives C14, device models, IPs) drawn with power-law (Zipf-like)
    frequencies, so a few are frequent and most are seen once or twice (rare ids, as in Avazu);
  - a row is either site traffic or app traffic; the other side holds one placeholder id;
  - device_id is one placeholder for most rows and a unique id otherwise, device_ip mostly unique;
  - C17 is the creative's group and C15/C16 its banner size, so those columns depend on C14.
The click model is logistic: a base rate (CTR about 0.17, Avazu's), a per-site or per-app
effect, a per-creative (C14) effect, banner position, hour of day, device type and
connection, and one interaction (site category x banner height) that a linear model on one-hot
columns cannot express. Everything else carries no signal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

COLUMNS = [
    "id",
    "click",
    "hour",
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    *[f"C{i}" for i in range(14, 22)],
]
BASE_LOGIT = -2.2  # with the effects below, a CTR near Avazu's 0.17
SIZES = np.array([[320, 50], [300, 250], [216, 36], [728, 90], [320, 480], [468, 60]])


def hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) distinct 8-hex-digit strings, like Avazu's hashed ids."""
    values = rng.choice(16**8, size=n, replace=False)
    return np.array([f"{v:08x}" for v in values])


def row_ids(rng: np.random.Generator, rows: int) -> np.ndarray:
    """(rows,) distinct uint64 ids of 19-20 digits, as Avazu's ``id`` column holds."""
    ids = np.unique(rng.integers(10**18, 10**19, size=rows + rows // 100 + 8, dtype=np.uint64))
    return rng.permutation(ids)[:rows]


def zipf_index(rng: np.random.Generator, rows: int, size: int, exponent: float) -> np.ndarray:
    """(rows,) indices into ``size`` items with P(rank k) ~ 1 / k**exponent: a few frequent, a long rare tail."""
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    return rng.choice(size, size=rows, p=weights / weights.sum())


def categorical(rng: np.random.Generator, rows: int, values: list, shares: list[float]) -> np.ndarray:
    """(rows,) draws of ``values`` with the given shares."""
    shares = np.asarray(shares, float)
    return np.asarray(values)[rng.choice(len(values), size=rows, p=shares / shares.sum())]


def hours(rng: np.random.Generator, rows: int, days: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows,) YYMMDDHH ints from 2014-10-21 on (Avazu's first day), and their hour of day (rows,),
    with more traffic in the daytime."""
    day = rng.integers(0, days, rows)
    weights = 1.0 + 0.6 * np.sin((np.arange(24) - 6) / 24 * 2 * np.pi)
    hour = rng.choice(24, size=rows, p=weights / weights.sum())
    dates = np.datetime64("2014-10-21") + day  # datetime64[D]
    years = dates.astype("datetime64[Y]")
    months = dates.astype("datetime64[M]")
    yymmdd = (years.astype(int) + 1970) % 100 * 10000 + (months - years).astype(int) * 100 + 100 + (dates - months).astype(int) + 1
    return yymmdd.astype(np.int64) * 100 + hour, hour


def placements(rng: np.random.Generator, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """site_* and app_* columns, each row's publisher effect on the click logit (rows,), and the
    index of its site's or app's category (rows,).

    A row is app traffic (35%) or site traffic; the other side's three columns hold placeholders."""
    n_sites, n_apps, n_categories = max(rows // 10, 50), max(rows // 25, 30), 20
    site_ids, app_ids = hex_ids(rng, n_sites), hex_ids(rng, n_apps)
    site_domains, app_domains = hex_ids(rng, n_sites // 3 + 1), hex_ids(rng, n_apps // 2 + 1)
    categories = hex_ids(rng, n_categories)
    site_domain_of = rng.integers(0, len(site_domains), n_sites)
    app_domain_of = rng.integers(0, len(app_domains), n_apps)
    site_category_of, app_category_of = zipf_index(rng, n_sites, n_categories, 1.2), zipf_index(rng, n_apps, n_categories, 1.2)
    site_effect, app_effect = rng.normal(0, 0.6, n_sites), rng.normal(0, 0.6, n_apps)
    placeholder = hex_ids(rng, 6)  # site_id, site_domain, site_category of app rows; app_* of site rows

    is_app = rng.random(rows) < 0.35
    site = zipf_index(rng, rows, n_sites, 1.05)
    app = zipf_index(rng, rows, n_apps, 1.1)
    columns = {
        "site_id": np.where(is_app, placeholder[0], site_ids[site]),
        "site_domain": np.where(is_app, placeholder[1], site_domains[site_domain_of[site]]),
        "site_category": np.where(is_app, placeholder[2], categories[site_category_of[site]]),
        "app_id": np.where(is_app, app_ids[app], placeholder[3]),
        "app_domain": np.where(is_app, app_domains[app_domain_of[app]], placeholder[4]),
        "app_category": np.where(is_app, categories[app_category_of[app]], placeholder[5]),
    }
    category = np.where(is_app, app_category_of[app], site_category_of[site])
    return columns, np.where(is_app, app_effect[app], site_effect[site]), category


def devices(rng: np.random.Generator, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """device_* columns and their effect on the click logit (rows,)."""
    unique = hex_ids(rng, rows + 1)
    models = hex_ids(rng, max(rows // 8, 20))
    ips = hex_ids(rng, rows)
    device_type = categorical(rng, rows, [1, 0, 4, 5], [0.92, 0.05, 0.02, 0.01])
    conn = categorical(rng, rows, [0, 2, 3, 5], [0.86, 0.08, 0.05, 0.01])
    columns = {
        "device_id": np.where(rng.random(rows) < 0.82, unique[-1], unique[:rows]),  # one placeholder, else unique
        "device_ip": ips[zipf_index(rng, rows, len(ips), 0.6)],  # mostly seen once
        "device_model": models[zipf_index(rng, rows, len(models), 1.0)],
        "device_type": device_type,
        "device_conn_type": conn,
    }
    effect = np.select([device_type == 0, device_type >= 4], [0.5, -0.4], 0.0) + np.select([conn == 2, conn == 3], [-0.3, -0.6], 0.0)
    return columns, effect


def creatives(rng: np.random.Generator, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """C14..C21 (the ad creative and its attributes), the creative's logit effect, and its banner height."""
    n_creatives = max(rows // 20, 40)
    c14_values = rng.choice(np.arange(300, 24000), size=n_creatives, replace=False)
    size_of = categorical(rng, n_creatives, list(range(len(SIZES))), [0.6, 0.2, 0.08, 0.06, 0.04, 0.02]).astype(int)
    group_of = rng.integers(0, max(n_creatives // 4, 5), n_creatives)
    effect_of = rng.normal(0, 0.5, n_creatives)
    creative = zipf_index(rng, rows, n_creatives, 1.0)
    columns = {
        "C14": c14_values[creative],
        "C15": SIZES[size_of[creative], 0],
        "C16": SIZES[size_of[creative], 1],
        "C17": 100 + group_of[creative] * 7,
        "C18": categorical(rng, rows, [0, 1, 2, 3], [0.42, 0.1, 0.18, 0.3]),
        "C19": categorical(rng, rows, [35, 39, 161, 297, 1071], [0.4, 0.2, 0.15, 0.15, 0.1]),
        "C20": np.where(rng.random(rows) < 0.47, -1, 100000 + rng.integers(0, 200, rows)),
        "C21": categorical(rng, rows, [23, 79, 117, 157, 221], [0.3, 0.25, 0.2, 0.15, 0.1]),
    }
    return columns, effect_of[creative], columns["C16"]


def make_log(rows: int, seed: int = 0, days: int = 10) -> tuple[pa.Table, np.ndarray]:
    """(the log in Avazu's columns, the planted click probability of each row (rows,))."""
    rng = np.random.default_rng(seed)
    hour, hour_of_day = hours(rng, rows, days)
    sites, publisher_effect, category = placements(rng, rows)
    device_columns, device_effect = devices(rng, rows)
    creative_columns, creative_effect, height = creatives(rng, rows)
    banner_pos = categorical(rng, rows, [0, 1, 2, 4, 5, 7], [0.72, 0.26, 0.005, 0.005, 0.005, 0.005])
    # The interaction: tall banners (>= 250 px) lift the even categories and sink the odd ones.
    interaction = np.where(height >= 250, np.where(category % 2 == 0, 0.8, -0.8), 0.0)
    logit = (
        BASE_LOGIT
        + publisher_effect
        + creative_effect
        + device_effect
        + interaction
        + np.where(banner_pos == 1, 0.35, 0.0)
        + 0.25 * np.sin((hour_of_day - 9) / 24 * 2 * np.pi)
    )
    probability = 1.0 / (1.0 + np.exp(-logit))
    columns = {
        "id": row_ids(rng, rows),
        "click": (rng.random(rows) < probability).astype(int),
        "hour": hour,
        "C1": categorical(rng, rows, [1005, 1002, 1010, 1012, 1007, 1001, 1008], [0.92, 0.055, 0.02, 0.003, 0.001, 0.0005, 0.0005]),
        "banner_pos": banner_pos,
        **sites,
        **device_columns,
        **creative_columns,
    }
    return pa.table({name: columns[name] for name in COLUMNS}), probability


def write_csv(table: pa.Table, path: str | Path) -> None:
    """``table`` as a CSV with a header line and no quoting, as Avazu's train.csv is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write((",".join(table.column_names) + "\n").encode())  # pyarrow would quote the header's names
        pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style="none"))
