"""A full disk (ENOSPC, injected: a test cannot mount a small tmpfs without root) is one line, and a stage's
outputs are all or nothing (repic.core.io.staged_outputs)."""

from __future__ import annotations

import errno
import json

import pandas as pd
import pytest

from repic.core.cli import run
from repic.core.io import staged_outputs
from repic.core.layout import RETRIEVAL_REPORT

from .conftest import REPO


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_staged_outputs_land_together_or_not_at_all(tmp_path):
    out = tmp_path / "judge"
    out.mkdir()
    (out / "cache.jsonl").write_text("kept\n")          # persisted beside the outputs: never touched
    (out / "win_rates.json").write_text("old")
    with pytest.raises(OSError), staged_outputs(out) as stage:
        (stage / "win_rates.json").write_text("new")
        (stage / "sub").mkdir()
        _enospc()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache.jsonl", "judge", "win_rates.json"]
    assert (out / "win_rates.json").read_text() == "old"
    with staged_outputs(out) as stage:
        (stage / "win_rates.json").write_text("new")
        (stage / "sub").mkdir()
        (stage / "sub" / "x").write_text("x")
    assert (out / "win_rates.json").read_text() == "new" and (out / "cache.jsonl").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge"] and (out / "sub" / "x").is_file()


def test_caption_stage_disk_full_is_one_line_and_leaves_no_half_written_folder(tmp_path, monkeypatch, capsys):
    """Two datasets: the first one's files are written, the disk fills up on the second's Parquet. Before,
    `<out>/<first dataset>/` stayed (base_skip.json and all) beside a traceback."""
    import yaml

    import stages.caption as caption

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    datasets = []
    for name in ("one", "two"):
        (tmp_path / "retrieval" / name).mkdir(parents=True)
        (tmp_path / "retrieval" / name / RETRIEVAL_REPORT).write_text("{}")
        datasets.append({"name": name, "database": str(tmp_path / f"{name}.json"),
                         "queries": {"single": str(tmp_path / f"{name}_q.json")}})
    params["base"]["data"]["datasets"] = datasets
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rows = {"base_skip": [["q.png", ["<a>"], "A <a>.", "q"]], "base_retrieval": [["q.png", ["<a>"], "<a>.", "q"]]}
    monkeypatch.setattr(caption, "run_setting", lambda *a, **k: (rows, {"recall": 1.0}))
    real = pd.DataFrame.to_parquet
    calls = []

    def parquet(self, path, *a, **k):
        calls.append(path)
        return _enospc() if len(calls) == 2 else real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", parquet)
    out = tmp_path / "captions" / "single" / "base"
    argv = ["--params", str(tmp_path / "params.yaml"), "--setting", "single", "--root", str(tmp_path),
            "--retrieval", str(tmp_path / "retrieval"), "--row", "base", "--model", str(tmp_path / "m"),
            "--out", str(out)]
    assert run(caption.main, argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: No space left on device (ENOSPC): free space (df -h) and run again; no output was "
                   "half-written\n")
    assert not out.exists() and list((tmp_path / "captions" / "single").iterdir()) == []
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert run(caption.main, argv) == 0
    assert json.loads((out / "two" / "base_skip.json").read_text()) == rows["base_skip"]
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]


def test_download_disk_full_is_not_retried_as_a_network_error(tmp_path, monkeypatch, capsys):
    """Writing the .part fails with ENOSPC: one line, one request (a retry cannot free the disk), and no
    'interrupted ... run again to resume'."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import repic.data.sources as sources

    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = staticmethod(_enospc)

    monkeypatch.setattr(sources, "open", Full, raising=False)
    spec = {"kind": "url", "url": f"http://127.0.0.1:{server.server_port}/f.bin", "sha256": "0" * 64,
            "backoff_s": 0}
    try:
        rc = run(lambda argv: sources.fetch_source(spec, tmp_path / "f.bin", name="f", progress=False))
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: No space left on device (ENOSPC): free space (df -h) and run again; "
                               "no output was half-written\n")
    assert hits == ["/f.bin"]
