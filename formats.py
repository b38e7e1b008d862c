"""Readers for the public data formats: a file (or a HEx-PHI directory) -> (format, uniform records).

AdvBench, HEx-PHI, HarmBench, DirectHarm4, BeaverTails, GSM8K, SST-2, AG News, chat JSONL, instruction
(Alpaca) JSONL, this project's prompt JSONL (data/*.jsonl) and plain text. The format is detected from
the fields of a header row or of the first JSON object. A malformed row raises DataError("FILE:LINE:
what"); data.py builds the experiment's prompt sets, tasks and safety memory from these records.
"""
import csv
import io
import json
import re
from pathlib import Path


class DataError(ValueError):
    """A data file is missing, empty or malformed. The message reads 'FILE:LINE: what is wrong'."""


FORMATS = ("advbench", "hexphi", "harmbench", "directharm4", "beavertails", "gsm8k", "sst2",
           "agnews", "chat", "instruction", "prompts", "text")
PROMPT_ONLY = {"advbench", "hexphi", "harmbench", "directharm4", "text"}
# Detection by the fields of a header row or of the first JSON object, first match wins.
_BY_FIELDS = [("chat", {"messages"}), ("advbench", {"goal"}), ("harmbench", {"behavior"}),
              ("instruction", {"instruction", "output"}), ("directharm4", {"instruction"}),
              ("gsm8k", {"question", "answer"}), ("beavertails", {"prompt", "is_safe"}),
              ("sst2", {"sentence", "label"}), ("agnews", {"text", "label"}), ("prompts", {"prompt"})]
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative."
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories: "
                      "World, Sports, Business, Sci/Tech. Respond with the category only.")


def read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _text(v, where, name) -> str:
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(v).__name__}")
    v = v.strip()
    if not v:
        raise DataError(f"{where}: field '{name}' is empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field '{name}' holds invalid unicode") from None
    return v


def _req(rec, name, where) -> str:
    if name not in rec:
        raise DataError(f"{where}: missing field '{name}'")
    return _text(rec[name], where, name)


def _opt(rec, name, where):
    v = rec.get(name)
    return None if v is None or (isinstance(v, str) and not v.strip()) else _text(v, where, name)


def _label(v, labels, where, offset=0) -> str:
    idx = None
    if isinstance(v, int) and not isinstance(v, bool):
        idx = v - offset
    elif isinstance(v, str):
        s = v.strip()
        if re.fullmatch(r"-?\d{1,3}", s):
            idx = int(s) - offset
        elif s.lower() in [l.lower() for l in labels]:
            idx = [l.lower() for l in labels].index(s.lower())
    if idx is None or not 0 <= idx < len(labels):
        ok = ", ".join(str(i + offset) for i in range(len(labels)))
        raise DataError(f"{where}: label {_short(v)} is not one of {ok} or {'/'.join(labels)}")
    return labels[idx]


def _record(where, prompt, response=None, answer=None, category=None, **extra) -> dict:
    return dict(where=where, prompt=prompt, response=response, answer=answer, category=category,
                is_safe=None, messages=None, split=None) | extra


def _gsm8k_answer(text, where):
    if "####" not in text:
        raise DataError(f"{where}: GSM8K answer has no '#### N' line")
    body, num = text.rsplit("####", 1)
    num = num.strip().replace(",", "")
    if not re.fullmatch(r"-?\d+(\.\d+)?", num):
        raise DataError(f"{where}: GSM8K final answer {_short(num)} is not a number")
    body = re.sub(r"<<[^<>]*>>", "", body).strip()  # calculator annotations: <<48/2=24>>
    return (body + "\n" if body else "") + f"The final answer is {num}.", num


