"""Reading Hugging Face checkpoint folders, with no transformers dependency: what is in the folder, never a model.

- resolve_model: a folder, or a hub id already in the local Hugging Face cache (nothing is downloaded).
- CheckpointReader: config.json -> ModelConfig through the architecture registry (minigptq/arch), the GPTQ settings
  (read_quant_config: config.json's quantization_config and quantize_config.json, checked to agree), and the
  tensors by name, lazily: model.safetensors or a sharded model.safetensors.index.json, memory-mapped by a small
  reader (SafetensorsFile) that validates the header (sizes, offsets, dtypes) before trusting it;
  pytorch_model.bin only through torch.load(weights_only=True), which never runs pickled code.
Building the model from these tensors is minigptq/loader.py; writing checkpoints is minigptq/checkpoint_writer.py.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
from pathlib import Path

import torch
from torch import Tensor

from . import Error
from .arch import Arch, get_arch
from .config import Fields, ModelConfig, read_json

# safetensors dtype tags -> (torch dtype, bytes per element)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit on the JSON header


class SafetensorsFile:
    """One .safetensors file: header validated up front, tensors memory-mapped (copy-on-write) on demand.

    Why not safetensors.safe_open: it is as lazy (memory-mapped, no copy), but on a damaged header it says "invalid
    shape, data type, or offset for tensor" or "invalid offset for tensor X" without the tensor, the byte range or the
    cause; the checks below name the file, the tensor and what is wrong (tests/test_hostile.py holds them to it).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        # O_NONBLOCK: a FIFO in the file's place must not block the open for ever; fstat then refuses it (and a
        # device such as /dev/zero, whose mapping would never end)
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Error(f"{path} is {path_kind(st.st_mode)}, expected a regular file (safetensors weights)")
        with os.fdopen(fd, "rb") as f:
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise Error(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise Error(f"{path}: header length {n} exceeds the file ({size} bytes); truncated or corrupt")
            try:  # ValueError: also numbers of more than 4300 digits; RecursionError: [[[[...]]]] nested deeply
                header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=self._no_duplicates)
            except (ValueError, RecursionError) as e:
                if isinstance(e, Error):
                    raise
                raise Error(f"{path}: safetensors header is not valid JSON ({str(e)[:200]}); corrupt file") from None
            if not isinstance(header, dict):
                raise Error(f"{path}: safetensors header is not a JSON object; corrupt file")
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {name: self._check(name, info, size - 8 - n) for name, info in header.items()}
            spans = sorted((b, e, name) for name, (_, _, b, e) in self.entries.items() if e > b)
            for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise Error(f"{path}: tensors {a!r} and {b!r} overlap in the file; corrupt file")
            self.base = 8 + n
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > self.base else None

    def _no_duplicates(self, pairs: list[tuple[str, object]]) -> dict:
        """json's object_pairs_hook: a name given twice would silently keep the last entry; the safetensors
        library refuses such a file, and so do we."""
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise Error(f"{self.path}: the safetensors header names {key[:200]!r} twice; corrupt file (each "
                            f"tensor and field must appear once)")
            seen.add(key)
        return dict(pairs)

    def _check(self, name, info, data_len):
        ok = isinstance(info, dict) and info.get("dtype") in ST_DTYPES and isinstance(info.get("shape"), list) \
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in info["data_offsets"])
        if not ok:
            raise Error(f"{self.path}: bad header entry for tensor {name[:200]!r}: {str(info)[:200]}; expected "
                        f"dtype one of {', '.join(ST_DTYPES)}, shape a list of integers in [0, 2**63), data_offsets "
                        f"[begin, end]")
        dtype, shape = ST_DTYPES[info["dtype"]], info["shape"]
        # torch computes strides as products of the dimensions (a 0 counted as 1) in int64: a tensor with no
        # elements but a shape like [0, 2**70] passes the byte count below and then fails deep inside torch
        if math.prod(max(s, 1) for s in shape) >= 2**63:
            raise Error(f"{self.path}: tensor {name[:200]!r} has shape {str(shape)[:200]}, beyond what any tensor "
                        f"can have (the product of its dimensions must be below 2**63); corrupt file")
        b, e = info["data_offsets"]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= b <= e <= data_len or e - b != nbytes:
            raise Error(f"{self.path}: tensor {name!r} {info['dtype']}{shape} claims bytes [{b}, {e}) but "
                        f"needs {nbytes} within a data section of {data_len} bytes; truncated or corrupt")
        return dtype, tuple(shape), b, e

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> Tensor:
        dtype, shape, b, e = self.entries[name]
        if e == b:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=math.prod(shape), offset=self.base + b).view(shape)


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder, or a hub id ("org/name") already in the local Hugging Face cache -> its folder.

    Nothing is downloaded: an id that is not cached is an error that says so (download it with
    `huggingface-cli download org/name`, or give a folder). A path that is not a folder (a file, a FIFO, a device,
    a link to nowhere) is an error saying what it is.
    """
    path = Path(model)
    if not (path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1):
        path = _from_hub_cache(model)
    expected = "expected a folder with config.json and model.safetensors"
    if path.is_dir():
        return path
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"model folder {str(model)!r} is a symbolic link to {str(path.readlink())!r}, "
                                f"which does not exist ({expected})")
    if not path.exists():
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist ({expected})")
    raise Error(f"model {str(model)!r} is {path_kind(path.stat().st_mode)}, not a folder ({expected})")


def path_kind(mode: int) -> str:
    """What a file of this st_mode is, in words, for messages: "a regular file", "a FIFO (named pipe)", ..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _from_hub_cache(model: str | Path) -> Path:
    """The folder of hub id `model` in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist (and huggingface_hub, which would look "
                                f"it up as a hub id in the local cache, is not installed)") from None
    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"model {str(model)!r} is neither a folder nor a hub id in the local Hugging Face "
                                f"cache; download it first (huggingface-cli download {model}) or give a "
                                f"folder") from None
    except ValueError as e:  # an invalid repo id
        raise FileNotFoundError(f"model folder {str(model)!r} does not exist ({e})") from None


class CheckpointReader:
    """A Hugging Face checkpoint folder: its config, quantization config and (lazily read) tensors."""

    def __init__(self, path: str | Path):
        self.path = resolve_model(path)  # a folder, or an error saying what it is instead
        if not (self.path / "config.json").exists():  # exists, not is_file: read_json names a FIFO or device
            raise FileNotFoundError(f"{self.path}/config.json not found: is {str(path)!r} a Hugging Face checkpoint?")
        self.hf_config = read_json(self.path / "config.json")
        if "model_type" not in self.hf_config:
            raise Error(f"{self.path}/config.json has no 'model_type'")
        try:
            self.arch: Arch = get_arch(self.hf_config["model_type"])
        except ValueError as e:
            raise Error(f"{self.path}/config.json: {e}") from None
        try:
            self.cfg: ModelConfig = self.arch.config_from_hf(Fields(self.hf_config))
        except ValueError as e:
            raise Error(f"{self.path}/config.json ({self.hf_config['model_type']}): {e}") from None
        self.quant = read_quant_config(self.path)
        self._opened: dict[str, object] = {}  # file name -> SafetensorsFile / _DictFile
        self._where = self._index()  # tensor name -> file name
        self.arch = self.arch.for_names(self._where)  # Mixtral under transformers 5's tensor names (arch/mixtral.py)

    def _index(self) -> dict[str, str]:
        p = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index_name).exists():  # read_json refuses a FIFO or device (no silent fallback)
                self.index_file = p / index_name  # named when a shard lacks a tensor the index puts there
                weight_map = read_json(p / index_name).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise Error(f"{p / index_name} has no 'weight_map' object")
                # Shards are plain files of this folder. Each value is checked (not set(values): a list is unhashable).
                for fname in weight_map.values():
                    if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                        raise Error(f"{p / index_name}: weight_map names the file {repr(fname)[:200]}; shards must be "
                                    f"plain file names inside the model folder (no folders, no '..')")
                for name, fname in weight_map.items():  # headers only: cheap, and a wrong index is caught up front
                    if fname.endswith(".safetensors") and name not in self._open(fname).keys():
                        raise self._not_in_shard(name, fname)
                return weight_map
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).exists():  # a FIFO or a device in its place is reported, not skipped
                return {k: name for k in self._open(name).keys()}
        raise FileNotFoundError(f"no weights in {p}: expected model.safetensors, model.safetensors.index.json, "
                                f"or pytorch_model.bin")

    def _open(self, fname: str):
        files = self._opened
        if fname not in files:
            f = self.path / fname
            if not f.exists():
                raise FileNotFoundError(f"{f} (named in the checkpoint's index) does not exist")
            if fname.endswith(".safetensors"):
                files[fname] = SafetensorsFile(f)
            else:  # weights_only: tensors only, never arbitrary pickled objects (no code runs on load)
                if not stat.S_ISREG(mode := f.stat().st_mode):  # a FIFO would block torch.load for ever
                    raise Error(f"{f} is {path_kind(mode)}, expected a regular file (PyTorch weights)")
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises several types for bad pickles; report them all the same way
                    raise Error(f"{f}: not a loadable weights-only PyTorch file ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None
                files[fname] = _DictFile(sd, f)
        return files[fname]

    def _not_in_shard(self, name: str, fname: str) -> Error:
        return Error(f"{self.index_file}: weight_map puts tensor {name[:200]!r} in {fname}, which does not hold it; "
                     f"the index and its shards disagree (regenerate the index or download the checkpoint again)")

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Tensor:
        fname = self._where[name]
        f = self._open(fname)
        if name not in f.keys():  # only a sharded .bin checkpoint gets here (_index checks .safetensors shards)
            raise self._not_in_shard(name, fname)
        return f.get(name)

    def has(self, name: str) -> bool:
        return name in self._where


class _DictFile:
    """The tensors of a pytorch_model.bin: a state_dict, {name: tensor} (values of other types are ignored)."""

    def __init__(self, sd, path: Path):
        if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
            what = type(sd).__name__ if not isinstance(sd, dict) else "dict with keys that are not strings"
            raise Error(f"{path} holds a {what}; expected a state_dict: a dict of tensor name -> tensor")
        self.sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}

    def keys(self):
        return self.sd.keys()

    def get(self, name):
        return self.sd[name]


def read_quant_config(path: Path) -> dict | None:
    """The GPTQ settings of a checkpoint, or None if it is not quantized (docs/gptq-format.md lists where they live).

    config.json's quantization_config comes first, as in transformers and vLLM; quantize_config.json (or
    quant_config.json) is read too, and a checkpoint whose two configs disagree is refused.
    """
    found = []  # (file, parsed settings)
    q = read_json(path / "config.json").get("quantization_config")
    if q is not None:
        found.append(("config.json's quantization_config", _quant_settings(q, path / "config.json")))
    for name in ("quantize_config.json", "quant_config.json"):
        if (path / name).exists():  # read_json refuses a FIFO or device
            found.append((name, _quant_settings(read_json(path / name), path / name)))
            break
    if not found:
        return None
    (first, a), rest = found[0], found[1:]
    for other, b in rest:
        diff = [k for k in QUANT_KEYS if a[k] != b[k]]
        if diff:
            what = ", ".join(f"{k} ({a[k]!r} vs {b[k]!r})" for k in diff)
            raise Error(f"{path}: {first} and {other} disagree on {what}; "
                        f"fix the wrong one (transformers and vLLM read {first})")
    return a


QUANT_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")


def _quant_settings(q, where: Path) -> dict:
    """A quantization config object -> the dict with its fields checked and defaults filled in."""
    if not isinstance(q, dict):
        raise Error(f"{where}: the quantization config must be an object {{...}}, got {q!r}")
    method = q.get("quant_method", "gptq")
    if method != "gptq":
        raise Error(f"{where}: quantization method {method!r} is not supported; only GPTQ checkpoints are")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise Error(f"{where}: checkpoint_format {fmt!r} is not supported; valid: gptq, gptq_v2")
    bits = q.get("bits")
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8) or not isinstance(bits, int):
        raise Error(f"{where}: quantization bits={bits!r} is not supported; valid: the integers 2, 3, 4, 8")
    gs = q.get("group_size", -1)
    if isinstance(gs, bool) or not isinstance(gs, int) or gs == 0 or gs < -1 or gs >= 2**31:
        raise Error(f"{where}: group_size={gs!r} is invalid; valid: -1 or a positive integer below 2**31")
    flags = {k: q.get(k, default) for k, default in (("sym", True), ("desc_act", False))}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise Error(f"{where}: {k}={v!r} must be true or false")
    return dict(q, bits=bits, group_size=gs, checkpoint_format=fmt, **flags)
