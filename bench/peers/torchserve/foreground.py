"""``torchserve --foreground`` that SIGTERM stops as a whole.

torchserve's foreground mode starts the Java frontend with subprocess.Popen and waits on
it without handling signals, so a SIGTERM to it would leave the frontend (and the Python
backend workers it started) running. This runs the same entry point
(``ts.model_server.start``, what the ``torchserve`` script calls) with SIGTERM and SIGINT
forwarded to the frontend, which shuts down and takes its workers with it.
"""

import signal
import sys

import psutil

from ts.model_server import start


def forward(signum, frame):
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    sys.argv[0] = "torchserve"
    sys.exit(start())
