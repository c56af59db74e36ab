"""Compile a folder of flag YAML files into resolver state (Confidence's JSON layout).

A folder holds any number of `*.yaml` / `*.yml` files, each with one or more documents. A
document's first key says what it is: `flag`, `segment` (targeting reused by name), `namespace`
(an exclusion layer, optionally with a holdout), `client` (credentials and environments) or
`account`. See docs/assignment.md for the format; `examples/flags/` holds a worked example.

Compiling is deterministic: the same files always give byte-identical state. Allocation
buckets come from `assignment_server.authoring.allocator`, starting from the folder's
`allocations.lock.json` when present (written by `twofold flags lock`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from assignment_server.authoring.allocator import Allocation, SegmentRequest, allocate
from assignment_server.authoring.conditions import ConditionCompiler
from assignment_server.authoring.errors import FlagFileError, Problem
from assignment_server.authoring.yamlio import Located, LocatedList, load_documents
from assignment_server.resolver.state import encode_bitset

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
    lock_changed: bool
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


def compile_folder(folder: str | Path) -> CompileResult:
    """Compile every flag file under `folder`; raises FlagFileError listing all problems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlagFileError([Problem(str(folder), 0, "not a directory")])
    f, files, lock = read_folder(folder)
    result = _compile(f, lock)
    result.files = files
    return result


