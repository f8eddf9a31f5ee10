"""Static review of the CUDA kernels without a GPU: registers, spills, shared memory, and SASS instructions per
weight in the hot loop -> bench/results/cuda_static.json.

Compiles cuda/gpu/qgemm.cu with nvcc (-O3 -Xptxas -v) for sm_90 and sm_80, disassembles it with cuobjdump -sass
(which needs nvdisasm; both come with a CUDA toolkit, or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`),
and counts, for the tensor-core kernels of the decode shapes (qgemm_mma<BITS, T, MT, TPG>; M = 1 and M = 4 run the
MT = 1 kernel, M = 16 the MT = 2 one; groups of 128 rows: TPG = 8):

- The hot loop: the backward branch (BRA to a lower address) whose range [target, branch] holds the most HMMA
  instructions; that range is cut into basic blocks (leaders: the head, branch targets inside it, the instruction
  after a branch) and its forward edges form a DAG.
- common path ("no group change"): the shortest path from the head to the back edge that passes through every
  block holding an HMMA or a 128-bit global load (the weight stream), so the k-block loads and all tensor-core work
  are in it and only skippable code (the group change, the loop exits) is left out;
  group-128 path: the longest path (every conditional block taken: with groups of 128 rows a group starts at every
  k-block, so this is the steady state of group size 128).
- weights per thread and iteration = (HMMA on the path / MT) x 8: each distinct A fragment is a 16 x 16 tile of W,
  8 weights per thread. Instructions per weight = path instructions / that. Every SASS instruction counts once
  (predicated ones too), including the loop's branches and address arithmetic.

Usage: python tools/cuda_static.py [--out bench/results/cuda_static.json] [--archs 90 80]
"""
from __future__ import annotations

import argparse
import json
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
# (label, BITS, T, MT): the kernels of the decode shapes, fp16 and bf16
CASES = [(f"{bits}-bit {t} M={m}", bits, t, mt) for bits in (4, 3) for t in ("fp16", "bf16")
         for m, mt in ((1, 1), (4, 1), (16, 2))] + [(f"{bits}-bit {t} M=1", bits, t, 1) for bits in (2, 8)
                                                   for t in ("fp16", "bf16")]
TYPE_MANGLE = {"fp16": "6__half", "bf16": "13__nv_bfloat16"}
H100_BW, H100_SMS, H100_CLOCK = 3.35e12, 132, 1.755e9  # bytes/s, SMs, boost clock (SXM)


