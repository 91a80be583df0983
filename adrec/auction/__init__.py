"""The ad auction, pure Python and free of Serve: targeting, budgets and frequency caps filter
the ranked shortlist, eCPM orders it. Serve holds one ``Marketplace`` in a named Ray actor."""

from adrec.auction.market import (
    RULES,
    AuctionResult,
    Campaign,
    Candidate,
    FrequencyCap,
    Marketplace,
    Winner,
)
from adrec.auction.shortlist import Shortlist

__all__ = ["RULES", "AuctionResult", "Campaign", "Candidate", "FrequencyCap", "Marketplace", "Shortlist", "Winner"]
