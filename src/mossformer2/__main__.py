import sys

from mossformer2.cli import main

sys.exit(main())
