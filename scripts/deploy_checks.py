#!/usr/bin/env python3
"""Static checks of the deployment files, run by scripts/validate_deploy.sh.

    deploy_checks.py compose CONFIG.json     # `docker compose config --format json` output
    deploy_checks.py dashboard --promtool P  # Grafana dashboards vs service/metrics.py
    deploy_checks.py dockerfile              # COPY sources exist and survive .dockerignore

Each prints what it checked and exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
DEFAULT_CHECKPOINT = "checkpoints/default"

# PromQL functions and aggregation operators (Prometheus 2.x/3.x).
PROMQL_FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
    day_of_month day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters
    double_exponential_smoothing hour idelta increase irate label_join label_replace last_over_time ln log10
    log2 mad_over_time max_over_time min_over_time minute month predict_linear present_over_time
    quantile_over_time rate resets round scalar sgn sort sort_desc sort_by_label sort_by_label_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time time timestamp vector year acos acosh asin asinh atan
    atanh cos cosh deg pi rad sin sinh tan tanh
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio""".split()
)
PROMQL_KEYWORDS = frozenset("by without on ignoring group_left group_right bool offset and or unless inf nan".split())


# --- compose -------------------------------------------------------------------------------

def go_duration_seconds(text: str) -> float:
    """Seconds of a Go duration as compose normalises it: "30s", "1m0s", "1.5s", "250ms"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def check_compose(config: dict) -> list[str]:
    problems: list[str] = []
    services = config.get("services", {})
    for name in ("train", "server", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"service {name!r} missing")
    if problems:
        return problems
    server, train = services["server"], services["train"]

    cond = server.get("depends_on", {}).get("train", {}).get("condition")
    if cond != "service_completed_successfully":
        problems.append(f"server must depend on train with condition service_completed_successfully, not {cond!r}")
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("server has no nvidia GPU reservation (deploy.resources.reservations.devices)")

    env = server.get("environment", {})
    grace = float(env.get("LSTM_SERVE_GRACE_SECONDS") or 10)
    stop = go_duration_seconds(server.get("stop_grace_period", "10s"))
    if stop <= grace:
        problems.append(f"server stop_grace_period {stop:g}s must exceed the drain grace {grace:g}s")
    published = {(p.get("target"), str(p.get("published"))) for p in server.get("ports", [])}
    for port in (50051, 9400):
        if (port, str(port)) not in published:
            problems.append(f"server does not publish port {port}")
    if env.get("LSTM_SERVE_PORT") != "50051" or env.get("LSTM_SERVE_METRICS_PORT") != "9400":
        problems.append("server LSTM_SERVE_PORT/LSTM_SERVE_METRICS_PORT must be 50051/9400 (the published ports)")
    test = server.get("healthcheck", {}).get("test", [])
    if not any("healthcheck.py" in str(t) for t in test):
        problems.append(f"server healthcheck must run scripts/healthcheck.py, not {test}")

    def volume_at(service: dict, target: str) -> dict | None:
        return next((v for v in service.get("volumes", []) if v.get("target") == target), None)

    state_dir = env.get("LSTM_SERVE_STATE_DIR", "")
    state = volume_at(server, state_dir)
    if not state_dir or state is None or state.get("type") != "volume" or state.get("read_only"):
        problems.append(f"server state dir {state_dir!r} must be a writable named volume")
    ckpt = env.get("LSTM_SERVE_CHECKPOINT", "")
    server_vol = next((v for v in server.get("volumes", []) if ckpt.startswith(v.get("target", "") + "/")), None)
    train_vol = volume_at(train, train.get("environment", {}).get("CHECKPOINT_ROOT", ""))
    if server_vol is None or train_vol is None or server_vol.get("source") != train_vol.get("source"):
        problems.append("server's LSTM_SERVE_CHECKPOINT must lie in the volume train writes (CHECKPOINT_ROOT)")
    elif train_vol.get("type") != "volume" or train_vol.get("source") not in config.get("volumes", {}):
        problems.append("train must write the checkpoint into a named volume")

    prom_mounts = [v.get("source", "") for v in services["prometheus"].get("volumes", [])]
    if not any(s.endswith("deploy/prometheus/prometheus.yml") for s in prom_mounts):
        problems.append("prometheus must mount deploy/prometheus/prometheus.yml")
    graf_mounts = [v.get("source", "") for v in services["grafana"].get("volumes", [])]
    for sub in ("deploy/grafana/provisioning", "deploy/grafana/dashboards"):
        if not any(s.endswith(sub) for s in graf_mounts):
            problems.append(f"grafana must mount {sub}")
    return problems


# --- dashboards ----------------------------------------------------------------------------

def promql_metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, unknown function names) referenced by a PromQL expression."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])(0x[0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)", " ", s)
    names: set[str] = set()
    unknown: set[str] = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group()
        if s[m.end():].lstrip().startswith("("):
            if token not in PROMQL_FUNCTIONS:
                unknown.add(token)
        elif token.lower() not in PROMQL_KEYWORDS:
            names.add(token)
    return names, unknown


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables so the expression is plain PromQL."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}", "5m", expr)
    expr = re.sub(r"\$__\w+", "0", expr)
    return re.sub(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]", ".*", expr)


def iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # collapsed rows


def check_dashboard(path: Path, known: set[str], datasource_uids: set[str], promtool: str | None) -> list[str]:
    try:
        dash = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return [f"{path}: not valid JSON: {e}"]
    problems: list[str] = []
    exprs: list[tuple[str, str]] = []  # (where, PromQL)
    for panel in iter_panels(dash.get("panels", [])):
        if panel.get("type") == "row":
            continue
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{path.name}: {where} has no query")
        sources = [panel.get("datasource")] + [t.get("datasource") for t in targets]
        for uid in sorted({(ds or {}).get("uid") for ds in sources if ds is not None} - datasource_uids, key=str):
            problems.append(f"{path.name}: {where}: datasource uid {uid!r} is not provisioned "
                            f"({sorted(datasource_uids)})")
        if panel.get("datasource") is None and any(t.get("datasource") is None for t in targets):
            problems.append(f"{path.name}: {where}: no datasource")
        for target in targets:
            exprs.append((f"{where} ref {target.get('refId')}", target.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query" and (var.get("datasource") or {}).get("uid") not in datasource_uids:
            problems.append(f"{path.name}: variable {var.get('name')}: datasource {var.get('datasource')} "
                            "is not provisioned")
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
        if m:
            exprs.append((f"variable {var.get('name')}", m.group(1)))
    if not exprs:
        problems.append(f"{path.name}: no queries at all")

    for where, expr in exprs:
        if not expr.strip():
            problems.append(f"{path.name}: {where}: empty expr")
            continue
        names, unknown = promql_metric_names(grafana_to_promql(expr))
        if not names:
            problems.append(f"{path.name}: {where}: references no metric: {expr}")
        for name in sorted(names - known):
            problems.append(f"{path.name}: {where}: metric {name!r} is not defined by service/metrics.py")
        for fn in sorted(unknown):
            problems.append(f"{path.name}: {where}: unknown PromQL function {fn!r}")

    if promtool:  # parse every expression with Prometheus' own parser, as recording rules
        rules = [{"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)
                 if e.strip()]
        with tempfile.NamedTemporaryFile("w", suffix=".rules.yml", delete=False) as f:
            json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
        try:
            proc = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True, timeout=120)
        finally:
            Path(f.name).unlink()
        if proc.returncode != 0:
            problems.append(f"{path.name}: promtool rejects a query:\n{proc.stdout}{proc.stderr}")
    return problems


def known_metric_names() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from service.metrics import Metrics

    return Metrics().metric_names()


def provisioned_datasource_uids() -> set[str]:
    uids: set[str] = set()
    for f in sorted(DATASOURCES.glob("*.y*ml")):
        uids.update(re.findall(r"^\s*uid:\s*['\"]?([\w-]+)['\"]?\s*$", f.read_text(), flags=re.M))
    return uids


# --- Dockerfile ----------------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                if pat.startswith("/", i):
                    rx += "/?"
                    i += 1
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        out.append((negate, re.compile(rx)))
    return out


def dockerignored(rel: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore drops `rel` (a path or any of its parent directories matches; last match wins)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def check_dockerfile() -> list[str]:
    problems: list[str] = []
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    patterns = dockerignore_patterns()
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]) or len(args) < 2:
            continue
        for src in args[:-1]:
            matches = sorted(ROOT.glob(src)) if any(c in src for c in "*?[") else [ROOT / src]
            matches = [m for m in matches if m.exists()]
            if not matches and not any(c in src for c in "*?["):
                problems.append(f"Dockerfile: COPY source {src!r} does not exist")
                continue
            for m in matches:
                rel = m.relative_to(ROOT).as_posix()
                files = [m] if m.is_file() else [f for f in m.rglob("*") if f.is_file()]
                kept = [f for f in files if not dockerignored(f.relative_to(ROOT).as_posix(), patterns)]
                if dockerignored(rel, patterns) or not kept:
                    problems.append(f"Dockerfile: COPY source {rel!r} is empty or excluded by .dockerignore")
    # The image's default checkpoint must be servable.
    for name in ("model.safetensors", "model.json"):
        rel = f"{DEFAULT_CHECKPOINT}/{name}"
        if "COPY " + DEFAULT_CHECKPOINT not in text:
            problems.append(f"Dockerfile does not COPY {DEFAULT_CHECKPOINT}")
            break
        if not (ROOT / rel).is_file() or dockerignored(rel, patterns):
            problems.append(f"Dockerfile: {rel} missing or excluded by .dockerignore (the image's default checkpoint)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("compose")
    p.add_argument("config_json", type=Path)
    p = sub.add_parser("dashboard")
    p.add_argument("--promtool", help="promtool binary; also parse every query with it")
    p.add_argument("files", nargs="*", type=Path)
    sub.add_parser("dockerfile")
    args = parser.parse_args(argv)

    if args.cmd == "compose":
        problems = check_compose(json.loads(args.config_json.read_text()))
        what = "docker-compose structure"
    elif args.cmd == "dashboard":
        files = args.files or sorted(DASHBOARDS.glob("*.json"))
        known, uids = known_metric_names(), provisioned_datasource_uids()
        problems = [] if files else [f"no dashboards in {DASHBOARDS}"]
        for f in files:
            problems += check_dashboard(f, known, uids, args.promtool)
        what = f"dashboards ({', '.join(f.name for f in files)})"
    else:
        problems = check_dockerfile()
        what = "Dockerfile COPY sources"
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
