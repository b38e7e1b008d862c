"""Safety and utility evaluation of any checkpoint: ASR, over-refusal, task accuracy.

    python eval.py --model DIR [--adapter DIR] [--harmful NAMES_OR_FILES] [--task NAME] [--judge J] --out results.json
    python eval.py --rejudge RUN_DIR_OR_RESULTS --judge J        # the kept answers, judged again

Answers come from batched greedy generation with the KV cache; a judge (judges.py: keyword, Llama Guard, or
several) decides which answers to harmful prompts are harmful, ASR being the share judged harmful.
Over-refusal = share of benign-but-sensitive prompts (XSTest-style) answered with a refusal phrase,
whatever the judge (Llama Guard judges harm, not refusal). results.json counts a model judge's categories
(judge_categories) and unparsed replies (judge_parse_failures).
Task accuracy: a metric per task format (task_metric): the final number for arithmetic and GSM8K,
the first label word for SST-2 and AG News, exact match otherwise (tickets, dates). A built-in task's
answers are as long as its task needs (tasks.ANSWER_TOKENS), any other task's 80 tokens.
"""
import argparse
import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch

import data
from cli import default_dtype, describe_dtype, one_line_errors
from files import atomic_write, write_json
from formats import AGNEWS_LABELS, SST2_LABELS, detect_format
from generate import complete
from intervals import outcome_string, run_interval
from judges import GUARD_CATEGORIES, KeywordJudge, answer_tokens, is_refusal, judge_report, make_judge
from lora import load_adapter
from model import Transformer
from tasks import ANSWER_TOKENS
from tokenizer import Tokenizer

def answer(model, tok, prompts, max_new_tokens=64, batch_size=64, desc="generating", decode_step=None):
    """Greedy answers to a list of user prompts, in their order."""
    ids = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    return complete(model, tok, ids, max_new_tokens, batch_size, desc, decode_step)


