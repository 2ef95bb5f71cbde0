"""The seed's client: ``python3 tcp_client.py`` talks to 127.0.0.1:65432, no install needed.

It takes every option of ``tcpecho client`` (see ``python3 tcp_client.py --help``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from tcpecho.cli import main

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
