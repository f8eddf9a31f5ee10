"""Load Hugging Face checkpoint folders into minigptq's own transformer, with no transformers dependency.

- config.json -> ModelConfig through the architecture registry (minigptq/arch).
- Weights from model.safetensors or a sharded model.safetensors.index.json, memory-mapped by a small reader that
  validates the header (sizes, offsets, dtypes) before trusting it; pytorch_model.bin only through
  torch.load(weights_only=True), which never runs pickled code.
- The model is built on the meta device and the checkpoint's tensors are assigned in place: no random init.
- GPTQ checkpoints: every linear whose `<prefix>.qweight` is present becomes a QuantLinear.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
from pathlib import Path

import torch
from torch import Tensor, nn

from . import Error
from .arch import Arch, get_arch
from .config import Fields, ModelConfig, read_json
from .transformer import Transformer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# safetensors dtype tags -> (torch dtype, bytes per element)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own limit on the JSON header


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise Error(f"unknown dtype {name!r}; valid: fp32, fp16, bf16")
    return DTYPES[name]


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


class Checkpoint:
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
    """The GPTQ settings of a checkpoint, or None if it is not quantized (gptq-format.md lists where they live).

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
            raise Error(f"{path}: {first} and {other} disagree on {', '.join(f'{k} ({a[k]!r} vs {b[k]!r})' for k in diff)}; "
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


# -- building the model ---------------------------------------------------------------------------------------------

def internal_to_hf(ckpt: Checkpoint) -> dict[str, str]:
    """Internal module path -> HF module path for this checkpoint's architecture and depth."""
    return {ours: hf for hf, ours in ckpt.arch.module_map(ckpt.cfg.num_layers).items()}


def build_empty(ckpt: Checkpoint, cpu_int8: bool = False) -> Transformer:
    """The model on the meta device, with QuantLinear where the checkpoint holds packed weights (cpu_int8: they run
    the int8-activation kernels on a CPU that has them)."""
    with torch.device("meta"):
        model = Transformer(ckpt.cfg)
    if ckpt.quant is not None:
        to_hf = internal_to_hf(ckpt)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and ckpt.has(to_hf.get(name, "?") + ".qweight"):
                ql = quant_linear_like(mod, ckpt, to_hf[name])
                ql.cpu_int8 = cpu_int8
                set_module(model, name, ql)
    return model


CPU_KERNELS = ("auto", "int8", "exact")


def resolve_cpu_kernel(cpu_kernel: str) -> bool:
    """"auto" / "int8" / "exact" -> whether QuantLinear runs the int8-activation kernels on the CPU."""
    from . import kernels
    if cpu_kernel not in CPU_KERNELS:
        raise Error(f"cpu_kernel={cpu_kernel!r} is not one of {', '.join(CPU_KERNELS)}")
    if cpu_kernel == "int8" and not kernels.cpu_int8_available():
        raise Error(f"--cpu-kernel int8 needs AVX-512 VNNI or AVX-VNNI; this CPU / build offers "
                         f"{kernels.cpu_isas() or 'no compiled kernels'}; use --cpu-kernel exact")
    return cpu_kernel == "int8" or (cpu_kernel == "auto" and kernels.cpu_int8_available())


def quant_linear_like(linear: nn.Linear, ckpt: Checkpoint, hf_name: str) -> nn.Module:
    from .qlinear import QuantLinear
    q = ckpt.quant
    scales = hf_name + ".scales"  # a missing or integer one is reported by _plan, naming it
    dtype = ckpt.get(scales).dtype if ckpt.has(scales) else torch.float16
    try:
        with torch.device("meta"):
            ql = QuantLinear(linear.in_features, linear.out_features, q["bits"], q["group_size"],
                             bias=linear.bias is not None, dtype=dtype if dtype.is_floating_point else torch.float16)
    except ValueError as e:
        raise Error(f"{ckpt.path}: {hf_name}: {e}") from None
    ql.checkpoint_format = q["checkpoint_format"]
    return ql


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _plan(model: Transformer, ckpt: Checkpoint, prefix: str) -> list[tuple[str, nn.Module, str]]:
    """Match the model's tensors under `prefix` with the checkpoint's -> [(HF name, module, leaf)].

    Checks names and shapes only (the safetensors headers), so it is cheap: missing, unexpected or misshapen
    tensors raise ValueError naming them before any data is read.
    """
    from .qlinear import QuantLinear
    to_hf = internal_to_hf(ckpt)
    expected = {}  # internal tensor name -> (module, leaf, shape)
    for mname, mod in model.named_modules():
        for leaf, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = f"{mname}.{leaf}" if mname else leaf
            if full.startswith(prefix) and not (full == "lm_head.weight" and ckpt.cfg.tie_word_embeddings):
                expected[full] = (mod, leaf, tuple(t.shape), t.dtype)
    wanted_hf = {to_hf[n.rpartition(".")[0]] + "." + n.rpartition(".")[2]: n for n in expected}
    missing = [hf for hf in wanted_hf if not ckpt.has(hf)]
    if missing:
        raise Error(f"{ckpt.path}: {len(missing)} tensor(s) missing from the checkpoint: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    hf_prefixes = tuple(h + "." for o, h in to_hf.items() if (o + ".").startswith(prefix) or not prefix)
    unexpected = [n for n in ckpt.names() if n.startswith(hf_prefixes) and n not in wanted_hf
                  and not n.endswith(("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias"))
                  and not (n == "lm_head.weight" and ckpt.cfg.tie_word_embeddings)]
    if not prefix:
        unexpected += [n for n in ckpt.names() if not n.startswith(tuple(h + "." for h in to_hf.values()))]
    if unexpected:
        raise Error(f"{ckpt.path}: {len(unexpected)} unexpected tensor(s) in the checkpoint: "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    plan = []
    for hf, ours in wanted_hf.items():
        mod, leaf, shape, want = expected[ours]
        t = ckpt.get(hf)
        got = tuple(t.shape)
        kind_ok = t.is_floating_point() if want.is_floating_point else \
            (t.dtype == want if leaf in ("qweight", "qzeros") else t.dtype in (torch.int16, torch.int32, torch.int64))
        if not kind_ok:
            valid = "a floating dtype (F32, F16, BF16)" if want.is_floating_point else \
                ("int32" if leaf in ("qweight", "qzeros") else "an integer dtype")
            raise Error(f"{ckpt.path}: tensor {hf} is stored as {str(t.dtype).removeprefix('torch.')}; "
                             f"valid: {valid}")
        if got != shape:
            if isinstance(mod, QuantLinear):
                q = ckpt.quant
                raise Error(f"{ckpt.path}: tensor {hf} has shape {list(got)}, but the quantize_config "
                                 f"(bits={q['bits']}, group_size={q['group_size']}) and config.json imply "
                                 f"{list(shape)}; the quantization config disagrees with the tensors")
            raise Error(f"{ckpt.path}: tensor {hf} has shape {list(got)}, expected {list(shape)} "
                             f"from config.json")
        plan.append((hf, mod, leaf))
    return plan


def check_checkpoint(ckpt: Checkpoint) -> None:
    """Validate every tensor name and shape of a checkpoint against its config, reading headers only."""
    _plan(build_empty(ckpt), ckpt, "")


def load_into(model: Transformer, ckpt: Checkpoint, prefix: str = "", dtype: torch.dtype | None = None,
              device="cpu", copy: bool = False) -> None:
    """Assign the checkpoint's tensors to every parameter/buffer of `model` whose internal name starts with `prefix`.

    Floating tensors are cast to `dtype` (None: keep the checkpoint's), except the packed layers' own tensors
    (QuantLinear keeps fp16 scales whatever the activation dtype). Name, shape or dtype problems and NaN/Inf in a
    tensor (as stored, or after the cast) raise ValueError naming the tensor.
    copy: give every tensor its own memory even where no cast or move is needed. Without it such tensors are views
    of the memory-mapped file; writing into them (the quantization driver does) would turn the mapped pages into
    private copies that live as long as the mapping.
    """
    from .qlinear import QuantLinear
    for hf, mod, leaf in _plan(model, ckpt, prefix):
        t = src = ckpt.get(hf)
        keep = isinstance(mod, QuantLinear) and leaf != "bias"
        if t.is_floating_point():
            check_finite(t, f"{ckpt.path}: tensor {hf}")
            if dtype is not None and not keep:
                t = t.to(dtype)
                check_finite(t, f"{ckpt.path}: tensor {hf}", "load it in fp32 or bf16 (--dtype)")
        t = t.to(device, copy=copy and t.data_ptr() == src.data_ptr())
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[leaf] = t
    if ckpt.cfg.tie_word_embeddings and "lm_head.weight".startswith(prefix):
        model.lm_head.weight = model.embed.weight
    to_hf = internal_to_hf(ckpt)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name.startswith(prefix.rstrip(".")):
            try:
                mod.post_load()
            except ValueError as e:
                raise Error(f"{ckpt.path}: {to_hf.get(name, name)}: {e}") from None


def check_finite(t: Tensor, what: str, fix: str = "") -> None:
    """Raise ValueError if t holds NaN or +-Inf. `what` names the tensor; `fix` says what to do when the values
    only overflow t's dtype (they were finite before a cast)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        hint = f"; its values overflow {str(t.dtype).removeprefix('torch.')}: {fix}" if fix else ""
        raise Error(f"{what} holds {n} non-finite value(s) ({kind}){hint}")


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device="cpu",
               head_dtype: str | torch.dtype | None = None, cpu_kernel: str = "auto", fuse: bool = True) -> Transformer:
    """Load a checkpoint folder (full precision or GPTQ) -> Transformer in eval mode, on `device`.

    dtype: fp32/fp16/bf16 for the floating tensors, or None for the checkpoint's own dtype.
    head_dtype: store the token embedding and lm_head in this dtype instead (e.g. bf16 with fp32 activations:
    in small models they are most of the bytes read per token); "int8" = lm_head quantized to 8 bits (RTN,
    groups of 128, run by the packed kernels) and the embedding table in bf16; None = dtype.
    cpu_kernel: for packed layers on the CPU, "int8" = activations quantized to int8 per chunk of 128 inputs and
    integer dot products (AVX-512 VNNI / AVX-VNNI; about 0.5% relative error per layer, see README), "exact" = fp32
    arithmetic, "auto" = int8 where the CPU has VNNI, else exact.
    fuse: run packed q/k/v and gate/up as one kernel call each (same outputs; fewer calls per token).
    """
    int8 = resolve_cpu_kernel(cpu_kernel)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise Error(f"device {device!r} is not a device; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Error(f"device {str(device)!r} requested but no CUDA GPU is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise Error(f"device {str(device)!r} is not supported; valid: cpu, cuda")
    ckpt = Checkpoint(path)
    model = build_empty(ckpt, cpu_int8=int8)
    load_into(model, ckpt, "", parse_dtype(dtype), device)
    if fuse:
        fuse_projections(model)
    if head_dtype == "int8":
        quantize_head(model, cpu_int8=int8)
    elif head_dtype is not None:
        head_dtype = parse_dtype(head_dtype)
        for mod in (model.embed, model.lm_head):
            mod.weight = nn.Parameter(mod.weight.to(head_dtype), requires_grad=False)
        if ckpt.cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
    model.checkpoint = ckpt  # keeps the memory maps alive as long as the model
    return model.eval()


def fuse_projections(model: Transformer) -> int:
    """Give every block's attention (q, k, v) and gated MLP (gate, up) one FusedQuantLinear where their packed
    layers can share a layout; returns how many were fused."""
    from .qlinear import FusedQuantLinear
    n = 0
    for block in model.layers:
        for mod, names in ((block.attn, ("q", "k", "v")), (block.mlp, ("gate", "up"))):
            parts = [getattr(mod, name, None) for name in names]
            if all(p is not None for p in parts) and FusedQuantLinear.compatible(parts):
                mod.fused = FusedQuantLinear(parts)
                n += 1
    return n


def quantize_head(model: Transformer, group_size: int = 128, cpu_int8: bool = False) -> None:
    """Replace lm_head by an 8-bit QuantLinear (round-to-nearest, symmetric, groups of `group_size`); store the
    embedding table in bf16. At 8 bits RTN is near-lossless; the head is then a quarter of its fp32 bytes."""
    from .qlinear import QuantLinear
    from .quantizer import QuantConfig, rtn
    W = model.lm_head.weight.detach()  # (vocab, token_dim)
    gs = group_size if W.shape[1] % group_size == 0 or W.shape[1] > group_size else -1
    res = rtn(W, QuantConfig(bits=8, group_size=gs))
    head = QuantLinear.from_codes(res.qweight, res.scales.to(torch.float16), res.zeros, res.g_idx, None, 8, gs,
                                  cpu_int8=cpu_int8)
    model.lm_head = head.to(W.device)
    model.embed.weight = nn.Parameter(model.embed.weight.to(torch.bfloat16), requires_grad=False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers; shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
