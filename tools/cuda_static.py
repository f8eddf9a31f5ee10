"""Static model of the fused CUDA kernel without a GPU: registers, spills, shared memory, whole-kernel SASS
instructions per weight, bytes in flight per SM, waves, and a predicted fraction of H100/H200 bandwidth per shape
-> bench/results/cuda_static.json. Nothing here has run on a GPU: it is a model, with its assumptions below.

Compiles cuda/gpu/qgemm.cu with nvcc (-O3 -Xptxas -v) for sm_90 and sm_80, disassembles it with cuobjdump -sass
(which needs nvdisasm; both come with a CUDA toolkit, or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`),
and reads, for the fused kernels qgemm_kernel<BITS, T, MT, TPG> (MT 8-row tiles of x; groups of 128 rows: TPG = 8):

- The main loop: the backward branch whose range holds the most HMMA (one iteration = one unit, i.e. one k-block
  of one column block). Its basic blocks and forward edges form a DAG; "must" blocks hold an HMMA, the cp.async
  wait (DEPBAR) or commit (LDGDEPBAR), or the most cp.async (LDGSTS: the code copies every thread issues).
  common = the shortest path through every must block (a unit without a group start and not ending a segment;
  the scale, zero-point and x copies of the first threads are left out); group = the shortest such path through
  a block with an FFMA (the fp32 scale flush: a unit that starts a group, every unit at group size 128);
  segment end = the longest path minus group.
- Prologue: the instructions before the loop head, its inner loop (the loader's first kStages - 1 units) counted
  as its shortest path (the must blocks there: the copies and the commit) kStages - 1 times; epilogue: after the
  loop's back edge. Inner loops of the main loop count their shortest path (the scalar tails of the 4-column loops
  left out): the x copies (on the common path) ceil(M x 16 / threads) times, the store and K-split loops (off it,
  4 columns per step) ceil(M x columns / 4 / threads) times, nested loops (the K-order sum over pieces) as often.
- Instructions of one block = prologue + units x group (at group size 128 every unit starts a group) + segments x
  segment end (the longest path: conservative) + epilogue; whole-kernel instructions per weight = the sum over
  the blocks / (units x weights per thread per unit), weights per thread per unit = HMMA on the common path / MT x 8
  (an A fragment is 16 x 16 weights over 32 lanes).

The time model, per GPU and shape (K, N, M rows of x), uses the kernel's own plan (cuda/gpu/qgemm.cu plan() and
stripe()): resident blocks per SM from shared memory (228 KB per SM, 1 KB reserved per block), registers (64 K per
SM) and threads; units = column blocks x k-blocks; grid = min(units, SMs x resident); block i gets units / grid
units, one more for the first units % grid blocks. Blocks are assumed placed on SMs in order (SM j runs blocks j,
j + SMs, ...); the busiest SM sets the time.
- DRAM bytes: codes (Kp x N x bits / 8), scales (2 bytes) and zero points (bits / 8 bytes) per group and column,
  x and out once. Bandwidth ceiling: STREAM_EFFICIENCY x peak (what a copy kernel reaches).
- Bytes in flight per SM (Little's law): (STAGES - 1) stages of DRAM bytes per block x blocks per SM (the issue's
  formula, STAGES x stage bytes x resident blocks, is reported too). Rate = min(ceiling, SMs x in flight / LATENCY).
- Issue time: warp instructions of the busiest SM / (4 schedulers x clock x ISSUE_EFFICIENCY).
- Memory time: DRAM bytes / rate x (the busiest SM's units / the average SM's).
- Time = LATENCY (first stage) + max(memory time, issue time) + SPLIT_TAIL if a column block is split (the last
  piece reads the others from L2 and stores) + GATHER (act-order or fp32 only; the predictions assume neither).
  Launch gaps between kernels are not included (CUDA-graph replays make them small; bench_kernels.py measures).
- Fraction of bandwidth = (codes + scales + zero points) / peak bandwidth / time.

Usage: python tools/cuda_static.py [--out bench/results/cuda_static.json] [--archs 90 80] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "cuda" / "gpu" / "qgemm.cu"
TYPE_MANGLE = {"fp16": "6__half", "bf16": "13__nv_bfloat16"}
# Mirrors of cuda/gpu/qgemm.cu constants (checked against the source below).
STAGES, XPITCH, KB = 4, 136, 128
WORDS = {2: 4, 3: 6, 4: 8, 8: 16}
# (label, BITS, T, MT, M): kernels modelled
CASES = [(f"{b}-bit {t} M={m}", b, t, mt, m) for b in (4, 3) for t in ("fp16", "bf16")
         for m, mt in ((1, 1), (4, 1), (16, 2), (32, 4), (64, 8))] + \
        [(f"{b}-bit {t} M=1", b, t, 1, 1) for b in (2, 8) for t in ("fp16", "bf16")]
GPUS = {  # peak DRAM bytes/s, SMs, clock (Hz), shared memory per SM (bytes)
    "H100 SXM": dict(bw=3.35e12, sms=132, clock=1.98e9, smem=228 * 1024),
    "H200": dict(bw=4.8e12, sms=132, clock=1.98e9, smem=228 * 1024),
}
SHAPES = [("4096x4096", 4096, 4096), ("K=4096 N=11008", 4096, 11008), ("K=11008 N=4096", 11008, 4096),
          ("K=49152 N=12288 (OPT-175B fc2)", 49152, 12288), ("K=12288 N=49152", 12288, 49152)]
ASSUMPTIONS = dict(
    LATENCY_s=0.7e-6,          # loaded DRAM latency seen by a cp.async (H100/H200: ~0.5-0.8 us under load)
    STREAM_EFFICIENCY=0.92,    # fraction of peak bandwidth a streaming copy kernel reaches
    ISSUE_EFFICIENCY=0.6,      # fraction of issue slots used (few warps per scheduler, dependent chains)
    SPLIT_TAIL_s=0.5e-6,       # last piece of a split column block: L2 reads of the pieces + store
    GATHER_s=0.0,              # identity perm and 16-bit x assumed (no gather pass)
)


CFG_LINES = ("static constexpr int WARPS = MT <= 2 ? 4 : 8;",
             "static constexpr int NTW = MT <= 2 ? (BITS == 8 ? 2 : 4) : 1;")


def cfg(bits: int, mt: int) -> dict:
    """cuda/gpu/qgemm.cu Cfg and Stage for groups of 128 rows."""
    warps = 4 if mt <= 2 else 8
    ntw = (2 if bits == 8 else 4) if mt <= 2 else 1
    ntb, threads, rows = warps * ntw, warps * 32, mt * 8
    cols = ntb * 16
    zb = 2 if bits == 8 else 1
    stage = ntb * 32 * WORDS[bits] * 4 + ntb * 32 + ntb * 8 * zb + rows * XPITCH * 2
    return dict(warps=warps, ntb=ntb, threads=threads, rows=rows, cols=cols, stage_bytes=stage,
                stage_dram_bytes=ntb * 32 * WORDS[bits] * 4 + ntb * 32 + ntb * 8 * zb,
                smem=STAGES * stage + rows * (cols + 4) * 4)


def find_tool(name: str) -> str:
    """name on PATH, under CUDA_HOME, or from the nvidia-cuda-* pip packages."""
    hits = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    hits += [str(p) for p in site.glob(f"*/bin/{name}")]
    for h in hits:
        if h and os.path.isfile(h) and os.access(h, os.X_OK):
            return h
    sys.exit(f"{name} not found (CUDA toolkit, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def compile_arch(arch: str, nvcc: str, cuobjdump: str, tmp: Path, quick: bool = False) -> tuple[dict, dict]:
    """-> ({mangled: ptxas resource usage}, {mangled: [(addr, opcode, text)]}) for sm_<arch>."""
    obj = tmp / f"q{arch}.o"
    subset = ["-DMINIGPTQ_STATIC_SUBSET"] if quick else []  # only the group-128 kernels that are modelled
    r = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", *subset, "-c", str(SRC),
                        "-I", str(SRC.parent), "-o", str(obj)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    usage, cur = {}, None
    for line in r.stderr.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?(_Z\w+)'?", line):
            cur = m[1]
            usage.setdefault(cur, {})
        if cur and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            usage[cur].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        if cur and (m := re.search(r"Used (\d+) registers", line)):
            usage[cur]["registers"] = int(m[1])
            sm = re.search(r"(\d+) bytes smem", line)
            usage[cur]["static_smem_bytes"] = int(sm[1]) if sm else 0
    env = dict(os.environ, PATH=str(Path(find_tool("nvdisasm")).parent) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, env=env, check=True).stdout
    return usage, parse_sass(sass)


def parse_sass(sass: str) -> dict:
    funcs, cur = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            cur = m[1]
            funcs[cur] = []
        elif cur and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            text = m[2]
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            funcs[cur].append((int(m[1], 16), op, text))
    return funcs


def branch_target(text: str) -> int | None:
    m = re.search(r"\bBRA\s+(?:`?\(?[^)]*\)?\s*)?0x([0-9a-f]+)", text)
    return int(m[1], 16) if m else None


def inner_loops(ins: list, lo: int, hi: int) -> list[tuple[int, int]]:
    """(start, end) index ranges of the backward branches inside ins[lo:hi] (outermost first not required)."""
    idx = {a: i for i, (a, _, _) in enumerate(ins)}
    out = []
    for i in range(lo, hi):
        a, op, text = ins[i]
        t = branch_target(text) if op == "BRA" else None
        if t is not None and t <= a and t in idx and lo <= idx[t]:
            out.append((idx[t], i + 1))
    return out


def loop_paths(ins: list, lo: int, hi: int) -> tuple[list, list, dict]:
    """The loop ins[lo..hi] (hi: its back edge) as a DAG of basic blocks -> (blocks as index ranges relative to lo,
    opcodes of each block, {"common", "group", "all"}: the blocks on each path; see the module docstring)."""
    idx = {a: i for i, (a, _, _) in enumerate(ins)}
    body = ins[lo:hi + 1]
    leaders = {0}
    for k, (a, op, text) in enumerate(body):
        if op in ("BRA", "EXIT", "RET"):
            leaders.add(k + 1)
            t = branch_target(text)
            if t is not None and t in idx and lo <= idx[t] <= hi:
                leaders.add(idx[t] - lo)
    leaders = sorted(x for x in leaders if x < len(body))
    blocks = [(s, (leaders[j + 1] if j + 1 < len(leaders) else len(body))) for j, s in enumerate(leaders)]
    start_of = {s: j for j, (s, _) in enumerate(blocks)}
    nb = len(blocks)
    succ = [[] for _ in range(nb)]
    for j, (s, e) in enumerate(blocks):
        a, op, text = body[e - 1]
        pred = text.startswith("@")
        if op == "BRA":
            t = branch_target(text)
            if t is not None and t in idx and lo <= idx[t] <= hi:
                tj = start_of[idx[t] - lo]
                if e - 1 == len(body) - 1 and tj == 0:
                    succ[j].append(nb)
                elif tj > j:
                    succ[j].append(tj)
            if pred and j + 1 < nb:
                succ[j].append(j + 1)
        elif op in ("EXIT", "RET"):
            if pred and j + 1 < nb:
                succ[j].append(j + 1)
        elif j + 1 < nb:
            succ[j].append(j + 1)
    cost = [e - s for s, e in blocks]
    ops_of = [[op for _, op, _ in body[s:e]] for s, e in blocks]
    nldgsts = [sum(o.startswith("LDGSTS") for o in ops) for ops in ops_of]
    must = [any(o.startswith(("HMMA", "DEPBAR", "LDGDEPBAR")) for o in ops) or 0 < n == max(nldgsts)
            for ops, n in zip(ops_of, nldgsts)]
    ffma = [any(o.startswith("FFMA") for o in ops) for ops in ops_of]
    def best(longest: bool, need_ffma: bool) -> list[int]:
        """Shortest (longest) path head -> back edge through every must block (and an FFMA block if asked),
        over states (block, FFMA block seen)."""
        dist, prev = {(0, ffma[0]): cost[0]}, {}
        for j in range(nb):
            for seen in (False, True):
                if (j, seen) not in dist:
                    continue
                for v in succ[j]:
                    if not longest and any(must[w] for w in range(j + 1, min(v, nb))):
                        continue  # would skip a block that must run
                    key = (v, seen or (v < nb and ffma[v]))
                    d = dist[(j, seen)] + (cost[v] if v < nb else 0)
                    if key not in dist or (d > dist[key] if longest else d < dist[key]):
                        dist[key], prev[key] = d, (j, seen)
        ends = [e for e in ([(nb, True)] if need_ffma else [(nb, False), (nb, True)]) if e in dist]
        k = (max if longest else min)(ends, key=lambda e: dist[e])
        seq = []
        while k in prev:
            k = prev[k]
            seq.append(k[0])
        return seq[::-1]

    common = best(False, False)
    paths = {"common": common, "group": best(False, True) if any(ffma) else common, "all": best(True, False)}
    return blocks, ops_of, paths


def analyse_kernel(ins: list, trip: int, trip_x: int) -> dict:
    """Per-region instruction counts of one fused kernel (see the module docstring)."""
    idx = {a: i for i, (a, _, _) in enumerate(ins)}
    loops = []
    for i, (a, op, text) in enumerate(ins):
        t = branch_target(text) if op == "BRA" else None
        if t is not None and t <= a and t in idx:
            loops.append((sum(o.startswith("HMMA") for _, o, _ in ins[idx[t]:i + 1]), idx[t], i))
    _, lo, hi = max(loops)
    body = ins[lo:hi + 1]
    blocks, ops_of, paths = loop_paths(ins, lo, hi)

    res = {n: Counter(op.split(".")[0] for j in p for op in ops_of[j]) for n, p in paths.items()}
    on_path = {n: set() for n in paths}
    for n, p in paths.items():
        for j in p:
            on_path[n].update(range(lo + blocks[j][0], lo + blocks[j][1]))
    # inner loops count their shortest path (the scalar tails of the 4-column loops are left out): on the common
    # path (the x copies) trip_x times, off it (the store and K-split loops) trip times, in place of the part of
    # their body that the outer path already holds
    extra_common = extra_seg = 0
    for s, e in inner_loops(ins, lo + 1, hi + 1):
        _, lops, lp = loop_paths(ins, s, e - 1)
        once = sum(len(lops[j]) for j in lp["common"])
        if on_path["common"] & set(range(s, e)):
            extra_common += once * trip_x - len(on_path["common"] & set(range(s, e)))
        else:
            extra_seg += once * trip - len(on_path["all"] & set(range(s, e)))
    extra_pro = 0
    for s, e in inner_loops(ins, 0, lo):  # the loader's first STAGES - 1 units: its shortest path, STAGES - 1 times
        pb, pops, pp = loop_paths(ins, s, e - 1)
        extra_pro += sum(len(pops[j]) for j in pp["common"]) * (STAGES - 1) - (e - s)
    common, group = sum(res["common"].values()) + extra_common, sum(res["group"].values()) + extra_common
    return dict(range=(hex(body[0][0]), hex(body[-1][0])), loop_instructions_all=len(body), hmma=max(loops)[0],
                prologue=lo + extra_pro, epilogue=len(ins) - hi - 1, common=common, group=group,
                common_opcodes=res["common"], group_opcodes=res["group"],
                segment_end=sum(res["all"].values()) - sum(res["group"].values()) + extra_seg)


def resident_blocks(c: dict, regs: int, gpu: dict) -> int:
    by_smem = gpu["smem"] // (c["smem"] + 1024)
    by_regs = 65536 // (c["threads"] * (-(-regs // 8) * 8))
    return max(1, min(by_smem, by_regs, 2048 // c["threads"], 32))


def model(entry: dict, bits: int, mt: int, M: int, gpu: dict, K: int, N: int) -> dict:
    """Predicted time and fraction of bandwidth of one call (module docstring)."""
    A = ASSUMPTIONS
    c = cfg(bits, mt)
    Kp, ntiles = -(-K // KB) * KB, -(-N // 16)
    kblocks, G = Kp // KB, Kp // 128
    units = -(-ntiles // c["ntb"]) * kblocks
    bps = resident_blocks(c, entry["registers"], gpu)
    slots = gpu["sms"] * bps
    grid = min(units, slots)
    q, r = divmod(units, grid)  # stripe(): q units per block, one more for the first r blocks
    starts = [i * q + min(i, r) for i in range(grid + 1)]
    split = any(starts[i] % kblocks for i in range(1, grid))
    weight_bytes = Kp * N * bits / 8 + G * N * (2 + bits / 8)
    dram = weight_bytes + M * K * 2 + M * N * 2
    wpt = entry["weights_per_thread_per_unit"]

    def block_instr(i: int) -> float:  # thread instructions of block i
        n = starts[i + 1] - starts[i]
        segs = (starts[i + 1] - 1) // kblocks - starts[i] // kblocks + 1  # column blocks its stripe touches
        return entry["prologue"] + n * entry["group"] + segs * entry["segment_end"] + entry["epilogue"]

    # the busiest SM (blocks placed on SMs in order: SM j runs blocks j, j + SMs, ...) sets the time
    sm_blocks = [list(range(j, grid, gpu["sms"])) for j in range(min(grid, gpu["sms"]))]
    sm_units = [sum(starts[i + 1] - starts[i] for i in b) for b in sm_blocks]
    busiest = max(range(len(sm_blocks)), key=lambda j: (sm_units[j], sum(block_instr(i) for i in sm_blocks[j])))
    warp_instr_busiest = sum(block_instr(i) for i in sm_blocks[busiest]) * c["warps"]
    blocks_per_sm = len(sm_blocks[busiest])
    inflight = (STAGES - 1) * c["stage_dram_bytes"] * blocks_per_sm
    inflight = min(inflight, dram / gpu["sms"])  # a small layer is all in flight at once
    rate = min(gpu["bw"] * A["STREAM_EFFICIENCY"], gpu["sms"] * inflight / A["LATENCY_s"])
    share = sm_units[busiest] / (units / gpu["sms"])  # the busiest SM's bytes over the average SM's
    t_issue = warp_instr_busiest / (4 * gpu["clock"] * A["ISSUE_EFFICIENCY"])
    t_mem = dram / rate * share
    t = A["LATENCY_s"] + max(t_mem, t_issue) + (A["SPLIT_TAIL_s"] if split else 0) + A["GATHER_s"]
    total_instr = sum(block_instr(i) for i in range(grid))
    return dict(units=units, resident_blocks_per_sm=bps, grid=grid, units_per_block=round(units / grid, 2),
                busiest_sm_units=sm_units[busiest], average_sm_units=round(units / gpu["sms"], 2),
                waves=round(grid / slots, 3), k_split=split,
                bytes_in_flight_per_sm=int(inflight),
                bytes_in_flight_per_sm_issue_formula=STAGES * c["stage_bytes"] * bps,
                whole_kernel_instructions_per_weight=round(total_instr / (units * wpt), 3),
                issue_time_us=round(t_issue * 1e6, 2), memory_time_us=round(t_mem * 1e6, 2),
                predicted_time_us=round(t * 1e6, 2), ideal_time_us=round(weight_bytes / gpu["bw"] * 1e6, 2),
                predicted_fraction_of_bandwidth=round(weight_bytes / gpu["bw"] / t, 3))


def check_constants() -> None:
    src = SRC.read_text()
    for name, val in (("kStages", STAGES), ("kXPitch", XPITCH), ("kKB", KB)):
        if not re.search(rf"constexpr int {name} = {val};", src):
            sys.exit(f"tools/cuda_static.py: {name} is no longer {val} in {SRC}: update the model")
    for line in CFG_LINES:  # cfg() mirrors these lines of struct Cfg
        if line not in src:
            sys.exit(f"tools/cuda_static.py: `{line}` is no longer in {SRC}: update cfg() and CFG_LINES")


def analyse(archs: list[str], quick: bool = False) -> dict:
    check_constants()
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    result = {"source": "cuda/gpu/qgemm.cu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "nvcc": subprocess.run([nvcc, "--version"], capture_output=True,
                                                     text=True).stdout.strip().splitlines()[-1],
              "ran_on_gpu": False, "method": __doc__.split("\n\n")[1].replace("\n", " "),
              "time_model": __doc__.split("\n\n")[3].replace("\n", " "), "assumptions": ASSUMPTIONS,
              "gpus": GPUS, "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            usage, funcs = compile_arch(arch, nvcc, cuobjdump, Path(tmp), quick)
            kernels = {}
            for mangled, u in sorted(usage.items()):
                name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() \
                    if shutil.which("c++filt") else mangled
                name = re.sub(r"minigptq::cuda::\(anonymous namespace\)::|\(minigptq::cuda::\(anonymous namespace\)"
                              r"::Args\)|void ", "", name)
                kernels[name] = u
            fused = {}
            for label, bits, t, mt, M in CASES:
                key = f"qgemm_kernelILi{bits}E{TYPE_MANGLE[t]}Li{mt}ELi8EEEvNS1_4ArgsE"
                mangled = next(f for f in funcs if f.endswith(key))
                c = cfg(bits, mt)
                trip = -(-(M * c["cols"] // 4) // c["threads"])  # store / K-split loops: 4 of M x columns values
                k = analyse_kernel(funcs[mangled], trip, -(-(M * 16) // c["threads"]))
                u = usage[mangled]
                wpt = k["common_opcodes"]["HMMA"] // mt * 8  # an A fragment: 8 weights per thread, used by MT mma
                entry = {"kernel": f"qgemm_kernel<{bits}, {t}, MT={mt}, TPG=8>", "loop_range": k["range"],
                         "loop_instructions_all": k["loop_instructions_all"], "registers": u["registers"],
                         "spill_stores": u["spill_stores"], "spill_loads": u["spill_loads"],
                         "dynamic_smem_bytes": c["smem"], "stage_bytes": c["stage_bytes"],
                         "weights_per_thread_per_unit": wpt, "prologue": k["prologue"], "epilogue": k["epilogue"],
                         "common": k["common"], "group": k["group"], "segment_end": k["segment_end"],
                         "loop_instructions_per_weight_common": round(k["common"] / wpt, 3),
                         "loop_instructions_per_weight_group128": round(k["group"] / wpt, 3),
                         "opcodes_group128": dict(k["group_opcodes"].most_common())}
                if arch == archs[0]:
                    entry["predictions"] = {g: {s: model(entry, bits, mt, M, gpu, K, N) for s, K, N in SHAPES}
                                            for g, gpu in GPUS.items()}
                fused[label] = entry
            result["archs"][f"sm_{arch}"] = {"fused": fused, "kernels": kernels,
                                              "max_registers": max(u["registers"] for u in usage.values()),
                                              "total_spill_bytes": sum(u["spill_stores"] + u["spill_loads"]
                                                                       for u in usage.values())}
    return result


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_static.json"), help="JSON file to write")
    p.add_argument("--archs", nargs="+", default=["90", "80"], help="SM architectures, first one predicted")
    p.add_argument("--quick", action="store_true",
                   help="compile only the group-128 kernels it models (faster; 'kernels' then lists only those)")
    args = p.parse_args(argv)
    res = analyse(args.archs, args.quick)
    write_json(Path(args.out), res)
    for arch, r in res["archs"].items():
        print(f"{arch}: max registers {r['max_registers']}, spill bytes {r['total_spill_bytes']}")
        for label, e in r["fused"].items():
            line = (f"  {label:18s} regs {e['registers']:3d} spills {e['spill_stores']}/{e['spill_loads']} "
                    f"smem {e['dynamic_smem_bytes']:6d} loop/weight {e['loop_instructions_per_weight_group128']:.2f}")
            if "predictions" in e:
                h = e["predictions"]["H200"]
                line += "  H200 " + " ".join(f"{v['whole_kernel_instructions_per_weight']:.2f}ipw/"
                                              f"{v['predicted_fraction_of_bandwidth']:.0%}" for v in h.values())
            print(line)


if __name__ == "__main__":
    main()
