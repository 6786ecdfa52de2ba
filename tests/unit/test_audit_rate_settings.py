"""A sampling rate per decision kind is a share: NaN (which compares false everywhere, so audits stopped without a
word), a negative rate or one over 1 is refused when the settings load, like `audit_rate` itself."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from frugalstream.runtime.settings import Settings


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -0.1, 1.5])
def test_an_audit_rate_per_kind_that_is_no_share_is_refused(rate: float) -> None:
    with pytest.raises(ValidationError, match="audit_rates"):
        Settings(audit_rates={"near_miss": rate})


def test_audit_rates_per_kind_between_0_and_1_load() -> None:
    rates = {"near_miss": 0.0, "routed_up": 1.0}
    assert Settings(audit_rates=rates).audit_rates == rates
