"""Side files are copied into an artifact only from inside the model folder."""
from __future__ import annotations

from mpq.models.source import side_files
from mpq.quantize import quantize
from tests.helpers import write_tokenizer
from tests.tiny_models import save_tiny_model


def test_a_link_leading_outside_is_skipped_with_a_warning(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    write_tokenizer(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    (tmp_path / "src" / "chat_template.jinja").symlink_to(secret)
    files, skipped = side_files(tmp_path / "src")
    assert skipped == ["chat_template.jinja"] and "tokenizer.json" in files
    events = []
    quantize(tmp_path / "src", "w4a16", tmp_path / "out",
             events=lambda kind, **data: events.append((kind, data)))
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert any(kind == "warning" and "chat_template.jinja" in data["message"]
               for kind, data in events)


def test_a_hugging_face_cache_snapshot_keeps_its_blob_links(tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    save_tiny_model("llama", snapshot)
    write_tokenizer(snapshot)
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "f00"
    (snapshot / "tokenizer.json").rename(blob)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/f00")
    files, skipped = side_files(snapshot)
    assert "tokenizer.json" in files and skipped == []
