"""What the rollout's ``Experimenting`` phase (:mod:`vsearch.operators.rollout`) reads and says:
the search events of the topic (:class:`TopicEvents`, the :class:`~vsearch.operators.rollout.ReadsEvents`
of the cluster and of local runs), the analysis' policy from the spec (:func:`stats_policy`) and
the one-line summary of a look's figures (:func:`summary`).

Counting exactly once: every look re-reads the topic from its beginning (no consumer group, no
committed offsets: :func:`vsearch.core.search_events.read_all`) and the analysis counts through
:func:`vsearch.core.search_events.count_clicks` (an impression once per query id, a click once per
query and item), so a look repeated after an operator crash counts the same events the same way:
nothing in the status is added to, every figure is recomputed from the log. The price is a read
of the whole topic per look (the topic's retention bounds it; seconds for a few hundred thousand
events); an experiment's status never holds partial counts that a crash could lose or repeat."""

from __future__ import annotations

import logging

from ..core.experiment_stats import Policy as StatsPolicy
from ..core.search_events import read_all
from .spec import Experiment

log = logging.getLogger(__name__)

# status.experiment fields the rollout owns; the rest of a look's analysis is stored as it comes
OWN = ("id", "share", "salt", "candidate", "serving", "servingCollection", "candidateCollection", "started",
       "startedAt", "propertyWritten", "skipped", "looks", "lookedAt", "events", "timedOut", "decidedAt", "endedAt")


class TopicEvents:
    """The search events of a topic, all of them from its beginning, on each call. ``idle_s``:
    the read ends when no record came for this long; ``max_s``: on a topic that never falls
    silent it ends after this long with what it read (a prefix of every partition: still
    counted exactly once, the next look reads further)."""

    def __init__(self, *, idle_s: float = 1.0, max_s: float = 60.0):
        self.idle_s, self.max_s = idle_s, max_s

    def read(self, bootstrap: str, topic: str) -> list:
        out: list = []
        try:
            for rec in read_all(bootstrap, topic, idle_s=self.idle_s, timeout_s=self.max_s,
                                client_id="vsearch-operator-experiment"):
                out.append(rec)
        except LookupError:                 # no search yet made the topic: no events
            return []
        except TimeoutError:
            log.info("%s still delivering after %.0fs: this look counts the %d events read", topic,
                     self.max_s, len(out))
        return out


def stats_policy(x: Experiment) -> StatsPolicy:
    """``spec.rollout.experiment`` as the analysis' policy (:class:`vsearch.core.experiment_stats.Policy`)."""
    return StatsPolicy(alpha=x.alpha, margin=x.margin, promote_when=x.promote_when, min_units=x.min_units,
                       max_errors_ratio=x.max_error_ratio, max_p99_ratio=x.max_p99_ratio, on_timeout=x.on_timeout)


def _ctr(arm: dict | None) -> str:
    if not arm:
        return "no figures"
    ci = arm.get("ctrInterval")
    ctr = arm.get("ctr")
    text = f"CTR {ctr:.4f}" if isinstance(ctr, (int, float)) else "CTR -"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return (text + f" ({arm.get('clicks', 0)} clicks / {arm.get('impressions', 0)} impressions, "
            f"{arm.get('units', 0)} units)")


def summary(e: dict) -> str:
    """A look's figures in a line: each arm's CTR with its interval, the interleaving preference."""
    arms = e.get("arms") or {}
    parts = [f"serving {_ctr(arms.get('serving'))}", f"candidate {_ctr(arms.get('candidate'))}"]
    il = e.get("interleave") or {}
    if il:
        pref, ci = il.get("preference"), il.get("interval")
        parts.append(f"interleaving wins/losses/ties {il.get('wins')}/{il.get('losses')}/{il.get('ties')}"
                     + (f", preference {pref:.3f}" if isinstance(pref, (int, float)) else "")
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2
                        and all(isinstance(v, (int, float)) for v in ci) else ""))
    return "; ".join(parts)
