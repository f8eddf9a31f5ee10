"""Benchmark the GPTQ kernels against torch's dense matmul; writes bench/results/kernels_*.json (one per device).

For each weight shape (Llama-2-7B's linears and OPT-175B's FC2) and batch (1, 4, 16 rows) it times, side by side
in one loop (so background load hits every candidate alike):
    CPU:  torch fp32 and bf16 x @ W^T, and the 4-bit and 3-bit fused kernels with fp32 and bf16 activations, both the
          exact fp32 kernels (q4_*, q3_*) and, where the CPU has VNNI, the int8-activation kernels (q4i8_*, q3i8_*)
    CUDA: torch fp16 x @ W^T, and the 4-bit and 3-bit fused kernels with fp16 activations
and reports milliseconds (median and best), speedups over the dense matmul of the same activation dtype, and the
GB/s each achieves (bytes it must read / time) next to the device's measured copy bandwidth.
On CUDA every candidate is timed as CUDA-graph replays of GRAPH_CALLS consecutive calls (captured once, after a
warm-up on the capture stream), per call = replay time / GRAPH_CALLS: the 15-25 us of Python and launch work of an
eager call would otherwise swamp a 2 us kernel, and decoding replays graphs too.
Weights are rotated over enough copies that the working set exceeds the last-level cache several times, as in
decoding where every layer's weights come from memory. Quantized layers are random packed words (every bit pattern
is a valid code), group size 128. This is a tool, not a test: `python tools/bench_kernels.py --help`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from minigptq import kernels

# (name, K = in_features, N = out_features)
SHAPES = [
    ("llama2-7b attn q/k/v/o", 4096, 4096),
    ("llama2-7b mlp gate/up", 4096, 11008),
    ("llama2-7b mlp down", 11008, 4096),
    ("opt-175b fc2", 49152, 12288),
]
GROUP_SIZE = 128
GRAPH_CALLS = 50  # calls per captured CUDA graph (cuda timing)


def cpu_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return dict(cpu_model=model, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                kernel_isas=kernels.cpu_isas(), l3_bytes=_size(l3.read_text()) if l3.exists() else None,
                memory_bytes=mem, platform=platform.platform(), load_average_before=list(os.getloadavg()))


def _size(text: str) -> int:
    text = text.strip()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text[:-1]) * 2**20 if text.endswith("M") else int(text)


def random_layout(K: int, N: int, bits: int, device: str, cpu_kernel: str = "exact") -> kernels.KernelLayout:
    """A random quantized layer in kernel layout (random words are valid packed codes of any width)."""
    G = -(-K // GROUP_SIZE)
    qweight = torch.randint(-2**31, 2**31, (K * bits // 32, N), dtype=torch.int32, device=device)
    qzeros = torch.randint(-2**31, 2**31, (G, N * bits // 32), dtype=torch.int32, device=device)
    scales = (torch.rand(G, N, device=device) * 0.01).half()
    g_idx = (torch.arange(K, device=device) // GROUP_SIZE).to(torch.int32)
    return kernels.make_layout(qweight, qzeros, scales, g_idx, bits, "gptq", cpu_kernel=cpu_kernel)


def layout_bytes(L: kernels.KernelLayout) -> int:
    return sum(t.numel() * t.element_size() for t in (L.qweight, L.scales, L.zeros, L.row_group))


def copies_for(nbytes: int, cache_bytes: int) -> int:
    """How many copies make the rotated working set >= 4x the cache (at least 1)."""
    return max(1, min(16, -(-4 * cache_bytes // nbytes)))


def graphed(fns: dict, calls: int) -> dict:
    """name -> a function that replays a CUDA graph of `calls` consecutive calls of fns[name] (rotating weights
    rotate inside the graph). Warmed up on the capture stream first: the kernels' workspace is per stream and is
    never grown during a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns.values():
            for _ in range(3):
                f()
    side.synchronize()
    out = {}
    for name, f in fns.items():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            for _ in range(calls):
                f()
        out[name] = g.replay
    torch.cuda.synchronize()
    return out


