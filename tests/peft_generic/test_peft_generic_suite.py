# PEFT's own generic tuner suite (tests/test_custom_models.py of the installed peft's sdist) run on NeuronSelect.
# Standalone:  python -m pytest tests/peft_generic -q -s   (-s prints counts, wall time and skip reasons)
# Cache: $NEURON_PEFT_CACHE or ~/.cache/neuron_peft/peft-sdist (the sdist is fetched once with `pip download`).
"""Run PEFT's generic custom-model tests with NeuronSelect cases added the way PEFT adds its own methods.

PEFT's files are not part of this repository: the sdist of the installed peft version is downloaded once into a
cache directory (skipped, with the reason, when it cannot be downloaded), its tests are extracted into pytest's
tmp dir, ``test_custom_models.py`` is patched to append our cases (neuron_select_cases.py) to PEFT's ``TEST_CASES``
and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` before PEFT parametrises its tests, and only the NeuronSelect cases
(``-k NeuronSelect``) run in a pytest subprocess. The reference is PEFT's own assertions (e.g. only adapter
parameters change in training, merged == unmerged outputs, save/load round trips, disable_adapter == base model).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import peft
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES_FILE = HERE / "neuron_select_cases.py"
CONFTEST_FILE = HERE / "suite_conftest.py"
PEFT_TEST_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
SELECT = "NeuronSelect"  # every case name / config-class id of ours contains it, and no PEFT case does
SUITE_TIMEOUT_S = 900
MIN_PASSED_PER_CASE = 40
MIN_PASSED_PER_MULTI_CASE = 4

# (anchor in PEFT's test_custom_models.py, code inserted right before it). Each anchor must occur exactly once.
PATCHES = (
    (
        "\nALL_PEFT_CONFIG_CLASSES = sorted(",  # computed from TEST_CASES: must see our cases
        "\nfrom .neuron_select_cases import NEURON_SELECT_TEST_CASES  # added by neuron_peft\n"
        "TEST_CASES += NEURON_SELECT_TEST_CASES  # added by neuron_peft\n",
    ),
    (
        "\nclass TestPeftCustomModel(",  # after MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, before the tests that use it
        "\nfrom .neuron_select_cases import NEURON_SELECT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES  # added by neuron_peft\n"
        "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES += NEURON_SELECT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES  # neuron_peft\n\n",
    ),
)


def cache_dir() -> Path:
    root = os.environ.get("NEURON_PEFT_CACHE")
    if root:
        return Path(root) / "peft-sdist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuron_peft" / "peft-sdist"


def fetch_sdist(version: str) -> Path:
    """The cached sdist of peft==version, downloaded with pip if absent; skips the test if that fails."""
    target = cache_dir() / f"peft-{version}.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # --no-build-isolation avoids fetching setuptools into a build env (pip prepares the sdist's metadata); retry
    # without it where the installed setuptools cannot build peft's metadata.
    for extra in (["--no-build-isolation"], []):
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-deps", "--no-binary", ":all:"]
            try:
                proc = subprocess.run(
                    [*cmd, *extra, "-d", tmp], capture_output=True, text=True, timeout=300, check=False
                )
            except subprocess.TimeoutExpired:
                errors.append("pip download timed out after 300 s")
                continue
            found = sorted(Path(tmp).glob("peft-*.tar.gz"))
            if proc.returncode == 0 and found:
                os.replace(found[0], target)  # atomic: a concurrent run sees the whole file or none
                return target
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            errors.append(f"pip exit {proc.returncode}: {tail[0]}")
    pytest.skip(f"cannot download the sdist of peft=={version} (needs PyPI): {'; '.join(errors)}")


def build_suite(sdist: Path, dest: Path, version: str) -> Path:
    """PEFT's test files as package ``peft_tests`` under dest, with our cases patched in; returns the package."""
    pkg = dest / "peft_tests"
    pkg.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for name in PEFT_TEST_FILES:
            try:
                member = tar.getmember(f"peft-{version}/tests/{name}")
            except KeyError:
                pytest.fail(f"peft {version}'s sdist has no tests/{name}; update PEFT_TEST_FILES in {__file__}")
            (pkg / name).write_bytes(tar.extractfile(member).read())
    source = (pkg / "test_custom_models.py").read_text()
    for anchor, code in PATCHES:
        count = source.count(anchor)
        if count != 1:
            pytest.fail(
                f"peft {version}'s tests/test_custom_models.py has {count} occurrences of {anchor.strip()!r} "
                f"(expected 1): update PATCHES in {__file__} to insert the NeuronSelect cases"
            )
        source = source.replace(anchor, code + anchor)
    (pkg / "test_custom_models.py").write_text(source)
    (pkg / "__init__.py").write_text("")
    (pkg / "neuron_select_cases.py").write_text(CASES_FILE.read_text())
    (pkg / "conftest.py").write_text(CONFTEST_FILE.read_text())
    (dest / "pytest.ini").write_text("[pytest]\naddopts =\nfilterwarnings =\n    ignore::DeprecationWarning\n")
    return pkg


