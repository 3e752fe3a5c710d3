"""Fuzz, kill and concurrency checks of the params loader and the sweep runner; prints figures.

* fuzz: mutations of valid study files (wrong types, unknown keys, huge values, inf/nan, deep
  nesting, aliases, bad paths...) through ``effllm validate``: each must be refused with a short
  message, exit 2, no traceback, within a time limit;
* kill: a smoke sweep SIGKILLed at several moments, then resumed: every run must end with exactly
  one ok record, and nothing the killed sweep started may outlive it;
* concurrency: two sweeps into one folder: no run executed twice, no record lost; six
  ``collect`` into one folder: none crashes; two sweeps side by side: each record counts both;
* hostile inputs (issue 29's held-out run): task files that run code, size bombs, control
  characters, over-long paths, silent grid overrides, hostile CLI options;
* corrupt records (facts past float range, negative or overflowing metrics, unsealed records,
  looping links) through collect, recommend and compare: each reported invalid, none taken.

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


SMOKE_HEAD = "study: h\naxis: smoke\nnotebook: notebooks/smoke.ipynb\n"
INFER_HEAD = "study: h\naxis: inference\nnotebook: notebooks/03_inference.ipynb\n"
FT_HEAD = "study: h\naxis: finetuning\nnotebook: notebooks/02_finetuning.ipynb\n"


def hostile_cases() -> list[tuple[str, str | None]]:
    """The held-out run's classes (issue 29): code in a params value, size bombs, keys and
    characters that used to raise, over-long paths, silent mislabels. ``None``: a FIFO."""
    twelve = ", ".join(str(i) for i in range(12))
    return [
        ("task file runs code", INFER_HEAD + "grid: {lm_eval_tasks: [[/tmp/t/evil.yaml]]}\n"),
        ("task file relative", INFER_HEAD + "grid: {lm_eval_tasks: [[evil.yaml]]}\n"),
        ("grid bomb 6x12", SMOKE_HEAD + "grid: {" + ", ".join(  # valid keys: ~3M runs
            f"{k}: [{twelve}]" for k in ("n", "steps", "measure.warmup_steps", "measure.repeats",
                                         "sleep_s", "measure.min_duration_s")
        ).replace("[0, ", "[12, ") + "}\n"),
        ("alias string bomb", SMOKE_HEAD + f'x: &s "{"y" * 200_000}"\n'
         "grid: {n: [" + ", ".join(["*s"] * 50) + "]}\n"),
        ("million-element list", SMOKE_HEAD + "grid: {n: [" + ",".join(["1"] * 1_000_000)
         + "]}\n"),
        ("5000-element list", SMOKE_HEAD + "grid: {n: [" + ",".join(["1"] * 5000) + "]}\n"),
        ("list as key", SMOKE_HEAD + "grid: {n: [1]}\n? [1, 2]\n: 3\n"),
        ("mapping as key", SMOKE_HEAD + "grid: {n: [1]}\n? {a: 1}\n: 3\n"),
        ("NUL in value", SMOKE_HEAD + 'grid: {n: [1]}\ndescription: "a\\0b"\n'),
        ("NUL in notebook", SMOKE_HEAD.replace("smoke.ipynb", 'smoke\\0.ipynb"').replace(
            "notebook: ", 'notebook: "') + "grid: {n: [1]}\n"),
        ("bell in value", SMOKE_HEAD + 'grid: {fail: ["none\\a"]}\n'),
        ("escape in key", SMOKE_HEAD + 'grid: {"n\\e[31m": [1]}\n'),
        ("escape in model", INFER_HEAD + 'grid: {model: ["x\\e[2J/y"]}\n'),
        ("surrogate", SMOKE_HEAD + 'grid: {fail: ["\\ud800"]}\n'),
        ("long notebook path", SMOKE_HEAD.replace("notebooks/smoke.ipynb", "a/" * 3000 + "x")
         + "grid: {n: [1]}\n"),
        ("long model path", INFER_HEAD + f"grid: {{model: [./{'m' * 5000}]}}\n"),
        ("long hub-like model", INFER_HEAD + f"grid: {{model: [{'m' * 300}/{'n' * 5000}]}}\n"),
        ("long gguf path", INFER_HEAD + f"grid: {{model: ['gguf:{'g' * 5000}']}}\n"),
        ("long corpus path", "study: h\naxis: architecture\nnotebook: "
         f"notebooks/01_architecture.ipynb\ngrid: {{data.corpus: ['text:{'c' * 5000}']}}\n"),
        ("long task path", FT_HEAD + f"grid: {{task: ['jsonl:{'t' * 5000}']}}\n"),
        ("long image folder", "study: h\naxis: cross_modal\nnotebook: "
         f"notebooks/04_cross_modal.ipynb\ngrid: {{data: ['folder:{'f' * 5000}']}}\n"),
        ("missing jsonl task", FT_HEAD + "grid: {task: ['jsonl:/no/such.jsonl']}\n"),
        ("n: true", SMOKE_HEAD + "grid: {n: [true]}\n"),
        ("variant overrides grid key", SMOKE_HEAD + "grid: {n: [32], v: [{name: a, n: 64}]}\n"),
        ("fifo", None),
    ]


CLI_CASES = [("--workers 1e9", ["sweep", "params/smoke/smoke.yaml", "-p", "ci", "-w",
                                "1000000000", "--dry-run"]),
             ("--preset ''", ["validate", "params/smoke/smoke.yaml", "--preset", ""]),
             ("--set NUL", ["validate", "params/smoke/smoke.yaml", "-p", "ci", "--set",
                            "fail=a\x00b"]),
             ("--only escape", ["validate", "params/smoke/smoke.yaml", "-p", "ci", "--only",
                                "n=\x1b[31m"])]


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
    cases = cases[:n] + hostile_cases()
    figures = {k: 0 for k in ("refused clearly", "weak", "traceback", "accepted wrongly", "hung")}
    examples: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, (label, text) in enumerate(cases):
            path = Path(tmp) / f"case{i}.yaml"
            if text is None:
                os.mkfifo(path)
            else:
                path.write_bytes(text.encode("utf-8", "surrogateescape")
                                 if not text.startswith("\xff")
                                 else b"\xff\xfe" + text[2:].encode())
            jobs.append((label, ["validate", str(path), "-p", "ci"]))
        jobs += CLI_CASES
        for label, args in jobs:
            signal.alarm(int(FUZZ_LIMIT_S * 3))  # a real hang ends here, counted as hung
            t0 = time.monotonic()
            try:
                res = CliRunner().invoke(app, args)
            except TimeoutError:
                figures["hung"] += 1
                examples.setdefault("hung", []).append(label)
                continue
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
    return {"cases": len(jobs), **figures, "examples": examples}


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


def _alarm(*_: object) -> None:
    raise TimeoutError("no answer in time")


# ---------------------------------------------------------------- corrupt records
def _corrupt_records(root: Path) -> dict[str, str]:
    """One run folder per corruption the held-out run found taken silently or crashing."""
    from effllm_helpers import results

    def rec(rid: str, **over) -> dict:
        r = results.new_record(run_id=rid, study="c", axis="smoke", params={"n": 1},
                               metrics={"al_s": results.metric(0.5, "s", "timer")})
        return {**r, **over}

    cases = {
        "model fact 10**400": json.dumps(rec("c1", model={"n_params": 1})).replace(
            '"n_params": 1', '"n_params": 1' + "0" * 400),
        "latency -5 s": json.dumps(rec("c2", metrics={"al_s": {"value": -5.0, "unit": "s",
                                                               "method": "timer"}})),
        "overflowing metric": json.dumps(rec("c3", metrics={"it": {
            "value": 1e300, "unit": "tokens/s", "method": "timer"}})),
        "unsealed": json.dumps(rec("c4", notebook_saved=False)),
        "looping symlink": "",
    }
    for i, (label, text) in enumerate(cases.items()):
        d = root / f"r{i}"
        d.mkdir(parents=True)
        if label == "looping symlink":
            os.symlink(d / "record.json", d / "record.json")
        else:
            (d / "record.json").write_text(text)
    good = root / "good"
    good.mkdir()
    (good / "record.json").write_text(json.dumps(rec("ok1")))
    return {f"r{i}": label for i, label in enumerate(cases)}


def corrupt() -> dict[str, int]:
    """collect, recommend and compare over corrupt records: each reported invalid, none taken,
    no crash."""
    figures = {"records": 0, "reported invalid": 0, "taken": 0, "crashes": 0}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        labels = _corrupt_records(root)
        figures["records"] = len(labels)
        res = CliRunner().invoke(app, ["collect", "-r", str(root), "-o", str(Path(tmp) / "o")])
        if res.exit_code != 0 or "Traceback" in res.output:
            figures["crashes"] += 1
        for folder in labels:
            if f"/{folder}/record.json" in res.output:
                figures["reported invalid"] += 1
            else:
                figures["taken"] += 1
        for args in (["recommend", "-r", str(root), "-a", "smoke"],
                     ["compare", str(root), str(root), "--out", str(Path(tmp) / "cmp")]):
            r = CliRunner().invoke(app, args)
            if r.exception is not None and not isinstance(r.exception, SystemExit):
                figures["crashes"] += 1
    return figures


def concurrent_collects(n: int = 6) -> dict[str, int]:
    """n ``effllm collect`` into one folder at once: each must end with exit 0."""
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(ROOT / "tests"))
        from fixtures_records import write_all

        src = write_all(Path(tmp) / "recs")
        cmd = [sys.executable, "-m", "effllm_helpers.cli", "collect", "-r", str(src), "-o",
               str(Path(tmp) / "out")]
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(n)]
        crashed = sum(p.wait(timeout=600) != 0 for p in procs)
        return {"collects": n, "crashed": crashed,
                "temps_left": len(list((Path(tmp) / "out" / "results").glob(".*tmp")))}


def concurrency_count() -> dict[str, int]:
    """Two sweeps of different studies at once on this machine: the records they write should
    say 2 runs shared it (each sweep runs one at a time)."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        procs = []
        for name in ("ca", "cb"):
            study = Path(tmp) / f"{name}.yaml"
            study.write_text(SMOKE_STUDY.replace("study: rb", f"study: {name}")
                             .replace("sleep_s: [0.2]", "sleep_s: [3]"))
            out = Path(tmp) / f"out_{name}"
            outs.append((out, name))
            procs.append(subprocess.Popen(_cmd(study, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for p in procs:
            p.wait(timeout=600)
        counts = [json.loads(r.read_text()).get("extra", {}).get("concurrent_runs", 0)
                  for out, name in outs for r in (out / "runs" / name).glob("*/record.json")]
        return {"records": len(counts), "saying 2 or more": sum(c >= 2 for c in counts),
                "saying 1": sum(c == 1 for c in counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=120, help="malformed params inputs (>= 100)")
    ap.add_argument("--kills", type=int, default=8, help="kill moments of a smoke sweep")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    os.chdir(ROOT)
    signal.signal(signal.SIGALRM, _alarm)
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
    report["corrupt"] = corrupt()
    print("corrupt records:", json.dumps(report["corrupt"]), flush=True)
    report["concurrent_collects"] = concurrent_collects()
    print("concurrent collects:", json.dumps(report["concurrent_collects"]), flush=True)
    report["concurrency_count"] = concurrency_count()
    print("concurrency count:", json.dumps(report["concurrency_count"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