def timed_loop(fns: dict, reps: int, device: str, per_call: int = 1) -> dict:
    """Run every fn once per round, interleaved in a new random order each round (a call is slower right after some
    others: a fixed order would always hand one candidate the same neighbour); returns name -> list of seconds,
    divided by per_call (fns that make per_call calls each: graph replays)."""
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            f = fns[name]
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / per_call)
            else:
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: str, nbytes: int = 512 * 2**20) -> tuple[float, float]:
    """(copy, read) GB/s of large tensors: a copy (bytes read + bytes written per second) and a sum (bytes read)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = timed_loop({"copy": lambda: b.copy_(a), "read": lambda: a.sum()}, 10, device)
    return 2 * nbytes / min(t["copy"]) / 1e9, nbytes / min(t["read"]) / 1e9


def rotating(objs: list):
    """A cursor over objs: each call returns the next one (round robin)."""
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(objs)
        return objs[state["i"]]
    return nxt


@torch.inference_mode()
def bench_shape(name: str, K: int, N: int, batches: list[int], device: str, reps: int, cache_bytes: int) -> list:
    dense_dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16]
    dense = {dt: [torch.randn(N, K, device=device).to(dt)] for dt in dense_dtypes}
    for dt, ws in dense.items():
        ws += [ws[0].clone() for _ in range(copies_for(ws[0].numel() * ws[0].element_size(), cache_bytes) - 1)]
    modes = ["", "i8"] if device == "cpu" and kernels.cpu_int8_available() else [""]
    quant = {}
    for bits in (4, 3):
        for mode in modes:
            kind = "int8" if mode == "i8" else "exact"
            first = random_layout(K, N, bits, device, kind)
            quant[f"{bits}{mode}"] = [first] + [random_layout(K, N, bits, device, kind)
                                                for _ in range(copies_for(layout_bytes(first), cache_bytes) - 1)]
    gemms = {"": kernels.cpu_qgemm if device == "cpu" else kernels.cuda_qgemm, "i8": kernels.cpu_qgemm_int8}
    # Memory references timed in the same rounds (the bandwidth a shared machine gives drifts by tens of percent
    # within minutes): a copy and a sum of buffers as large as the 4-bit layer, rotated like the weights.
    ref_numel = layout_bytes(quant["4"][0]) // 4
    srcs = [torch.empty(ref_numel, device=device).uniform_()
            for _ in range(copies_for(8 * ref_numel, cache_bytes))]
    dsts = [torch.zeros_like(a) for a in srcs]  # written once: no first-touch page faults in the timed copies
    ref_fns = {"copy": lambda nxt=rotating(list(zip(srcs, dsts))): (lambda a_b: a_b[1].copy_(a_b[0]))(nxt()),
               "read": lambda nxt=rotating(srcs): nxt().sum()}
    ref_bytes = {"copy": 8 * ref_numel, "read": 4 * ref_numel}
    rows = []
    for M in batches:
        fns, nbytes = dict(ref_fns), dict(ref_bytes)
        for dt in dense_dtypes:
            x = torch.randn(M, K, device=device).to(dt)
            tag = str(dt).removeprefix("torch.")
            w_next = rotating(dense[dt])
            fns[f"torch_{tag}"] = lambda x=x, w_next=w_next: torch.nn.functional.linear(x, w_next())
            nbytes[f"torch_{tag}"] = N * K * x.element_size() + M * (K + N) * x.element_size()
            for key, layouts in quant.items():
                L_next, gemm = rotating(layouts), gemms[key[1:]]
                fns[f"q{key}_{tag}"] = lambda x=x, L_next=L_next, gemm=gemm: gemm(x, L_next())
                nbytes[f"q{key}_{tag}"] = layout_bytes(layouts[0]) + M * (K + N) * x.element_size()
        if device == "cuda":  # graph replays of GRAPH_CALLS calls each: no Python or launch overhead per call
            times = timed_loop(graphed(fns, GRAPH_CALLS), reps, device, GRAPH_CALLS)
        else:
            times = timed_loop(fns, reps, device)
        row = dict(shape=name, K=K, N=N, batch=M, reps=reps, graph_calls=GRAPH_CALLS if device == "cuda" else 0)
        for k, t in times.items():
            row[f"{k}_ms"] = round(statistics.median(t) * 1e3, 4)
            row[f"{k}_best_ms"] = round(min(t) * 1e3, 4)
            row[f"{k}_GBps"] = round(nbytes[k] / statistics.median(t) / 1e9, 2)
        for k in [k for k in times if k not in ref_fns]:  # side by side: this row's own copy and read references
            row[f"{k}_frac_of_copy_bw"] = round(row[f"{k}_GBps"] / row["copy_GBps"], 3)
            row[f"{k}_frac_of_read_bw"] = round(row[f"{k}_GBps"] / row["read_GBps"], 3)
        for dt in dense_dtypes:
            tag = str(dt).removeprefix("torch.")
            for key in quant:
                row[f"speedup_q{key}_{tag}"] = round(row[f"torch_{tag}_ms"] / row[f"q{key}_{tag}_ms"], 2)
        rows.append(row)
        print(f"{name:24s} K={K:5d} N={N:5d} M={M:2d}  " +
              "  ".join(f"{k}={row[k + '_ms']:.3f}ms" for k in times) + "  " +
              "  ".join(f"{k}={row[k + '_GBps']:.1f}GB/s" for k in times if k.startswith(("copy", "read", "q"))) +
              "  " +
              "  ".join(f"{k}=x{v}" for k, v in row.items() if k.startswith("speedup")), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to benchmark (default: cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file to write (default: bench/results/kernels_<device>.json)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="rows of x to time (default: 1 4 16)")
    p.add_argument("--reps", type=int, default=30, help="timed rounds per shape and batch (default: 30)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the kernels (default: torch.get_num_threads())")
    p.add_argument("--skip-large", action="store_true",
                   help="skip OPT-175B FC2 (12288 x 49152: 2.4 GB in fp32), e.g. on small machines")
    args = p.parse_args(argv)

    if args.device == "cpu" and not kernels.cpu_available():
        print(f"error: CPU kernels are not built ({kernels.CPU_IMPORT_ERROR})", file=sys.stderr)
        return 2
    if args.device == "cuda" and not kernels.cuda_available():
        print(f"error: CUDA kernels cannot run: {kernels.cuda_unavailable_reason()}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or Path("bench/results") / f"kernels_{args.device}.json"

    if args.device == "cpu":
        machine = cpu_info()
        cache = machine["l3_bytes"] or 32 * 2**20
    else:
        prop = torch.cuda.get_device_properties(0)
        machine = dict(gpu=prop.name, sm_count=prop.multi_processor_count, memory_bytes=prop.total_memory,
                       cuda=torch.version.cuda, host_cpu=cpu_info()["cpu_model"])
        cache = getattr(prop, "L2_cache_size", 50 * 2**20)
    bw, read_bw = copy_bandwidth(args.device)
    print(f"copy bandwidth: {bw:.1f} GB/s, read bandwidth: {read_bw:.1f} GB/s", flush=True)

    rows, skipped = [], []
    for name, K, N in SHAPES:
        if args.skip_large and K * N > 2**28:
            skipped.append(f"{name} ({K} -> {N}): skipped by --skip-large")
            continue
        reps = args.reps if K * N <= 2**28 else max(3, args.reps // 6)  # the big shape: fewer rounds
        rows += bench_shape(name, K, N, args.batches, args.device, reps, cache)
    dense = "float32" if args.device == "cpu" else "float16"
    m1 = [r for r in rows if r["batch"] == 1]
    goals = {}
    if args.device == "cpu" and m1:
        goals = {f"{bits}-bit >= {target}x over torch fp32 matvec (batch 1)": dict(
            speedups={r["shape"]: r[f"speedup_q{bits}_{dense}"] for r in m1},
            met=all(r[f"speedup_q{bits}_{dense}"] >= target for r in m1)) for bits, target in ((4, 4), (3, 5))}
        if f"q4i8_{dense}_GBps" in m1[0]:
            for bits in (4, 3):
                fr = {r["shape"]: r[f"q{bits}i8_{dense}_frac_of_copy_bw"] for r in m1}
                goals[f"{bits}-bit int8 kernel >= 0.85 of the copy bandwidth (batch 1, side by side)"] = dict(
                    fractions=fr, fractions_of_read_bw={r["shape"]: r[f"q{bits}i8_{dense}_frac_of_read_bw"]
                                                        for r in m1}, met=all(v >= 0.85 for v in fr.values()))
    machine["load_average_after"] = list(os.getloadavg())
    result = dict(
        device=args.device, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine,
        versions=dict(torch=torch.__version__, python=platform.python_version(), minigptq_kernels=(
            "cpu " + ",".join(kernels.cpu_isas())) if args.device == "cpu" else "cuda"),
        method=("times are per call (median and best of `reps` rounds, after one warm-up; every candidate runs once "
                "per round, in a new random order each round; on CUDA a round replays a CUDA graph of "
                f"{GRAPH_CALLS} consecutive calls and the time is divided by {GRAPH_CALLS}); weights "
                "rotate over copies so the working set is >= 4x the last-level cache; GBps = bytes the call must "
                "read or write (weights incl. scales/zeros, x, y) / median time; quantized layers use group size "
                f"{GROUP_SIZE}, no act-order; speedup = torch time / kernel time for the same activation dtype; "
                "copy_GBps / read_GBps of each row = a copy (bytes read + bytes written) / a sum (bytes read) of "
                "buffers as large as the 4-bit layer, rotated the same way and timed in the same rounds; the "
                "fractions of each row divide by them (side by side: the machine's bandwidth drifts); the top-level "
                "copy/read bandwidth = the same for 512 MiB buffers, best of 10 at the start, for reference; "
                "q*i8 = int8-activation kernels"),
        copy_bandwidth_GBps=round(bw, 2), read_bandwidth_GBps=round(read_bw, 2), goals=goals, skipped=skipped,
        results=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)  # atomic
    print(f"wrote {out}")
    for goal, v in goals.items():
        print(f"goal {goal}: {'met' if v['met'] else 'NOT met'} {v.get('speedups', v.get('fractions'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
