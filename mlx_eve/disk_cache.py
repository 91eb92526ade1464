"""KV caches of prompt prefixes kept on disk, so that they outlive the process: a prompt cache that survives
restarts (``DiskPromptCache``), and the file format ``generate --prompt-cache-file`` shares with it.

Each entry is one mlx-lm prompt-cache file (``save_prompt_cache``: safetensors) whose metadata holds the
``identity`` of the model it belongs to and the ``key`` of the tokens it holds: the engine's prompt-cache key,
token ids with each image token standing for its image's digest. A file is named by a hash of its key; the index
of keys is rebuilt at startup from the files' headers alone. Files are written to a temporary name in the same
folder, synced, then renamed, so that a crash mid-write leaves no file that looks complete, and processes sharing
a folder never read a half-written one. A file that cannot be used (truncated, corrupt, of another shape) is
logged once and deleted; one of another model is left to it. Nothing here raises: a cache is only ever missed.
"""

import copy
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache, trim_prompt_cache

from .loading import weight_files
from .models.base import EVEModel
from .processor import Processor

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_TEMP_SUFFIX = ".tmp"


class UnusableCacheFile(Exception):
    """A prompt-cache file that cannot be used for this model and prompt; the message says why."""


class ForeignCacheFile(UnusableCacheFile):
    """A sound prompt-cache file of another model: left alone, for that model."""


def model_identity(model: EVEModel, processor: Processor, adapter_path: Optional[str] = None) -> Dict[str, Any]:
    """What a KV cache is valid for: the model folder and its weight files (name, size, modification time: a
    model retrained in place does not reuse its old caches), the adapters, the model type, and the ``layout`` of
    its KV cache (each layer's cache class, shapes and dtype). It makes a one-token model call to see the layout,
    so under tensor parallelism every rank must call it."""
    probe = make_prompt_cache(model)
    model(mx.array([[0]]), cache=probe)
    mx.eval([c.state for c in probe])
    return {
        "model": str(processor.source_path.resolve()),
        "weights": _fingerprint(weight_files(processor.source_path)),
        "adapters": None if adapter_path is None else _fingerprint(sorted(Path(adapter_path).resolve().iterdir())),
        "model_type": model.model_type,
        "layout": cache_layout(probe),
    }


def _fingerprint(files: Sequence[Path]) -> List[str]:
    return [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]


def cache_layout(cache: List[Any]) -> str:
    """Each layer's cache class and the shapes (all but the token axis) and dtypes of its state."""

    def shape(a: mx.array) -> List[int]:
        return list(a.shape[:2] + a.shape[3:]) if a.ndim == 4 else list(a.shape)

    return json.dumps([[type(c).__name__, [[shape(a), str(a.dtype)] for a in _arrays(c)]] for c in cache])


def _arrays(layer_cache: Any) -> List[mx.array]:
    """The arrays of one layer's cache state (which may also hold numbers, such as its offset)."""
    return [a for _, a in tree_flatten(layer_cache.state) if isinstance(a, mx.array)]


def save_atomically(path: Path, cache: List[Any], identity: Dict[str, Any], key: Sequence) -> int:
    """Write ``cache``, holding the tokens of ``key``, to ``path`` for the model of ``identity``: to a temporary
    file beside it, synced, then renamed. Returns the file's size; ``OSError`` if it could not be written."""
    metadata = {"identity": _canonical(identity), "key": json.dumps(list(key))}
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as file:
            save_prompt_cache(file, cache, metadata)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return path.stat().st_size


def read_key(path: Path, identity: Dict[str, Any]) -> Tuple[Any, ...]:
    """The key of the tokens the file at ``path`` holds, from its header alone (which must describe a complete
    file of the model of ``identity``); ``UnusableCacheFile`` otherwise, ``ForeignCacheFile`` for another model's."""
    metadata = _header_metadata(path)
    try:
        fields, _, _ = tree_unflatten(list(metadata.items()))
        stored_identity, key = fields["identity"], json.loads(fields["key"])
    except (ValueError, KeyError, TypeError) as e:
        raise UnusableCacheFile(f"it is not a prompt-cache file of this library ({e!r})") from e
    if stored_identity != _canonical(identity):
        raise ForeignCacheFile("it belongs to another model (or other weights or adapters)")
    if not isinstance(key, list) or not all(isinstance(t, (int, str)) and not isinstance(t, bool) for t in key):
        raise UnusableCacheFile("its key is not a list of tokens")
    return tuple(key)


