#!/usr/bin/env python3
"""The GPU check (issue 12): one prepared script for a lent GPU machine, tried here on the CPU
with the same arguments first. It builds nothing there: the program's binary (built here with
`--features cuda`) is carried, and torch (plus a carried diffusers wheel) does the rest. Prints
one JSON line per measurement, to stdout; progress goes to stderr.

Stages (`--stages`, comma-separated, in this order; all by default):
  env     the GPU, driver, torch and the binary's version
  parity  every committed parity case (tests/fixtures/edits/*) edited in f32 on DEVICE and on the
          CPU by the same binary: each against diffusers' expected.png and against each other
  half    the sd1-plain case in f16 and bf16 on DEVICE, against diffusers in that dtype on the same
          device (when diffusers imports) and against the committed CPU references
  model   a full-size random-weight model with timbrooks' shapes (scripts/make_bench_model.py);
          with --quick the tiny fixture pipeline stands in
  edit    a 512², 20-step edit (f16 and bf16) by the binary's `bench` and by diffusers
  train   a training step at 256², batch 4: full and LoRA rank 4, with and without gradient
          checkpointing, float32, plus fp16 mixed precision with checkpointing; ours (`train`)
          and diffusers' loop (scripts/bench_train_diffusers.py); seconds per step and peak memory

Peak memory: on a GPU both programs are measured the same way, by polling `nvidia-smi` for the
device's memory in use while the command runs (minus what was in use before it started); torch's
own allocator peak is reported beside it for diffusers. On the CPU, the child's peak resident
memory.

    # here, on the CPU, with the CPU build (what CI's machines can run):
    python scripts/gpu_check.py --binary target/debug/instruct-pix2pix --device cpu --quick
    # on the lent GPU, with the carried CUDA build:
    python scripts/gpu_check.py --binary gpu/instruct-pix2pix --device cuda --work /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
STAGES = ["env", "parity", "half", "model", "edit", "train"]


def emit(record: dict):
    print(json.dumps(record), flush=True)


def note(text: str):
    print(f"[gpu_check] {text}", file=sys.stderr, flush=True)


class PeakMemory:
    """Polls a running command's memory: the GPU's memory in use (nvidia-smi, minus the amount in
    use before the command started) or, on the CPU, the child's resident set."""

    def __init__(self, device: str):
        self.device = device
        self.gpu_index = device.split(":")[1] if ":" in device else "0"
        self.baseline_mb = self._gpu_used_mb() if self.on_gpu else 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def _gpu_used_mb(self) -> float:
        out = subprocess.run(
            ["nvidia-smi", f"--id={self.gpu_index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
        return float(out.stdout.strip().splitlines()[0])

    def _rss_mb(self, pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def watch(self, pid: int):
        def poll():
            while not self._stop.is_set():
                used = self._gpu_used_mb() - self.baseline_mb if self.on_gpu else self._rss_mb(pid)
                self.peak_mb = max(self.peak_mb, used)
                self._stop.wait(0.1)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=15)
        return round(self.peak_mb / 1024, 3)


def run(cmd: list[str], device: str, timeout: float, env: dict | None = None) -> dict:
    """Runs `cmd`, returning its exit code, output, wall seconds and peak memory (GiB)."""
    note(" ".join(str(c) for c in cmd))
    memory = PeakMemory(device)
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    memory.watch(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return {
        "rc": process.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_gib": memory.stop(),
    }


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)


def difference(a: Path, b: Path) -> dict:
    x, y = pixels(a), pixels(b)
    if x.shape != y.shape:
        return {"shape_a": list(x.shape), "shape_b": list(y.shape)}
    d = np.abs(x - y)
    return {"max_levels": int(d.max()), "mean_levels": round(float(d.mean()), 4)}


def edit_args(case_dir: Path, settings: dict, output: Path) -> list[str]:
    """The `edit` arguments that reproduce a committed parity case (as tests/integration/edit_parity.rs)."""
    args = [
        "edit", "--model", FIXTURES / "pipelines" / settings["pipeline"],
        "--image", case_dir / "input.png",
        "--prompt", settings["prompt"],
        "--steps", settings["num_inference_steps"],
        "--guidance-scale", settings["guidance_scale"],
        "--image-guidance-scale", settings["image_guidance_scale"],
        "--output", output, "--quiet",
    ]
    if settings.get("negative_prompt") is not None:
        args += ["--negative-prompt", settings["negative_prompt"]]
    if settings.get("latents"):
        args += ["--latents", case_dir / settings["latents"]]
    if settings.get("seed") is not None:
        args += ["--seed", settings["seed"]]
    return [str(a) for a in args]


def stage_env(opts):
    record = {"stage": "env", "device": opts.device}
    version = run([opts.binary, "--version"], "cpu", 60)
    record["binary"] = version["stdout"].strip() or tail(version["stderr"])
    try:
        import torch

        record["torch"] = torch.__version__
        record["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name(0)
            record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError as error:
        record["torch"] = f"not importable: {error}"
    try:
        import diffusers

        record["diffusers"] = diffusers.__version__
    except ImportError as error:
        record["diffusers"] = f"not importable: {error}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        record["nvidia_smi"] = smi.stdout.strip()
    emit(record)


def stage_parity(opts):
    for case_dir in sorted((FIXTURES / "edits").iterdir()):
        settings_path = case_dir / "settings.json"
        if not settings_path.exists():
            continue
        settings = json.loads(settings_path.read_text())
        record = {"stage": "parity", "case": case_dir.name}
        outputs = {}
        for device in dict.fromkeys([opts.device, "cpu"]):
            output = opts.work / "parity" / f"{case_dir.name}-{device.replace(':', '')}.png"
            output.parent.mkdir(parents=True, exist_ok=True)
            result = run([opts.binary, *edit_args(case_dir, settings, output), "--device", device, "--dtype", "f32"],
                         device, 300)
            if result["rc"] != 0:
                record[f"{device}_error"] = tail(result["stderr"])
                continue
            outputs[device] = output
            record[f"{device}_vs_diffusers"] = difference(output, case_dir / "expected.png")
            record[f"{device}_s"] = result["wall_s"]
        if len(outputs) == 2:
            record["device_vs_cpu"] = difference(outputs[opts.device], outputs["cpu"])
        ours = record.get(f"{opts.device}_vs_diffusers", {})
        record["ok"] = ours.get("max_levels", 99) <= 3 and ours.get("mean_levels", 99) <= 0.3
        emit(record)


def diffusers_half(case_dir: Path, settings: dict, dtype_name: str, device: str, output: Path) -> str | None:
    """diffusers' own edit of the case in `dtype_name` on `device` (None, or why not)."""
    try:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    except ImportError as error:
        return f"diffusers not importable: {error}"
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        FIXTURES / "pipelines" / settings["pipeline"], torch_dtype=dtype, safety_checker=None
    ).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(case_dir / settings["latents"])).to(device=device, dtype=dtype)
    image = pipe(
        settings["prompt"], image=PIL.Image.open(case_dir / "input.png").convert("RGB"),
        num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
        image_guidance_scale=settings["image_guidance_scale"], latents=latents,
    ).images[0]
    image.save(output)
    return None


def stage_half(opts):
    case_dir = FIXTURES / "edits" / "sd1-plain"
    settings = json.loads((case_dir / "settings.json").read_text())
    for dtype in ["f16", "bf16"]:
        record = {"stage": "half", "case": case_dir.name, "dtype": dtype, "device": opts.device}
        output = opts.work / "half" / f"ours-{dtype}.png"
        output.parent.mkdir(parents=True, exist_ok=True)
        result = run([opts.binary, *edit_args(case_dir, settings, output), "--device", opts.device,
                      "--dtype", dtype], opts.device, 300)
        if result["rc"] != 0:
            record["error"] = tail(result["stderr"])
            emit(record)
            continue
        reference = FIXTURES / "edits" / "half" / {"f16": "float16.png", "bf16": "bfloat16.png"}[dtype]
        record["vs_diffusers_cpu_same_dtype"] = difference(output, reference)
        record["vs_diffusers_f32"] = difference(output, case_dir / "expected.png")
        theirs = opts.work / "half" / f"diffusers-{dtype}-{opts.device.replace(':', '')}.png"
        try:
            why_not = diffusers_half(case_dir, settings, dtype, opts.device, theirs)
        except Exception as error:  # a diffusers failure is a finding, not the end of the check
            why_not = f"{type(error).__name__}: {error}"
        if why_not:
            record["diffusers_same_device"] = why_not
        else:
            record["vs_diffusers_same_device"] = difference(output, theirs)
        emit(record)


def stage_model(opts) -> Path:
    if opts.quick or opts.model:
        model = opts.model or FIXTURES / "pipelines" / "sd1-tiny"
        emit({"stage": "model", "model": str(model), "made": False})
        return model
    model = opts.work / "bench-model"
    if not (model / "model_index.json").exists():
        result = run([sys.executable, REPO / "scripts" / "make_bench_model.py", model], "cpu", 560)
        emit({"stage": "model", "model": str(model), "made": result["rc"] == 0, "s": result["wall_s"],
              **({} if result["rc"] == 0 else {"error": tail(result["stderr"])})})
    else:
        emit({"stage": "model", "model": str(model), "made": False, "reused": True})
    return model


def stage_edit(opts, model: Path):
    size, steps = (64, 2) if opts.quick else (512, 20)
    for dtype, torch_dtype in [("f16", "float16"), ("bf16", "bfloat16")]:
        ours = run([opts.binary, "bench", "--model", model, "--size", size, "--steps", steps,
                    "--runs", 2, "--device", opts.device, "--dtype", dtype], opts.device, 400)
        emit({"stage": "edit", "impl": "instruct-pix2pix", "size": size, "steps": steps, "dtype": dtype,
              "peak_gib_polled": ours["peak_gib"],
              **(last_json(ours["stdout"]) or {"error": tail(ours["stderr"])})})
        theirs = run([sys.executable, REPO / "scripts" / "bench_diffusers.py", model, "--size", size, "--steps",
                      steps, "--dtype", torch_dtype, "--device", opts.device], opts.device, 400)
        emit({"stage": "edit", "impl": "diffusers", "size": size, "steps": steps, "dtype": dtype,
              "peak_gib_polled": theirs["peak_gib"],
              **(last_json(theirs["stdout"]) or {"error": tail(theirs["stderr"])})})


def training_data(opts) -> Path:
    """Eight pairs (the fixture's images, repeated) in an imagefolder, so that batch 4 is full."""
    source = FIXTURES / "train_data" / "imagefolder"
    folder = opts.work / "train-data"
    if folder.exists():
        return folder
    (folder / "img").mkdir(parents=True)
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    with open(folder / "metadata.jsonl", "w") as out:
        for i in range(8):
            row = dict(rows[i % len(rows)])
            for key in ["input_image", "edited_image"]:
                name = f"img/{i}-{Path(row[key]).name}"
                shutil.copy(source / row[key], folder / name)
                row[key] = name
            out.write(json.dumps(row) + "\n")
    return folder


def our_step_seconds(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["seconds"] for r in records if "seconds" in r and "step" in r]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def stage_train(opts, model: Path):
    data = training_data(opts)
    size, batch, steps = (32, 2, 3) if opts.quick else (256, 4, 4)
    variants = [
        {"lora": None, "checkpointing": False, "precision": "no"},
        {"lora": None, "checkpointing": True, "precision": "no"},
        {"lora": 4, "checkpointing": False, "precision": "no"},
        {"lora": 4, "checkpointing": True, "precision": "no"},
        {"lora": None, "checkpointing": True, "precision": "fp16"},
    ]
    for variant in variants:
        label = {"stage": "train", "size": size, "batch": batch, "lora_rank": variant["lora"],
                 "gradient_checkpointing": variant["checkpointing"], "mixed_precision": variant["precision"]}
        output_dir = opts.work / "train-out" / f"{variant['lora']}-{variant['checkpointing']}-{variant['precision']}"
        shutil.rmtree(output_dir, ignore_errors=True)
        cmd = [opts.binary, "train", "--pretrained_model_name_or_path", model, "--train_data_dir", data,
               "--output_dir", output_dir, "--resolution", size, "--train_batch_size", batch,
               "--max_train_steps", steps, "--lr_warmup_steps", 0, "--seed", 0, "--report_to", "none",
               "--checkpointing_steps", 100000, "--quiet", "--device", opts.device,
               "--mixed_precision", variant["precision"], "--skip_memory_check"]
        if variant["lora"]:
            cmd += ["--lora-rank", variant["lora"]]
        if variant["checkpointing"]:
            cmd += ["--gradient_checkpointing"]
        ours = run(cmd, opts.device, 500)
        record = {**label, "impl": "instruct-pix2pix", "peak_gib_polled": ours["peak_gib"], "wall_s": ours["wall_s"]}
        if ours["rc"] == 0:
            seconds = our_step_seconds(output_dir)
            record["step_median_s"] = round(statistics.median(seconds), 4) if seconds else None
            record["step_s"] = [round(s, 4) for s in seconds]
        else:
            record["error"] = tail(ours["stderr"])
        emit(record)

        cmd = [sys.executable, REPO / "scripts" / "bench_train_diffusers.py", model, "--size", size,
               "--batch", batch, "--steps", steps - 1, "--device", opts.device,
               "--mixed-precision", variant["precision"]]
        if variant["lora"]:
            cmd += ["--lora-rank", variant["lora"]]
        if variant["checkpointing"]:
            cmd += ["--gradient-checkpointing"]
        theirs = run(cmd, opts.device, 500)
        emit({**label, "impl": "diffusers", "peak_gib_polled": theirs["peak_gib"], "wall_s": theirs["wall_s"],
              **(last_json(theirs["stdout"]) or {"error": tail(theirs["stderr"])})})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, required=True, help="the instruct-pix2pix binary to check")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="scratch folder")
    parser.add_argument("--model", type=Path, default=None, help="a model folder to time (skips making one)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and the tiny fixture model (the CPU dry run)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    opts = parser.parse_args()
    opts.binary = opts.binary.resolve()
    opts.work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in opts.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    started = time.perf_counter()
    model = None
    for stage in STAGES:
        if stage not in stages:
            continue
        note(f"stage {stage} ({time.perf_counter() - started:.0f} s so far)")
        try:
            if stage == "env":
                stage_env(opts)
            elif stage == "parity":
                stage_parity(opts)
            elif stage == "half":
                stage_half(opts)
            elif stage == "model":
                model = stage_model(opts)
            elif stage in ("edit", "train"):
                model = model or opts.model or stage_model(opts)
                (stage_edit if stage == "edit" else stage_train)(opts, model)
        except Exception as error:  # one stage's failure is reported; the others still run
            emit({"stage": stage, "error": f"{type(error).__name__}: {error}"})
    emit({"stage": "done", "total_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