def check_lengths(tok, prompts, max_new_tokens, max_seq_len):
    """Each prompt ({"prompt", "where"}) and its answer fit the model's context: found before any generation."""
    for p in prompts:
        n = len(tok.encode_chat([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True))
        if n + max_new_tokens > max_seq_len:
            raise ValueError(f"{p.get('where', 'a prompt')}: a prompt of {n} tokens + {max_new_tokens} new tokens exceeds "
                             f"the model's context ({max_seq_len})")


def _category(h):
    """A harmful prompt's category for the per-category ASR, prefixed by its set when eval.py names it."""
    c, s = h.get("category"), h.get("set")
    return f"{s}/{c}" if s and c else c or s or "-"


@torch.no_grad()
def evaluate(model, tok, harmful=(), sensitive=(), tasks=None, judge=None, max_new_tokens=64, batch_size=64,
             task_max_new_tokens=80, keep_samples=5, decode_step=None):
    """Metrics dict for one model. harmful/sensitive: lists of {"prompt", "category"}; tasks: {name: (examples, metric)}.

    judge: a judge or a list of them; the first decides "asr", every one is reported under "judges" with the
    agreement of each pair (judge_report). res["answers"] keeps every prompt, answer and verdict (one dict each:
    train.py writes them to answers.jsonl). decode_step: a compiled `model` for the one-token decoding steps
    (train.py --compile; see generate.py)."""
    judges = list(judge) if isinstance(judge, (list, tuple)) else [judge or KeywordJudge()]
    model.eval()
    res, t0, rows = {"judge": judges[0].name, "answer_tokens": max_new_tokens}, time.time(), []
    if harmful:
        prompts = [h["prompt"] for h in harmful]
        answers = answer(model, tok, prompts, max_new_tokens, batch_size, "harmful prompts", decode_step)
        all_verdicts = {j.name: j.assess(prompts, answers) for j in judges}
        verdicts = all_verdicts[judges[0].name]
        bad = [v["harmful"] for v in verdicts]
        res["asr"], res["n_harmful"] = sum(bad) / len(bad), len(bad)
        res["outcomes"] = {"asr": [outcome_string(bad)]}
        for key, group in (("category", _category), ("set", lambda h: h.get("set")), ("style", lambda h: h.get("style"))):
            n, hits = Counter(map(group, harmful)), Counter()
            for h, b in zip(harmful, bad):
                hits[group(h)] += b
            if key == "category" or None not in n:  # by the prompts' categories; by set and style where every prompt has one
                res[f"asr_by_{key}"] = {c: hits[c] / k for c, k in sorted(n.items())}
                res[f"n_by_{key}"] = dict(sorted(n.items()))
        if len(res.get("asr_by_set", {})) > 1:  # the paper averages over benchmarks, not over prompts
            res["asr_mean_of_sets"] = sum(res["asr_by_set"].values()) / len(res["asr_by_set"])
        if any(v["reply"] is not None for v in verdicts):  # a model judge: its categories, its failures
            flagged = Counter(c for v in verdicts for c in dict.fromkeys(v["categories"]))
            res["judge_categories"] = {f"{c} {GUARD_CATEGORIES.get(c, '?')}": flagged[c] for c in
                                       sorted(flagged, key=lambda c: int(c[1:]))}
            res["judge_parse_failures"] = sum(not v["parsed"] for v in verdicts)
        res["harmful_samples"] = [{"prompt": h["prompt"], "answer": a, "harmful": v["harmful"]} |
                                  ({"judge_reply": v["reply"]} if v["reply"] is not None else {})
                                  for h, a, v in list(zip(harmful, answers, verdicts))[:keep_samples]]
        rows += [{"set": "harmful", "prompt": h["prompt"], "answer": a, "category": _category(h), "style": h.get("style"),
                  "verdicts": {name: vs[i]["harmful"] for name, vs in all_verdicts.items()},
                  **({"judge_replies": {name: vs[i]["reply"] for name, vs in all_verdicts.items() if vs[i]["reply"] is not None}}
                     if any(vs[i]["reply"] is not None for vs in all_verdicts.values()) else {})}
                 for i, (h, a) in enumerate(zip(harmful, answers))]
        if len(judges) > 1:
            res["judges"] = judge_report([r for r in rows if r["set"] == "harmful"], max_new_tokens)
    if sensitive:
        answers = answer(model, tok, [s["prompt"] for s in sensitive], max_new_tokens, batch_size, "sensitive prompts", decode_step)
        refused = list(map(is_refusal, answers))
        res["over_refusal"], res["n_sensitive"] = sum(refused) / len(refused), len(refused)
        res.setdefault("outcomes", {})["over_refusal"] = [outcome_string(refused)]
        res["sensitive_samples"] = [{"prompt": s["prompt"], "answer": a} for s, a in list(zip(sensitive, answers))[:keep_samples]]
        rows += [{"set": "sensitive", "prompt": s["prompt"], "answer": a, "refusal": r} for s, a, r in zip(sensitive, answers, refused)]
    for name, (examples, metric) in (tasks or {}).items():
        n_new = ANSWER_TOKENS.get(name, task_max_new_tokens)
        answers = answer(model, tok, [e["prompt"] for e in examples], n_new, batch_size, f"task {name}", decode_step)
        right = [bool(metric(a, e)) for a, e in zip(answers, examples)]
        res.setdefault("task_accuracy_by_task", {})[name] = sum(right) / len(right)
        res.setdefault("outcomes", {}).setdefault("task_accuracy", []).append(outcome_string(right))
        res.setdefault("task_samples", {})[name] = [{"prompt": e["prompt"], "answer": a} for e, a in list(zip(examples, answers))[:keep_samples]]
        rows += [{"set": "task", "task": name, "prompt": e["prompt"], "answer": a, "reference": e.get("response"), "correct": r}
                 for e, a, r in zip(examples, answers, right)]
    if tasks:
        accs = res["task_accuracy_by_task"].values()
        res["task_accuracy"] = sum(accs) / len(accs)
    res["ci"] = {k: run_interval(groups) for k, groups in res.get("outcomes", {}).items()}  # 95%, intervals.py
    model.clear_cache()  # a compiled decode step keeps its caches between batches; training needs the memory
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["answers"] = rows
    return res


# ----------------------------------------------------------------------------- task metrics
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after the last 'The final answer is' (GSM8K convention), else the last number."""
    tail = re.split(r"final answer is", text, flags=re.I)
    m = _NUM.search(tail[-1]) if len(tail) > 1 else None
    m = m or ([*_NUM.finditer(text)] or [None])[-1]
    return m.group().replace(",", "") if m else None


def _number_metric(output: str, example: dict) -> bool:
    got = final_number(output)
    try:
        return got is not None and abs(float(got) - float(example["answer"])) < 1e-6
    except ValueError:  # "-" or "1.2.3" slipped through the regex
        return False


_LABEL_PATTERNS = {"positive": r"positive", "negative": r"negative", "World": r"world",
                   "Sports": r"sports?", "Business": r"business",
                   "Sci/Tech": r"sci(?:ence)?\s*[/&-]?\s*tech(?:nology)?|science|technology"}


def _label_metric(labels):
    def metric(output: str, example: dict) -> bool:
        """Correct if the first label word in the output is the right one."""
        hits = [(m.start(), lab) for lab in labels
                if (m := re.search(rf"\b(?:{_LABEL_PATTERNS[lab]})\b", output, re.I))]
        return bool(hits) and min(hits)[1] == example["answer"]
    return metric


def _exact_metric(output: str, example: dict) -> bool | None:
    if example.get("answer") is None:
        return None
    norm = lambda s: " ".join(s.split()).casefold()
    return norm(output) == norm(example["answer"])


def task_metric(spec: str):
    """(output_text, example) -> bool (None where the example has no reference answer)."""
    if spec in data.TASKS and spec != "arithmetic":
        return _exact_metric
    fmt = spec if spec in ("arithmetic", "gsm8k", "sst2", "agnews") else detect_format(spec)
    if fmt in ("arithmetic", "gsm8k"):
        return _number_metric
    if fmt in ("sst2", "agnews"):
        return _label_metric(SST2_LABELS if fmt == "sst2" else AGNEWS_LABELS)
    return _exact_metric


# ----------------------------------------------------------------------------- printing and the command line
def fmt(x):
    return "-" if x is None else f"{100 * x:5.1f}"


def with_ci(m, key):
    """'23.1 [16.6, 31.0]': a number and its 95% interval, in %."""
    if m.get(key) is None:
        return "-"
    lo, hi = m.get("ci", {}).get(key, (None, None))
    return fmt(m[key]).strip() + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else "")


def print_table(rows):
    """rows: [(label, metrics)] -> a fixed-width table of ASR / over-refusal / task accuracy, in %, each with its
    95% interval (Wilson; intervals.py)."""
    print(f"{'model':<36} {'ASR % [95% CI]':>20} {'over-refusal %':>20} {'task acc %':>20}")
    for label, m in rows:
        print(f"{label:<36} " + " ".join(f"{with_ci(m, k):>20}" for k in ("asr", "over_refusal", "task_accuracy")))


def print_details(m):
    """The per-set and per-category ASR, the judge's categories, over-refusal and each task's accuracy."""
    print(f"judge: {m['judge']}" + (f" ({m['judge_parse_failures']} replies not parsed, counted safe)"
                                    if "judge_parse_failures" in m else ""))
    for key in ("set", "style", "category"):
        if len(m.get(f"asr_by_{key}", {})) > 1:
            print(f"  {key:<36} {'n':>5} {'ASR %':>7}")
            for c, asr in m[f"asr_by_{key}"].items():
                print(f"  {c[:36]:<36} {m[f'n_by_{key}'][c]:>5} {fmt(asr):>7}")
    if m.get("judge_categories"):
        print("  judge's categories (answers flagged): " + ", ".join(f"{c} {k}" for c, k in m["judge_categories"].items()))
    if "over_refusal" in m:
        print(f"  over-refusal {fmt(m['over_refusal']).strip()}%")
    for t, acc in m.get("task_accuracy_by_task", {}).items():
        print(f"  task {t}: accuracy {fmt(acc).strip()}%")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--rejudge", metavar="PATH", help="judge the kept answers again with --judge, generating nothing: a run "
                   "directory, a results file, or a directory of runs (a sweep's results/)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) to apply")
    p.add_argument("--harmful", default="harmful-test", help="comma-separated built-in names, benchmark names "
                   f"({', '.join(n for n in data.BENCHMARKS if 'train' not in data.BENCHMARKS[n])}) or files (default harmful-test)")
    p.add_argument("--sensitive", default="sensitive-test", help="benign-but-sensitive prompts ('' to skip)")
    p.add_argument("--task", default="tickets", help="comma-separated: tickets, dates, arithmetic, gsm8k, sst2, agnews "
                   "or files ('' to skip)")
    p.add_argument("--n-task", type=int, default=200, help="task test examples (default 200)")
    p.add_argument("--data-dir", help="where benchmark names are read (default $UNFORGOTTEN_DATA, else data/public; "
                   "fill it with `python download.py NAME`)")
    p.add_argument("--judge", default="keyword", help="keyword (default) or llama-guard:DIR, a Llama-Guard-3 checkpoint; "
                   "several comma-separated: the first decides ASR, each is reported with their agreement")
    p.add_argument("--max-new-tokens", type=int, help="answer length for the safety evaluation (default 32; 512 with a "
                   "Llama-Guard judge, the peers' protocol; as train.py)")
    p.add_argument("--batch-size", type=int, default=64, help="generation batch size, of the judge too")
    p.add_argument("--chat-format", help="override the chat format read from the checkpoint")
    p.add_argument("--thinking", action="store_true", help="qwen3: let the model think (the generation prompt without "
                   "the empty <think></think> block that turns thinking off by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 weights (default on CUDA and on CPUs with AVX512-BF16 "
                   "or AMX, as train.py); fp32 elsewhere")
    p.add_argument("--out", help="write the metrics here as JSON")
    args = p.parse_args(argv)
    if not args.model and not args.rejudge:
        p.error("--model is required (or --rejudge PATH)")
    args.max_new_tokens = answer_tokens(args.judge, args.max_new_tokens)
    for flag in ("n_task", "max_new_tokens", "batch_size"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    with one_line_errors():
        check_device(args.device)
        if args.rejudge:
            dtype = torch.bfloat16 if (args.dtype or default_dtype(args.device)) == "bf16" else torch.float32
            return rejudge(Path(args.rejudge), make_judge(args.judge, args.device, dtype, args.batch_size))
        args.dtype = args.dtype or default_dtype(args.device)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        print(describe_dtype(args.dtype, args.device))
        if args.out:
            check_out_file(args.out)
        judge = make_judge(args.judge, args.device, dtype, args.batch_size)
        specs = [s for s in args.harmful.split(",") if s]
        harmful = [dict(h, set=spec) for spec in specs for h in data.load_prompts(spec, args.data_dir)]
        sensitive = data.load_prompts(args.sensitive, args.data_dir) if args.sensitive else []
        tasks = {t: (data.load_task(t, "test", args.n_task, data_dir=args.data_dir), task_metric(t))
                 for t in args.task.split(",") if t}
        tok = Tokenizer.from_pretrained(args.model, chat_format=args.chat_format, thinking=args.thinking)
        model = Transformer.from_pretrained(args.model, device=args.device, dtype=dtype)
        check_lengths(tok, harmful + sensitive, args.max_new_tokens, model.config.max_seq_len)
        if args.adapter:
            load_adapter(model, args.adapter)
        res = evaluate(model, tok, harmful, sensitive, tasks, judge, args.max_new_tokens, args.batch_size)
    files = [f for spec in [*specs, args.sensitive, *args.task.split(",")] if spec for f in data.files_of(spec, args.data_dir)]
    res = {"model": args.model, "adapter": args.adapter, "harmful": args.harmful, **res,
           "data_hashes": {str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}}
    answers = res.pop("answers")
    print_table([(args.adapter or args.model, res)])
    print_details(res)
    if args.out:
        with one_line_errors():
            write_jsonl(answers_file(Path(args.out)), [{"stage": "eval", **r} for r in answers])
            write_json(args.out, res)
        print(f"wrote {args.out} and {answers_file(Path(args.out))}")
    return res


# ----------------------------------------------------------------------------- judging kept answers again
def answers_file(results: Path) -> Path:
    """Where a results file's answers are kept: a run's answers.jsonl beside its results.json; X.answers.jsonl for X.json."""
    return results.with_name("answers.jsonl" if results.name == "results.json" else f"{results.stem}.answers.jsonl")


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_jsonl(path):
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e.msg})") from None
    return rows


def judges_by_stage(rows, answer_tokens):
    """{stage: judge_report} over the harmful rows of a run's kept answers."""
    harmful = [r for r in rows if r["set"] == "harmful"]
    return {stage: judge_report([r for r in harmful if r["stage"] == stage], answer_tokens)
            for stage in dict.fromkeys(r["stage"] for r in harmful)}


def rejudge(path: Path, judges):
    """Assess the kept answers of one run, or of every run under path, with judges again; each judge's numbers and the
    agreement of every pair of judges go into results.json ("judges", per stage) beside the old ones."""
    if path.is_file():
        results = [path]
    elif (path / "results.json").exists():
        results = [path / "results.json"]
    else:
        results = sorted(r for r in path.rglob("*.json") if answers_file(r).exists())
    if not results:
        raise ValueError(f"--rejudge {path}: no results with kept answers there (runs kept their answers from 2026-12 on)")
    loaded = []
    for r in results:  # everything read and checked before anything is judged or written
        if not answers_file(r).exists():
            raise ValueError(f"--rejudge {r}: no {answers_file(r).name} beside it (runs kept their answers from 2026-12 on)")
        try:
            loaded.append((r, json.loads(r.read_text()), read_jsonl(answers_file(r))))
        except json.JSONDecodeError as e:
            raise ValueError(f"{r}: not JSON ({e.msg}, line {e.lineno})") from None
    for r, res, rows in loaded:
        harmful = [row for row in rows if row["set"] == "harmful"]
        for judge in judges:
            for row, v in zip(harmful, judge.assess([x["prompt"] for x in harmful], [x["answer"] for x in harmful])):
                row["verdicts"][judge.name] = v["harmful"]
                if v["reply"] is not None:
                    row.setdefault("judge_replies", {})[judge.name] = v["reply"]
        res["judges"] = judges_by_stage(rows, res.get("answer_tokens") or res.get("config", {}).get("max_new_tokens"))
        write_jsonl(answers_file(r), rows)
        write_json(r, res)
        for stage, report in res["judges"].items():
            asr = ", ".join(f"{j} {100 * x['asr']:.1f}%" for j, x in report["asr"].items())
            agree = "; ".join(f"{pair}: agree {100 * x['agreement']:.1f}%, kappa {fmt_kappa(x['kappa'])}, "
                              f"{len(x['disagreements'])} disagreements" for pair, x in report["agreement"].items())
            print(f"{r} [{stage}]: ASR {asr}" + (f"; {agree}" if agree else ""))
    return results


def fmt_kappa(k):
    return "-" if k is None else f"{k:.2f}"


def check_out_file(out):
    """--out is a file path this user can create or replace (its folders are made as needed)."""
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise ValueError(f"--out {out}: a directory; give a file path")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write there ({parent} is not a writable directory)")


def check_device(device):
    """--device names a device this torch has (train.py and eval.py)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available to this torch ({torch.__version__})")


if __name__ == "__main__":
    main()
