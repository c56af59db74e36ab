"""Compile a folder of flag YAML files into resolver state (Confidence's JSON layout).

A folder holds any number of `*.yaml` / `*.yml` files, each with one or more documents. A
document's first key says what it is: `flag`, `segment` (targeting reused by name), `namespace`
(an exclusion layer, optionally with a holdout), `client` (credentials and environments) or
`account`. See docs/assignment.md for the format; `examples/flags/` holds a worked example.

Compiling is deterministic: the same files and the same allocation lock always give
byte-identical state. Allocation buckets come from `assignment_server.authoring.allocator`,
starting from a lock: the folder's `allocations.lock.json` (written by `twofold flags lock`), or
the server's record of what it served. A change that would move units of what the lock
describes as running is refused with file:line problems (`assignment_server.authoring.integrity`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from assignment_server.authoring.allocator import Allocation, SegmentRequest, allocate
from assignment_server.authoring.conditions import ConditionCompiler
from assignment_server.authoring.errors import FlagFileError, Problem
from assignment_server.authoring.integrity import Move, extends, moves
from assignment_server.authoring.yamlio import Located, LocatedList, load_documents
from twofold.resolver.state import encode_bitset

LOCK_FILE = "allocations.lock.json"
DEFAULT_ACCOUNT = "twofold"
# Only when a folder defines no client: lets `twofold serve-assignment --flags examples/flags`
# work out of the box on a laptop. Never rely on it in production (define `client:` documents).
DEFAULT_CLIENT = "local"
DEFAULT_CLIENT_SECRET = "twofold-local-dev-secret"
DEFAULT_BUCKET_COUNT = 10_000
EVERYONE = "segments/everyone"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

FLAG_KEYS = {"flag", "description", "owner", "clients", "archived", "variants", "default", "rules", "schema"}
RULE_KEYS = {"name", "description", "when", "serve", "rollout", "experiment", "overrides", "environments",
             "enabled", "targeting_key"}
EXPERIMENT_KEYS = {"name", "allocation", "arms", "namespace", "exclusive_with", "bucket_count", "sticky"}


@dataclass
class CompileResult:
    """The state document plus what reviewers and the server want to know about it."""

    state: dict
    lock: dict
    lock_changed: bool  # the folder's allocations.lock.json is missing or differs from `lock`
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def state_json(self) -> bytes:
        return json.dumps(self.state, separators=(",", ":"), sort_keys=True).encode()


def _percent(value: Any, node: Located, key: str, problems: list[Problem]) -> float | None:
    """`"25%"`, `25%` or a fraction 0..1."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            number = -1.0
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        problems.append(Problem(node.file, node.line_of(key), f"`{key}` must be a fraction 0..1 or a percentage "
                                                              f"such as \"25%\", got {value!r}"))
        return None
    return number


class _Folder:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.flags: list[Located] = []
        self.segments: dict[str, Located] = {}
        self.namespaces: dict[str, Located] = {}
        self.clients: dict[str, Located] = {}
        self.account: str | None = None
        self.account_at: tuple[str, int] = ("?", 0)

    def error(self, node: Any, message: str, key: str | None = None) -> None:
        line = node.line_of(key) if isinstance(node, Located) and key else getattr(node, "line", 0)
        self.problems.append(Problem(getattr(node, "file", "?"), line, message))

    def check_keys(self, node: Located, allowed: set[str], what: str) -> None:
        for key in node:
            if key not in allowed:
                self.error(node, f"unknown key {key!r} in {what}; allowed: {', '.join(sorted(allowed))}", key)

    def add(self, doc: Any, file: str) -> None:
        if not isinstance(doc, Located) or not doc:
            self.problems.append(Problem(file, getattr(doc, "line", 1), "a document must be a mapping"))
            return
        kind = next(iter(doc))
        name = doc[kind]
        if kind == "account":
            self.account = str(name)
            self.account_at = (doc.file, doc.line_of(kind))
            return
        if kind not in ("flag", "segment", "namespace", "client"):
            self.error(doc, f"unknown document kind {kind!r}; start with flag:, segment:, namespace:, client: "
                            "or account:", kind)
            return
        if not isinstance(name, str) or not _NAME.match(name):
            self.error(doc, f"{kind} name {name!r} must be lowercase letters, digits and dashes", kind)
            return
        if kind == "flag":
            if any(f["flag"] == name for f in self.flags):
                self.error(doc, f"flag {name!r} is defined twice", kind)
            self.flags.append(doc)
            return
        table = {"segment": self.segments, "namespace": self.namespaces, "client": self.clients}[kind]
        if name in table:
            self.error(doc, f"{kind} {name!r} is defined twice (first at {table[name].file}:{table[name].line})", kind)
        table[name] = doc


