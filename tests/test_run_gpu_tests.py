"""tools/run_gpu_tests.py tells the truth, checked on CPU against a fake test folder: a module
that fails to import, a test that fails, one that crashes its process, skips for want of CUDA and
of FA4, an xfail, and a passing test marked gpu."""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "tools" / "run_gpu_tests.py"

FAKE_TESTS = {
    "pytest.ini": """\
        [pytest]
        markers =
            gpu: needs a CUDA device
        """,
    "test_broken.py": """\
        import pytest
        import a_module_that_is_not_installed  # as expecttest on the GPU image

        @pytest.mark.gpu
        def test_never_runs():
            pass
        """,
    "test_fake.py": """\
        import os
        import pytest

        @pytest.mark.gpu
        def test_passes():
            pass

        @pytest.mark.gpu
        def test_skips_without_cuda():
            pytest.skip("needs a CUDA device")

        @pytest.mark.gpu
        def test_skips_without_fa4():
            pytest.skip("needs CUDA and flash_attn.cute")

        @pytest.mark.gpu
        def test_skips_on_one_gpu():
            pytest.skip("needs 2 CUDA devices")

        @pytest.mark.gpu
        def test_fails():
            assert 1 + 1 == 3, "arithmetic"

        @pytest.mark.gpu
        def test_crashes():
            os._exit(3)  # as an illegal memory access takes the process down

        @pytest.mark.gpu
        @pytest.mark.xfail(reason="known")
        def test_xfails():
            assert False

        @pytest.mark.gpu
        def test_hangs():
            import multiprocessing, time
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
            child.start()  # as a spawned rank: it must go down with the test
            with open(os.environ["HANG_PID_FILE"], "w") as f:
                f.write(str(child.pid))
            time.sleep(600)

        def test_not_marked_gpu():
            pass
        """,
}


@pytest.fixture(scope="module")
def runner():
    name = "run_gpu_tests_under_test"
    spec = importlib.util.spec_from_file_location(name, RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture
def fake_tests(tmp_path, monkeypatch):
    # The runner's pytest processes inherit this: the fake tests need no plugin, and loading the
    # installed ones costs seconds per process.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    for name, text in FAKE_TESTS.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def run(runner, capsys, fake_tests, *args):
    code = runner.main([*map(str, args), "--log", str(fake_tests / "log.txt")])
    lines = capsys.readouterr().out.splitlines()
    return code, lines


def status_of(lines, name):
    """The status word of test ``name``'s line, and the line after it."""
    for i, line in enumerate(lines):
        if re.search(rf"::{name}\b", line):
            return line.split()[0], (lines[i + 1] if i + 1 < len(lines) else "")
    return None, ""


def test_every_outcome_is_reported_and_fails_the_run(runner, capsys, fake_tests):
    code, lines = run(runner, capsys, fake_tests, fake_tests, "-j", "2", "--require", "fa4", "-k", "not hangs")
    out = "\n".join(lines)
    assert code == 1, out
    # The module that does not import is a failure with its first error, not a silent drop.
    assert re.search(r"^ERROR collecting \S*test_broken\.py: E +ModuleNotFoundError: "
                     r"No module named 'a_module_that_is_not_installed'$", out, re.M), out
    assert status_of(lines, "test_passes")[0] == "PASS"
    assert status_of(lines, "test_xfails")[0] == "XFAIL"
    status, _ = status_of(lines, "test_skips_without_cuda")
    assert status == "SKIP" and "(needs a CUDA device)" in out
    status, detail = status_of(lines, "test_fails")
    assert status == "FAIL" and re.search(r"first error: E +AssertionError: arithmetic", detail), out
    status, detail = status_of(lines, "test_crashes")
    assert status == "FAIL" and "exit code 3, no result" in detail, out
    # --require fa4: skipping for want of FA4 is a failure, and the missing FA4 is said up front.
    status, detail = status_of(lines, "test_skips_without_fa4")
    assert detail.strip() == "why: skipped (needs CUDA and flash_attn.cute), but --require fa4", out
    assert status == "FAIL", out
    assert re.search(r"^REQUIRE fa4: missing: .*flash", out, re.M), out
    assert status_of(lines, "test_not_marked_gpu")[0] is None  # only gpu-marked tests
    assert re.search(r"^1 passed, 2 skipped, 3 failed, 1 xfailed of 7 tests; 1 module\(s\) FAILED TO "
                     r"COLLECT \(their tests did not run\); 1 requirement\(s\) missing", lines[-1]), out


def test_a_module_that_fails_to_import_fails_the_run(runner, capsys, fake_tests):
    """The reported case: every collected test passed, a module was lost at collection."""
    code, lines = run(runner, capsys, fake_tests, fake_tests, "-k", "passes")
    assert code == 1, lines
    assert lines[-1].startswith("1 passed, 0 skipped, 0 failed of 1 tests; 1 module(s) FAILED TO COLLECT")


def test_passes_and_skips_alone_succeed(runner, capsys, fake_tests):
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "passes or skips_without_cuda")
    assert code == 0, lines
    assert lines[-1].startswith("1 passed, 1 skipped, 0 failed of 2 tests; full logs in")


