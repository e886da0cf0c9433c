"""`python -m datacreator.simulator --port 8000 --rpm 60 ...`"""

import sys

from .cli import run

sys.exit(run())
