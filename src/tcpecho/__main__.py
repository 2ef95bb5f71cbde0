from __future__ import annotations

import sys

from tcpecho.cli import main

sys.exit(main())
