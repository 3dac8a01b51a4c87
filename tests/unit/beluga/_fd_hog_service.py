"""A metadata service (pool + TCP) in a process that can be made to run out of file descriptors.

    POOL DIR    serve POOL; write DIR/ready.json once serving. When DIR/hog appears, open
                files until the file limit is reached (as a leak elsewhere in the process
                would), then create DIR/hogged; when DIR/release appears, close them again.

The signals are directories (mkdir/exists), which need no descriptor.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from beluga.pool import Pool
from beluga.service import MetadataService, ServiceConfig


def main(pool_path: str, folder: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pool = Pool.open(pool_path)
    svc = MetadataService(pool, ServiceConfig(takeover_wait_s=0, tcp_host="127.0.0.1", heartbeat_timeout_s=1.0,
                                              tcp_hello_timeout_s=1.0))

    def hog() -> None:
        held = []
        while not os.path.exists(os.path.join(folder, "hog")):
            time.sleep(0.01)
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        os.mkdir(os.path.join(folder, "hogged"))
        while not os.path.exists(os.path.join(folder, "release")):
            time.sleep(0.01)
        for fd in held:
            os.close(fd)

    def ready(s) -> None:
        with open(os.path.join(folder, "ready.json.tmp"), "w") as fh:
            json.dump({"tcp_address": s._tcp_address}, fh)
        os.replace(os.path.join(folder, "ready.json.tmp"), os.path.join(folder, "ready.json"))
        threading.Thread(target=hog, daemon=True).start()

    try:
        svc.serve(stop, on_ready=ready)
    finally:
        svc.release_pool()
        pool.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
