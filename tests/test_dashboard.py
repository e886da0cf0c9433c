"""The Grafana dashboard and the Prometheus rules refer only to metrics the services expose.

The exposed names come from the live prometheus_client registry after importing
`datacreator.metrics` (counters as `_total`, histograms as `_bucket`, `_sum`, `_count`); the
recording rules of deploy/prometheus/rules.yml add their own names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import datacreator.metrics as metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "datacreator.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

# Series Prometheus makes itself for every scrape target, and labels it adds to every series.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
TARGET_LABELS = {"job", "instance"}
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan", "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")


# -- PromQL helpers -----------------------------------------------------------------------------


def _clean(expr: str) -> str:
    """Variables replaced by a duration, strings by an empty one: what is left is plain PromQL."""
    return _STRING.sub('""', _GRAFANA_VARIABLE.sub("5m", expr))


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions, keywords and labels left out)."""
    text = _clean(expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    return {m.group(1) for m in _IDENTIFIER.finditer(text) if not m.group(2) and m.group(1) not in PROMQL_KEYWORDS}


def selector_labels(expr: str) -> dict[str, set[str]]:
    """{metric: label names used in its `{...}` matchers}."""
    found: dict[str, set[str]] = {}
    for metric, matchers in _SELECTOR.findall(_clean(expr)):
        labels = {m.split("=")[0].split("!")[0].strip() for m in re.split(r",", matchers) if m.strip()}
        labels = {re.match(r"[\w]+", lbl).group(0) for lbl in labels if re.match(r"[\w]+", lbl)}
        found.setdefault(metric, set()).update(labels)
    return found


def grouping_labels(expr: str) -> set[str]:
    return {lbl.strip() for group in _GROUPING.findall(_clean(expr)) for lbl in group.split(",") if lbl.strip()}


def test_the_promql_helpers_read_names_labels_and_groupings() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, endpoint) (rate(a_bucket{endpoint=~"$endpoint", x!="1"}[$__rate_interval])))'
        " / on (endpoint) group_left b:rule offset 5m > bool 1e-9 and c"
    )
    assert metric_names(expr) == {"a_bucket", "b:rule", "c"}
    assert selector_labels(expr) == {"a_bucket": {"endpoint", "x"}}
    assert grouping_labels(expr) == {"le", "endpoint"}


# -- what exists --------------------------------------------------------------------------------


def exposed_names() -> set[str]:
    """Every series name the registry exposes once `datacreator.metrics` is imported."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count", f"{family.name}_created"}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def labels_by_series() -> dict[str, set[str]]:
    """{exposed series name: its label names} for the metrics of `datacreator.metrics`."""
    out: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        base, labels = metric._name, set(metric._labelnames)  # noqa: SLF001 (no public accessor)
        kind = metric._type  # noqa: SLF001
        if kind == "counter":
            out[f"{base}_total"] = labels
        elif kind == "histogram":
            out[f"{base}_bucket"] = labels | {"le"}
            out[f"{base}_sum"] = out[f"{base}_count"] = labels
        else:
            out[base] = labels
    return out


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rule_groups() for r in g["rules"] if "alert" in r}


def recorded_labels() -> dict[str, set[str]]:
    """A recording rule keeps the labels of its aggregations (`sum by (...)`)."""
    return {name: grouping_labels(expr) - {"le"} for name, expr in recording_rules().items()}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


# -- the checks ---------------------------------------------------------------------------------


def test_every_metric_of_datacreator_is_in_the_registry() -> None:
    exposed = exposed_names()
    for series in labels_by_series():
        assert series in exposed
    assert "datacreator_examples_accepted_total" in exposed and "datacreator_llm_latency_seconds_bucket" in exposed


def check_expression(where: str, expr: str, known: set[str], labels: dict[str, set[str]]) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - known
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr!r}"
    for metric, used in selector_labels(expr).items():
        allowed = labels.get(metric, set()) | TARGET_LABELS
        assert used <= allowed, f"{where}: {metric} has no label {sorted(used - allowed)}"
    # Every label an aggregation keeps must exist on some series of the expression.
    available = set().union(*(labels.get(n, set()) for n in names)) | TARGET_LABELS
    missing = grouping_labels(expr) - available
    assert not missing, f"{where}: grouping by {sorted(missing)}, which no series of {sorted(names)} has"


def test_recording_and_alert_rules_use_existing_metrics() -> None:
    known = exposed_names() | SCRAPE_SERIES | set(recording_rules())
    labels = labels_by_series() | recorded_labels()
    for name, expr in {**recording_rules(), **alert_rules()}.items():
        check_expression(f"rule {name}", expr, known, labels)
    # The figures the dashboard and alerts are built on.
    rules = recording_rules()
    assert "rate(datacreator_examples_accepted_total[1m])" in rules["datacreator:examples_accepted:rate1m"]
    assert 'outcome="429"' in rules["datacreator:llm_429:share5m"]
    assert any("datacreator_circuit_open" in expr for expr in alert_rules().values())


def test_every_dashboard_query_uses_existing_metrics() -> None:
    known = exposed_names() | SCRAPE_SERIES | set(recording_rules())
    labels = labels_by_series() | recorded_labels()
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    for title, expr in expressions:
        check_expression(f"panel {title!r}", expr, known, labels)


def test_dashboard_template_variables_query_existing_labels() -> None:
    labels = labels_by_series()
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    query = variables["endpoint"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
    assert label in labels[metric]
    # Every $variable used by a panel is defined.
    for title, expr in dashboard_expressions():
        for name in re.findall(r"\$(\w+)", expr):
            assert name.startswith("__") or name in variables, f"panel {title!r} uses undefined ${name}"


def test_dashboard_covers_the_required_views() -> None:
    exprs = " ".join(expr for _, expr in dashboard_expressions())
    for needed in (
        "datacreator:examples_accepted:rate1m",  # throughput, accepted
        "datacreator:examples_rejected:rate1m",  # and rejected
        "datacreator_examples_rejected_total",  # rejection reasons
        "datacreator_llm_latency_seconds_bucket",  # latency percentiles
        "datacreator_ratelimit_usage_ratio",  # rate-limit usage
        "datacreator_ratelimit_limit_per_minute",  # against the limit
        "datacreator:llm_429:share5m",  # 429 share
        "datacreator:llm_cost_usd:per_minute",  # cost per minute
        "datacreator:cost_per_accepted_example:usd5m",  # cost per accepted example
        "datacreator:consumer_lag:sum",  # consumer lag
        "datacreator_service_up",  # per-service health
    ):
        assert needed in exprs, f"no panel shows {needed}"
    quantiles = {
        float(match.group(1))
        for _, expr in dashboard_expressions() if "datacreator_llm_latency_seconds_bucket" in expr
        for match in [re.match(r"histogram_quantile\((0\.\d+),", expr)] if match
    }
    assert {0.5, 0.95, 0.99} <= quantiles


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
    # No two panels overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert dashboard()["templating"]["list"][0]["current"]["value"] == source["uid"]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "datacreator.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


@pytest.mark.parametrize("expr", ["rate(datacreator_no_such_metric_total[5m])", 'datacreator_llm_calls_total{outcom="429"}',
                                  "sum by (reasons) (datacreator_examples_rejected_total)"])
def test_a_wrong_name_label_or_grouping_is_caught(expr: str) -> None:
    known = exposed_names() | set(recording_rules())
    with pytest.raises(AssertionError):
        check_expression("probe", expr, known, labels_by_series() | recorded_labels())
