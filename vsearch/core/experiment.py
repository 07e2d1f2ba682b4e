"""An online experiment between the serving and the candidate model version, as every part sees
it: what it is (:class:`Experiment`, the JSON in the serving collection's property
:data:`EXPERIMENT_KEY`), which arm a randomisation unit is in (:func:`bucket`, :func:`assign`) and
how two rankings are merged for interleaving (:func:`team_draft`). Pure: no I/O.

Where it lives: the operator writes ``vsearch.experiment`` on the SERVING collection (the one the
index's alias names) to start one and writes ``""`` to end it; every search-service replica reads
it when it resolves the alias (every ``resolve_ttl``), so all replicas agree without shared state
and an alias switch ends the experiment by itself (the new serving collection carries none).

Assignment is sticky per randomisation unit: ``bucket(unit, salt)`` in [0, 1) is a hash of the
experiment's salt and the unit (a user id the client sends, else the query image's hash), so the
same unit lands in the same arm on every replica, for the whole experiment, and independently
across experiments (each has its own salt). A unit is in the experiment when its bucket is under
``share``:

- ``ab``: units in the experiment are answered by the candidate (arm ``candidate``: its embedder,
  its collection, end to end), every other unit by serving (arm ``serving``);
- ``interleave``: units in the experiment get both versions' results merged by team draft (arm
  ``interleaved``; each result remembers its team, ``serving`` or ``candidate``), every other
  unit plain serving results (arm ``outside``).

Events never carry the unit itself, only :func:`unit_id` (a salted hash), so per-unit figures
can be computed and nobody can be recognised from the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import secrets

log = logging.getLogger(__name__)

EXPERIMENT_KEY = "vsearch.experiment"        # property of the serving collection
DESIGNS = ("ab", "interleave")
# Arms: which version answered a query (A/B), or how (interleave).
SERVING, CANDIDATE = "serving", "candidate"   # also the two teams of interleaving
INTERLEAVED, OUTSIDE = "interleaved", "outside"
ARMS = {"ab": (SERVING, CANDIDATE), "interleave": (INTERLEAVED, OUTSIDE)}
TEAMS = (SERVING, CANDIDATE)
_ID_RE = re.compile(r"^exp-[0-9a-f]{16}$")
_SALT_RE = re.compile(r"^[0-9a-f]{32}$")
_COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
MAX_UNIT_CHARS = 200                         # a user id the client sends (header or cookie)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: ``id`` (``exp-<16 hex>``), ``design`` (``ab`` | ``interleave``), ``share``
    (the fraction of units in it, (0, 1]), ``salt`` (32 hex), the ``candidate`` and ``serving``
    collections, ``started`` (epoch-ms)."""
    id: str
    design: str
    share: float
    salt: str
    candidate: str
    serving: str
    started: int

    def __post_init__(self):
        problems = []
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            problems.append(f"id must be exp-<16 hex>, got {self.id!r}")
        if self.design not in DESIGNS:
            problems.append(f"design must be one of {', '.join(DESIGNS)}, got {self.design!r}")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 < self.share <= 1:
            problems.append(f"share must be a number in (0, 1], got {self.share!r}")
        if not isinstance(self.salt, str) or not _SALT_RE.match(self.salt):
            problems.append("salt must be 32 hex digits")
        for f in ("candidate", "serving"):
            v = getattr(self, f)
            if not isinstance(v, str) or not _COLLECTION_RE.match(v):
                problems.append(f"{f} must be a collection name, got {v!r}")
        if self.candidate == self.serving:
            problems.append("candidate and serving must be different collections")
        if isinstance(self.started, bool) or not isinstance(self.started, int) or self.started < 0:
            problems.append(f"started must be epoch milliseconds, got {self.started!r}")
        if problems:
            raise ValueError("invalid experiment: " + "; ".join(problems))

    def to_json(self) -> str:
        """The property's text: compact JSON, sorted keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str | None) -> "Experiment | None":
        """The experiment in a property's text; None for ``""``/None (no experiment) and for
        anything that is not a valid experiment (logged: a replica never fails a search over it)."""
        if not text:
            return None
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            fields = {f.name for f in dataclasses.fields(cls)}
            if set(obj) != fields:
                raise ValueError(f"expected the keys {sorted(fields)}, got {sorted(obj)}")
            return cls(**obj)
        except (ValueError, TypeError) as exc:
            log.warning("ignoring the %s property (no experiment): %s", EXPERIMENT_KEY, str(exc)[:300])
            return None

    def arm(self, unit: str) -> str:
        """The arm of ``unit``: :func:`assign`."""
        return assign(self, unit)

    def event(self, unit: str, arm: str | None = None) -> dict:
        """The ``experiment`` object events carry: id, design, arm, and the unit's salted hash."""
        return {"id": self.id, "design": self.design, "arm": arm or self.arm(unit),
                "unit": unit_id(unit, self.salt)}


