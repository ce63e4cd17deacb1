"""``python -m stream_classifier`` runs the command line."""

import sys

from stream_classifier.cli import main

sys.exit(main())