def read_folder(folder: Path) -> tuple[_Folder, list[str], dict | None]:
    f = _Folder()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    shown = []
    for path in files:
        display = str(path)
        shown.append(display)
        try:
            docs = load_documents(path, display)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 if mark is not None else 0
            f.problems.append(Problem(display, line, f"YAML syntax: {getattr(exc, 'problem', None) or exc}"))
            continue
        for doc in docs:
            f.add(doc, display)
    lock = None
    lock_path = folder / LOCK_FILE
    if lock_path.exists():
        try:
            lock = json.loads(lock_path.read_text())
        except ValueError as exc:
            f.problems.append(Problem(str(lock_path), 1, f"allocation lock is not valid JSON: {exc}"))
    return f, shown, lock


def compile_folder(folder: str | Path, served: dict | None = None) -> CompileResult:
    """Compile every flag file under `folder`; raises FlagFileError listing all problems.

    Without `served`, the folder's `allocations.lock.json` is both the starting allocation and
    what the change is checked against (what `twofold flags validate|lock|compile` do). With
    `served`, the lock of the allocation a server is serving, the change is checked against
    that record, whether or not the author updated the folder's lock; the folder's lock is
    still the starting point when it extends `served` (moves nothing, forgets no reservation),
    so that replicas following the committed lock compile the same state; otherwise `served` is.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FlagFileError([Problem(str(folder), 0, "not a directory")])
    f, files, lock = read_folder(folder)
    if served is None:
        start, previous = lock, lock
    else:
        start = lock if lock is not None and extends(served, lock) else served
        previous = served
    result = _Compiler(f).compile(start, previous)
    result.lock_changed = lock != result.lock
    result.files = files
    return result


def _full(assignment_id: str, variant: str | None) -> dict:
    """An assignment spec giving everyone `variant` (or the client default when None)."""
    a: dict = {"assignmentId": assignment_id, "bucketRanges": [{"lower": 0, "upper": 1}]}
    a.update({"variant": {"variant": variant}} if variant else {"clientDefault": {}})
    return {"bucketCount": 1, "assignments": [a]}


@dataclass
class _Flag:
    """What rules of one flag need to know about it while they compile."""

    name: str
    variants: Located
    default: str | None
    rules: list[dict] = field(default_factory=list)
    holdout_namespaces: set[str] = field(default_factory=set)  # holdout rules already added


class _Compiler:
    """One compile: documents in, state out. Problems are collected on the folder, not raised early."""

    def __init__(self, folder: _Folder) -> None:
        self.f = folder
        self.warnings: list[str] = []
        self.clients: dict[str, dict] = {}
        self.segments: dict[str, dict] = {EVERYONE: {"name": EVERYONE, "state": "OK"}}
        self.requests: dict[str, SegmentRequest] = {}
        self.request_at: dict[str, tuple[str, int]] = {}  # segment -> where its share is written
        self.holdouts: dict[str, str] = {}  # namespace -> holdout segment
        self.flags: dict[str, dict] = {}
        self.experiments: dict[str, str] = {}  # "<flag>/<rule>" or experiment name -> segment
        self.pending_exclusive: list[tuple[Located, str, list]] = []
        # What the integrity check compares between an old and a new lock, and where to point.
        self.layouts: dict[str, dict] = {}  # experiment segment -> its arm layout and rules ahead
        self.listed: set[str] = set()  # segments of `overrides` rules (explicit unit lists)
        self.rule_at: dict[str, tuple[str, int]] = {}  # segment -> the rule's `name` line
        self.arms_at: dict[str, tuple[str, int]] = {}  # experiment segment -> its `arms` line

    def compile(self, lock: dict | None, previous: dict | None = None) -> CompileResult:
        """Compile starting from allocation `lock`; refuse what would move units `previous` allocated."""
        self.compile_clients()
        self.compile_segments()
        self.compile_namespaces()
        for doc in self.f.flags:
            self.compile_flag(doc)
        self.resolve_exclusivity()
        if self.f.problems:
            raise FlagFileError(sorted(self.f.problems, key=lambda p: (p.file, p.line)))
        return self.allocate(lock, previous)

    # -- clients, segments, namespaces -------------------------------------------------------

    def compile_clients(self) -> None:
        f = self.f
        for name, doc in sorted(f.clients.items()):
            f.check_keys(doc, {"client", "description", "secrets"}, "a client")
            secrets = doc.get("secrets")
            if not isinstance(secrets, list) or not secrets:
                f.error(doc, "a client needs `secrets:`, a list of {secret|secret_env, environments}", "client")
                continue
            for i, s in enumerate(secrets):
                if not isinstance(s, Located):
                    f.error(doc, "each secret is a mapping", "secrets")
                    continue
                f.check_keys(s, {"secret", "secret_env", "environments"}, "a client secret")
                value = s.get("secret")
                if value is None and s.get("secret_env"):
                    value = os.environ.get(str(s["secret_env"]))
                    if not value:
                        self.warnings.append(f"{s.file}:{s.line}: environment variable {s['secret_env']} is not "
                                             f"set; credential {i} of client {name} is disabled")
                        continue
                if not isinstance(value, str) or len(value) < 8:
                    f.error(s, "a secret must be text of at least 8 characters (or secret_env naming a variable)")
                    continue
                if value in self.clients:
                    f.error(s, "this secret is already used by another credential")
                    continue
                self.clients[value] = {"client": {"name": f"clients/{name}"},
                                       "clientCredential": {"name": f"clients/{name}/credentials/{i}",
                                                            "clientSecret": {"secret": value},
                                                            "environments": [str(e) for e in
                                                                             s.get("environments") or []]}}
        if not f.clients:
            self.clients[DEFAULT_CLIENT_SECRET] = {
                "client": {"name": f"clients/{DEFAULT_CLIENT}"},
                "clientCredential": {"name": f"clients/{DEFAULT_CLIENT}/credentials/0",
                                     "clientSecret": {"secret": DEFAULT_CLIENT_SECRET},
                                     "environments": ["development"]}}

    @property
    def client_names(self) -> list[str]:
        return sorted({c["client"]["name"] for c in self.clients.values()})

    def targeting(self, when: Any, file: str) -> tuple[dict | None, list[str]]:
        """(targeting, referenced segment names) of a `when:` condition."""
        if when is None:
            return None, []
        cc = ConditionCompiler(set(self.f.segments), self.f.problems, file)
        expression = cc.compile(when)
        return {"criteria": cc.criteria, "expression": expression}, cc.referenced_segments

    def add_segment(self, name: str, targeting: dict | None) -> None:
        segment: dict = {"name": name, "state": "OK"}
        if targeting is not None:
            segment["targeting"] = targeting
        self.segments[name] = segment

    def compile_segments(self) -> None:
        for name, doc in sorted(self.f.segments.items()):
            self.f.check_keys(doc, {"segment", "description", "when"}, "a segment")
            targeting, referenced = self.targeting(doc.get("when"), doc.file)
            if name in referenced:
                self.f.error(doc, f"segment {name!r} refers to itself", "when")
            self.add_segment(f"segments/{name}", targeting)

    def request(self, segment: str, share: float, node: Located, key: str, namespace: str | None = None,
                holdout: bool = False) -> None:
        self.requests[segment] = SegmentRequest(segment, share, namespace, holdout=holdout)
        self.request_at[segment] = (node.file, node.line_of(key))

    def compile_namespaces(self) -> None:
        for name, doc in sorted(self.f.namespaces.items()):
            self.f.check_keys(doc, {"namespace", "description", "holdout"}, "a namespace")
            if "holdout" in doc:
                share = _percent(doc["holdout"], doc, "holdout", self.f.problems)
                if share is not None:
                    segment = f"segments/holdout--{name}"
                    self.holdouts[name] = segment
                    self.add_segment(segment, None)
                    self.request(segment, share, doc, "holdout", name, holdout=True)

    # -- flags -----------------------------------------------------------------------------------

    def variant_ref(self, flag: _Flag, name: Any, node: Located, key: str) -> str | None:
        if not isinstance(name, str) or name not in flag.variants:
            self.f.error(node, f"unknown variant {name!r}; the flag has {sorted(flag.variants)}", key)
            return None
        return f"flags/{flag.name}/variants/{name}"

    def compile_variants(self, flag_name: str, variants: Located) -> list[dict]:
        out = []
        for vname, value in variants.items():
            if not _NAME.match(str(vname)):
                self.f.error(variants, f"variant name {vname!r} must be lowercase letters, digits and dashes", vname)
            if not isinstance(value, dict):
                self.f.error(variants, f"variant {vname!r}: the value must be a mapping (a JSON object)", vname)
                continue
            try:
                json_value = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                self.f.error(variants, f"variant {vname!r}: the value must be plain JSON (no timestamps)", vname)
                continue
            out.append({"name": f"flags/{flag_name}/variants/{vname}", "value": json_value})
        return out

    def flag_clients(self, doc: Located) -> list[str]:
        listed = doc.get("clients")
        if listed is None:
            return self.client_names
        if not (isinstance(listed, list) and all(isinstance(c, str) for c in listed)):
            self.f.error(doc, "`clients` is a list of client names", "clients")
            return self.client_names
        for c in listed:
            if f"clients/{c}" not in self.client_names:
                self.f.error(doc, f"unknown client {c!r}", "clients")
        return sorted(f"clients/{c}" for c in listed)

    def compile_flag(self, doc: Located) -> None:
        f = self.f
        name = doc["flag"]
        f.check_keys(doc, FLAG_KEYS, "a flag")
        variants = doc.get("variants")
        if not isinstance(variants, Located) or not variants:
            f.error(doc, "a flag needs `variants:`, a mapping of variant name to a JSON object value", "flag")
            return
        variant_list = self.compile_variants(name, variants)
        flag = _Flag(name, variants, None)
        flag.default = self.variant_ref(flag, doc["default"], doc, "default") if "default" in doc else None
        clients = self.flag_clients(doc)
        raw_rules = doc.get("rules") or LocatedList()
        if not isinstance(raw_rules, list):
            f.error(doc, "`rules` is a list", "rules")
            raw_rules = LocatedList()
        seen: set[str] = set()
        for rule in raw_rules:
            if not isinstance(rule, Located):
                f.error(raw_rules, "each rule is a mapping")
                continue
            self.compile_rule(flag, rule, seen)
        ahead: list[str] = []
        for compiled_rule in flag.rules:  # what could take an experiment's units before its rule is reached
            if compiled_rule["segment"] in self.layouts:
                self.layouts[compiled_rule["segment"]]["ahead"] = list(ahead)
            if compiled_rule["segment"] not in self.listed:
                ahead.append(compiled_rule["segment"])
        if flag.default:
            flag.rules.append({"name": f"flags/{name}/rules/default", "segment": EVERYONE, "enabled": True,
                               "targetingKeySelector": "", "assignmentSpec": _full("default", flag.default)})
        compiled = {"name": f"flags/{name}", "state": "ARCHIVED" if doc.get("archived") else "ACTIVE",
                    "clients": clients, "variants": variant_list, "rules": flag.rules}
        if doc.get("description"):
            compiled["description"] = str(doc["description"])
        self.flags[f"flags/{name}"] = compiled

    def compile_rule(self, flag: _Flag, rule: Located, seen: set[str]) -> None:
        f = self.f
        f.check_keys(rule, RULE_KEYS, "a rule")
        rname = rule.get("name")
        if not isinstance(rname, str) or not _NAME.match(rname):
            f.error(rule, "each rule needs a `name` of lowercase letters, digits and dashes", "name")
            return
        if rname in seen:
            f.error(rule, f"rule {rname!r} appears twice in flag {flag.name!r}", "name")
        seen.add(rname)
        actions = [k for k in ("serve", "rollout", "experiment", "overrides") if k in rule]
        if len(actions) != 1:
            f.error(rule, "a rule has exactly one of serve, rollout, experiment, overrides", "name")
            return
        selector = rule.get("targeting_key", "")
        if not isinstance(selector, str):
            f.error(rule, "`targeting_key` names the context attribute holding the unit", "targeting_key")
            selector = ""
        base: dict = {"enabled": bool(rule.get("enabled", True)), "targetingKeySelector": selector}
        if rule.get("environments"):
            base["environments"] = [str(e) for e in rule["environments"]]
        handler = {"overrides": self.overrides_rule, "serve": self.serve_rule, "rollout": self.rollout_rule,
                   "experiment": self.experiment_rule}[actions[0]]
        handler(flag, rule, rname, base)

    def overrides_rule(self, flag: _Flag, rule: Located, rname: str, base: dict) -> None:
        overrides = rule["overrides"]
        if not isinstance(overrides, Located) or not overrides:
            self.f.error(rule, "`overrides` maps a variant to a list of units", "overrides")
            return
        attribute = base["targetingKeySelector"] or "targeting_key"
        for vname, units in overrides.items():
            ref = self.variant_ref(flag, vname, overrides, vname)
            if not isinstance(units, list) or not units or not all(isinstance(u, str | int) for u in units):
                self.f.error(overrides, f"overrides for {vname!r} must be a list of unit ids", vname)
                continue
            if ref is None:
                continue
            segment = f"segments/{flag.name}--{rname}--{vname}"
            self.listed.add(segment)
            self.rule_at[segment] = (rule.file, rule.line_of("name"))
            self.add_segment(segment, {
                "criteria": {"c1": {"attribute": {"attributeName": attribute, "setRule": {
                    "values": [{"stringValue": str(u)} for u in units]}}}},
                "expression": {"ref": "c1"}})
            flag.rules.append({"name": f"flags/{flag.name}/rules/{rname}--{vname}", "segment": segment, **base,
                               "assignmentSpec": _full(f"override-{vname}", ref)})

    def serve_rule(self, flag: _Flag, rule: Located, rname: str, base: dict) -> None:
        ref = self.variant_ref(flag, rule["serve"], rule, "serve")
        if ref is None:
            return
        segment = f"segments/{flag.name}--{rname}"
        self.rule_at[segment] = (rule.file, rule.line_of("name"))
        self.add_segment(segment, self.targeting(rule.get("when"), rule.file)[0])
        flag.rules.append({"name": f"flags/{flag.name}/rules/{rname}", "segment": segment, **base,
                           "assignmentSpec": _full(rname, ref)})

    def rollout_rule(self, flag: _Flag, rule: Located, rname: str, base: dict) -> None:
        ro = rule["rollout"]
        if not isinstance(ro, Located):
            self.f.error(rule, "`rollout` is {variant: NAME, percentage: \"10%\"}", "rollout")
            return
        self.f.check_keys(ro, {"variant", "percentage"}, "a rollout")
        ref = self.variant_ref(flag, ro.get("variant"), ro, "variant")
        share = _percent(ro.get("percentage"), ro, "percentage", self.f.problems)
        if ref is None or share is None:
            return
        segment = f"segments/{flag.name}--{rname}"
        self.rule_at[segment] = (rule.file, rule.line_of("name"))
        self.add_segment(segment, self.targeting(rule.get("when"), rule.file)[0])
        self.request(segment, share, ro, "percentage")
        flag.rules.append({"name": f"flags/{flag.name}/rules/{rname}", "segment": segment, **base,
                           "assignmentSpec": _full(rname, ref)})

    def experiment_rule(self, flag: _Flag, rule: Located, rname: str, base: dict) -> None:
        f = self.f
        exp = rule["experiment"]
        if not isinstance(exp, Located):
            f.error(rule, "`experiment` is a mapping with allocation, arms, namespace ...", "experiment")
            return
        f.check_keys(exp, EXPERIMENT_KEYS, "an experiment")
        share = _percent(exp.get("allocation", 1.0), exp, "allocation", f.problems)
        arms = exp.get("arms")
        if not isinstance(arms, Located) or not arms:
            f.error(exp, "`arms` maps variant names to positive weights, e.g. {control: 1, treatment: 1}")
            return
        weights = []
        for vname, w in arms.items():
            ref = self.variant_ref(flag, vname, arms, vname)
            if not isinstance(w, int | float) or isinstance(w, bool) or w <= 0:
                f.error(arms, f"weight of {vname!r} must be a positive number", vname)
                continue
            if ref is not None:
                weights.append((ref, float(w)))
        bucket_count = exp.get("bucket_count", DEFAULT_BUCKET_COUNT)
        if (not isinstance(bucket_count, int) or isinstance(bucket_count, bool)
                or not 1 <= bucket_count <= 1_000_000):
            f.error(exp, "`bucket_count` must be an integer 1..1000000", "bucket_count")
            return
        namespace = exp.get("namespace")
        if namespace is not None and (not isinstance(namespace, str) or not _NAME.match(namespace)):
            f.error(exp, "`namespace` is a name of lowercase letters, digits and dashes", "namespace")
            namespace = None
        if share is None or not weights or len(weights) != len(arms):
            return
        segment = f"segments/{flag.name}--{rname}"
        self.rule_at[segment] = (rule.file, rule.line_of("name"))
        self.arms_at[segment] = (exp.file, exp.line_of("arms"))
        ident = str(exp.get("name") or f"{flag.name}/{rname}")
        if ident in self.experiments:
            f.error(exp, f"experiment {ident!r} is defined twice", "name")
        self.experiments[ident] = segment
        exclusive = exp.get("exclusive_with") or []
        if not isinstance(exclusive, list):
            f.error(exp, "`exclusive_with` is a list of experiment names (<flag>/<rule> or experiment name)",
                    "exclusive_with")
            exclusive = []
        self.pending_exclusive.append((exp, segment, list(exclusive)))
        self.request(segment, share, exp, "allocation", namespace)
        self.add_segment(segment, self.targeting(rule.get("when"), rule.file)[0])

        total = sum(w for _, w in weights)
        assignments, cumulative, lower = [], 0.0, 0
        for ref, w in weights:
            cumulative += w
            upper = round(bucket_count * cumulative / total)
            assignments.append({"assignmentId": f"{ident}:{ref.rpartition('/')[2]}", "variant": {"variant": ref},
                                "bucketRanges": [{"lower": lower, "upper": upper}]})
            lower = upper
        if namespace and namespace in self.holdouts and namespace not in flag.holdout_namespaces:
            # Holdout units are matched first and get the flag's default, so their exposures are logged.
            flag.holdout_namespaces.add(namespace)
            flag.rules.append({"name": f"flags/{flag.name}/rules/holdout--{namespace}",
                               "segment": self.holdouts[namespace], **base,
                               "assignmentSpec": _full(f"holdout--{namespace}", flag.default)})
        compiled = {"name": f"flags/{flag.name}/rules/{rname}", "segment": segment, **base,
                    "assignmentSpec": {"bucketCount": bucket_count, "assignments": assignments}}
        sticky = exp.get("sticky", False)
        arm_ranges = [[a["variant"]["variant"], r["lower"], r["upper"]] for a in assignments for r in a["bucketRanges"]]
        self.layouts[segment] = {"rule": compiled["name"], "bucketCount": bucket_count, "arms": arm_ranges,
                                 "selector": base["targetingKeySelector"], "sticky": sticky is True}
        if not isinstance(sticky, bool):
            f.error(exp, "`sticky` is true or false", "sticky")
        elif sticky:
            # Units keep the variant they first got, even after targeting, allocation or weights change.
            materialization = f"materializations/{flag.name}--{rname}"
            compiled["materializationSpec"] = {
                "readMaterialization": materialization, "writeMaterialization": materialization,
                "mode": {"segmentTargetingCanBeIgnored": True}}
        flag.rules.append(compiled)

    # -- allocation ------------------------------------------------------------------------------

    def resolve_exclusivity(self) -> None:
        for exp, segment, names in self.pending_exclusive:
            partners = set()
            for other in names:
                target = self.experiments.get(str(other))
                if target is None:
                    self.f.error(exp, f"exclusive_with names unknown experiment {other!r}; known: "
                                      f"{sorted(self.experiments)}", "exclusive_with")
                else:
                    partners.add(target)
            r = self.requests[segment]
            self.requests[segment] = SegmentRequest(r.segment, r.proportion, r.namespace, frozenset(partners),
                                                    r.holdout)

    def where(self, move: Move) -> tuple[str, int]:
        """The file:line a refused move points at: the line of the culprit that moves the units."""
        if move.what == "account":
            return self.f.account_at
        table = {"arms": self.arms_at, "ahead": self.rule_at}.get(move.what, self.request_at)
        return table.get(move.culprit) or self.request_at.get(move.culprit) or self.rule_at.get(move.culprit, ("?", 0))

    def allocate(self, lock: dict | None, previous: dict | None) -> CompileResult:
        allocation: Allocation = allocate(self.requests.values(), lock)
        if allocation.shortfalls:
            raise FlagFileError([
                Problem(*self.request_at[seg], f"{seg} needs {wanted / 1e4:g}% of units but only {got / 1e4:g}% "
                                               "are free of the experiments and holdouts it is exclusive with "
                                               "(buckets a running partner ever held stay out of reach until that "
                                               "partner is removed)")
                for seg, (wanted, got) in sorted(allocation.shortfalls.items())])
        new_lock = {**allocation.lock, "account": f"accounts/{self.f.account or DEFAULT_ACCOUNT}",
                    "experiments": {seg: self.layouts[seg] for seg in sorted(self.layouts)}}
        refused = moves(previous, new_lock)
        if refused:
            raise FlagFileError([Problem(*self.where(m), f"refused: this change would move units of what is "
                                                         f"running: {m.message}") for m in refused])
        bitsets = {name: encode_bitset(allocation.bits(name)) if name in self.requests else "ALL"
                   for name in sorted(self.segments)}
        state = {"account": {"name": f"accounts/{self.f.account or DEFAULT_ACCOUNT}"}, "flags": self.flags,
                 "segments": dict(sorted(self.segments.items())), "bitsets": bitsets, "bloomFilters": {},
                 "clients": dict(sorted(self.clients.items()))}
        return CompileResult(state, new_lock, lock != new_lock, warnings=self.warnings)


def read_lock(path: Path) -> dict | None:
    """An allocation lock from `path` (None when there is none); ValueError when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_lock(path: Path, lock: dict) -> None:
    """Write an allocation lock atomically (readers see the old or the new file, never half of one).

    The temporary name is unique per process, so replicas sharing a record's folder never write
    into one another's temporary file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_flag_source(path: str | Path) -> tuple[bytes, list[str]]:
    """State JSON bytes from a flags folder (compiled) or a Confidence JSON state file, plus warnings."""
    path = Path(path)
    if path.is_dir():
        result = compile_folder(path)
        return result.state_json(), result.warnings
    return path.read_bytes(), []