def _compile(f: _Folder, lock: dict | None) -> CompileResult:
    account = f"accounts/{f.account or DEFAULT_ACCOUNT}"
    warnings: list[str] = []

    # Clients
    clients: dict[str, dict] = {}
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
                    warnings.append(f"{s.file}:{s.line}: environment variable {s['secret_env']} is not set; "
                                    f"credential {i} of client {name} is disabled")
                    continue
            if not isinstance(value, str) or len(value) < 8:
                f.error(s, "a secret must be text of at least 8 characters (or secret_env naming a variable)")
                continue
            if value in clients:
                f.error(s, "this secret is already used by another credential")
                continue
            envs = s.get("environments") or []
            clients[value] = {"client": {"name": f"clients/{name}"},
                              "clientCredential": {"name": f"clients/{name}/credentials/{i}",
                                                   "clientSecret": {"secret": value},
                                                   "environments": [str(e) for e in envs]}}
    if not f.clients:
        clients[DEFAULT_CLIENT_SECRET] = {
            "client": {"name": f"clients/{DEFAULT_CLIENT}"},
            "clientCredential": {"name": f"clients/{DEFAULT_CLIENT}/credentials/0",
                                 "clientSecret": {"secret": DEFAULT_CLIENT_SECRET},
                                 "environments": ["development"]}}
    all_clients = sorted({c["client"]["name"] for c in clients.values()})

    # Reusable segments
    segment_names = set(f.segments)
    segments: dict[str, dict] = {EVERYONE: {"name": EVERYONE, "state": "OK"}}
    for name, doc in sorted(f.segments.items()):
        f.check_keys(doc, {"segment", "description", "when"}, "a segment")
        cc = ConditionCompiler(segment_names, f.problems, doc.file)
        expression = cc.compile(doc.get("when")) if "when" in doc else None
        if name in cc.referenced_segments:
            f.error(doc, f"segment {name!r} refers to itself", "when")
        seg: dict = {"name": f"segments/{name}", "state": "OK"}
        if expression is not None:
            seg["targeting"] = {"criteria": cc.criteria, "expression": expression}
        segments[seg["name"]] = seg

    # Namespaces and their holdouts
    requests: dict[str, SegmentRequest] = {}
    request_at: dict[str, tuple[str, int]] = {}  # segment -> where its share is written
    holdouts: dict[str, str] = {}
    for name, doc in sorted(f.namespaces.items()):
        f.check_keys(doc, {"namespace", "description", "holdout"}, "a namespace")
        if "holdout" in doc:
            share = _percent(doc["holdout"], doc, "holdout", f.problems)
            if share is not None:
                seg_name = f"segments/holdout--{name}"
                holdouts[name] = seg_name
                segments[seg_name] = {"name": seg_name, "state": "OK"}
                requests[seg_name] = SegmentRequest(seg_name, share, name, holdout=True)
                request_at[seg_name] = (doc.file, doc.line_of("holdout"))

    flags: dict[str, dict] = {}
    experiment_segments: dict[str, str] = {}  # "<flag>/<rule>" or experiment name -> segment
    pending_exclusive: list[tuple[Located, str, list]] = []
    for doc in f.flags:
        flag_name = doc["flag"]
        f.check_keys(doc, FLAG_KEYS, "a flag")
        variants = doc.get("variants")
        if not isinstance(variants, Located) or not variants:
            f.error(doc, "a flag needs `variants:`, a mapping of variant name to a JSON object value", "flag")
            continue
        variant_list = []
        for vname, value in variants.items():
            if not _NAME.match(str(vname)):
                f.error(variants, f"variant name {vname!r} must be lowercase letters, digits and dashes", vname)
            if not isinstance(value, dict):
                f.error(variants, f"variant {vname!r}: the value must be a mapping (a JSON object)", vname)
                continue
            try:
                json_value = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                f.error(variants, f"variant {vname!r}: the value must be plain JSON (no timestamps)", vname)
                continue
            variant_list.append({"name": f"flags/{flag_name}/variants/{vname}", "value": json_value})

        def variant_ref(name: Any, node: Located, key: str, flag_name: str = flag_name,
                        variants: Located = variants) -> str | None:
            if not isinstance(name, str) or name not in variants:
                f.error(node, f"unknown variant {name!r}; the flag has {sorted(variants)}", key)
                return None
            return f"flags/{flag_name}/variants/{name}"

        default_variant = variant_ref(doc["default"], doc, "default") if "default" in doc else None
        flag_clients = doc.get("clients")
        if flag_clients is None:
            clients_of_flag = all_clients
        elif isinstance(flag_clients, list) and all(isinstance(c, str) for c in flag_clients):
            clients_of_flag = sorted(f"clients/{c}" for c in flag_clients)
            for c in flag_clients:
                if f"clients/{c}" not in all_clients:
                    f.error(doc, f"unknown client {c!r}", "clients")
        else:
            f.error(doc, "`clients` is a list of client names", "clients")
            clients_of_flag = all_clients

        rules_out: list[dict] = []
        rule_names: set[str] = set()
        holdout_rules: set[str] = set()  # namespaces whose holdout rule this flag already has
        raw_rules = doc.get("rules") or LocatedList()
        if not isinstance(raw_rules, list):
            f.error(doc, "`rules` is a list", "rules")
            raw_rules = LocatedList()
        for rule in raw_rules:
            if not isinstance(rule, Located):
                f.error(raw_rules, "each rule is a mapping")
                continue
            f.check_keys(rule, RULE_KEYS, "a rule")
            rname = rule.get("name")
            if not isinstance(rname, str) or not _NAME.match(rname):
                f.error(rule, "each rule needs a `name` of lowercase letters, digits and dashes", "name")
                continue
            if rname in rule_names:
                f.error(rule, f"rule {rname!r} appears twice in flag {flag_name!r}", "name")
            rule_names.add(rname)
            actions = [k for k in ("serve", "rollout", "experiment", "overrides") if k in rule]
            if len(actions) != 1:
                f.error(rule, "a rule has exactly one of serve, rollout, experiment, overrides", "name")
                continue
            action = actions[0]
            selector = rule.get("targeting_key", "")
            if not isinstance(selector, str):
                f.error(rule, "`targeting_key` names the context attribute holding the unit", "targeting_key")
                selector = ""
            envs = rule.get("environments") or []
            base = {"enabled": bool(rule.get("enabled", True)), "targetingKeySelector": selector}
            if envs:
                base["environments"] = [str(e) for e in envs]
            rule_id = f"flags/{flag_name}/rules/{rname}"
            seg_name = f"segments/{flag_name}--{rname}"

            def rule_segment(seg_name: str, when: Any, rule: Located = rule) -> dict:
                seg: dict = {"name": seg_name, "state": "OK"}
                if when is not None:
                    cc = ConditionCompiler(segment_names, f.problems, rule.file)
                    seg["targeting"] = {"criteria": cc.criteria, "expression": cc.compile(when)}
                segments[seg_name] = seg
                return seg

            def full(assignment_id: str, variant: str | None) -> dict:
                a: dict = {"assignmentId": assignment_id, "bucketRanges": [{"lower": 0, "upper": 1}]}
                a.update({"variant": {"variant": variant}} if variant else {"clientDefault": {}})
                return {"bucketCount": 1, "assignments": [a]}

            if action == "overrides":
                overrides = rule["overrides"]
                if not isinstance(overrides, Located) or not overrides:
                    f.error(rule, "`overrides` maps a variant to a list of units", "overrides")
                    continue
                for vname, units in overrides.items():
                    ref = variant_ref(vname, overrides, vname)
                    if not isinstance(units, list) or not units or not all(isinstance(u, str | int) for u in units):
                        f.error(overrides, f"overrides for {vname!r} must be a list of unit ids", vname)
                        continue
                    if ref is None:
                        continue
                    sname = f"{seg_name}--{vname}"
                    segments[sname] = {"name": sname, "state": "OK", "targeting": {
                        "criteria": {"c1": {"attribute": {"attributeName": selector or "targeting_key", "setRule": {
                            "values": [{"stringValue": str(u)} for u in units]}}}},
                        "expression": {"ref": "c1"}}}
                    rules_out.append({"name": f"{rule_id}--{vname}", "segment": sname, **base,
                                      "assignmentSpec": full(f"override-{vname}", ref)})
                continue

            if action == "serve":
                ref = variant_ref(rule["serve"], rule, "serve")
                if ref is None:
                    continue
                rule_segment(seg_name, rule.get("when"))
                rules_out.append({"name": rule_id, "segment": seg_name, **base,
                                  "assignmentSpec": full(rname, ref)})
                continue

            if action == "rollout":
                ro = rule["rollout"]
                if not isinstance(ro, Located):
                    f.error(rule, "`rollout` is {variant: NAME, percentage: \"10%\"}", "rollout")
                    continue
                f.check_keys(ro, {"variant", "percentage"}, "a rollout")
                ref = variant_ref(ro.get("variant"), ro, "variant")
                share = _percent(ro.get("percentage"), ro, "percentage", f.problems)
                if ref is None or share is None:
                    continue
                rule_segment(seg_name, rule.get("when"))
                requests[seg_name] = SegmentRequest(seg_name, share)
                request_at[seg_name] = (ro.file, ro.line_of("percentage"))
                rules_out.append({"name": rule_id, "segment": seg_name, **base,
                                  "assignmentSpec": full(rname, ref)})
                continue

            exp = rule["experiment"]
            if not isinstance(exp, Located):
                f.error(rule, "`experiment` is a mapping with allocation, arms, namespace ...", "experiment")
                continue
            f.check_keys(exp, EXPERIMENT_KEYS, "an experiment")
            share = _percent(exp.get("allocation", 1.0), exp, "allocation", f.problems)
            arms = exp.get("arms")
            if not isinstance(arms, Located) or not arms:
                f.error(exp, "`arms` maps variant names to positive weights, e.g. {control: 1, treatment: 1}")
                continue
            weights = []
            for vname, w in arms.items():
                ref = variant_ref(vname, arms, vname)
                if not isinstance(w, int | float) or isinstance(w, bool) or w <= 0:
                    f.error(arms, f"weight of {vname!r} must be a positive number", vname)
                    continue
                if ref is not None:
                    weights.append((ref, float(w)))
            bucket_count = exp.get("bucket_count", DEFAULT_BUCKET_COUNT)
            if (not isinstance(bucket_count, int) or isinstance(bucket_count, bool)
                    or not 1 <= bucket_count <= 1_000_000):
                f.error(exp, "`bucket_count` must be an integer 1..1000000", "bucket_count")
                continue
            namespace = exp.get("namespace")
            if namespace is not None and (not isinstance(namespace, str) or not _NAME.match(namespace)):
                f.error(exp, "`namespace` is a name of lowercase letters, digits and dashes", "namespace")
                namespace = None
            if share is None or not weights or len(weights) != len(arms):
                continue
            ident = str(exp.get("name") or f"{flag_name}/{rname}")
            if ident in experiment_segments:
                f.error(exp, f"experiment {ident!r} is defined twice", "name")
            experiment_segments[ident] = seg_name
            excl = exp.get("exclusive_with") or []
            if not isinstance(excl, list):
                f.error(exp, "`exclusive_with` is a list of experiment names (<flag>/<rule> or experiment name)",
                        "exclusive_with")
                excl = []
            pending_exclusive.append((exp, seg_name, list(excl)))
            requests[seg_name] = SegmentRequest(seg_name, share, namespace)
            request_at[seg_name] = (exp.file, exp.line_of("allocation"))
            rule_segment(seg_name, rule.get("when"))
            total = sum(w for _, w in weights)
            assignments, cum, lower = [], 0.0, 0
            for ref, w in weights:
                cum += w
                upper = round(bucket_count * cum / total)
                assignments.append({"assignmentId": f"{ident}:{ref.rpartition('/')[2]}",
                                    "variant": {"variant": ref},
                                    "bucketRanges": [{"lower": lower, "upper": upper}]})
                lower = upper
            if namespace and namespace in holdouts and namespace not in holdout_rules:
                holdout_rules.add(namespace)
                rules_out.append({"name": f"flags/{flag_name}/rules/holdout--{namespace}",
                                  "segment": holdouts[namespace], **base,
                                  "assignmentSpec": full(f"holdout--{namespace}", default_variant)})
            experiment_rule = {"name": rule_id, "segment": seg_name, **base,
                               "assignmentSpec": {"bucketCount": bucket_count, "assignments": assignments}}
            sticky = exp.get("sticky", False)
            if not isinstance(sticky, bool):
                f.error(exp, "`sticky` is true or false", "sticky")
            elif sticky:
                # Units keep the variant they first got, even after targeting, allocation or weights change.
                materialization = f"materializations/{flag_name}--{rname}"
                experiment_rule["materializationSpec"] = {
                    "readMaterialization": materialization, "writeMaterialization": materialization,
                    "mode": {"segmentTargetingCanBeIgnored": True}}
            rules_out.append(experiment_rule)

        if default_variant:
            rules_out.append({"name": f"flags/{flag_name}/rules/default", "segment": EVERYONE, "enabled": True,
                              "targetingKeySelector": "", "assignmentSpec": full("default", default_variant)})
        flags[f"flags/{flag_name}"] = {
            "name": f"flags/{flag_name}", "state": "ARCHIVED" if doc.get("archived") else "ACTIVE",
            "clients": clients_of_flag, "variants": variant_list, "rules": rules_out}
        if doc.get("description"):
            flags[f"flags/{flag_name}"]["description"] = str(doc["description"])

    for exp, seg_name, excl in pending_exclusive:
        resolved = set()
        for other in excl:
            target = experiment_segments.get(str(other))
            if target is None:
                f.error(exp, f"exclusive_with names unknown experiment {other!r}; known: "
                             f"{sorted(experiment_segments)}", "exclusive_with")
            else:
                resolved.add(target)
        r = requests[seg_name]
        requests[seg_name] = SegmentRequest(r.segment, r.proportion, r.namespace, frozenset(resolved), r.holdout)

    if f.problems:
        raise FlagFileError(sorted(f.problems, key=lambda p: (p.file, p.line)))

    allocation: Allocation = allocate(requests.values(), lock)
    if allocation.shortfalls:
        raise FlagFileError([
            Problem(*request_at[seg], f"{seg} needs {wanted / 1e4:g}% of units but only {got / 1e4:g}% are free of "
                                      "the experiments and holdouts it is exclusive with")
            for seg, (wanted, got) in sorted(allocation.shortfalls.items())])
    bitsets: dict[str, Any] = {}
    for seg_name in sorted(segments):
        bitsets[seg_name] = encode_bitset(allocation.bits(seg_name)) if seg_name in requests else "ALL"
    state = {"account": {"name": account}, "flags": flags, "segments": dict(sorted(segments.items())),
             "bitsets": bitsets, "bloomFilters": {}, "clients": dict(sorted(clients.items()))}
    lock_changed = (lock or {}) != allocation.lock
    if lock_changed and requests:
        warnings.append(f"{LOCK_FILE} is missing or out of date; run `twofold flags lock DIR` and commit it, "
                        "so later ramps and new exclusive experiments cannot move existing units")
    return CompileResult(state, allocation.lock, lock_changed, warnings=warnings)


def load_flag_source(path: str | Path) -> tuple[bytes, list[str]]:
    """State JSON bytes from a flags folder (compiled) or a Confidence JSON state file, plus warnings."""
    path = Path(path)
    if path.is_dir():
        result = compile_folder(path)
        return result.state_json(), result.warnings
    return path.read_bytes(), []
