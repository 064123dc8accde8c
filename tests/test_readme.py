"""The README stays true: every flag, environment variable and metric it must document is there."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from service.config import ServerConfig, env_name
from service.metrics import Metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_option_is_in_the_configuration_table() -> None:
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}` |")), None)
        assert row is not None, f"{flag} missing from the README configuration table"
        assert f"`{env_name(f.name)}`" in row
        default = f.default
        if f.name != "checkpoint" and default not in ("", None):
            assert f"`{default}`" in row, f"{flag}: README default differs from {default!r}"


def test_every_metric_is_in_the_metrics_table() -> None:
    suffix = {"counter": "_total"}
    for family in Metrics(process_metrics=False).registry.collect():
        name = family.name + suffix.get(family.type, "")
        assert re.search(rf"\| `{re.escape(name)}(\{{[^`]*\}})?` \| {family.type} \|", README), name


def test_the_make_targets_the_readme_names_exist() -> None:
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    for target in set(re.findall(r"\bmake ([a-z-]+)", README)):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is not a Makefile target"
