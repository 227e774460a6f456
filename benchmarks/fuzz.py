"""The fuzz campaign: mutated packages and engine files, each opened and run in a worker process that may die.

What it does
------------
One real package (a small CNN exported from torch for every installed engine) is mutated, case by case, in
ten ways: the package's bytes, its manifest values, its zip members (hostile names, drops, replacements), and
each engine's own files with their sha256 pinned again so that the bytes reach the engine: ncnn
``model.param`` (parameter values, counts, blob names, layer types, lines) and ``model.bin``, MNN
``model.mnn``, OpenVINO ``model.xml`` (attribute values, lines) and ``model.bin``, the torch program
``model.pt2`` (bytes, and values inside its JSON members) and the onnxruntime ``model.onnx``. Every case
opens the package, reads its members, starts a Session on the case's engine and runs it once at the
package's representative shapes.

Cases run in worker processes (``--worker``) that report one JSON line per case; a worker that dies (a
signal, an exit) is a **crash** of the case it was running and is replaced; one that takes longer than
``--case-timeout`` is a **hang**, killed and replaced. A case ends ``ok`` (it ran), ``refused`` (a
LuodiError) or ``escape`` (any other exception). The workers' working folder, HOME and TMPDIR are empty
folders that must stay empty (luodi's cache, the one place it may write, is inside the campaign folder).
The same seed gives the same cases. The summary is printed as a table and, with ``--json``, written.

Run::

    python benchmarks/fuzz.py --cases 10000              # the full campaign (see docs/security.md)
    python benchmarks/fuzz.py --cases 200 --seed 1       # a quick subset (tests/test_fuzz.py runs one)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

ENGINES = ["onnxruntime", "openvino", "ncnn", "mnn", "torch"]
# kind -> (weight, engine the case runs on, the member it mutates; None: the package as a whole)
KINDS: dict[str, tuple[int, str | None, str | None]] = {
    "zip-bytes": (20, None, None),
    "manifest": (20, None, None),
    "members": (12, None, None),
    "ncnn-param": (12, "ncnn", "targets/ncnn-fp32/model.param"),
    "ncnn-bin": (4, "ncnn", "targets/ncnn-fp32/model.bin"),
    "mnn": (8, "mnn", "targets/mnn-fp32/model.mnn"),
    "openvino-xml": (10, "openvino", "targets/openvino-fp32/model.xml"),
    "openvino-bin": (4, "openvino", "targets/openvino-fp32/model.bin"),
    "torch-program": (6, "torch", "targets/torch-fp32/model.pt2"),
    "onnx": (4, "onnxruntime", "targets/onnxruntime-fp32/model.onnx"),
}
HOSTILE_NAMES = ["../luodi-fuzz-escape", "/tmp/luodi-fuzz-escape-abs", "targets/../../x", "", "a/./b", "x" * 600]
NUMBERS = ["0", "1", "-1", "2", "3", "7", "16", "255", "-233", "65536", "2147483647", "-2147483648", "1e30", "0.0",
           "nan", "99999999999", "-5", "4.5"]  # fmt: skip
ESCAPE = "luodi-fuzz-escape"
# What the engines themselves write into HOME/TMPDIR whatever the input (usage telemetry and compiler caches);
# reported apart from files a case wrote. Turning the telemetry off is issue 14's finding 12.
ENGINE_FILES = re.compile(r"^home/\.cache/Microsoft/|^home/intel/|^tmp/torchinductor_[^/]+/|^tmp/\.ses$")


# -- the base package ----------------------------------------------------------------------------------------
def build_base(folder: Path) -> Path:
    import torch

    import luodi
    from luodi.backends import get_backend

    engines = [e for e in ENGINES if get_backend(e).available().ok]
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(1)
    ).eval()
    path = folder / "base.luodi"
    luodi.export(module, torch.zeros(1, 3, 16, 16), path, targets=engines, name="fuzz-cnn")
    return path


# -- mutations -----------------------------------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes, edits: int = 3) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, edits)):
        op = rng.choice(["flip", "set", "truncate", "insert", "delete", "overwrite"])
        pos = rng.randrange(max(len(out), 1))
        if op == "flip" and out:
            out[pos] ^= 1 << rng.randrange(8)
        elif op == "set" and out:
            out[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == "truncate" and rng.random() < 0.3:
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del out[pos : pos + rng.randint(1, 64)]
        elif op == "overwrite":
            out[pos : pos + 8] = rng.choice(
                [b"\xff" * 8, b"\x00" * 8, (2**31 - 1).to_bytes(8, "little"), rng.randbytes(8)]
            )
    return bytes(out)


def mutate_ncnn_param(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
        toks = lines[i].split()
        op = rng.choice(["value", "value", "value", "count", "blob", "type", "drop-line", "dup-line", "drop-token"])
        if op == "value" and i >= 2:
            kv = [j for j, t in enumerate(toks) if "=" in t]
            if kv:
                j = rng.choice(kv)
                key, value = toks[j].split("=", 1)
                if "," in value and rng.random() < 0.7:
                    parts = value.split(",")
                    parts[rng.randrange(len(parts))] = rng.choice(NUMBERS)
                    value = ",".join(parts)
                else:
                    value = rng.choice(NUMBERS)
                key = key if rng.random() < 0.9 else rng.choice(["31", "32", "-23331", "-23300", "99"])
                toks[j] = f"{key}={value}"
        elif op == "count" and len(toks) >= 4:
            k = rng.choice([0, 1] if i == 1 else [2, 3])
            toks[k] = rng.choice(["0", "1", "2", "9", "-1", "100000000"])
        elif op == "blob" and len(toks) > 4:
            j = rng.randrange(4, len(toks))
            if "=" not in toks[j]:
                toks[j] = rng.choice(["in0", "out0", "1", "2", "nope", toks[rng.randrange(4, len(toks))]])
        elif op == "type" and i >= 2:
            toks[0] = rng.choice(["Convolution", "InnerProduct", "Pooling", "Split", "Concat", "Reshape", "Crop",
                                  "Softmax", "Input", "BinaryOp", "Clip", "NoSuchLayer"])  # fmt: skip
        elif op == "drop-token" and len(toks) > 1:
            del toks[rng.randrange(len(toks))]
        lines[i] = " ".join(toks)
        if op == "drop-line" and i >= 2:
            del lines[i]
        elif op == "dup-line":
            lines.insert(i, lines[i])
    return "\n".join(lines) + "\n"


def mutate_xml(rng: random.Random, text: str) -> str:
    attrs = list(re.finditer(r'(\w+)="([^"]*)"', text))
    dims = list(re.finditer(r"<dim>(-?\d+)</dim>", text))
    op = rng.choice(["attr", "attr", "attr", "dim", "drop-line", "dup-line"])
    if op == "attr" and attrs:
        m = rng.choice(attrs)
        value = rng.choice([*NUMBERS, "f16", "i64", "u1", "i4", "bf16", "undefined", "-1,-1", "1,1,1,1,1,1,1,1", ""])
        if m.group(1) in ("offset", "size"):
            value = rng.choice(NUMBERS[:12])
        return text[: m.start(2)] + value + text[m.end(2) :]
    if op == "dim" and dims:
        m = rng.choice(dims)
        return text[: m.start(1)] + rng.choice(NUMBERS[:13]) + text[m.end(1) :]
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    if op == "drop-line":
        del lines[i]
    else:
        lines.insert(i, lines[i])
    return "\n".join(lines)


def mutate_pt2(rng: random.Random, data: bytes) -> bytes:
    """A torch.export archive is a zip: change a JSON value inside, or bytes of a member, or the archive."""
    if rng.random() < 0.3:
        return mutate_bytes(rng, data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    i = rng.randrange(len(members))
    info, body = members[i]
    if info.filename.endswith(".json") and rng.random() < 0.8:
        try:
            doc = json.loads(body)
            body = json.dumps(mutate_json(rng, doc)).encode()
        except ValueError:
            body = mutate_bytes(rng, body)
    else:
        body = mutate_bytes(rng, body)
    members[i] = (info, body)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info, body in members:
            zf.writestr(info, body)
    return out.getvalue()


def _paths(node: Any, prefix: tuple = ()) -> Any:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def hostile_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            -1,
            0,
            2**31,
            2**63,
            -(2**40),
            1.5,
            float("nan"),
            "",
            "x" * 300,
            [],
            {},
            [1, 2],
            {"a": 1},
            rng.choice(HOSTILE_NAMES),
            "f16",
            "use_pickle",
            [2**31, 3, 16, 16],
        ]  # fmt: skip
    )


def mutate_json(rng: random.Random, doc: Any) -> Any:
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            return hostile_value(rng)
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = rng.choice(["set", "set", "delete", "add"])
        if op == "set":
            parent[path[-1]] = hostile_value(rng)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[str(hostile_value(rng))[:20]] = hostile_value(rng)
        else:
            parent.append(hostile_value(rng))
    return doc


def make_case(kind: str, seed: int, base: dict[str, bytes]) -> tuple[bytes, str]:
    """The case's package bytes and the engine it runs on; the same (kind, seed) gives the same case."""
    rng = random.Random(f"{kind}:{seed}")
    manifest = json.loads(base["manifest.json"])
    members = {n: d for n, d in base.items() if n != "manifest.json"}
    engines = sorted({t["backend"] for t in manifest["targets"]})
    _, engine, member = KINDS[kind]
    if kind == "zip-bytes":
        return mutate_bytes(rng, pack(manifest, members)), rng.choice(engines)
    if kind == "manifest":
        text = json.dumps(mutate_json(rng, manifest)).encode()
        return pack_raw(text, list(members.items())), rng.choice(engines)
    if kind == "members":
        entries = list(members.items())
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(["drop", "add", "replace", "rename", "duplicate"])
            i = rng.randrange(len(entries)) if entries else 0
            if op == "drop" and entries:
                entries.pop(i)
            elif op == "add":
                entries.append((rng.choice(HOSTILE_NAMES), rng.randbytes(rng.randint(0, 64))))
            elif op == "replace" and entries:
                data = rng.randbytes(rng.randint(0, 256))
                entries[i] = (entries[i][0], data)
                if rng.random() < 0.5:
                    pin(manifest, entries[i][0], data)
            elif op == "rename" and entries:
                entries[i] = (rng.choice(HOSTILE_NAMES), entries[i][1])
            elif op == "duplicate" and entries:
                entries.append((entries[i][0], rng.randbytes(16)))
        return pack_raw(json.dumps(manifest).encode(), entries), rng.choice(engines)
    assert engine is not None and member is not None
    if member not in members:
        return pack(manifest, members), engine  # the engine is not installed here: the case is refused
    data = members[member]
    if kind == "ncnn-param":
        data = mutate_ncnn_param(rng, data.decode()).encode()
    elif kind == "openvino-xml":
        data = mutate_xml(rng, data.decode()).encode()
    elif kind == "torch-program":
        data = mutate_pt2(rng, data)
    else:
        data = mutate_bytes(rng, data, edits=4 if kind == "mnn" else 3)
    members[member] = data
    pin(manifest, member, data)  # re-pinned: the bytes get past the checksum to the engine
    return pack(manifest, members), engine


