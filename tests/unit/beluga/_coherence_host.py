"""One "host" for the coherence sanitizer tests: a process with its own sanitized pool.

Reads one JSON command a line on stdin, answers one JSON line on stdout:
{"ok": result} or {"error": type name, "report": the report's dict (CoherenceError)}.
"""
import json
import sys

from beluga import coherence
from beluga.pool import Pool


def serve() -> None:
    pool = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "open":
                pool = Pool.open(cmd["path"], coherence=cmd["mode"], coherence_report=cmd.get("report"))
                result = pool.coherence.host
            elif op == "write":
                data = bytes.fromhex(cmd["hex"])
                pool.buf[cmd["off"]: cmd["off"] + len(data)] = data
                result = None
            elif op == "read":  # what this host's loads return (its cache), without a check
                result = bytes(pool.buf[cmd["off"]: cmd["off"] + cmd["n"]]).hex()
            elif op == "writeback":
                coherence.writeback(pool.buf, cmd["off"], cmd["n"], cmd.get("what"))
                result = None
            elif op == "invalidate":
                coherence.invalidate(pool.buf, cmd["off"], cmd["n"], cmd.get("what"))
                result = None
            elif op == "fence":
                coherence.fence()
                result = None
            elif op == "note_read":
                coherence.note_read(pool.buf, cmd["off"], cmd["n"], cmd["what"])
                result = bytes(pool.buf[cmd["off"]: cmd["off"] + cmd["n"]]).hex()
            elif op == "publish":
                coherence.publish(pool.buf, cmd["word_off"], cmd["word_len"], [tuple(p) for p in cmd["payload"]],
                                  cmd["what"])
                result = None
            elif op == "reports":
                result = [r.as_dict() for r in coherence.reports()]
            elif op == "small":  # ranges up to n lines take the line-by-line path
                coherence.SMALL_LINES = cmd["n"]
                result = None
            elif op == "close":
                pool.close()
                result = None
            else:
                raise ValueError(f"unknown op {op}")
            reply = {"ok": result}
        except coherence.CoherenceError as exc:
            reply = {"error": "CoherenceError", "report": exc.report.as_dict()}
        except Exception as exc:  # the test shows it
            reply = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
