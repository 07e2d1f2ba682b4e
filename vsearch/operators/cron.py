"""Cron expressions (``spec.training.schedule``), the five fields of crontab(5) in UTC: minute
hour day-of-month month day-of-week, each ``*``, a number, a range ``a-b``, a step ``*/n`` or
``a-b/n``, or a list of those; month and weekday names (``jan``, ``mon``); ``7`` is Sunday as
``0`` is; ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly``
(``@annually``). As in Vixie cron, when both day fields are restricted a day matching either
counts. Small on purpose: no seconds field, no ``L``/``W``/``#``, no time zones."""

from __future__ import annotations

import calendar
import dataclasses
import datetime

MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
          "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, MONTHS),
          ("day of week", 0, 7, DAYS))


class CronError(ValueError):
    pass


def _value(text: str, name: str, lo: int, hi: int, names: dict) -> int:
    v = names.get(text.lower())
    if v is None:
        if not text.isdigit():
            raise CronError(f"{name}: {text!r} is not a number" + (f" or a name ({', '.join(names)})" if names else ""))
        v = int(text)
    if not lo <= v <= hi:
        raise CronError(f"{name}: {v} is out of range {lo}-{hi}")
    return v


def _field(text: str, name: str, lo: int, hi: int, names: dict) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step = part.partition("/")
        if step and not step.isdigit() or step == "0":
            raise CronError(f"{name}: step {step!r} must be a positive number")
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            x, _, y = rng.partition("-")
            a, b = _value(x, name, lo, hi, names), _value(y, name, lo, hi, names)
            if a > b:
                raise CronError(f"{name}: range {rng!r} runs backwards")
        elif rng:
            a = _value(rng, name, lo, hi, names)
            b = hi if step else a
        else:
            raise CronError(f"{name}: empty value in {text!r}")
        out.update(range(a, b + 1, int(step or 1)))
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset
    hours: frozenset
    days: frozenset
    months: frozenset
    weekdays: frozenset          # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, text: str) -> "Cron":
        expr = MACROS.get(text.strip().lower(), text.strip())
        parts = expr.split()
        if len(parts) != 5:
            raise CronError(f"{len(parts)} fields; a cron expression has 5 (minute hour day-of-month month "
                            "day-of-week) or is one of " + ", ".join(MACROS))
        sets = [_field(p, *spec) for p, spec in zip(parts, FIELDS)]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(text, sets[0], sets[1], sets[2], sets[3], weekdays,
                   any_day=parts[2].startswith("*"), any_weekday=parts[4].startswith("*"))

    def _day_ok(self, d: datetime.date) -> bool:
        dom, dow = d.day in self.days, (d.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, ts: float) -> float:
        """The first time (epoch seconds) after ``ts`` the expression names."""
        t = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).replace(second=0, microsecond=0)
        t += datetime.timedelta(minutes=1)
        limit = t + datetime.timedelta(days=366 * 5)
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + datetime.timedelta(days=32)).replace(day=1)
            elif not self._day_ok(t.date()):
                t = t.replace(hour=0, minute=0) + datetime.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + datetime.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += datetime.timedelta(minutes=1)
            else:
                return t.timestamp()
        raise CronError(f"{self.text!r} names no time in the next five years")
