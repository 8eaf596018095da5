"""Who rings, in which order: the customer's last manager, the group of what they bought last, then the
department (menu choice, the tracking number's category, the number's own group)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shopcall.call import DialStrategy
from shopcall.directory import Caller, Directory, Group, Member, NumberRoute


@dataclass(frozen=True)
class RingStep:
    reason: str  # sticky | last_category | menu | category | number
    label: str  # the group's name, or the manager's endpoint
    endpoints: tuple[str, ...]
    strategy: DialStrategy
    timeout: int
    group: Group | None = None
    members: tuple[Member, ...] = ()
    skip_busy: bool = False  # ask the PBX who is on a call, just before ringing, and leave them out


async def plan(
    directory: Directory, route: NumberRoute, caller: Caller, *, menu_group: str | None,
    in_wrapup: frozenset[str] = frozenset(),
) -> tuple[list[RingStep], list[dict]]:
    """The ring steps for this call and, for the call's route log, the steps skipped and why. Agents
    `in_wrapup` are left out of a step unless nobody else is in it."""
    steps: list[RingStep] = []
    skipped: list[dict] = []

    main_reason, main_name = (
        ("menu", menu_group) if menu_group
        else ("category", route.category_group) if route.category_group
        else ("number", route.group_name)
    )
    main = await directory.group(main_name) if main_name else None
    if main_name and main is None:
        raise LookupError(f"group {main_name!r} does not exist")

    if route.sticky and caller.customer_id is not None:
        manager = caller.manager
        if manager is None:
            skipped.append({"ring": "sticky", "skipped": caller.manager_state})
        elif menu_group and main and all(m.employee_id != manager.employee_id for m in main.members):
            # they chose a department: their manager is rung first only if they work in it
            skipped.append({"ring": "sticky", "skipped": "not_in_chosen_group", "manager": manager.endpoint})
        else:
            # the manager is skipped when busy if the department the call goes to next skips its busy agents
            steps.append(RingStep("sticky", manager.endpoint, (manager.endpoint,), DialStrategy.RINGALL,
                                  route.sticky_seconds, None, (manager,), bool(main and main.skip_busy)))

    if route.by_last_category and not menu_group and caller.last_category_group:
        if caller.last_category_group != main_name:
            group = await directory.group(caller.last_category_group)
            if group and group.members:
                steps.append(_group_step("last_category", group, route))
            else:
                skipped.append({"ring": "last_category", "skipped": "nobody_available",
                                "group": caller.last_category_group})

    if main is not None:
        if main.members:
            steps.append(_group_step(main_reason, main, route))
        else:
            skipped.append({"ring": main_reason, "skipped": "nobody_available", "group": main.name})
        if main_reason == "category" and route.group_name and route.group_name != main.name:
            fallback = await directory.group(route.group_name)
            if fallback and fallback.members:
                steps.append(_group_step("number", fallback, route))
    if in_wrapup:
        steps = [_rested(step, in_wrapup, skipped) for step in steps]
    return steps, skipped


def _rested(step: RingStep, in_wrapup: frozenset[str], skipped: list[dict]) -> RingStep:
    tired = [m.endpoint for m in step.members if m.endpoint in in_wrapup]
    if not tired:
        return step
    fresh = tuple(m for m in step.members if m.endpoint not in in_wrapup)
    if not fresh:  # wrap-up is a pause between calls, never a reason to miss one
        skipped.append({"ring": step.reason, "wrapup_ignored": tired})
        return step
    skipped.append({"ring": step.reason, "skipped": "wrapup", "agents": tired})
    return without(step, frozenset(tired))


def _group_step(reason: str, group: Group, route: NumberRoute) -> RingStep:
    timeout = group.ring_timeout
    if route.overflow_robot and route.overflow_seconds:
        timeout = min(timeout, route.overflow_seconds)  # the robot takes over sooner
    return RingStep(reason, group.name, tuple(m.endpoint for m in group.members), group.dial_strategy,
                    timeout, group, group.members, group.skip_busy)


def without(step: RingStep, endpoints: frozenset[str]) -> RingStep:
    """The step less these agents (on a call, in wrap-up)."""
    members = tuple(m for m in step.members if m.endpoint not in endpoints)
    return dataclasses.replace(step, endpoints=tuple(e for e in step.endpoints if e not in endpoints),
                               members=members)
