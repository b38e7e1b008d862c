"""sweep.py: a grid of train.py runs on a tiny model, resuming, a failed run, the summary's arithmetic, bad input."""
import csv
import hashlib
import importlib.util
import json
import os
import statistics
import sys

import pytest

import align
import sweep
import train
from intervals import wilson

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "formats")
FAST = ["--n-train", "4", "--n-test", "2", "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "2",
        "--harmful", os.path.join(FIX, "advbench.csv"), "--sensitive", os.path.join(FIX, "prompts.txt"),
        "--poison-data", os.path.join(FIX, "instruction.jsonl")]


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # optional: the plot is skipped without it


def md_cells(md, method, scenario):
    """The cells after `method | scenario` of the one table row for them."""
    rows = [line for line in md.splitlines() if line.startswith(f"| {method} | {scenario} |")]
    assert len(rows) == 1, (method, scenario, md)
    return [c.strip() for c in rows[0].strip("|").split("|")][2:]


def mean_of(values, scale=100, digits=1):
    return f"{statistics.mean(scale * float(x) for x in values):.{digits}f}"


def test_sweep_runs_summarizes_and_resumes(tiny_checkpoint, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--methods", "sft,replay --replay-ratio 0.5", "--scenarios", "poisoned", "--seeds", "0,1",
            "--results", str(results), "--model", str(tiny_checkpoint), *FAST]
    sweep.main(argv)
    names = {f"{m}-poisoned-s{seed}" for m in ("sft", "replay_replay-ratio=0.5") for seed in (0, 1)}
    assert {p.name for p in (results / "runs").iterdir()} == names
    replay = json.loads((results / "runs" / "replay_replay-ratio=0.5-poisoned-s1" / "results.json").read_text())
    assert replay["config"]["replay_ratio"] == 0.5 and replay["seed"] == 1 and replay["config"]["n_train"] == 4
    assert replay["start_sha256"] == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()

    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == sweep.COLUMNS
    assert [(r["method"], r["seed"]) for r in rows] == [("sft", "0"), ("sft", "1"), ("replay_replay-ratio=0.5", "0"),
                                                        ("replay_replay-ratio=0.5", "1")]
    for r in rows:
        res = json.loads(open(os.path.join(r["out"], "results.json")).read())
        assert r["scenario"] == "poisoned" and float(r["poison_ratio"]) == 0.1
        for k in ("asr", "over_refusal", "task_accuracy"):
            assert float(r[k]) == res[k] and float(r[f"start_{k}"]) == res["start"][k]
            assert [float(r[f"{k}_lo"]), float(r[f"{k}_hi"])] == res["ci"][k]
    md = (results / "summary.md").read_text()
    for method in ("sft", "replay_replay-ratio=0.5"):
        group = [r for r in rows if r["method"] == method]
        cells = md_cells(md, method, "poisoned")
        assert cells[0] == "2" and cells[-1] == mean_of([r["train_seconds"] for r in group], 1, 0)
        for k, c in zip(("asr", "over_refusal", "task_accuracy"), cells[1::2]):
            assert c.split(" [")[0] == mean_of([r[k] for r in group])  # the mean, then its interval
    start = {r["seed"]: r for r in rows}.values()
    assert md_cells(md, "starting model", "-")[1].split(" [")[0] == mean_of([r["start_asr"] for r in start])
    assert (results / "safety_utility.png").exists() == HAS_MATPLOTLIB
    assert "| sft | poisoned | 2 |" in capsys.readouterr().out  # the table is printed

    # again: nothing finished runs again; a run directory without results.json runs again
    unfinished = results / "runs" / "sft-poisoned-s1"
    (unfinished / "results.json").unlink()
    mtimes = {n: (results / "runs" / n / "results.json").stat().st_mtime_ns for n in names - {unfinished.name}}
    sweep.main(argv)
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 3 and "[2/4] sft-poisoned-s1: done" in out
    assert (unfinished / "results.json").exists()
    assert mtimes == {n: (results / "runs" / n / "results.json").stat().st_mtime_ns for n in mtimes}

    # other shared settings in the same results directory: refused before anything runs
    with pytest.raises(SystemExit) as e:
        sweep.main([*argv, "--n-train", "5"])
    assert "other settings" in str(e.value.code) and "n_train 4 -> 5" in str(e.value.code)


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tiny_checkpoint, tmp_path, capsys):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        sweep.main(["--methods", f"sft --task {tmp_path / 'missing.jsonl'},sft", "--scenarios", "benign", "--seeds", "0",
                    "--results", str(results), "--model", str(tiny_checkpoint), *FAST])
    assert str(e.value.code).startswith("1 of 2 runs failed")
    assert "FAILED" in capsys.readouterr().out
    good = results / "runs" / "sft-benign-s0"
    [bad] = [p for p in (results / "runs").iterdir() if p != good]
    assert bad.name.startswith("sft_task=") and bad.name in str(e.value.code)
    assert not (bad / "results.json").exists() and "missing.jsonl" in (bad / "train.log").read_text()
    assert (good / "results.json").exists()
    assert len((results / "summary.csv").read_text().splitlines()) == 2  # the header and the finished run


