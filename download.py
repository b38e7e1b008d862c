"""`python download.py NAME [--data-dir DIR]`: fetch the paper's public benchmarks for users who are online.

Plain HTTPS from each set's public location (MIRRORS, DOWNLOADS), checked against a pinned checksum,
written atomically into the data directory that data.py's benchmark names read (data.BENCHMARKS);
files already there are kept. HEx-PHI (gated) and DirectHarm4 (parquet only) are fetched by hand:
data.MANUAL says how.
"""
import argparse
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from cli import one_line_errors
from data import BENCHMARKS, MANUAL, public_dir
from formats import DataError

# Where the files come from. Tests point these at a local server.
MIRRORS = {"github": "https://raw.githubusercontent.com", "glue": "https://dl.fbaipublicfiles.com/glue/data"}
# name -> files: (mirror, path, checksum, {member of the archive: (destination, checksum)} or a destination).
# Checksums: none was computed here (no network while this was written). Each is copied from other
# projects that pin the same file, and is what `download` checks: sha256 for AdvBench (pinned in several
# repositories, e.g. ones that fetch the same commit), HarmBench and GSM8K (train and test, the same
# values in many repositories), md5 for AG News and SST-2 (torchtext's own values for these URLs,
# including the md5 of the two extracted TSVs). A None checksum prints the computed sha256, "unverified".
_GH = "llm-attacks/llm-attacks/098262edf85f807224e70ecd87b9d83716bf6b73"
_HB = "centerforaisafety/HarmBench/c0423b952435fcc8467108d8f25962dbae5b7de2/data/behavior_datasets"
_GSM = "openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data"
_AG = "mhjabreel/CharCnn_Keras/master/data/ag_news_csv"  # torchtext's AG_NEWS source
DOWNLOADS = {
    "advbench": [("github", f"{_GH}/data/advbench/harmful_behaviors.csv",
                  "sha256:6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1", "advbench/harmful_behaviors.csv")],
    "harmbench": [("github", f"{_HB}/harmbench_behaviors_text_all.csv",
                   "sha256:8d81accedd38eaaf8b760618622bb888417d1fd0c86eba65c427a16f1cbb4afc",
                   "harmbench/harmbench_behaviors_text_all.csv")],
    "gsm8k": [("github", f"{_GSM}/train.jsonl",
               "sha256:17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", "gsm8k/train.jsonl"),
              ("github", f"{_GSM}/test.jsonl",
               "sha256:3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", "gsm8k/test.jsonl")],
    "sst2": [("glue", "SST-2.zip", "md5:9f81648d4199384278b86e315dac217c",
              {"SST-2/train.tsv": ("sst2/train.tsv", "md5:da409a0a939379ed32a470bc0f7fe99a"),
               "SST-2/dev.tsv": ("sst2/dev.tsv", "md5:268856b487b2a31a28c0a93daaff7288")})],
    "agnews": [("github", f"{_AG}/train.csv", "md5:b1a00f826fdfbd249f79597b59e1dc12", "agnews/train.csv"),
               ("github", f"{_AG}/test.csv", "md5:d52ea96a97a2d943681189a97654912d", "agnews/test.csv")],
}


def _digest(algo, path) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(path, checksum, what):
    """Raise if path's bytes do not match checksum ("sha256:HEX" or "md5:HEX"); None: print the sha256."""
    if checksum is None:
        print(f"{what}: sha256 {_digest('sha256', path)} (unverified: no expected checksum recorded)")
        return
    algo, want = checksum.split(":")
    if (got := _digest(algo, path)) != want:
        raise DataError(f"{what}: {algo} checksum mismatch (expected {want}, got {got}); nothing was written")


def _fetch(url, dest_dir, quiet=False) -> Path:
    """Download url to a temporary file in dest_dir (the caller renames or deletes it), with a progress bar."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as r:
            size = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=quiet, leave=False) as bar:
                while block := r.read(1 << 16):
                    out.write(block)
                    bar.update(len(block))
    except BaseException as e:  # no partial file is left behind, whatever stopped us (Ctrl-C included)
        os.unlink(tmp)
        if isinstance(e, urllib.error.HTTPError):
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        if isinstance(e, OSError):  # URLError, timeouts, a full disk
            raise DataError(f"{url}: cannot download ({getattr(e, 'reason', None) or e})") from None
        raise
    return Path(tmp)


def _place(tmp: Path, dest: Path):
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)  # atomic: a reader sees the old file or the whole new one, never a part


def download(name, data_dir=None, quiet=False) -> list[Path]:
    """Fetch a benchmark into the data directory: checksum-verified, written atomically; files already
    there are kept (delete one to fetch it again). Returns the destination paths."""
    root = public_dir(data_dir)
    if name in MANUAL:
        raise DataError(f"{name}: {MANUAL[name].format(dir=root)}")
    if name not in DOWNLOADS:
        raise DataError(f"{name}: unknown; downloadable: {', '.join(DOWNLOADS)} (by hand: {', '.join(MANUAL)})")
    done = []
    for mirror, path, checksum, to in DOWNLOADS[name]:
        members = to if isinstance(to, dict) else None
        dests = {m: root / d for m, (d, _) in members.items()} if members else {None: root / to}
        done += dests.values()
        if all(d.exists() for d in dests.values()):
            if not quiet:
                print(f"{name}: {', '.join(str(d) for d in dests.values())} already there, kept")
            continue
        root.mkdir(parents=True, exist_ok=True)
        url = f"{MIRRORS[mirror]}/{path}"
        tmp, parts = _fetch(url, root, quiet), {}
        try:
            _check(tmp, checksum, url)
            if members is None:
                parts[None] = tmp
            else:  # an archive: extract and verify every member before writing any
                with zipfile.ZipFile(tmp) as z:
                    for m, (_, sum_m) in members.items():
                        parts[m] = root / f".download-{Path(m).name}.part"
                        parts[m].write_bytes(z.read(m))
                        _check(parts[m], sum_m, f"{url}:{m}")
            for m, part in parts.items():
                _place(part, dests[m])
        finally:
            for t in [tmp, *parts.values()]:
                t.unlink(missing_ok=True)
        if not quiet:
            print(f"{name}: wrote {', '.join(str(d) for d in dests.values())}")
    return done


def main(argv=None):
    p = argparse.ArgumentParser(prog="python download.py", description="Download the paper's benchmarks.")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}, or all")
    p.add_argument("--data-dir", help="default: $UNFORGOTTEN_DATA, else data/public")
    args = p.parse_args(argv)
    names = list(DOWNLOADS) if args.names == ["all"] else args.names
    with one_line_errors():
        for name in names:
            download(name, args.data_dir)
    if args.names == ["all"]:
        for name, how in MANUAL.items():
            print(f"{name}: by hand. {how.format(dir=public_dir(args.data_dir))}")



if __name__ == "__main__":
    main()
