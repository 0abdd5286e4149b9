"""Issue 24's last item: the merge stage's peak memory at Qwen2.5-VL-7B's shape, measured on one GPU.

`bench/device_merge7b.sh` runs it on the GPU machine (its header says how); by hand:

    python bench/merge7b.py all --shape 7b --device cuda --out OUT                       # the GPU run
    python bench/merge7b.py all --shape tiny --device cpu --out /tmp/m7 --cleanup        # CPU rehearsal

`all`:
1. plan: the model's parameter count (built on the meta device) gives each checkpoint's bytes; the base (bf16),
   the adapter and the data root go to /dev/shm when it has room (RAM the machine can spare), the stage's output
   to the disk (/tmp): the stage's staging folder holds the fp32 merge (4 bytes a parameter) and the shipped bf16
   copy (2) at once. `--base-root`/`--merge-root` override.
2. build, in a subprocess (its GPU memory is gone before the stage starts): bench/generation.py's `build` at the
   shape (random weights, bf16, its trained tokenizer and processor), `save_pretrained` with the processor (config
   dtype bfloat16); the paper's adapter (configs/paper.yaml's `train_grpo_lora` over params.yaml: lora_targets
   repic, r 64, alpha 128) from the training stage's own `repic.train.grpo.lora_model`, seeded as the stage seeds
   it, then every lora_B drawn from N(0, --b-std) (PEFT starts B at zero: the merge would change nothing), saved
   as the training stage saves it (`save_pretrained(save_embedding_layers=False)`) and checked with
   `check_adapter`; the embedded default's synthetic world (params `fetch_data.world`, seed `base.seed`); the
   params file: params.yaml with base.device, base.threads null and the data root's paths.
3. the real stage, `python -m stages.merge_lora --params ... --model ... --adapter ... --root ... --out ...`,
   under `/usr/bin/time -v` (when there is one), sampled every 0.5 s by this process (which never touches the
   GPU): nvidia-smi's memory.used, the stage's RSS split anonymous / file-mapped / shared memory, the folders under
   its output. The samples split the run into the stage's five model loads (each a span of GPU memory in use:
   fp32 merge, fp32 reload, bf16 merge, shipped bf16, RePIC's bf16) and the CPU loads between them.

Everything lands in OUT as it is known: summary.json (rewritten after each phase), build.json, timeline.jsonl,
stage.log, time_v.txt, merge_report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GIB = 2**30
T0 = time.time()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def shapes() -> dict[str, Any]:
    """bench/generation.py's shapes, plus `tiny_untied`: the tiny shape with its own lm_head, as the 7B has (the
    tiny shape ties it to the embeddings), so that the rehearsal's adapter carries a LoRA on lm_head too; and
    `mid` (0.7B parameters, untied), for a CPU rehearsal whose checkpoints are large enough to show the stage's
    memory pattern (anonymous vs file-mapped RSS at each load)."""
    import generation

    generation.SHAPES.setdefault("tiny_untied", {**generation.SHAPES["tiny"], "tie": False})
    text = dict(generation.SHAPES["7b"]["text"], vocab_size=32768, hidden_size=1536, intermediate_size=8192,
                num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=2)
    vision = dict(generation.SHAPES["7b"]["vision"], depth=4, out_hidden_size=1536, fullatt_block_indexes=[3])
    generation.SHAPES.setdefault("mid", dict(text=text, vision=vision, mrope=[16, 24, 24], tie=False))
    return generation.SHAPES


# ------------------------------------------------------------------------------------------------------ build
def cmd_build(args: argparse.Namespace) -> None:
    import generation
    import torch

    from repic.core.params import deep_merge, load_params, read_overlay
    from repic.synthetic.world import make_world
    from repic.train.grpo import lora_model
    from repic.train.merge import checkpoint_dtype
    from repic.vlm.models import check_adapter, load_processor

    shapes()
    out = Path(args.report)
    rec: dict[str, Any] = {"shape": args.shape, "device": args.device, "seconds": {}}

    def step(name: str, t: float) -> None:
        rec["seconds"][name] = round(time.time() - t, 2)
        write_json(out, rec)

    params = load_params(REPO / "params.yaml")
    paper = deep_merge(params, read_overlay(REPO / args.recipe))
    section, seed = paper["train_grpo_lora"], params["base"]["seed"]
    rec["lora"] = {"lora_targets": section["lora_targets"], **section["lora"], "b_std": args.b_std}
    base, adapter, world = Path(args.base), Path(args.adapter), Path(args.world)

    t = time.time()
    model, processor = generation.build(args.shape, args.device, torch.bfloat16, args.image_px)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos  # build() drops it for its timing runs; a checkpoint has it
    rec["n_params"] = sum(p.numel() for p in model.parameters())
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    step("build_model", t)

    t = time.time()
    model.save_pretrained(base)
    processor.save_pretrained(base)
    rec["base_dtype"] = checkpoint_dtype(base)
    rec["base_bytes"] = du(base)
    step("save_base", t)

    t = time.time()
    from transformers import set_seed

    set_seed(seed)  # as repic.train.grpo.train: seeded before PEFT draws lora_A
    peft_model = lora_model(model, section)
    gen = torch.Generator().manual_seed(seed)
    n_b = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(args.b_std).to(p.dtype))
                n_b += 1
    rec["n_lora_modules"] = len(peft_model.targeted_module_names)
    rec["lm_head_targeted"] = any(n.endswith("lm_head") for n in peft_model.targeted_module_names)
    rec["n_lora_B"] = n_b
    rec["adapter_params"] = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    rec["adapter_dtypes"] = sorted({str(p.dtype) for n, p in peft_model.named_parameters() if "lora_" in n})
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    step("lora", t)

    t = time.time()
    peft_model.save_pretrained(adapter, save_embedding_layers=False)  # as repic.train.grpo.train saves it
    rec["adapter_bytes"] = du(adapter)
    step("save_adapter", t)
    if args.device.startswith("cuda"):
        rec["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    del model, peft_model

    t = time.time()
    check_adapter(adapter, base)  # what the stage checks first
    load_processor(base)
    step("check", t)

    t = time.time()
    make_world(world, seed=seed, **params["fetch_data"]["world"])
    rec["world_bytes"] = du(world)
    step("world", t)

    # The stage's params: the embedded default, on this device, its data paths in `world`. base.base_model stays
    # (the stage reads --model; the model rows' paths must stay inside it).
    p = json.loads(json.dumps(params))
    p["base"]["device"], p["base"]["threads"] = args.device, None
    old = p["base"]["data"]["root"].rstrip("/")
    p["base"]["data"]["root"] = str(world)

    def moved(path: str) -> str:
        if path != old and not path.startswith(old + "/"):
            raise SystemExit(f"params.yaml: {path}: not inside base.data.root {old}")
        return str(world) + path[len(old):]

    p["base"]["data"]["train_json"] = moved(p["base"]["data"]["train_json"])
    for ds in p["base"]["data"]["datasets"]:
        ds["database"] = moved(ds["database"])
        ds["queries"] = {k: moved(v) for k, v in ds["queries"].items()}
    import yaml

    Path(args.params_out).write_text(yaml.safe_dump(p, sort_keys=False))
    load_params(args.params_out)  # validated as the stage will
    rec["params"] = {"base": {k: p["base"][k] for k in ("device", "threads", "dtype")}, "merge_lora": p["merge_lora"]}
    rec["versions"] = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "safetensors")}
    if args.device.startswith("cuda"):
        rec["gpu"] = torch.cuda.get_device_name()
    write_json(out, rec)


# ----------------------------------------------------------------------------------------------------- monitor
def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(val.split()[0]) // 1024  # kB -> MiB
    except (OSError, ValueError):
        pass
    return out


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "Shmem", "Cached", "Dirty"):
            out[key] = int(val.split()[0]) // 1024
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _gpu_used_mb() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5).stdout
        return int(out.split()[0])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def _folders(root: Path) -> dict[str, int]:
    """MiB of the files under `root`, by folder (temporary folders' random names shown as <tmp>)."""
    sizes: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        key = "/".join("<tmp>" if part.endswith((".tmp", ".old")) else part for part in rel.parts) or "."
        total = 0
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
        if files:
            sizes[key] = round(sizes.get(key, 0) + total / 2**20, 2)
    return sizes


class Monitor(threading.Thread):
    def __init__(self, pid: int, watch: Path, log: Path, wrapped: bool, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.watch, self.wrapped, self.period = pid, watch, wrapped, period
        self.log = log.open("w")
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.t0 = time.time()

    def stage_pid(self) -> int:
        """The python process: /usr/bin/time's child when it wraps the stage."""
        kids = _children(self.pid) if self.wrapped else []
        return kids[0] if kids else self.pid

    def run(self) -> None:
        while not self.stop.is_set():
            s: dict[str, Any] = {"t": round(time.time() - self.t0, 2)}
            gpu = _gpu_used_mb()
            if gpu is not None:
                s["gpu_used_mb"] = gpu
            s["rss_mb"] = _proc_status(self.stage_pid())
            m = _meminfo()
            s["host_used_mb"] = m["MemTotal"] - m["MemAvailable"]
            s["shmem_mb"], s["dirty_mb"] = m["Shmem"], m["Dirty"]
            s["files_mb"] = _folders(self.watch)
            self.samples.append(s)
            self.log.write(json.dumps(s) + "\n")
            self.log.flush()
            self.stop.wait(self.period)
        self.log.close()


LOADS = ["fp32 merge: base (fp32) + adapter measured, merged, saved fp32 + shipped bf16",
         "fp32 check: the fp32 merge reloaded, measured",
         "bf16 merge (RePIC's): base (bf16) + adapter measured, merged, saved",
         "bf16 check: the shipped checkpoint (fp32 merge cast to bf16) measured",
         "bf16 check: RePIC's bf16 merge measured"]


def spans(samples: list[dict[str, Any]], threshold_mb: int = 1024) -> list[dict[str, Any]]:
    """Spans of GPU memory in use (above the first sample + threshold): one model on the GPU each."""
    if not samples or "gpu_used_mb" not in samples[0]:
        return []
    floor = samples[0]["gpu_used_mb"] + threshold_mb
    out, cur, prev_end = [], None, 0.0
    for s in samples:
        busy = s.get("gpu_used_mb", 0) > floor
        if busy and cur is None:
            cur = {"start_s": s["t"], "cpu_before_s": round(s["t"] - prev_end, 1), "gpu_peak_used_mb": 0,
                   "rss_peak_mb": 0, "rss_anon_peak_mb": 0}
        if cur is not None:
            if not busy:
                cur["end_s"] = s["t"]
                cur["seconds"] = round(cur["end_s"] - cur["start_s"], 1)
                prev_end = s["t"]
                out.append(cur)
                cur = None
                continue
            cur["gpu_peak_used_mb"] = max(cur["gpu_peak_used_mb"], s["gpu_used_mb"])
            cur["rss_peak_mb"] = max(cur["rss_peak_mb"], s["rss_mb"].get("VmRSS", 0))
            cur["rss_anon_peak_mb"] = max(cur["rss_anon_peak_mb"], s["rss_mb"].get("RssAnon", 0))
    if cur is not None:
        cur["end_s"] = None
        out.append(cur)
    if len(out) == len(LOADS):
        for span, what in zip(out, LOADS):
            span["what"] = what
    return out


def folder_events(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """When each output folder first held files, its largest size, and when it was last seen."""
    ev: dict[str, dict[str, Any]] = {}
    for s in samples:
        for key, mb in s["files_mb"].items():
            e = ev.setdefault(key, {"first_s": s["t"], "max_mb": 0})
            e["max_mb"], e["last_s"] = max(e["max_mb"], mb), s["t"]
    return ev


def peaks(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def top(key: str, sub: str | None = None) -> int | None:
        vals = [(s[key].get(sub) if sub else s.get(key)) for s in samples]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    return {"gpu_used_mb": top("gpu_used_mb"), "rss_mb": top("rss_mb", "VmRSS"),
            "rss_hwm_mb": top("rss_mb", "VmHWM"), "rss_anon_mb": top("rss_mb", "RssAnon"),
            "rss_file_mb": top("rss_mb", "RssFile"), "rss_shmem_mb": top("rss_mb", "RssShmem"),
            "host_used_mb": top("host_used_mb"), "files_mb": max((sum(s["files_mb"].values()) for s in samples),
                                                                 default=0)}


def parse_time_v(path: Path) -> dict[str, str]:
    keep = ("Maximum resident set size", "Elapsed (wall clock)", "User time", "System time", "Exit status",
            "Major (requiring I/O) page faults", "Percent of CPU")
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, _, val = line.strip().rpartition(": ")
            if key.startswith(keep):
                out[key] = val
    return out


# --------------------------------------------------------------------------------------------------------- all
def free_gib(path: Path) -> float:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GIB


def _fs(path: Path) -> tuple[int, bool]:
    """`path`'s filesystem (device id) and whether it is RAM (tmpfs)."""
    p = path
    while not p.exists():
        p = p.parent
    mounts = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mounts[parts[1]] = parts[2]
    mount = next(str(m) for m in [p.resolve(), *p.resolve().parents] if str(m) in mounts)
    return p.stat().st_dev, mounts[mount] in ("tmpfs", "ramfs")


def candidates(disk_root: Path) -> list[Path]:
    """Writable folders, one a filesystem: `disk_root`, /dev/shm, /var/tmp and every other tmpfs mount."""
    roots = [disk_root, Path("/dev/shm"), Path("/var/tmp")]
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "tmpfs" and not parts[1].startswith(("/sys", "/proc", "/dev")):
            roots.append(Path(parts[1]))
    out, seen = [], set()
    for r in roots:
        if r.is_dir() and os.access(r, os.W_OK) and _fs(r)[0] not in seen:
            seen.add(_fs(r)[0])
            out.append(r)
    return out


def plan(args: argparse.Namespace, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Where the base + adapter + data (base root) and the stage's output (merge root) go, from the bytes they
    need: the base 2 bytes a parameter; the stage's staging folder the fp32 merge (4) and the shipped bf16 copy
    (2) at once, later the shipped and RePIC's bf16 merge (2 + 2), then the final bf16 model (2). The stage's own
    host memory (the CPU rehearsal at 0.56B: an fp32 copy, 4 bytes a parameter, plus the mapped checkpoint) must
    fit beside what a RAM filesystem holds. Preferred: the output on disk (as a real run writes it), the base in
    RAM (fast loads); `--base-root`/`--merge-root` override."""
    import generation
    import torch

    shapes()
    with torch.device("meta"):
        model, _ = generation.build(args.shape, "meta", torch.bfloat16, args.image_px)
    n = sum(p.numel() for p in model.parameters())
    del model
    mem_total = _meminfo()["MemTotal"] / 1024
    need_base = (2 * n * 1.03 + 0.05 * n) / GIB + 0.3  # bf16 weights, the fp32 adapter (< 2.5 % of n), the data
    need_merge = 6 * n * 1.03 / GIB + 0.5
    stage_ram = 6 * n / GIB + 6  # host copies of an fp32 model (4n) + a mapped checkpoint (2n), torch, CUDA
    roots = candidates(Path(args.disk_root))
    info = {str(r): {"free_gib": round(free_gib(r), 1), "ram": _fs(r)[1]} for r in roots}
    layouts = []
    for b in ([Path(args.base_root)] if args.base_root else roots):
        for m in ([Path(args.merge_root)] if args.merge_root else roots):
            same = _fs(b)[0] == _fs(m)[0]
            fits = (free_gib(b) >= need_base + need_merge) if same else (
                free_gib(b) >= need_base and free_gib(m) >= need_merge)
            ram = stage_ram + (need_base if _fs(b)[1] else 0) + (need_merge if _fs(m)[1] else 0)
            # preference: fits, the output on disk, the base in RAM, the most room left
            room = min(free_gib(b) - need_base - (need_merge if same else 0), free_gib(m) - need_merge)
            ram_ok = ram <= mem_total
            layouts.append(((fits and ram_ok, fits, ram_ok, not _fs(m)[1], _fs(b)[1], room), b, m, ram))
    (ok, *_), base_root, merge_root, ram = max(layouts, key=lambda x: x[0])
    warnings = [] if ok else [f"no layout fits: base {need_base:.1f} GiB, the stage's output {need_merge:.1f} GiB, "
                              f"RAM {ram:.0f} of {mem_total:.0f} GiB; free: {info}; the stage may fail (disk full)"]
    summary["plan"] = {"n_params": n, "bf16_gib": round(2 * n / GIB, 2), "fp32_gib": round(4 * n / GIB, 2),
                       "need_base_gib": round(need_base, 1), "need_merge_gib": round(need_merge, 1),
                       "ram_needed_gib": round(ram, 1), "mem_total_gib": round(mem_total, 1), "filesystems": info,
                       "base_root": str(base_root), "merge_root": str(merge_root), "warnings": warnings}
    return base_root / "merge7b_base", merge_root / "merge7b_out"


BAR = re.compile(r"^(Loading weights|Writing model shards):\s+(\d+)%")
LOADED = ["base (fp32) + adapter", "fp32 merge reloaded", "base (bf16) + adapter", "shipped (bf16) reloaded",
          "RePIC's bf16 merge reloaded"]
WRITTEN = ["fp32 merge", "shipped bf16 (the fp32 merge cast)", "RePIC's bf16 merge"]


def _pump(stream: Any, fh: Any, t0: float, bars: list[dict[str, Any]]) -> None:
    """The child's output to `fh`, each line (tqdm's \r updates too) prefixed with seconds since `t0`; the
    progress bars' first and 100 % lines recorded in `bars`."""
    buf = b""
    while True:
        chunk = os.read(stream.fileno(), 1 << 16)
        if chunk:
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
        else:
            parts, buf = [buf], b""
        now = round(time.time() - t0, 2)
        for part in parts:
            line = part.decode(errors="replace").strip()
            if not line:
                continue
            fh.write(f"[{now:7.1f}] {line}\n")
            m = BAR.match(line)
            open_ = bool(bars) and "end_s" not in bars[-1]
            if m and m[2] == "0" and not open_:  # a bar starts at 0 %; tqdm repeats its last line on close
                bars.append({"bar": m[1], "start_s": now})
            elif m and m[2] == "100" and open_ and bars[-1]["bar"] == m[1]:
                # tqdm's own elapsed time: its first line can come late (a one-step bar shows 0 % and 100 %
                # together); for one step its s/it is finer than its [mm:ss]
                e = re.search(r"\[(?:(\d+):)?(\d+):(\d+)<", line)
                one = re.search(r"\| 1/1 \[.*?([\d.]+)s/it\]", line)
                elapsed = float(one[1]) if one else (
                    int(e[1] or 0) * 3600 + int(e[2]) * 60 + int(e[3]) if e else 0.0)
                b = bars[-1]
                b["end_s"], b["start_s"] = now, min(b["start_s"], round(now - elapsed, 2))
                b["seconds"] = round(now - b["start_s"], 2)
        fh.flush()
        if not chunk:
            return


def phases(bars: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage's weight loads and checkpoint writes in order (transformers' progress bars), named when their
    counts are the stage's (5 loads, 3 writes), with the seconds between one bar's end and the next bar's start
    (measuring, merging, moving to the device, PEFT's adapter load)."""
    loads = [b for b in bars if b["bar"] == "Loading weights"]
    writes = [b for b in bars if b["bar"] == "Writing model shards"]
    if len(loads) == len(LOADED):
        for b, what in zip(loads, LOADED):
            b["what"] = what
    if len(writes) == len(WRITTEN):
        for b, what in zip(writes, WRITTEN):
            b["what"] = what
    for prev, b in zip(bars, bars[1:]):
        if "end_s" in prev:
            b["after_previous_s"] = round(b["start_s"] - prev["end_s"], 2)
    return bars


def run_logged(cmd: list[str], log: Path, timeout: float, monitor_root: Path | None = None,
               timeline: Path | None = None, wrapped: bool = False) -> tuple[int | None, float, dict[str, Any]]:
    """Run `cmd` (its own process group, output to `log` with seconds since start), killed at `timeout`; with
    `monitor_root`, sampled."""
    t = time.time()
    bars: list[dict[str, Any]] = []
    with log.open("w") as fh:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        pump = threading.Thread(target=_pump, args=(p.stdout, fh, t, bars), daemon=True)
        pump.start()
        mon = None
        if monitor_root is not None:
            mon = Monitor(p.pid, monitor_root, timeline, wrapped)
            mon.t0 = t  # one clock with the output's timestamps
            mon.start()
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)  # the stage's own process group: SIGTERM unwinds its atomic writers
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = None
        if mon is not None:
            mon.stop.set()
            mon.join()
        pump.join(timeout=30)
    extra: dict[str, Any] = {"phases": phases(bars)} if bars else {}
    if mon is not None:
        extra |= {"peaks": peaks(mon.samples), "gpu_spans": spans(mon.samples),
                 "folders": folder_events(mon.samples), "n_samples": len(mon.samples)}
    return rc, round(time.time() - t, 1), extra


def cmd_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"shape": args.shape, "device": args.device, "seconds": {}}
    sfile = out / "summary.json"

    def left() -> float:
        return args.budget_s - (time.time() - T0)

    t = time.time()
    base_dir, merge_dir = plan(args, summary)
    summary["seconds"]["plan"] = round(time.time() - t, 1)
    write_json(sfile, summary)
    print(json.dumps(summary["plan"]), flush=True)
    for d in (base_dir, merge_dir):
        shutil.rmtree(d, ignore_errors=True)
    base_dir.mkdir(parents=True)
    model, adapter, world = base_dir / "base", base_dir / "adapter", base_dir / "world"
    params_file, stage_out = base_dir / "params.yaml", merge_dir / "merged"
    py = sys.executable
    try:
        cmd = [py, __file__, "build", "--shape", args.shape, "--device", args.device, "--base", str(model),
               "--adapter", str(adapter), "--world", str(world), "--params-out", str(params_file),
               "--recipe", args.recipe, "--image-px", str(args.image_px), "--b-std", str(args.b_std),
               "--report", str(out / "build.json")]
        rc, secs, _ = run_logged(cmd, out / "build.log", left() - 30)
        summary["seconds"]["build"] = secs
        summary["build"] = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else None
        summary["build_rc"] = rc
        write_json(sfile, summary)
        print(f"build: rc {rc}, {secs} s", flush=True)
        if rc != 0:
            summary["error"] = "build failed (build.log)"
            write_json(sfile, summary)
            return 1
        shutil.copy(params_file, out / "stage_params.yaml")

        stage = [py, "-m", "stages.merge_lora", "--params", str(params_file), "--model", str(model), "--adapter",
                 str(adapter), "--root", str(world), "--out", str(stage_out)]
        timev = Path("/usr/bin/time").is_file()
        if timev:
            stage = ["/usr/bin/time", "-v", "-o", str(out / "time_v.txt"), *stage]
        summary["stage_cmd"] = " ".join(stage)
        merge_dir.mkdir(parents=True, exist_ok=True)
        write_json(sfile, summary)
        rc, secs, extra = run_logged(stage, out / "stage.log", left() - 10, monitor_root=merge_dir,
                                     timeline=out / "timeline.jsonl", wrapped=timev)
        summary["seconds"]["stage"] = secs
        summary["stage_rc"] = rc
        summary["stage_timed_out"] = rc is None
        summary["time_v"] = parse_time_v(out / "time_v.txt") if timev else "no /usr/bin/time on this machine"
        summary.update(extra)
        report = stage_out / "merge_report.json"
        if report.is_file():
            shutil.copy(report, out / "merge_report.json")
            summary["merge_report"] = json.loads(report.read_text())
        summary["merged_model_bytes"] = du(stage_out / "model")
        summary["checkpoint_bytes"] = {"base": du(model), "adapter": du(adapter), "world": du(world),
                                       "merged_model": du(stage_out / "model")}
        summary["free_gib_after"] = {str(p): round(free_gib(p), 1) for p in {base_dir, merge_dir}}
        summary["stage_ok"] = rc == 0 and bool(summary.get("merge_report", {}).get("ok"))
        summary["seconds"]["total"] = round(time.time() - T0, 1)
        write_json(sfile, summary)
        return 0 if summary["stage_ok"] else 1
    finally:
        if args.cleanup:
            for d in (base_dir, merge_dir):
                shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "build"):
        p = sub.add_parser(name)
        p.add_argument("--shape", default="7b", choices=["7b", "mid", "tiny", "tiny_untied"])
        p.add_argument("--device", default="cuda")
        p.add_argument("--recipe", default="configs/paper.yaml",
                       help="the overlay whose train_grpo_lora section builds the adapter")
        p.add_argument("--image-px", type=int, default=448, help="the processor's max_pixels is its square")
        p.add_argument("--b-std", type=float, default=0.01, help="lora_B ~ N(0, b_std): a merge that changes W")
    a = sub.choices["all"]
    a.add_argument("--out", required=True)
    a.add_argument("--budget-s", type=float, default=520, help="seconds from start: the stage is stopped then")
    a.add_argument("--disk-root", default="/tmp")
    a.add_argument("--base-root", default=None, help="default: plan's choice (RAM when it has room)")
    a.add_argument("--merge-root", default=None, help="default: plan's choice (disk when it has room)")
    a.add_argument("--cleanup", action="store_true", help="remove the checkpoints at the end")
    b = sub.choices["build"]
    for key in ("--base", "--adapter", "--world", "--params-out", "--report"):
        b.add_argument(key, required=True)
    args = ap.parse_args()
    if args.cmd == "build":
        cmd_build(args)
        return 0
    return cmd_all(args)


if __name__ == "__main__":
    sys.exit(main())
