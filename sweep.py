"""Run train.py for every method x scenario x seed and build the comparison table ("Unforgotten Safety",
Alssum et al. 2025, compares CL methods this way: mean over seeds of ASR, over-refusal and task accuracy).

    python sweep.py --methods sft,replay,der --scenarios benign,poisoned --seeds 0,1
    python sweep.py --methods "sft,der --alpha 1" --seeds 0,1 --n-train 100   # a method entry's own flags
    python sweep.py --summarize-only                                          # rebuild the table, run nothing

--methods is comma-separated; an entry is a method name, optionally followed by that run's own train.py flags
("der --alpha 1"; a value cannot contain a comma). Every flag the sweep does not know goes to every run
(--n-train 100, --model DIR, ...); an entry's flags come after them, so they win. Each run writes
RESULTS/runs/NAME-SCENARIO-sSEED, NAME being the entry with its flags folded in ("der --alpha 1" -> der_alpha=1),
and its log RESULTS/runs/.../train.log.

Each run is a subprocess, not a train.main() call: a crash, an out-of-memory kill or GPU memory left behind by one
run does not take the sweep down or spill into the next run. A failed run is reported, the sweep goes on, and it
exits non-zero at the end. Starting Python and torch again costs seconds a run; a run costs minutes.

Resuming: run the same command again after a crash, Ctrl-C or SIGTERM. A run whose results.json exists is finished
(train.py writes it last, atomically) and is skipped; a stopped run (train.py's checkpoint RUN/ckpt/manifest.json) is
continued with --resume, and if that fails, started over; any other run starts over with --overwrite. Ctrl-C or
SIGTERM to the sweep reaches the current run as one SIGTERM (train.py writes a checkpoint, then stops; a second
one stops it at once), and the sweep stops after it.
One RESULTS directory holds one setting: RESULTS/settings.json keeps the shared train.py settings (everything but
the method, its flags, scenario and seed) of the first sweep, and a sweep with other settings is refused, so
finished runs are never reused for other flags and a table never mixes settings. Nor starting models: a run records
the sha256 of the weights it started from (results.json start_sha256), and runs from two are refused, before a sweep
and in the summary (a rebuilt aligned model keeps its directory, not its weights).

After every sweep, from every finished run under RESULTS/runs (atomic writes):
  summary.csv          one row per run, each number with its 95% Wilson interval (NAME_lo, NAME_hi)
  comparison.csv       per method entry x scenario: the mean over seeds, its 95% interval (a hierarchical bootstrap:
                       seeds, then prompts; intervals.py), and the paired difference from SFT on the same seeds and
                       prompts with its interval; significant when that interval excludes 0
  summary.md           comparison.csv as a table (* = significantly different from SFT), and the starting model
  safety_utility.png   ASR (x) vs task accuracy (y), means and 95% intervals; skipped if matplotlib is missing
  forgetting_S.png     runs with --eval-every: ASR against the optimizer step per method, one figure per scenario S
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import align
import train
from checkpoint import RESUME_MAY_CHANGE
from cli import one_line_errors
from files import atomic_write, weights_sha256, write_json
from intervals import as_arrays, bootstrap, paired_bootstrap
from methods import METHODS

TRAIN = Path(__file__).resolve().parent / "train.py"
SET_BY_SWEEP = ("--method", "--scenario", "--seed", "--out", "--overwrite", "--resume")
# train.py flags that may differ between runs of one table: what the sweep sets per run, and what a resumed run
# may change (--resume, --ckpt-every, --stop-after, --device, ...: how a run goes, not what it computes)
NOT_SETTINGS = {"method", "scenario", "seed", "out"} | RESUME_MAY_CHANGE
METRICS = ("asr", "over_refusal", "task_accuracy")
LABELS = ("ASR", "over-refusal", "task acc")
COLUMNS = ["method", "scenario", "seed", "poison_ratio", *(f"{k}{e}" for k in METRICS for e in ("", "_lo", "_hi")),
           *(f"start_{k}" for k in METRICS), "train_seconds", "total_seconds", "out"]
REFERENCE = "sft"  # every method's paired difference is taken from this entry's runs


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Run train.py over methods x scenarios x seeds; write the table.",
                                epilog="Any other flag is passed to every train.py run.", allow_abbrev=False)
    p.add_argument("--methods", default="sft,replay,der",
                   help='comma-separated method entries, each with its own train.py flags if any: "sft,der --alpha 1"')
    p.add_argument("--scenarios", default="benign,poisoned", help="comma-separated (default benign,poisoned)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated integers (default 0,1,2)")
    p.add_argument("--results", default="results", help="results directory (default results/)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the table and plot from finished runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at once on this machine: one GPU each, or on a CPU an equal "
                   "share of the cores each (default 1)")
    p.add_argument("--slurm", action="store_true", help="submit the runs as one Slurm job array (sbatch), one array task a run")
    p.add_argument("--slurm-partition", help="--slurm: the partition (sbatch --partition)")
    p.add_argument("--slurm-gpus", type=int, help="--slurm: GPUs per run (sbatch --gres=gpu:N)")
    p.add_argument("--slurm-time", help="--slurm: time limit per run (sbatch --time, e.g. 2:00:00)")
    p.add_argument("--slurm-extra", default="", help='--slurm: any other sbatch flags, e.g. "--account=x --qos=y"')
    p.add_argument("--wait", action="store_true", help="--slurm: wait for the array to finish, then write the table")
    p.add_argument("--slurm-task", type=int, help=argparse.SUPPRESS)  # an array task: run RESULTS/slurm/plan.json[N]
    args, rest = p.parse_known_args(argv)  # allow_abbrev=False: --seed is not taken for --seeds; it is refused below
    args.results = Path(args.results)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.slurm and args.jobs > 1:
        p.error("--slurm and --jobs: Slurm places the runs itself")
    if (args.slurm_partition or args.slurm_gpus or args.slurm_time or args.slurm_extra or args.wait) and not args.slurm:
        p.error("--slurm-* and --wait go with --slurm")
    if args.summarize_only and rest:
        p.error(f"--summarize-only runs nothing: {' '.join(rest)} would be ignored")
    return args, rest


def run_name(tokens):
    """['der', '--alpha', '1'] -> 'der_alpha=1': a directory name, different for different flags."""
    name = tokens[0] + "".join("_" + t[2:] if t.startswith("--") else "=" + t for t in tokens[1:])
    safe = re.sub(r"[^\w.=+-]", "~", name)  # a path or odd character in a value: keep it unique with a hash
    return name if safe == name else f"{safe}~{hashlib.sha256(' '.join(tokens).encode()).hexdigest()[:6]}"


def check(argv, what):
    """train.py's own argument check, its error on one line: nothing runs if any planned run is invalid."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return train.get_args(argv)
    except SystemExit:
        message = (err.getvalue().strip().splitlines() or ["invalid flags"])[-1]
        sys.exit(f"error: {what}: {message.split('error: ', 1)[-1]}")