def read_cache(path: Path, identity: Dict[str, Any]) -> Tuple[Tuple[Any, ...], List[Any]]:
    """The key and the KV cache of the file at ``path``, checked against the model of ``identity`` (its layout,
    when the identity has one) and against the key (every layer holds as many tokens); ``UnusableCacheFile``
    if anything is amiss."""
    key = read_key(path, identity)
    try:
        cache = load_prompt_cache(str(path))
        mx.eval([c.state for c in cache])
    except Exception as e:  # whatever a damaged file makes the loader raise
        raise UnusableCacheFile(f"it cannot be loaded ({e!r})") from e
    if "layout" in identity and cache_layout(cache) != identity["layout"]:
        raise UnusableCacheFile("its KV cache does not have the model's shapes")
    for c in cache:
        held = [a.shape[2] for a in _arrays(c) if a.ndim == 4]
        if getattr(c, "offset", len(key)) != len(key) or any(n < len(key) for n in held):
            raise UnusableCacheFile(f"its KV cache does not hold the {len(key)} tokens of its key")
    return key, cache


def _canonical(identity: Dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def _header_metadata(path: Path) -> Dict[str, str]:
    """A safetensors file's metadata, read from its header, once the header shows that the file is whole."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100 << 20:
                raise UnusableCacheFile("its header is too long")
            header = json.loads(file.read(length))
        size = path.stat().st_size
    except (OSError, struct.error, ValueError) as e:
        raise UnusableCacheFile(f"its header cannot be read ({e!r})") from e
    try:
        expected = 8 + length + max((t["data_offsets"][1] for n, t in header.items() if n != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        raise UnusableCacheFile("its header is not a safetensors header") from e
    if size != expected:
        raise UnusableCacheFile(f"it is {size} bytes long, not the {expected} its header says")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise UnusableCacheFile("it has no metadata")
    return metadata


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_owner_alive(name: str) -> bool:
    """Whether the process that names a temporary file (``.NAME.PID-RANDOM.tmp``) still runs (and may write it)."""
    try:
        pid = int(name[: -len(_TEMP_SUFFIX)].rsplit(".", 1)[1].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except OSError:  # another user's process: it exists
        return True
    return pid != os.getpid()  # this process writes nothing yet: the file is a previous run's (same process id)


@dataclass
class _Entry:
    key: Tuple[Any, ...]
    size: int


class DiskPromptCache:
    """KV caches of prompt prefixes in ``folder``, at most ``max_bytes`` of files, for the model of ``identity``
    (see ``model_identity``). ``store`` a cache under its prompt-cache key (``store_later``: from a thread of its
    own, so the caller goes on while the file is written); ``fetch`` the longest stored prefix of a key. The least
    recently used files go first. Processes may share the folder."""

    # Writes waiting for the writer thread at most; a store beyond that is skipped, the caller never waits.
    PENDING_WRITES = 2

    def __init__(self, folder: Path, max_bytes: int, identity: Dict[str, Any]):
        self.folder, self.max_bytes, self.identity = Path(folder), max_bytes, identity
        self._entries: Dict[str, _Entry] = {}  # by file name
        self._store_failing = False  # warn once when storing starts to fail, not for every store
        self._lock = threading.RLock()  # the index, shared with the writer thread; never held while a file is written
        self._writes: "queue.Queue[Optional[Tuple[Tuple[Any, ...], List[Any]]]]" = queue.Queue(self.PENDING_WRITES)
        self._writer: Optional[threading.Thread] = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            listing = sorted(self.folder.iterdir())
        except OSError as e:
            logger.warning("The prompt cache folder %s cannot be used: %s", self.folder, e)
            listing = []
        for path in listing:
            if path.name.endswith(_TEMP_SUFFIX) and not _temp_owner_alive(path.name):
                path.unlink(missing_ok=True)  # left by a write that never finished
            elif path.suffix == SUFFIX:
                self._index(path)

    def _index(self, path: Path) -> None:
        try:
            key = read_key(path, self.identity)
            with self._lock:
                self._entries[path.name] = _Entry(key, path.stat().st_size)
        except UnusableCacheFile as e:
            self._discard(path, e)
        except OSError:  # deleted meanwhile by another process
            with self._lock:
                self._entries.pop(path.name, None)

    def _discard(self, path: Path, reason: UnusableCacheFile) -> None:
        """Log, once, why a file is not used; delete it unless it is another model's."""
        with self._lock:
            self._entries.pop(path.name, None)
        if isinstance(reason, ForeignCacheFile):
            logger.warning("Prompt cache file %s is skipped: %s.", path, reason)
            return
        logger.warning("Prompt cache file %s is deleted: %s.", path, reason)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass

    @property
    def nbytes(self) -> int:
        """The size of the files of this model's entries."""
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def held(self, key: Sequence) -> int:
        """How many tokens of ``key`` the longest stored prefix holds (0: none), from the index alone."""
        return max((length for length, _ in self._prefixes(key)), default=0)

    def _prefixes(self, key: Sequence) -> List[Tuple[int, str]]:
        """(length, file name) of each stored entry whose key is a prefix of ``key``."""
        key = tuple(key)
        with self._lock:
            return [(len(e.key), name) for name, e in self._entries.items() if key[: len(e.key)] == e.key]

    def fetch(self, key: Sequence) -> Optional[Tuple[int, List[Any]]]:
        """The longest stored entry whose key is a prefix of ``key`` (possibly all of it): how many tokens it holds,
        and its KV cache, freshly loaded (the caller may change it). ``None`` when there is none."""
        key = tuple(key)
        for length, name in sorted(self._prefixes(key), reverse=True):
            path = self.folder / name
            try:
                stored_key, cache = read_cache(path, self.identity)
            except UnusableCacheFile as e:
                self._discard(path, e)
                continue
            except Exception as e:  # never let a file break a request
                logger.warning("Prompt cache file %s could not be read: %r", path, e)
                continue
            if stored_key != key[:length]:  # changed by another process since it was indexed
                self._index(path)
                continue
            try:
                os.utime(path)  # most recently used
            except OSError:
                pass
            return length, cache
        return None

    def store(self, key: Sequence, cache: List[Any]) -> None:
        """Keep ``cache``, which holds the tokens of ``key``, replacing the least recently used entries if the
        folder would exceed ``max_bytes``. An entry larger than that is not kept; a failure is logged."""
        key = tuple(key)
        path = self.folder / _file_name(key)
        try:
            with self._lock:
                if path.name in self._entries and path.exists():
                    return
                state_bytes = sum(a.nbytes for c in cache for a in _arrays(c))
                if state_bytes > self.max_bytes:
                    return
                self._evict(self.max_bytes - state_bytes)
            size = save_atomically(path, cache, self.identity, key)
            with self._lock:
                self._entries[path.name] = _Entry(key, size)
                self._evict(self.max_bytes)
        except Exception as e:  # a full disk, a read-only folder: the cache is only an optimisation
            if not self._store_failing:
                logger.warning("Could not write to the prompt cache in %s: %r", self.folder, e)
            self._store_failing = True
            return
        self._store_failing = False

    def store_later(self, key: Sequence, cache: List[Any], tokens: int) -> None:
        """``store`` the first ``tokens`` tokens of a trimmable ``cache`` (which holds ``key``'s first ones) from the
        writer thread. Their arrays are evaluated here, so the caller may go on changing ``cache``; if
        ``PENDING_WRITES`` wait already, this one is skipped."""
        key = tuple(key[:tokens])
        with self._lock:
            if _file_name(key) in self._entries:
                return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_pending, name="mlx-eve-disk-cache", daemon=True)
            self._writer.start()
        try:
            self._writes.put_nowait((key, snapshot(cache, tokens)))
        except queue.Full:
            pass

    def _write_pending(self) -> None:
        while (job := self._writes.get()) is not None:
            self.store(*job)

    def close(self) -> None:
        """Finish the writes ``store_later`` queued, then stop the writer thread."""
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join()
            self._writer = None

    def _evict(self, room: int) -> None:
        """Delete the least recently used entries until they take at most ``room`` bytes."""
        used = self._entries_by_use()
        total = sum(self._entries[name].size for _, name in used)
        for _, name in used:
            if total <= room:
                break
            total -= self._entries.pop(name).size
            (self.folder / name).unlink(missing_ok=True)

    def _entries_by_use(self) -> List[Tuple[int, str]]:
        """(modification time, name) of the entries, oldest first; entries whose file is gone are forgotten."""
        used = []
        for name in list(self._entries):
            try:
                used.append((os.stat(self.folder / name).st_mtime_ns, name))
            except OSError:
                del self._entries[name]
        return sorted(used)


def prefix_of(cache: List[Any], tokens: int) -> List[Any]:
    """A view of a trimmable ``cache`` that holds only its first ``tokens`` tokens (its arrays shared)."""
    view = [copy.copy(c) for c in cache]
    trim_prompt_cache(view, view[0].offset - tokens)
    return view


def snapshot(cache: List[Any], tokens: int) -> List[Any]:
    """The first ``tokens`` tokens of a trimmable ``cache`` as a cache of their own: copies, evaluated, so that
    updates of ``cache`` in place leave it as it is and another thread can write it without evaluating anything."""

    def first_tokens(a: Any) -> Any:
        return mx.contiguous(a[..., :tokens, :]) if isinstance(a, mx.array) and a.ndim == 4 else a

    view = prefix_of(cache, tokens)
    for c in view:
        c.state = tree_map(first_tokens, c.state)
    mx.eval([c.state for c in view])
    return view


def _file_name(key: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(key)).encode()).hexdigest() + SUFFIX
