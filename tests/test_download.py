"""The paper's benchmarks by name (data.BENCHMARKS) and `python download.py`, against a local HTTP
server: success, checksum mismatch, 404, files already there, archives, gated sets, the CLI."""
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import data
import download
import eval as evaluate_cli
from formats import DataError

FIX = Path(__file__).parent / "fixtures" / "formats"


def digest(algo, path):
    return f"{algo}:{hashlib.new(algo, Path(path).read_bytes()).hexdigest()}"


def leftovers(root):
    return [p for p in Path(root).rglob("*") if p.name.startswith(".download-")]


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/www on a free local port; every mirror points at it. `hits` lists the paths asked for."""
    www, hits = tmp_path / "www", []
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(www), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    for k in list(download.MIRRORS):
        monkeypatch.setitem(download.MIRRORS, k, url)
    monkeypatch.setitem(download.MIRRORS, "local", url)
    yield SimpleNamespace(www=www, hits=hits, url=url)
    httpd.shutdown()
    httpd.server_close()


def serve(server, rel, src):
    (server.www / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, server.www / rel)


def test_download_verifies_writes_and_keeps_present_files(server, tmp_path, monkeypatch, capsys):
    serve(server, "a/adv.csv", FIX / "advbench.csv")
    serve(server, "b/gsm.jsonl", FIX / "gsm8k.jsonl")
    monkeypatch.setitem(download.DOWNLOADS, "toy", [("local", "a/adv.csv", digest("sha256", FIX / "advbench.csv"), "toy/adv.csv"),
                                                 ("local", "b/gsm.jsonl", digest("md5", FIX / "gsm8k.jsonl"), "toy/gsm.jsonl")])
    d = tmp_path / "pub"
    got = download.download("toy", d)
    assert got == [d / "toy/adv.csv", d / "toy/gsm.jsonl"]
    assert (d / "toy/adv.csv").read_bytes() == (FIX / "advbench.csv").read_bytes()
    assert (d / "toy/gsm.jsonl").read_bytes() == (FIX / "gsm8k.jsonl").read_bytes()
    assert server.hits == ["/a/adv.csv", "/b/gsm.jsonl"] and not leftovers(d)
    (d / "toy/gsm.jsonl").unlink()  # one file gone: only that one is fetched again
    download.download("toy", d)
    assert server.hits[2:] == ["/b/gsm.jsonl"]
    download.main(["toy", "--data-dir", str(d)])  # the CLI; both present: nothing fetched
    assert len(server.hits) == 3 and "already there" in capsys.readouterr().out


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    """The real AdvBench entry, served a different file: an error and no file (the URL base is overridden)."""
    _, path, checksum, dest = download.DOWNLOADS["advbench"][0]
    serve(server, path, FIX / "advbench.csv")
    d = tmp_path / "pub"
    with pytest.raises(DataError, match="sha256 checksum mismatch") as e:
        download.download("advbench", d)
    assert checksum.split(":")[1] in str(e.value) and "\n" not in str(e.value)
    assert not (d / dest).exists() and not leftovers(d)
    assert server.hits == ["/" + path]


def test_http_404_is_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setitem(download.DOWNLOADS, "toy", [("local", "nope.csv", None, "toy/nope.csv")])
    d = tmp_path / "pub"
    with pytest.raises(DataError, match=re.escape(f"{server.url}/nope.csv: HTTP 404")):
        download.download("toy", d)
    assert not (d / "toy/nope.csv").exists() and not leftovers(d)
    with pytest.raises(SystemExit) as e:  # the CLI: one line
        download.main(["toy", "--data-dir", str(d)])
    assert "HTTP 404" in str(e.value.code)


def test_unknown_checksum_prints_the_hash_as_unverified(server, tmp_path, monkeypatch, capsys):
    serve(server, "x.csv", FIX / "advbench.csv")
    monkeypatch.setitem(download.DOWNLOADS, "toy", [("local", "x.csv", None, "toy/x.csv")])
    download.download("toy", tmp_path / "pub")
    out = capsys.readouterr().out
    assert digest("sha256", FIX / "advbench.csv").split(":")[1] in out and "unverified" in out


def test_archive_members_are_verified_before_any_is_written(server, tmp_path, monkeypatch):
    with zipfile.ZipFile(server.www / "SST-2.zip", "w") as z:
        z.write(FIX / "sst2.tsv", "SST-2/train.tsv")
        z.write(FIX / "gsm8k.jsonl", "SST-2/dev.tsv")  # the wrong bytes under the second name
    members = {"SST-2/train.tsv": ("toy/train.tsv", digest("md5", FIX / "sst2.tsv")),
               "SST-2/dev.tsv": ("toy/dev.tsv", digest("md5", FIX / "sst2.tsv"))}
    monkeypatch.setitem(download.DOWNLOADS, "toy", [("local", "SST-2.zip", digest("md5", server.www / "SST-2.zip"), members)])
    d = tmp_path / "pub"
    with pytest.raises(DataError, match="SST-2/dev.tsv: md5 checksum mismatch"):
        download.download("toy", d)
    assert not (d / "toy").exists() and not leftovers(d)
    members["SST-2/dev.tsv"] = ("toy/dev.tsv", digest("md5", FIX / "gsm8k.jsonl"))
    download.download("toy", d)
    assert (d / "toy/train.tsv").read_bytes() == (FIX / "sst2.tsv").read_bytes()
    assert (d / "toy/dev.tsv").read_bytes() == (FIX / "gsm8k.jsonl").read_bytes() and not leftovers(d)


def test_sets_that_cannot_be_fetched_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="gated: accept its license at https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI"):
        download.download("hexphi", tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/directharm4/test.csv")):
        download.download("directharm4", tmp_path)
    with pytest.raises(SystemExit) as e:
        download.main(["nope", "--data-dir", str(tmp_path)])
    assert "unknown; downloadable: advbench" in str(e.value.code)


def test_the_download_table():
    """Every benchmark is downloadable or explained; each download lands on the benchmark's own paths."""
    assert set(download.DOWNLOADS) | set(data.MANUAL) == set(data.BENCHMARKS)
    assert not set(download.DOWNLOADS) & set(data.MANUAL)
    for name, files in download.DOWNLOADS.items():
        dests = []
        for mirror, path, checksum, to in files:
            assert mirror in download.MIRRORS and not path.startswith("/")
            sums = [checksum] + ([c for _, c in to.values()] if isinstance(to, dict) else [])
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}|md5:[0-9a-f]{32}", c) for c in sums), (name, sums)
            dests += [d for d, _ in to.values()] if isinstance(to, dict) else [to]
        assert sorted(dests) == sorted(data.BENCHMARKS[name].values())