def plan(args, rest):
    """[(out_dir, train.py argv)] for every method entry x scenario x seed, each checked by train.py's parser."""
    entries = [shlex.split(e) for e in args.methods.split(",") if e.strip()]
    scenarios = list(dict.fromkeys(s.strip() for s in args.scenarios.split(",") if s.strip()))
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds!r}: comma-separated integers expected")
    if not entries or not scenarios:
        sys.exit("error: --methods and --scenarios must name at least one each")
    for flag in rest + [t for tokens in entries for t in tokens[1:]]:
        if flag.split("=")[0] in SET_BY_SWEEP:
            sys.exit(f"error: {flag.split('=')[0]} is set by the sweep: use --methods, --scenarios, --seeds, --results")
    names = [run_name(tokens) for tokens in entries]
    if len(set(names)) < len(names):
        sys.exit(f"error: --methods {args.methods!r}: an entry is given twice")
    runs = []
    for tokens, name in zip(entries, names):
        for scenario in scenarios:
            for seed in seeds:
                out = args.results / "runs" / f"{name}-{scenario}-s{seed}"
                argv = [*rest, *tokens[1:], "--method", tokens[0], "--scenario", scenario, "--seed", str(seed),
                        "--out", str(out)]
                check(argv, f"run {out.name}")
                runs.append((out, argv))
    # the shared settings: what --methods' entries, --scenarios and --seeds do not set
    keys = set(vars(train.get_args([]))) - NOT_SETTINGS
    config = vars(check([*rest, "--method", entries[0][0]], "flags"))
    settings = json.loads(json.dumps({k: v for k, v in config.items() if k in keys}))
    if settings.get("base_model") == str(align.BASE):  # the default checkpoint, wherever the clone is: a results
        settings["base_model"] = None                   # directory moves between clones and machines
    path = args.results / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k} {old[k]!r} -> {v!r}" for k, v in settings.items() if k in old and old[k] != v]
        if diff:
            sys.exit(f"error: {args.results} holds runs with other settings ({'; '.join(diff)}): use another --results")
    start = Path(config["model"] or align.ALIGNED)  # the default aligned model once built; a rebuilt one differs
    if (start / "config.json").exists():
        one_starting_model(collect(args.results), args.results, weights_sha256(start))
    write_json(path, settings)
    return runs


