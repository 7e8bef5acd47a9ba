"""Adapter files that are damaged, mangled or half-written: loading either gives back exactly the
adapter that was saved or raises ``AdapterFileError`` — never another exception, never a
silently different model, never unpickling, never a huge allocation — and a save killed midway
leaves the previous adapter readable.

The fuzz cases are drawn by hypothesis (derandomized, database-free: CI checks the same cases
every run; the ``slow`` variants run 20 times more). They mutate two saved folders of a small
CNN adapter (Conv2d, Conv1d and Linear adapters, a trained bias, a modules-to-save head):

* ``ours``, as ``save_adapter`` writes it (with its checksum and config copy), where any change
  that alters the adapter must be refused;
* ``peft``, the same without torchdora's metadata (as PEFT writes it), where only the file's
  structure and the config's types can be checked: the outcome must still be a load or an
  ``AdapterFileError``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import save_worker
from model_zoo import build, output, perturb_adapters
from profiles import profiles, run_examples
from reference import rel_err
from torchdora import DoRAConfig, DoRALayer, apply_dora, dora_modules
from torchdora.io import AdapterFileError, inspect_adapter, load_adapter, save_adapter
from torchdora.io.files import (
    CONFIG_NAME,
    DIGEST_KEY,
    STAGING_PREFIX,
    WEIGHTS_NAME,
    read_tensors,
)
from torchdora.io.peft_format import peft_state_dict

CONFIG = DoRAConfig(
    target_modules=["conv1", "conv3", "fc"], rank=3, bias="dora_only", modules_to_save=["head"]
)
TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- the saved folders
def saved_model() -> torch.nn.Module:
    model = apply_dora(build("cnn"), CONFIG)
    perturb_adapters(model, std=0.3)
    return model


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """``{"ours": folder, "peft": folder}``, both holding :func:`saved_model`'s adapter."""
    root = tmp_path_factory.mktemp("originals")
    ours, peft = root / "ours", root / "peft"
    save_adapter(saved_model(), ours)
    shutil.copytree(ours, peft)
    save_file(load_file(peft / WEIGHTS_NAME), peft / WEIGHTS_NAME)  # no metadata, as PEFT
    return {"ours": ours, "peft": peft}


@contextmanager
def no_unpickling() -> Iterator[list[str]]:
    """Any call that could unpickle (``pickle``, ``torch.load``) is recorded and refused."""
    calls: list[str] = []

    def refuse(name: str) -> Callable:
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while loading an adapter")

        return call

    with (
        mock.patch("pickle.load", refuse("pickle.load")),
        mock.patch("pickle.loads", refuse("pickle.loads")),
        mock.patch("pickle.Unpickler", refuse("pickle.Unpickler")),
        mock.patch("torch.load", refuse("torch.load")),
    ):
        yield calls


# --------------------------------------------------------------------------- the property
INPUTS = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def snapshot(model: torch.nn.Module) -> tuple[dict, str, torch.Tensor]:
    """What a loaded adapter determines: its tensors, each layer's hyperparameters, outputs."""
    layers = {
        name: (type(layer).__name__, layer.rank, layer.scaling, layer.use_dora, layer.lora_dropout)
        for name, layer in dora_modules(model)
    }
    with torch.no_grad():
        return peft_state_dict(model), repr(layers), output(model.eval(), INPUTS)


def assert_same_snapshot(got: tuple, expected: tuple) -> None:
    (got_state, got_layers, got_out), (state, layers, out) = got, expected
    assert got_state.keys() == state.keys()
    for key in state:
        assert same_bits(got_state[key], state[key]), key
    assert got_layers == layers
    assert same_bits(got_out, out)


