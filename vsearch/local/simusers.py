"""Simulated users for online experiments (``vsearch demo --simulate-users N``, ``bench.experiment``):
each user is a stable id sent as ``X-User-Id``, each session searches with a catalog image and
clicks results as a position-based click model says, through ``POST /events`` with the search's
token, as the web page would.

The click model (:class:`ClickModel`, pure, usable without HTTP) is the position-based model of
the click-log literature (Craswell et al. 2008; Chuklin, Markov and de Rijke, *Click Models for
Web Search*, 2015): a result at rank r is clicked when it is examined, with probability
``examine(r) = 1 / r**eta``, and found attractive, with a probability that depends on its
relevance only. Relevance comes from the catalog's labels: a result is relevant when its label
is the query's (the demo catalog labels each photo and its variants with the photo's name) and
it is not the query image itself (nobody searches with a photo to be shown that same photo).
Position bias is then in the logs as in real ones: a model that puts relevant results higher
earns more clicks, and the same results lower earn fewer.

    model = ClickModel(eta=1.0, relevant=0.5, irrelevant=0.05)
    model.clicks([True, False, True], rng)          # ranks (1-based) a user clicks

    users = SimulatedUsers(url, items, n_users=200, seed=1)
    summary = users.run(sessions=2000, workers=4)   # {"sessions", "clicks", "by_arm": {...}, ...}
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import requests

log = logging.getLogger(__name__)

USER_HEADER = "X-User-Id"      # as vsearch.predictor.search.request reads it


@dataclass(frozen=True)
class ClickModel:
    """Position-based click model: P(click at rank r) = examine(r) * attractiveness, with
    examine(r) = 1 / r**eta and attractiveness ``relevant`` or ``irrelevant``."""
    eta: float = 1.0
    relevant: float = 0.5
    irrelevant: float = 0.05

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        for name in ("relevant", "irrelevant"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    def examine(self, rank: int) -> float:
        if rank < 1:
            raise ValueError(f"ranks start at 1, got {rank}")
        return 1.0 / rank ** self.eta

    def p_click(self, rank: int, relevant: bool) -> float:
        return self.examine(rank) * (self.relevant if relevant else self.irrelevant)

    def probabilities(self, relevance: Sequence[bool]) -> np.ndarray:
        """P(click) of each result of a ranked list (index 0 is rank 1)."""
        return np.array([self.p_click(r + 1, bool(rel)) for r, rel in enumerate(relevance)], dtype=float)

    def clicks(self, relevance: Sequence[bool], rng: np.random.Generator) -> list[int]:
        """The ranks (1-based, ascending) one user clicks on a ranked list, each independently."""
        p = self.probabilities(relevance)
        return [int(r) + 1 for r in np.flatnonzero(rng.random(len(p)) < p)]


def relevance(results: Sequence[dict], query_id: str, query_label: str | None,
              labels: dict[str, str] | None = None) -> list[bool]:
    """Whether each result (``{"id", "metadata": {"label"}}``, as ``POST /search`` answers) is
    relevant to a query with catalog item ``query_id`` of label ``query_label``: same label, not
    the query item itself. A result without a label in its metadata takes it from ``labels``."""
    out = []
    for r in results:
        label = (r.get("metadata") or {}).get("label")
        if label is None and labels is not None:
            label = labels.get(str(r.get("id")))
        out.append(query_label is not None and label == query_label and str(r.get("id")) != query_id)
    return out


@dataclass
class Session:
    """What one simulated session did."""
    user: str
    query: str
    arm: str | None                   # the experiment arm the answer names (None: no experiment)
    experiment: str | None
    results: int
    clicked: list[int] = field(default_factory=list)      # ranks
    relevant: int = 0                                     # relevant results among those shown
    error: str | None = None


class SimulatedUsers:
    """``n_users`` users (ids ``<prefix>-00000``...) searching ``url`` with catalog images and
    clicking by ``model``. ``items``: catalog items ``{"id", "path", "metadata": {"label"},
    "visibility"}`` (as ``vsearch demo`` writes them); private ones are never queries. Session i
    is reproducible from ``seed`` and i: its user, its query and its clicks."""

    def __init__(self, url: str, items: Sequence[dict], *, n_users: int = 100, model: ClickModel | None = None,
                 k: int = 10, seed: int = 0, prefix: str = "sim", api_key: str | None = None,
                 timeout: float = 30.0):
        if n_users < 1:
            raise ValueError("need at least one simulated user")
        self.url = url.rstrip("/")
        self.queries = [it for it in items if it.get("visibility", "public") == "public"]
        if not self.queries:
            raise ValueError("no public catalog item to search with")
        self.labels = {str(it["id"]): (it.get("metadata") or {}).get("label") for it in items}
        self.n_users, self.k, self.seed, self.prefix = n_users, k, seed, prefix
        self.model = model or ClickModel()
        self.timeout = timeout
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self._images: dict[str, bytes] = {}
        self._local = threading.local()

    def user(self, i: int) -> str:
        return f"{self.prefix}-{i:05d}"

    def _http(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _image(self, item: dict) -> bytes:
        key = str(item["id"])
        if key not in self._images:
            self._images[key] = Path(item["path"]).read_bytes()
        return self._images[key]

    def session(self, i: int) -> Session:
        """Session ``i``: a user, a query, the search, the clicks (sent as the page sends them)."""
        rng = np.random.default_rng([self.seed, i])
        user = self.user(int(rng.integers(self.n_users)))
        item = self.queries[int(rng.integers(len(self.queries)))]
        qid = str(item["id"])
        http = self._http()
        headers = {**self.headers, USER_HEADER: user}
        try:
            resp = http.post(f"{self.url}/search", headers=headers, timeout=self.timeout,
                             files={"image": (Path(item["path"]).name, self._image(item))}, data={"k": str(self.k)})
        except requests.RequestException as exc:
            return Session(user, qid, None, None, 0, error=f"search: {exc}")
        if resp.status_code != 200:
            return Session(user, qid, None, None, 0, error=f"search answered {resp.status_code}: {resp.text[:200]}")
        body = resp.json()
        exp = body.get("experiment") or {}
        results = body.get("results") or []
        rel = relevance(results, qid, self.labels.get(qid), self.labels)
        out = Session(user, qid, exp.get("arm"), exp.get("id"), len(results), relevant=sum(rel))
        out.clicked = self.model.clicks(rel, rng)
        if out.clicked:
            events = [{"type": "click", "token": body["token"], "item_id": results[r - 1]["id"]} for r in out.clicked]
            try:
                ack = http.post(f"{self.url}/events", json=events, headers=self.headers, timeout=self.timeout)
                if ack.status_code != 200:
                    out.error = f"clicks answered {ack.status_code}: {ack.text[:200]}"
            except requests.RequestException as exc:
                out.error = f"clicks: {exc}"
        return out

    def run(self, sessions: int, *, start: int = 0, workers: int = 4) -> dict:
        """Sessions ``start`` .. ``start + sessions - 1`` on ``workers`` threads; a summary:
        ``{"sessions", "errors", "clicks", "by_arm": {arm: {"sessions", "clicks", "relevant_shown"}},
        "first_errors": [...]}`` (arm ``-`` when no experiment ran)."""
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="simuser") as pool:
            done = list(pool.map(self.session, range(start, start + sessions)))
        return summarize(done)


def summarize(sessions: Sequence[Session]) -> dict:
    by_arm: dict[str, dict] = {}
    for s in sessions:
        if s.error and not s.results:
            continue
        a = by_arm.setdefault(s.arm or "-", {"sessions": 0, "clicks": 0, "relevant_shown": 0})
        a["sessions"] += 1
        a["clicks"] += len(s.clicked)
        a["relevant_shown"] += s.relevant
    errors = [s.error for s in sessions if s.error]
    return {"sessions": len(sessions), "errors": len(errors), "clicks": sum(len(s.clicked) for s in sessions),
            "by_arm": by_arm, "first_errors": errors[:5]}
