"""Several listener processes on one DICOM port (PNEUMOSCREEN_LISTENER_PROCESSES).

Real `pneumoscreen listen` processes on PostgreSQL, dcmtk storescu as the
sender: associations spread over the processes and every instance is
recorded once; a receiver that dies is started again; receivers die with a
listener killed with SIGKILL, so it can start again on the same port; a
second listener on the same data directory is refused. Datasets are received
into the data directory (beside the spool, not the system's temporary folder),
and what a cut association left there is cleared at start-up.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers.dicom_factory import write_chest_dicom
from tests.helpers.processes import Process, cli_env, cli_json, free_port, run_cli, storescu, wait_for_port, wait_until

pytestmark = pytest.mark.slow  # pneumoscreen listen processes


def receivers_of(pid: int) -> list[int]:
    """The listener's child processes (its receivers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in children]


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def start_listen(tmp_path, processes, pg_url: str, redis_url: str, count: int) -> tuple[dict, int, Process]:
    """`pneumoscreen listen` with ``count`` processes, dispatching nothing: (env, port, listener)."""
    port = free_port()
    env = cli_env(database_url=pg_url, broker_url=redis_url, data_dir=tmp_path / "data", port=port,
                  listener_processes=count, study_quiet_seconds=86400)
    run_cli("db", "upgrade", env=env)
    listener = Process(["listen"], env, tmp_path / "listen.log")
    processes.append(listener)
    wait_for_port(port, listener.proc)
    return env, port, listener


@pytest.fixture
def shared_listener(tmp_path, pg_url, redis_url, processes):
    env, port, listener = start_listen(tmp_path, processes, pg_url, redis_url, 3)
    wait_until(lambda: len(listening(listener)) == 3, timeout=60, what="three processes listening")
    return env, port, listener


def listening(listener: Process) -> set[str]:
    """Process ids that logged that they listen."""
    return set(re.findall(r"\[(\d+)\] dicom_io\.server: listening as ", listener.log()))


def test_associations_spread_over_the_processes_and_each_instance_is_recorded_once(shared_listener, tmp_path):
    env, port, listener = shared_listener
    files = [tmp_path / f"cr{i:02d}.dcm" for i in range(24)]
    for path in files:
        write_chest_dicom(path)
    results: list[subprocess.CompletedProcess] = []
    # 12 associations of two files each, 4 at a time: each new connection is hashed to one process
    for start in range(0, 24, 8):
        batch = [files[i:i + 2] for i in range(start, start + 8, 2)]
        threads = [threading.Thread(target=lambda pair=pair: results.append(storescu(port, *pair))) for pair in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [r.returncode for r in results] == [0] * 12, [r.stderr for r in results if r.returncode]

    rows = cli_json("instances", env=env)
    assert len(rows) == 24 and {r["state"] for r in rows} == {"RECEIVED"}
    stored_by = re.findall(r"\[(\d+)\] dicom_io\.handlers: stored ", listener.log())
    assert len(stored_by) == 24
    assert len(set(stored_by)) >= 2, "every association went to one process"
    assert set(map(int, stored_by)) <= {listener.proc.pid, *receivers_of(listener.proc.pid)}


def test_a_dead_receiver_is_started_again(shared_listener):
    _, _, listener = shared_listener
    first = receivers_of(listener.proc.pid)
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(receivers_of(listener.proc.pid)) == 2 and first[0] not in receivers_of(listener.proc.pid),
               timeout=30, what="a new receiver")
    wait_until(lambda: len(listening(listener)) == 4, timeout=60, what="the new receiver listening")
    assert "exited with status -9; starting it again" in listener.log()


def test_receivers_die_with_a_killed_listener_which_then_starts_again_on_its_port(shared_listener, tmp_path,
                                                                                processes):
    env, port, listener = shared_listener
    receivers = receivers_of(listener.proc.pid)
    listener.proc.send_signal(signal.SIGKILL)
    listener.proc.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in receivers), timeout=10, what="receivers gone")
    # a killed process's sockets close when its last thread is gone, a moment after it shows as a zombie
    wait_until(lambda: not accepts_connections(port), timeout=10, what="nothing listening on the port")

    again = Process(["listen"], env, tmp_path / "listen-again.log")
    processes.append(again)
    wait_for_port(port, again.proc)
    wait_until(lambda: len(listening(again)) == 3, timeout=60, what="three processes listening again")
    path = tmp_path / "after.dcm"
    write_chest_dicom(path)
    assert storescu(port, path).returncode == 0
    assert len(cli_json("instances", env=env)) == 1


def test_a_second_listener_on_the_same_data_directory_is_refused(shared_listener):
    env, _, _ = shared_listener
    second = run_cli("listen", env={**env, "PNEUMOSCREEN_PORT": str(free_port())}, check=False)
    assert second.returncode == 1
    assert "another pneumoscreen listener is running" in second.stderr and "Traceback" not in second.stderr


def test_datasets_are_received_beside_the_spool_and_leftovers_of_a_cut_association_are_cleared(tmp_path,
                                                                                               sqlite_url, processes):
    port = free_port()
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**cli_env(database_url=sqlite_url, data_dir=tmp_path / "data", port=port), "TMPDIR": str(system_tmp)}
    run_cli("db", "upgrade", env=env)
    incoming = tmp_path / "data" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "tmpcut.dcm").write_bytes(b"\0" * 1000)  # a dataset whose association was cut off
    listener = Process(["listen"], env, tmp_path / "listen.log")
    processes.append(listener)
    wait_for_port(port, listener.proc)
    path = tmp_path / "one.dcm"
    write_chest_dicom(path)
    assert storescu(port, path).returncode == 0
    assert len(cli_json("instances", env=env)) == 1
    assert list(incoming.iterdir()) == [] and list(system_tmp.iterdir()) == []
    assert "removed 1 partly received file(s)" in listener.log()


def test_files_a_dead_listener_process_was_bringing_into_the_spool_are_removed(tmp_path, pg_url, redis_url,
                                                                                processes):
    """A process killed between moving a received file beside its final name and naming it leaves a
    ``.incoming-<pid>-*.part`` that no row refers to: removed when the listener starts, and when one
    of its receivers died; the file of a process still alive stays."""
    folder = tmp_path / "data" / "spool" / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    before = [folder / f".incoming-{dead.pid}-abc.part", folder / ".incoming-xyz.part"]  # an earlier naming too
    alive_writer = folder / f".incoming-{os.getpid()}-def.part"
    for path in (*before, alive_writer):
        path.write_bytes(b"\0" * 100)
    _, _, listener = start_listen(tmp_path, processes, pg_url, redis_url, 2)
    wait_until(lambda: not any(p.exists() for p in before), timeout=30, what="the partial files removed at start")
    assert alive_writer.exists()

    [receiver] = wait_until(lambda: receivers_of(listener.proc.pid), timeout=30, what="the receiver")
    left_by_receiver = folder / f".incoming-{receiver}-ghi.part"
    left_by_receiver.write_bytes(b"\0" * 100)
    os.kill(receiver, signal.SIGKILL)
    wait_until(lambda: not left_by_receiver.exists(), timeout=30, what="the dead receiver's partial file removed")
    assert alive_writer.exists()
    assert "partly stored file(s) of a listener process that died" in listener.log()
