"""Fuzz, kill and concurrency checks of the params loader and the sweep runner; prints figures.

* fuzz: mutations of valid study files (wrong types, unknown keys, huge values, inf/nan, deep
  nesting, aliases, bad paths...) through ``effllm validate``: each must be refused with a short
  message, exit 2, no traceback, within a time limit;
* kill: a smoke sweep SIGKILLed at several moments, then resumed: every run must end with exactly
  one ok record, and nothing the killed sweep started may outlive it;
* concurrency: two sweeps into one folder: no run executed twice, no record lost.

Usage: ``python benchmarks/robustness.py [--fuzz N] [--kills N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typer.testing import CliRunner  # noqa: E402

from effllm_helpers import studies  # noqa: E402
from effllm_helpers.cli import app  # noqa: E402

FUZZ_LIMIT_S = 10.0
VALID = [ROOT / "params/smoke/smoke.yaml", ROOT / "params/inference.yaml",
         ROOT / "params/finetuning/general.yaml", ROOT / "params/architecture/attention.yaml"]
LAUGHS = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)))


# ---------------------------------------------------------------- fuzz
def mutations(rng: random.Random) -> list[tuple[str, str]]:
    """(label, YAML text) pairs; every one of them is invalid."""
    out: list[tuple[str, str]] = []
    bad_values = [float("inf"), float("nan"), -1, 0, 2**70, "x" * 100_000, [], {}, None, True,
                  "abc", [[[[1]]]], -(2**64)]
    for path in VALID:
        good = yaml.safe_load(path.read_text())
        dump = lambda d: yaml.safe_dump(d, width=10**9)  # noqa: E731
        for key in ("study", "axis", "notebook", "seeds", "grid", "weights", "timeout_s"):
            for v in rng.sample(bad_values, 3):
                if key in ("timeout_s", "weights") and v in (None, {}):
                    continue  # valid there: no limit, no weights
                d = dict(good)
                d[key] = v
                out.append((f"{path.stem}:{key}={str(v)[:20]}", dump(d)))
        for key in good["grid"]:
            d = json.loads(json.dumps(good))
            d["grid"][key] = [rng.choice([float("inf"), "no-such", -5, 2**80, {"x": 1}])]
            out.append((f"{path.stem}:grid.{key}", dump(d)))
        d = dict(good, unknown_key=1)
        out.append((f"{path.stem}:unknown top key", dump(d)))
        d = json.loads(json.dumps(good))
        d["base"] = {"no_such_param": 1}
        out.append((f"{path.stem}:unknown base key", dump(d)))
        d = json.loads(json.dumps(good))
        d["grid"]["no.such.key"] = [1]
        out.append((f"{path.stem}:unknown grid key", dump(d)))
        for nb in ("README.md", "/etc/hostname", "../../x.ipynb", "notebooks/nope.ipynb"):
            out.append((f"{path.stem}:notebook={nb}", dump(dict(good, notebook=nb))))
        out.append((f"{path.stem}:study name 300", dump(dict(good, study="s" * 300))))
        out.append((f"{path.stem}:study name path", dump(dict(good, study="../../x"))))
        text = path.read_text()
        out.append((f"{path.stem}:laughs", text + LAUGHS + "x: *i\n"))
        out.append((f"{path.stem}:deep", text + "base: " + "[" * 3000 + "]" * 3000 + "\n"))
        out.append((f"{path.stem}:recursive", text + "x: &r [*r]\n"))
        out.append((f"{path.stem}:duplicate", text + "seeds: [1]\nseeds: [2]\n"))
        out.append((f"{path.stem}:truncated", text[: len(text) // 2] + "\n  - [unclosed"))
        out.append((f"{path.stem}:python tag", text + "x: !!python/object/apply:os.system [id]\n"))
        out.append((f"{path.stem}:binary", "\xff\xfe" + text))
        out.append((f"{path.stem}:list top", "- 1\n- 2\n"))
    return out


def classify(res, elapsed: float, text_ok: bool) -> str:
    if elapsed > FUZZ_LIMIT_S:
        return "hung"
    if res.exit_code == 0:
        return "accepted wrongly"
    if res.exception is not None and not isinstance(res.exception, SystemExit) \
            or "Traceback" in res.output:
        return "traceback"
    if res.exit_code == 2 and text_ok:
        return "refused clearly"
    return "weak"


def fuzz(n: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    cases = mutations(rng)
    while len(cases) < n:
        cases += mutations(rng)
    cases = cases[:n]
    figures = {k: 0 for k in ("refused clearly", "weak", "traceback", "accepted wrongly", "hung")}
    examples: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, text) in enumerate(cases):
            path = Path(tmp) / f"case{i}.yaml"
            path.write_bytes(text.encode("utf-8", "surrogateescape")
                             if not text.startswith("\xff") else b"\xff\xfe" + text[2:].encode())
            signal.alarm(int(FUZZ_LIMIT_S * 3))  # a real hang ends here, counted as hung
            t0 = time.monotonic()
            try:
                res = CliRunner().invoke(app, ["validate", str(path), "-p", "ci"])
            finally:
                signal.alarm(0)
            elapsed = time.monotonic() - t0
            lines = [ln for ln in res.output.splitlines() if ln.strip()]
            text_ok = 0 < len(res.output) <= 3000 and len(lines) <= 25 \
                and all(len(ln) <= 1200 for ln in lines)
            kind = classify(res, elapsed, text_ok)
            figures[kind] += 1
            if kind != "refused clearly":
                examples.setdefault(kind, []).append(f"{label}: {res.output[:200]!r}")
    return {"cases": len(cases), **figures, "examples": examples}


# ---------------------------------------------------------------- kill and concurrency
SMOKE_STUDY = ("study: rb\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
               "grid: {n: [16, 20, 24], sleep_s: [0.2]}\ntimeout_s: 120\n")


def _cmd(study: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "effllm_helpers.cli", "sweep", str(study), "-p", "ci", "-o",
            str(out), "--no-progress"]


def _check_records(out: Path, expected: set[str]) -> dict[str, int]:
    recs = {}
    corrupt = 0
    for p in (out / "runs" / "rb").glob("*/record.json"):
        try:
            recs[p.parent.name] = json.loads(p.read_text())
        except (OSError, ValueError):
            corrupt += 1
    ok = {rid for rid, r in recs.items() if r.get("status") == "ok"}
    return {"lost": len(expected - ok), "corrupt": corrupt,
            "not_ok": sum(r.get("status") != "ok" for r in recs.values())}


def kills(n: int) -> dict[str, int]:
    import psutil

    figures = {"kills": 0, "lost": 0, "corrupt": 0, "not_ok": 0, "orphans": 0}
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "rb.yaml"
        study.write_text(SMOKE_STUDY)
        expected = {r.run_id for r in studies.expand(study, "ci")}
        for i in range(n):
            out = Path(tmp) / f"out{i}"
            proc = subprocess.Popen(_cmd(study, out), cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0 + i * 1.5)  # from the imports to the last run
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                kids = []
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            time.sleep(3)
            figures["orphans"] += sum(1 for k in kids if k.is_running()
                                      and k.status() != psutil.STATUS_ZOMBIE)
            for k in kids:
                if k.is_running():
                    k.kill()
            subprocess.run(_cmd(study, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
            figures["kills"] += 1
            for k, v in _check_records(out, expected).items():
                figures[k] += v
    return figures


def concurrent() -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "rb.yaml"
        study.write_text(SMOKE_STUDY)
        expected = {r.run_id for r in studies.expand(study, "ci")}
        out = Path(tmp) / "out"
        procs = [subprocess.Popen(_cmd(study, out), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        executed = 0
        for text in outputs:
            line = [ln for ln in text.splitlines() if ln.startswith("rb: ")][-1]
            executed += sum(int(part.split()[0]) for part in line[4:].split(", ")
                            if part.split()[1] == "ok")
        figs = _check_records(out, expected)
        return {"runs": len(expected), "executed": executed,
                "duplicated": max(0, executed - len(expected)), **figs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=120, help="malformed params inputs (>= 100)")
    ap.add_argument("--kills", type=int, default=8, help="kill moments of a smoke sweep")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    os.chdir(ROOT)
    report = {"fuzz": fuzz(args.fuzz)}
    print("fuzz:", json.dumps({k: v for k, v in report["fuzz"].items() if k != "examples"}),
          flush=True)
    for kind, ex in report["fuzz"]["examples"].items():
        print(f"  {kind}: " + "\n    ".join(ex[:5]), flush=True)
    if args.kills:
        report["kill"] = kills(args.kills)
        print("kill:", json.dumps(report["kill"]), flush=True)
    report["concurrent"] = concurrent()
    print("concurrent:", json.dumps(report["concurrent"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
