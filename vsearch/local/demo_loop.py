"""``vsearch demo --loop --simulate-users N``: one whole turn of the learning loop on local
processes, each step printed as it goes and summed up at the end.

1. serve: the demo's platform (broker, Milvus Lite, embedder, consumer, search service) serves
   the starting model (``--model-dir``, default ``models/default``) over the catalog.
2. clicks: N simulated users (:class:`vsearch.local.simusers.SimulatedUsers`, a position-based
   click model: a result at rank r is examined with probability 1/r, clicked when relevant with
   probability 0.5, else 0.05; relevant = same label) search the catalog with its own images,
   :data:`SESSIONS_PER_USER` searches each, and click through ``POST /events``; the demo waits
   until the clicks are on ``search.events``.
3. train: ``vsearch train --nproc-per-node 2`` (torchrun, two processes, gloo on CPU) fine-tunes
   the serving model from ``kafka://<broker>/search.events`` with the catalog's SimCLR batches
   mixed in, ``--train-steps`` steps; a fifth of the queries (by a seeded hash of the query image)
   is held out of training (``--holdout``).
4. evaluate: the training job's rank 0 judges the new model (``--judge-against``: raw pixels,
   random init and the serving model, searching the catalog with the held-out queries: MRR and
   recall@10 of the clicked items) and writes the verdict into its ``vsearch_model.json``. A model
   that does not beat all three stops the loop here: the serving version stays.
5. roll out: the operator's rollout logic on local processes
   (:func:`vsearch.local.demo_rollout.run_rollout`): the new version's embedder, a backfilled
   collection, the gate (which reads the verdict), the alias switch (``--experiment ab`` adds an
   online experiment between the two versions, the simulated users clicking).

Exit codes with ``--check``: 0 the trained version serves (one query answered by it), 4 the
trained model lost (offline verdict, gate or online experiment) and the serving version stays,
anything else an error (1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.search_events import TOPIC
from ..predictor.model_dir import read_meta
from .demo_rollout import EXPERIMENT_LOST, GATE_REFUSED
from .services import vsearch_argv
from .simusers import SimulatedUsers

LOST = EXPERIMENT_LOST           # 4: the trained model lost, the serving version stays
SESSIONS_PER_USER = 3
TRAIN_RECIPE = ("--batch-size", "32", "--lr", "1e-4", "--holdout", "0.2", "--simclr-ratio", "0.5")


@dataclass
class Step:
    name: str
    status: str = "pending"          # pending | running | done | lost | failed | skipped
    detail: str = ""
    seconds: float | None = None


@dataclass
class LoopReport:
    """Where each step of the turn stands; printed as it changes and summed up at the end."""
    steps: dict[str, Step] = field(default_factory=lambda: {n: Step(n) for n in
                                                            ("serve", "clicks", "train", "evaluate", "rollout")})
    t0: float = field(default_factory=time.monotonic)

    def start(self, name: str, detail: str) -> None:
        s = self.steps[name]
        s.status, s.detail, self.t0 = "running", detail, time.monotonic()
        i = list(self.steps).index(name) + 1
        print(f"\n== loop step {i}/{len(self.steps)} {name}: {detail}", flush=True)

    def end(self, name: str, status: str, detail: str, seconds: float | None = None) -> None:
        s = self.steps[name]
        s.status, s.detail = status, detail
        s.seconds = seconds if seconds is not None else time.monotonic() - self.t0
        print(f"== {name}: {status} ({s.seconds:.0f}s): {detail}", flush=True)

    def summary(self) -> str:
        lines = ["\nthe loop, step by step:"]
        for s in self.steps.values():
            took = f"{s.seconds:6.0f}s" if s.seconds is not None else "      -"
            lines.append(f"  {s.name:<9} {s.status:<8} {took}  {s.detail}")
        return "\n".join(lines)


def wait_for_clicks(bootstrap: str, expected: int, timeout: float = 90.0) -> tuple[int, int]:
    """(clicks counted on search.events, events read) once at least ``expected`` clicks are there."""
    from ..trainer.data import read_click_log
    deadline = time.monotonic() + timeout
    while True:
        log, events = read_click_log(bootstrap, TOPIC, idle_s=2.0, timeout_s=timeout)
        if len(log.clicks) >= expected or time.monotonic() > deadline:
            return len(log.clicks), events
        time.sleep(1.0)


def run_training(argv: list[str], log_path: Path, timeout: float) -> int:
    """The training job as a process group of its own (torchrun and its workers), its output in
    ``log_path``; Ctrl-C or the timeout stop the whole group."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        raise RuntimeError(f"training did not finish within {timeout:.0f}s (log: {log_path})") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_loop(p, plan, *, check: bool, serve_s: float, roll_out) -> int:
    """Steps 2-5 on the started platform ``p`` (:class:`vsearch.local.demo.Platform`);
    ``roll_out(p, plan, check=...)`` is the demo's rollout step. Returns the exit code."""
    rep = LoopReport()
    data = plan.data
    rep.end("serve", "done", f"{p.meta.name}:{p.meta.version} serves {len(p.items)} catalog images "
                             f"(collection {p.collection}) at {p.search.url}/", serve_s)
    try:
        rc = _turn(p, plan, rep, data, check=check, roll_out=roll_out)
    except Exception:
        for s in rep.steps.values():
            if s.status == "running":
                s.status, s.seconds = "failed", time.monotonic() - rep.t0
        print(rep.summary(), flush=True)
        raise
    print(rep.summary(), flush=True)
    return rc


