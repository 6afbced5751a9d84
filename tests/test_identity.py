import hashlib
import types

import pytest

from any4lib import hub, identity


def test_a_model_folder_identity_follows_its_files_and_hashes_each_once(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_CACHE", str(tmp_path / "cache"))
    first = identity.model_identity(str(tiny_folder))
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashed.append(a) or real(*a))
    assert identity.model_identity(str(tiny_folder)) == first
    assert not [a for a in hashed if not a]  # no file re-hashed: (path, size, mtime) unchanged
    config = tiny_folder / "config.json"
    assert '"rms_norm_eps": 1e-06' in config.read_text()
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert identity.model_identity(str(tiny_folder)) != first


def test_text_identity_is_a_hash_of_the_text(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ANY4_CACHE", str(tmp_path / "cache"))
    before = identity.text_identity(text_file)
    assert before == "sha256:" + hashlib.sha256(text_file.read_bytes()).hexdigest()[:20]
    text_file.write_text("other words")
    assert identity.text_identity(text_file) != before


def test_hub_ids_are_keyed_by_the_resolved_revision(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    info = types.SimpleNamespace(sha="0123abcd")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: types.SimpleNamespace(model_info=lambda repo: info))
    assert identity.model_identity("org/model") == "org/model@0123abcd"


def test_offline_hub_identity_uses_the_cached_revision_or_says_why_not(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_files_only: f"{tmp_path}/snapshots/feed42")
    assert identity.model_identity("org/model") == "org/model@feed42"

    def not_cached(repo, local_files_only):
        raise FileNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        identity.model_identity("org/model")
