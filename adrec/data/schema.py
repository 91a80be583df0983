"""The three tables of the synthetic log (the README's schema): behaviour log, ad catalog, user profiles.

Other logs are mapped onto adrec's roles by configuration (see adrec.data.sources and conf/data/).

A behaviour log has one row per event. Clicks and conversions name the impression
they follow in ``impression_id``, the way ad servers stamp a click URL with the
impression that produced it; that is how labels are joined without guessing. Its
context columns are the log's own: ``events_schema`` builds the table for any of them
(compaction writes feedback with it); ``EVENTS`` is the synthetic log's.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

EVENT_TYPES = ("impression", "click", "conversion")

TIMESTAMP = pa.timestamp("ms", tz="UTC")

# adrec's roles of a behaviour-log row; a log's context columns follow them.
ROLE_FIELDS = (
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("ts", TIMESTAMP, nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("ad_id", pa.string(), nullable=False),
    pa.field("event", pa.string(), nullable=False),
    # The impression a click or conversion follows; null on impressions.
    pa.field("impression_id", pa.string()),
)
# Synthetic logs only: the generator's true click probability of an impression (null elsewhere).
TRUE_PCTR = pa.field("true_pctr", pa.float32())


def events_schema(context_columns: Sequence[str]) -> pa.Schema:
    """A behaviour log whose page views have ``context_columns`` (the data config's event
    features of group context, in order), as strings: raw values, as a request states them."""
    taken = {f.name for f in ROLE_FIELDS} | {TRUE_PCTR.name}
    clashes = [c for c in context_columns if c in taken]
    if clashes or len(set(context_columns)) != len(context_columns):
        raise ValueError(
            f"context columns {list(context_columns)} repeat one or clash with the log's own columns {sorted(taken)}: rename the feature"
        )
    return pa.schema([*ROLE_FIELDS, *(pa.field(c, pa.string()) for c in context_columns), TRUE_PCTR])


SYNTHETIC_CONTEXT = ("slot", "device")  # what adrec.data.synthetic generates; conf/data/synthetic.yaml declares them
EVENTS = events_schema(SYNTHETIC_CONTEXT)

ADS = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("advertiser_id", pa.string()),
        pa.field("campaign_id", pa.string()),
        pa.field("category", pa.string()),
        pa.field("bid", pa.float32()),
        pa.field("tokens", pa.list_(pa.string())),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("age_bucket", pa.string()),
        pa.field("gender", pa.string()),
        pa.field("region", pa.string()),
    ]
)


def check_columns(names: list[str], required: list[str] | tuple[str, ...], what: str) -> None:
    """Raise a ValueError naming every required column missing from ``names``."""
    missing = [name for name in required if name not in names]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(names)}. Rename the columns in the source or fix the data path.")
