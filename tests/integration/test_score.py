"""`workerpool score`: a real pool of real workers scoring real files, as a user runs it.

The model is a small torch MLP (32 features in, 8 out); references are the same model called
in-process chunk by chunk with the workers' thread count. The command runs as a subprocess
(stopped with SIGKILL and SIGTERM mid-run); ``workerpool.score`` runs embedded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.csv  # noqa: E402,F401 - pa.csv
import pyarrow.parquet as pq  # noqa: E402

import modelzoo  # noqa: E402
import workerpool as wp  # noqa: E402
from workerpool.sources.files import default_predict  # noqa: E402
from score_models import MARKER  # noqa: E402
from testkit import wait_until  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = [f"f{i}" for i in range(32)]


def make_input(path, rows: int, seed: int = 0, markers=()) -> np.ndarray:
    """A parquet (ids, 32 float32 features; 16k-row groups) or .npy file; its features."""
    x = np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)
    for row in markers:
        x[row, 0] = MARKER
    if str(path).endswith(".npy"):
        np.save(path, x)
    else:
        columns = {"id": np.arange(rows, dtype=np.int64) * 7 + 3}
        columns.update({name: x[:, i] for i, name in enumerate(FEATURES)})
        pq.write_table(pa.table(columns), path, row_group_size=16_384)
    return x


def reference(x: np.ndarray, chunk_rows: int) -> np.ndarray:
    model = modelzoo.mlp()
    with modelzoo.torch_threads(1), torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + chunk_rows])).numpy()
                               for i in range(0, len(x), chunk_rows)])


def score_command(*args, env=None, **kwargs) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS, os.environ.get("PYTHONPATH", "")]), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "workerpool", "score", "modelzoo:mlp",
                             *map(str, args)], env=environment, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def run_score(*args, env=None) -> tuple[int, str]:
    process = score_command(*args, env=env)
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def outputs_of(table) -> np.ndarray:
    return np.column_stack([table.column(f"output_{j}").to_numpy() for j in range(8)])


# -- outputs equal the model in-process --------------------------------------------------
def test_parquet_200k_rows_embedded_equals_in_process(tmp_path):
    x = make_input(tmp_path / "in.parquet", 200_000)
    with wp.Pool(modelzoo.mlp, default_predict, workers=2) as pool:
        summary = wp.score(pool, str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
                           id_column="id", chunk_rows=20_000)
    assert summary.rows == 200_000 and summary.errors == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", *[f"output_{j}" for j in range(8)]]
    assert table.column("id").to_numpy().tolist() == (np.arange(200_000) * 7 + 3).tolist()
    assert np.array_equal(outputs_of(table), reference(x, 20_000))
    assert not os.path.exists(tmp_path / "out.parquet.parts")


def test_remote_input_and_output_through_fsspec(tmp_path, monkeypatch):
    """memory:// stands for s3:// and the like: fetched into the cache, uploaded whole."""
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setenv("WORKERPOOL_CACHE", str(tmp_path / "cache"))
    x = make_input(tmp_path / "in.parquet", 5_000)
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/in.parquet", (tmp_path / "in.parquet").read_bytes())
    with wp.Pool(modelzoo.mlp, default_predict, workers=1) as pool:
        summary = wp.score(pool, "memory://bucket/in.parquet", "memory://bucket/out.parquet",
                           id_column="id", chunk_rows=2_000)
    assert summary.rows == 5_000
    with memory.open("/bucket/out.parquet", "rb") as f:
        table = pq.read_table(f)
    assert np.array_equal(outputs_of(table), reference(x, 2_000))
    memory.rm("/bucket", recursive=True)


def test_npy_200k_rows_command_line_equals_in_process(tmp_path):
    x = make_input(tmp_path / "in.npy", 200_000)
    code, stderr = run_score("--input", tmp_path / "in.npy", "--output", tmp_path / "out.npy",
                             "--chunk-rows", 20_000, "--workers", 2)
    assert code == 0, stderr
    assert "200000 rows in" in stderr and "0 errors" in stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), reference(x, 20_000))


def test_a_whole_pickled_module_scores_only_with_trust_pickle(tmp_path):
    """torch.save(module) pickles code: the command line refuses it, saying which flag
    allows it, and --trust-pickle scores it like the module itself."""
    x = make_input(tmp_path / "in.npy", 20_000)
    torch.save(modelzoo.mlp(), tmp_path / "whole.pt")
    command = [sys.executable, "-m", "workerpool", "score", str(tmp_path / "whole.pt"),
               "--input", str(tmp_path / "in.npy"), "--output", str(tmp_path / "out.npy"),
               "--chunk-rows", "5000", "--workers", "2"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr, refused.stderr
    trusted = subprocess.run([*command, "--trust-pickle"], capture_output=True, text=True,
                             timeout=600)
    assert trusted.returncode == 0, trusted.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), reference(x, 5000))


