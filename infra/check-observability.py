"""Checks that the metric catalogue (docs/operations.md), the code, the alert rules
(infra/prometheus/alerts.yaml) and the dashboard (infra/grafana/chat.json) agree: every
metric the code exports is in the catalogue and nothing else is; every metric an alert or
a panel uses is in the catalogue; each rule has what Prometheus requires. Run by
infra/validate.sh (with the validators' Python, which has PyYAML)."""

import glob
import json
import re
import sys

import yaml

problems = []

# The catalogue: the first column of the table after the `catalogue` marker.
doc = open("docs/operations.md").read()
table = doc.split("<!-- catalogue", 1)[1].split("\n\n", 1)[0]
catalogue = set(re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M))

# The code: every metrics macro of the server's crates.
code = set()
for path in glob.glob("*/src/**/*.rs", recursive=True):
    if path.startswith("loadtest/"):
        continue
    source = open(path).read()
    code |= set(re.findall(r'(?:counter|gauge|histogram)!\(\s*"([a-z0-9_]+)"', source))

for name in sorted(code - catalogue):
    problems.append(f"{name}: exported by the code, missing from docs/operations.md")
for name in sorted(catalogue - code):
    problems.append(f"{name}: in docs/operations.md, exported by no code")

FUNCTIONS_AND_KEYWORDS = {
    "sum", "rate", "increase", "histogram_quantile", "clamp_min", "max", "min", "avg",
    "count", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "le", "offset",
}
BUILTIN = {"up"}


def metrics_in(expr):
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"[^"]*"', "", expr)            # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)         # ranges
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"(?<![a-zA-Z_:])\d+(\.\d+)?([eE][-+]?\d+)?", "", expr)  # numbers
    names = set()
    for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if token in FUNCTIONS_AND_KEYWORDS or token in BUILTIN:
            continue
        names.add(re.sub(r"_(bucket|sum|count)$", "", token))
    return names


def check_expr(where, expr):
    used = metrics_in(expr)
    if not used and "up{" not in expr.replace(" ", ""):
        problems.append(f"{where}: reads no metric: {expr!r}")
    for name in sorted(used - catalogue):
        problems.append(f"{where}: uses {name}, which is not in the catalogue")


rules = yaml.safe_load(open("infra/prometheus/alerts.yaml"))
alerts = 0
for group in rules.get("groups", []):
    if not group.get("name"):
        problems.append("alerts.yaml: a group without a name")
    for rule in group.get("rules", []):
        name = rule.get("alert")
        if not name or not isinstance(rule.get("expr"), str):
            problems.append(f"alerts.yaml: a rule needs `alert` and `expr`: {rule}")
            continue
        unknown = set(rule) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        if unknown:
            problems.append(f"alerts.yaml {name}: unknown fields {sorted(unknown)}")
        if "for" in rule and not re.fullmatch(r"\d+[smhdwy]", str(rule["for"])):
            problems.append(f"alerts.yaml {name}: `for` is not a duration: {rule['for']}")
        if "runbook" not in rule.get("annotations", {}):
            problems.append(f"alerts.yaml {name}: no runbook annotation")
        if f"`{name}`" not in doc:
            problems.append(f"alerts.yaml {name}: not explained in docs/operations.md")
        check_expr(f"alerts.yaml {name}", rule["expr"])
        alerts += 1

dashboard = json.load(open("infra/grafana/chat.json"))
panels = 0
for panel in dashboard.get("panels", []):
    for target in panel.get("targets", []):
        check_expr(f"chat.json panel {panel.get('title')!r}", target.get("expr", ""))
    panels += 1

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"validate: {len(catalogue)} metrics in the catalogue match the code; "
      f"{alerts} alert rules and {panels} dashboard panels use only those")