def test_require_gpu_without_cuda_fails(runner, capsys, fake_tests, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU host
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "passes", "--require", "gpu")
    assert code == 1, lines
    assert lines[0] == "REQUIRE gpu: missing: no CUDA device (torch.cuda.is_available() is False)"
    assert status_of(lines, "test_passes")[0] == "PASS"


def test_require_gpu_fails_where_tests_skip_for_cuda(runner, capsys, fake_tests, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the requirement itself is met
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "skips_without_cuda",
                      "--require", "gpu")
    assert code == 1, lines
    assert not any(line.startswith("REQUIRE") for line in lines), lines
    status, detail = status_of(lines, "test_skips_without_cuda")
    assert status == "FAIL" and detail.strip() == "why: skipped (needs a CUDA device), but --require gpu", lines


def test_each_skip_is_charged_to_its_own_requirement(runner, capsys, fake_tests, monkeypatch):
    """--require gpu on one GPU without FA4: the two-GPU and FA4 skips stay SKIPs (those are
    --require 2gpus and --require fa4); --require 2gpus fails the two-GPU test alone."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "skips", "--require", "gpu")
    assert [status_of(lines, name)[0] for name in ("test_skips_on_one_gpu", "test_skips_without_fa4",
                                                    "test_skips_without_cuda")] == ["SKIP", "SKIP", "FAIL"], lines
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "skips", "--require", "2gpus")
    assert code == 1 and lines[0] == "REQUIRE 2gpus: missing: one CUDA device (torch.cuda.device_count() is 1)", lines
    assert [status_of(lines, name)[0] for name in ("test_skips_on_one_gpu", "test_skips_without_fa4",
                                                    "test_skips_without_cuda")] == ["FAIL", "SKIP", "SKIP"], lines


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_test_past_the_timeout_is_killed_and_fails(runner, capsys, fake_tests, monkeypatch):
    """--timeout: the hung test and the process it started are killed, the test is a FAIL that
    says so, and the other tests still report."""
    pid_file = fake_tests / "hang.pid"
    monkeypatch.setenv("HANG_PID_FILE", str(pid_file))
    t0 = time.monotonic()
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "hangs or passes",
                      "-j", "2", "--timeout", "10")
    assert time.monotonic() - t0 < 60, lines
    status, detail = status_of(lines, "test_hangs")
    assert (code, status) == (1, "FAIL"), lines
    assert detail.strip() == "first error: timed out after 10 s (--timeout), killed", lines
    assert status_of(lines, "test_passes")[0] == "PASS"
    pid = int(pid_file.read_text())  # the process the test started, as a spawned rank
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"process {pid} outlived the killed test"


def test_nothing_collected_fails(runner, capsys, fake_tests):
    code, lines = run(runner, capsys, fake_tests, fake_tests / "test_fake.py", "-k", "no_such_test")
    assert code == 1 and "no GPU tests collected" in lines, lines


def test_pinned_text_without_expecttest(monkeypatch):
    """tests/expect.py: where expecttest is missing (the GPU image), modules that pin text still
    import, and the stand-in compares exactly."""
    monkeypatch.setitem(sys.modules, "expecttest", None)  # import expecttest -> ModuleNotFoundError
    spec = importlib.util.spec_from_file_location("expect_without_expecttest", Path(__file__).parent / "expect.py")
    expect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(expect)
    assert expect.TestCase.__module__ == "expect_without_expecttest"  # the stand-in, not expecttest's

    class Pinned(expect.TestCase):
        def runTest(self):
            pass

    case = Pinned()
    case.assertExpectedInline("graphs: 1\nrecompiles: none", """\
graphs: 1
recompiles: none""")
    with pytest.raises(AssertionError, match="EXPECTTEST_ACCEPT"):
        case.assertExpectedInline("graphs: 2", "graphs: 1")
    monkeypatch.setenv("EXPECTTEST_ACCEPT", "1")
    with pytest.raises(RuntimeError, match="needs expecttest"):
        case.assertExpectedInline("graphs: 2", "graphs: 1")