def test_csv_and_jsonl_in_and_out(tmp_path):
    x = make_input(tmp_path / "in.parquet", 3_000)
    table = pq.read_table(tmp_path / "in.parquet")
    pa.csv.write_csv(table, tmp_path / "in.csv")
    with open(tmp_path / "in.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    want = reference(x, 1_000)
    columns = ",".join(FEATURES)
    for source, sink in (("in.csv", "out.jsonl"), ("in.jsonl", "out.csv")):
        code, stderr = run_score("--input", tmp_path / source, "--output", tmp_path / sink,
                                 "--id-column", "id", "--columns", columns,
                                 "--dtype", "float32", "--chunk-rows", 1_000, "--workers", 1)
        assert code == 0, stderr
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["id"] for r in rows] == (np.arange(3_000) * 7 + 3).tolist()
    got = np.array([[r[f"output_{j}"] for j in range(8)] for r in rows], np.float32)
    assert np.array_equal(got, want)  # float32 values survive JSON (shortest repr)
    out = pa.csv.read_csv(tmp_path / "out.csv")  # float32 text, read back as float64
    assert np.array_equal(outputs_of(out).astype(np.float32), want)


# -- crash safety ------------------------------------------------------------------------
def stop_midway(tmp_path, how: int, chunks: int = 3) -> subprocess.Popen:
    """A command-line run stopped by signal ``how`` once ``chunks`` parts are written."""
    process = score_command("--input", tmp_path / "in.parquet", "--output",
                            tmp_path / "out.parquet", "--id-column", "id",
                            "--predict", "score_models:slow_predict",
                            "--chunk-rows", 10_000, "--workers", 2)
    parts = tmp_path / "out.parquet.parts"

    def written():
        return parts.exists() and sum(n.endswith(".arrow") for n in os.listdir(parts))

    assert wait_until(lambda: written() >= chunks or process.poll() is not None, 120)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(how)
    process.wait(120)
    return process


