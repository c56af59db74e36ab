"""Would this state have made this assignment? The check behind exposures a client reports itself.

An SDK that evaluates flags locally reports its exposures as (flag, rule, unit, variant,
assignment id) without a sealed resolve token, so the server must not take them on trust: a
client could otherwise write exposures for any rule and variant, in any environment. Everything
that does not depend on the evaluation context is re-derived from the server's own state for the
reporting client: the flag is active and the client's; the rule exists, is enabled and is
enabled for one of the credential's environments; the unit is in the rule's allocation (the
segment's bucket bitset); and the unit's arm bucket gives that variant and assignment id (for a
sticky rule, whose units keep a stored variant, the variant must be one the rule assigns). The
segment's targeting (attributes of the context such as country) is the one thing the server
cannot re-check, since the context is not sent with an exposure.
"""

from __future__ import annotations

from twofold.resolver.bucketing import allocation_bucket
from twofold.resolver.resolve import Resolver
from twofold.resolver.state import Client, ResolverState


def assignment_problem(state: ResolverState, client: Client, flag_name: str, rule_name: str, unit: str,
                       variant: str, assignment_id: str) -> str | None:
    """None when `state` would have assigned `variant` of `flag_name` to `unit` under `rule_name`
    for `client` (targeting aside); otherwise why not, in words. `variant` is the full name
    (`flags/x/variants/y`), or "" for the client default."""
    flag = state.flags.get(flag_name)
    if flag is None or client.name not in flag.clients:
        return f"{flag_name} is not a flag of this client"
    if flag.state != "ACTIVE":
        return f"{flag_name} is archived"
    rule = next((r for r in flag.rules if r.name == rule_name), None)
    if rule is None:
        return f"{flag_name} has no rule {rule_name!r}"
    if not rule.enabled:
        return f"rule {rule_name} is disabled"
    if rule.environments and rule.environments.isdisjoint(client.environments):
        return (f"rule {rule_name} is enabled only in {', '.join(sorted(rule.environments))}, not in this "
                f"client's environments ({', '.join(sorted(client.environments)) or 'none'})")
    segment = state.segments.get(rule.segment)
    if segment is None or rule.assignments is None:
        return f"rule {rule_name} assigns no variants"
    bitset = segment.bitset
    if bitset is not None and not bitset.full and allocation_bucket(state.salt, unit) not in bitset:
        return f"unit {unit} is not in the allocation of rule {rule_name}"
    if rule.read_materialization:
        # Sticky rule: the unit keeps the variant stored when it was first assigned, which may not
        # be its bucket's today, and the store is not consulted here (it may be a remote one).
        # The claim must still be a variant this rule assigns.
        if any(a.kind == "variant" and a.variant == variant for a in rule.assignments):
            return None
        return f"rule {rule_name} never assigns {variant or 'the default'}"
    assignment = Resolver._pick_assignment(rule, unit)
    if assignment is None or assignment.kind == "fallthrough":
        return f"rule {rule_name} assigns unit {unit} no variant"
    expected = assignment.variant if assignment.kind == "variant" else ""
    if expected != variant:
        return (f"rule {rule_name} assigns unit {unit} {expected or 'the client default'}, "
                f"not {variant or 'the default'}")
    if assignment_id and assignment_id != assignment.assignment_id:
        return f"rule {rule_name} gives unit {unit} assignment {assignment.assignment_id}, not {assignment_id}"
    return None
