"""Image-loading benchmark for issue 15 (results in docs/benchmarks.md, "Data loading at scale").

    .venv/bin/python benchmarks/data_loader.py --images 100000 --dir /tmp/hembench_faces

On a generated folder of small JPEGs (`--size` px square, `--per-id` images per identity,
generated once and reused), measured side by side in one run:

1. bare decode floor: `harness.data.image_folder.decode` (PIL decode + resize to uint8) of the
   files of the loader's measured window (the same files) in a plain loop, in 1 process and split over 2 processes (multiprocessing, no
   DataLoader, no batching, no float conversion);
2. loader throughput: `IvSData.train_batches` (P×K batches of `--batch`, flip on, float32
   out) with 1 and 2 worker processes, images/s after the first batch; and with 2 workers and
   `uint8=True` (normalisation left to the consumer, e.g. the GPU);
3. peak RSS of a trial-like child process (build the data, draw `--batches` batches with 2
   workers) above an empty child (same imports, no data), for the whole folder and for a tenth
   of it (the growth with the number of images);
4. `data.cache = "uint8"`: the first trial's preparation (index + decoding every image into the
   cache, 2 workers) vs a second trial's start (build the data + first batch) on the same data.

Rows are printed as markdown. Each child is a fresh `python` process: timings exclude imports.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(root: Path, n: int, per_id: int, size: int) -> None:
    """n JPEGs, per_id per identity directory: smooth random colour fields (~3–5 KB each)."""
    from PIL import Image

    marker = root / f".complete-{n}-{per_id}-{size}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        ident, j = divmod(i, per_id)
        d = root / f"{ident:06d}"
        if j == 0:
            d.mkdir(parents=True)
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        im.save(d / f"{j:03d}.jpg", quality=90)
    marker.touch()
    print(f"generated {n} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (/proc; 0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family_cpu_s() -> float:
    """CPU seconds of this process and its live children (DataLoader / Pool workers)."""
    kids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return time.process_time() + sum(_cpu_s(k) for k in kids)


def _decode_files(args: tuple[list[str], int]) -> int:
    from harness.data.image_folder import decode

    paths, size = args
    for p in paths:
        decode(p, size, 3, p)  # PIL open + draft + convert + resize, as the loader's workers
    return len(paths)


def floor_rate(paths: list[str], size: int, procs: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the bare decode loop over `paths` split over `procs`
    processes."""
    chunks = [(paths[i::procs], size) for i in range(procs)]
    if procs == 1:
        c0, t0 = _family_cpu_s(), time.perf_counter()
        _decode_files(chunks[0])
        wall, cpu = time.perf_counter() - t0, _family_cpu_s() - c0
        return len(paths) / wall, 1e3 * cpu / len(paths)
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_files, [([], size)] * procs)  # workers started
        c0, t0 = _family_cpu_s(), time.perf_counter()
        pool.map(_decode_files, chunks)
        wall, cpu = time.perf_counter() - t0, _family_cpu_s() - c0
        return len(paths) / wall, 1e3 * cpu / len(paths)


