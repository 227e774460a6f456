"""Run the ONNX backend node test cases (~1,900) through every available luodi backend; write docs/conformance.md.

Each backend's cases run in a worker subprocess so that an engine crash or hang costs one case, not the run:
the parent records the case as crashed / timed out and starts a new worker after it.

    .venv/bin/python benchmarks/conformance.py                      # every available backend
    .venv/bin/python benchmarks/conformance.py --backends ncnn --limit 100
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ["pass", "mismatch", "unsupported", "compile-error", "run-error", "crash", "timeout", "not-applicable"]


def worker(backend: str, start: int, limit: int | None) -> None:
    """Print one JSON line per case from ``start`` on; the parent reads them as they come."""
    from luodi.verify.conformance import node_cases, run_case

    cases = node_cases()
    end = len(cases) if limit is None else min(len(cases), limit)
    for i in range(start, end):
        print(
            json.dumps(
                {"index": i, "name": cases[i].name, "ops": sorted({n.op_type for n in cases[i].model.graph.node})}
            ),
            flush=True,
        )
        r = run_case(backend, cases[i])
        print(json.dumps({"index": i, **r.to_dict()}), flush=True)


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def run_backend(backend: str, limit: int | None, timeout: float, start: int = 0) -> list[dict]:
    results: list[dict] = []
    total = None
    stalls = 0
    while True:
        cmd = [sys.executable, __file__, "--worker", backend, "--start", str(start)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
        current = None
        finished = False
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                if current is None:  # hung before announcing a case (e.g. starting up on a loaded machine)
                    start = results[-1]["index"] + 1 if results else start
                    stalls += 1
                    if stalls <= 2:
                        break  # start a fresh worker at the same case
                    from luodi.verify.conformance import node_cases

                    case = node_cases()[start]
                    ops = sorted({n.op_type for n in case.model.graph.node})
                    current = {"index": start, "case": case.name, "ops": ops}
                stalls = 0
                results.append(
                    {**current, "backend": backend, "status": "timeout", "detail": f"no answer in {timeout:.0f} s"}
                )
                start = current["index"] + 1
                break
            if line is None:
                proc.wait()
                if current is not None:  # the engine took the process down inside a case
                    results.append(
                        {**current, "backend": backend, "status": "crash", "detail": f"worker exited {proc.returncode}"}
                    )
                    start = current["index"] + 1
                else:
                    finished = True
                break
            try:  # MNN's native logging may print without a newline, in front of our JSON
                msg = json.loads(line[line.find("{") :]) if "{" in line else None
            except json.JSONDecodeError:
                msg = None
            if msg is None:
                continue  # an engine printing to stdout itself (MNN's native logging), not a result line
            if "status" in msg:
                results.append(msg)
                current = None
                if len(results) % 100 == 0:
                    print(f"  {backend}: {len(results)} cases", file=sys.stderr, flush=True)
            else:
                current = {"index": msg["index"], "case": msg["name"], "ops": msg["ops"]}
        if finished:
            return results
        if total is None:
            from luodi.verify.conformance import node_cases

            total = len(node_cases()) if limit is None else limit
        if start >= total:
            return results


def write_report(results: dict[str, list[dict]], seconds: dict[str, float], path: Path) -> None:
    import luodi

    lines = [
        "# ONNX operator conformance",
        "",
        "Produced by `python benchmarks/conformance.py` — do not edit by hand. Each ONNX backend node test",
        'case (built in memory by `onnx.backend.test.loader.load_model_tests(kind="node")`) is compiled',
        "and loaded by the backend exactly as a package target would be, run once, and compared with the",
        "expected outputs at the case's own rtol/atol. A case that fails as given and has parameter inputs",
        "(integer shapes/axes/starts, Resize scales) is retried with them frozen into constants, as a",
        "deployed model has them.",
        "The `torch` backend is not listed: it runs `torch.export` programs, not ONNX graphs.",
        "",
        f"luodi {luodi.__version__}; engine versions: "
        + ", ".join(f"{b} {luodi.get_backend(b).available().version}" for b in results),
        "",
        "| backend | cases | " + " | ".join(STATUSES) + " | minutes |",
        "|---|---|" + "---|" * len(STATUSES) + "---|",
    ]
    for backend, rs in results.items():
        counts = collections.Counter(r["status"] for r in rs)
        lines.append(
            f"| {backend} | {len(rs)} | "
            + " | ".join(str(counts.get(s, 0)) for s in STATUSES)
            + f" | {seconds[backend] / 60:.1f} |"
        )
    lines += [
        "",
        "`pass`: outputs match. `mismatch`: ran, wrong values or shape. `unsupported`: the backend said so at",
        "compile time (`UnsupportedOpError`). `compile-error` / `run-error`: the engine failed otherwise.",
        "`crash` / `timeout`: the engine took the process down or hung. `not-applicable`: the case uses",
        "sequence/optional values, which luodi does not pass across the model boundary.",
        "",
    ]
    for backend, rs in results.items():
        failing = collections.defaultdict(collections.Counter)
        for r in rs:
            if r["status"] not in ("pass", "not-applicable"):
                for op in r.get("ops") or ["?"]:
                    failing[op][r["status"]] += 1
        lines += [f"## {backend}: operators with failing cases", ""]
        if not failing:
            lines += ["none", ""]
            continue
        lines += ["| operator | failing cases |", "|---|---|"]
        for op in sorted(failing):
            lines.append(f"| {op} | " + ", ".join(f"{n} {s}" for s, n in failing[op].most_common()) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="*", help="default: every available backend")
    ap.add_argument("--limit", type=int, help="stop before case N (a smoke run: the first N cases)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "conformance.md")
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="write the report from the .json files of earlier runs (e.g. backends run in parallel); a later "
        "file's result for a case replaces an earlier one's",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help="begin at case N (with --limit: re-run a range, then --merge)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.start, args.limit)
        return
    import luodi

    if args.merge:
        # per backend and case: a later file's result replaces an earlier one's (e.g. cases re-run with --limit)
        by_case: dict[str, dict[int, dict]] = {}
        seconds = {}
        for f in args.merge:
            data = json.loads(f.read_text())
            for b, rows in data["results"].items():
                by_case.setdefault(b, {}).update({r["index"]: r for r in rows})
            for b, sec in data["seconds"].items():
                seconds[b] = max(seconds.get(b, 0.0), sec)
        results = {b: [rows[i] for i in sorted(rows)] for b, rows in by_case.items()}
        write_report(results, seconds, args.out)
        print(f"wrote {args.out}")
        return
    # torch runs torch.export programs, never ONNX graphs: every case would be not-applicable.
    backends = args.backends or [
        b for b in luodi.backend_names() if b != "torch" and luodi.get_backend(b).available().ok
    ]
    results, seconds = {}, {}
    for b in backends:
        t0 = time.time()
        print(f"{b}: running", file=sys.stderr, flush=True)
        results[b] = run_backend(b, args.limit, args.timeout, args.start)
        seconds[b] = time.time() - t0
        counts = collections.Counter(r["status"] for r in results[b])
        print(f"{b}: {dict(counts)} in {seconds[b]:.0f} s", file=sys.stderr, flush=True)
    write_report(results, seconds, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "seconds": seconds}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
