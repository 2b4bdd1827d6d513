"""Fraud's vocabulary, one list for every side: the rules the workers apply
(``workers.consumer.fraud``), what a workspace may say each flag does (its
``fraud_policy``), and a program's default thresholds (its ``fraud_thresholds`` override
them). The management API's models, the CLI's choices and the workers read them here."""

from __future__ import annotations

from typing import Final, Literal, get_args

FraudRule = Literal["self_referral", "affiliate_ip", "click_burst", "fast_conversion", "disposable_email"]
FraudPolicy = Literal["flag", "exclude"]

FRAUD_RULES: Final[tuple[str, ...]] = get_args(FraudRule)
FRAUD_POLICIES: Final[tuple[str, ...]] = get_args(FraudPolicy)
FRAUD_THRESHOLDS: Final = {"burst_clicks": 20, "burst_seconds": 60, "fast_conversion_seconds": 10}
