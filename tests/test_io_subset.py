import json

import pytest

from repic.core.io import RepicError, atomic_dir, read_json, write_json
from repic.data.subset import stratified_subset
from repic.data.validate import validate_training


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"

    class Boom:  # not JSON-serialisable: the write fails mid-way
        pass

    with pytest.raises(TypeError):
        write_json(target, {"x": Boom()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in target.iterdir()) == ["a"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writers_respect_the_umask(tmp_path, mask):
    """mkstemp/mkdtemp create 0600/0700; results must get what open()/mkdir give under the user's umask, so
    colleagues on a shared cluster can read them."""
    import os
    import stat

    from repic.core.io import umask, write_parquet, write_text

    old = os.umask(mask)
    try:
        assert umask() == mask
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.txt", "b")
        import pandas as pd

        write_parquet(tmp_path / "c.parquet", pd.DataFrame({"x": [1]}))
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("x")
        (tmp_path / "plain").mkdir()
        for name in ("a.json", "b.txt", "c.parquet"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    finally:
        os.umask(old)


def test_writers_remove_what_killed_writers_left(tmp_path):
    """A kill -9 leaves `.<name>.*.tmp`; the next writer of that path removes those of dead processes of this
    host (and untagged ones from before), never a live writer's or another path's."""
    import os
    import subprocess
    import sys

    from repic.core.io import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = [f".adapter.{_HOST}-{dead}.abcd_123.tmp", ".adapter.x9y8z7w6.tmp", f".adapter.{_HOST}-{dead}.abcdefgh.old"]
    kept = [f".adapter.{_HOST}-{os.getpid()}.live1234.tmp", f".adapter.otherhost-{dead}.abcdefgh.tmp",
            f".log.jsonl.{_HOST}-{dead}.abcdefgh.tmp", f".adapter.x.{_HOST}-{dead}.abcdefgh.tmp"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text("x")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", *kept])


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RepicError, match="bad.json: invalid JSON"):
        read_json(bad)
    with pytest.raises(RepicError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")


def _samples(counts):
    return [{"image": f"{m}{i}.png", "problem": "q", "solution": "yes", "accu_reward_method": m}
            for m, n in counts.items() for i in range(n)]


def test_subset_is_stratified_seeded_and_in_source_order():
    samples = _samples({"yes_no": 50, "iou": 30, "yes_no_name": 15, "yes_no_name_multi": 5})
    chosen, manifest = stratified_subset(samples, 20, seed=7)
    assert manifest["counts"] == {"iou": 6, "yes_no": 10, "yes_no_name": 3, "yes_no_name_multi": 1}
    assert len(chosen) == 20 and chosen == sorted(chosen)
    assert stratified_subset(samples, 20, seed=7)[0] == chosen
    assert stratified_subset(samples, 20, seed=8)[0] != chosen


def test_subset_largest_remainder():
    samples = _samples({"yes_no": 1, "iou": 1, "yes_no_name": 1, "yes_no_name_multi": 1})
    chosen, manifest = stratified_subset(samples, 2, seed=0)
    assert sum(manifest["counts"].values()) == 2 and len(chosen) == 2


def test_training_schema_errors_name_the_sample():
    samples = _samples({"yes_no": 2})
    del samples[1]["solution"]
    with pytest.raises(RepicError, match=r"t.json: sample 1: missing key 'solution'"):
        validate_training(samples, "t.json")
    samples = _samples({"yes_no": 1})
    samples[0]["accu_reward_method"] = "bleu"
    with pytest.raises(RepicError, match="sample 0: accu_reward_method 'bleu'"):
        validate_training(json.loads(json.dumps(samples)), "t.json")