def find_tool(name: str) -> str:
    """name on PATH, under CUDA_HOME, or from the nvidia-cuda-* pip packages."""
    hits = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    hits += [str(p) for p in site.glob(f"*/bin/{name}")]
    for h in hits:
        if h and os.path.isfile(h) and os.access(h, os.X_OK):
            return h
    sys.exit(f"{name} not found (CUDA toolkit, or pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def compile_arch(arch: str, nvcc: str, cuobjdump: str, tmp: Path) -> tuple[dict, dict]:
    """-> ({mangled: ptxas resource usage}, {mangled: [(addr, opcode, text)]}) for sm_<arch>."""
    obj = tmp / f"q{arch}.o"
    r = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", str(SRC),
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
            usage[cur]["smem_bytes"] = int(sm[1]) if sm else 0
    env = dict(os.environ, PATH=str(Path(find_tool("nvdisasm")).parent) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, env=env, check=True).stdout
    funcs, cur = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            cur = m[1]
            funcs[cur] = []
        elif cur and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            text = m[2]
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            funcs[cur].append((int(m[1], 16), op, text))
    return usage, funcs


def branch_target(text: str) -> int | None:
    m = re.search(r"\bBRA\s+(?:`?\(?[^)]*\)?\s*)?0x([0-9a-f]+)", text)
    return int(m[1], 16) if m else None


def hot_loop(ins: list) -> dict:
    """Paths through the loop with the most HMMA (see the module docstring)."""
    idx = {a: i for i, (a, _, _) in enumerate(ins)}
    loops = []
    for i, (a, op, text) in enumerate(ins):
        t = branch_target(text) if op == "BRA" else None
        if t is not None and t <= a and t in idx:
            lo = idx[t]
            loops.append((sum(o.startswith("HMMA") for _, o, _ in ins[lo:i + 1]), lo, i))
    hmma, lo, hi = max(loops)
    body = ins[lo:hi + 1]
    # basic blocks
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
    succ = [[] for _ in range(nb)]  # forward edges; the back edge ends at nb ("taken back to the head")
    for j, (s, e) in enumerate(blocks):
        a, op, text = body[e - 1]
        pred = text.startswith("@")
        if op == "BRA":
            t = branch_target(text)
            if t is not None and t in idx and lo <= idx[t] <= hi:
                tj = start_of[idx[t] - lo]
                if e - 1 == len(body) - 1 and tj == 0:
                    succ[j].append(nb)  # the back edge
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
    must = [any(op.startswith("HMMA") or (op.startswith("LDG") and ".128" in op) for _, op, _ in body[s:e])
            for s, e in blocks]

    def best(longest: bool):
        inf = float("inf")
        dist, prev = [(-inf if longest else inf)] * (nb + 1), [None] * (nb + 1)
        dist[0] = cost[0]
        for j in range(nb):
            if dist[j] in (inf, -inf):
                continue
            for v in succ[j]:
                if not longest and any(must[w] for w in range(j + 1, min(v, nb))):
                    continue  # would skip a block that must run
                d = dist[j] + (cost[v] if v < nb else 0)
                if (d > dist[v]) if longest else (d < dist[v]):
                    dist[v], prev[v] = d, j
        path, v = [], nb
        while v is not None:
            if v < nb:
                path.append(v)
            v = prev[v]
        return path[::-1]

    out = {}
    for name, longest in (("common", False), ("group128", True)):
        path = best(longest)
        ops = Counter(op.split(".")[0] for j in path for _, op, _ in body[blocks[j][0]:blocks[j][1]])
        out[name] = ops
    out["range"] = (hex(body[0][0]), hex(body[-1][0]), len(body), hmma)
    return out


def analyse(archs: list[str]) -> dict:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    result = {"source": "cuda/gpu/qgemm.cu", "nvcc": subprocess.run([nvcc, "--version"], capture_output=True,
                                                                     text=True).stdout.strip().splitlines()[-1],
              "method": __doc__.split("\n\n")[1].replace("\n", " "), "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            usage, funcs = compile_arch(arch, nvcc, cuobjdump, Path(tmp))
            kernels = {}
            for mangled, u in sorted(usage.items()):
                name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() \
                    if shutil.which("c++filt") else mangled
                name = re.sub(r"minigptq::cuda::\(anonymous namespace\)::|\(minigptq::cuda::\(anonymous namespace\)::Args\)|void ", "", name)
                kernels[name] = u
            hot = {}
            for label, bits, t, mt in CASES:
                key = f"qgemm_mmaILi{bits}E{TYPE_MANGLE[t]}Li{mt}ELi8EEEvNS1_4ArgsE"
                mangled = next(f for f in funcs if f.endswith(key))
                loop = hot_loop(funcs[mangled])
                entry = {"kernel": f"qgemm_mma<{bits}, {t}, MT={mt}, TPG=8>", "loop_range": loop["range"][:2],
                         "loop_instructions_all": loop["range"][2]}
                for path in ("common", "group128"):
                    ops = loop[path]
                    n, h = sum(ops.values()), ops.get("HMMA", 0)
                    weights = h // mt * 8
                    entry[path] = {"instructions": n, "weights_per_thread": weights,
                                   "instructions_per_weight": round(n / weights, 3),
                                   "opcodes": dict(ops.most_common())}
                u = usage[mangled]
                entry.update(registers=u["registers"], spill_stores=u["spill_stores"], spill_loads=u["spill_loads"],
                             smem_bytes=u["smem_bytes"])
                hot[label] = entry
            result["archs"][f"sm_{arch}"] = {"hot_loops": hot, "kernels": kernels,
                                              "max_registers": max(u["registers"] for u in usage.values()),
                                              "total_spill_bytes": sum(u["spill_stores"] + u["spill_loads"]
                                                                       for u in usage.values())}
    # What the sm_90 counts imply on an H100 SXM (batch 1, weights streamed once): the SMs issue about one warp
    # instruction per cycle per scheduler (4 per SM); a warp instruction covers 32 threads' weights.
    pred = {}
    for bits, meta in ((4, 0.0195), (3, 0.0195)):
        for path in ("common", "group128"):
            ipw = result["archs"]["sm_90"]["hot_loops"][f"{bits}-bit fp16 M=1"][path]["instructions_per_weight"]
            issue = H100_SMS * 4 * H100_CLOCK * 32 / ipw  # weights/s the SMs can decode
            need = H100_BW / (bits / 8 + meta)  # weights/s at full bandwidth
            pred[f"{bits}-bit {path}"] = {"issue_limited_weights_per_s": f"{issue:.3g}",
                                         "bandwidth_limited_weights_per_s": f"{need:.3g}",
                                         "issue_rate_over_bandwidth": round(issue / need, 2)}
    result["h100_prediction"] = pred
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_static.json"), help="JSON file to write")
    p.add_argument("--archs", nargs="+", default=["90", "80"], help="SM architectures, first one predicted")
    args = p.parse_args(argv)
    res = analyse(args.archs)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for arch, r in res["archs"].items():
        print(f"{arch}: max registers {r['max_registers']}, spill bytes {r['total_spill_bytes']}")
        for label, e in r["hot_loops"].items():
            print(f"  {label:18s} regs {e['registers']:3d} spills {e['spill_stores']}/{e['spill_loads']} "
                  f"smem {e['smem_bytes']:5d}  instr/weight common {e['common']['instructions_per_weight']:.2f}"
                  f"  group128 {e['group128']['instructions_per_weight']:.2f}")
    print(json.dumps(res["h100_prediction"], indent=1))


if __name__ == "__main__":
    main()