def read_junit(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                detail = child.get("message") or (child.text or "").strip()
        cases.append(
            {"name": case.get("name"), "outcome": outcome, "detail": detail, "time": float(case.get("time") or 0)}
        )
    return cases


def test_peft_generic_suite_on_neuron_select(tmp_path):
    import neuron_select_cases as cases_module

    version = peft.__version__
    sdist = fetch_sdist(version)
    pkg = build_suite(sdist, tmp_path / "suite", version)
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("PYTEST_ADDOPTS", None)  # the options below are the whole command line
    env.setdefault("OMP_NUM_THREADS", "1")  # PEFT's models are tiny: threads only add overhead on shared cores
    cmd = [
        sys.executable, "-m", "pytest", str(pkg / "test_custom_models.py"), "-k", SELECT,
        "-c", str(pkg.parent / "pytest.ini"), "--rootdir", str(pkg.parent), "-p", "no:cacheprovider",
        "-q", "-rfE", "--junitxml", str(junit), "-W", "ignore::DeprecationWarning",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=pkg.parent, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"PEFT's generic suite on NeuronSelect did not finish in {SUITE_TIMEOUT_S} s: {' '.join(cmd)}")
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    assert junit.is_file(), f"PEFT's suite did not run (exit {proc.returncode}):\n{output[-4000:]}"
    results = read_junit(junit)
    by = {o: [r for r in results if r["outcome"] == o] for o in ("passed", "failed", "error", "skipped")}
    counts = ", ".join(f"{len(v)} {k}" for k, v in by.items())
    print(f"\npeft {version} generic suite, NeuronSelect cases: {counts} in {wall:.1f} s")
    for reason, n in Counter(r["detail"] for r in by["skipped"]).most_common():
        print(f"  skipped {n:3d}x: {reason}")

    bad = by["failed"] + by["error"]
    summary = "\n".join(f"  {r['name']}: {r['detail'][:300]}" for r in bad[:40])
    assert proc.returncode == 0 and not bad, (
        f"PEFT {version}'s generic suite fails on NeuronSelect ({counts}, exit {proc.returncode}):\n{summary}\n"
        f"--- pytest summary ---\n{output[-3000:]}"
    )
    # every case of ours was collected and PEFT's tests ran on it (not skipped wholesale): 0.21.2 runs 52 tests on
    # each TEST_CASES case (4 skipped, PEFT's own reasons) and 5 on each multiple-active-adapters case
    expected = [(c[0], MIN_PASSED_PER_CASE) for c in cases_module.NEURON_SELECT_TEST_CASES]
    expected += [
        (c[0], MIN_PASSED_PER_MULTI_CASE) for c in cases_module.NEURON_SELECT_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES
    ]
    for name, minimum in expected:
        ran = [r for r in by["passed"] if re.search(rf"\[(.*-)?{re.escape(name)}-", r["name"])]
        assert len(ran) >= minimum, (
            f"only {len(ran)} PEFT tests passed for case {name!r} (expected >= {minimum}): "
            "is it still parametrised into PEFT's suite?"
        )
    assert any("NeuronSelectConfig" in r["name"] for r in by["passed"]), "config-class parametrised tests did not run"
    # skips: either PEFT's own (it skips per method / per device) or ours, all listed in neuron_select_cases.py
    unexplained = [r for r in by["skipped"] if not any(s in r["detail"] for s in cases_module.EXPECTED_SKIP_REASONS)]
    assert not unexplained, "skips not listed in neuron_select_cases.EXPECTED_SKIP_REASONS:\n" + "\n".join(
        f"  {r['name']}: {r['detail']}" for r in unexplained[:40]
    )
