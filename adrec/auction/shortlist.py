"""The auction's input: the ranked shortlist of one page view, as columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adrec.auction.market import Candidate


@dataclass
class Shortlist:
    """Ranked ads as columns, best pCTR x bid first: cheap to pass between processes."""

    ad_ids: list[str]
    campaigns: list[str]
    bids: np.ndarray  # (N,)
    pctr: np.ndarray  # (N,)
    attributes: dict[str, list]

    def __len__(self) -> int:
        return len(self.ad_ids)

    def candidates(self, start: int, stop: int) -> list[Candidate]:
        """The auction's view of ranks [start, stop)."""
        return [
            Candidate(
                ad_id=self.ad_ids[i],
                campaign_id=self.campaigns[i],
                bid=float(self.bids[i]),
                pctr=float(self.pctr[i]),
                attributes={name: values[i] for name, values in self.attributes.items() if values[i] is not None},
            )
            for i in range(start, min(stop, len(self)))
        ]