def check_load(folder: Path, expected: tuple | None) -> str:
    """Load ``folder`` three ways (into a fresh model, into an adapted one, ``inspect_adapter``):
    each succeeds or raises AdapterFileError, and a failed load leaves the model as it was. With
    ``expected`` (a :func:`snapshot`), a load must reproduce it bit for bit. Returns the
    outcome of the first."""
    fresh = build("cnn")
    pristine = {k: v.clone() for k, v in fresh.state_dict().items()}
    try:
        load_adapter(fresh, folder)
    except AdapterFileError as err:
        assert str(err)
        assert not any(isinstance(m, DoRALayer) for m in fresh.modules())
        assert all(p.requires_grad for p in fresh.parameters())
        assert all(torch.equal(pristine[k], v) for k, v in fresh.state_dict().items())
        outcome = "refused"
    else:
        if expected is not None:
            assert_same_snapshot(snapshot(fresh), expected)
        outcome = "loaded"

    target = apply_dora(build("cnn"), CONFIG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    try:
        load_adapter(target, folder)
    except AdapterFileError:
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    else:
        if expected is not None:
            assert_same_snapshot(snapshot(target), expected)

    with suppress(AdapterFileError):
        inspect_adapter(folder)
    return outcome


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def assert_same_adapter(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert same_bits(got[key], expected[key]), key


@dataclass(frozen=True)
class Fault:
    """One way to damage a folder: ``mutate(bytes) -> bytes`` applied to its ``file``."""

    file: str  # WEIGHTS_NAME or CONFIG_NAME
    description: str
    mutate: Callable[[bytes], bytes]

    def __repr__(self) -> str:
        return f"Fault({self.file}: {self.description})"


def run_fuzz(profile: str, base: Path, faults: st.SearchStrategy, examples: int) -> None:
    """Apply each drawn fault to a copy of the folder ``base`` and :func:`check_load` it; a
    torchdora-written folder must load exactly or not at all."""
    exact = DIGEST_KEY in read_tensors(base)[1]
    expected = snapshot(load_adapter(build("cnn"), base)) if exact else None
    outcomes: dict[str, int] = {}

    def check(fault: Fault) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            shutil.copytree(base, folder)
            path = folder / fault.file
            path.write_bytes(fault.mutate(path.read_bytes()))
            outcome = check_load(folder, expected)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    with no_unpickling() as calls:
        run_examples(profile, faults, check, examples)
    assert not calls
    assert outcomes.get("refused", 0) > 0  # the faults do reach the checks


# --------------------------------------------------------------------------- byte-level faults
Mutation = tuple[str, Callable[[bytes], bytes]]  # (description, mutate)


def truncations() -> st.SearchStrategy[Mutation]:
    def truncate(cut: int) -> Callable[[bytes], bytes]:
        return lambda data: data[: cut % max(len(data), 1)]

    return st.integers(0, 2**20).map(lambda cut: (f"truncated at {cut}", truncate(cut)))


def bit_flips() -> st.SearchStrategy[Mutation]:
    def flip(bits: list[int]) -> Callable[[bytes], bytes]:
        def mutate(data: bytes) -> bytes:
            out = bytearray(data)
            for bit in bits:
                position = bit % (8 * len(out))
                out[position // 8] ^= 1 << (position % 8)
            return bytes(out)

        return mutate

    bits = st.lists(st.integers(0, 2**40), min_size=1, max_size=8)
    return bits.map(lambda b: (f"bits {b} flipped", flip(b)))


def overwrites() -> st.SearchStrategy[Mutation]:
    def overwrite(start: int, payload: bytes) -> Callable[[bytes], bytes]:
        def mutate(data: bytes) -> bytes:
            at = start % max(len(data), 1)
            return data[:at] + payload + data[at + len(payload) :]

        return mutate

    where = st.tuples(st.integers(0, 2**40), st.binary(min_size=1, max_size=64))
    return where.map(lambda w: (f"{w[1]!r} written at {w[0]}", overwrite(*w)))


def replacements() -> st.SearchStrategy[Mutation]:
    """Random bytes instead of the file: empty, tiny, with a plausible 8-byte length prefix."""
    prefixed = st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=256)).map(
        lambda a: struct.pack("<Q", a[0]) + a[1]
    )
    payloads = st.binary(max_size=512) | prefixed
    return payloads.map(lambda data: (f"replaced by {data[:40]!r}", lambda _: data))


byte_faults = st.one_of(truncations(), bit_flips(), overwrites(), replacements())


def on(file: str, mutations: st.SearchStrategy[Mutation]) -> st.SearchStrategy[Fault]:
    return mutations.map(lambda m: Fault(file, *m))


# --------------------------------------------------------------------------- structured faults
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
huge = st.integers(0, 2**64 - 1)
HEADER_VALUES = {
    "dtype": st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I8", "U8", "BOOL"])
    | st.sampled_from(["F8_E4M3", "F8_E5M2", "C64", "Q4", ""]),
    "shape": st.lists(st.integers(0, 64) | huge, max_size=4),
    "data_offsets": st.lists(st.integers(0, 4096) | huge, min_size=2, max_size=2),
}
METADATA_KEYS = ["torchdora_sha256", "torchdora_config", "torchdora_version", "format"]


@st.composite
def header_faults(draw) -> Fault:
    """Edits of the safetensors JSON header, written back with a consistent length prefix, so
    they get past the framing: wrong dtypes, shapes, offsets (huge ones included), missing,
    extra and retyped entries, mangled metadata."""
    action = draw(st.sampled_from(["set", "delete", "retype", "drop", "duplicate", "metadata"]))
    field = draw(st.sampled_from(sorted(HEADER_VALUES)))
    value = draw(HEADER_VALUES[field]) if action == "set" else draw(json_values)
    index = draw(st.integers(0, 1000))
    meta_key = draw(st.sampled_from(METADATA_KEYS))

    def edit(header: dict) -> None:
        names = sorted(k for k in header if k != "__metadata__")
        name = names[index % len(names)]
        if action == "set":
            header[name][field] = value
        elif action == "delete":
            del header[name][field]
        elif action == "retype":
            header[name][field] = value
        elif action == "drop":
            del header[name]
        elif action == "duplicate":
            header[f"{name}.extra"] = dict(header[name])
        else:
            header.setdefault("__metadata__", {})[meta_key] = str(value)

    def mutate(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        edit(header)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + length :]

    return Fault(WEIGHTS_NAME, f"{action} {field} of #{index}: {value!r} ({meta_key})", mutate)


CONFIG_KEYS = [
    *("peft_type", "r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "bias"),
    *("rank_pattern", "alpha_pattern", "modules_to_save", "target_modules", "fan_in_fan_out"),
    *("base_model_name_or_path", "inference_mode", "some_new_field"),
]


@st.composite
def config_faults(draw) -> Fault:
    """JSON-level edits of adapter_config.json: a key deleted, set to any JSON value (huge
    integers, NaN, Infinity, nesting, the wrong type), an extra key, the whole document replaced,
    nesting too deep for the parser."""
    key = draw(st.sampled_from(CONFIG_KEYS))
    action = draw(st.sampled_from(["delete", "set", "set", "replace", "nest"]))
    value = draw(json_values | st.sampled_from([0, -1, 2**31, 10**9, 1e308, "LORA", "IA3"]))

    def mutate(data: bytes) -> bytes:
        if action == "nest":
            return b"[" * 100_000 + b"]" * 100_000
        config = json.loads(data)
        if action == "delete":
            config.pop(key, None)
        elif action == "set":
            config[key] = value
        else:
            config = value
        return json.dumps(config).encode()

    return Fault(CONFIG_NAME, f"{action} {key}: {value!r}", mutate)


# --------------------------------------------------------------------------- fuzz tests
@profiles
@pytest.mark.parametrize("base", ["ours", "peft"])
def test_damaged_weights_are_refused_or_exact(profile, base, originals):
    run_fuzz(profile, originals[base], on(WEIGHTS_NAME, byte_faults), examples=100)


@profiles
@pytest.mark.parametrize("base", ["ours", "peft"])
def test_mangled_safetensors_headers_are_refused_or_exact(profile, base, originals):
    run_fuzz(profile, originals[base], header_faults(), examples=100)


@profiles
@pytest.mark.parametrize("base", ["ours", "peft"])
def test_mangled_configs_are_refused_or_exact(profile, base, originals):
    run_fuzz(profile, originals[base], config_faults() | on(CONFIG_NAME, byte_faults), examples=100)


# --------------------------------------------------------------------------- no code, no memory
class Payload:
    """Unpickling this writes a file: the proof that something unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickled_adapter_is_never_unpickled(originals, tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "adapter"
    shutil.copytree(originals["ours"], folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    load_adapter(build("cnn"), folder)  # safetensors beside a pickle: the pickle is ignored
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFileError, match="never unpickles"):
        load_adapter(build("cnn"), folder)
    with pytest.raises(AdapterFileError, match="never unpickles"):
        inspect_adapter(folder)
    assert not marker.exists()


BOUNDED_LOADER = """
import json, resource, sys, time
import torch
from torch import nn
from torchdora.io import AdapterFileError, inspect_adapter, load_adapter

vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = vm * 1024 + 1024**3  # 1 GiB more address space than after the imports
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for folder in sys.argv[1:]:
    start = time.monotonic()
    try:
        load_adapter(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), folder)
        inspect_adapter(folder)
        outcome = "loaded"
    except AdapterFileError:
        outcome = "AdapterFileError"
    except BaseException as err:
        outcome = f"{type(err).__name__}: {err}"
    results[folder] = (outcome, time.monotonic() - start)
print(json.dumps(results))
"""


def huge_declarations(root: Path) -> list[Path]:
    """Folders that declare far more than they hold: a header length of 2⁶³, tensors of 2⁸⁰
    elements or 16 GiB, and configs with ranks of 10⁹ beside rank-2 tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    apply_dora(model, DoRAConfig(target_modules=["0", "1"], rank=2))
    original = root / "original"
    save_adapter(model, original)
    save_file(load_file(original / WEIGHTS_NAME), original / WEIGHTS_NAME)  # PEFT-style
    weights = (original / WEIGHTS_NAME).read_bytes()
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + length])
    key = "base_model.model.0.lora_A.weight"

    def with_header(edit: Callable[[dict], None]) -> bytes:
        edited = json.loads(json.dumps(header))
        edit(edited)
        text = json.dumps(edited).encode()
        return struct.pack("<Q", len(text)) + text + weights[8 + length :]

    def with_config(edit: Callable[[dict], None]) -> bytes:
        config = json.loads((original / CONFIG_NAME).read_text())
        edit(config)
        return json.dumps(config).encode()

    cases = {
        "header-length": (WEIGHTS_NAME, struct.pack("<Q", 2**63) + weights[8:]),
        "shape-2^80": (WEIGHTS_NAME, with_header(lambda h: h[key].update(shape=[2**40, 2**40]))),
        "offsets-16GiB": (
            WEIGHTS_NAME,
            with_header(lambda h: h[key].update(shape=[2**32], data_offsets=[0, 2**34])),
        ),
        "config-rank": (CONFIG_NAME, with_config(lambda c: c.update(r=10**9))),
        "rank-pattern": (CONFIG_NAME, with_config(lambda c: c.update(rank_pattern={"1": 10**9}))),
    }
    folders = []
    for name, (file, data) in cases.items():
        folder = root / name
        shutil.copytree(original, folder)
        (folder / file).write_bytes(data)
        folders.append(folder)
    return folders


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize (Linux)")
def test_huge_declared_sizes_fail_fast_in_bounded_memory(tmp_path):
    """In a process allowed 1 GiB more address space than its imports took, every folder that
    declares gigabytes is refused with AdapterFileError, each within a second."""
    folders = huge_declarations(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", BOUNDED_LOADER, *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for folder in folders:
        outcome, seconds = outcomes[str(folder)]
        assert outcome == "AdapterFileError", (folder.name, outcome)
        assert seconds < 1.0, (folder.name, seconds)


# --------------------------------------------------------------------------- killed saves
def start_worker(folder: Path, *flags: str) -> subprocess.Popen:
    """``save_worker.py`` saving the large adapter into ``folder``, once it says ``saving``."""
    worker = subprocess.Popen(
        [sys.executable, str(TESTS / "save_worker.py"), str(folder), "large", *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline().strip() == "saving"
    return worker


def kill_during_save(folder: Path, phase: str) -> bool:
    """Start a large save into ``folder`` and SIGKILL it in ``phase``: ``"writing"`` (while
    safetensors writes the weights, through a ``.tmp*`` file of its own in the staging folder)
    or ``"flushing"`` (the staged weights file is whole and being synced to disk). Returns
    whether the kill landed there (rarely, the save is faster than the poll)."""
    worker = start_worker(folder)
    deadline = time.monotonic() + 120
    try:
        while worker.poll() is None and time.monotonic() < deadline:
            for staging in folder.glob(f"{STAGING_PREFIX}*"):
                with suppress(FileNotFoundError):
                    names = {p.name: p for p in staging.iterdir()}
                    writing = next((p for n, p in names.items() if n.startswith(".tmp")), None)
                    target = writing if phase == "writing" else names.get(WEIGHTS_NAME)
                    if target is not None:
                        os.kill(worker.pid, signal.SIGKILL)
                        worker.wait()
                        return target.exists() and complete(target) == (phase == "flushing")
        return False
    finally:
        worker.kill()
        worker.wait()


def complete(weights: Path) -> bool:
    """Whether ``weights`` is a whole safetensors file matching its checksum."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(weights, Path(tmp) / WEIGHTS_NAME)
        try:
            read_tensors(tmp)
        except AdapterFileError:
            return False
    return True


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}


@pytest.mark.parametrize("phase", ["writing", "flushing"])
def test_save_killed_midway_keeps_previous_adapter(tmp_path, phase):
    """A 70 MB save SIGKILLed while safetensors writes its file, or while the whole file is
    synced to disk: the folder still holds the previous adapter, byte for byte, loadable by
    torchdora and PEFT; the only leftover is a hidden staging folder the next save removes."""
    folder = tmp_path / "adapter"
    previous = save_worker.adapted("small")
    for _ in range(5):  # the kill lands in its phase almost always; retry if the save won
        save_adapter(previous, folder)
        before = files_of(folder)
        if kill_during_save(folder, phase):
            break
    else:
        pytest.fail(f"could not kill the save while {phase}, 5 times")

    assert files_of(folder) == before
    leftovers = [p.name for p in folder.iterdir() if p.name not in before]
    assert len(leftovers) == 1 and leftovers[0].startswith(STAGING_PREFIX)  # hidden: unread
    loaded = load_adapter(save_worker.base(), folder)
    assert_same_adapter(peft_state_dict(loaded), peft_state_dict(previous))
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(save_worker.base(), folder)
    x = torch.randn(3, save_worker.WIDTH)
    with torch.no_grad():
        assert rel_err(theirs(x), previous(x)) <= 1e-5

    save_adapter(previous, folder)  # the next save clears the leftovers
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_save_killed_between_its_renames_is_refused_loudly(tmp_path):
    """The instant between replacing the weights and replacing a changed config: the folder
    then mixes two saves, and loading says so instead of using the new weights with the old
    rank and alpha."""
    folder = tmp_path / "adapter"
    save_adapter(save_worker.adapted("small"), folder)
    worker = start_worker(folder, "--kill-between-renames")
    assert worker.wait(timeout=120) == -signal.SIGKILL
    with pytest.raises(AdapterFileError, match="does not belong to the weights beside it"):
        load_adapter(save_worker.base(), folder)
    with pytest.raises(AdapterFileError, match="interrupted"):
        inspect_adapter(folder)


def test_unchanged_config_is_not_rewritten(tmp_path):
    """Saving again with the same config (a training run's checkpoints) replaces the weights
    alone: one rename, so no instant where the folder mixes two saves."""
    model = saved_model()
    save_adapter(model, tmp_path)
    config = (tmp_path / CONFIG_NAME).stat()
    perturb_adapters(model)
    save_adapter(model, tmp_path)
    again = (tmp_path / CONFIG_NAME).stat()
    assert (again.st_ino, again.st_mtime_ns) == (config.st_ino, config.st_mtime_ns)
    assert_same_adapter(
        peft_state_dict(load_adapter(build("cnn"), tmp_path)), peft_state_dict(model)
    )


@pytest.mark.slow
def test_save_killed_at_random_moments_leaves_a_whole_adapter(tmp_path):
    """SIGKILL at random times from the worker's first line to the end of its save, 25 times:
    the folder always holds the previous adapter or the new one, bit for bit, or (killed
    between the two renames) refuses to load."""
    folder = tmp_path / "adapter"
    previous, new = save_worker.adapted("small"), save_worker.adapted("large")
    expected = {"previous": peft_state_dict(previous), "new": peft_state_dict(new)}
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        save_adapter(previous, folder)
        worker = start_worker(folder)
        time.sleep(0.4 * float(torch.rand((), generator=generator)))
        worker.kill()
        worker.wait()
        try:
            state = peft_state_dict(load_adapter(save_worker.base(), folder))
        except AdapterFileError as err:
            assert "does not belong to the weights" in str(err)
            seen.add("mixed")
            continue
        which = "new" if state.keys() == expected["new"].keys() else "previous"
        assert_same_adapter(state, expected[which])
        seen.add(which)
    assert "previous" in seen


def test_damaged_digest_key_name_does_not_skip_the_check(originals, tmp_path):
    """Regression (found by the fuzz in CI): a flipped bit in the *name* of the digest key made
    the file look unchecked, so a second flip in the tensor data loaded silently."""
    folder = tmp_path / "adapter"
    shutil.copytree(originals["ours"], folder)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[data.index(DIGEST_KEY.encode())] ^= 1  # "torchdora_sha256" -> "uorchdora_sha256"
    data[-1] ^= 1  # and a tensor byte
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="lacks"):
        load_adapter(build("cnn"), folder)
