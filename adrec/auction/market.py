"""The ad auction: duplicates, targeting, budgets and frequency caps filter a shortlist; eCPM ranks it.

Serve retrieves ~100 candidate ads per page view and the ranker gives each a calibrated pCTR;
``Marketplace.run`` then picks the ads shown and records them in the same call. All state
(campaign spend, recent impressions) lives in one ``Marketplace``, which Serve wraps in one
named Ray actor (``ray.remote(Marketplace)``): the actor runs its methods one at a time, which
is what keeps budgets and caps correct however many replicas call it. The class itself takes
no locks, so it is not thread-safe on its own. Arguments and results are plain picklable data.

Money is in the bid's currency. eCPM is expected revenue per thousand impressions,
``1000 * pctr * bid`` for a cost-per-click bid.
"""

from __future__ import annotations

import math
import numbers
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

# The order rules are checked in; a candidate removed by several is counted under the first.
RULES = ("duplicate", "targeting", "budget", "frequency_cap")
CHARGE_MODES = ("expected_cpc", "none")


def check_number(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number in [low, high]."""
    # numbers.Real also admits numpy scalars, which is what a ranker hands over.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


@dataclass(frozen=True)
class Candidate:
    """One shortlisted ad. ``bid`` is cost per click; ``pctr`` a calibrated click probability;
    ``attributes`` the ad's own values for targeting keys, for example {"category": "cat3"}.

    Checked on construction, so an invalid candidate fails in the caller, before it reaches the actor.
    """

    ad_id: str
    campaign_id: str
    bid: float
    pctr: float
    attributes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number(f"bid of ad {self.ad_id!r}", self.bid, low=0.0)
        check_number(f"pctr of ad {self.ad_id!r}", self.pctr, low=0.0, high=1.0)

    @property
    def expected_cpi(self) -> float:
        """Expected cost per impression, pctr * bid: what the auction ranks on and charges."""
        return float(self.pctr) * float(self.bid)


@dataclass
class Campaign:
    """An advertiser's budget and targeting. ``targeting`` maps a key to its allowed values;
    a key that is absent is not restricted. ``budget`` None is unlimited."""

    campaign_id: str
    budget: float | None = None
    spend: float = 0.0
    targeting: dict[str, frozenset[str]] = field(default_factory=dict)

    def exhausted(self) -> bool:
        return self.budget is not None and self.spend >= self.budget

    def admits(self, request: Mapping[str, str], attributes: Mapping[str, str]) -> bool:
        """True when every restricted key is met by the request or by the ad; a missing value fails."""
        return all(request.get(key) in allowed or attributes.get(key) in allowed for key, allowed in self.targeting.items())


@dataclass
class Winner:
    """A shown ad. ``ecpm`` is expected revenue per thousand impressions, 1000 * pctr * bid."""

    ad_id: str
    campaign_id: str
    pctr: float
    bid: float
    ecpm: float
    propensity: float = 1.0  # probability this ad was chosen for its slot: the IPS weight's denominator


@dataclass
class AuctionResult:
    """``ads``: best eCPM first, at most k. ``removed``: every rule in ``RULES`` -> candidates it
    removed. The candidates neither removed nor shown lost on eCPM."""

    ads: list[Winner]
    candidates: int
    removed: dict[str, int]


@dataclass(frozen=True)
class FrequencyCap:
    """At most ``max_impressions`` of one ad to one user within any ``window_s`` seconds."""

    max_impressions: int
    window_s: float

    def __post_init__(self) -> None:
        if isinstance(self.max_impressions, bool) or not isinstance(self.max_impressions, int) or self.max_impressions < 1:
            raise ValueError(f"max_impressions must be an integer >= 1, got {self.max_impressions!r}")
        check_number("window_s", self.window_s, low=0.0)
        if self.window_s == 0:
            raise ValueError("window_s must be > 0")


class ImpressionLog:
    """Recent impression times per (user_key, ad_id), bounded in memory.

    Each pair keeps a deque of at most ``max_impressions`` times, oldest first, so checking or
    recording one pair is O(max_impressions) and an auction is O(candidates). Expired times are
    pruned when a pair is looked at; pairs nobody looks at again are dropped by ``sweep``, run
    every ``sweep_every`` auctions and whenever the table outgrows its threshold.

    Times are assumed non-decreasing. If the clock steps back, an expired time can sit behind a
    live one for a while and be counted: the cap gets stricter for a moment, never looser.
    """

    def __init__(self, cap: FrequencyCap, sweep_every: int, sweep_size: int) -> None:
        self.cap = cap
        self.times: dict[tuple[str, str], deque[float]] = {}
        self.sweep_every = sweep_every
        self.sweep_size = sweep_size
        self.next_sweep_size = sweep_size
        self.auctions = 0

    def count(self, pair: tuple[str, str], now: float) -> int:
        """Impressions of the pair in (now - window_s, now]; prunes the ones before."""
        times = self.times.get(pair)
        if times is None:
            return 0
        cutoff = now - self.cap.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self.times[pair]
        return len(times)

    def capped(self, pair: tuple[str, str], now: float) -> bool:
        return self.count(pair, now) >= self.cap.max_impressions

    def record(self, pair: tuple[str, str], now: float) -> None:
        # maxlen is only a backstop: a capped pair never wins, so it is never appended to.
        self.times.setdefault(pair, deque(maxlen=self.cap.max_impressions)).append(now)

    def after_auction(self, now: float) -> None:
        self.auctions += 1
        if self.auctions % self.sweep_every == 0 or len(self.times) > self.next_sweep_size:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Drops every pair whose latest impression has left the window."""
        cutoff = now - self.cap.window_s
        # A new dict rather than deletions: a Python dict never shrinks its table on delete.
        self.times = {pair: times for pair, times in self.times.items() if times[-1] > cutoff}
        # When most pairs are live, a fixed threshold would sweep on every auction; doubling keeps
        # sweeping amortised O(1) per recorded impression.
        self.next_sweep_size = max(self.sweep_size, 2 * len(self.times))


def parse_targeting(targeting: Mapping[str, Collection[str]]) -> dict[str, frozenset[str]]:
    """{"device": ["mobile"]} -> {"device": frozenset({"mobile"})}; ValueError on anything else."""
    if not isinstance(targeting, Mapping):
        raise ValueError(f"targeting must map a key to a list of allowed values, got {targeting!r}")
    parsed = {}
    for key, values in targeting.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"targeting keys must be non-empty strings, got {key!r}")
        # A bare string is a collection too, of characters: almost certainly a missing [ ].
        if isinstance(values, (str, bytes)) or not isinstance(values, Collection):
            raise ValueError(f"targeting[{key!r}] must be a list of strings, got {values!r}")
        if not values:
            raise ValueError(f"targeting[{key!r}] is empty and would match nothing; leave the key out for no restriction")
        if not all(isinstance(value, str) for value in values):
            raise ValueError(f"targeting[{key!r}] must hold only strings, got {list(values)!r}")
        parsed[key] = frozenset(values)
    return parsed