def _quiet(limit_s: float = 60.0) -> None:
    """Wait until this process and its workers stop using CPU (prefetch queues full)."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        c = _family_cpu_s()
        time.sleep(0.3)
        if _family_cpu_s() - c < 0.01:
            return


def loader_rate(
    d, batch: int, batches: int, workers: int, uint8: bool = False
) -> tuple[float, float]:
    """(images/s, CPU ms per image of the trial process and its workers) of train_batches.

    images/s: `batches` batches drawn after the first two (prefetch not yet full). CPU: from a
    full prefetch queue (workers idle) to a full one again after drawing `batches` more, so
    exactly those batches were decoded in between."""
    it = d.train_batches(batch, 2, 0, workers=workers, uint8=uint8)
    for _ in range(2):
        next(it)  # workers started, prefetch primed
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    _quiet()
    c0 = _family_cpu_s()
    for _ in range(batches):
        next(it)
    _quiet()
    cpu = _family_cpu_s() - c0
    it.close()
    return batch * batches / wall, 1e3 * cpu / (batch * batches)


def child(mode: str, cfg: dict, batch: int, batches: int) -> dict:
    """One trial-like run in this (fresh) process; returns timings and peak RSS (MiB)."""
    import torch  # noqa: F401 - the empty trial imports what a trial imports

    from harness.data import build_data

    out: dict = {}
    t0 = time.perf_counter()
    if mode != "empty":
        d = build_data(cfg, 0, workers=2)
        out["build_s"] = time.perf_counter() - t0
        out["cache_build_s"] = d.info.get("cache_build_s")
        it = d.train_batches(batch, 2, 0, workers=2)
        next(it)
        out["first_batch_s"] = time.perf_counter() - t0
        for _ in range(batches):
            next(it)
        it.close()
    kib = 1024
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib
    out["worker_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib
    return out


def run_child(mode: str, cfg: dict, batch: int, batches: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--cfg", json.dumps(cfg)]
    cmd += ["--batch", str(batch), "--batches", str(batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--per-id", type=int, default=10)
    ap.add_argument("--size", type=int, default=100, help="side of the generated JPEGs")
    ap.add_argument("--image-size", type=int, default=112, help="model input side")
    ap.add_argument("--dir", default="/tmp/hembench_faces")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--skip-children", action="store_true", help="throughput only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, json.loads(a.cfg), a.batch, a.batches)))
        return

    root = Path(a.dir) / "faces"
    generate(root, a.images, a.per_id, a.size)
    cfg = {"kind": "image_folder", "path": str(root), "image_size": a.image_size}
    print(f"# {a.images} JPEGs {a.size}×{a.size} px → {a.image_size}×{a.image_size}, "
          f"load average before: {os.getloadavg()}")  # fmt: skip

    import torch

    from harness.data import build_data

    d = build_data(cfg, 0)
    # the floor decodes the very files of the loader's measured window (seed 0, after 2 batches)
    sampler = d._sampler(a.batch, 2, 0)
    epochs = (idx for _ in range(1 + (2 + a.batches) // max(1, len(sampler))) for idx in sampler)
    window = [idx for _, idx in zip(range(2 + a.batches), epochs, strict=False)][2:]
    rows = d.source.train_rows[torch.cat(window).numpy()]
    paths = [d.source.store.path(int(r)) for r in rows]
    # interleaved: floor 1, loader 1, floor 2, loader 2, twice (the machine is shared)
    res: dict[str, list[tuple[float, float]]] = {
        "floor1": [], "loader1": [], "floor2": [], "loader2": [], "loader2_uint8": []
    }  # fmt: skip
    for _ in range(a.reps):
        res["floor1"].append(floor_rate(paths, a.image_size, 1))
        res["loader1"].append(loader_rate(d, a.batch, a.batches, 1))
        res["floor2"].append(floor_rate(paths, a.image_size, 2))
        res["loader2"].append(loader_rate(d, a.batch, a.batches, 2))
        res["loader2_uint8"].append(loader_rate(d, a.batch, a.batches, 2, uint8=True))
    rate = {k: max(r for r, _ in v) for k, v in res.items()}
    cpu = {k: float(np.median([c for _, c in v])) for k, v in res.items()}
    print("\n| measure | images/s (best) | runs, images/s | CPU ms / image (median) |")
    print("| --- | --- | --- | --- |")
    for k, v in res.items():
        runs = " / ".join(f"{r:.0f}" for r, _ in v)
        print(f"| {k} | {rate[k]:.0f} | {runs} | {cpu[k]:.3f} |")
    print(f"\nwall: loader 2 workers / 1 worker = {rate['loader2'] / rate['loader1']:.2f}; "
          f"loader / floor: 1 process {rate['loader1'] / rate['floor1']:.2f}, "
          f"2 processes {rate['loader2'] / rate['floor2']:.2f}")  # fmt: skip
    print(f"CPU cost: floor / loader per image: 1 worker {cpu['floor1'] / cpu['loader1']:.2f}, "
          f"2 workers {cpu['floor2'] / cpu['loader2']:.2f}, "
          f"2 workers uint8 {cpu['floor2'] / cpu['loader2_uint8']:.2f}")  # fmt: skip

    if a.skip_children:
        return
    empty = run_child("empty", cfg, a.batch, a.batches)
    full = run_child("stream", cfg, a.batch, a.batches)
    tenth = Path(a.dir) / "tenth"
    if not tenth.exists():
        tenth.mkdir()
        for p in sorted(root.iterdir())[: max(4, len(list(root.iterdir())) // 10)]:
            os.symlink(p, tenth / p.name)
    small = run_child("stream", cfg | {"path": str(tenth)}, a.batch, a.batches)
    print(
        "\n| trial child | build s | first batch s | peak RSS MiB | above empty | worker peak MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in (("empty", empty), ("all images", full), ("a tenth", small)):
        print(f"| {name} | {r.get('build_s', 0):.2f} | {r.get('first_batch_s', 0):.2f} | "
              f"{r['rss_mib']:.0f} | {r['rss_mib'] - empty['rss_mib']:.0f} | "
              f"{r['worker_rss_mib']:.0f} |")  # fmt: skip

    cache = Path(a.dir) / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    ccfg = cfg | {"cache": "uint8", "cache_dir": str(cache)}
    first = run_child("cache", ccfg, a.batch, a.batches)
    second = run_child("cache", ccfg, a.batch, a.batches)
    print("\n| uint8 cache | build_data s | of which decoding s | first batch s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("first trial (produces)", first), ("second trial (reuses)", second)):
        print(f"| {name} | {r['build_s']:.2f} | {r['cache_build_s']:.2f} | "
              f"{r['first_batch_s']:.2f} | {r['rss_mib']:.0f} |")  # fmt: skip
    print(f"\nsecond trial start / first preparation = "
          f"{second['first_batch_s'] / first['first_batch_s']:.3f}; "
          f"load average after: {os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
