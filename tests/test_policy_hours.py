"""active_hours: weekly windows in an IANA zone, DST-correct."""

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from keepwarm.hours import parse_active_hours

BERLIN = ZoneInfo("Europe/Berlin")


def _t(text: str, zone: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_office_hours_in_berlin_follow_daylight_saving_time() -> None:
    hours = parse_active_hours("mon-fri 08:00-19:00 Europe/Berlin")
    # 2026-03-27 is a Friday (CET, UTC+1); 2026-03-30 a Monday (CEST, UTC+2).
    assert hours.contains(_t("2026-03-27T08:00"))
    assert not hours.contains(_t("2026-03-27T07:59:59"))
    assert not hours.contains(_t("2026-03-27T19:00"))
    assert not hours.contains(_t("2026-03-28T12:00"))  # Saturday
    assert hours.next_start(_t("2026-03-27T19:30")) == _t("2026-03-30T08:00")
    # After the switch, 08:00 local is 06:00 UTC, no longer 07:00.
    assert _t("2026-03-30T08:00") == datetime(2026, 3, 30, 6, tzinfo=ZoneInfo("UTC")).timestamp()
    assert hours.end_of(_t("2026-03-30T10:00")) == _t("2026-03-30T19:00")


def test_several_ranges_overnight_and_semicolons() -> None:
    hours = parse_active_hours("fri 22:00-02:00 UTC; sat-sun 10:00-12:00 UTC")
    utc = ZoneInfo("UTC")
    assert hours.contains(_t("2026-03-28T01:00", utc))  # Friday night, into Saturday
    assert not hours.contains(_t("2026-03-28T02:00", utc))
    assert hours.next_start(_t("2026-03-28T02:00", utc)) == _t("2026-03-28T10:00", utc)
    same = parse_active_hours(["fri 22:00-02:00 UTC", "sat-sun 10:00-12:00 UTC"])
    assert same.ranges == hours.ranges


def test_touching_windows_merge_into_one_stretch() -> None:
    hours = parse_active_hours("mon 00:00-24:00 UTC; tue 00:00-06:00 UTC")
    utc = ZoneInfo("UTC")
    assert hours.end_of(_t("2026-03-30T12:00", utc)) == _t("2026-03-31T06:00", utc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mon-fri 08:00-19:00", "expected 'DAYS HH:MM-HH:MM ZONE'"),
        ("mon-fry 08:00-19:00 UTC", "days 'mon-fry'"),
        ("mon 25:00-26:00 UTC", "start '25:00' is not a time of day"),
        ("mon 08:00-08:00 UTC", "start and end are equal"),
        ("mon 08:00-19:00 Nowhere/City", "unknown time zone 'Nowhere/City'"),
        ("", "no range given"),
    ],
)
def test_bad_ranges_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_active_hours(text)
