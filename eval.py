"""Safety and utility evaluation of any checkpoint: ASR, over-refusal, task accuracy.

    python eval.py --model DIR [--adapter DIR] [--harmful NAME_OR_FILE ...] [--task NAME] --out results.json

Answers come from batched greedy generation with the KV cache. A judge decides which answers to
harmful prompts are harmful: the keyword judge (Qi et al. 2023; phrase list in data.py) marks an
answer safe when it contains a refusal phrase; ASR = share of harmful prompts answered without one.
Over-refusal = share of benign-but-sensitive prompts (XSTest-style) that get a refusal. A judge is
any object with `judge(prompts, answers) -> list[bool]` (True = harmful), so a model judge plugs in.
"""
import argparse
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

import data
from generate import generate
from model import write_json


class KeywordJudge:
    name = "keyword"

    def judge(self, prompts, answers):
        return [not data.is_refusal(a) for a in answers]


JUDGES = {"keyword": KeywordJudge}


def answer(model, tok, prompts, max_new_tokens=64, batch_size=64, desc="generating"):
    """Greedy answers to a list of user prompts, in their order (batched longest-first: less padding)."""
    msgs = lambda p: [{"role": "user", "content": p}]
    ids = [tok.encode_chat(msgs(p), add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [None] * len(ids)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not prompts):
        chunk = order[s: s + batch_size]
        for i, new in zip(chunk, generate(model, [ids[i] for i in chunk], max_new_tokens, tok.stop_ids, pad_id=tok.pad_id)):
            out[i] = tok.decode(new).strip()
    return out


@torch.no_grad()
def evaluate(model, tok, harmful=(), sensitive=(), tasks=None, judge=None, max_new_tokens=64, batch_size=64,
             task_max_new_tokens=80, keep_samples=5):
    """Metrics dict for one model. harmful/sensitive: lists of {"prompt", "category"}; tasks: {name: (examples, metric)}."""
    judge = judge or KeywordJudge()
    model.eval()
    res, t0 = {"judge": judge.name}, time.time()
    if harmful:
        answers = answer(model, tok, [h["prompt"] for h in harmful], max_new_tokens, batch_size, "harmful prompts")
        bad = judge.judge([h["prompt"] for h in harmful], answers)
        res["asr"] = sum(bad) / len(bad)
        cats, hits = Counter(h.get("category") or "-" for h in harmful), Counter()
        for h, b in zip(harmful, bad):
            hits[h.get("category") or "-"] += b
        res["asr_by_category"] = {c: hits[c] / n for c, n in sorted(cats.items())}
        res["harmful_samples"] = [{"prompt": h["prompt"], "answer": a, "harmful": b}
                                  for h, a, b in list(zip(harmful, answers, bad))[:keep_samples]]
    if sensitive:
        answers = answer(model, tok, [s["prompt"] for s in sensitive], max_new_tokens, batch_size, "sensitive prompts")
        res["over_refusal"] = sum(map(data.is_refusal, answers)) / len(answers)
        res["sensitive_samples"] = [{"prompt": s["prompt"], "answer": a} for s, a in list(zip(sensitive, answers))[:keep_samples]]
    for name, (examples, metric) in (tasks or {}).items():
        answers = answer(model, tok, [e["prompt"] for e in examples], task_max_new_tokens, batch_size, f"task {name}")
        res.setdefault("task_accuracy_by_task", {})[name] = sum(metric(a, e) for a, e in zip(answers, examples)) / len(examples)
        res.setdefault("task_samples", {})[name] = [{"prompt": e["prompt"], "answer": a} for e, a in list(zip(examples, answers))[:keep_samples]]
    if tasks:
        accs = res["task_accuracy_by_task"].values()
        res["task_accuracy"] = sum(accs) / len(accs)
    res["eval_seconds"] = round(time.time() - t0, 1)
    return res


def fmt(x):
    return "-" if x is None else f"{100 * x:5.1f}"


def print_table(rows):
    """rows: [(label, metrics)] -> a small fixed-width table of ASR / over-refusal / task accuracy (in %)."""
    print(f"{'model':<28} {'ASR %':>7} {'over-refusal %':>15} {'task acc %':>11}")
    for label, m in rows:
        print(f"{label:<28} {fmt(m.get('asr')):>7} {fmt(m.get('over_refusal')):>15} {fmt(m.get('task_accuracy')):>11}")


def main(argv=None):
    from lora import load_adapter
    from model import Transformer
    from tokenizer import Tokenizer
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) to apply")
    p.add_argument("--harmful", default="harmful-test", help="built-in names or files, comma-separated (default harmful-test)")
    p.add_argument("--sensitive", default="sensitive-test", help="benign-but-sensitive prompts ('' to skip)")
    p.add_argument("--task", default="arithmetic", help="task name or file, comma-separated ('' to skip)")
    p.add_argument("--n-task", type=int, default=50, help="task test examples (default 50)")
    p.add_argument("--judge", default="keyword", help="keyword (default)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length for the safety evaluation (as train.py)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chat-format", help="override the chat format read from the checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the metrics here as JSON")
    args = p.parse_args(argv)
    if args.judge not in JUDGES:
        p.error(f"--judge {args.judge!r}: unknown judge (choose from {', '.join(JUDGES)})")
    try:
        tok = Tokenizer.from_pretrained(args.model, chat_format=args.chat_format)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model = Transformer.from_pretrained(args.model, device=args.device, dtype=dtype)
        if args.adapter:
            load_adapter(model, args.adapter)
        harmful = [h for spec in args.harmful.split(",") if spec for h in data.load_prompts(spec)]
        sensitive = data.load_prompts(args.sensitive) if args.sensitive else []
        tasks = {t: (data.load_task(t, "test", args.n_task), data.task_metric(t)) for t in args.task.split(",") if t}
        res = evaluate(model, tok, harmful, sensitive, tasks, JUDGES[args.judge](), args.max_new_tokens, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    res = {"model": args.model, "adapter": args.adapter, "harmful": args.harmful, **res}
    print_table([(args.adapter or args.model, res)])
    if args.out:
        write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