def pin(manifest: dict, name: str, data: bytes) -> None:
    if isinstance(manifest.get("files"), dict):
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def pack(manifest: dict, members: dict[str, bytes]) -> bytes:
    return pack_raw(json.dumps(manifest).encode(), list(members.items()))


def pack_raw(manifest: bytes, entries: Any) -> bytes:
    import warnings

    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a case on purpose
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr(zipfile.ZipInfo("manifest.json", (2020, 1, 1, 0, 0, 0)), manifest)
            for name, data in entries:
                zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


# -- one case, in a worker -----------------------------------------------------------------------------------
def attempt(path: Path, engine: str) -> tuple[str, str]:
    import numpy as np

    import luodi

    try:
        pkg = luodi.Package(path)
        for name in pkg.manifest["files"]:
            pkg.read(name)
        with luodi.Session(pkg, backend=engine) as s:
            shapes = pkg.representative_shapes[0]
            feeds = {}
            for spec in s.inputs:
                shape = tuple(shapes.get(spec.name, spec.concrete(1)))
                if int(np.prod(shape)) * spec.np_dtype.itemsize > 1 << 24:
                    return "ok", "a declared shape too big to run in a fuzz loop"
                feeds[spec.name] = np.ones(shape, spec.np_dtype)
            s.run(feeds)
        return "ok", ""
    except luodi.LuodiError as exc:
        return "refused", f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # an escape: what the campaign counts
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return "escape", f"{type(exc).__name__}: {str(exc)[:200]} at {frame.filename}:{frame.lineno}"


