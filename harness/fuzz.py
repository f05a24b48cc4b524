"""Schemathesis against the service's own OpenAPI schema, in process (ASGI, lifespan included).

Every operation is fuzzed in both generation modes (positive: valid by the schema; negative: invalid). A quarter
of the generated cases have their item ids swapped for ids the bundle really holds, so the fuzz also reaches the
code behind validation (recommend, events, delete, ingest replacing a bundle item) instead of stopping at 422
``unknown_items``. Checks on every response: no 5xx (and no exception escaping the app), the status code is
documented, the body conforms to the documented schema, and every 4xx body is the one error shape.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from harness.launch import is_error_body

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
ID_FIELDS = ("history", "item_ids", "exclude")


@dataclass
class FuzzReport:
    requests: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_operation: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.by_status.items()))
        return (
            f"requests {self.requests} in {self.seconds:.1f} s over {len(self.by_operation)} operation/modes; "
            f"5xx {self.server_errors}; schema violations {self.schema_violations}; statuses {{{statuses}}}"
        )


def _with_known_ids(case: Any, choice: int, ids: list[str]) -> Any:
    """``case`` with its item ids replaced by real ones (choice 0: unchanged)."""
    if choice != 0:
        return case
    new = case.derive()
    if isinstance(new.body, dict):
        for name in ID_FIELDS:
            if isinstance(new.body.get(name), list):
                new.body[name] = ids[: max(1, len(new.body[name]))]
        if "item_id" in new.body:
            new.body["item_id"] = ids[0]
        if isinstance(new.body.get("requests"), list):
            new.body["requests"] = [
                {**r, "history": ids} if isinstance(r, dict) and isinstance(r.get("history"), list) else r
                for r in new.body["requests"]
            ]
    if "item_id" in new.path_parameters:
        new.path_parameters["item_id"] = ids[0]
    return new


def run_fuzz(app: Any, known_ids: list[str], examples: int, derandomize: bool = True) -> FuzzReport:
    """Fuzz every operation of ``app`` with ``examples`` cases per operation and mode; never raises on findings."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    known = st.lists(st.sampled_from(known_ids), min_size=1, max_size=8)

    @schema.hook
    def flatmap_case(context: Any, case: Any) -> Any:
        return st.tuples(st.integers(0, 3), known).map(lambda t: _with_known_ids(case, *t))

    report = FuzzReport()
    started = time.perf_counter()
    for result in schema.get_all_operations():
        for mode in GenerationMode:
            _fuzz_operation(result.ok(), mode, examples, derandomize, report)
    report.seconds = time.perf_counter() - started
    schemathesis.python.asgi.shutdown_lifespans()
    return report


def _fuzz_operation(operation: Any, mode: GenerationMode, examples: int, derandomize: bool, report: FuzzReport) -> None:
    label = f"{operation.label} [{mode.value}]"

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz_one(case: Any) -> None:
        report.requests += 1
        report.by_operation[label] += 1
        try:
            response = case.call()
        except BaseException as exc:  # an exception escaping the app is a server error
            report.server_errors += 1
            report.failures.append(f"{label}: the app raised {exc!r}"[:2000])
            return
        report.by_status[response.status_code] += 1
        if response.status_code >= 500 and not _documented_503(operation, response):
            report.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # FailureGroup is a BaseExceptionGroup
            report.schema_violations += int(response.status_code < 500)
            report.failures.append(f"{label}: {exc}"[:2000])
        if response.status_code >= 400 and operation.label != "GET /readyz":
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            if not is_error_body(body):
                report.schema_violations += 1
                report.failures.append(f"{label}: {response.status_code} not the error shape: {body!r}"[:2000])

    with contextlib.suppress(Unsatisfiable):  # e.g. negative cases of an operation without parameters
        fuzz_one()


def _documented_503(operation: Any, response: Any) -> bool:
    """A 503 is a server error unless it is /readyz saying it is not ready (its documented answer)."""
    return response.status_code == 503 and operation.label == "GET /readyz"
