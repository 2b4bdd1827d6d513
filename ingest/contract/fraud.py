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
# the click_burst rule's windows per link and address (``workers.consumer.bursts``): schema
# 21's, then schema 18's, which a worker of schemas 18 to 20 may still write during an
# upgrade. The workers prune both, an erasure deletes its person's pairs from both
BURST_WINDOW_TABLES: Final = ("burst_windows", "click_windows")
