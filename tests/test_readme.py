"""The README's results cannot drift from the runs: every number in a README table column headed
by a run folder (`resources/<run>/`) on a row headed by a metrics key (`vqvae.test_ssim`) must be
that key's value in the folder's metrics.json, to the decimals shown; a "± s" beside it must be
the key's standard error (or sd) there. Every figure the README shows must exist."""

import json
import re

import pytest

from conftest import REPO

RUN_FOLDER = re.compile(r"`(resources/[\w/.-]+?)/?`")
METRIC_KEY = re.compile(r"^`([a-z_0-9]+(?:\.[\w.]+)+)`$")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
SPREAD_SUFFIXES = ("_stderr", "_sd")


def readme_tables(text):
    """Each table of the text as a list of rows, each a list of its cells' text."""
    table = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            yield table
            table = []


def metric(metrics, key):
    """metrics.json's value at a dotted key; a level's own keys may hold dots ("0.50")."""
    value, rest = metrics, key
    while rest:
        name = max((name for name in value if rest == name or rest.startswith(name + ".")),
                   key=len, default=None)
        if name is None:
            raise KeyError(key)
        value, rest = value[name], rest[len(name) + 1:]
    return value


def quoted_numbers(table):
    """(folder, key, cell) for each cell of a run's column on a metrics key's row."""
    header, *rows = table
    folders = {column: RUN_FOLDER.search(cell).group(1) for column, cell in enumerate(header)
               if RUN_FOLDER.search(cell)}
    for row in rows:
        match = METRIC_KEY.match(row[0])
        if match is None:
            continue
        for column, folder in folders.items():
            if column < len(row) and NUMBER.search(row[column]):
                yield folder, match.group(1), row[column]


def agrees(quoted, value):
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - value) <= 0.5 * 10 ** -decimals + 1e-12


def test_readme_numbers_match_the_runs_metrics():
    text = (REPO / "README.md").read_text()
    checked, wrong = 0, []
    for table in readme_tables(text):
        for folder, key, cell in quoted_numbers(table):
            metrics = json.loads((REPO / folder / "metrics.json").read_text())
            value, *spread = NUMBER.findall(cell)
            if not agrees(value, metric(metrics, key)):
                wrong.append(f"{folder} {key}: README {value}, metrics.json {metric(metrics, key)}")
            if "±" in cell:
                known = [metric(metrics, stem + suffix) for stem in spread_stems(key)
                         for suffix in SPREAD_SUFFIXES if _has(metrics, stem + suffix)]
                if not any(agrees(spread[0], value) for value in known):
                    wrong.append(f"{folder} {key}: README ± {spread[0]}, metrics.json {known}")
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 20, f"only {checked} numbers checked: are the results tables still there?"


def spread_stems(key):
    """Where a score's spread is kept: beside it (c2st_vs_reconstructions_sd), or for an
    accuracy, beside its test's name (c2st_accuracy -> c2st_sd)."""
    return [key, key.removesuffix("_accuracy")] if key.endswith("_accuracy") else [key]


def _has(metrics, key):
    try:
        metric(metrics, key)
    except KeyError:
        return False
    return True


def test_every_figure_the_readme_shows_exists():
    text = (REPO / "README.md").read_text()
    figures = re.findall(r"\]\(((?:resources|demo_data)/[^)]+\.png)\)", text)
    assert figures
    assert [figure for figure in figures if not (REPO / figure).exists()] == []


@pytest.mark.parametrize("cell, value, expected", [("0.61", 0.6149, True), ("0.61", 0.6151, False),
                                                   ("128", 128.0, True), ("0.900", 0.9, True)])
def test_a_quoted_number_agrees_to_its_decimals(cell, value, expected):
    assert agrees(cell, value) is expected


def test_the_check_reads_keys_with_dots_and_catches_a_wrong_number():
    metrics = {"samples": {"brain_area_by_height": {"0.50": {"real": 0.3}}, "c2st": 0.7}}
    assert metric(metrics, "samples.brain_area_by_height.0.50.real") == 0.3
    table = [["metric", "demo (`resources/demo/`)"], ["`samples.c2st`", "0.71"]]
    ((folder, key, cell),) = quoted_numbers(table)
    assert (folder, key) == ("resources/demo", "samples.c2st")
    assert not agrees(cell, metric(metrics, key))


COMMAND = re.compile(r"python driver\.py((?:\\\n|[^\n`\\])*)")


def readme_commands(text):
    """The flags of each `python driver.py` command the README shows, its continued lines
    joined."""
    for match in COMMAND.finditer(text):
        yield match.group(1).replace("\\\n", " ").split()


def test_every_command_the_readme_shows_is_accepted():
    """A default that changes under a documented command (a flag it no longer combines with)
    is caught here, not by a reader."""
    import driver

    commands = list(readme_commands((REPO / "README.md").read_text()))
    assert len(commands) >= 5
    for flags in commands:
        driver.parse_args([flag for flag in flags if flag not in ("-h", "--help")])


def test_the_command_check_sees_a_refused_combination():
    import driver

    (flags,) = readme_commands("    python driver.py --pcnn-type plain \\\n        --K 8\n")
    assert flags == ["--pcnn-type", "plain", "--K", "8"]
    with pytest.raises(SystemExit):
        driver.parse_args(flags)