def last_line(path):
    lines = [l.strip() for l in re.split(r"[\r\n]", path.read_text(errors="replace")) if l.strip()]
    return lines[-1] if lines else "(no output)"


def run_train(argv, log, env=None, cpus=None, procs=None):
    """train.py in its own session (the terminal's Ctrl-C reaches only the sweep); returns its exit status.

    env: extra environment (a job's CUDA_VISIBLE_DEVICES or OMP_NUM_THREADS); cpus: the cores it may use. Alone
    (procs None), Ctrl-C or SIGTERM to the sweep is passed on as one SIGTERM per signal; the sweep waits for train.py
    to stop, then raises KeyboardInterrupt. With --jobs the main thread does that for every process in procs."""
    log.write(f"\n$ {shlex.join([Path(sys.executable).name, TRAIN.name, *argv])}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, str(TRAIN), *argv], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if procs is not None:  # a job of several: the main thread forwards the signals
        procs.add(proc)
        try:
            return proc.wait()
        finally:
            procs.discard(proc)
    stop = []

    def forward(signum, frame):
        stop.append(signum)
        proc.send_signal(signal.SIGTERM)

    catch = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if catch else {}
    try:
        rc = proc.wait()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if stop:
        raise KeyboardInterrupt
    return rc


def run_one(out, argv, tag, stopping=(False,), **kw):
    """One planned run, with the resume rules of the module docstring; returns whether it finished."""
    if (out / "results.json").exists():
        print(f"{tag}: finished, skipped", flush=True)
        return True
    stopped = (out / "ckpt" / "manifest.json").exists()
    print(f"{tag}: {'resuming' if stopped else 'running'}, log {out / 'train.log'}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "train.log", "a") as log:  # every attempt's output, each after its command line
        rc = run_train([*argv, "--resume" if stopped else "--overwrite"], log, **kw)
        if rc and stopped and not stopping[0]:  # e.g. the checkpoint does not fit these flags: train.py said why
            print(f"{tag}: resuming failed ({last_line(out / 'train.log')}); starting over", flush=True)
            rc = run_train([*argv, "--overwrite"], log, **kw)
    if rc == 0 and (out / "results.json").exists():
        r = json.loads((out / "results.json").read_text())
        metrics = ", ".join(f"{label} {pct(r.get(k))}" for k, label in zip(METRICS, LABELS))
        print(f"{tag}: done in {time.time() - t0:.0f}s: {metrics}", flush=True)
        return True
    print(f"{tag}: FAILED (exit {rc}): {last_line(out / 'train.log')}", flush=True)
    return False


def slots(jobs, device):
    """Each job's share of the machine: one GPU each (CUDA_VISIBLE_DEVICES) where train.py runs on CUDA, else an equal
    share of this process's cores (their affinity and OMP_NUM_THREADS)."""
    import torch
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if jobs > n:
            sys.exit(f"error: --jobs {jobs}: only {n} GPUs here (one run per GPU)")
        return [dict(env={"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(jobs)]
    cores = sorted(os.sched_getaffinity(0))
    if jobs > len(cores):
        sys.exit(f"error: --jobs {jobs}: only {len(cores)} cores here (at least one a run)")
    shares = [cores[i * len(cores) // jobs: (i + 1) * len(cores) // jobs] for i in range(jobs)]
    return [dict(env={"OMP_NUM_THREADS": str(len(c))}, cpus=set(c)) for c in shares]


def sweep(runs, shares=None, rest=()):
    """Run what is not finished yet, one at a time or one in each of shares (slots) at once; returns the failed runs."""
    jobs = len(shares) if shares else 1
    todo = sum(not (out / "results.json").exists() for out, _ in runs)
    print(f"sweep: {len(runs)} runs, {len(runs) - todo} finished, {todo} to run" + (f", {jobs} at a time" if jobs > 1 else ""))
    tags = [f"[{i}/{len(runs)}] {out.name}" for i, (out, _) in enumerate(runs, 1)]
    if jobs == 1:
        return [out.name for (out, argv), tag in zip(runs, tags) if not run_one(out, argv, tag)]
    if not any("--model" == a.split("=")[0] for a in rest) and not (align.ALIGNED / "config.json").exists():
        first = next((k for k, (out, _) in enumerate(runs) if not (out / "results.json").exists()), None)
        if first is not None:  # the first run builds the aligned model; the others must find it built
            print("the aligned model is not built yet: one run first, alone, builds it")
            if not run_one(*runs[first], tags[first]):
                return [runs[first][0].name] + sweep([r for k, r in enumerate(runs) if k != first], shares, rest)
    procs, stopping, lock = set(), [False], threading.Lock()
    queue, failed = list(zip(runs, tags)), []

    def worker(slot):
        while not stopping[0]:
            with lock:
                if not queue:
                    return
                (out, argv), tag = queue.pop(0)
            if not run_one(out, argv, tag, procs=procs, stopping=stopping, **slot):
                failed.append(out.name)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in shares]
    for t in threads:
        t.start()
    handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too stops the runs with a checkpoint
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every running train.py writes its checkpoint and stops
        stopping[0] = True
        for p in list(procs):
            p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        raise
    finally:
        signal.signal(signal.SIGTERM, handler)
    return failed


# ----------------------------------------------------------------------------- Slurm
def submit(runs, args):
    """The runs as one Slurm job array: RESULTS/slurm/plan.json (each run's out and argv) and array.sbatch, submitted
    with sbatch; one array task a run, with the same resume rules. Finished runs are left out. When the aligned model is
    not built yet, the first run is its own job and the array waits for it. Returns the job ids."""
    for tool in ("sbatch", "squeue"):
        if not shutil.which(tool):
            sys.exit(f"error: --slurm: no {tool} on PATH (is this a Slurm login node?)")
    d = args.results / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "plan.json", [{"out": str(out), "argv": argv} for out, argv in runs])
    todo = [i for i, (out, _) in enumerate(runs) if not (out / "results.json").exists()]
    if not todo:
        print("every run is finished: nothing to submit")
        return []
    here = Path(__file__).resolve().parent
    lines = ["#!/bin/bash", "#SBATCH --job-name=unforgotten", f"#SBATCH --output={d.resolve()}/%A_%a.log",
             "#SBATCH --open-mode=append", "#SBATCH --requeue",  # pre-empted: requeued, and the run resumes
             "#SBATCH --signal=B:TERM@120"]  # SIGTERM 2 min before the time limit: train.py writes a checkpoint
    lines += [f"#SBATCH --partition={args.slurm_partition}"] if args.slurm_partition else []
    lines += [f"#SBATCH --gres=gpu:{args.slurm_gpus}"] if args.slurm_gpus else []
    lines += [f"#SBATCH --time={args.slurm_time}"] if args.slurm_time else []
    lines += [f"cd {shlex.quote(str(Path.cwd()))}",
              f"exec {shlex.quote(sys.executable)} {shlex.quote(str(here / 'sweep.py'))} --results "
              f"{shlex.quote(str(args.results))} --slurm-task \"$SLURM_ARRAY_TASK_ID\""]
    (d / "array.sbatch").write_text("\n".join(lines) + "\n")
    n, first = len(todo), []
    uses_default = not any(a.split("=")[0] == "--model" for a in runs[0][1])
    if uses_default and not (align.ALIGNED / "config.json").exists():  # one job builds it; the others then find it
        first, todo = [sbatch(args, d, [todo[0]])], todo[1:]
    ids = first + ([sbatch(args, d, todo, after=first[0] if first else None)] if todo else [])
    print(f"submitted {n} runs as Slurm job(s) {', '.join(ids)}; logs in {d}; "
          f"`python sweep.py --summarize-only --results {args.results}` when they are done")
    return ids


def sbatch(args, d, indices, after=None):
    cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, indices))}", *shlex.split(args.slurm_extra),
           *([f"--dependency=afterany:{after}"] if after else []), str(d / "array.sbatch")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: sbatch failed: {(proc.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    return proc.stdout.strip().split(";")[0]


def wait_for(ids, every=5):
    """Until none of the jobs is pending or running (squeue, as users run it)."""
    while ids:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
        if proc.returncode == 0 and not proc.stdout.strip():
            return
        time.sleep(every)


def slurm_task(args):
    """One array task: run plan.json[N] by the sweep's resume rules; exit 0 when it finished."""
    plan = json.loads((args.results / "slurm" / "plan.json").read_text())
    out, argv = Path(plan[args.slurm_task]["out"]), plan[args.slurm_task]["argv"]
    try:
        ok = run_one(out, argv, f"[{args.slurm_task + 1}/{len(plan)}] {out.name}")
    except KeyboardInterrupt:  # SIGTERM (time limit, pre-emption): train.py wrote its checkpoint; a requeue resumes
        sys.exit(f"{out.name}: stopped with a checkpoint; requeued, it resumes")
    sys.exit(0 if ok else 1)


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def collect(results):
    """One row per finished run under RESULTS/runs, ordered by scenario, then methods' registry order."""
    rows = []
    for path in (results / "runs").glob("*/results.json"):
        try:
            r = json.loads(path.read_text())
            bad = next((k for k, kind in (("scenario", str), ("seed", int), ("method", str), ("start", dict),
                                          *((k, (int, float, type(None))) for k in METRICS)) if not isinstance(r.get(k), kind)), None)
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path}: not a results.json of train.py ({e})")
        if bad:  # train.py writes results.json whole and last: this one was edited or is from something else
            sys.exit(f"error: {path}: field {bad!r} is {r.get(bad)!r}, not what train.py writes; remove or rerun that run")
        suffix, name = f"-{r['scenario']}-s{r['seed']}", path.parent.name
        ci = r.get("ci") or {}
        row = {"method": name[: -len(suffix)] if name.endswith(suffix) else name, "scenario": r["scenario"],
               "seed": r["seed"], "poison_ratio": r.get("poison_ratio"),
               **{f"{k}{e}": v for k in METRICS for e, v in zip(("", "_lo", "_hi"), (r.get(k), *ci.get(k, (None, None))))},
               **{f"start_{k}": r.get("start", {}).get(k) for k in METRICS}, "train_seconds": r.get("train_seconds"),
               "total_seconds": r.get("total_seconds"), "out": str(path.parent),
               **{f"asr {bench}": v for bench, v in r.get("asr_by_set", {}).items()},  # several --harmful sets
               **({"asr mean of sets": r["asr_mean_of_sets"]} if "asr_mean_of_sets" in r else {}),
               **sequence_columns(r.get("history") or []),  # a continual sequence (--task a,b): after each task
               **judge_columns(r.get("judges")),  # several judges (train.py --judge a,b or eval.py --rejudge)
               # per-prompt outcomes, for the intervals (not in the CSV); a run from before they were kept has none
               "_outcomes": (r.get("history") or [{}])[-1].get("outcomes", {}),
               "_start_outcomes": (r.get("start_eval") or {}).get("outcomes", {}), "_start_sha256": r.get("start_sha256"),
               "_curve": curve_of(r.get("history") or [])}
        order = list(METHODS).index(r["method"]) if r.get("method") in METHODS else len(METHODS)
        rows.append(((row["scenario"], order, row["method"], row["seed"]), row))
    return [row for _, row in sorted(rows, key=lambda kr: kr[0])]


def one_starting_model(rows, results, sha256=None):
    """A table compares methods from one starting model: runs from another one (a rebuilt aligned model, say) are an
    error, not a row. sha256: the model the next runs will start from. Runs from before train.py recorded it pass."""
    seen = {r["_start_sha256"]: r["out"] for r in rows if r["_start_sha256"]} | ({sha256: "the next runs"} if sha256 else {})
    if len(seen) > 1:
        (a, a_out), (b, b_out) = list(seen.items())[:2]
        sys.exit(f"error: {results}: {Path(a_out).name} started from a model with weights sha256 {a[:12]}, "
                 f"{Path(b_out).name} from {b[:12]}: one --results directory, one starting model")


def sequence_columns(history):
    """For runs of several tasks: ASR and each seen task's accuracy after each task ("after 2 dates: tickets acc"),
    which show what the later task made the model forget."""
    if len(history) < 2:
        return {}
    cols = {}
    for i, h in enumerate(history):
        cols[f"after {i + 1} {h['task']}: asr"] = h.get("asr")
        cols |= {f"after {i + 1} {h['task']}: {t} acc": a for t, a in (h.get("task_accuracy_by_task") or {}).items()}
    return cols


def curve_of(history):
    """A run's forgetting curve (train.py --eval-every) over all its tasks: [(step of the run, ASR)], each task's steps
    after the last of the task before."""
    points, offset = [], 0
    for h in history:
        points += [(offset + step, asr) for step, asr in h.get("curve", []) if not (points and step == 0)]
        offset += h["curve"][-1][0] if h.get("curve") else 0
    return points


def judge_columns(judges):
    """The last stage's figures of a run judged by several judges: each one's ASR, each pair's agreement and kappa."""
    if not judges:
        return {}
    report = list(judges.values())[-1]
    return ({f"asr judge {j}": x["asr"] for j, x in report["asr"].items()} |
            {f"{what} {pair}": x[what] for pair, x in report["agreement"].items() for what in ("agreement", "kappa")})


def groups_of(rows):
    """{(method entry, scenario): [rows over seeds]} and the starting model's rows (one per seed)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["scenario"]), []).append(row)
    start = list({row["seed"]: {"seed": row["seed"], **{k: row[f"start_{k}"] for k in METRICS},
                                "_outcomes": row["_start_outcomes"]} for row in rows}.values())
    return groups, start


def interval(rs, key):
    """(mean, low, high) in %, over seeds and prompts (hierarchical bootstrap); without outcomes, the mean alone."""
    values = [r[key] for r in rs if r.get(key) is not None]
    if not values:
        return None
    runs = [as_arrays(r["_outcomes"][key]) for r in rs if key in r["_outcomes"]]
    if len(runs) < len(rs):
        return 100 * sum(values) / len(values), None, None
    return tuple(100 * x for x in bootstrap(runs))


def difference(rs, ref, key):
    """(mean, low, high, significant) of rs - ref in %, paired on the seeds both have and on their prompts."""
    by_seed = {r["seed"]: r for r in ref}
    pairs = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
    if not pairs or any(key not in a["_outcomes"] or key not in b["_outcomes"] for a, b in pairs):
        return None
    try:
        m, lo, hi = paired_bootstrap(*zip(*[(as_arrays(a["_outcomes"][key]), as_arrays(b["_outcomes"][key])) for a, b in pairs]))
    except ValueError:  # evaluated on other prompts (other flags): no paired difference
        return None
    return 100 * m, 100 * lo, 100 * hi, not lo <= 0 <= hi


def comparison(rows):
    """One dict per method entry x scenario (and the starting model): means, intervals, differences from SFT."""
    groups, start = groups_of(rows)
    out = []
    for (method, scenario), rs in [(("starting model", "-"), start), *groups.items()]:
        ref = groups.get((REFERENCE, scenario))
        row = {"method": method, "scenario": scenario, "seeds": len(rs)}
        for k in METRICS:
            iv, d = interval(rs, k), difference(rs, ref, k) if ref and method != REFERENCE and scenario != "-" else None
            row |= {k: iv and iv[0], f"{k}_lo": iv and iv[1], f"{k}_hi": iv and iv[2],
                    f"{k}_vs_sft": d and d[0], f"{k}_vs_sft_lo": d and d[1], f"{k}_vs_sft_hi": d and d[2],
                    f"{k}_vs_sft_significant": d and d[3]}
        row["train_seconds"] = statistics.mean(r["train_seconds"] for r in rs) if "train_seconds" in rs[0] else None
        out.append(row)
    return out


def cell(row, k):
    if row[k] is None:
        return "-"
    return f"{row[k]:.1f}" + (f" [{row[f'{k}_lo']:.1f}, {row[f'{k}_hi']:.1f}]" if row[f"{k}_lo"] is not None else "")


def diff_cell(row, k):
    if row[f"{k}_vs_sft"] is None:
        return "-"
    return (f"{row[f'{k}_vs_sft']:+.1f} [{row[f'{k}_vs_sft_lo']:+.1f}, {row[f'{k}_vs_sft_hi']:+.1f}]"
            + (" *" if row[f"{k}_vs_sft_significant"] else ""))


def bench_columns(rows):
    """The extra columns: ASR per benchmark (several --harmful sets), and the after-each-task figures of a sequence."""
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith(("asr ", "after ")))
    return sorted(k for k in keys if k.startswith("asr ")) + [k for k in keys if k.startswith("after ")]


def markdown(rows, table, results):
    lines = [f"{len(rows)} runs under {results / 'runs'}. Percentages: the mean over seeds and its 95% interval over "
             "seeds and prompts (hierarchical bootstrap); Δ: the paired difference from sft on the same seeds and "
             "prompts, * where its 95% interval excludes 0. Train time in seconds.", "",
             "| method | scenario | seeds | ASR % | Δ ASR | over-refusal % | Δ over-refusal | task acc % | Δ task acc | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        cells = [f"{cell(row, k)} | {diff_cell(row, k)}" for k in METRICS]
        seconds = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
        lines.append(f"| {row['method']} | {row['scenario']} | {row['seeds']} | {' | '.join(cells)} | {seconds} |")
    sets = bench_columns(rows)  # ASR per benchmark (several --harmful sets), after each task (--task a,b): seed means
    if sets:
        groups, _ = groups_of(rows)
        lines += ["", "ASR per benchmark and after each task of a sequence, mean over seeds (%):", "", f"| method | scenario | {' | '.join(sets)} |",
                  f"|---|---|{'---|' * len(sets)}"]
        for (method, scenario), rs in groups.items():
            vals = [[r[c] for r in rs if r.get(c) is not None] for c in sets]
            lines.append(f"| {method} | {scenario} | " + " | ".join(f"{100 * sum(v) / len(v):.1f}" if v else "-" for v in vals) + " |")
    pairs = list(dict.fromkeys(k.split(" ", 1)[1] for row in rows for k in row if k.startswith("agreement ")))
    if pairs:  # several judges: how often each pair agrees, and beyond chance (Cohen's kappa), mean over seeds
        groups, _ = groups_of(rows)
        lines += ["", "Judges' agreement on the final answers, mean over seeds (each judge's ASR is in the table above):", "",
                  "| method | scenario | " + " | ".join(f"agree % {p} | kappa {p}" for p in pairs) + " |",
                  f"|---|---|{'---|---|' * len(pairs)}"]
        for (method, scenario), rs in groups.items():
            def mean(key, scale):
                v = [r[key] for r in rs if r.get(key) is not None]
                return f"{scale * sum(v) / len(v):.{1 if scale == 100 else 2}f}" if v else "-"
            lines.append(f"| {method} | {scenario} | " + " | ".join(f"{mean(f'agreement {p}', 100)} | {mean(f'kappa {p}', 1)}"
                                                              for p in pairs) + " |")
    return "\n".join(lines) + "\n"


def plot(table, path):
    """ASR vs task accuracy, one marker per method entry (colour) and scenario (shape), 95% interval bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (pip install matplotlib); the table is written")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colours, palette = {}, plt.get_cmap("tab20").colors  # 20 colours: one per method
    for row in table:
        if row["asr"] is None or row["task_accuracy"] is None:
            continue
        method, scenario = row["method"], row["scenario"]
        err = lambda k: None if row[f"{k}_lo"] is None else [[row[k] - row[f"{k}_lo"]], [row[f"{k}_hi"] - row[k]]]
        colour = "black" if method == "starting model" else colours.setdefault(method, palette[len(colours) % 20])
        ax.errorbar(row["asr"], row["task_accuracy"], xerr=err("asr"), yerr=err("task_accuracy"), color=colour, capsize=3,
                    linestyle="none", marker={"-": "*", "benign": "o", "poisoned": "^"}.get(scenario, "s"),
                    markersize=11 if scenario == "-" else 8, label=method if scenario == "-" else f"{method} ({scenario})")
    ax.set_xlabel("attack success rate % (lower is safer)")
    ax.set_ylabel("task accuracy %")
    ax.set_title("safety vs utility (mean over seeds, 95% interval over seeds and prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the points stay visible
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


def plot_curves(rows, results):
    """ASR against the optimizer step for each method entry (mean over the seeds that have a curve), one figure per
    scenario: forgetting_SCENARIO.png. Returns the files written."""
    curves = {}
    for row in rows:
        if row["_curve"]:
            curves.setdefault(row["scenario"], {}).setdefault(row["method"], []).append(dict(row["_curve"]))
    if not curves:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for scenario, methods in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method, runs in methods.items():
            steps = sorted(set.intersection(*(set(c) for c in runs)))  # the steps every seed measured
            label = f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            ax.plot(steps, [100 * sum(c[s] for c in runs) / len(runs) for s in steps], marker=".", label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("ASR % on the curve's harmful prompts")
        ax.set_title(f"forgetting as it happens ({scenario}; mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        atomic_write(results / f"forgetting_{scenario}.png", buf.getvalue())
        written.append(f"forgetting_{scenario}.png")
    return written


def summarize(results):
    """summary.csv, summary.md and safety_utility.png from every finished run; returns the markdown."""
    rows = collect(results)
    if not rows:
        print(f"no finished runs under {results / 'runs'}: no summary")
        return None
    one_starting_model(rows, results)
    table = comparison(rows)
    for name, records, columns in (("summary.csv", rows, [*COLUMNS, *bench_columns(rows)]), ("comparison.csv", table, list(table[0]))):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        atomic_write(results / name, buf.getvalue().encode())
    text = markdown(rows, table, results)
    atomic_write(results / "summary.md", text.encode())
    written = ["summary.csv", "comparison.csv", "summary.md"]
    if plot(table, results / "safety_utility.png"):
        written.append("safety_utility.png")
    written += plot_curves(rows, results)
    print(f"\n{text}\nwrote {', '.join(str(results / w) for w in written)}")
    return text


def main(argv=None):
    args, rest = get_args(argv)
    if args.summarize_only:
        if summarize(args.results) is None:
            sys.exit(1)
        return
    if args.slurm_task is not None:
        return slurm_task(args)
    shares = slots(args.jobs, check([*rest, "--method", "sft"], "flags").device) if args.jobs > 1 else None
    runs = plan(args, rest)
    if args.slurm:
        ids = submit(runs, args)
        if args.wait:
            wait_for(ids)
            summarize(args.results)
        return
    try:
        failed = sweep(runs, shares, rest)
    except KeyboardInterrupt:
        sys.exit("stopped: run the same command again to go on")
    summarize(args.results)
    if failed:
        sys.exit(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)} (see their train.log)")


if __name__ == "__main__":
    with one_line_errors():
        main()
