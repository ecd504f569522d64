"""The benchmark scripts keep working (their CPU modes; numbers are recorded in BENCHMARKS.md, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flux_full_gpu_tiny_mode_measures_every_configuration(tmp_path):
    out = tmp_path / "r.jsonl"
    done = subprocess.run([sys.executable, "benchmarks/flux_full_gpu.py", "--tiny", "--steps", "1", "--warmup", "0",
                           "--jsonl", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "s/it" not in line]
    assert len(rows) == 3 * 2 * 3  # bases x checkpointing x methods at one resolution
    import json

    records = [json.loads(line) for line in out.read_text().splitlines()]
    full = [r for r in records if r["base"] == "float32"]
    assert len(full) == 6 and all(r["step_tflop"] > 0 and r["floor_s_per_it"] > 0 for r in full)
    # checkpointing recomputes the forward: more FLOPs per step than without it
    on = {r["method"]: r["step_tflop"] for r in full if r["checkpointing"]}
    off = {r["method"]: r["step_tflop"] for r in full if not r["checkpointing"]}
    assert all(on[m] > off[m] for m in on)
    assert {r["base"] for r in records} == {"float32", "int8", "nf4"}


def test_flux_full_gpu_without_a_gpu_says_how_to_run_it():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script runs the full benchmark instead")
    done = subprocess.run([sys.executable, "benchmarks/flux_full_gpu.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--tiny" in done.stderr


def test_init_time_quick_subset_includes_lora_sb():
    done = subprocess.run([sys.executable, "benchmarks/init_time.py", "--quick", "--threads", "1",
                           "--methods", "lora,loram,lora_sb"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                     "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ")[0].lstrip("| ") for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["lora", "loram", "lora_sb", "W.var()"]  # after the header line
    assert "W.var() passes" in done.stdout
    bad = subprocess.run([sys.executable, "benchmarks/init_time.py", "--methods", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--methods must name some of" in bad.stderr


def test_flux_full_gpu_records_an_out_of_memory_setting_as_a_row(monkeypatch, capsys):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import flux_full_gpu

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(flux_full_gpu, "timed_steps", out_of_memory)
    assert flux_full_gpu.main(["--tiny", "--bases", "full", "--methods", "lora", "--checkpointing", "on"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32")]
    assert len(rows) == 1 and "| - | - | - | OOM |" in rows[0], rows


def test_flux_full_gpu_profile_splits_the_step_time(monkeypatch, tmp_path):
    import json

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import flux_full_gpu

    assert flux_full_gpu.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert flux_full_gpu.kernel_kind("nvjet_tst_128x256_64x4_2x1_v_bz_TNT") == "matmul"
    assert flux_full_gpu.kernel_kind("flash_fwd_kernel") == "attention"
    assert flux_full_gpu.kernel_kind("aten::mul") == "other"
    prof, jsonl = tmp_path / "profile.txt", tmp_path / "r.jsonl"
    assert flux_full_gpu.main(["--tiny", "--bases", "full", "--methods", "lora", "--checkpointing", "off",
                               "--steps", "1", "--warmup", "0", "--profile", str(prof), "--jsonl", str(jsonl)]) == 0
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert "profile_table" not in record  # the table goes to the profile file only
    assert record["profile_ms"]["matmul"] > 0 and record["profile_ms"]["attention"] > 0
    text = prof.read_text()
    assert text.startswith("| float32 | off | 64 | lora |") and "ms per step" in text and "aten::" in text


def _quick(script: str, *extra: str) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bucket_benchmark_tables_buckets_and_both_step_times():
    out = _quick("buckets.py")
    assert "| 48x80 | bucket |" in out and "square crop" in out and "buckets / square step time" in out


def test_offset_overhead_benchmark_measures_the_three_layer_kinds():
    out = _quick("offset_overhead.py", "--threads", "1")
    rows = [line for line in out.splitlines() if line.startswith("| toy") or line.startswith("| tiny")]
    assert len(rows) == 2 and all(len(r.split("|")) == 10 for r in rows)


def test_validation_cost_benchmark_reports_a_share():
    out = _quick("validation_cost.py")
    assert "validation cost:" in out and "3 held-out views, 2 prior prompts" in out


def test_thread_policy_benchmark_reports_before_and_after():
    out = _quick("thread_policy.py")
    assert "| before (torch defaults) |" in out and "| after (thread policy) |" in out


def test_flux_trainer_gpu_tiny_mode_runs_the_trainer_end_to_end(tmp_path):
    """The GPU script's own build code (a FLUX pipeline of the full architecture, small), then `fluxlora train`
    with three arms, samples at 0 and the end, a checkpoint and the exports; a second call resumes (nothing left)."""
    import json

    cmd = [sys.executable, "benchmarks/flux_trainer_gpu.py", "--tiny", "--out", str(tmp_path), "--jsonl",
           str(tmp_path / "r.jsonl")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["lora", "pissa", "loram"] and all(r["s_per_it"] > 0 for r in rows)
    assert all(r["exports"] == ["adapter.safetensors", "adapter_comfyui.safetensors"] for r in rows)
    run = tmp_path / "runs" / "none_32px" / "pissa"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000", "step-000003"]
    assert (tmp_path / "pipeline" / "model_index.json").is_file() and not (tmp_path / "pipeline.partial").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]


def test_gpu_session_rehearses_its_steps_on_the_cpu_and_stops_at_its_budget(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_session.py", "--tiny", "--out", str(tmp_path / "out"), "--work",
           str(tmp_path / "work")]
    done = subprocess.run([*cmd, "--only", "quantized_step,block_swap"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| quantized_step | ok |" in summary and "| block_swap | ok |" in summary, summary
    assert (tmp_path / "out" / "quantized_step.jsonl").read_text().count("\n") == 4  # int8, nf4 x 2 methods
    spent = subprocess.run([*cmd, "--budget", "5", "--out", str(tmp_path / "none")], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert spent.returncode == 0 and (tmp_path / "none" / "summary.md").read_text().count("not started") == 4
