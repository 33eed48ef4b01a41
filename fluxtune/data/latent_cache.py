"""The latent cache: every example encoded once (VAE latents, Fill conditioning, prompt embeddings) into Parquet.

One cache folder, `<cache home>/latents/<key>/`:

    rows/          Parquet, row groups of 16 rows: line, split_key, from_val_file, prompt_index, height, width
                   (pixels: the row's bucket, or the resolution), x0 [seq, 64] packed target latents,
                   cond [seq, 320] packed masked-image latents ++ packed mask
    prompts/       Parquet: prompt_index, prompt, prompt_embeds [L, joint_dim], pooled [pooled_dim]; index 0 is ""
    index.parquet  the light columns of rows/ with each row's file, row group and offset (`cache_index`)
    manifest.json  what was encoded with what; written last

A sweep searching preprocessing keys builds one cache per choice from the same rows: their prompts are encoded
once (per dtype) and the other caches' prompts/ files are hard links to them (server-side copies on a URI), noted
as `prompts_from` in the manifest.

Tensors are stored in the preprocessing's dtype (float16 unless `data.cache_dtype: float32`) in the layout of
`fluxtune.data.cache_format`; trials stream them (`fluxtune.data.stream`).

The folder is built under a temporary name and renamed into place after its manifest is written, so a folder
under its final name is always complete and a crash leaves only a `.tmp-` folder that nothing reads. A cache
home that is a URI (s3://…) has no rename: rows/ and prompts/ go under a fresh `<key>/attempt-<id>/` prefix and
manifest.json, written last, names that prefix; a prefix no manifest names (a crashed build) is never read.

The key is a sha256 of everything that changes the tensors: each row's file *contents* (not paths or mtimes:
copying a dataset keeps its cache, touching a file without changing it too, and editing a PNG in place never
reuses a stale cache), prompts and split keys, the model's identity, resolution and mask threshold, and the
code and library versions that encode. Hashing reads every byte once (≈1 GB/s), far cheaper than encoding.
For a model folder, config and tokenizer files are hashed by content and weight files by name, size and
mtime: hashing 20 GB of T5 weights on every run would cost more than the cache saves.

Import-light at module level: `fluxtune data check` and key computation need neither torch nor ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from fluxtune import storage
from fluxtune.data.buckets import check_buckets
from fluxtune.data.cache_format import (DTYPES, FILE_BYTES, PROMPT_GROUP_ROWS, PROMPTS_OPTIONS, ROW_GROUP_ROWS, ROWS_OPTIONS,
                                        prompts_table, rows_table)
from fluxtune.data.cache_index import INDEX_FILE, write_index
from fluxtune.data.images import check_mask_threshold, check_resolution, is_uri, split_key
from fluxtune.data.rows import Row
from fluxtune.data.selection import Selection
from fluxtune.data.shared_prompts import link_files, reusable_prompts

CACHE_FORMAT = 2  # 2: plain Parquet tensors (cache_format), small row groups, height/width always, dtype
BUCKET_CROP = "cover-nearest-bucket"  # resize to cover the bucket nearest the aspect ratio, centre-crop
MANIFEST = "manifest.json"
ENCODE_BATCH = 16  # rows per VAE call: large enough to amortise Python overhead, small enough for 1024² on a GPU
# Source files whose changes change the encoded tensors.
_ENCODING_CODE = ("flux/packing.py", "flux/encoded.py", "data/images.py", "data/buckets.py", "data/cache_format.py")
_PRESET_CODE = ("flux/presets.py", "flux/model.py")
_LIBRARIES = ("torch", "diffusers", "transformers", "pillow", "numpy")
_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become arrays before the VAE (see `fluxtune.data.images`)."""

    resolution: int
    mask_threshold: float = 0.5
    crop: str = "centre-square"  # resize the shorter side, centre-crop; image bicubic, mask bilinear then threshold
    # Aspect-ratio buckets as (width, height) sizes (`fluxtune.data.buckets`); None: every row centre-square.
    buckets: tuple[tuple[int, int], ...] | None = None
    dtype: str = "float16"  # how the tensors are stored (read back as float32)

    def __post_init__(self) -> None:
        check_resolution(self.resolution)
        check_mask_threshold(self.mask_threshold)
        if self.dtype not in DTYPES:
            raise ValueError(f"the cache dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.buckets is not None:
            sizes = tuple(tuple(size) for size in check_buckets(self.buckets, self.resolution))
            object.__setattr__(self, "buckets", sizes)
            object.__setattr__(self, "crop", BUCKET_CROP)

    def identity(self) -> dict[str, Any]:
        """What goes into the cache key and manifest (buckets only when there are some)."""
        described = asdict(self)
        if self.buckets is None:
            del described["buckets"]
        else:
            described["buckets"] = [list(size) for size in self.buckets]
        return described


@dataclass(frozen=True)
class CacheRow:
    """One example as the cache sees it: where its files are, and what decides its split and prompt."""

    line: int
    image: str
    mask: str
    output: str
    prompt: str
    split_key: str
    from_val_file: bool


@dataclass(frozen=True)
class LatentCache:
    """A complete cache folder (a local Path, or a URI string) and its manifest."""

    path: Path | str
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def rows_dir(self) -> str:
        return self._data("rows")

    @property
    def prompts_dir(self) -> str:
        return self._data("prompts")

    @property
    def index_path(self) -> str:
        return self._data(INDEX_FILE)

    def _data(self, name: str) -> str:
        if isinstance(self.path, Path):
            return str(self.path / name)
        return storage.join(self.path, self.manifest["data_prefix"], name)


def cache_home(cache_dir: str | os.PathLike | None = None) -> Path | str:
    """`cache_dir` (a folder or a URI), else $FLUXTUNE_CACHE/latents, else ~/.cache/fluxtune/latents."""
    from fluxtune.data.sample import sample_cache_root

    if cache_dir is not None and is_uri(str(cache_dir)):
        return str(cache_dir).rstrip("/")
    return Path(cache_dir) if cache_dir is not None else sample_cache_root().parent / "latents"


def _cache_folder(home: Path | str, key: str) -> Path | str:
    return home / key if isinstance(home, Path) else storage.join(home, key)


def _read_manifest(folder: Path | str) -> dict[str, Any]:
    """The manifest of a cache folder; OSError/ValueError when there is none (an incomplete cache)."""
    if isinstance(folder, Path):
        return json.loads((folder / MANIFEST).read_text())
    return json.loads(storage.read_bytes(storage.join(folder, MANIFEST)))


def cache_rows(selection: Selection) -> list[CacheRow]:
    """The training file's rows, then the explicit validation file's (flagged), in file order."""

    def convert(rows: Iterable[Row], folder: str, from_val: bool) -> list[CacheRow]:
        return [CacheRow(r.line, r.image, r.mask, r.output, r.prompt or "", split_key(r.output, folder), from_val)
                for r in rows]

    out = convert(selection.rows, selection.folder, False)
    if selection.val_rows is not None:
        from fluxtune.data.selection import jsonl_folder

        out += convert(selection.val_rows, jsonl_folder(selection.val_jsonl or ""), True)
    return out


def _file_digest(path: str) -> str:
    if is_uri(path) and not path.startswith("file://"):
        return "remote:" + storage.change_token(path)  # the store's size and mtime instead of a download
    digest = hashlib.blake2b(digest_size=20)
    with open(path.removeprefix("file://"), "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _code_digest(files: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (_PACKAGE / name).read_bytes())
    return digest.hexdigest()[:16]


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def model_identity(model: dict[str, Any]) -> dict[str, Any]:
    """What identifies the VAE and text encoders of a `model:` config (the transformer does not matter here)."""
    if model.get("preset"):
        return {"preset": model["preset"], "seed": model.get("seed", 0), "code": _code_digest(_PRESET_CODE)}
    root = Path(model["path"])
    files: dict[str, str] = {}
    for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        for file in sorted((root / part).rglob("*")) if (root / part).is_dir() else []:
            if not file.is_file():
                continue
            name = str(file.relative_to(root))
            if file.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"):
                stat = file.stat()
                files[name] = f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
            else:
                files[name] = hashlib.blake2b(file.read_bytes(), digest_size=20).hexdigest()
    return {"path": str(root.resolve()), "files": files}


def cache_key(rows: list[CacheRow], model: dict[str, Any], preprocessing: Preprocessing, threads: int = 8) -> str:
    """The content hash naming a cache (see the module docstring for what goes in and why)."""
    paths = sorted({p for r in rows for p in (r.image, r.mask, r.output)})
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on large buffers
        digests = dict(zip(paths, pool.map(_file_digest, paths)))
    described = {
        "format": CACHE_FORMAT,
        "rows": [[r.line, r.split_key, r.prompt, r.from_val_file, digests[r.image], digests[r.mask],
                  digests[r.output]] for r in rows],
        "model": model_identity(model),
        "preprocessing": preprocessing.identity(),
        "code": _code_digest(_ENCODING_CODE),
        "libraries": _library_versions(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def find_cache(key: str, cache_dir: str | os.PathLike | None = None) -> LatentCache | None:
    """The complete cache with this key, or None (a folder without a readable manifest is never used)."""
    folder = _cache_folder(cache_home(cache_dir), key)
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format") != CACHE_FORMAT:
        return None
    return LatentCache(folder, manifest)


def open_cache(folder: str | os.PathLike) -> LatentCache:
    """A cache folder by path or URI (what trials receive); ValueError when it is not a complete cache."""
    folder = str(folder).rstrip("/") if is_uri(str(folder)) else Path(folder)
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} is not a complete latent cache (no readable {MANIFEST})") from error
    return LatentCache(folder, manifest)


def vae_scale_factor(model: dict[str, Any]) -> int:
    """Pixels per latent cell, from the VAE config (as `fluxtune.flux.packing.vae_scale_factor`), no weights read."""
    if model.get("preset"):
        from fluxtune.flux.presets import preset

        config = preset(model["preset"]).vae
    else:
        config = json.loads((Path(model["path"]) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def is_cache_folder(path: str) -> bool:
    if is_uri(path):
        return storage.exists(storage.join(path, MANIFEST))
    return os.path.isfile(os.path.join(path, MANIFEST))


def ensure_cache(rows: list[CacheRow], model: dict[str, Any], preprocessing: Preprocessing,
                 cache_dir: str | os.PathLike | None = None, start_ray: Callable[[], Any] | None = None,
                 prompts_from: LatentCache | None = None) -> tuple[LatentCache, bool]:
    """The cache for these rows, building it when missing; returns (cache, built_now). `start_ray`,
    `prompts_from`: see `build_cache`."""
    if not rows:
        raise ValueError("cannot cache an empty dataset")
    key = cache_key(rows, model, preprocessing)
    found = find_cache(key, cache_dir)
    if found is not None:
        return found, False
    return build_cache(rows, model, preprocessing, key, cache_dir, start_ray, prompts_from), True


CACHE_SET_SUFFIX = ".cacheset.json"


def write_cache_set(caches: list[LatentCache], cache_dir: str | os.PathLike | None = None) -> str:
    """A file listing several caches by preprocessing (a sweep searching data keys); returns its path or URI.
    Named by its contents, so the same sweep writes the same file, and written whole (rename, or one object)."""
    listed = [{"preprocessing": c.manifest["preprocessing"], "path": str(c.path)} for c in caches]
    text = json.dumps({"format": CACHE_FORMAT, "caches": listed}, indent=1)
    name = "set-" + hashlib.sha256(text.encode()).hexdigest()[:16] + CACHE_SET_SUFFIX
    home = cache_home(cache_dir)
    if isinstance(home, str):
        storage.write_bytes(storage.join(home, name), text.encode())
        return storage.join(home, name)
    home.mkdir(parents=True, exist_ok=True)
    staging = home / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.write_text(text)
    os.replace(staging, home / name)
    return str(home / name)


def is_cache_set(path: str) -> bool:
    return path.endswith(CACHE_SET_SUFFIX)


def cache_for(cache_set: str, preprocessing: dict[str, Any]) -> str:
    """The cache of a cache set built with this preprocessing identity; ValueError naming what there is."""
    text = storage.read_bytes(cache_set).decode() if is_uri(cache_set) else Path(cache_set).read_text()
    listed = json.loads(text)["caches"]
    for entry in listed:
        if entry["preprocessing"] == preprocessing:
            return entry["path"]
    raise ValueError(f"no latent cache in {cache_set} was built with {preprocessing} (built: "
                     f"{[entry['preprocessing'] for entry in listed]}): a trial varies a data key the sweep did not "
                     "prepare a cache for")


def _encoder_resources() -> dict[str, Any]:
    """One encoder actor per GPU when there are GPUs; on CPU one actor, leaving CPUs for the decode tasks."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    # No actor restarts: a one-off build that fails is simply run again (and Ray warns about restartable actors
    # whose constructor arguments live in the object store).
    if gpus:
        return {"num_gpus": 1, "compute": ActorPoolStrategy(size=gpus), "max_restarts": 0}
    return {"num_cpus": 1, "compute": ActorPoolStrategy(size=1), "max_restarts": 0}


def build_cache(rows: list[CacheRow], model: dict[str, Any], preprocessing: Preprocessing, key: str,
                cache_dir: str | os.PathLike | None = None, start_ray: Callable[[], Any] | None = None,
                prompts_from: LatentCache | None = None) -> LatentCache:
    """Encode every row with Ray Data (decode tasks → VAE actor → Parquet) and the prompts likewise.
    `start_ray` runs first when Ray is not running yet (`fluxtune data prepare` starts Ray only when there is
    something to encode). `prompts_from`: a cache of the same rows and model (another cache of a sweep's set)
    whose prompt table is linked or copied instead of encoded again, when it holds exactly these prompts in
    this dtype (`fluxtune.data.shared_prompts`)."""
    import ray

    if not ray.is_initialized() and start_ray is not None:
        start_ray()
    home = cache_home(cache_dir)
    if isinstance(home, str):
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        manifest = _encode(rows, model, preprocessing, key, storage.join(home, key, attempt), prompts_from)
        # The manifest is the completion marker: written last, it names the prefix this build filled.
        storage.write_bytes(storage.join(home, key, MANIFEST),
                           json.dumps({**manifest, "data_prefix": attempt}, indent=1).encode())
    else:
        home.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=home))
        try:
            manifest = _encode(rows, model, preprocessing, key, str(staging), prompts_from)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
            staging.chmod(0o755)  # mkdtemp makes it private; a shared cache home should stay readable
            try:
                os.rename(staging, home / key)
            except OSError:
                if find_cache(key, cache_dir) is None:  # not a lost race with another builder: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    found = find_cache(key, cache_dir)
    assert found is not None
    return found


def _encode(rows: list[CacheRow], model: dict[str, Any], preprocessing: Preprocessing, key: str,
            out: str, prompts_from: LatentCache | None = None) -> dict[str, Any]:
    """Write rows/ and prompts/ under `out` (a folder or a URI prefix); returns the manifest to publish."""
    import ray.data

    from fluxtune.data.images import load_examples_batch
    from fluxtune.flux.encoded import LatentEncoder, PromptEncoder

    started = time.perf_counter()
    prompts = ["", *sorted({r.prompt for r in rows if r.prompt})]
    prompt_index = {p: i for i, p in enumerate(prompts)}
    items = [{"line": r.line, "image": r.image, "mask": r.mask, "output": r.output, "split_key": r.split_key,
              "from_val_file": r.from_val_file, "prompt_index": prompt_index[r.prompt]} for r in rows]
    encoder = {"fn_constructor_kwargs": {"model": model}, "batch_size": ENCODE_BATCH, "batch_format": "numpy",
               **_encoder_resources()}
    decode = partial(load_examples_batch, resolution=preprocessing.resolution,
                     mask_threshold=preprocessing.mask_threshold, buckets=preprocessing.buckets)
    tables = {"batch_format": "numpy", "batch_size": ENCODE_BATCH}
    with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60 (pinned below 2.61)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        rows_dataset = (ray.data.from_items(items)
                        .map_batches(decode, batch_size=ENCODE_BATCH, batch_format="numpy")
                        .map_batches(LatentEncoder, **encoder)
                        .map_batches(partial(rows_table, dtype=preprocessing.dtype,
                                             resolution=preprocessing.resolution), **tables))
        prompts_dataset = (ray.data.from_items([{"prompt_index": i, "prompt": p} for i, p in enumerate(prompts)])
                           .map_batches(PromptEncoder, **encoder)
                           .map_batches(partial(prompts_table, dtype=preprocessing.dtype), **tables))
    # Small row groups: a row group is what a training stream reads at a time (fluxtune.data.stream).
    rows_dataset.write_parquet(_under(out, "rows"), row_group_size=ROW_GROUP_ROWS, min_bytes_per_file=FILE_BYTES,
                               **ROWS_OPTIONS)
    record = _model_record(model)
    reused = reusable_prompts(prompts_from, record, preprocessing.dtype, prompts)
    if reused is not None:
        link_files(reused.prompts_dir, _under(out, "prompts"))
    else:
        prompts_dataset.write_parquet(_under(out, "prompts"), row_group_size=PROMPT_GROUP_ROWS,
                                      min_bytes_per_file=FILE_BYTES, **PROMPTS_OPTIONS)
    write_index(_under(out, "rows"), _under(out, INDEX_FILE))  # what trials read instead of every row group
    return {
        "format": CACHE_FORMAT, "key": key, "rows": len(rows),
        "val_file_rows": sum(r.from_val_file for r in rows), "prompts": len(prompts),
        "model": record,
        "preprocessing": preprocessing.identity(), "vae_scale_factor": vae_scale_factor(model),
        "dtype": preprocessing.dtype, "row_group_rows": ROW_GROUP_ROWS,
        "prompts_from": reused.key if reused is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_s": round(time.perf_counter() - started, 3),
    }


def _model_record(model: dict[str, Any]) -> dict[str, Any]:
    """The model as a manifest records it: the VAE's and text encoders' identity and the spec."""
    return model_identity(model) | {"spec": {k: model.get(k) for k in ("preset", "path", "seed")}}


def _under(out: str, name: str) -> str:
    return storage.join(out, name) if is_uri(out) else os.path.join(out, name)