def test_sigkill_then_resume_is_byte_identical_to_an_uninterrupted_run(tmp_path):
    make_input(tmp_path / "in.parquet", 200_000)
    code, stderr = run_score("--input", tmp_path / "in.parquet", "--output",
                             tmp_path / "whole.parquet", "--id-column", "id", "--predict",
                             "score_models:slow_predict", "--chunk-rows", 10_000,
                             "--workers", 2, env={"SCORE_SLEEP_S": "0"})
    assert code == 0, stderr
    killed = stop_midway(tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    killed.stderr.close()
    assert not os.path.exists(tmp_path / "out.parquet")  # nothing that looks complete
    done = [n for n in os.listdir(tmp_path / "out.parquet.parts") if n.endswith(".arrow")]
    assert 3 <= len(done) < 20
    code, stderr = run_score("--input", tmp_path / "in.parquet", "--output",
                             tmp_path / "out.parquet", "--id-column", "id", "--predict",
                             "score_models:slow_predict", "--chunk-rows", 10_000,
                             "--workers", 2, "--resume", env={"SCORE_SLEEP_S": "0"})
    assert code == 0, stderr
    assert f"{len(done)} chunks resumed" in stderr
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["in.parquet", "out.parquet", "whole.parquet"]


def test_sigterm_finishes_parts_in_flight_then_resume_completes(tmp_path):
    x = make_input(tmp_path / "in.parquet", 100_000)
    stopped = stop_midway(tmp_path, signal.SIGTERM, chunks=2)
    stderr = stopped.stderr.read()
    stopped.stderr.close()
    assert stopped.returncode == 3, stderr
    assert "resume with --resume" in stderr
    assert not os.path.exists(tmp_path / "out.parquet")
    names = os.listdir(tmp_path / "out.parquet.parts")
    assert not [n for n in names if ".tmp" in n]  # in-flight chunks were finished, not cut
    code, stderr = run_score("--input", tmp_path / "in.parquet", "--output",
                             tmp_path / "out.parquet", "--id-column", "id", "--predict",
                             "score_models:slow_predict", "--chunk-rows", 10_000,
                             "--workers", 2, "--resume", env={"SCORE_SLEEP_S": "0"})
    assert code == 0, stderr
    assert np.array_equal(outputs_of(pq.read_table(tmp_path / "out.parquet")),
                          reference(x, 10_000))


def test_a_changed_input_or_a_missing_flag_refuses_to_resume(tmp_path):
    make_input(tmp_path / "in.parquet", 100_000)
    stop_midway(tmp_path, signal.SIGKILL).stderr.close()
    args = ["--input", tmp_path / "in.parquet", "--output", tmp_path / "out.parquet",
            "--id-column", "id", "--predict", "score_models:slow_predict",
            "--chunk-rows", 10_000, "--workers", 1]
    code, stderr = run_score(*args)  # no --resume
    assert code == 2 and "add --resume" in stderr
    make_input(tmp_path / "in.parquet", 100_000, seed=1)  # new data, same name
    code, stderr = run_score(*args, "--resume")
    assert code == 2 and "cannot resume" in stderr and "input" in stderr, stderr
    code, stderr = run_score(*args[:-6], "--chunk-rows", 5_000, "--workers", 1, "--resume")
    assert code == 2 and "chunk_rows" in stderr
    assert not os.path.exists(tmp_path / "out.parquet")


# -- bad rows ------------------------------------------------------------------------------
def test_on_error_skip_isolates_bad_rows_and_fail_stops(tmp_path):
    bad = [5, 12_345, 12_346, 29_999]
    x = make_input(tmp_path / "in.parquet", 30_000, markers=bad)
    args = ["--input", tmp_path / "in.parquet", "--output", tmp_path / "out.parquet",
            "--id-column", "id", "--predict", "score_models:picky_predict",
            "--chunk-rows", 5_000, "--workers", 2]
    code, stderr = run_score(*args)
    assert code == 1 and "predict failed on rows 0..4999" in stderr, stderr
    assert "ValueError: feature 0 is 1000.0" in stderr and len(stderr.strip().splitlines()) <= 3
    assert not os.path.exists(tmp_path / "out.parquet")
    shutil.rmtree(tmp_path / "out.parquet.parts")
    code, stderr = run_score(*args, "--on-error", "skip")
    assert code == 0 and "4 errors" in stderr, stderr
    errors = [json.loads(line) for line in open(tmp_path / "out.parquet.errors.jsonl")]
    assert [e["row"] for e in errors] == bad
    assert [e["id"] for e in errors] == [row * 7 + 3 for row in bad]
    assert all("feature 0 is 1000.0" in e["error"] for e in errors)
    table = pq.read_table(tmp_path / "out.parquet")
    good = np.setdiff1d(np.arange(30_000), bad)
    assert table.column("id").to_numpy().tolist() == (good * 7 + 3).tolist()
    # the good rows of a split chunk ran in other batch sizes: equal up to float rounding
    assert np.allclose(outputs_of(table), reference(x[good], 5_000), rtol=1e-5, atol=1e-6)


# -- memory and progress -------------------------------------------------------------------
def peak_rss(args: list) -> int:
    """The scorer's peak RSS (and its reaped children's: the zygote, smaller)."""
    process = score_command(*args, stdout=subprocess.DEVNULL)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    assert process.returncode == 0, stderr
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_input(tmp_path):
    make_input(tmp_path / "small.parquet", 100_000)
    make_input(tmp_path / "large.parquet", 400_000)
    rss = {}
    for name in ("small", "large"):
        rss[name] = peak_rss(["--input", tmp_path / f"{name}.parquet", "--output",
                              tmp_path / f"{name}.out.parquet", "--id-column", "id",
                              "--chunk-rows", 10_000, "--workers", 2])
    assert rss["large"] <= 1.10 * rss["small"], rss


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    make_input(tmp_path / "in.parquet", 40_000)
    code, stderr = run_score("--input", tmp_path / "in.parquet", "--output",
                             tmp_path / "out.parquet", "--id-column", "id", "--predict",
                             "score_models:slow_predict", "--chunk-rows", 4_000,
                             "--workers", 1, "--log-every", 0.3, env={"SCORE_SLEEP_S": "0.1"})
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("score: ")]
    assert len(lines) >= 2, stderr
    assert "/40000 rows (" in lines[-1] and "rows/s" in lines[-1] and "ETA" in lines[-1]
    assert "\r" not in stderr  # no bar drawn into a pipe


def test_a_progress_bar_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal: tqdm's bar (redrawn in place), rows/s, the total."""
    import fcntl
    import pty
    import struct
    import termios

    make_input(tmp_path / "in.parquet", 20_000)
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    environment = dict(os.environ, PYTHONPATH=TESTS, SCORE_SLEEP_S="0.1")
    process = subprocess.Popen(
        [sys.executable, "-m", "workerpool", "score", "modelzoo:mlp", "--input",
         str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.parquet"),
         "--id-column", "id", "--predict", "score_models:slow_predict", "--chunk-rows",
         "2000", "--workers", "1"], env=environment, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert process.wait(120) == 0, shown
    text = shown.decode(errors="replace")
    assert "\r" in text and "20.0k/20.0k" in text and "rows/s" in text, text
