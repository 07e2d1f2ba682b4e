"""PLACEHOLDER of H3's branch (exp-operator), to be REPLACED by H1's vsearch/core/experiment.py
at the merge: only the part of the contract (/work/wt/experiment-contract.md §1) the operator
uses, so that the operator's Experimenting phase runs and is tested before H1's lands.

An experiment lives in the property ``vsearch.experiment`` of the serving collection (compact
JSON, sorted keys); ``""`` ends it."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets

log = logging.getLogger(__name__)

EXPERIMENT_KEY = "vsearch.experiment"
DESIGNS = ("ab", "interleave")


@dataclasses.dataclass(frozen=True)
class Experiment:
    id: str
    design: str
    share: float
    salt: str
    candidate: str
    serving: str
    started: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str | None) -> "Experiment | None":
        if not text:
            return None
        try:
            d = json.loads(text)
            return cls(id=str(d["id"]), design=str(d["design"]), share=float(d["share"]), salt=str(d["salt"]),
                       candidate=str(d["candidate"]), serving=str(d["serving"]), started=int(d["started"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring an invalid %s property: %s", EXPERIMENT_KEY, exc)
            return None


def new_experiment(design: str, share: float, candidate: str, serving: str, now_ms: int) -> Experiment:
    return Experiment(id=f"exp-{secrets.token_hex(8)}", design=design, share=float(share),
                      salt=secrets.token_hex(16), candidate=candidate, serving=serving, started=int(now_ms))
