"""Database round trip and keying; the tuner times only on a miss (fake timer, no GPU)."""
import threading

import pytest
import torch

from kiln.autotune import database, tuner
from kiln.autotune.database import MemoryDatabase, SQLiteDatabase, TuningKey, open_database
from kiln.autotune.space import DeviceLimits, Problem

SRC = "@triton.jit\ndef k(in_ptr0, out_ptr0, XN, RN, XBLOCK, RBLOCK): pass\n"


def key(src=SRC, shapes=((1024, 4096),), dtypes=(torch.bfloat16,), device="NVIDIA H100 80GB HBM3", libs="v1"):
    return TuningKey.make(src, shapes, dtypes, device, libs)


def test_key_fields():
    k = key()
    assert k.shapes == ((1024, 4096),) and k.dtypes == ("torch.bfloat16",)
    assert "torch=" in database.versions() and "triton=" in database.versions()
    variants = [key(src=SRC + "#"), key(shapes=((1024, 4097),)), key(dtypes=(torch.float16,)),
                key(device="NVIDIA H200"), key(libs="v2")]
    assert len({k.workload(), *(v.workload() for v in variants)}) == 6


@pytest.mark.parametrize("make_db", [lambda p: SQLiteDatabase(str(p / "t.sqlite")), lambda p: MemoryDatabase()])
def test_round_trip(tmp_path, make_db):
    db = make_db(tmp_path)
    assert db.best(key()) is None
    db.commit(key(), [({"XBLOCK": 1, "num_warps": 4}, 0.5), ({"XBLOCK": 2, "num_warps": 8}, 0.25)])
    db.commit(key(), [({"XBLOCK": 4, "num_warps": 8}, 0.75)])
    assert db.best(key()) == ({"XBLOCK": 2, "num_warps": 8}, 0.25)
    assert db.best(key(device="other")) is None


def test_sqlite_persists_and_is_shared(tmp_path):
    open_database(str(tmp_path)).commit(key(), [({"XBLOCK": 8, "num_warps": 2}, 1.0)])
    again = SQLiteDatabase(str(tmp_path / database.DB_NAME))   # a second connection, as another process
    assert again.best(key()) == ({"XBLOCK": 8, "num_warps": 2}, 1.0)
    assert open_database(f"sqlite:///{tmp_path / database.DB_NAME}").best(key())[1] == 1.0
    with pytest.raises(ValueError, match="only SQLite"):
        open_database("postgresql://db/kiln")


def test_sqlite_concurrent_writers(tmp_path):
    path = str(tmp_path / "c.sqlite")
    dbs = [SQLiteDatabase(path) for _ in range(4)]
    threads = [threading.Thread(target=lambda d=d, i=i: [d.commit(key(shapes=((i, j),)), [({"X": j}, 1.0)])
                                                         for j in range(20)]) for i, d in enumerate(dbs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dbs[0].count() == 80


class FakeTimer:
    """Times by a made-up formula: XBLOCK 1024 with 4 warps is fastest."""
    def __init__(self):
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        fn()
        return self.last


def _compile_once(db, timer):
    """What a compile does for one pointwise kernel: the launcher's run() and the tuner."""
    p = Problem("pointwise", {"x": 1 << 22, "r": 1}, torch.bfloat16, {"bytes": 3 * 2 * (1 << 22)})
    launched = []

    def run(cfg):
        launched.append(cfg)
        timer.last = abs(cfg["XBLOCK"] - 1024) / 1024 + abs(cfg["num_warps"] - 4) + 1.0
    return tuner.tune(p, run, key(), db, DeviceLimits(), timer,
                      baseline={"XBLOCK": 1024, "RBLOCK": 1, "num_warps": 4}), launched


def test_second_compile_does_not_tune(tmp_path):
    timer = FakeTimer()
    first, launched = _compile_once(open_database(str(tmp_path)), timer)
    assert not first.cached and first.timed == timer.calls > 0
    assert first.timed <= tuner.TOP_K + 1 and first.candidates > first.timed    # pruned + ranked, not all timed
    assert first.config == {"XBLOCK": 1024, "RBLOCK": 1, "num_warps": 4} and first.ms == 1.0
    assert first.seconds > 0
    n = timer.calls
    # a "second compile" in another process: a fresh connection to the same file
    second, launched2 = _compile_once(SQLiteDatabase(str(tmp_path / database.DB_NAME)), timer)
    assert timer.calls == n and not launched2
    assert second.cached and second.config == first.config and second.seconds == 0.0


def test_failing_configs_are_skipped():
    timer = FakeTimer()
    p = Problem("pointwise", {"x": 1 << 20, "r": 1}, torch.float32, {"bytes": 8 << 20})

    def run(cfg):
        if cfg["XBLOCK"] != 512:
            raise RuntimeError("out of resources")
        timer.last = 0.1
    res = tuner.tune(p, run, key(), MemoryDatabase(), DeviceLimits(), timer,
                     baseline={"XBLOCK": 512, "RBLOCK": 1, "num_warps": 4})
    assert res.config["XBLOCK"] == 512 and res.timed >= 1

    def broken(cfg):
        raise RuntimeError("nothing compiles")
    db = MemoryDatabase()
    res = tuner.tune(p, broken, key(), db, DeviceLimits(), timer, baseline={"XBLOCK": 256, "RBLOCK": 1, "num_warps": 2})
    assert res.config == {"XBLOCK": 256, "RBLOCK": 1, "num_warps": 2} and res.ms is None
    assert db.best(key()) is None             # nothing measured, nothing remembered


def test_tune_launch_refuses_cpu_tensors(tmp_path):
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        tuner.tune_launch(SRC, Problem("pointwise", {"x": 4, "r": 1}), [torch.zeros(4)], lambda c: None, str(tmp_path))