@pytest.fixture
def public(tmp_path):
    """A data directory laid out as `download` writes it, filled with the format fixtures."""
    d = tmp_path / "pub"
    layout = {"advbench/harmful_behaviors.csv": "advbench.csv", "harmbench/harmbench_behaviors_text_all.csv": "harmbench.csv",
              "directharm4/test.csv": "directharm4.csv", "gsm8k/train.jsonl": "gsm8k.jsonl", "gsm8k/test.jsonl": "gsm8k.jsonl",
              "sst2/train.tsv": "sst2.tsv", "sst2/dev.tsv": "sst2.tsv", "agnews/train.csv": "agnews_original.csv",
              "agnews/test.csv": "agnews_original.csv"}
    for dest, src in layout.items():
        (d / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIX / src, d / dest)
    shutil.copytree(FIX / "hexphi", d / "hexphi")
    return d


def test_benchmark_names_resolve_in_the_data_directory(public, monkeypatch):
    for name, fixture in (("advbench", "advbench.csv"), ("hexphi", "hexphi"), ("harmbench", "harmbench.csv"),
                          ("directharm4", "directharm4.csv")):
        strip = lambda ps: [{k: v for k, v in p.items() if k != "where"} for p in ps]  # noqa: E731 (where: their own file)
        assert strip(data.load_prompts(name, public)) == strip(data.load_prompts(str(FIX / fixture)))
    gsm = data.load_task("gsm8k", "test", data_dir=public)  # the test file whole, not a hash split of it
    assert gsm == data.load_task(str(FIX / "gsm8k.jsonl"), "all")
    assert len(data.load_task("gsm8k", "all", data_dir=public)) == 2 * len(gsm)
    assert len(data.load_task("agnews", "train", n=3, data_dir=public)) == 3
    assert [e["answer"] for e in data.load_task("sst2", "test", data_dir=public)] == ["positive", "negative"]
    assert evaluate_cli.task_metric("sst2")("Positive.", {"answer": "positive"})
    assert evaluate_cli.task_metric("gsm8k")("The final answer is 72.", {"answer": "72"})
    assert [f.name for f in data.files_of("hexphi", public)] == ["category_1.csv", "category_10.csv", "category_4.csv"]
    with pytest.raises(DataError, match="prompts only"):
        data.load_task("advbench", "train", data_dir=public)
    monkeypatch.setenv("UNFORGOTTEN_DATA", str(public))  # the default directory comes from the environment
    assert data.public_dir() == public and len(data.load_prompts("advbench")) == 3


def test_a_missing_benchmark_says_how_to_get_it(tmp_path, tiny_checkpoint):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/advbench/harmful_behaviors.csv: not found; run "
                                                  f"`python download.py advbench --data-dir {tmp_path}`")):
        data.load_prompts("advbench", tmp_path)
    with pytest.raises(DataError, match="HEx-PHI is gated"):
        data.load_prompts("hexphi", tmp_path)
    with pytest.raises(SystemExit) as e:  # eval.py: one line, before any model is loaded
        evaluate_cli.main(["--model", str(tiny_checkpoint), "--harmful", "advbench,hexphi", "--data-dir", str(tmp_path)])
    assert "python download.py advbench" in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--model", str(tiny_checkpoint), "--harmful", "", "--task", "gsm8k", "--data-dir", str(tmp_path)])
    assert "gsm8k/test.jsonl: not found" in str(e.value.code)


def test_eval_reads_benchmarks_by_name(public, tiny_checkpoint, tmp_path, capsys):
    evaluate_cli.main(["--model", str(tiny_checkpoint), "--harmful", "advbench,hexphi", "--sensitive", "", "--task", "sst2",
                       "--n-task", "2", "--max-new-tokens", "2", "--data-dir", str(public), "--out", str(tmp_path / "r.json")])
    import json
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["judge"] == "keyword" and res["n_by_set"] == {"advbench": 3, "hexphi": 5}
    assert set(res["asr_by_category"]) == {"advbench", "hexphi/category_1", "hexphi/category_10", "hexphi/category_4"}
    assert set(res["task_accuracy_by_task"]) == {"sst2"}
    assert os.path.join(str(public), "sst2", "dev.tsv") in res["data_hashes"]
    out = capsys.readouterr().out
    assert "hexphi/category_10" in out and "task sst2: accuracy" in out


def test_the_command_line_is_download_py(tmp_path):
    """`python download.py NAME` is the documented command; a bad name is one line and a non-zero exit."""
    root = Path(__file__).parent.parent
    run = lambda *a: subprocess.run([sys.executable, "download.py", *a], cwd=root, capture_output=True, text=True)
    r = run("nope", "--data-dir", str(tmp_path))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "nope: unknown" in r.stderr
    r = run()
    assert r.returncode != 0 and "usage: python download.py" in r.stderr
