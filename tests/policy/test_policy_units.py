from __future__ import annotations

import math

import pytest

from hybrid_router.router.policy import Limits, format_duration, parse_duration, parse_memory_mb


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("12m", 720),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1h 30m 15s", 5415),
        ("1.5h", 5400),
        ("2d", 172800),
        ("250ms", 0.25),
        ("10 minutes", 600),
        (90, 90),
        (1.5, 1.5),
        ("90", 90),
        (" 45 ", 45),
        (0, 0),
        ("0s", 0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected '90s'"),
        ("abc", "expected '90s'"),
        ("12x", "unknown unit 'x'"),
        ("30m1h", "largest first"),
        ("1h1h", "largest first"),
        ("-5m", "expected '90s'"),
        (-5, "must be a finite number >= 0"),
        (math.inf, "must be a finite number >= 0"),
        (math.nan, "must be a finite number >= 0"),
        (True, "expected '90s'"),
        (None, "expected '90s'"),
        ("5m extra", "expected '90s'"),
        ("1h 30", "expected '90s'"),
        (10**400, "must be a finite number >= 0"),
        ("1" + "0" * 400, "too large"),
        ("1" + "0" * 400 + "h", "too large"),
    ],
)
def test_parse_duration_rejects(text, message):
    with pytest.raises(ValueError, match="invalid duration") as caught:
        parse_duration(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "megabytes"),
    [
        ("512", 512),
        (512, 512),
        ("512MB", 512),
        ("3GB", 3072),
        ("3 GiB", 3072),
        ("10240MB", 10240),
        ("10GB", 10240),
        ("1.5gb", 1536),
        ("2048 KiB", 2),
        ("1KB", 1),  # rounded up: a need is never under-stated
        (0.2, 1),
        ("1TB", 1048576),
    ],
)
def test_parse_memory_mb(text, megabytes):
    assert parse_memory_mb(text) == megabytes


@pytest.mark.parametrize(
    "text",
    ["", "lots", "3 GBs", "3XB", "-1", -1, 0, "0MB", True, None, math.inf, [512], 10**400, "9" * 400 + "GB"],
)
def test_parse_memory_mb_rejects(text):
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory_mb(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300, "5m"),
        (5400, "1h30m"),
        (90, "1m30s"),
        (2.5, "2.5s"),
        (0.25, "0.25s"),
        (0, "0s"),
        (86400, "24h"),
        (3600.4, "1h0.4s"),
        (1234.56, "20m34.6s"),
        (899.99, "15m"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["45s", "12m", "1h30m", "1h", "2h15m10s"])
def test_format_duration_round_trips(text):
    assert format_duration(parse_duration(text)) == text


def test_limit_breach_that_rounds_to_the_limit_shows_exact_seconds():
    assert Limits(max_duration_s=900).breaches("lambda", 900.01, 512) == [
        "expected 900.01s exceeds lambda's max_duration 15m"
    ]
    assert Limits(max_duration_s=900).breaches("lambda", 900, 512) == []
    assert Limits(max_memory_mb=10240).breaches("lambda", 1, 10241) == [
        "memory 10241 MB exceeds lambda's max_memory_mb 10240"
    ]
