"""What ``megactor-rt serve`` saves a caller: seconds per result from a command per result (``megactor-rt demo``,
a new process each time: interpreter, PyTorch import, model build, portrait preparation, the run, the encode)
against a request to a running server (``POST /animate``: upload, the run, the answer), same settings, same
inputs, measured in the same run; the results are checked to be the same frames. The tiny random model on the
CPU, so the run itself is short and the fixed costs show: with real weights a command also loads 2-4 GB of
weights (and compiles or loads engines) each time, which this does not measure.

    python bench/serve_latency.py --out OUT     # writes serve_latency.md / .json (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import av
import numpy as np

from megactor_rt.assets import ASSETS_DIR
from megactor_rt.benchmark import (
    end_on_sigterm,
    record_line,
    run_record,
    save_tables,
    script_facts,
    script_out,
)

REPEATS = 3
SETTINGS = ["--steps", "4", "--duration", "1"]  # 30 frames of the bundled driver, the demo's 4 steps
PORTRAIT, DRIVER = ASSETS_DIR / "portrait.png", ASSETS_DIR / "driver.mp4"


def frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def command(out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "megactor_rt.cli", "-q", "demo", "--portrait", str(PORTRAIT),
                           "--driver", str(DRIVER), "-o", str(out), *SETTINGS], capture_output=True, text=True)
    if done.returncode:  # (was CalledProcessError, the command's own message captured and never shown)
        said = done.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"bench/serve_latency.py: `megactor-rt demo` failed (exit status {done.returncode}): "
                         + " / ".join(said))
    return time.perf_counter() - t0


def request(port: int, out: Path) -> float:
    """POST /animate with the portrait, the driver and the 1 s the command takes (``SETTINGS``: a form field)."""
    boundary = uuid.uuid4().hex
    parts = [f'name="portrait"; filename="{PORTRAIT.name}"'.encode(), PORTRAIT.read_bytes(),
             f'name="driver"; filename="{DRIVER.name}"'.encode(), DRIVER.read_bytes(),
             b'name="duration"', SETTINGS[3].encode()]
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; ".encode() + head + b"\r\n\r\n" + data + b"\r\n"
                    for head, data in zip(parts[::2], parts[1::2], strict=True)) + f"--{boundary}--\r\n".encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/animate", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = conn.getresponse()
    data = answer.read()
    conn.close()
    took = time.perf_counter() - t0
    if answer.status != 200:
        raise RuntimeError(f"the server answered {answer.status}: {data[:300]!r}")
    out.write_bytes(data)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    script_out(args.out, "bench/serve_latency.py")
    end_on_sigterm()  # (its scratch folder in --out removed, its server stopped)
    scratch = Path(tempfile.mkdtemp(prefix="serve-latency-", dir=args.out))
    server = None
    try:
        command_s = [command(scratch / f"cli{i}.mp4") for i in range(REPEATS)]
        t0 = time.perf_counter()
        with open(scratch / "serve.err", "w") as err:  # (the child holds its own copy: read back if it fails)
            server = subprocess.Popen([sys.executable, "-m", "megactor_rt.cli", "serve", "--demo", "--port", "0",
                                       *SETTINGS[:2]], stdout=subprocess.PIPE, stderr=err, text=True)
        line = server.stdout.readline()  # type: ignore[union-attr]
        start_s = time.perf_counter() - t0
        if "127.0.0.1:" not in line:  # (was an IndexError, the server's own message thrown away)
            said = (scratch / "serve.err").read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"bench/serve_latency.py: `megactor-rt serve` did not start (exit status "
                             f"{server.wait(60)}): {' / '.join(said) or line.strip() or 'it said nothing'}")
        port = int(line.split("127.0.0.1:")[1].split()[0])
        first_s = request(port, scratch / "first.mp4")
        warm_s = [request(port, scratch / f"warm{i}.mp4") for i in range(REPEATS)]
        same = all(np.array_equal(a, b) for a, b in zip(frames(scratch / "cli0.mp4"), frames(scratch / "warm0.mp4"),
                                                         strict=True))
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()
    report = {**script_facts(), **run_record(),
              "settings": "tiny random model (demo), CPU, bundled portrait and driver, first 1 s (30 frames), 4 steps, "
                          "window 16 / overlap 8",
              "repeats": REPEATS, "command_s": command_s, "server_start_s": start_s, "first_request_s": first_s,
              "warm_request_s": warm_s, "same_frames": same}
    cmd, warm = statistics.median(command_s), statistics.median(warm_s)
    lines = [record_line(report), "",
             f"A result by command against a request to a running server, {report['date']}, {report['machine']}; "
             f"{report['settings']}; medians of {REPEATS}:", "",
             "| way | seconds per result |", "|---|---|",
             f"| `megactor-rt demo` (a process per result) | {cmd:.2f} |",
             f"| `serve`: starting the server (once) | {start_s:.2f} |",
             f"| `serve`: first request (the portrait prepared) | {first_s:.2f} |",
             f"| `serve`: later requests (the portrait kept) | {warm:.2f} |", "",
             f"A request to a running server: {cmd / warm:.1f}x faster than a command per result; the same frames: "
             f"{'yes' if same else 'NO'}."]
    save_tables(args.out, "serve_latency", report, "\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