@pytest.mark.skipif("resume" not in vars(train.get_args([])), reason="train.py has no --resume")
def test_a_stopped_run_is_resumed_or_started_over(tiny_checkpoint, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--methods", "sft", "--scenarios", "benign", "--seeds", "0,1", "--results", str(results),
            "--model", str(tiny_checkpoint), *FAST, "--n-train", "8", "--ckpt-every", "1"]
    with pytest.raises(SystemExit) as e:
        sweep.main([*argv, "--stop-after", "1"])  # both runs stop after one of their two steps
    assert str(e.value.code).startswith("2 of 2 runs failed")
    s0, s1 = results / "runs" / "sft-benign-s0", results / "runs" / "sft-benign-s1"
    assert (s0 / "ckpt" / "manifest.json").exists() and not (s0 / "results.json").exists()
    (s1 / "ckpt" / "manifest.json").write_text("not json")  # a checkpoint that cannot be resumed
    capsys.readouterr()
    sweep.main([*argv, "--ckpt-every", "2"])  # --stop-after and --ckpt-every are not settings: the same table
    out = capsys.readouterr().out
    assert "[1/2] sft-benign-s0: resuming" in out and "[1/2] sft-benign-s0: done" in out
    assert "[2/2] sft-benign-s1: resuming failed" in out and "starting over" in out
    assert "[2/2] sft-benign-s1: done" in out
    assert (s0 / "results.json").exists() and (s1 / "results.json").exists() and not (s0 / "ckpt").exists()
    commands = [line for line in (s0 / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2  # each attempt's output follows its command line
    assert "--stop-after 1" in commands[0] and commands[0].endswith("--overwrite") and commands[1].endswith("--resume")
    commands = [line for line in (s1 / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert [c.split()[-1] for c in commands] == ["--overwrite", "--resume", "--overwrite"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sft,nope"], "unknown method"),
    (["--scenarios", "benign,evil"], "invalid choice: 'evil'"),
    (["--methods", "sft --alpha 1"], "unrecognized arguments: --alpha 1"),
    (["--seed", "1"], "--seed is set by the sweep"),
    (["--seeds", "0,x"], "comma-separated integers"),
])
def test_bad_input_is_one_line_error_before_anything_runs(tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        sweep.main([*argv, "--results", str(tmp_path / "results")])
    assert message in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "results").exists()


def test_a_results_directory_moves_between_clones(tmp_path, monkeypatch):
    """settings.json names the default checkpoint, not where this clone keeps it: the README's sweep command works in
    a clone elsewhere that holds the published results/; another --base-model is still another setting."""
    argv = ["--methods", "sft", "--results", str(tmp_path / "results")]
    for clone in ("a", "b"):
        monkeypatch.setattr(align, "BASE", tmp_path / clone / "checkpoints" / "base")
        monkeypatch.setattr(align, "ALIGNED", tmp_path / clone / "checkpoints" / "aligned")  # not built
        sweep.plan(*sweep.get_args(argv))
    assert json.loads((tmp_path / "results" / "settings.json").read_text())["base_model"] is None
    with pytest.raises(SystemExit) as e:
        sweep.plan(*sweep.get_args([*argv, "--base-model", str(tmp_path / "other")]))
    assert "other settings" in str(e.value.code) and "base_model None" in str(e.value.code)


def test_checkpoint_flags_are_not_settings():
    assert {"resume", "ckpt_every", "stop_after", "overwrite"} <= sweep.NOT_SETTINGS <= set(vars(train.get_args([])))


def test_run_names_differ_for_different_flags():
    assert sweep.run_name(["der"]) == "der"
    assert sweep.run_name(["der", "--alpha", "1"]) == sweep.run_name(["der", "--alpha=1"]) == "der_alpha=1"
    assert sweep.run_name(["der", "--alpha", "1"]) != sweep.run_name(["der", "--alpha", "2"])
    a, b = sweep.run_name(["sft", "--task", "a/b.jsonl"]), sweep.run_name(["sft", "--task", "a~b.jsonl"])
    assert a != b and "/" not in a


def write_run(results, name, method, scenario, seed, outcomes, start, train_seconds, start_sha256=None):
    """A results.json as train.py writes it, from per-prompt outcomes ({"asr": "0110..", ...}: the shares follow);
    outcomes None: a run from before outcomes were kept, with fixed shares (0.3, 0.2, no task)."""
    run = results / "runs" / name
    run.mkdir(parents=True)
    share = lambda s: s.count("1") / len(s)
    if outcomes:
        metrics = {"asr": share(outcomes["asr"]), "over_refusal": share(outcomes["over_refusal"]),
                   "task_accuracy": share(outcomes["task_accuracy"])}
        ci = {k: wilson(outcomes[k].count("1"), len(outcomes[k])) for k in metrics}
        last = {"outcomes": {k: [v] for k, v in outcomes.items()}}
    else:
        metrics, ci, last = {"asr": 0.3, "over_refusal": 0.2, "task_accuracy": None}, {}, {}
    (run / "results.json").write_text(json.dumps(dict(
        method=method, scenario=scenario, seed=seed, poison_ratio=0.1 if scenario == "poisoned" else 0.0, **metrics,
        ci=ci, train_seconds=train_seconds, total_seconds=train_seconds + 5, history=[last],
        start=dict(zip(("asr", "over_refusal", "task_accuracy"), start)), start_sha256=start_sha256)))


def test_summary_on_hand_written_results(tmp_path, capsys, monkeypatch):
    """Means over seeds with their intervals; the paired difference from sft marked only where it is sure."""
    results = tmp_path / "results"
    ones = lambda k, n=100: "1" * k + "0" * (n - k)
    sft = {0: {"asr": ones(50), "over_refusal": ones(10), "task_accuracy": ones(60)},
           1: {"asr": ones(70), "over_refusal": ones(30), "task_accuracy": ones(80)}}
    for seed, o in sft.items():
        write_run(results, f"sft-benign-s{seed}", "sft", "benign", seed, o, (0.25, 0.2, 0.1), 10 * (seed + 1))
        # der: the same answers but 20 harmful ones refused in each seed; lwf: sft's answers exactly
        write_run(results, f"der-benign-s{seed}", "der", "benign", seed, o | {"asr": ones(30 + 20 * seed)}, (0.25, 0.2, 0.1), 30)
        write_run(results, f"lwf-benign-s{seed}", "lwf", "benign", seed, o, (0.25, 0.2, 0.1), 30)
    write_run(results, "der_alpha=1-poisoned-s0", "der", "poisoned", 0, None, (0.25, 0.2, 0.1), 30)
    (results / "runs" / "unfinished-benign-s0").mkdir()  # no results.json: not in the table
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # not installed: the table is still written
        sweep.main(["--summarize-only", "--results", str(results)])
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (results / "safety_utility.png").exists()

    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # ordered by scenario, then the registry's method order, then seed; each run with its Wilson interval
    assert [(r["method"], r["seed"]) for r in rows][:4] == [("sft", "0"), ("sft", "1"), ("der", "0"), ("der", "1")]
    assert rows[0]["asr"] == "0.5" and [round(float(rows[0][k]), 4) for k in ("asr_lo", "asr_hi")] == [0.4038, 0.5962]
    assert rows[-1]["task_accuracy"] == "" and rows[-1]["asr_lo"] == "" and rows[-1]["poison_ratio"] == "0.1"
    md = (results / "summary.md").read_text()
    seeds, asr, d_asr, over, d_over, acc, d_acc, secs = md_cells(md, "sft", "benign")
    assert (seeds, secs, d_asr) == ("2", "15", "-") and asr.startswith("60.0 [") and acc.startswith("70.0 [")
    lo, hi = map(float, asr[6:-1].split(", "))
    assert 40 < lo < 60 < hi < 80  # seeds 50 and 70 apart: the interval spans the seeds' spread, not one seed's
    seeds, asr, d_asr, over, d_over, acc, d_acc, secs = md_cells(md, "der", "benign")
    assert asr.startswith("40.0 [") and d_asr.startswith("-20.0 [") and d_asr.endswith("] *")
    assert d_acc == "+0.0 [+0.0, +0.0]" and d_over == "+0.0 [+0.0, +0.0]"  # the same answers: no difference, no mark
    assert md_cells(md, "lwf", "benign")[2] == "+0.0 [+0.0, +0.0]"
    # a run without outcomes (an older train.py): its mean, no interval, no sft to pair with
    assert md_cells(md, "der_alpha=1", "poisoned") == ["1", "30.0", "-", "20.0", "-", "-", "-", "30"]
    # the starting model: one value per seed (seed 0's runs count once)
    assert md_cells(md, "starting model", "-")[:2] == ["2", "25.0"]
    with open(results / "comparison.csv") as f:
        table = {(r["method"], r["scenario"]): r for r in csv.DictReader(f)}
    assert table[("der", "benign")]["asr_vs_sft_significant"] == "True"
    assert table[("lwf", "benign")]["asr_vs_sft_significant"] == "False"

    if HAS_MATPLOTLIB:
        sweep.main(["--summarize-only", "--results", str(results)])
        assert (results / "safety_utility.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_from_two_starting_models_are_refused(tiny_checkpoint, tmp_path):
    """A rebuilt aligned model (a new recipe) keeps its directory: its runs must not join the old ones' table."""
    results, other = tmp_path / "results", "ab" * 32
    write_run(results, "sft-benign-s0", "sft", "benign", 0, None, (0.25, 0.2, 0.1), 10, start_sha256=other)
    write_run(results, "der-benign-s0", "der", "benign", 0, None, (0.25, 0.2, 0.1), 10)  # an older run: no hash
    sweep.main(["--summarize-only", "--results", str(results)])  # one starting model so far
    with pytest.raises(SystemExit) as e:  # before anything runs
        sweep.main(["--methods", "sft", "--scenarios", "poisoned", "--seeds", "0", "--results", str(results),
                    "--model", str(tiny_checkpoint), *FAST])
    assert "sft-benign-s0 started from a model with weights sha256 abababababab" in str(e.value.code)
    assert not (results / "runs" / "sft-poisoned-s0").exists()
    write_run(results, "lwf-benign-s0", "lwf", "benign", 0, None, (0.25, 0.2, 0.1), 10, start_sha256="cd" * 32)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--summarize-only", "--results", str(results)])
    assert "one starting model" in str(e.value.code) and "lwf-benign-s0" in str(e.value.code)


def test_summarize_only_without_runs_fails(tmp_path):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--summarize-only", "--results", str(tmp_path)])
    assert e.value.code


@pytest.mark.parametrize("content, message", [
    ('{"method": "sft", "scenario": "benign"', "not a results.json of train.py"),  # cut short
    ('{"method": "sft", "scenario": "benign", "seed": "0", "start": {}}', "field 'seed' is '0'"),
    ('{"method": "sft", "scenario": "benign", "seed": 0, "start": {}, "asr": "high"}', "field 'asr' is 'high'"),
])
def test_summarize_only_with_a_broken_results_json_is_one_line(tmp_path, content, message):
    (tmp_path / "runs" / "sft-benign-s0").mkdir(parents=True)
    (tmp_path / "runs" / "sft-benign-s0" / "results.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        sweep.main(["--summarize-only", "--results", str(tmp_path)])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in str(e.value.code)


def test_asr_per_benchmark_gets_its_own_columns(tiny_aligned, tmp_path):
    """Real runs with two --harmful sets: one ASR column per set in the summary, as the paper reports them."""
    results = tmp_path / "results"
    adv, txt = os.path.join(FIX, "advbench.csv"), os.path.join(FIX, "prompts.txt")  # refused; answered "Sure."
    flags = [f if f != os.path.join(FIX, "advbench.csv") else f"{adv},{txt}" for f in FAST]
    sweep.main(["--methods", "sft", "--scenarios", "benign", "--seeds", "0,1", "--results", str(results),
                "--model", str(tiny_aligned), *flags, "--max-new-tokens", "24"])  # bytes: room for "I cannot"
    runs = [json.loads((results / "runs" / f"sft-benign-s{s}" / "results.json").read_text()) for s in (0, 1)]
    assert all(set(r["asr_by_set"]) == {adv, txt} for r in runs)
    assert runs[0]["start_eval"]["asr_by_set"] == {adv: 0.0, txt: 1.0}  # the sets differ: a mixed-up column would show
    n = runs[0]["start_eval"]["n_by_set"]  # the outcomes are in prompt order: every refused one first, then the answered
    assert runs[0]["start_eval"]["outcomes"]["asr"] == ["0" * n[adv] + "1" * n[txt]]
    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for row, run in zip(rows, runs):
        assert float(row[f"asr {adv}"]) == run["asr_by_set"][adv] and float(row[f"asr {txt}"]) == run["asr_by_set"][txt]
        assert float(row["asr mean of sets"]) == pytest.approx(run["asr_mean_of_sets"])
    md = (results / "summary.md").read_text()
    assert f"| method | scenario | asr {adv} | asr {txt} | asr mean of sets |" in md

def test_a_sequence_shows_what_the_later_task_made_the_model_forget(tmp_path):
    results = tmp_path / "results"
    for seed, (a1, a2) in enumerate([(0.7, 0.4), (0.9, 0.6)]):
        write_run(results, f"sft-benign-s{seed}", "sft", "benign", seed, None, (0.1, 0.1, 0.0), 10)
        path = results / "runs" / f"sft-benign-s{seed}" / "results.json"
        r = json.loads(path.read_text())
        r["history"] = [{"task": "tickets", "asr": 0.5, "task_accuracy_by_task": {"tickets": a1}},
                        {"task": "dates", "asr": 0.6, "task_accuracy_by_task": {"tickets": a2, "dates": 0.9}}]
        path.write_text(json.dumps(r))
    sweep.main(["--summarize-only", "--results", str(results)])
    md = (results / "summary.md").read_text()
    header = next(l for l in md.splitlines() if "after 1 tickets: asr" in l)
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = md_cells(md.split(header)[1], "sft", "benign")
    got = dict(zip(cols[2:], row))
    assert got["after 1 tickets: tickets acc"] == "80.0" and got["after 2 dates: tickets acc"] == "50.0"  # forgotten: 30
    assert got["after 2 dates: dates acc"] == "90.0" and got["after 2 dates: asr"] == "60.0"


def test_several_judges_get_their_columns_and_agreement(tmp_path):
    """A run judged twice (train.py --judge a,b or eval.py --rejudge): each judge's ASR and the pair's agreement and
    kappa of the last stage, averaged over seeds."""
    results = tmp_path / "results"
    for seed, (k, g, agree, kappa) in enumerate([(0.5, 0.3, 0.8, 0.6), (0.7, 0.5, 0.6, 0.2)]):
        write_run(results, f"sft-benign-s{seed}", "sft", "benign", seed, None, (0.1, 0.1, 0.0), 10)
        path = results / "runs" / f"sft-benign-s{seed}" / "results.json"
        r = json.loads(path.read_text())
        report = lambda a, b: {"asr": {"keyword": {"asr": a}, "guard": {"asr": b}},
                               "agreement": {"keyword vs guard": {"agreement": agree, "kappa": kappa, "disagreements": []}}}
        r["judges"] = {"start": report(0.0, 0.0), "after 1 tickets": report(k, g)}  # the last stage counts
        path.write_text(json.dumps(r))
    sweep.main(["--summarize-only", "--results", str(results)])
    md = (results / "summary.md").read_text()
    header = next(l for l in md.splitlines() if "asr judge keyword" in l)
    cols = [c.strip() for c in header.strip("|").split("|")][2:]
    got = dict(zip(cols, md.split(header)[1].split("\n")[2].strip("|").split("|")[2:]))
    assert got["asr judge keyword"].strip() == "60.0" and got["asr judge guard"].strip() == "40.0"
    header = next(l for l in md.splitlines() if "kappa keyword vs guard" in l)
    assert md.split(header)[1].split("\n")[2] == "| sft | benign | 70.0 | 0.40 |"


def test_forgetting_curves_join_the_tasks_and_are_plotted(tmp_path):
    history = [{"task": "tickets", "curve": [[0, 0.1], [2, 0.5], [3, 0.6]]}, {"task": "dates", "curve": [[0, 0.6], [2, 0.4]]}]
    assert sweep.curve_of(history) == [(0, 0.1), (2, 0.5), (3, 0.6), (5, 0.4)]  # dates' step 0 is tickets' step 3
    assert sweep.curve_of([{"task": "tickets"}]) == []
    results = tmp_path / "results"
    write_run(results, "sft-benign-s0", "sft", "benign", 0, None, (0.1, 0.1, 0.0), 10)
    path = results / "runs" / "sft-benign-s0" / "results.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"history": history}))
    sweep.main(["--summarize-only", "--results", str(results)])
    if HAS_MATPLOTLIB:
        assert (results / "forgetting_benign.png").read_bytes()[:4] == b"\x89PNG"


def test_jobs_2_gives_the_table_of_jobs_1(tiny_checkpoint, tmp_path):
    """Two runs at once, each on its own core (one thread each), give the same numbers as one at a time."""
    def table(jobs):
        results = tmp_path / f"jobs{jobs}"
        sweep.main(["--methods", "sft,replay", "--scenarios", "poisoned", "--seeds", "0", "--jobs", str(jobs),
                    "--results", str(results), "--model", str(tiny_checkpoint), *FAST])
        with open(results / "summary.csv") as f:
            return [{k: v for k, v in r.items() if k not in ("train_seconds", "total_seconds", "out")} for r in csv.DictReader(f)]
    assert table(2) == table(1) and len(table(1)) == 2


def test_jobs_are_checked(tmp_path, capsys):
    for jobs, message in (("0", "--jobs must be at least 1"), ("99", "--jobs 99: only")):
        with pytest.raises(SystemExit) as e:
            sweep.main(["--methods", "sft", "--jobs", jobs, "--results", str(tmp_path), "--device", "cpu", "--model", "x"])
        assert message in str(e.value.code) + capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written
