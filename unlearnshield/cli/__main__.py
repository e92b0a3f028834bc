import sys

from unlearnshield.cli import main

sys.exit(main())
