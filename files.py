"""Files written whole or not at all: JSON and safetensors through a temporary name and a rename, and the reading of
a checkpoint's safetensors (one file or the shards of its index) with errors that name the file."""
import hashlib
import json
import os
from pathlib import Path

def read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def atomic_write(path, data: bytes):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:  # no stray temporary file: the old file, if any, is left as it was
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(tensors, path, metadata=None):
    """A safetensors file written atomically (a temporary name, then renamed; removed on failure), with the
    user's umask: safetensors itself writes mode 0600, which colleagues on a shared cluster cannot read."""
    from safetensors.torch import save_file
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def weight_files(path: Path) -> list:
    """A checkpoint directory's weight files: model.safetensors, or the shards named in its index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return files


def weights_sha256(path) -> str:
    """The sha256 of a checkpoint's weight files, in order: which model a run started from, wherever it sits (a
    rebuilt aligned model keeps its directory and its config.json but not its weights)."""
    h = hashlib.sha256()
    for name in weight_files(Path(path)):
        with open(Path(path) / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def load_safetensors(path: Path) -> dict:
    """All tensors of a checkpoint directory: model.safetensors or the shards named in the index."""
    from safetensors import safe_open
    files, sd = weight_files(path), {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path / name}: not found (listed in the index)") from None
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise ValueError(f"{path / name}: cannot read safetensors file ({e})") from None
    return sd
