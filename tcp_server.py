"""The seed's server: ``python3 tcp_server.py`` serves on 0.0.0.0:65432, no install needed.

It takes every option of ``tcpecho serve`` (see ``python3 tcp_server.py --help``) and, like
it, reads ``TCPECHO_<OPTION>`` environment variables and ``--config FILE``
(docs/configuration.md).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from tcpecho.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
