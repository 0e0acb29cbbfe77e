"""``python -m vkconv``: the same command line as the ``vkconv`` script."""
import sys

from cv_plugin.cli import main

sys.exit(main())
