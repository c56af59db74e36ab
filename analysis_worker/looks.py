"""The looks a sequential experiment has published, kept beside its results so a restart keeps them.

`serve-analysis` recomputes every experiment on a schedule (every 15 minutes by default), for
weeks, and every recompute publishes `significant` and a recommendation: every recompute is a look.
What keeps the chance of ever publishing a false `significant` or `ship` at most alpha:

* group-sequential: the bound of a look is the Lan-DeMets boundary for continuous monitoring at
  the look's information fraction (`sequential.monitoring_bound`), so any number of looks at any
  times stays within alpha up to the plan (information fraction 1). There the boundary has spent
  all of alpha, so the test **closes**: the first recompute past the plan republishes the last
  look taken within it, frozen (its numbers, verdicts and decision; a `keep-running` becomes
  `no-ship`, since the plan is complete), with the current units and sample-ratio check beside it
  under `current`. A test whose first look is already past the plan gets one final analysis at the
  bound of t = 1 and closes there.
* always-valid: the normal-mixture sequence holds at every time, past the plan too; its looks are
  recorded but it never closes.

The log (`<out>/<experiment>.looks.json`) holds every look taken (time, units, information
fraction), the last document published within the plan and, once closed, the frozen one. Every
published document lists the looks under `sequential.looks_taken`.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LookLog:
    """Every look one experiment published; `publish` turns a fresh document into the one to publish."""

    experiment: str
    path: Path | None = None
    looks: list[dict[str, Any]] = field(default_factory=list)
    # The last document published within the plan (group-sequential), and the frozen one once closed.
    last_within_plan: dict[str, Any] | None = None
    closed: dict[str, Any] | None = None
    expected_n: float | None = None

    @classmethod
    def load(cls, folder: str | Path | None, experiment: str) -> LookLog:
        """The log stored in `folder` (a new, empty one if there is none or no folder)."""
        if folder is None:
            return cls(experiment)
        path = Path(folder) / f"{experiment}.looks.json"
        if not path.exists():
            return cls(experiment, path)
        raw = json.loads(path.read_text())
        return cls(experiment, path, looks=list(raw.get("looks") or []), last_within_plan=raw.get("last_within_plan"),
                   closed=raw.get("closed"), expected_n=raw.get("expected_n"))

    def save(self) -> None:
        """Write the log atomically (a crash leaves the previous version, never half a file)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"experiment": self.experiment, "expected_n": self.expected_n, "looks": self.looks,
                                   "last_within_plan": self.last_within_plan, "closed": self.closed}))
        os.replace(tmp, self.path)

    def publish(self, document: dict[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
        """Record the look `document` is and return the document to publish for it."""
        seq = document.get("sequential")
        if not seq or document.get("error"):
            return document
        at = (now or dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z")
        if self.closed is not None:
            return self._frozen(document, at)
        information = float(seq.get("information", seq.get("information_fraction", 0.0)))
        units = sum((document.get("units") or {}).values())
        if self.expected_n is None:
            self.expected_n = seq.get("expected_n")
        warnings = list(document.get("warnings") or [])
        if self.expected_n != seq.get("expected_n"):
            warnings.append(f"the plan changed from {self.expected_n} to {seq.get('expected_n')} expected units after "
                            f"{len(self.looks)} look(s): the sequential guarantee covers the original plan only")
        if seq.get("method") == "group-sequential" and information > 1.0 and self.last_within_plan is not None:
            self.closed = self.last_within_plan
            return self._frozen(document, at)
        self.looks.append({"at": at, "units": units, "information": information})
        # Shallow copies: nothing below the top level is changed here, and `_frozen` copies deeply.
        published = {**document, "warnings": warnings,
                     "sequential": {**seq, "status": "open", "look": len(self.looks)}}
        if seq.get("method") == "group-sequential":
            if information > 1.0:  # the first look is past the plan: one final analysis at t = 1
                published["sequential"].update(status="closed", closed_at_look=len(self.looks))
                self.closed = {**published, "sequential": dict(published["sequential"])}
            else:
                self.last_within_plan = {**published, "sequential": dict(published["sequential"])}
        published["sequential"]["looks_taken"] = self.looks
        return published

    def _frozen(self, current: dict[str, Any], at: str) -> dict[str, Any]:
        """The closed test's final look, republished with the current units and sample-ratio check beside it."""
        assert self.closed is not None
        frozen = copy.deepcopy(self.closed)
        seq = frozen["sequential"]
        if seq.get("status") != "closed":
            seq["status"] = "closed"
            seq["closed_at_look"] = seq.get("look", len(self.looks))
            decision = frozen["decision"]
            note = (f"the group-sequential test closed at its plan of {seq.get('expected_n')} units: these are the "
                    f"numbers of look {seq['closed_at_look']}, the last within the plan; later data cannot change them")
            for verdict in decision.get("variants", {}).values():
                if verdict["recommendation"] == "keep-running":
                    verdict["recommendation"] = "no-ship"
                    verdict["reasons"] = [r for r in verdict["reasons"]
                                          if not r.startswith("the planned sample is not complete yet")]
                    verdict["reasons"].append("the plan is complete without a ship")
            if decision["recommendation"] == "keep-running":
                decision["recommendation"] = "no-ship"
                decision["reasons"] = [f"{v}: " + "; ".join(d["reasons"]) for v, d in decision["variants"].items()]
            decision["reasons"].append(note)
            self.closed = copy.deepcopy(frozen)
        frozen["computed_at"] = at
        seq["looks_taken"] = self.looks
        cur_seq = current.get("sequential") or {}
        frozen["current"] = {"computed_at": current.get("computed_at"), "units": current.get("units"),
                             "srm": current.get("srm"), "information": cur_seq.get("information")}
        return frozen
