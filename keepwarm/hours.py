"""`active_hours`: the weekly windows in which a pair may be pinged (docs/policy.md).

One range is `DAYS HH:MM-HH:MM ZONE`, e.g. `mon-fri 08:00-19:00 Europe/Berlin`:

- DAYS: a day (`mon`), a span (`mon-fri`, `fri-mon` wraps), or a comma list of either
  (`mon-wed,fri`); `daily` (or leaving DAYS out) means every day;
- HH:MM-HH:MM: local wall-clock start and end (`24:00` allowed as an end); an end before the
  start runs past midnight (`22:00-06:00` on `fri` covers Friday night into Saturday morning);
- ZONE: an IANA time zone (`UTC`, `America/New_York`); the window follows that zone's daylight
  saving time, so `08:00` stays 08:00 local all year.

Several ranges are a YAML list, or one string with ranges separated by `;`. A time is active
when any range covers it. Everything here is pure: times are unix seconds passed in.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})\s+(?P<zone>\S+)$")


def _minutes(text: str, what: str, allow_24: bool) -> int:
    hours, minutes = (int(p) for p in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not allow_24)):
        raise ValueError(f"{what} {text!r} is not a time of day (00:00-23:59{', or 24:00' if allow_24 else ''})")
    return hours * 60 + minutes


def _days(text: str) -> frozenset[int]:
    if text in ("daily", "all"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e not in DAYS for e in ends):
            raise ValueError(f"days {part!r}: expected a day ({', '.join(DAYS)}), a span such as mon-fri, or daily")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class HoursRange:
    """One weekly window: on `days` (0 = Monday), from `start` to `end` minutes local time in `zone`."""

    days: frozenset[int]
    start: int
    end: int  # <= start: the window runs past midnight into the next day
    zone: str

    def _local_windows(self, around: date) -> list[tuple[datetime, datetime]]:
        """This range's windows that start between two days before and eight days after `around`."""
        tz = ZoneInfo(self.zone)
        out = []
        for offset in range(-2, 9):
            day = around + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            midnight = datetime(day.year, day.month, day.day)
            start = midnight + timedelta(minutes=self.start)
            end = midnight + timedelta(minutes=self.end if self.end > self.start else self.end + 1440)
            out.append((start.replace(tzinfo=tz), end.replace(tzinfo=tz)))
        return out

    def windows(self, t: float) -> list[tuple[float, float]]:
        """Unix-second windows of this range near `t` (from two days before to a week after)."""
        around = datetime.fromtimestamp(t, ZoneInfo(self.zone)).date()
        return [(_instant(s), _instant(e)) for s, e in self._local_windows(around)]


def _instant(local: datetime) -> float:
    """Unix time of a zone-aware wall-clock time; one inside a spring-forward gap (02:30 on the
    night clocks jump from 02:00 to 03:00) is the first instant after the gap (03:00).

    `timestamp()` alone reads such a time with the offset from before the jump, which lands as
    far past the gap's end as the time is past its start (03:30): a window would open late.
    """
    t = local.timestamp()
    if datetime.fromtimestamp(t, local.tzinfo).replace(tzinfo=None) == local.replace(tzinfo=None):
        return t  # the wall-clock time exists (an ambiguous one resolves to its first occurrence)
    # In a gap: the transition lies between the instant read with the offset after the jump
    # and the one read with the offset before it; find it to the second.
    low, high = local.replace(fold=1).timestamp(), t
    if low > high:
        low, high = high, low
    offset = local.tzinfo.utcoffset(datetime.fromtimestamp(high, local.tzinfo)) if local.tzinfo else None
    while high - low > 0.5:
        middle = (low + high) / 2
        if local.tzinfo is not None and local.tzinfo.utcoffset(datetime.fromtimestamp(middle, local.tzinfo)) == offset:
            high = middle
        else:
            low = middle
    return float(math.ceil(high - 0.5))


@dataclass(frozen=True, slots=True)
class ActiveHours:
    """Several weekly windows; a time is active when any of them covers it."""

    ranges: tuple[HoursRange, ...]
    text: str

    def contains(self, t: float) -> bool:
        """True when `t` (unix seconds) lies inside a window."""
        return any(s <= t < e for r in self.ranges for s, e in r.windows(t))

    def next_start(self, t: float) -> float | None:
        """`t` itself when active, else the start of the next window (None: there is none)."""
        if self.contains(t):
            return t
        starts = [s for r in self.ranges for s, e in r.windows(t) if s > t and e > s]
        return min(starts) if starts else None

    def end_of(self, t: float) -> float:
        """When the active stretch containing `t` ends (windows that touch or overlap merge)."""
        end = t
        for _ in range(64):  # a stretch spans at most a week of windows; 64 is ample
            later = [e for r in self.ranges for s, e in r.windows(end) if s <= end < e]
            if not later:
                return end
            end = max(later)
        return end

    def __str__(self) -> str:
        return self.text


def parse_active_hours(value: str | list[str]) -> ActiveHours:
    """Parse one range, a `;`-separated string of them, or a list; raise ValueError naming the bad part."""
    parts = [value] if isinstance(value, str) else list(value)
    texts = [p.strip() for part in parts for p in part.split(";") if p.strip()]
    if not texts:
        raise ValueError("no range given; expected e.g. 'mon-fri 08:00-19:00 Europe/Berlin'")
    ranges = []
    for text in texts:
        m = _RANGE.match(" ".join(text.lower().split()).replace(" - ", "-"))
        if not m:
            raise ValueError(f"{text!r}: expected 'DAYS HH:MM-HH:MM ZONE', e.g. 'mon-fri 08:00-19:00 Europe/Berlin'")
        zone = text.split()[-1]  # the zone keeps its case: IANA names are case-sensitive on disk
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{text!r}: unknown time zone {zone!r}; use an IANA name such as Europe/Berlin or UTC") from None
        start = _minutes(m["start"], "start", allow_24=False)
        end = _minutes(m["end"], "end", allow_24=True)
        if start == end:
            raise ValueError(f"{text!r}: start and end are equal; for the whole day write 00:00-24:00")
        try:
            days = _days(m["days"] or "daily")
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        ranges.append(HoursRange(days, start, end, zone))
    return ActiveHours(tuple(ranges), "; ".join(texts))