def new_experiment(design: str, share: float, candidate: str, serving: str, now_ms: int) -> Experiment:
    """A new experiment with a random id and salt (raises ``ValueError`` when a field is invalid)."""
    return Experiment(id=f"exp-{secrets.token_hex(8)}", design=design, share=float(share),
                      salt=secrets.token_hex(16), candidate=candidate, serving=serving, started=int(now_ms))


def bucket(unit: str, salt: str) -> float:
    """The unit's place in [0, 1): the first 8 bytes of sha256(salt + "\\0" + unit) over 2**64.
    The same on every replica and for the whole experiment; independent across salts."""
    digest = hashlib.sha256(f"{salt}\0{unit}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def in_experiment(exp: Experiment, unit: str) -> bool:
    return bucket(unit, exp.salt) < exp.share


def assign(exp: Experiment, unit: str) -> str:
    """``candidate``/``serving`` (ab) or ``interleaved``/``outside`` (interleave)."""
    inside, outside = ARMS[exp.design]
    return inside if in_experiment(exp, unit) else outside


def unit_id(unit: str, salt: str) -> str:
    """What events carry instead of the unit: sha256(salt + unit), 16 hex digits."""
    return hashlib.sha256(f"{salt}{unit}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _coin(seed: str, i: int) -> bool:
    return hashlib.sha256(f"{seed}\0{i}".encode("utf-8", "surrogatepass")).digest()[0] & 1 == 1


def team_draft(a: list[str], b: list[str], k: int, seed: str) -> list[tuple[str, str]]:
    """Team-draft interleaving (Radlinski, Kurup and Joachims, CIKM 2008) of ranking ``a``
    (team ``serving``) and ``b`` (team ``candidate``): at most ``k`` ``(id, team)``, no id twice.

    Each round, the team with fewer picks so far picks (a coin decides between equals: a seeded
    hash, so the merge is deterministic in ``seed``, the query id); it contributes its best item
    not shown yet. When one ranking has nothing left to give, the other goes on alone. Every
    prefix then holds as many items of each team as possible (their counts differ by at most one
    while both can pick), and each team's items keep their order in its ranking: a click is
    credited to the team that contributed the item."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a whole number >= 0, got {k!r}")
    out: list[tuple[str, str]] = []
    shown: set[str] = set()
    rankings = {SERVING: list(a), CANDIDATE: list(b)}
    pos = {SERVING: 0, CANDIDATE: 0}
    picks = {SERVING: 0, CANDIDATE: 0}

    def next_of(team: str) -> str | None:
        r = rankings[team]
        while pos[team] < len(r) and r[pos[team]] in shown:
            pos[team] += 1
        return r[pos[team]] if pos[team] < len(r) else None

    rnd = 0
    while len(out) < k:
        left = {t: next_of(t) for t in TEAMS}
        able = [t for t in TEAMS if left[t] is not None]
        if not able:
            break
        if len(able) == 1:
            team = able[0]
        elif picks[SERVING] != picks[CANDIDATE]:
            team = SERVING if picks[SERVING] < picks[CANDIDATE] else CANDIDATE
        else:
            team = SERVING if _coin(seed, rnd) else CANDIDATE
            rnd += 1
        item = left[team]
        out.append((item, team))
        shown.add(item)
        picks[team] += 1
    return out
