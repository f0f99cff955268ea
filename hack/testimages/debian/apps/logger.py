"""An app without any listed file that keeps a log file open in its container filesystem (the
writable layer): it appends one line per tick to /var/log/app/app.log through the descriptor it
opened at start, reads the file back, and prints in the counter format the harness parses
"<n> log=ok|bad lines=<lines in the file>": log=ok means the file holds exactly the lines this
process wrote."""
import os
import time

PATH = "/var/log/app/app.log"


def main():
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    log = open(PATH, "a", buffering=1)
    print(f"start pid={os.getpid()} log={PATH}", flush=True)
    n = 0
    while True:
        log.write(f"{n} tick\n")
        log.flush()
        with open(PATH) as f:
            lines = sum(1 for _ in f)
        print(f"{n} log={'ok' if lines == n + 1 else 'bad'} lines={lines}", flush=True)
        n += 1
        time.sleep(0.5)


if __name__ == "__main__":
    main()