def copy_campaign(campaign: Campaign) -> Campaign:
    """A copy the caller may change without changing the marketplace (in-process use has no pickling to copy)."""
    return replace(campaign, targeting=dict(campaign.targeting))


class Marketplace:
    """All auction state: campaigns with their spend, and recent impressions per (user_key, ad_id).

    ``charge_per_impression``: "expected_cpc" charges each winner's campaign pctr * bid when it is
    shown; "none" charges nothing, for when real click costs arrive through ``charge``. Either
    way a budget is checked before each impression, so spend can pass it by at most one
    impression's charge (or one ``charge`` call): the last one made while spend was under budget.

    ``explore``: the share of slots given to a uniformly drawn survivor instead of the best
    (epsilon-greedy); every winner carries the probability it had of being chosen for its slot,
    ``propensity``, which the impression logs for off-policy (IPS) estimates. ``seed`` fixes the draws.

    ``user_key`` is the caller's pseudonym for the user; it is kept only as part of the
    frequency-cap key, never logged. ``sweep_every`` and ``sweep_size`` tune when expired
    impressions are swept (see ``ImpressionLog``).
    """

    def __init__(
        self,
        frequency_cap: FrequencyCap | None = None,
        charge_per_impression: str = "expected_cpc",
        clock: Callable[[], float] = time.time,
        *,
        explore: float = 0.0,
        seed: int | None = None,
        sweep_every: int = 10_000,
        sweep_size: int = 100_000,
    ) -> None:
        check_number("explore", explore, low=0.0, high=1.0)
        self.explore = float(explore)
        self.rng = random.Random(seed)
        if charge_per_impression not in CHARGE_MODES:
            raise ValueError(f"charge_per_impression must be one of {CHARGE_MODES}, got {charge_per_impression!r}")
        if sweep_every < 1 or sweep_size < 1:
            raise ValueError(f"sweep_every and sweep_size must be >= 1, got {sweep_every} and {sweep_size}")
        self.charge_per_impression = charge_per_impression
        self.clock = clock
        self.campaigns: dict[str, Campaign] = {}
        # Without a cap nothing needs remembering, so nothing is.
        self.log = ImpressionLog(frequency_cap, sweep_every, sweep_size) if frequency_cap is not None else None

    def upsert_campaign(self, campaign_id: str, budget: float | None = None, targeting: Mapping[str, Collection[str]] | None = None) -> Campaign:
        """Creates or updates a campaign. On update, None leaves budget or targeting as it is;
        targeting {} lifts every restriction. Spend is kept. Returns a copy."""
        if not isinstance(campaign_id, str) or not campaign_id:
            raise ValueError(f"campaign_id must be a non-empty string, got {campaign_id!r}")
        if budget is not None:
            check_number("budget", budget, low=0.0)
        parsed = parse_targeting(targeting) if targeting is not None else None  # validate all before changing anything
        campaign = self._campaign(campaign_id)
        if budget is not None:
            campaign.budget = float(budget)
        if parsed is not None:
            campaign.targeting = parsed
        return copy_campaign(campaign)

    def campaign(self, campaign_id: str) -> Campaign | None:
        """A copy of the campaign, or None if it was never seen."""
        campaign = self.campaigns.get(campaign_id)
        return copy_campaign(campaign) if campaign else None

    def run_shortlist(self, user_key: str, request: Mapping[str, str], shortlist, k: int) -> AuctionResult:
        """``run`` over a ranked ``adrec.auction.Shortlist``, in chunks best first, until ``k`` ads
        are chosen: one call per page view, however many chunks it takes.

        Most page views fill k from the first few dozen ads, so building candidates for about 4x
        the ads still wanted, not for the whole shortlist, keeps each page view's work small.
        """
        results: list[AuctionResult] = []
        start = 0
        while start < len(shortlist):
            wanted = k - sum(len(r.ads) for r in results)
            if wanted <= 0:
                break
            stop = start + max(4 * wanted, 40)
            results.append(self.run(user_key, request, shortlist.candidates(start, stop), wanted))
            start = stop
        removed = {rule: sum(r.removed[rule] for r in results) for rule in RULES}
        return AuctionResult(ads=[ad for r in results for ad in r.ads], candidates=len(shortlist), removed=removed)

    def run(self, user_key: str, request: Mapping[str, str], candidates: list[Candidate], k: int, now: float | None = None) -> AuctionResult:
        """Filters ``candidates`` for one page view, shows the top ``k`` by eCPM and records them.

        ``request`` holds the page view's context and user values, e.g. {"device": "mobile"}.
        Rules, in order: a repeated ad_id is a duplicate (the first one stays); a campaign's
        targeting key must be met by ``request`` or the ad's attributes; a campaign must have
        spend < budget; the user must have seen the ad fewer than max_impressions times in the
        window before ``now``. Survivors rank by eCPM, then higher pctr, then ad_id. Each winner's
        impression is counted and its campaign charged before the next winner is picked, so a
        campaign that runs out mid-auction loses its remaining ads to the budget rule.
        Campaigns never seen before are created, unrestricted and unlimited.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        now = self.clock() if now is None else now
        check_number("now", now)
        removed = dict.fromkeys(RULES, 0)
        survivors = []
        seen: set[str] = set()
        for candidate in candidates:
            rule = self._rule_against(candidate, user_key, request, seen, now)
            if rule is None:
                survivors.append(candidate)
            else:
                removed[rule] += 1

        survivors.sort(key=lambda c: (-c.expected_cpi, -c.pctr, c.ad_id))
        winners: list[Winner] = []
        while survivors and len(winners) < k:
            # Epsilon-greedy: a share ``explore`` of slots goes to a uniformly drawn survivor, so ads
            # the model underrates still get impressions; each logs the probability it had.
            pick = self.rng.randrange(len(survivors)) if self.explore and self.rng.random() < self.explore else 0
            propensity = (1.0 - self.explore) * (pick == 0) + self.explore / len(survivors)
            candidate = survivors.pop(pick)
            campaign = self.campaigns[candidate.campaign_id]
            if campaign.exhausted():  # an earlier winner of this auction spent the rest
                removed["budget"] += 1
                continue
            winners.append(self._show(candidate, campaign, user_key, now, propensity))
        if self.log is not None:
            self.log.after_auction(now)
        return AuctionResult(ads=winners, candidates=len(candidates), removed=removed)

    def charge(self, campaign_id: str, amount: float) -> None:
        """Adds ``amount`` (e.g. a real click's cost) to a campaign's spend; an unseen campaign is created."""
        check_number("amount", amount, low=0.0)
        self._campaign(campaign_id).spend += amount

    def impressions(self, user_key: str, ad_id: str, now: float | None = None) -> int:
        """Times the user saw the ad within the cap's window before ``now``; 0 when there is no cap."""
        if self.log is None:
            return 0
        return self.log.count((user_key, ad_id), self.clock() if now is None else now)

    def snapshot(self) -> dict:
        """Campaign budgets, spend and targeting (allowed values sorted), and how many
        (user, ad) pairs are held in memory. No user keys."""
        campaigns = {
            cid: {"budget": c.budget, "spend": c.spend, "targeting": {key: sorted(values) for key, values in c.targeting.items()}}
            for cid, c in self.campaigns.items()
        }
        return {"campaigns": campaigns, "tracked_pairs": len(self.log.times) if self.log is not None else 0}

    def _campaign(self, campaign_id: str) -> Campaign:
        """The campaign, created unrestricted and unlimited on first sight."""
        campaign = self.campaigns.get(campaign_id)
        if campaign is None:
            campaign = self.campaigns[campaign_id] = Campaign(campaign_id)
        return campaign

    def _rule_against(self, candidate: Candidate, user_key: str, request: Mapping[str, str], seen: set[str], now: float) -> str | None:
        """The first rule in ``RULES`` that removes the candidate, or None."""
        if candidate.ad_id in seen:
            return "duplicate"
        seen.add(candidate.ad_id)
        campaign = self._campaign(candidate.campaign_id)
        if not campaign.admits(request, candidate.attributes):
            return "targeting"
        if campaign.exhausted():
            return "budget"
        if self.log is not None and self.log.capped((user_key, candidate.ad_id), now):
            return "frequency_cap"
        return None

    def _show(self, candidate: Candidate, campaign: Campaign, user_key: str, now: float, propensity: float = 1.0) -> Winner:
        """Records one impression and charges for it."""
        if self.log is not None:
            self.log.record((user_key, candidate.ad_id), now)
        if self.charge_per_impression == "expected_cpc":
            campaign.spend += candidate.expected_cpi
        pctr, bid = float(candidate.pctr), float(candidate.bid)  # plain floats out, whatever numeric type came in
        return Winner(
            ad_id=candidate.ad_id, campaign_id=candidate.campaign_id, pctr=pctr, bid=bid, ecpm=1000.0 * candidate.expected_cpi, propensity=propensity
        )
