"""The benchmark scripts run end to end (CPU quick mode here) and write their outputs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_microbenchmark_quick_mode(tmp_path):
    _run("bench_se.py", "--device", "cpu", "--out", str(tmp_path), "--models", "mobilenetv3_large", "--layouts", "nchw")
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    measured = {(r["contender"], r["pass"]) for r in rows if r["status"] == "ok"}
    for contender in ("eager SEBlock", "torch.compile default", "FusedSE cpp", "FusedSE torch"):
        for pass_name in ("forward", "forward+backward", "backward"):
            assert (contender, pass_name) in measured, (contender, pass_name, rows)
    assert all(float(r["median_ms"]) > 0 for r in rows if r["status"] == "ok")
    assert all(int(r["page_faults"]) >= 0 for r in rows if r["status"] == "ok")  # counted per contender on the CPU
    assert "glibc malloc keeps freed memory" in (tmp_path / "bench.md").read_text()  # --malloc reuse, the default
    assert any(r["contender"] == "FusedSE cuda" and r["status"].startswith("not available") for r in rows)
    assert "| mobilenetv3_large |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_quick_mode(tmp_path):
    _run("end_to_end.py", "--quick", "--no-compile", "--out", str(tmp_path), "--models", "mobilenetv3_large_100",
         "--layouts", "channels_last", "nchw")
    rows = list(csv.DictReader(open(tmp_path / "e2e.csv")))
    assert {r["variant"] for r in rows} == {"eager", "FusedSE"}
    assert {r["layout"] for r in rows} == {"channels_last", "nchw"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows)
    assert all(int(r["se_modules_converted"]) == 8 and float(r["max_relative_output_diff"]) < 1e-4 for r in rows)
    assert "train step b2" in (tmp_path / "e2e.md").read_text()


def test_end_to_end_compiled_variants_really_compile(tmp_path):
    """The whole model under torch.compile, with timm's SE modules and with FusedSE: both rows timed,
    and only if they compiled."""
    _run("end_to_end.py", "--quick", "--no-train", "--batches", "1", "--out", str(tmp_path), "--models",
         "mobilenetv3_large_100")
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "e2e.csv"))}
    assert set(rows) == {"eager", "FusedSE", "compile", "compile+FusedSE"}
    for variant in ("compile", "compile+FusedSE"):
        assert rows[variant]["status"] == "ok" and float(rows[variant]["ms"]) > 0, rows[variant]


def test_compile_fallback_is_reported_not_timed():
    """A compiled contender that Dynamo runs eagerly must not pass for compiled code (bench_se.py and
    end_to_end.py both use this check)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_se import compiled_region_ran

    import torch

    block = torch.compile(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    block(x)
    assert compiled_region_ran(lambda: block(x))
    with torch.compiler.set_stance("force_eager"):
        assert not compiled_region_ran(lambda: block(x))


def test_gpu_check_dry_run(tmp_path):
    """The GPU check script runs end to end in its dry-run mode, so a GPU session never meets a typo."""
    env = dict(os.environ, GPU_CHECK_STEPS="build sanitizer bench e2e")  # its test step is this suite
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "FAIL" not in summary, summary
    assert summary.count(" ok ") == 5, summary
    assert "Host time per call" in summary, summary
    assert {p.name for p in tmp_path.iterdir()} == {"summary.txt", "build.log", "sanitizer.log", "bench.csv",
                                                     "bench.md", "bench.png", "e2e.md"}


def test_senet_costs_quick_mode(tmp_path):
    _run("senet_costs.py", "--device", "cpu", "--quick", "--out", str(tmp_path), "--models", "se_inception_v3",
         "--no-ratios")
    rows = list(csv.DictReader(open(tmp_path / "senet.csv")))
    assert [(r["network"], r["base"], r["se_modules"]) for r in rows] == [("se_inception_v3", "inception_v3", "11")]
    row = rows[0]
    assert int(row["params_se"]) > int(row["params_base"])
    assert float(row["fused_output_error"]) <= 2 * float(row["eager_output_error"]) + 1e-6
    for task in ("train step", "inference"):
        assert all(float(row[f"{task} {v} ms"]) > 0 for v in ("base", "SE eager", "SE fused"))
    assert "+10.0%" in (tmp_path / "senet.md").read_text()  # the paper's training overhead, side by side
    assert (tmp_path / "senet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_residual_tail_quick_mode(tmp_path):
    _run("bench_tail.py", "--device", "cpu", "--quick", "--out", str(tmp_path), "--layouts", "channels_last")
    rows = list(csv.DictReader(open(tmp_path / "tail.csv")))
    measured = {(r["contender"], r["pass"]) for r in rows if r["status"] == "ok" and float(r["ms"]) > 0}
    for contender in ("eager", "torch.compile", "FusedSE + eager tail", "FusedSE tail torch", "FusedSE tail cpp"):
        for pass_name in ("forward", "forward+backward"):
            assert (contender, pass_name) in measured, (contender, pass_name, rows)
    assert "| 256x56x56 r16 |" in (tmp_path / "tail.md").read_text()