def _chat(rec, where):
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {i} needs a role of system, user or assistant")
        out.append({"role": m["role"], "content": _req(m, "content", where)})
    response = out.pop()["content"] if out[-1]["role"] == "assistant" else None
    users = [m["content"] for m in out if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: no user message")
    return _record(where, users[-1], response, answer=_opt(rec, "answer", where), messages=out)


def _is_safe(v, where) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise DataError(f"{where}: 'is_safe' must be true or false, got {_short(v)}")


def _convert(fmt, rec, where) -> dict:
    """One row (a dict with lower-case keys) of a known format -> a uniform record."""
    if fmt == "chat":
        return _chat(rec, where)
    if fmt == "advbench":
        return _record(where, _req(rec, "goal", where))
    if fmt == "harmbench":  # contextual behaviours are shown as in HarmBench: context, ---, request
        b, ctx = _req(rec, "behavior", where), _opt(rec, "contextstring", where)
        cat = _opt(rec, "semanticcategory", where) or _opt(rec, "category", where)
        return _record(where, f"{ctx}\n\n---\n\n{b}" if ctx else b, category=cat)
    if fmt == "instruction":
        inst, inp = _req(rec, "instruction", where), _opt(rec, "input", where)
        return _record(where, inst + (f"\n\n{inp}" if inp else ""), _req(rec, "output", where),
                       answer=_opt(rec, "answer", where), category=_opt(rec, "category", where))
    if fmt == "directharm4":
        return _record(where, _req(rec, "instruction", where), category=_opt(rec, "category", where))
    if fmt == "gsm8k":
        response, num = _gsm8k_answer(_req(rec, "answer", where), where)
        return _record(where, _req(rec, "question", where), response, num)
    if fmt == "beavertails":  # category: a string, or BeaverTails' dict of harm-name -> bool
        cat = rec.get("category")
        if isinstance(cat, dict):
            cat = "; ".join(str(k) for k, v in cat.items() if v is True) or None
        elif cat is not None:
            cat = _opt(rec, "category", where)
        return _record(where, _req(rec, "prompt", where), _req(rec, "response", where),
                       category=cat, is_safe=_is_safe(rec.get("is_safe"), where))
    if fmt == "sst2":
        label = _label(rec.get("label"), SST2_LABELS, where)
        return _record(where, f"{SST2_INSTRUCTION}\nInput: {_req(rec, 'sentence', where)}", label, label)
    if fmt == "agnews":  # the original CSV: no header, columns label (1-4), title, description
        if "title" in rec:
            text = " ".join(_req(rec, k, where) for k in ("title", "description"))
            label = _label(rec.get("label"), AGNEWS_LABELS, where, offset=1)
        else:
            text, label = _req(rec, "text", where), _label(rec.get("label"), AGNEWS_LABELS, where)
        return _record(where, f"{AGNEWS_INSTRUCTION}\nInput: {text}", label, label)
    # "prompts": this project's own format (data/*.jsonl) and any file with a prompt field
    return _record(where, _req(rec, "prompt", where), _opt(rec, "response", where),
                   _opt(rec, "answer", where), _opt(rec, "category", where),
                   split=_opt(rec, "split", where), style=_opt(rec, "style", where))


def _by_fields(keys, path):
    for fmt, need in _BY_FIELDS:
        if need <= keys:
            return "sst2" if fmt == "agnews" and "sst" in path.name.lower() else fmt
    return None


def _json_rows(path, text):
    if path.suffix.lower() == ".json":  # a JSON array (Alpaca's own file), else JSON lines
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, list):
            return [(f"{path}:item {i + 1}", o) for i, o in enumerate(whole)]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: bad JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}:{n}: bad JSON ({type(e).__name__})") from None
    return rows


def _csv_rows(path, text, delimiter):
    # TSV files (GLUE's SST-2) are unquoted: a sentence may start with a '"' that is not a quote char.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = []
    try:
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((f"{path}:{reader.line_num}", row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
    return rows


def parse(path: Path, force_hexphi=False) -> tuple[str, list[dict]]:
    """Reads one file or a HEx-PHI directory -> (format, records)."""
    if path.is_dir():
        files = sorted(path.glob("*.csv"), key=lambda p: [int(t) if t.isdigit() else t
                                                          for t in re.split(r"(\d+)", p.name)])
        if not files:
            raise DataError(f"{path}: directory holds no .csv files (expected HEx-PHI category_N.csv)")
        return "hexphi", [r for f in files for r in parse(f, force_hexphi=True)[1]]
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".txt"):
        if not path.exists():
            raise DataError(f"{path}: no such file")
        raise DataError(f"{path}: unknown extension; use .jsonl, .json, .csv, .tsv or .txt")
    text = read_text(path)
    if suffix == ".txt":
        fmt = "text"
        recs = [_record(f"{path}:{n}", _text(line, f"{path}:{n}", "line"))
                for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")
        header = [c.strip().lower() for c in rows[0][1]] if rows else []
        fmt = None if force_hexphi else _by_fields(set(header), path)
        if fmt:  # a header row: the rest are records
            recs = []
            for where, row in rows[1:]:
                if len(row) != len(header):
                    raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}")
                recs.append(_convert(fmt, dict(zip(header, row)), where))
        elif not force_hexphi and rows and len(rows[0][1]) == 3 and rows[0][1][0] in ("1", "2", "3", "4"):
            fmt = "agnews"  # the original AG News CSV: label (1-4), title, description
            recs = []
            for where, row in rows:
                if len(row) != 3:
                    raise DataError(f"{where}: expected 3 fields (label, title, description), "
                                    f"got {len(row)}")
                recs.append(_convert(fmt, dict(zip(("label", "title", "description"), row)), where))
        elif not force_hexphi and rows and all(re.fullmatch(r"[A-Za-z_][\w-]{0,40}", c.strip()) for c in rows[0][1]):
            raise DataError(f"{rows[0][0]}: unknown header {_short(header)[:60]}; expected the fields of AdvBench, "
                            "HarmBench, DirectHarm4, GSM8K, SST-2, AG News, instruction or prompt files (HEx-PHI has none)")
        else:  # HEx-PHI: one prompt per row, no header; the category is the file's name
            fmt = "hexphi"
            recs = [_record(w, _text(",".join(row), w, "prompt"), category=path.stem) for w, row in rows]
    else:
        rows, fmt, recs = _json_rows(path, text), None, []
        for where, obj in rows:
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            obj = {k.lower(): v for k, v in obj.items()}
            if fmt is None and not (fmt := _by_fields(set(obj), path)):
                raise DataError(f"{where}: unknown fields {_short(sorted(obj))[:60]}; expected those "
                                "of AdvBench, HarmBench, DirectHarm4, BeaverTails, GSM8K, SST-2, "
                                "AG News, chat, instruction or prompt JSONL")
            recs.append(_convert(fmt, obj, where))
    if not recs:
        raise DataError(f"{path}: no examples")
    return fmt, recs


def detect_format(path) -> str:
    """The format of a file or HEx-PHI directory: one of FORMATS. Reads (and checks) the whole file."""
    return parse(Path(path))[0]