def worker_main(base_path: Path, folder: Path) -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # engines print to stdout; the replies have their own descriptor
    with zipfile.ZipFile(base_path) as zf:
        base = {n: zf.read(n) for n in zf.namelist()}
    case_file = folder / f"case-{os.getpid()}.luodi"
    for line in sys.stdin:
        index, kind, seed = line.split()
        try:
            data, engine = make_case(kind, int(seed), base)
        except Exception as exc:  # a bug in the campaign, not in luodi: said so, never counted as luodi's
            outcome, detail = "bad-case", f"{type(exc).__name__}: {exc}"
        else:
            case_file.write_bytes(data)
            outcome, detail = attempt(case_file, engine)
        reply.write(json.dumps({"i": int(index), "outcome": outcome, "detail": detail}) + "\n")
    case_file.unlink(missing_ok=True)


# -- the campaign --------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, base: Path, folder: Path, env: dict[str, str], cwd: Path) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "--worker", str(base), str(folder)]
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def ensure(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                text=True,
                bufsize=1,
            )
            self.starts += 1
        return self.proc

    def run(self, index: int, kind: str, seed: int, timeout: float) -> dict[str, Any]:
        proc = self.ensure()
        try:
            proc.stdin.write(f"{index} {kind} {seed}\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            proc.kill()
            proc.wait()
            return {"i": index, "outcome": "hang", "detail": f"no answer within {timeout:.0f} s"}
        code = proc.wait()
        return {"i": index, "outcome": "crash", "detail": f"the worker died (exit status {code})"}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def plan(cases: int, seed: int) -> list[tuple[int, str, int]]:
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    return [(i, rng.choices(kinds, weights)[0], rng.randrange(1 << 31)) for i in range(cases)]


def campaign(cases: int, seed: int, workers: int, case_timeout: float, root: Path) -> dict[str, Any]:
    target, cwd, home, tmp = root / "cases", root / "cwd", root / "home", root / "tmp"
    for d in (target, cwd, home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmp), LUODI_CACHE_DIR=str(target / "cache"))
    t0 = time.perf_counter()
    base = build_base(target)
    build_s = time.perf_counter() - t0
    todo = plan(cases, seed)
    lock = threading.Lock()
    results: list[dict[str, Any]] = []
    pool = [Worker(base, target, env, cwd) for _ in range(workers)]

    def drive(w: Worker) -> None:
        while True:
            with lock:
                if not todo:
                    return
                index, kind, case_seed = todo.pop()
            res = w.run(index, kind, case_seed, case_timeout)
            res.update(kind=kind, seed=case_seed)
            with lock:
                results.append(res)
            if res["outcome"] not in ("ok", "refused"):  # seen at once in a long campaign's log
                print(json.dumps(res), file=sys.stderr, flush=True)

    from rich.progress import Progress

    t1 = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in pool]
    with Progress(transient=True) as bar:
        task = bar.add_task("fuzz cases", total=cases)
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            bar.update(task, completed=len(results))
    for w in pool:
        w.stop()
    run_s = time.perf_counter() - t1
    files = [p for d in (cwd, home, tmp) for p in d.rglob("*") if not p.is_dir()]
    telemetry = sorted(str(p.relative_to(root)) for p in files if ENGINE_FILES.search(str(p.relative_to(root))))
    written = sorted(str(p.relative_to(root)) for p in files if not ENGINE_FILES.search(str(p.relative_to(root))))
    escaped = [
        str(p) for base_dir in (root, Path("/tmp"), Path(tempfile.gettempdir())) for p in base_dir.glob(f"{ESCAPE}*")
    ]
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[r["outcome"]] += 1
    bad = [r for r in results if r["outcome"] in ("crash", "hang", "escape")]
    return {
        "cases": len(results),
        "seed": seed,
        "workers": workers,
        "build_s": round(build_s, 1),
        "run_s": round(run_s, 1),
        "outcomes": dict(Counter(r["outcome"] for r in results)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failures": sorted(bad, key=lambda r: r["i"])[:50],
        "worker_starts": sum(w.starts for w in pool),
        "written_outside": written + escaped,
        "engine_telemetry": telemetry,
        "probed_artifacts": len(list((target / "cache" / "probed").glob("*"))),
    }


def report(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    outcomes = ["ok", "refused", "escape", "crash", "hang"]
    table = Table(title=f"fuzz campaign: {summary['cases']} cases, seed {summary['seed']}, {summary['run_s']} s")
    table.add_column("kind")
    for o in outcomes:
        table.add_column(o, justify="right")
    for kind, counts in summary["by_kind"].items():
        table.add_row(kind, *(str(counts.get(o, 0)) for o in outcomes))
    table.add_row("total", *(str(summary["outcomes"].get(o, 0)) for o in outcomes), style="bold")
    console = Console()
    console.print(table)
    for f in summary["failures"]:
        console.print(f"  {f['outcome']}: case {f['i']} ({f['kind']} seed {f['seed']}): {f['detail']}", markup=False)
    console.print(f"files written outside the campaign folder: {summary['written_outside'] or 'none'}", markup=False)
    console.print(f"engine telemetry and caches (any input): {summary['engine_telemetry'] or 'none'}", markup=False)
    console.print(f"worker starts: {summary['worker_starts']}, artifacts probed: {summary['probed_artifacts']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    ap.add_argument("--case-timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--keep", type=Path, help="the campaign folder (default: a temporary one, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="luodi-fuzz-") as scratch:
        root = args.keep or Path(scratch)
        summary = campaign(args.cases, args.seed, args.workers, args.case_timeout, root)
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    bad = sum(summary["outcomes"].get(o, 0) for o in ("crash", "hang", "escape"))
    sys.exit(1 if bad or summary["written_outside"] else 0)


if __name__ == "__main__":
    main()
