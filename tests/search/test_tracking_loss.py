"""A tracking server that goes away: Tune's loop never waits for it, the trials' results
wait on the driver's disk in order, reach the store once it answers again, and a driver
that stops before then leaves them to ``--resume``. A real MLflow server ,
killed and started again on the same port and store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoprune.rayenv import quiet_environment

quiet_environment()

from autoprune.errors import AutopruneError  # noqa: E402
from autoprune.search import callback, journal  # noqa: E402
from autoprune.search.outbox import FILE, Outbox  # noqa: E402
from autoprune.tracking import store  # noqa: E402


class _Server:
    """An MLflow server over one SQLite store on one port, in its own process group, killed
    (as a crash would) and started again at will."""

    def __init__(self, db: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.db, self.log, self.proc = db, log, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "ab") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 120
        while store.tracking_down(self.uri):
            assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server's whole group, as a crash would
            self.proc.wait(timeout=30)
        assert store.tracking_down(self.uri)


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "mlflow.db"
    store.client(f"sqlite:///{db}").search_experiments()  # the store's tables, made once
    srv = _Server(db, tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


class _Trial:
    def __init__(self, trial_id: str, last_result: dict) -> None:
        self.trial_id = trial_id
        self.config = {"policy": {"criterion": "magnitude", "scope": "global"}}
        self.last_result = last_result


def _run_trial(logger, trial_id: str) -> float:
    """A trial's events on Tune's loop; how long the loop spent in the logger."""
    final = {"epoch": 2, "val_acc": 0.9, "loss": 0.3, "final": True}
    trial = _Trial(trial_id, final)
    t0 = time.perf_counter()
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.8, "loss": 0.5})
    logger.on_trial_result(0, [], trial, final)
    logger.on_trial_complete(0, [], trial)
    return time.perf_counter() - t0


def _statuses(uri: str, experiment_id: str, parent: str) -> dict[str, str]:
    return {tid: r.info.status for tid, r in store.trial_runs(uri, experiment_id, parent).items()}


def test_trials_never_wait_for_a_tracking_server_that_went_away(server, tmp_path, capfd):
    experiment_id, parent = store.open_search_run(server.uri, "lost", {}, resume=False)
    logger = callback.TrialLogger(server.uri, experiment_id, parent, str(tmp_path / "search"))
    assert _run_trial(logger, "t1") < 2.0
    logger.flush()
    assert _statuses(server.uri, experiment_id, parent) == {"t1": "FINISHED"}

    server.stop()
    loop_s = sum(_run_trial(logger, f"t{i}") for i in (2, 3))
    assert loop_s < 2.0, loop_s  # MLflow's own retries would take minutes: the loop never waits
    assert [r["trial_id"] for r in journal.load(str(tmp_path / "search"))] == ["t1", "t2", "t3"]
    box = Outbox(tmp_path / "search")
    assert box.written - box.done >= 6  # the second and third trials' events, kept on disk
    time.sleep(2)
    server.start()
    logger.flush()  # the writer tries again and catches up, in order
    assert _statuses(server.uri, experiment_id, parent) == {f"t{i}": "FINISHED" for i in (1, 2, 3)}
    runs = store.trial_runs(server.uri, experiment_id, parent)
    assert runs["t3"].info.run_name.startswith("#3 ") and runs["t3"].data.metrics["val_acc"] == 0.9
    logger.close()
    assert not (tmp_path / "search" / FILE).exists()  # everything written: the outbox goes
    err = capfd.readouterr().err
    assert err.count("is not answering") == 1 and "answers again" in err


def test_a_driver_that_stops_while_the_server_is_away_leaves_the_rest_to_resume(server, tmp_path):
    experiment_id, parent = store.open_search_run(server.uri, "resumed", {}, resume=False)
    folder = str(tmp_path / "search")
    logger = callback.TrialLogger(server.uri, experiment_id, parent, folder)
    _run_trial(logger, "t1")
    logger.flush()
    server.stop()
    _run_trial(logger, "t2")
    with pytest.raises(AutopruneError, match="has not answered for .* wait in .* written by --resume"):
        logger.close(wait_s=1.0)  # the end of a search, the server still away
    assert "t2" not in _statuses_sqlite(server.db, experiment_id, parent)  # not one of its events got there
    assert Outbox(Path(folder)).pending()  # kept, in order

    server.start()
    resumed = callback.TrialLogger(server.uri, experiment_id, parent, folder, first=3)
    assert callback.apply_outbox(resumed) >= 2
    assert _statuses(server.uri, experiment_id, parent) == {"t1": "FINISHED", "t2": "FINISHED"}
    assert not Outbox(Path(folder)).pending() and not (Path(folder) / FILE).exists()
    assert callback.apply_outbox(resumed) == 0  # applied once only


def _statuses_sqlite(db: Path, experiment_id: str, parent: str) -> dict[str, str]:
    return _statuses(f"sqlite:///{db}", experiment_id, parent)


def test_a_torn_last_line_of_the_outbox_is_dropped(tmp_path):
    box = Outbox(tmp_path)
    box.append("start", ["t1", {}, 1])
    box.append("result", ["t1", {"val_acc": float("nan")}, {}, None, 1, 0])
    with open(tmp_path / FILE, "a") as f:
        f.write('["ended", ["t1"')  # the driver died mid-line
    events = Outbox(tmp_path).pending()
    assert [op for op, _ in events] == ["start", "result"]
    box.applied()
    assert [op for op, _ in Outbox(tmp_path).pending()] == ["result"]


def test_tracking_down_tells_a_server_from_a_store_that_answers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert store.tracking_down(f"http://127.0.0.1:{port}")  # nothing listens there
    assert not store.tracking_down(f"sqlite:///{tmp_path / 'm.db'}")  # not a server: errors are errors


def test_tunes_snapshot_is_taken_every_minute_in_a_bucket_unless_the_user_says(monkeypatch):
    """Nothing reads Tune's snapshot back; in a bucket each one re-uploads Tune's whole folder."""
    from autoprune import rayenv

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "unset")  # restored after the test
    monkeypatch.setattr(rayenv, "USER_SNAPSHOT_S", None)
    assert rayenv.snapshot_period(bucket=True) == "60" == os.environ["TUNE_GLOBAL_CHECKPOINT_S"]
    assert rayenv.snapshot_period(bucket=False) == "1" == os.environ["TUNE_GLOBAL_CHECKPOINT_S"]
    monkeypatch.setattr(rayenv, "USER_SNAPSHOT_S", "300")
    assert rayenv.snapshot_period(bucket=False) == "300" == os.environ["TUNE_GLOBAL_CHECKPOINT_S"]