def _turn(p, plan, rep: LoopReport, data: Path, *, check: bool, roll_out) -> int:
    users = plan.simulate_users
    sessions = SESSIONS_PER_USER * users
    rep.start("clicks", f"{users} simulated users, {sessions} searches, clicking by a position-based model")
    sim = SimulatedUsers(p.search.url, p.items, n_users=users, seed=7, prefix="loop")
    got = sim.run(sessions, workers=4)
    if got["errors"]:
        print(f"  {got['errors']} sessions failed, e.g. {got['first_errors'][0]}", flush=True)
    if not got["clicks"]:
        rep.end("clicks", "failed", f"{got['sessions']} searches, no click")
        return 1
    counted, events = wait_for_clicks(p.broker.bootstrap, got["clicks"])
    rep.end("clicks", "done", f"{got['sessions']} searches, {got['clicks']} clicks; on {TOPIC}: {events} events, "
                              f"{counted} counted clicks")

    version = time.strftime("loop-%Y%m%d-%H%M%S", time.gmtime())
    out = data / "models" / version
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = vsearch_argv("train", "--nproc-per-node", "2", "--init", str(p.model),
                        "--data", f"kafka://{p.broker.bootstrap}/{TOPIC}", "--catalog", str(p.image_root),
                        "--judge-against", str(p.model), "--out", str(out), "--version", version,
                        "--max-steps", str(plan.train_steps), *TRAIN_RECIPE, "--threads", "1", "--workers", "0",
                        "--no-progress", "--log-every", "5")
    train_log = data / "logs" / "train.log"
    rep.start("train", f"torchrun, 2 processes: fine-tune {p.meta.name}:{p.meta.version} on the clicks + "
                       f"the catalog, {plan.train_steps} steps (log: {train_log})")
    print("  $ vsearch " + " ".join(argv[3:]), flush=True)
    rc = run_training(argv, train_log, timeout=plan.train_timeout)
    if rc != 0 or not (out / "config.json").exists():
        tail = "\n".join(train_log.read_text(errors="replace").splitlines()[-25:])
        rep.end("train", "failed", f"vsearch train exited {rc}")
        print(tail, flush=True)
        return 1
    meta = read_meta(out)
    t = meta.training or {}
    d = t.get("data") or {}
    rep.end("train", "done", f"{version}: {t.get('processes')} processes, {t.get('steps')} steps on {d.get('pairs')} "
                             f"click pairs ({d.get('held_out_pairs')} held out, IPS-weighted: {d.get('weighted')}) + "
                             f"{(d.get('catalog') or {}).get('train_images')} catalog images, final loss "
                             f"{t.get('final_loss', float('nan')):.3f} (the step's time: torchrun, training, "
                             f"export and the verdict)")

    rep.start("evaluate", "the training job's verdict (rank 0): the new model against raw pixels, random init "
                          f"and serving {p.meta.name}:{p.meta.version} on held-out click pairs")
    ev = meta.evaluation or {}
    verdict = ev.get("verdict") or {}
    report = out / "evaluation" / "judge.json"
    judged_s = None
    if report.exists():
        from ..trainer.judge import format_report
        judged = json.loads(report.read_text())
        judged_s = judged.get("wall_s")
        print(format_report(judged), flush=True)
    if verdict.get("beats_all") is None:
        rep.end("evaluate", "failed", "the training job wrote no verdict", 0.0)
        return 1
    if not verdict["beats_all"]:
        lost = "; ".join(line for line in verdict["text"].splitlines() if "DOES NOT BEAT" in line)
        rep.end("evaluate", "lost", lost, judged_s)
        rep.steps["rollout"].status = "skipped"
        rep.steps["rollout"].detail = f"not rolled out: {p.meta.name}:{p.meta.version} still serves"
        print(f"the trained model is not rolled out: {lost}; {p.meta.name}:{p.meta.version} still serves", flush=True)
        return LOST
    rep.end("evaluate", "done", f"{meta.name}:{version} beats raw pixels, random init and serving "
                                f"{p.meta.name}:{p.meta.version} (" + ", ".join(
                                    f"{m} {ev['metrics'][m]:.4f} vs {ev['serving']['metrics'][m]:.4f}"
                                    for m in verdict["metrics"]) + ")", judged_s)

    rep.start("rollout", f"{meta.name}:{version}: embedder, backfill, gate, switch")
    plan.rollout = out
    rc = roll_out(p, plan, check=check)
    if rc == 0:
        rep.end("rollout", "done", f"{meta.name}:{version} serves; {p.meta.name}:{p.meta.version} retired")
        return 0
    if rc in (GATE_REFUSED, EXPERIMENT_LOST):
        rep.end("rollout", "lost", f"{'the gate' if rc == GATE_REFUSED else 'the online experiment'} refused "
                                   f"{version}; {p.meta.name}:{p.meta.version} still serves")
        return LOST
    rep.end("rollout", "failed", f"the rollout ended with {rc}")
    return rc
