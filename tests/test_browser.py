"""The report as a person sees it: its pages rendered by headless Chromium (scripts run), the plotly
figure drawn with a marker per finished trial, every link and image resolving."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.front import study_bases
from pipeline.variants import Variant

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = [
    pytest.mark.xdist_group(__name__),
    pytest.mark.skipif(
        CHROMIUM is None, reason="no Chromium here: `apt-get install chromium` (CI's .ci/run installs it)"),
]
# Flags for a closed network and a root user: no sandbox, no background connections.
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rendered_dom(page: Path) -> str:
    """The page's DOM after its scripts ran (Chromium's own serialisation)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class PageParts(HTMLParser):
    """Plotly's drawn SVGs, the markers of each scatter trace, and every link and image."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs = 0
        self.traces: list[int] = []
        self.references: list[str] = []
        self._open: list[bool] = []  # for each open <g>: does it start a scatter trace?

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        classes = (values.get("class") or "").split()
        if tag == "svg" and "main-svg" in classes:
            self.svgs += 1
        elif tag == "g":
            trace = {"trace", "scatter"} <= set(classes)
            self._open.append(trace)
            if trace:
                self.traces.append(0)
        elif tag == "path" and "point" in classes and any(self._open):
            self.traces[-1] += 1
        if tag == "a" and values.get("href"):
            self.references.append(values["href"])
        if tag in ("img", "script") and values.get("src"):
            self.references.append(values["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "g" and self._open:
            self._open.pop()


def parts(page: Path) -> PageParts:
    parser = PageParts()
    parser.feed(rendered_dom(page))
    return parser


@pytest.fixture(scope="module")
def report(study_stores: tuple[str, str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    result = CliRunner().invoke(main, ["report", *study_stores[2], "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_pareto_page_draws_a_marker_per_finished_trial(
    report: Path, study_stores: tuple[str, str, list[str]]
) -> None:
    study = optuna.load_study(study_name="smoke", storage=study_stores[0])
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    variants = {Variant.from_record(t.user_attrs["variant"]).key for t in finished} | set(study_bases(study))
    page = parts(report / "pareto.html")
    assert page.svgs >= 1
    # the trials' traces come first: dominated ones, each variant's front, the tutorial recipe
    assert sum(page.traces[: len(variants) + 2]) == len(finished)


@pytest.mark.parametrize("name", ["index.html", "pareto.html"])
def test_every_link_and_image_of_the_report_resolves(report: Path, name: str) -> None:
    references = parts(report / name).references
    assert references
    for reference in references:
        assert not reference.startswith(("http:", "https:", "//")), f"{name} reaches out: {reference}"
        assert (report / reference.split("#")[0]).is_file(), f"{name}: {reference} does not resolve"


def test_a_page_whose_plotly_script_is_missing_is_caught(report: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / "plotly.min.js").unlink()
    page = parts(broken / "pareto.html")
    assert page.svgs == 0 and page.traces == []
    with pytest.raises(AssertionError, match="does not resolve"):
        test_every_link_and_image_of_the_report_resolves(broken, "pareto.html")
