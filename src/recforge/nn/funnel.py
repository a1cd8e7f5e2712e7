"""Building blocks of the entire-space conversion models (ESCM2, DCMT, ChorusCVR).

- :func:`inverse_propensity`: ``1 / clip(sg(p), low, 1)``, the inverse-propensity weight of
  the counterfactual losses (the propensity never receives a gradient through its weight).
- :func:`funnel_labels`: click, conversion and the two negatives the funnel tells apart.
"""

from __future__ import annotations

from torch import Tensor


def inverse_propensity(propensity: Tensor, low: float) -> Tensor:
    """``1 / clip(sg(propensity), low, 1)``: an IPW weight that passes no gradient."""
    return 1.0 / propensity.detach().clamp(min=low, max=1.0)


def funnel_labels(click: Tensor, conversion: Tensor) -> dict[str, Tensor]:
    """The funnel's label sets, all float 0/1 over the exposures ``[B]``.

    - ``ctcvr`` = o * r: clicked and converted;
    - ``factual_negative`` = o * (1 - r): clicked and not converted (the conversion is known);
    - ``ambiguous_negative`` = 1 - o: not clicked (whether it would convert is unknown).

    A conversion logged on an unclicked exposure is impossible; it counts as no conversion.
    """
    o, r = click, conversion * click
    return {"ctcvr": o * r, "factual_negative": o * (1.0 - r), "ambiguous_negative": 1.0 - o}
